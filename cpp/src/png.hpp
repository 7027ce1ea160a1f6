// PNG as Pillow reads it: PngImagePlugin's chunk parser (what is identified, refused, or an error),
// its zlib decoder with PNG filters and Adam7 (ZipDecode.c) fed 64 KiB at a time through the IDAT
// chunks, the rawmode unpackers into Pillow's modes, and the chunks read after the image data.
#pragma once

#include <string>

#include "image.hpp"

namespace qks::detail {

bool looks_like_png(const std::string& data);  // the 8-byte signature
// Throws Unidentified, or qks::Error(Status::image, record text).
PilImage decode_png(const std::string& data, const SizeCheck& check);

}  // namespace qks::detail
