#include "png.hpp"

#include <zlib.h>

#include <algorithm>
#include <cctype>
#include <cstdlib>
#include <cstring>
#include <memory>

#include "exif.hpp"
#include "qks/qks.hpp"
#include "text.hpp"

namespace qks::detail {
namespace {

constexpr std::size_t kMaxBlock = 65536;          // ImageFile.MAXBLOCK
constexpr std::size_t kMaxTextChunk = 1 << 20;    // PngImagePlugin.MAX_TEXT_CHUNK

[[noreturn]] void decode_error(const std::string& why) { throw Error(Status::image, "cannot decode image: " + why); }

struct PySyntaxError {  // SyntaxError: "not identified" in Image.open, an error record later
    std::string msg;
};
struct StructError {};  // struct.error

struct Stream {  // the file object and PngStream state
    const std::string& d;
    std::size_t pos = 0;
    std::string read(std::size_t n) {
        n = std::min(n, d.size() - pos);
        std::string s = d.substr(pos, n);
        pos += n;
        return s;
    }
    std::string safe_read(std::uint64_t n) {  // ImageFile._safe_read
        if (n > d.size() - pos) decode_error("Truncated File Read");
        return read(static_cast<std::size_t>(n));
    }
};

std::uint32_t be32(const std::string& s, std::size_t o = 0) {
    if (s.size() < o + 4) throw StructError{};
    return (std::uint32_t(static_cast<unsigned char>(s[o])) << 24) | (std::uint32_t(static_cast<unsigned char>(s[o + 1])) << 16) |
           (std::uint32_t(static_cast<unsigned char>(s[o + 2])) << 8) | static_cast<unsigned char>(s[o + 3]);
}

bool is_cid(const std::string& c) {
    if (c.size() < 4) return false;
    for (int i = 0; i < 4; ++i) {
        unsigned char ch = static_cast<unsigned char>(c[static_cast<std::size_t>(i)]);
        if (!(std::isalnum(ch) || ch == '_')) return false;
    }
    return true;
}

struct Chunk {
    std::string cid;
    std::size_t pos = 0;
    std::uint32_t length = 0;
};

Chunk read_chunk(Stream& st) {  // ChunkStream.read
    std::string s = st.read(8);
    Chunk c;
    c.cid = s.size() > 4 ? s.substr(4) : std::string();
    c.pos = st.pos;
    c.length = be32(s);
    if (!is_cid(c.cid)) throw PySyntaxError{"broken PNG file (chunk " + py_bytes_repr(c.cid) + ")"};
    return c;
}

// zlib.decompressobj().decompress(s, MAX_TEXT_CHUNK): false on zlib.error; "too large" ValueError.
bool text_inflate(const std::string& in, std::string& out) {
    z_stream z{};
    if (inflateInit(&z) != Z_OK) return false;
    std::unique_ptr<z_stream, int (*)(z_stream*)> guard(&z, inflateEnd);
    out.assign(kMaxTextChunk, '\0');
    z.next_in = reinterpret_cast<Bytef*>(const_cast<char*>(in.data()));
    z.avail_in = static_cast<uInt>(in.size());
    z.next_out = reinterpret_cast<Bytef*>(&out[0]);
    z.avail_out = static_cast<uInt>(out.size());
    int err = inflate(&z, Z_SYNC_FLUSH);
    if (err != Z_OK && err != Z_STREAM_END && err != Z_BUF_ERROR) return false;
    if (z.avail_out == 0 && err != Z_STREAM_END && z.avail_in > 0)
        throw std::invalid_argument("Decompressed data too large for PngImagePlugin.MAX_TEXT_CHUNK");
    out.resize(out.size() - z.avail_out);
    return true;
}

struct Mode {
    const char* mode;
    const char* rawmode;
    int bits;  // bits per pixel of the rawmode
};

bool png_mode(int depth, int color, Mode& m) {
    static const struct { int d, c; Mode m; } modes[] = {
        {1, 0, {"1", "1", 1}},          {2, 0, {"L", "L;2", 2}},           {4, 0, {"L", "L;4", 4}},
        {8, 0, {"L", "L", 8}},          {16, 0, {"I;16", "I;16B", 16}},   {8, 2, {"RGB", "RGB", 24}},
        {16, 2, {"RGB", "RGB;16B", 48}}, {1, 3, {"P", "P;1", 1}},          {2, 3, {"P", "P;2", 2}},
        {4, 3, {"P", "P;4", 4}},         {8, 3, {"P", "P", 8}},            {8, 4, {"LA", "LA", 16}},
        {16, 4, {"RGBA", "LA;16B", 32}}, {8, 6, {"RGBA", "RGBA", 32}},     {16, 6, {"RGBA", "RGBA;16B", 64}},
    };
    for (const auto& e : modes)
        if (e.d == depth && e.c == color) {
            m = e.m;
            return true;
        }
    return false;
}

int mode_bands(const std::string& mode) {
    if (mode == "LA" || mode == "I;16") return 2;
    if (mode == "RGB") return 3;
    if (mode == "RGBA") return 4;
    return 1;
}

// Unpack `n` pixels of `rawmode` from `in` into `out` (Pillow's Unpack.c for the PNG rawmodes).
void unpack(const std::string& raw, std::uint8_t* out, const std::uint8_t* in, int n) {
    if (raw == "1" || raw == "P;1" || raw == "L;2" || raw == "P;2" || raw == "L;4" || raw == "P;4") {
        const int bits = raw.back() == '1' ? 1 : raw.back() == '2' ? 2 : 4;
        const int per = 8 / bits, mask = (1 << bits) - 1;
        for (int i = 0; i < n; ++i) {
            int v = (in[i / per] >> (8 - bits * (i % per + 1))) & mask;
            if (raw == "1") v = v ? 255 : 0;
            else if (raw == "L;2") v *= 0x55;
            else if (raw == "L;4") v *= 0x11;
            out[i] = static_cast<std::uint8_t>(v);
        }
    } else if (raw == "L" || raw == "P") {
        std::memcpy(out, in, static_cast<std::size_t>(n));
    } else if (raw == "I;16B") {
        for (int i = 0; i < n; ++i) {
            std::uint16_t v = static_cast<std::uint16_t>((in[2 * i] << 8) | in[2 * i + 1]);
            std::memcpy(out + 2 * i, &v, 2);
        }
    } else if (raw == "RGB") {
        std::memcpy(out, in, static_cast<std::size_t>(n) * 3);
    } else if (raw == "RGB;16B") {
        for (int i = 0; i < n; ++i)
            for (int c = 0; c < 3; ++c) out[3 * i + c] = in[6 * i + 2 * c];
    } else if (raw == "LA") {
        std::memcpy(out, in, static_cast<std::size_t>(n) * 2);
    } else if (raw == "LA;16B") {
        for (int i = 0; i < n; ++i) {
            out[4 * i] = out[4 * i + 1] = out[4 * i + 2] = in[4 * i];
            out[4 * i + 3] = in[4 * i + 2];
        }
    } else if (raw == "RGBA") {
        std::memcpy(out, in, static_cast<std::size_t>(n) * 4);
    } else {  // RGBA;16B
        for (int i = 0; i < n; ++i)
            for (int c = 0; c < 4; ++c) out[4 * i + c] = in[8 * i + 2 * c];
    }
}

// ZipDecode.c for PNG: inflate into rows, undo the filters, Adam7, unpack.
class ZipDecoder {
public:
    ZipDecoder(PilImage& im, const Mode& m, bool interlaced) : im_(im), raw_(m.rawmode), bits_(m.bits), interlaced_(interlaced) {
        bytes_ = (static_cast<std::size_t>(im.width) * static_cast<std::size_t>(bits_) + 7) / 8;
        buffer_.assign(bytes_ + 1, 0);
        previous_.assign(bytes_ + 1, 0);
        pixel_bytes_ = static_cast<std::size_t>(mode_bands(im.mode));
        if (inflateInit(&z_) != Z_OK) throw std::bad_alloc();
        live_ = true;
        if (interlaced_) y_ = kStartRow[0];
    }
    ~ZipDecoder() {
        if (live_) inflateEnd(&z_);
    }
    ZipDecoder(const ZipDecoder&) = delete;
    ZipDecoder& operator=(const ZipDecoder&) = delete;

