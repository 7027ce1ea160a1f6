// Image bytes -> decoded RGB -> the preprocessed tensor, as qks-tag does for a file. Built four
// times (CMakeLists.txt): QKS_FUZZ_FORMAT 1 JPEG, 2 PNG, 3 GIF (inputs of another format are
// skipped, so the fuzzer stays in one decoder), 0 the format sniffing as a whole.
#include <cstddef>
#include <cstdint>
#include <string>

#include "gif.hpp"
#include "harness.hpp"
#include "jpeg.hpp"
#include "png.hpp"

#ifndef QKS_FUZZ_FORMAT
#define QKS_FUZZ_FORMAT 0
#endif

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* bytes, std::size_t size) {
    const std::string data(reinterpret_cast<const char*>(bytes), size);
#if QKS_FUZZ_FORMAT == 1
    if (!qks::detail::looks_like_jpeg(data)) return -1;  // -1: not added to the corpus
#elif QKS_FUZZ_FORMAT == 2
    if (!qks::detail::looks_like_png(data)) return -1;
#elif QKS_FUZZ_FORMAT == 3
    if (!qks::detail::looks_like_gif(data)) return -1;
#endif
    // the two geometries: shortest side + centre crop (bicubic) and squash (bilinear), chosen by
    // the input's length so that both see every decoder path
    static const qks::detail::PreprocessConfig configs[2] = {qks::fuzz::fuzz_config(false), qks::fuzz::fuzz_config(true)};
    qks::fuzz::pixels(data, configs[size % 2]);
    return 0;
}
