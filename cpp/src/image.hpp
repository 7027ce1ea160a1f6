// Decoded images as Pillow holds them after Image.open + load, and the step to RGB.
//
// The decoders (jpeg.cpp, png.cpp) reproduce what Pillow's plugins do, including how they fail:
// a file Pillow cannot identify, or one it identifies but cannot decode, gives the same error
// text as the Python runtime writes in its record (qks.runtime.preprocess.Preprocess.load).
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

namespace qks::detail {

// An image in one of Pillow's modes, pixels packed row by row:
// "1" and "L" and "P" 1 byte, "LA" 2, "RGB" 3, "RGBA" and "CMYK" 4, "I;16" 2 (native uint16).
struct PilImage {
    std::string mode;
    int width = 0, height = 0;
    std::vector<std::uint8_t> px;
    std::vector<std::uint8_t> palette;  // "P": 256 x RGB, as Pillow's palette after loading
    int orientation = 1;                // EXIF/XMP orientation as ImageOps.exif_transpose reads it
};

struct RgbImage {
    int width = 0, height = 0;
    std::vector<std::uint8_t> px;  // width * height * 3
};

// Not an image the decoder recognises; Image.open would try the next format.
struct Unidentified {};

// Called with the header's size before any pixel is decoded (the decompression-bomb checks).
using SizeCheck = std::function<void(std::uint64_t width, std::uint64_t height)>;

// Pillow's ImageOps.exif_transpose for orientation 2..8 (others: unchanged).
RgbImage exif_transpose(RgbImage img, int orientation);
// qks.images.to_rgb without a background: Pillow's convert("RGB") (alpha dropped), I;16 scaled.
RgbImage to_rgb(const PilImage& img);

// Pillow's decompression-bomb limits on a header's size (the SizeCheck load_rgb uses).
void check_image_size(std::uint64_t width, std::uint64_t height);
// File bytes -> RGB with EXIF orientation applied (load_rgb after reading the file).
RgbImage decode_rgb(const std::string& data, const SizeCheck& check);
// A file -> RGB with EXIF orientation applied, exactly as the Python runtime decodes it.
// Throws qks::Error(Status::image, the record's error text).
RgbImage load_rgb(const std::string& path);

}  // namespace qks::detail
