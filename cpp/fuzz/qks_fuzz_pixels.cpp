// The C++ half of the differential check (differential.py): each file through the fuzz targets'
// image pipeline (harness.hpp: the preprocessing Tagger::preprocess_file does, at the fuzz size),
// one JSON line per file on stdout:
//
//     {"skipped": false, "error": null, "sha256": "<of the float32 tensor>", "tensor": [...]}
//
// "tensor" only with --tensors. Built with the fuzzers (ASan + UBSan), without libFuzzer's main.
#include <cstdio>
#include <fstream>
#include <iterator>
#include <string>

#include "harness.hpp"
#include "qks/records.hpp"
#include "sha256.hpp"
#include "text.hpp"

int main(int argc, char** argv) {
    bool tensors = false;
    for (int i = 1; i < argc; ++i) {
        const std::string path = argv[i];
        if (path == "--tensors") {
            tensors = true;
            continue;
        }
        std::ifstream f(path, std::ios::binary);
        if (!f) {
            std::fprintf(stderr, "qks_fuzz_pixels: cannot read %s\n", path.c_str());
            return 2;
        }
        const std::string data((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
        // the same geometry as fuzz_image.cpp picks for this input
        // up to 16 M pixels: no libFuzzer memory limit here, and these inputs are few
        const qks::fuzz::PixelsResult r =
            qks::fuzz::pixels(data, qks::fuzz::fuzz_config(data.size() % 2 == 1), std::uint64_t(1) << 24);
        std::string line = std::string("{\"skipped\": ") + (r.skipped ? "true" : "false") + ", \"error\": ";
        line += r.error.empty() ? "null" : qks::detail::json_quote(qks::display_name(r.error));
        if (!r.tensor.empty()) {
            const std::string bytes(reinterpret_cast<const char*>(r.tensor.data()), r.tensor.size() * sizeof(float));
            line += ", \"sha256\": \"" + qks::detail::sha256_bytes(bytes) + "\"";
            if (tensors) {
                line += ", \"tensor\": [";
                for (std::size_t k = 0; k < r.tensor.size(); ++k)
                    line += (k ? ", " : "") + qks::detail::py_float_repr(static_cast<double>(r.tensor[k]));
                line += "]";
            }
        }
        std::printf("%s}\n", line.c_str());
    }
    return 0;
}
