// libqks: tag images with a qks bundle (the folder `qks-export` writes) from C++17.
//
// The same numbers as the Python runtime (`qks-infer`): the bundle is checked as
// `qks.runtime.bundle.Bundle.load` checks it, images are decoded and preprocessed into the same
// float32 tensor bit for bit (Pillow's conversions and resampling re-implemented), the image graph
// runs in ONNX Runtime (loaded at run time, any version >= 1.21), and labels come from the
// bundle's label banks. Building and linking: the "C and C++" section of the README.
//
//     qks::Tagger tagger("bundle");                       // checks the bundle, opens the graph
//     qks::Result r = tagger.tag_file("cat.jpg");
//     for (const auto& [name, p] : tagger.select(r, 5))   // the 5 most probable labels
//         std::cout << name << " " << p << "\n";
//
// Errors that stop a call are thrown as qks::Error (a status and a one-line message); an image
// that cannot be decoded is not an exception in the tag_* calls: its Result carries the error
// text qks-infer writes in its record. The C ABI over this is qks.h.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#if defined(_WIN32)
#define QKS_API __declspec(dllexport)
#else
#define QKS_API __attribute__((visibility("default")))
#endif

namespace qks {

// What went wrong; the values are those of qks_status in qks.h.
enum class Status : int {
    ok = 0,
    invalid_argument = 1,  // a bad option or argument
    bundle = 2,            // the bundle is missing, tampered, foreign or incomplete
    labels = 3,            // no such label bank, or label text that needs `qks-labels` first
    runtime = 4,           // ONNX Runtime could not be loaded or failed
    image = 5,             // an image could not be read or decoded
    io = 6,                // an output could not be written
    internal = 7,          // a bug: please report it
};

class QKS_API Error : public std::runtime_error {
public:
    Error(Status status, const std::string& message) : std::runtime_error(message), status_(status) {}
    Status status() const noexcept { return status_; }

private:
    Status status_;
};

struct Options {
    std::string precision = "auto";  // image graph: auto (int8 if exported, else fp32) | fp32 | fp16 | int8
    int threads = 0;                 // ONNX Runtime intra-op threads; 0: its default (all cores)
    std::string bank;                // label bank stored in the bundle; empty: the default bank
    std::string labels_file;         // or a label list whose bank exists (`qks-labels`, or cached by qks-infer)
    std::string ort_library;         // libonnxruntime.so path; empty: $QKS_ORT_LIBRARY, else the Python wheel's
    bool verify = true;              // check every bundle file's sha256 (sizes are always checked)
};

// One image's outcome. On success `probabilities` holds one value per label (bank order) and
// `query_features` the image graph's raw output [queries x dim]; otherwise `error` says why, in
// the words of qks-infer's error records.
struct Result {
    std::string error;
    std::vector<float> probabilities;
    std::vector<float> query_features;
    std::vector<float> embedding;  // the image embedding [embedding_dim()], L2-normalised; empty without one
    bool ok() const noexcept { return error.empty(); }
};

// The image graph's input for one image: float32 [3, size, size], as the Python runtime makes it.
struct Pixels {
    int size = 0;
    std::vector<float> data;
};

class QKS_API Tagger {
public:
    // Loads and checks the bundle, the label bank and the image graph. Throws qks::Error.
    explicit Tagger(const std::string& bundle_dir, const Options& options = Options());
    ~Tagger();
    Tagger(Tagger&&) noexcept;
    Tagger& operator=(Tagger&&) noexcept;
    Tagger(const Tagger&) = delete;
    Tagger& operator=(const Tagger&) = delete;

    const std::vector<std::string>& labels() const;
    // The bank's per-label thresholds (qks-calibrate), one per label in bank order; empty: none.
    const std::vector<float>& thresholds() const;
    int queries() const;       // Nq of the query features
    int dim() const;           // D of the query features and the label bank
    int image_size() const;    // H = W of the image graph's input
    std::string graph() const;       // the image graph file in use, e.g. "image_encoder.onnx"
    std::string bank_source() const; // "bundle:default", or "cache:<path>" for a --labels list
    std::string ort_version() const; // the ONNX Runtime that was loaded, e.g. "1.32.0"
    // The image embedding (the graph's "embedding" output: the backbone's pooled image embedding,
    // L2-normalised; similarity search, near-duplicates): its size, 0 for a bundle exported before
    // embeddings. run/tag_* fill Result::embedding when it is not 0.
    int embedding_dim() const;
    // Throws Error(Status::bundle, "<bundle>: ... re-export it with qks-export") when embedding_dim() is 0.
    void require_embedding() const;
    // What an embeddings index records about its vectors (qks.runtime.embeddings.embeddings_meta): the
    // bundle folder, the fp32 image graph's sha256 (the identity two runs' vectors must share), the backbone.
    struct EmbeddingSource {
        std::string bundle, bundle_sha256, model;
    };
    EmbeddingSource embedding_source() const;

    // Decode + preprocess (thread-safe, no engine): Error(Status::image, reason) if it cannot.
    // The run/tag_* calls below: one at a time per Tagger (one Tagger per thread).
    Pixels preprocess_file(const std::string& path) const;
    Pixels preprocess_rgb(const std::uint8_t* rgb, int width, int height, std::size_t stride = 0) const;

    // The image graph and the scoring on preprocessed images: one engine run for the whole batch.
    std::vector<Result> run(const std::vector<Pixels>& batch);

    // Convenience: preprocess then run. A file that cannot be decoded gives a Result with error set.
    Result tag_file(const std::string& path);
    Result tag_rgb(const std::uint8_t* rgb, int width, int height, std::size_t stride = 0);
    std::vector<Result> tag_files(const std::vector<std::string>& paths, int workers = 0);

    // qks-infer's label choice, most probable first: an explicit threshold (>= 0) for every label;
    // else the bank's per-label thresholds() when it has them; else 0.5 unless top_k is given. Of
    // the labels that pass, the top_k most probable (top_k > 0).
    std::vector<std::pair<std::string, float>> select(const Result& result, int top_k = 0,
                                                      double threshold = -1.0) const;

private:
    struct Impl;
    std::unique_ptr<Impl> impl_;
};

QKS_API const char* version() noexcept;

}  // namespace qks