    // Bytes consumed (all of them), or -1 when finished; errcode < 0 on failure.
    long decode(const std::string& buf, int& errcode) {
        errcode = 0;
        std::size_t row_len = interlaced_ ? pass_row_len(pass_) : bytes_;
        z_.next_in = reinterpret_cast<Bytef*>(const_cast<char*>(buf.data()));
        z_.avail_in = static_cast<uInt>(buf.size());
        while (z_.avail_in > 0) {
            z_.next_out = buffer_.data() + last_output_;
            z_.avail_out = static_cast<uInt>(row_len + 1 - last_output_);
            int err = inflate(&z_, Z_NO_FLUSH);
            if (err < 0) {
                errcode = err == Z_DATA_ERROR ? -2 : err == Z_MEM_ERROR ? -9 : -8;
                return -1;
            }
            std::size_t n = row_len + 1 - z_.avail_out;
            if (n < row_len + 1) {
                last_output_ = n;
                break;
            }
            if (!unfilter(row_len)) {
                errcode = -3;
                return -1;
            }
            if (interlaced_) {
                int col = kStartCol[pass_];
                const std::uint8_t* row = buffer_.data() + 1;
                std::uint8_t* dst = im_.px.data() + static_cast<std::size_t>(y_) * static_cast<std::size_t>(im_.width) * pixel_bytes_;
                if (bits_ >= 8) {
                    const std::size_t step = static_cast<std::size_t>((bits_ + 7) / 8);
                    for (std::size_t i = 0; i < row_len; i += step) {
                        unpack(raw_, dst + static_cast<std::size_t>(col) * pixel_bytes_, row + i, 1);
                        col += kColInc[pass_];
                    }
                } else {
                    const int row_bits = ((im_.width + kOffset[pass_]) / kColInc[pass_]) * bits_;
                    for (int i = 0; i < row_bits; i += bits_) {
                        std::uint8_t byte = static_cast<std::uint8_t>(row[i / 8] << (i % 8));
                        unpack(raw_, dst + static_cast<std::size_t>(col) * pixel_bytes_, &byte, 1);
                        col += kColInc[pass_];
                    }
                }
                y_ += kRowInc[pass_];
                while (y_ >= im_.height || row_len == 0) {
                    ++pass_;
                    if (pass_ == 7) {
                        y_ = im_.height;
                        break;
                    }
                    y_ = kStartRow[pass_];
                    row_len = pass_row_len(pass_);
                    std::fill(buffer_.begin(), buffer_.end(), 0);
                }
            } else {
                unpack(raw_, im_.px.data() + static_cast<std::size_t>(y_) * static_cast<std::size_t>(im_.width) * pixel_bytes_,
                       buffer_.data() + 1, im_.width);
                ++y_;
            }
            last_output_ = 0;
            if (y_ >= im_.height || err == Z_STREAM_END) return -1;
            buffer_.swap(previous_);
        }
        return static_cast<long>(buf.size());
    }

private:
    static constexpr int kOffset[7] = {7, 3, 3, 1, 1, 0, 0};
    static constexpr int kStartCol[7] = {0, 4, 0, 2, 0, 1, 0};
    static constexpr int kStartRow[7] = {0, 0, 4, 0, 2, 0, 1};
    static constexpr int kColInc[7] = {8, 8, 4, 4, 2, 2, 1};
    static constexpr int kRowInc[7] = {8, 8, 8, 4, 4, 2, 2};

