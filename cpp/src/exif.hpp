// EXIF and XMP orientation as Pillow reads them (Image.getexif, TiffImagePlugin's IFD loader).
#pragma once

#include <stdexcept>
#include <string>

namespace qks::detail {

// Pillow raised SyntaxError while reading the EXIF block; what() is its message.
struct ExifSyntaxError : std::runtime_error {
    using std::runtime_error::runtime_error;
};
// Pillow raised struct.error reading the TIFF header; what() is the record's "error: ..." text.
struct ExifStructError : ExifSyntaxError {
    using ExifSyntaxError::ExifSyntaxError;
};

struct Orientation {
    bool present = false;  // tag 0x0112 in IFD0 (then XMP is not consulted)
    long value = 0;        // its first value when it is an integer type, else 0
};

// EXIF bytes ("Exif\0\0" prefix optional) -> the orientation tag. Throws ExifSyntaxError for a
// header that is not TIFF and ExifStructError for one Pillow cannot unpack (BigTIFF, short), as
// Pillow does; a damaged IFD only loses tags (Pillow warns).
Orientation exif_orientation(const std::string& exif);
// The digit of the first tiff:Orientation="N" or tiff:Orientation>N in an XMP packet, or -1.
int xmp_orientation(const std::string& xmp);

}  // namespace qks::detail
