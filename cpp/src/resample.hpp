// Pillow's Image.resize for 8-bit RGB (libImaging/Resample.c, re-implemented): a separable
// convolution, horizontal pass then vertical pass on the rows it needs, the filter's support
// widened by the downscale factor, coefficients in 22-bit fixed point, each pass rounded and
// clipped to uint8. `box` is the source region in float, as Pillow receives it.
#pragma once

#include "image.hpp"

namespace qks::detail {

enum class Filter { bilinear, bicubic };

// Throws qks::Error(Status::image) for a box Pillow refuses (negative, outside, empty).
RgbImage resample(const RgbImage& in, int xsize, int ysize, Filter filter, const float box[4]);
RgbImage crop(const RgbImage& in, int left, int top, int width, int height);

}  // namespace qks::detail
