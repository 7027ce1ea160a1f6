// GIF as Pillow reads it: GifImagePlugin's block parser for the first frame (mode "P" with the
// frame's palette, "L" when that palette is the grey ramp), and its LZW decoder (GifDecode.c)
// fed 64 KiB at a time, including the canvas filled with the transparent index. Animated GIFs
// give their first frame, as in qks-infer.
#pragma once

#include <string>

#include "image.hpp"

namespace qks::detail {

bool looks_like_gif(const std::string& data);  // GIF87a / GIF89a
// Throws Unidentified, or qks::Error(Status::image, record text).
PilImage decode_gif(const std::string& data, const SizeCheck& check);

}  // namespace qks::detail
