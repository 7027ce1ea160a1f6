#include "exif.hpp"

#include <cstdint>
#include <set>

#include "text.hpp"

namespace qks::detail {

Orientation exif_orientation(const std::string& exif) {
    std::string d = exif;
    for (int i = 0; i < 2 && d.compare(0, 6, std::string("Exif\0\0", 6)) == 0; ++i) d.erase(0, 6);
    Orientation o;
    if (d.empty()) return o;
    const std::string head = d.substr(0, 8);
    static const char* prefixes[] = {"MM\x00\x2a", "II\x2a\x00", "MM\x2a\x00", "II\x00\x2a", "MM\x00\x2b",
                                     "II\x2b\x00"};
    bool ok = false;
    for (const char* p : prefixes)
        if (head.size() >= 4 && head.compare(0, 4, std::string(p, 4)) == 0) ok = true;
    if (!ok) throw ExifSyntaxError("not a TIFF file (header " + py_bytes_repr(head) + " not valid)");
    const bool big = head[0] == 'M';
    auto u = [&](std::size_t off, int n) -> std::uint64_t {
        std::uint64_t v = 0;
        for (int i = 0; i < n; ++i) {
            std::uint64_t b = static_cast<unsigned char>(d[off + static_cast<std::size_t>(i)]);
            v |= big ? b << (8 * (n - 1 - i)) : b << (8 * i);
        }
        return v;
    };
    // ImageFileDirectory_v2(head) unpacks the first IFD's offset from the 8-byte head alone: at
    // ifh[8:] for BigTIFF (ifh[2] == 43: "II+\0"; "MM\0+" is read as classic TIFF), which is
    // always empty, and at ifh[4:] otherwise, short when the block is
    if (static_cast<unsigned char>(head[2]) == 43) throw ExifStructError("error: unpack requires a buffer of 8 bytes");
    if (head.size() < 8) throw ExifStructError("error: unpack requires a buffer of 4 bytes");
    std::uint64_t pos = u(4, 4);
    const std::size_t cnt_size = 2, entry = 12, inline_max = 4;
    if (pos > d.size() || d.size() - pos < cnt_size) return o;  // short read: Pillow warns, no tags (no overflow)
    std::uint64_t count = u(static_cast<std::size_t>(pos), static_cast<int>(cnt_size));
    pos += cnt_size;
    static const int unit[] = {0, 1, 1, 2, 4, 8, 1, 1, 2, 4, 8, 4, 8, 4, 0, 0, 8, 8, 8};
    // ImageFileDirectory_v2.load: every tag counts, not only the orientation: a tag seen before is
    // skipped, out-of-line data adds to a running total that may not pass the file's size (the tag
    // is skipped), and a short read of a tag's data ends the loading (OSError: a warning, no more tags)
    std::set<unsigned> loaded;
    std::uint64_t total = 0;  // saturating: Python's integers do not wrap
    for (std::uint64_t i = 0; i < count; ++i, pos += entry) {
        if (d.size() - pos < entry) break;  // Pillow stops at a short read, keeping earlier tags
        const std::size_t p = static_cast<std::size_t>(pos);
        const unsigned tag = static_cast<unsigned>(u(p, 2)), typ = static_cast<unsigned>(u(p + 2, 2));
        const std::uint64_t n = u(p + 4, 4);
        if (loaded.count(tag)) continue;
        if (typ >= sizeof unit / sizeof unit[0] || unit[typ] == 0) continue;  // unsupported type: skipped
        const std::uint64_t k = static_cast<std::uint64_t>(unit[typ]);
        const std::uint64_t size = n > UINT64_MAX / k ? UINT64_MAX : n * k;
        std::size_t at = p + 8;
        if (size > inline_max) {
            const std::uint64_t off = u(at, 4);
            if (off >= (std::uint64_t(1) << 63)) continue;  // "Tag offset too large"
            total = size > UINT64_MAX - total ? UINT64_MAX : total + size;
            if (total > d.size()) continue;                 // "Tag data larger than file"
            if (off > d.size() - size) return o;            // _safe_read: Truncated File Read ends the load
            at = static_cast<std::size_t>(off);
        }
        if (size == 0) continue;
        loaded.insert(tag);
        if (tag != 0x0112) continue;
        o.present = true;
        switch (typ) {
            case 1: case 7: o.value = 0; break;  // BYTE, UNDEFINED: Pillow gives bytes, never equal to 2..8
            case 6: o.value = static_cast<signed char>(d[at]); break;             // SBYTE
            case 3: o.value = static_cast<long>(u(at, 2)); break;                 // SHORT
            case 8: o.value = static_cast<std::int16_t>(u(at, 2)); break;         // SSHORT
            case 4: case 13: o.value = static_cast<long>(u(at, 4)); break;        // LONG, IFD
            case 9: o.value = static_cast<std::int32_t>(u(at, 4)); break;         // SLONG
            case 16: case 17: case 18: o.value = static_cast<long>(u(at, 8)); break;
            case 5: case 10: {                                                    // (S)RATIONAL: n/d
                std::int64_t num = typ == 5 ? static_cast<std::int64_t>(u(at, 4)) : static_cast<std::int32_t>(u(at, 4));
                std::int64_t den = typ == 5 ? static_cast<std::int64_t>(u(at + 4, 4)) : static_cast<std::int32_t>(u(at + 4, 4));
                o.value = (den != 0 && num % den == 0) ? static_cast<long>(num / den) : 0;
                break;
            }
            default: o.value = 0;  // ASCII, FLOAT, DOUBLE: never equal to 2..8 in Pillow's lookup
        }
        return o;  // the first occurrence of a tag wins
    }
    return o;
}

int xmp_orientation(const std::string& xmp) {
    const std::string key = "tiff:Orientation";
    for (std::size_t k = xmp.find(key); k != std::string::npos; k = xmp.find(key, k + 1)) {
        std::size_t p = k + key.size();
        if (p + 1 < xmp.size() && xmp[p] == '=' && xmp[p + 1] == '"') {
            p += 2;
        } else if (p < xmp.size() && xmp[p] == '>') {
            p += 1;
        } else {
            continue;
        }
        if (p < xmp.size() && xmp[p] >= '0' && xmp[p] <= '9') return xmp[p] - '0';
    }
    return -1;
}

}  // namespace qks::detail
