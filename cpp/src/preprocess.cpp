#include "preprocess.hpp"

#include <cmath>

#include "resample.hpp"

namespace qks::detail {
namespace {
constexpr long long kMaxIntermediatePixels = 1LL << 24;  // qks.images.MAX_INTERMEDIATE_PIXELS
}

RgbImage resize_crop(const RgbImage& img, const PreprocessConfig& cfg) {
    const Filter f = cfg.interpolation == "bilinear" ? Filter::bilinear : Filter::bicubic;
    const int size = cfg.size, w = img.width, h = img.height;
    if (cfg.resize_mode == "squash") {
        if (w == size && h == size) return img;
        const float box[4] = {0, 0, static_cast<float>(w), static_cast<float>(h)};
        return resample(img, size, size, f, box);
    }
    const long long shortest = w <= h ? w : h, longest = w <= h ? h : w;
    const long long new_short = size;
    const long long new_long = static_cast<long long>(static_cast<double>(size * longest) / static_cast<double>(shortest));
    const long long new_w = w <= h ? new_short : new_long, new_h = w <= h ? new_long : new_short;
    const int top = static_cast<int>(std::nearbyint(static_cast<double>(new_h - size) / 2.0));
    const int left = static_cast<int>(std::nearbyint(static_cast<double>(new_w - size) / 2.0));
    if (new_w * new_h > kMaxIntermediatePixels) {  // resample only the crop's region of the source
        const double sx = static_cast<double>(w) / static_cast<double>(new_w), sy = static_cast<double>(h) / static_cast<double>(new_h);
        const float box[4] = {static_cast<float>(left * sx), static_cast<float>(top * sy), static_cast<float>((left + size) * sx),
                              static_cast<float>((top + size) * sy)};
        return resample(img, size, size, f, box);
    }
    RgbImage resized;
    const RgbImage* src = &img;
    if (new_w != w || new_h != h) {
        const float box[4] = {0, 0, static_cast<float>(w), static_cast<float>(h)};
        resized = resample(img, static_cast<int>(new_w), static_cast<int>(new_h), f, box);
        src = &resized;
    }
    return crop(*src, left, top, size, size);
}

std::vector<float> normalize(const RgbImage& crop, const PreprocessConfig& cfg) {
    const std::size_t plane = static_cast<std::size_t>(crop.width) * static_cast<std::size_t>(crop.height);
    std::vector<float> out(plane * 3);
    const float k255 = 255.0f;
    for (int c = 0; c < 3; ++c) {
        const float mean = cfg.mean[c], std = cfg.std[c];
        float* o = out.data() + plane * static_cast<std::size_t>(c);
        for (std::size_t i = 0; i < plane; ++i) {
            const float x = static_cast<float>(crop.px[i * 3 + static_cast<std::size_t>(c)]) / k255;
            o[i] = (x - mean) / std;
        }
    }
    return out;
}

}  // namespace qks::detail
