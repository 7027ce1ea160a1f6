#include "jpeg.hpp"

#include <algorithm>
#include <csetjmp>
#include <cstdio>
#include <cstring>

#include <jpeglib.h>

#include "exif.hpp"
#include "qks/qks.hpp"

namespace qks::detail {
namespace {

constexpr std::size_t kMaxBlock = 65536;  // ImageFile.MAXBLOCK: Pillow reads the file in these

[[noreturn]] void decode_error(const std::string& why) { throw Error(Status::image, "cannot decode image: " + why); }

// -- JpegImagePlugin._open -------------------------------------------------------------------------

struct Header {
    std::string mode;
    int width = 0, height = 0;
    bool has_sos = false, has_dpi = false, has_exif = false;
    std::string exif, xmp;
};

class Reader {  // a file object over bytes: read(n) as Python's fp.read(n)
public:
    explicit Reader(const std::string& d) : d_(d) {}
    std::string read(long long n) {
        if (n < 0 || static_cast<std::size_t>(n) > d_.size() - pos_) n = static_cast<long long>(d_.size() - pos_);
        std::string s = d_.substr(pos_, static_cast<std::size_t>(n));
        pos_ += static_cast<std::size_t>(n);
        return s;
    }

private:
    const std::string& d_;
    std::size_t pos_ = 0;
};

unsigned i16(const std::string& s, std::size_t o = 0) {  // struct.error (-> not identified) if short
    if (s.size() < o + 2) throw Unidentified{};
    return (static_cast<unsigned>(static_cast<unsigned char>(s[o])) << 8) | static_cast<unsigned char>(s[o + 1]);
}
unsigned byte_at(const std::string& s, std::size_t o) {  // IndexError (-> not identified) if short
    if (o >= s.size()) throw Unidentified{};
    return static_cast<unsigned char>(s[o]);
}

std::string segment(Reader& r) {  // n = i16(fp.read(2)) - 2; ImageFile._safe_read(fp, n)
    long long n = static_cast<long long>(i16(r.read(2))) - 2;
    if (n <= 0) return "";  // a length field of 0 or 1: _safe_read reads nothing (not the rest)
    std::string s = r.read(n);
    if (static_cast<long long>(s.size()) < n) decode_error("Truncated File Read");
    return s;
}

bool starts(const std::string& s, const char* p, std::size_t n) { return s.size() >= n && s.compare(0, n, p, n) == 0; }

void app(Header& h, unsigned marker, const std::string& s) {
    if (marker == 0xFFE0 && starts(s, "JFIF", 4)) {
        i16(s, 5);  // the version: struct.error if short
        if (s.size() >= 12) {
            unsigned unit = static_cast<unsigned char>(s[7]);
            if (unit == 1 || unit == 2) h.has_dpi = true;
        }
    } else if (marker == 0xFFE1 && starts(s, "Exif\0\0", 6)) {
        if (h.has_exif) {
            h.exif += s.substr(6);
        } else {
            h.exif = s;
            h.has_exif = true;
        }
    } else if (marker == 0xFFE1 && starts(s, "http://ns.adobe.com/xap/1.0/\0", 29)) {
        h.xmp = s.substr(s.find('\0') + 1);
    } else if (marker == 0xFFED && starts(s, "Photoshop 3.0\0", 14)) {
        std::size_t off = 14;  // resource blocks: a name length past the end is an IndexError
        while (s.size() >= off + 4 && s.compare(off, 4, "8BIM") == 0) {
            off += 4;
            if (s.size() < off + 2) break;  // struct.error: caught by Pillow
            off += 2;
            off += 1 + byte_at(s, off);
            off += off & 1;
            if (s.size() < off + 4) break;
            std::size_t size = (std::size_t(static_cast<unsigned char>(s[off])) << 24) |
                               (std::size_t(static_cast<unsigned char>(s[off + 1])) << 16) |
                               (std::size_t(static_cast<unsigned char>(s[off + 2])) << 8) |
                               static_cast<unsigned char>(s[off + 3]);
            off += 4 + size;
            off += off & 1;
        }
    } else if (marker == 0xFFEE && starts(s, "Adobe", 5)) {
        i16(s, 5);
    }
}

void sof(Header& h, const std::string& s, std::vector<std::string>& icc) {
    unsigned hh = i16(s, 1), ww = i16(s, 3);
    h.width = static_cast<int>(ww);
    h.height = static_cast<int>(hh);
    unsigned bits = byte_at(s, 0);
    if (bits != 8) throw Unidentified{};  // "cannot handle N-bit layers"
    unsigned layers = byte_at(s, 5);
    if (layers == 1) h.mode = "L";
    else if (layers == 3) h.mode = "RGB";
    else if (layers == 4) h.mode = "CMYK";
    else throw Unidentified{};
    if (!icc.empty()) {
        std::sort(icc.begin(), icc.end());
        byte_at(icc[0], 13);
        icc.clear();
    }
    // the components, 3 bytes each: a last one cut short is an IndexError (t[1] or t[2])
    if (s.size() > 6 && (s.size() - 6) % 3 != 0) throw Unidentified{};
}

void dqt(const std::string& seg) {
    std::string s = seg;
    while (!s.empty()) {
        unsigned v = static_cast<unsigned char>(s[0]);
        std::size_t len = 1 + (v / 16 == 0 ? 1 : 2) * 64;
        if (s.size() < len) throw Unidentified{};  // "bad quantization table marker"
        s.erase(0, len);
    }
}

bool known_marker(unsigned i) { return i >= 0xFFC0 && i <= 0xFFFE; }  // JpegImagePlugin.MARKER

Header parse_header(const std::string& data) {
    Reader r(data);
    Header h;
    std::vector<std::string> icc;
    std::string s = r.read(3);
    s = "\xff";
    while (!s.empty()) {
        unsigned i = static_cast<unsigned char>(s[0]);
        if (i == 0xFF) {
            s += r.read(1);
            if (s.size() < 2) break;
            i = i16(s);
        } else {
            s = r.read(1);
            continue;
        }
        if (known_marker(i)) {
            if ((i >= 0xFFC0 && i <= 0xFFCF && i != 0xFFC4 && i != 0xFFC8 && i != 0xFFCC) || i == 0xFFDE) {
                sof(h, segment(r), icc);
            } else if (i == 0xFFC4 || i == 0xFFCC || (i >= 0xFFDA && i <= 0xFFDF && i != 0xFFDB && i != 0xFFDE)) {
                segment(r);  // Skip
            } else if (i == 0xFFDB) {
                dqt(segment(r));
            } else if (i >= 0xFFE0 && i <= 0xFFEF) {
                std::string seg = segment(r);
                if (i == 0xFFE2 && starts(seg, "ICC_PROFILE\0", 12)) icc.push_back(seg);
                app(h, i, seg);
            } else if (i == 0xFFFE) {
                segment(r);  // COM
            }  // JPG, RSTn, SOI, EOI, JPGn: no handler
            if (i == 0xFFDA) {
                h.has_sos = true;
                break;
            }
            s = r.read(1);
        } else if (i == 0xFFFF) {
            s = "\xff";
        } else if (i == 0xFF00) {
            s = r.read(1);
        } else {
            throw Unidentified{};  // "no marker found"
        }
    }
    if (h.mode.empty() || h.width <= 0 || h.height <= 0) throw Unidentified{};  // "not identified by this driver"
    return h;
}

// -- ImageFile.load + JpegDecode.c --------------------------------------------------------------

struct Source {
    jpeg_source_mgr pub;
    long skip = 0;
};

struct ErrorMgr {
    jpeg_error_mgr pub;
    std::jmp_buf jump;
};

void stub(j_decompress_ptr) {}
boolean fill_input_buffer(j_decompress_ptr) { return FALSE; }  // suspend: more data next call
void skip_input_data(j_decompress_ptr cinfo, long n) {
    Source* src = reinterpret_cast<Source*>(cinfo->src);
    if (n > static_cast<long>(src->pub.bytes_in_buffer)) {
        src->skip = n - static_cast<long>(src->pub.bytes_in_buffer);
        src->pub.next_input_byte += src->pub.bytes_in_buffer;
        src->pub.bytes_in_buffer = 0;
    } else {
        src->pub.bytes_in_buffer -= static_cast<std::size_t>(n);
        src->pub.next_input_byte += n;
        src->skip = 0;
    }
}
void error_exit(j_common_ptr cinfo) { std::longjmp(reinterpret_cast<ErrorMgr*>(cinfo->err)->jump, 1); }
void output_message(j_common_ptr) {}  // warnings are ignored, as in Pillow

// The libjpeg state of one decode; owns the decompress object (RAII).
class Decoder {
public:
    Decoder(PilImage& out) : out_(out) {
        cinfo_.err = jpeg_std_error(&err_.pub);
        err_.pub.error_exit = error_exit;
        err_.pub.output_message = output_message;
        jpeg_create_decompress(&cinfo_);
        src_.pub.init_source = stub;
        src_.pub.fill_input_buffer = fill_input_buffer;
        src_.pub.skip_input_data = skip_input_data;
        src_.pub.resync_to_restart = jpeg_resync_to_restart;
        src_.pub.term_source = stub;
        src_.pub.bytes_in_buffer = 0;
        src_.pub.next_input_byte = nullptr;
        cinfo_.src = &src_.pub;
    }
    ~Decoder() { jpeg_destroy_decompress(&cinfo_); }
    Decoder(const Decoder&) = delete;
    Decoder& operator=(const Decoder&) = delete;

