// What the fuzz targets (fuzz_*.cpp) and the differential driver (qks_fuzz_pixels.cpp) share:
// the image pipeline of Tagger::preprocess_file on bytes, and scratch files for the parsers that
// read paths (.npy, label files, bundle folders).
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "bundle.hpp"

namespace qks::fuzz {

// Headers above this many pixels (1M) are not decoded while fuzzing: the allocation alone (up to
// Pillow's 89M-pixel limit, 268 MB of RGB) would only slow the fuzzer down and trip its memory
// limit. The limit checks themselves still run first.
constexpr std::uint64_t kMaxFuzzPixels = std::uint64_t(1) << 20;

// The preprocessing the image targets and the differential use (small, so a run is fast).
detail::PreprocessConfig fuzz_config(bool squash);

struct PixelsResult {
    bool skipped = false;      // the header asked for more than max_pixels
    std::string error;         // the error record's text, when the image is refused
    std::vector<float> tensor; // float32 [3, size, size] otherwise
};

// Bytes -> tensor or error record, as Tagger::preprocess_file does for a file. Any exception
// other than qks::Error(Status::image) escapes: the fuzzer reports it as a crash.
PixelsResult pixels(const std::string& data, const detail::PreprocessConfig& cfg,
                    std::uint64_t max_pixels = kMaxFuzzPixels);

// A scratch folder of this process (under $TMPDIR), removed at exit.
const std::string& scratch_dir();
// Writes `data` to scratch_dir()/name (creating parent folders) and returns its path.
std::string write_scratch(const std::string& name, const std::string& data);
// Empties scratch_dir().
void clear_scratch();

// Aborts with `what` (a finding) unless `ok`.
void require(bool ok, const char* what);

}  // namespace qks::fuzz
