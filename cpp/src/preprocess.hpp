// qks.runtime.preprocess.Preprocess: an RGB image -> the image graph's float32 [3, size, size],
// through qks.images.resize_crop (torchvision's Resize + CenterCrop geometry on Pillow's
// resampling, Python's round half to even for the crop offset) and the float32 normalisation.
#pragma once

#include <vector>

#include "bundle.hpp"
#include "image.hpp"

namespace qks::detail {

RgbImage resize_crop(const RgbImage& img, const PreprocessConfig& cfg);
// uint8 HWC -> float32 CHW: x / 255 then (x - mean) / std, every step in float32 as numpy does.
std::vector<float> normalize(const RgbImage& crop, const PreprocessConfig& cfg);

}  // namespace qks::detail