    std::size_t pass_row_len(int pass) const {
        const std::size_t n = static_cast<std::size_t>((im_.width + kOffset[pass]) / kColInc[pass]);
        return (n * static_cast<std::size_t>(bits_) + 7) / 8;
    }

    bool unfilter(std::size_t row_len) {
        std::uint8_t* b = buffer_.data();
        const std::uint8_t* p = previous_.data();
        const std::size_t bpp = static_cast<std::size_t>((bits_ + 7) / 8);
        switch (b[0]) {
            case 0: break;
            case 1:
                for (std::size_t i = bpp + 1; i <= row_len; ++i) b[i] = static_cast<std::uint8_t>(b[i] + b[i - bpp]);
                break;
            case 2:
                for (std::size_t i = 1; i <= row_len; ++i) b[i] = static_cast<std::uint8_t>(b[i] + p[i]);
                break;
            case 3: {
                std::size_t i = 1;
                for (; i <= bpp; ++i) b[i] = static_cast<std::uint8_t>(b[i] + p[i] / 2);
                for (; i <= row_len; ++i) b[i] = static_cast<std::uint8_t>(b[i] + (b[i - bpp] + p[i]) / 2);
                break;
            }
            case 4: {
                std::size_t i = 1;
                for (; i <= bpp; ++i) b[i] = static_cast<std::uint8_t>(b[i] + p[i]);
                for (; i <= row_len; ++i) {
                    int a = b[i - bpp], bb = p[i], c = p[i - bpp];
                    int pa = std::abs(bb - c), pb = std::abs(a - c), pc = std::abs(a + bb - 2 * c);
                    b[i] = static_cast<std::uint8_t>(b[i] + ((pa <= pb && pa <= pc) ? a : (pb <= pc) ? bb : c));
                }
                break;
            }
            default: return false;
        }
        return true;
    }

