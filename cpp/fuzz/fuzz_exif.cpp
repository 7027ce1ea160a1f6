// EXIF and XMP orientation (exif.cpp): the TIFF IFD walk on arbitrary bytes, and the XMP scan.
#include <cstddef>
#include <cstdint>
#include <string>

#include "exif.hpp"
#include "harness.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* bytes, std::size_t size) {
    const std::string data(reinterpret_cast<const char*>(bytes), size);
    try {
        const qks::detail::Orientation o = qks::detail::exif_orientation(data);
        qks::fuzz::require(o.present || o.value == 0, "an orientation value without the tag");
    } catch (const qks::detail::ExifSyntaxError& e) {
        const std::string what = e.what();
        qks::fuzz::require(what.rfind("not a TIFF file", 0) == 0 || what.rfind("error: unpack requires", 0) == 0,
                           "another EXIF error than Pillow's");
    }
    const int x = qks::detail::xmp_orientation(data);
    qks::fuzz::require(x >= -1 && x <= 9, "an XMP orientation that is not one digit");
    return 0;
}
