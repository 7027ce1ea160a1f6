// qks-infer's folder listing and JSONL records, for C++ programs that write the same files.
//
// find_images lists a folder as qks.runtime.infer.find_images does (recursive, by extension,
// sorted like Python sorts the names, symlinked folders followed once); jsonl_record writes a
// record as qks-infer writes it (same keys, order, escaping and 7-significant-digit rounding).
#pragma once

#include <string>
#include <vector>

#include "qks/qks.hpp"

namespace qks {

// Image files under `root` as POSIX paths relative to it (bytes as the file system gives them).
// Throws Error(Status::invalid_argument) if `root` is not a folder.
QKS_API std::vector<std::string> find_images(const std::string& root);

// A file name as records show it: valid UTF-8, each undecodable byte written as \xNN
// (Python's os.fsencode(name).decode("utf-8", "backslashreplace")).
QKS_API std::string display_name(const std::string& name);

// Python's repr(float(f"{p:.7g}")): how qks-infer writes a probability ("0.9975576", "1.0", "1e-05").
QKS_API std::string format_probability(float p);

struct RecordOptions {
    int top_k = 0;           // > 0: keep the k most probable labels
    double threshold = -1;   // >= 0: keep labels with p >= threshold (default 0.5 without top_k)
    std::vector<float> thresholds; // per-label (Tagger::thresholds()), used when threshold < 0; empty: none
    bool all_scores = false; // {"image", "scores"} with every label, bank order
};

// One JSONL line (no newline): {"image": ..., "labels"|"scores": {...}} or {"image": ..., "error": ...}.
QKS_API std::string jsonl_record(const std::string& image, const Result& result,
                                 const std::vector<std::string>& labels, const RecordOptions& options);

}  // namespace qks
