#include "harness.hpp"

#include <ftw.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fstream>

#include "image.hpp"
#include "preprocess.hpp"
#include "qks/qks.hpp"

namespace qks::fuzz {
namespace {

struct TooLargeForFuzzing {};

int remove_entry(const char* path, const struct stat*, int, struct FTW*) { return ::remove(path); }

void remove_tree(const std::string& dir) { ::nftw(dir.c_str(), remove_entry, 16, FTW_DEPTH | FTW_PHYS); }

struct Scratch {
    std::string dir;
    Scratch() {
        const char* tmp = std::getenv("TMPDIR");
        std::string pattern = std::string(tmp && *tmp ? tmp : "/tmp") + "/qks-fuzz-XXXXXX";
        require(::mkdtemp(pattern.data()) != nullptr, "cannot create a scratch folder");
        dir = pattern;
    }
    ~Scratch() { remove_tree(dir); }
};

}  // namespace

void require(bool ok, const char* what) {
    if (ok) return;
    std::fprintf(stderr, "qks fuzz finding: %s\n", what);
    std::abort();
}

detail::PreprocessConfig fuzz_config(bool squash) {
    detail::PreprocessConfig c;
    c.size = 24;
    c.resize_mode = squash ? "squash" : "shortest";
    c.interpolation = squash ? "bilinear" : "bicubic";
    const float mean[3] = {0.48145466f, 0.4578275f, 0.40821073f}, std[3] = {0.26862954f, 0.26130258f, 0.27577711f};
    for (int i = 0; i < 3; ++i) {
        c.mean[i] = mean[i];
        c.std[i] = std[i];
    }
    return c;
}

PixelsResult pixels(const std::string& data, const detail::PreprocessConfig& cfg, std::uint64_t max_pixels) {
    PixelsResult r;
    auto check = [max_pixels](std::uint64_t w, std::uint64_t h) {
        detail::check_image_size(w, h);
        if (w * h > max_pixels) throw TooLargeForFuzzing{};
    };
    try {
        detail::RgbImage rgb = detail::decode_rgb(data, check);
        require(rgb.width > 0 && rgb.height > 0, "decoded an empty image");
        require(rgb.px.size() == static_cast<std::size_t>(rgb.width) * static_cast<std::size_t>(rgb.height) * 3,
                "decoded pixels do not match the image size");
        r.tensor = detail::normalize(detail::resize_crop(rgb, cfg), cfg);
        require(r.tensor.size() == 3 * static_cast<std::size_t>(cfg.size) * static_cast<std::size_t>(cfg.size),
                "tensor of the wrong size");
        for (float v : r.tensor) require(std::isfinite(v), "tensor value not finite");
    } catch (const TooLargeForFuzzing&) {
        r.skipped = true;
    } catch (const Error& e) {
        require(e.status() == Status::image, "an image error with another status than Status::image");
        require(e.what()[0] != '\0', "an empty error text");
        r.error = e.what();
    }
    return r;
}

const std::string& scratch_dir() {
    static Scratch s;
    return s.dir;
}

std::string write_scratch(const std::string& name, const std::string& data) {
    const std::string path = scratch_dir() + "/" + name;
    for (std::size_t k = path.find('/', scratch_dir().size() + 1); k != std::string::npos; k = path.find('/', k + 1))
        ::mkdir(path.substr(0, k).c_str(), 0700);
    std::ofstream f(path, std::ios::binary | std::ios::trunc);
    f.write(data.data(), static_cast<std::streamsize>(data.size()));
    return path;
}

void clear_scratch() {
    remove_tree(scratch_dir());
    ::mkdir(scratch_dir().c_str(), 0700);
}

}  // namespace qks::fuzz
