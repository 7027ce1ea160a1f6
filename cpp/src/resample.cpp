#include "resample.hpp"

#include <climits>
#include <cmath>
#include <cstring>
#include <vector>

#include "qks/qks.hpp"

namespace qks::detail {
namespace {

constexpr int kPrecisionBits = 32 - 8 - 2;

double bicubic(double x) {  // a = -0.5
    const double a = -0.5;
    if (x < 0.0) x = -x;
    if (x < 1.0) return ((a + 2.0) * x - (a + 3.0)) * x * x + 1;
    if (x < 2.0) return (((x - 5) * x + 8) * x - 4) * a;
    return 0.0;
}

double bilinear(double x) {
    if (x < 0.0) x = -x;
    if (x < 1.0) return 1.0 - x;
    return 0.0;
}

struct Coeffs {
    int ksize = 0;
    std::vector<int> bounds;  // per output pixel: xmin, count
    std::vector<int> kk;      // fixed point, ksize per output pixel
};

Coeffs precompute(int in_size, float in0, float in1, int out_size, Filter f) {
    const double filter_support = f == Filter::bicubic ? 2.0 : 1.0;
    double scale = static_cast<double>(in1 - in0) / out_size;
    double filterscale = scale < 1.0 ? 1.0 : scale;
    const double support = filter_support * filterscale;
    Coeffs c;
    c.ksize = static_cast<int>(std::ceil(support)) * 2 + 1;
    if (out_size > INT_MAX / (c.ksize * static_cast<int>(sizeof(double)))) throw std::bad_alloc();
    std::vector<double> k(static_cast<std::size_t>(out_size) * static_cast<std::size_t>(c.ksize), 0.0);
    c.bounds.resize(static_cast<std::size_t>(out_size) * 2);
    for (int xx = 0; xx < out_size; ++xx) {
        const double center = in0 + (xx + 0.5) * scale;
        double ww = 0.0;
        const double ss = 1.0 / filterscale;
        int xmin = static_cast<int>(center - support + 0.5);
        if (xmin < 0) xmin = 0;
        int xmax = static_cast<int>(center + support + 0.5);
        if (xmax > in_size) xmax = in_size;
        xmax -= xmin;
        double* kp = &k[static_cast<std::size_t>(xx) * static_cast<std::size_t>(c.ksize)];
        for (int x = 0; x < xmax; ++x) {
            const double w = (f == Filter::bicubic ? bicubic : bilinear)((x + xmin - center + 0.5) * ss);
            kp[x] = w;
            ww += w;
        }
        for (int x = 0; x < xmax; ++x)
            if (ww != 0.0) kp[x] /= ww;
        c.bounds[static_cast<std::size_t>(xx) * 2] = xmin;
        c.bounds[static_cast<std::size_t>(xx) * 2 + 1] = xmax;
    }
    c.kk.resize(k.size());
    for (std::size_t i = 0; i < k.size(); ++i)
        c.kk[i] = k[i] < 0 ? static_cast<int>(-0.5 + k[i] * (1 << kPrecisionBits))
                           : static_cast<int>(0.5 + k[i] * (1 << kPrecisionBits));
    return c;
}

inline std::uint8_t clip8(int v) {
    v >>= kPrecisionBits;
    return static_cast<std::uint8_t>(v < 0 ? 0 : v > 255 ? 255 : v);
}

}  // namespace

namespace {

// One horizontal pass: rows [offset, offset + rows) of `in` -> `xsize` columns.
RgbImage horizontal(const RgbImage& in, int offset, int rows, int xsize, const Coeffs& c) {
    RgbImage out;
    out.width = xsize;
    out.height = rows;
    out.px.resize(static_cast<std::size_t>(xsize) * static_cast<std::size_t>(rows) * 3);
    for (int yy = 0; yy < rows; ++yy) {
        const std::uint8_t* row = &in.px[static_cast<std::size_t>(yy + offset) * static_cast<std::size_t>(in.width) * 3];
        std::uint8_t* o = &out.px[static_cast<std::size_t>(yy) * static_cast<std::size_t>(xsize) * 3];
        for (int xx = 0; xx < xsize; ++xx) {
            const int xmin = c.bounds[static_cast<std::size_t>(xx) * 2], xmax = c.bounds[static_cast<std::size_t>(xx) * 2 + 1];
            const int* k = &c.kk[static_cast<std::size_t>(xx) * static_cast<std::size_t>(c.ksize)];
            int s0 = 1 << (kPrecisionBits - 1), s1 = s0, s2 = s0;
            for (int x = 0; x < xmax; ++x) {
                const std::uint8_t* p = row + static_cast<std::size_t>(x + xmin) * 3;
                s0 += p[0] * k[x];
                s1 += p[1] * k[x];
                s2 += p[2] * k[x];
            }
            o[3 * xx] = clip8(s0);
            o[3 * xx + 1] = clip8(s1);
            o[3 * xx + 2] = clip8(s2);
        }
    }
    return out;
}

// One vertical pass: `in` -> `ysize` rows, each from the rows its bounds name.
RgbImage vertical(const RgbImage& in, int ysize, const Coeffs& c) {
    RgbImage out;
    out.width = in.width;
    out.height = ysize;
    const std::size_t stride = static_cast<std::size_t>(in.width) * 3;
    out.px.resize(stride * static_cast<std::size_t>(ysize));
    for (int yy = 0; yy < ysize; ++yy) {
        const int* k = &c.kk[static_cast<std::size_t>(yy) * static_cast<std::size_t>(c.ksize)];
        const int ymin = c.bounds[static_cast<std::size_t>(yy) * 2], ymax = c.bounds[static_cast<std::size_t>(yy) * 2 + 1];
        std::uint8_t* o = &out.px[static_cast<std::size_t>(yy) * stride];
        for (std::size_t xx = 0; xx < stride; ++xx) {
            int s = 1 << (kPrecisionBits - 1);
            for (int y = 0; y < ymax; ++y) s += in.px[static_cast<std::size_t>(y + ymin) * stride + xx] * k[y];
            o[xx] = clip8(s);
        }
    }
    return out;
}

}  // namespace

RgbImage resample(const RgbImage& in, int xsize, int ysize, Filter filter, const float box[4]) {
    // the checks and the shortcut of Pillow's Image.resize (_imaging.c), then ImagingResample
    if (xsize < 1 || ysize < 1) throw Error(Status::image, "cannot decode image: height and width must be > 0");
    if (box[0] < 0 || box[1] < 0) throw Error(Status::image, "cannot decode image: box offset can't be negative");
    if (box[2] > in.width || box[3] > in.height)
        throw Error(Status::image, "cannot decode image: box can't exceed original image size");
    if (box[2] - box[0] < 0 || box[3] - box[1] < 0) throw Error(Status::image, "cannot decode image: box can't be empty");
    if (box[0] - static_cast<int>(box[0]) == 0 && box[2] - box[0] == xsize && box[1] - static_cast<int>(box[1]) == 0 &&
        box[3] - box[1] == ysize)  // a whole-pixel box of the output's size: Pillow crops
        return crop(in, static_cast<int>(box[0]), static_cast<int>(box[1]), xsize, ysize);
    const bool need_h = xsize != in.width || box[0] != 0 || box[2] != xsize;
    const bool need_v = ysize != in.height || box[1] != 0 || box[3] != ysize;
    // Pillow 13: when the height shrinks by more than twice what the width does, the vertical
    // pass runs first (a different rounding order, so it must be followed here too)
    const bool horizontal_first = !((in.height - ysize) > 0 && (in.height - ysize) > (in.width - xsize) * 2);
    Coeffs vert, hor;
    if ((need_h && horizontal_first) || need_v) vert = precompute(in.height, box[1], box[3], ysize, filter);
    int ybox_first = 0, ybox_last = 0;
    if (need_h) {
        if (horizontal_first) {
            ybox_first = vert.bounds[0];
            ybox_last = vert.bounds[static_cast<std::size_t>(ysize) * 2 - 2] + vert.bounds[static_cast<std::size_t>(ysize) * 2 - 1];
            for (int i = 0; i < ysize; ++i) vert.bounds[static_cast<std::size_t>(i) * 2] -= ybox_first;
        }
        hor = precompute(in.width, box[0], box[2], xsize, filter);
    }
    if (horizontal_first) {
        if (need_h && need_v) return vertical(horizontal(in, ybox_first, ybox_last - ybox_first, xsize, hor), ysize, vert);
        if (need_h) return horizontal(in, ybox_first, ybox_last - ybox_first, xsize, hor);
        if (need_v) return vertical(in, ysize, vert);
        return in;
    }
    RgbImage tmp = vertical(in, ysize, vert);  // need_v holds here: the height shrinks
    return need_h ? horizontal(tmp, 0, ysize, xsize, hor) : tmp;
}

RgbImage crop(const RgbImage& in, int left, int top, int width, int height) {
    RgbImage out;
    out.width = width;
    out.height = height;
    out.px.assign(static_cast<std::size_t>(width) * static_cast<std::size_t>(height) * 3, 0);
    for (int y = 0; y < height; ++y) {
        const int sy = top + y;
        if (sy < 0 || sy >= in.height) continue;  // outside: zeros, as Image.crop pads
        for (int x = 0; x < width; ++x) {
            const int sx = left + x;
            if (sx < 0 || sx >= in.width) continue;
            std::memcpy(&out.px[(static_cast<std::size_t>(y) * width + x) * 3], &in.px[(static_cast<std::size_t>(sy) * in.width + sx) * 3], 3);
        }
    }
    return out;
}

}  // namespace qks::detail