    // ImagingJpegDecode: bytes consumed, or -1 when finished (broken: errcode set).
    long decode(const unsigned char* buf, std::size_t bytes, bool& broken) {
        broken = false;
        if (setjmp(err_.jump)) {
            broken = true;
            return -1;
        }
        src_.pub.next_input_byte = buf;
        src_.pub.bytes_in_buffer = bytes;
        if (src_.skip > 0) {
            skip_input_data(&cinfo_, src_.skip);
            if (src_.skip > 0) return static_cast<long>(src_.pub.next_input_byte - buf);
        }
        if (state_ == 0) {
            int ok;
            do {
                ok = jpeg_read_header(&cinfo_, FALSE);
            } while (ok == JPEG_HEADER_TABLES_ONLY);
            if (ok == JPEG_SUSPENDED) return static_cast<long>(src_.pub.next_input_byte - buf);
            if (out_.mode == "L") cinfo_.out_color_space = JCS_GRAYSCALE;
            else if (out_.mode == "RGB") cinfo_.out_color_space = JCS_RGB;
            else cinfo_.out_color_space = JCS_CMYK;
            state_ = 1;
        }
        if (state_ == 1) {
            if (!jpeg_start_decompress(&cinfo_)) return static_cast<long>(src_.pub.next_input_byte - buf);
            const int bands = out_.mode == "L" ? 1 : out_.mode == "RGB" ? 3 : 4;
            if (static_cast<int>(cinfo_.output_width) != out_.width || cinfo_.output_components != bands) {
                broken = true;  // another frame size than the header Pillow parsed
                return -1;
            }
            row_.assign(static_cast<std::size_t>(out_.width) * static_cast<std::size_t>(bands), 0);
            state_ = 2;
        }
        if (state_ == 2) {
            const std::size_t stride = row_.size();
            while (y_ < out_.height) {
                JSAMPROW rows[1] = {row_.data()};
                if (jpeg_read_scanlines(&cinfo_, rows, 1) != 1) break;
                std::uint8_t* dst = out_.px.data() + static_cast<std::size_t>(y_) * stride;
                if (out_.mode == "CMYK") {  // rawmode CMYK;I: Adobe's inverted CMYK
                    for (std::size_t i = 0; i < stride; ++i) dst[i] = static_cast<std::uint8_t>(~row_[i]);
                } else {
                    std::memcpy(dst, row_.data(), stride);
                }
                ++y_;
            }
            if (y_ < out_.height) return static_cast<long>(src_.pub.next_input_byte - buf);
            state_ = 3;
        }
        if (!jpeg_finish_decompress(&cinfo_) && y_ < out_.height)
            return static_cast<long>(src_.pub.next_input_byte - buf);
        return -1;
    }

private:
    PilImage& out_;
    jpeg_decompress_struct cinfo_{};
    ErrorMgr err_{};
    Source src_{};
    std::vector<JSAMPLE> row_;
    int state_ = 0;
    int y_ = 0;
};

}  // namespace

bool looks_like_jpeg(const std::string& d) { return d.size() >= 3 && starts(d, "\xFF\xD8\xFF", 3); }

PilImage decode_jpeg(const std::string& data, const SizeCheck& check) {
    Header h = parse_header(data);
    check(h.width, h.height);
    PilImage img;
    img.mode = h.mode;
    img.width = h.width;
    img.height = h.height;
    const int bands = h.mode == "L" ? 1 : h.mode == "RGB" ? 3 : 4;
    if (!h.has_sos) decode_error("cannot load this image");
    img.px.assign(static_cast<std::size_t>(h.width) * static_cast<std::size_t>(h.height) * bands, 0);
    {
        Decoder dec(img);
        std::string b;
        std::size_t pos = 0;  // the file is read from offset 0, MAXBLOCK at a time
        for (;;) {
            std::size_t n = std::min(kMaxBlock, data.size() - pos);
            if (n == 0) decode_error("image file is truncated (" + std::to_string(b.size()) + " bytes not processed)");
            b.append(data, pos, n);
            pos += n;
            bool broken = false;
            long used = dec.decode(reinterpret_cast<const unsigned char*>(b.data()), b.size(), broken);
            if (broken) decode_error("broken data stream when reading image file");
            if (used < 0) break;
            b.erase(0, static_cast<std::size_t>(used));
        }
    }
    // ImageOps.exif_transpose: getexif() was first called by _read_dpi_from_exif (when the JFIF
    // header gives no dpi), which swallows EXIF errors and leaves the EXIF empty.
    Orientation o;
    bool exif_failed = false;
    if (h.has_exif) {
        try {
            o = exif_orientation(h.exif);
        } catch (const ExifSyntaxError& e) {
            if (h.has_dpi) decode_error(e.what());
            exif_failed = true;
        }
    }
    if (o.present) {
        img.orientation = static_cast<int>(o.value);
    } else if (!exif_failed && !h.xmp.empty()) {
        int x = xmp_orientation(h.xmp);
        if (x >= 0) img.orientation = x;
    }
    return img;
}

}  // namespace qks::detail
