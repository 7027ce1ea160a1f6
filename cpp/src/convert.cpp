// Image files -> RGB as qks.images / qks.runtime.preprocess do it, on the decoders of jpeg.cpp and png.cpp.
#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstring>

#include "files.hpp"
#include "gif.hpp"
#include "image.hpp"
#include "jpeg.hpp"
#include "png.hpp"
#include "qks/qks.hpp"

namespace qks::detail {
namespace {

constexpr std::uint64_t kMaxImagePixels = 89478485;  // PIL.Image.MAX_IMAGE_PIXELS: 1024 * 1024 * 1024 // 4 // 3

[[noreturn]] void image_error(const std::string& text) { throw Error(Status::image, text); }

// An ISO-BMFF file's `ftyp` box names its brands (major, then compatible ones, 4 bytes each): AVIF
// (avif, avis) or HEIC/HEIF (heic, mif1, ...), which qks-infer reads through Pillow and pillow-heif;
// other brands (MP4, QuickTime) are not images. Mirrors qks.runtime.preprocess.isobmff_format.
const char* heif_format(const std::string& d) {
    if (d.size() < 16 || d.compare(4, 4, "ftyp") != 0) return nullptr;
    const std::size_t box = (std::size_t(std::uint8_t(d[0])) << 24) | (std::size_t(std::uint8_t(d[1])) << 16) |
                            (std::size_t(std::uint8_t(d[2])) << 8) | std::size_t(std::uint8_t(d[3]));
    const std::size_t end = std::min(std::min(box, d.size()), std::size_t(64));
    static const char* avif[] = {"avif", "avis"};
    static const char* heic[] = {"heic", "heix", "heim", "heis", "hevc", "hevx", "hevm", "hevs", "mif1", "mif2", "msf1"};
    bool is_heic = false;
    for (std::size_t at = 8; at + 4 <= end; at += (at == 8 ? 8 : 4)) {  // skip the minor version after the major brand
        for (const char* b : avif)
            if (d.compare(at, 4, b) == 0) return "AVIF";
        for (const char* b : heic) is_heic = is_heic || d.compare(at, 4, b) == 0;
    }
    return is_heic ? "HEIC" : nullptr;
}

// Formats Pillow reads that these decoders do not: named in the error instead of "unidentified".
const char* other_format(const std::string& d) {
    auto starts = [&](const char* p, std::size_t n) { return d.size() >= n && d.compare(0, n, p, n) == 0; };
    if (starts("BM", 2)) return "BMP";
    if (starts("RIFF", 4) && d.size() >= 12 && d.compare(8, 4, "WEBP") == 0) return "WebP";
    if (starts("II*\0", 4) || starts("MM\0*", 4) || starts("II+\0", 4) || starts("MM\0+", 4)) return "TIFF";
    if (d.size() >= 2 && d[0] == 'P' && d[1] >= '1' && d[1] <= '7') return "PPM/PGM/PBM";
    if (starts("\0\0\1\0", 4) || starts("\0\0\2\0", 4)) return "ICO/CUR";
    if (const char* heif = heif_format(d)) return heif;
    if (starts("\0\0\0\x0cjP  ", 8) || starts("\xff\x4f\xff\x51", 4)) return "JPEG 2000";
    return nullptr;
}

}  // namespace

void check_image_size(std::uint64_t w, std::uint64_t h) {
    const std::uint64_t pixels = w * h;  // both < 2^32: no overflow
    if (pixels > 2 * kMaxImagePixels) image_error("image too large (decompression bomb limit)");
    if (pixels > kMaxImagePixels)
        image_error("image too large: " + std::to_string(w) + " x " + std::to_string(h) + " pixels (limit " +
                    std::to_string(kMaxImagePixels) + ": PIL.Image.MAX_IMAGE_PIXELS)");
}

RgbImage to_rgb(const PilImage& img) {
    RgbImage out;
    out.width = img.width;
    out.height = img.height;
    const std::size_t n = static_cast<std::size_t>(img.width) * static_cast<std::size_t>(img.height);
    out.px.resize(n * 3);
    std::uint8_t* o = out.px.data();
    const std::uint8_t* in = img.px.data();
    const std::string& m = img.mode;
    if (m == "RGB") {
        std::memcpy(o, in, n * 3);
    } else if (m == "L" || m == "1") {
        for (std::size_t i = 0; i < n; ++i) o[3 * i] = o[3 * i + 1] = o[3 * i + 2] = in[i];
    } else if (m == "P") {
        for (std::size_t i = 0; i < n; ++i) std::memcpy(o + 3 * i, img.palette.data() + 3 * std::size_t(in[i]), 3);
    } else if (m == "LA") {
        for (std::size_t i = 0; i < n; ++i) o[3 * i] = o[3 * i + 1] = o[3 * i + 2] = in[2 * i];
    } else if (m == "RGBA") {
        for (std::size_t i = 0; i < n; ++i) std::memcpy(o + 3 * i, in + 4 * i, 3);
    } else if (m == "CMYK") {  // Pillow's cmyk2rgb: nk - c * nk / 255 with its rounding (MULDIV255)
        for (std::size_t i = 0; i < n; ++i) {
            const int nk = 255 - in[4 * i + 3];
            for (int c = 0; c < 3; ++c) {
                int t = in[4 * i + static_cast<std::size_t>(c)] * nk + 128;
                int v = nk - (((t >> 8) + t) >> 8);
                o[3 * i + static_cast<std::size_t>(c)] = static_cast<std::uint8_t>(v < 0 ? 0 : v > 255 ? 255 : v);
            }
        }
    } else if (m == "I;16") {  // qks.images._high_depth_to_l: x * (255 / 65535), rounded half to even
        const double k = 255.0 / 65535.0;
        for (std::size_t i = 0; i < n; ++i) {
            std::uint16_t v;
            std::memcpy(&v, in + 2 * i, 2);
            double r = std::nearbyint(static_cast<double>(v) * k);
            std::uint8_t g = static_cast<std::uint8_t>(r < 0 ? 0 : r > 255 ? 255 : r);
            o[3 * i] = o[3 * i + 1] = o[3 * i + 2] = g;
        }
    } else {
        throw Error(Status::internal, "no RGB conversion for mode " + m);
    }
    return out;
}

RgbImage exif_transpose(RgbImage img, int orientation) {
    if (orientation < 2 || orientation > 8) return img;
    const int w = img.width, h = img.height;
    const bool swap = orientation >= 5;  // TRANSPOSE, ROTATE_270, TRANSVERSE, ROTATE_90
    RgbImage out;
    out.width = swap ? h : w;
    out.height = swap ? w : h;
    out.px.resize(img.px.size());
    for (int yo = 0; yo < out.height; ++yo)
        for (int xo = 0; xo < out.width; ++xo) {
            int x = 0, y = 0;
            switch (orientation) {
                case 2: x = w - 1 - xo; y = yo; break;            // FLIP_LEFT_RIGHT
                case 3: x = w - 1 - xo; y = h - 1 - yo; break;    // ROTATE_180
                case 4: x = xo; y = h - 1 - yo; break;            // FLIP_TOP_BOTTOM
                case 5: x = yo; y = xo; break;                    // TRANSPOSE
                case 6: x = yo; y = h - 1 - xo; break;            // ROTATE_270
                case 7: x = w - 1 - yo; y = h - 1 - xo; break;    // TRANSVERSE
                default: x = w - 1 - yo; y = xo; break;           // 8: ROTATE_90
            }
            std::memcpy(&out.px[(static_cast<std::size_t>(yo) * out.width + xo) * 3],
                        &img.px[(static_cast<std::size_t>(y) * w + x) * 3], 3);
        }
    return out;
}

RgbImage load_rgb(const std::string& path) {
    std::string data;
    if (!read_file(path, data)) {
        const int e = errno;
        if (e == ENOENT) image_error("file not found (broken link?)");
        if (e == EISDIR) image_error("is a directory");
        if (e == EACCES || e == EPERM) image_error("permission denied");
        if (e == ELOOP) image_error("symbolic link loop");
        image_error(std::string("cannot read file: ") + std::strerror(e));
    }
    return decode_rgb(data, check_image_size);
}

RgbImage decode_rgb(const std::string& data, const SizeCheck& check) {
    PilImage img;
    try {
        if (looks_like_jpeg(data)) {
            img = decode_jpeg(data, check);
        } else if (looks_like_png(data)) {
            img = decode_png(data, check);
        } else if (looks_like_gif(data)) {
            img = decode_gif(data, check);
        } else if (const char* fmt = other_format(data)) {
            const bool vowel = fmt[0] == 'A' || fmt[0] == 'I';  // "an AVIF file", "an ICO/CUR file"
            image_error(std::string("cannot decode image: ") + (vowel ? "an " : "a ") + fmt +
                        " file (qks-tag reads JPEG, PNG and GIF; qks-infer reads it)");
        } else {
            throw Unidentified{};
        }
    } catch (const Unidentified&) {
        image_error(data.empty() ? "empty file (0 bytes)" : "not a readable image (unidentified format)");
    } catch (const std::bad_alloc&) {
        image_error("cannot decode image: MemoryError: out of memory");
    }
    return exif_transpose(to_rgb(img), img.orientation);
}

}  // namespace qks::detail
