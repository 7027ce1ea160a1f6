// JPEG as Pillow reads it: JpegImagePlugin's marker parser (which decides whether Pillow
// identifies the file, its mode and size, EXIF and XMP) and its libjpeg decoder fed in 64 KiB
// blocks through a suspending source, so truncated and corrupt files fail with Pillow's words.
#pragma once

#include <string>

#include "image.hpp"

namespace qks::detail {

bool looks_like_jpeg(const std::string& data);  // FF D8 FF
// Throws Unidentified, or qks::Error(Status::image, record text).
PilImage decode_jpeg(const std::string& data, const SizeCheck& check);

}  // namespace qks::detail