    PilImage& im_;
    std::string raw_;
    int bits_;
    bool interlaced_;
    std::size_t bytes_ = 0, pixel_bytes_ = 1, last_output_ = 0;
    std::vector<std::uint8_t> buffer_, previous_;
    z_stream z_{};
    bool live_ = false;
    int pass_ = 0, y_ = 0;
};

struct Info {  // what the chunks put in im.info that the runtime reads
    bool has_exif = false;
    std::string exif;       // info["exif"]: eXIf (with "Exif\0\0") or tEXt "exif"
    bool has_raw_exif = false;
    std::string raw_exif;   // info["Raw profile type exif"] (text)
    std::string xmp_text;   // info["XML:com.adobe.xmp"] (text), else
    std::string xmp;        // info["xmp"] (bytes of an iTXt)
};

struct State {
    explicit State(const std::string& data) : st{data} {}
    Stream st;
    Info info;
    Mode mode{"", "", 0};
    bool have_mode = false, interlaced = false, have_tile = false, have_fctl = false;
    std::int64_t n_frames = -1;  // acTL's frame count (im_n_frames), -1 for None
    bool default_image = false;  // an IDAT before any fcTL of an APNG: one more frame
    std::int64_t seq_num = -1;   // PngStream._seq_num: the last APNG sequence number, -1 for None
    std::uint64_t width = 0, height = 0;
    std::string palette;
    std::size_t tile_pos = 0;
    std::uint64_t first_idat = 0;
};

std::string latin1_to_utf8(const std::string& s) {
    std::string o;
    for (unsigned char c : s) {
        if (c < 0x80) {
            o += char(c);
        } else {
            o += char(0xC0 | (c >> 6));
            o += char(0x80 | (c & 0x3F));
        }
    }
    return o;
}

void text_entry(State& s, const std::string& key, const std::string& value_text, bool bytes_exif, const std::string& raw) {
    if (key == "exif" && bytes_exif) {
        s.info.has_exif = true;
        s.info.exif = raw;
    } else if (key == "Raw profile type exif") {
        s.info.has_raw_exif = true;
        s.info.raw_exif = value_text;
    } else if (key == "XML:com.adobe.xmp") {
        s.info.xmp_text = value_text;
    }
}

// PngStream.call: the chunk's handler. Returns the bytes read (for the CRC). Throws EOFError as
// `true` in `eof`, and Pillow's exceptions as PySyntaxError / StructError / Error / invalid_argument.
std::string call(State& s, const Chunk& c, bool& eof, bool& unknown) {
    eof = unknown = false;
    Stream& st = s.st;
    const std::string& id = c.cid;
    if (id == "IHDR") {
        std::string d = st.safe_read(c.length);
        if (c.length < 13) throw std::invalid_argument("Truncated IHDR chunk");
        s.width = be32(d, 0);
        s.height = be32(d, 4);
        Mode m{"", "", 0};  // an unknown depth/colour keeps the mode of an earlier IHDR (KeyError: pass)
        if (png_mode(static_cast<unsigned char>(d[8]), static_cast<unsigned char>(d[9]), m)) {
            s.mode = m;
            s.have_mode = true;
        }
        if (d[12]) s.interlaced = true;
        if (d[11]) throw PySyntaxError{"unknown filter category"};
        return d;
    }
    // chunk_IDAT reads im_rawmode, which only a known IHDR mode sets: without one, the AttributeError
    // makes Pillow skip the chunk as an unknown one (its data read, its CRC checked)
    if (id == "IDAT" && !s.have_mode) {
        unknown = true;
        return st.safe_read(c.length);
    }
    if (id == "IDAT" || id == "IEND") {
        if (id == "IDAT" && s.n_frames >= 0 && !s.have_fctl) s.default_image = true;
        if (id == "IDAT" && !s.have_tile) {
            s.have_tile = true;
            s.tile_pos = c.pos;
            s.first_idat = c.length;
        }
        eof = true;
        return "";
    }
    if (id == "fdAT") {
        if (c.length < 4) throw std::invalid_argument("APNG contains truncated fDAT chunk");
        const std::int64_t seq = be32(st.safe_read(4));
        if (s.seq_num < 0 || s.seq_num != seq - 1) throw PySyntaxError{"APNG contains frame sequence errors"};
        s.seq_num = seq;
        if (!s.have_mode) {  // chunk_IDAT's AttributeError, after the sequence number was read
            unknown = true;
            return st.safe_read(c.length);
        }
        if (!s.have_tile) {
            s.have_tile = true;
            s.tile_pos = c.pos + 4;
            s.first_idat = c.length - 4;
        }
        eof = true;
        return "";
    }
    auto need = [&](std::uint32_t n, const char* msg) {
        std::string d = st.safe_read(c.length);
        if (c.length < n) throw std::invalid_argument(msg);
        return d;
    };
    if (id == "PLTE") {
        std::string d = st.safe_read(c.length);
        if (s.have_mode && std::string(s.mode.mode) == "P") s.palette = d;
        return d;
    }
    if (id == "tRNS") {
        std::string d = st.safe_read(c.length);
        std::string m = s.have_mode ? s.mode.mode : "";
        if (m == "1" || m == "L" || m == "I;16" || m == "RGB")
            if (c.length < (m == "RGB" ? 6u : 2u)) throw std::invalid_argument("Truncated tRNS chunk");
        return d;
    }
    if (id == "gAMA") return need(4, "Truncated gAMA chunk");
    if (id == "cHRM") return need(32, "Truncated cHRM chunk");
    if (id == "sRGB") return need(1, "Truncated sRGB chunk");
    if (id == "pHYs") return need(9, "Truncated pHYs chunk");
    if (id == "acTL") {
        std::string d = need(8, "APNG contains truncated acTL chunk");
        const std::uint32_t n = be32(d, 0);
        if (s.n_frames >= 0) s.n_frames = -1;                      // a second acTL: not an APNG after all
        else if (n != 0 && n <= 0x80000000u) s.n_frames = n;
        return d;
    }
    if (id == "fcTL") {
        std::string d = need(26, "APNG contains truncated fcTL chunk");
        const std::int64_t seq = be32(d, 0);
        if ((s.seq_num < 0 && seq != 0) || (s.seq_num >= 0 && s.seq_num != seq - 1))
            throw PySyntaxError{"APNG contains frame sequence errors"};
        s.seq_num = seq;
        s.have_fctl = true;
        return d;
    }
    if (id == "tEXt") {
        std::string d = st.safe_read(c.length);
        std::size_t z = d.find('\0');
        std::string k = z == std::string::npos ? d : d.substr(0, z), v = z == std::string::npos ? "" : d.substr(z + 1);
        if (!k.empty()) text_entry(s, latin1_to_utf8(k), latin1_to_utf8(v), true, v);
        return d;
    }
    if (id == "zTXt") {
        std::string d = st.safe_read(c.length);
        std::size_t z = d.find('\0');
        std::string k = z == std::string::npos ? d : d.substr(0, z), v = z == std::string::npos ? "" : d.substr(z + 1);
        int method = v.empty() ? 0 : static_cast<unsigned char>(v[0]);
        if (method != 0) throw PySyntaxError{"Unknown compression method " + std::to_string(method) + " in zTXt chunk"};
        std::string text;
        if (!text_inflate(v.empty() ? std::string() : v.substr(1), text)) text.clear();
        if (!k.empty()) text_entry(s, latin1_to_utf8(k), latin1_to_utf8(text), false, text);
        return d;
    }
    if (id == "iTXt") {
        std::string d = st.safe_read(c.length);
        std::size_t z = d.find('\0');
        if (z == std::string::npos) return d;
        std::string k = d.substr(0, z), r = d.substr(z + 1);
        if (r.size() < 2) return d;
        int cf = static_cast<unsigned char>(r[0]), cm = static_cast<unsigned char>(r[1]);
        r = r.substr(2);
        std::size_t z1 = r.find('\0');
        if (z1 == std::string::npos) return d;
        std::size_t z2 = r.find('\0', z1 + 1);
        if (z2 == std::string::npos) return d;
        std::string v = r.substr(z2 + 1);
        if (cf != 0) {
            if (cm != 0) return d;
            std::string text;
            if (!text_inflate(v, text)) return d;
            v = text;
        }
        if (k == "XML:com.adobe.xmp") s.info.xmp = v;
        if (utf8_first_invalid(r.substr(0, z1)) != std::string::npos ||
            utf8_first_invalid(r.substr(z1 + 1, z2 - z1 - 1)) != std::string::npos || utf8_first_invalid(v) != std::string::npos)
            return d;
        text_entry(s, latin1_to_utf8(k), v, false, v);
        return d;
    }
    if (id == "eXIf") {
        std::string d = st.safe_read(c.length);
        s.info.has_exif = true;
        s.info.exif = std::string("Exif\0\0", 6) + d;
        return d;
    }
    if (id == "iCCP") {
        std::string d = st.safe_read(c.length);
        std::size_t z = d.find('\0');
        const std::size_t at = z == std::string::npos ? 0 : z + 1;  // s[i + 1], i = -1 when absent
        if (at >= d.size()) throw Unidentified{};  // IndexError
        if (d[at] != 0) throw PySyntaxError{"Unknown compression method " + std::to_string(static_cast<unsigned char>(d[at])) + " in iCCP chunk"};
        std::string icc;
        text_inflate(d.substr(at + 1), icc);
        return d;
    }
    unknown = true;
    return st.safe_read(c.length);
}

// bytes.fromhex of the hex lines of a "Raw profile type exif" text; ValueError as Python words it.
std::string from_hex(const std::string& text) {
    std::string joined;
    std::size_t line = 0, i = 0;
    while (i <= text.size()) {
        std::size_t j = text.find('\n', i);
        if (j == std::string::npos) j = text.size();
        if (line >= 3) joined += text.substr(i, j - i);
        ++line;
        i = j + 1;
    }
    std::string out;
    auto hex = [](char ch) {
        if (ch >= '0' && ch <= '9') return ch - '0';
        if (ch >= 'a' && ch <= 'f') return ch - 'a' + 10;
        if (ch >= 'A' && ch <= 'F') return ch - 'A' + 10;
        return -1;
    };
    auto is_ws = [](char ch) { return ch == ' ' || ch == '\t' || ch == '\n' || ch == '\r' || ch == '\v' || ch == '\f'; };
    for (std::size_t k = 0; k < joined.size();) {
        if (is_ws(joined[k])) {
            ++k;
            continue;
        }
        int hi = hex(joined[k]);
        if (hi < 0) throw std::invalid_argument("non-hexadecimal number found in fromhex() arg at position " + std::to_string(k));
        if (k + 1 >= joined.size() || hex(joined[k + 1]) < 0)
            throw std::invalid_argument("non-hexadecimal number found in fromhex() arg at position " + std::to_string(k + 1));
        out += char(hi * 16 + hex(joined[k + 1]));
        k += 2;
    }
    return out;
}

PilImage open_and_load(const std::string& data, const SizeCheck& check) {
    State s(data);
    s.st.pos = 8;
    // _open: chunks up to the first IDAT; SyntaxError / struct.error: not identified
    try {
        for (;;) {
            Chunk c = read_chunk(s.st);
            bool eof = false, unknown = false;
            std::string d = call(s, c, eof, unknown);
            if (eof) break;
            std::string crc = s.st.read(4);
            if (crc.size() < 4) throw PySyntaxError{"incomplete checksum"};
            uLong want = crc32(crc32(0L, reinterpret_cast<const Bytef*>(c.cid.data()), 4), reinterpret_cast<const Bytef*>(d.data()),
                               static_cast<uInt>(d.size()));
            if (want != be32(crc)) throw PySyntaxError{"bad header checksum"};
        }
    } catch (const PySyntaxError&) {
        throw Unidentified{};
    } catch (const StructError&) {
        throw Unidentified{};
    } catch (const std::invalid_argument& e) {
        decode_error(e.what());
    }
    if (!s.have_mode || s.width == 0 || s.height == 0) throw Unidentified{};
    // PngImageFile.is_animated, fixed at the end of _open: load_end stops at the next frame's fcTL
    const bool animated = (s.n_frames >= 0 ? s.n_frames : 1) + (s.default_image ? 1 : 0) > 1;
    check(s.width, s.height);
    PilImage im;
    im.mode = s.mode.mode;
    im.width = static_cast<int>(s.width);  // the size checks above keep both far below 2^31
    im.height = static_cast<int>(s.height);
    if (!s.have_tile) decode_error("cannot load this image");
    if (im.mode == "P") {  // Pillow's palette: the PLTE entries, black after them (and without PLTE)
        if (s.palette.size() / 3 > 256) decode_error("invalid palette size");
        im.palette.assign(768, 0);
        std::memcpy(im.palette.data(), s.palette.data(), s.palette.size() / 3 * 3);
    }
    im.px.assign(static_cast<std::size_t>(im.width) * static_cast<std::size_t>(im.height) * static_cast<std::size_t>(mode_bands(im.mode)), 0);

    // ImageFile.load through PngImageFile.load_read, then load_end
    s.st.pos = s.tile_pos;
    std::uint64_t idat = s.first_idat;
    bool pushed = false;
    Chunk pushed_chunk;
    std::string decoder_error;  // ImageFile.load raises it only after load_end
    try {
        ZipDecoder dec(im, s.mode, s.interlaced);
        for (;;) {
            std::string chunk_data;
            bool got = false;
            while (idat == 0) {
                s.st.read(4);  // CRC, not checked
                Chunk c = read_chunk(s.st);
                if (c.cid != "IDAT" && c.cid != "DDAT" && c.cid != "fdAT") {
                    pushed = true;
                    pushed_chunk = c;
                    got = true;
                    break;
                }
                if (c.cid == "fdAT") {  // load_read: chunk_fdAT checks its length and sequence number
                    bool eof = false, unknown = false;
                    call(s, c, eof, unknown);
                    idat = c.length - 4;
                } else {
                    idat = c.length;
                }
            }
            if (!got) {
                std::size_t n = static_cast<std::size_t>(std::min<std::uint64_t>(kMaxBlock, idat));
                idat -= n;
                chunk_data = s.st.read(n);
            }
            if (chunk_data.empty()) decode_error("image file is truncated (0 bytes not processed)");
            int err = 0;
            long used = dec.decode(chunk_data, err);
            if (used < 0) {  // a decoder error is raised after load_end, which may raise its own first
                if (err == -2) decoder_error = "broken data stream when reading image file";
                else if (err == -3) decoder_error = "unrecognized data stream contents when reading image file";
                else if (err == -9) decoder_error = "out of memory when reading image file";
                else if (err < 0) decoder_error = "codec configuration error when reading image file";
                break;
            }
        }
    } catch (const StructError&) {
        decode_error("image file is truncated");
    } catch (const PySyntaxError& e) {
        decode_error(e.msg);
    } catch (const std::invalid_argument& e) {  // "APNG contains truncated fDAT chunk"
        decode_error(e.what());
    }
    // load_end: the chunks after the image data (eXIf, text) still count
    if (idat != 0) s.st.read(static_cast<std::size_t>(std::min<std::uint64_t>(idat, data.size())));
    try {
        for (;;) {
            Chunk c;
            if (pushed) {
                c = pushed_chunk;
                s.st.pos = c.pos;
                pushed = false;
            } else {
                s.st.read(4);
                try {
                    c = read_chunk(s.st);
                } catch (const StructError&) {
                    break;
                } catch (const PySyntaxError&) {
                    break;
                }
            }
            if (c.cid == "IEND") break;
            if (c.cid == "fcTL" && animated) break;  // the next frame starts: the first one is loaded
            bool eof = false, unknown = false;
            call(s, c, eof, unknown);
            if (eof) s.st.safe_read(c.cid == "fdAT" ? c.length - 4 : c.length);
        }
    } catch (const PySyntaxError& e) {
        decode_error(e.msg);
    } catch (const std::invalid_argument& e) {
        decode_error(e.what());
    } catch (const StructError&) {
        decode_error("unpack requires a buffer of 4 bytes");
    } catch (const Unidentified&) {  // an IndexError, reported by decode_image's catch-all
        decode_error("IndexError: index out of range");
    }
    if (!decoder_error.empty()) decode_error(decoder_error);
    // ImageOps.exif_transpose -> PngImageFile.getexif
    std::string exif;
    bool has = false;
    if (s.info.has_exif) {
        exif = s.info.exif;
        has = true;
    } else if (s.info.has_raw_exif) {
        try {
            exif = from_hex(s.info.raw_exif);
        } catch (const std::invalid_argument& e) {
            decode_error(e.what());
        }
        has = true;
    }
    Orientation o;
    if (has) {
        try {
            o = exif_orientation(exif);
        } catch (const ExifSyntaxError& e) {
            decode_error(e.what());
        }
    }
    if (o.present) {
        im.orientation = static_cast<int>(o.value);
    } else {
        int x = xmp_orientation(!s.info.xmp_text.empty() ? s.info.xmp_text : s.info.xmp);
        if (x >= 0) im.orientation = x;
    }
    return im;
}

}  // namespace

bool looks_like_png(const std::string& d) { return d.size() >= 8 && d.compare(0, 8, "\x89PNG\r\n\x1a\n") == 0; }

PilImage decode_png(const std::string& data, const SizeCheck& check) { return open_and_load(data, check); }

}  // namespace qks::detail
