// qks-pixels: write the image graph's input for each image as the Python runtime makes it, to
// compare the preprocessing bit for bit (tests, debugging a file that tags differently).
//
//     qks-pixels --bundle bundle --out DIR a.jpg b.png ...
//
// DIR/<i>.npy holds image i's float32 [3, size, size]; an image that cannot be decoded gets
// DIR/<i>.err with the text of its error record instead. Exit 0, or 2 on bad arguments.
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "cli_args.hpp"
#include "qks/qks.hpp"

namespace {

bool write_all(const std::string& path, const std::string& bytes) {
    struct Close {
        void operator()(std::FILE* f) const noexcept { std::fclose(f); }
    };
    std::unique_ptr<std::FILE, Close> f(std::fopen(path.c_str(), "wb"));
    return f && std::fwrite(bytes.data(), 1, bytes.size(), f.get()) == bytes.size();
}

std::string npy(const qks::Pixels& p) {
    std::string header = "{'descr': '<f4', 'fortran_order': False, 'shape': (3, " + std::to_string(p.size) + ", " +
                         std::to_string(p.size) + "), }";
    while ((10 + header.size() + 1) % 64 != 0) header += ' ';
    header += '\n';
    std::string out("\x93NUMPY\x01\x00", 8);
    out += static_cast<char>(header.size() & 0xFF);
    out += static_cast<char>(header.size() >> 8);
    out += header;
    out.append(reinterpret_cast<const char*>(p.data.data()), p.data.size() * sizeof(float));
    return out;
}

}  // namespace

int main(int argc, char** argv) {
    std::string bundle, dir, ort;
    std::vector<std::string> images;
    try {
        qks::cli::Args args({{"--bundle", "", false}, {"--out", "-o", false}, {"--ort-library", "", false}}, argc, argv);
        bundle = args.get("--bundle", "./bundle");
        dir = args.get("--out");
        ort = args.get("--ort-library");
        images = args.positional;
        if (dir.empty()) throw qks::cli::UsageError{"Missing option '--out'."};
    } catch (const qks::cli::UsageError& e) {
        std::fprintf(stderr, "qks-pixels: error: %s\n", e.message.c_str());
        return 2;
    }
    try {
        qks::Options o;
        o.ort_library = ort;
        qks::Tagger tagger(bundle, o);
        for (std::size_t i = 0; i < images.size(); ++i) {
            const std::string base = dir + "/" + std::to_string(i);
            bool ok;
            try {
                ok = write_all(base + ".npy", npy(tagger.preprocess_file(images[i])));
            } catch (const qks::Error& e) {
                if (e.status() != qks::Status::image) throw;
                ok = write_all(base + ".err", e.what());
            }
            if (!ok) {
                std::fprintf(stderr, "qks-pixels: error: cannot write %s: %s\n", base.c_str(), std::strerror(errno));
                return 2;
            }
        }
    } catch (const qks::Error& e) {
        std::fprintf(stderr, "qks-pixels: error: %s\n", e.what());
        return 2;
    }
    return 0;
}
