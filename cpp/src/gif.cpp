#include "gif.hpp"

#include <algorithm>
#include <cstring>

#include "qks/qks.hpp"

namespace qks::detail {
namespace {

constexpr std::size_t kMaxBlock = 65536;  // ImageFile.MAXBLOCK
constexpr int kGifBits = 12, kGifTable = 1 << kGifBits, kGifBuffer = 1 << kGifBits;

[[noreturn]] void decode_error(const std::string& why) { throw Error(Status::image, "cannot decode image: " + why); }

class Reader {
public:
    explicit Reader(const std::string& d) : d_(d) {}
    std::string read(std::size_t n) {
        n = std::min(n, d_.size() - pos_);
        std::string s = d_.substr(pos_, n);
        pos_ += n;
        return s;
    }
    // GifImageFile.data(): a sub-block, or "absent" for a zero length or the end of the file
    bool data(std::string& block) {
        std::string n = read(1);
        if (n.empty() || n[0] == 0) return false;
        block = read(static_cast<unsigned char>(n[0]));
        return true;
    }
    std::size_t pos() const { return pos_; }

private:
    const std::string& d_;
    std::size_t pos_ = 0;
};

unsigned le16(const std::string& s, std::size_t o) {  // struct.error -> not identified
    if (s.size() < o + 2) throw Unidentified{};
    return static_cast<unsigned char>(s[o]) | (static_cast<unsigned>(static_cast<unsigned char>(s[o + 1])) << 8);
}
unsigned at(const std::string& s, std::size_t o) {  // IndexError -> not identified
    if (o >= s.size()) throw Unidentified{};
    return static_cast<unsigned char>(s[o]);
}

// GifImageFile._is_palette_needed: not the grey ramp (0,0,0), (1,1,1), ... (chained ==, lazily)
bool palette_needed(const std::string& p) {
    for (std::size_t i = 0; i < p.size(); i += 3) {
        const unsigned v = static_cast<unsigned>(i / 3);
        if (v != at(p, i) || at(p, i) != at(p, i + 1) || at(p, i + 1) != at(p, i + 2)) return true;
    }
    return false;
}

// GifDecode.c: LZW codes in sub-blocks into the frame's rectangle of the image.
class LzwDecoder {
public:
    LzwDecoder(PilImage& im, int x0, int y0, int w, int h, int bits, bool interlace)
        : im_(im), xoff_(x0), yoff_(y0), xsize_(w), ysize_(h), bits_(bits), interlace_(interlace ? 1 : 0) {}

    // Bytes consumed, or -1 when done (errcode < 0 on failure).
    long decode(const unsigned char* buffer, long bytes, int& errcode) {
        errcode = 0;
        const unsigned char* ptr = buffer;
        if (!state_) {
            if (bits_ < 0 || bits_ > 12) {
                errcode = -8;
                return -1;
            }
            clear_ = 1 << bits_;
            end_ = clear_ + 1;
            if (interlace_) {
                interlace_ = 1;
                step_ = repeat_ = 8;
            } else {
                step_ = 1;
            }
            state_ = 1;
        }
        std::uint8_t* out = row(y_) + x_;
        for (;;) {
            if (state_ == 1) {
                next_ = clear_ + 2;
                codesize_ = bits_ + 1;
                codemask_ = (1 << codesize_) - 1;
                bufferindex_ = kGifBuffer;
                state_ = 2;
            }
            int i;
            const std::uint8_t* p;
            if (bufferindex_ < kGifBuffer) {
                i = kGifBuffer - bufferindex_;
                p = &buffer_[static_cast<std::size_t>(bufferindex_)];
                bufferindex_ = kGifBuffer;
            } else {
                while (bitcount_ < codesize_) {
                    if (blocksize_ > 0) {
                        const int c = *ptr++;
                        --bytes;
                        --blocksize_;
                        bitbuffer_ |= static_cast<std::uint32_t>(c) << bitcount_;
                        bitcount_ += 8;
                    } else {  // a new sub-block: only once it is all here
                        if (bytes < 1) return static_cast<long>(ptr - buffer);
                        const int c = *ptr;
                        if (bytes < c + 1) return static_cast<long>(ptr - buffer);
                        blocksize_ = c;
                        ++ptr;
                        --bytes;
                    }
                }
                int c = static_cast<int>(bitbuffer_ & static_cast<std::uint32_t>(codemask_));
                bitbuffer_ >>= codesize_;
                bitcount_ -= codesize_;
                if (c == clear_) {
                    if (state_ != 2) state_ = 1;
                    continue;
                }
                if (c == end_) break;
                i = 1;
                p = &lastdata_;
                if (state_ == 2) {
                    if (c > clear_) {
                        errcode = -2;
                        return -1;
                    }
                    lastdata_ = static_cast<std::uint8_t>(c);
                    lastcode_ = c;
                    state_ = 3;
                } else {
                    const int thiscode = c;
                    if (c > next_) {
                        errcode = -2;
                        return -1;
                    }
                    if (c == next_) {
                        if (bufferindex_ <= 0) {
                            errcode = -2;
                            return -1;
                        }
                        buffer_[static_cast<std::size_t>(--bufferindex_)] = lastdata_;
                        c = lastcode_;
                    }
                    while (c >= clear_) {
                        if (bufferindex_ <= 0 || c >= kGifTable) {
                            errcode = -2;
                            return -1;
                        }
                        buffer_[static_cast<std::size_t>(--bufferindex_)] = data_[static_cast<std::size_t>(c)];
                        c = link_[static_cast<std::size_t>(c)];
                    }
                    lastdata_ = static_cast<std::uint8_t>(c);
                    if (next_ < kGifTable) {
                        data_[static_cast<std::size_t>(next_)] = static_cast<std::uint8_t>(c);
                        link_[static_cast<std::size_t>(next_)] = lastcode_;
                        if (next_ == codemask_ && codesize_ < kGifBits) {
                            ++codesize_;
                            codemask_ = (1 << codesize_) - 1;
                        }
                        ++next_;
                    }
                    lastcode_ = thiscode;
                }
            }
            if (y_ >= ysize_) {
                errcode = -1;  // buffer overrun
                return -1;
            }
            for (int k = 0; k < i; ++k) {  // transparency is -1 for the first frame: every pixel written
                *out++ = p[k];
                if (++x_ >= xsize_) {
                    if (!newline(out)) return -1;
                }
            }
        }
        return static_cast<long>(ptr - buffer);
    }

private:
    std::uint8_t* row(int y) {
        return im_.px.data() + static_cast<std::size_t>(y + yoff_) * static_cast<std::size_t>(im_.width) + xoff_;
    }
    bool newline(std::uint8_t*& out) {  // NEWLINE(): false when the last row is done
        x_ = 0;
        y_ += step_;
        while (y_ >= ysize_) {
            switch (interlace_) {
                case 1: repeat_ = y_ = 4; interlace_ = 2; break;
                case 2: step_ = 4; repeat_ = y_ = 2; interlace_ = 3; break;
                case 3: step_ = 2; repeat_ = y_ = 1; interlace_ = 0; break;
                default: return false;
            }
        }
        if (y_ < ysize_) out = row(y_);
        return true;
    }

    PilImage& im_;
    int xoff_, yoff_, xsize_, ysize_, bits_, interlace_;
    int state_ = 0, x_ = 0, y_ = 0, step_ = 1, repeat_ = 0;
    int clear_ = 0, end_ = 0, next_ = 0, codesize_ = 0, codemask_ = 0, bufferindex_ = 0, lastcode_ = 0;
    int bitcount_ = 0, blocksize_ = 0;
    std::uint32_t bitbuffer_ = 0;
    std::uint8_t lastdata_ = 0;
    std::uint8_t buffer_[kGifBuffer] = {};
    std::uint8_t data_[kGifTable] = {};
    int link_[kGifTable] = {};
};

}  // namespace

bool looks_like_gif(const std::string& d) { return d.compare(0, 6, "GIF87a") == 0 || d.compare(0, 6, "GIF89a") == 0; }

PilImage decode_gif(const std::string& data, const SizeCheck& check) {
    // GifImageFile._open and _seek(0)
    Reader r(data);
    const std::string head = r.read(13);
    std::uint64_t width = le16(head, 6), height = le16(head, 8);
    const unsigned flags = at(head, 10);
    std::string global;
    bool have_global = false;
    if (flags & 128) {
        std::string p = r.read(std::size_t(3) << ((flags & 7) + 1));
        if (palette_needed(p)) {
            global = p;
            have_global = true;
        }
    }
    std::string s = r.read(1);
    // EOFError in _open ("no more images", "image not found"): ImageFile makes it a SyntaxError
    if (s.empty() || s == ";") throw Unidentified{};
    int transparency = -1;
    bool found = false, interlace = false, local_given = false, local_needed = false;
    std::string local;
    unsigned x0 = 0, y0 = 0, x1 = 0, y1 = 0;
    int bits = 0;
    std::size_t offset = 0;
    for (;;) {
        if (s.empty()) s = r.read(1);
        if (s.empty() || s == ";") break;
        if (s == "!") {
            s = r.read(1);
            std::string block;
            const bool has = r.data(block);
            const unsigned kind = at(s, 0);
            if (kind == 249 && has) {
                const unsigned f = at(block, 0);
                if (f & 1) transparency = static_cast<int>(at(block, 3));
                le16(block, 1);  // the duration: struct.error if short
            } else if (kind == 254) {
                bool more = has && !block.empty();
                while (more) more = r.data(block) && !block.empty();
                s.clear();
                continue;
            } else if (kind == 255 && has && block.compare(0, 11, "NETSCAPE2.0") == 0) {
                r.data(block);
            }
            std::string rest;
            while (r.data(rest)) {
            }
        } else if (s == ",") {
            s = r.read(9);
            x0 = le16(s, 0);
            y0 = le16(s, 2);
            x1 = x0 + le16(s, 4);
            y1 = y0 + le16(s, 6);
            if (x1 > width || y1 > height) {  // the frame is larger than the screen: the image grows
                width = std::max<std::uint64_t>(x1, width);
                height = std::max<std::uint64_t>(y1, height);
                if (width * height > 2 * std::uint64_t(89478485)) throw Error(Status::image, "image too large (decompression bomb limit)");
            }
            const unsigned f = at(s, 8);
            interlace = (f & 64) != 0;
            if (f & 128) {
                local_given = true;
                local = r.read(std::size_t(3) << ((f & 7) + 1));
                local_needed = palette_needed(local);
            }
            bits = static_cast<int>(at(r.read(1), 0));
            offset = r.pos();
            found = true;
            break;
        }
        s.clear();
    }
    if (!found) throw Unidentified{};
    if (width == 0 || height == 0) throw Unidentified{};
    check(width, height);
    PilImage im;
    const bool frame_palette = local_given ? local_needed : have_global;
    im.mode = frame_palette ? "P" : "L";
    im.width = static_cast<int>(width);
    im.height = static_cast<int>(height);
    if (frame_palette) {  // ImagePalette.raw("RGB", ...): entries past it are black
        const std::string& p = local_given ? local : global;
        im.palette.assign(768, 0);
        std::memcpy(im.palette.data(), p.data(), std::min<std::size_t>(p.size() / 3 * 3, 768));
    }
    // load_prepare: the canvas starts as the transparent index (or 0)
    im.px.assign(static_cast<std::size_t>(width) * static_cast<std::size_t>(height),
                 static_cast<std::uint8_t>(transparency >= 0 ? transparency : 0));
    if (x1 <= x0 || y1 <= y0) decode_error("tile cannot extend outside image");
    LzwDecoder dec(im, static_cast<int>(x0), static_cast<int>(y0), static_cast<int>(x1 - x0), static_cast<int>(y1 - y0), bits,
                   interlace);
    std::string b;
    std::size_t pos = offset;
    for (;;) {
        const std::size_t n = std::min(kMaxBlock, data.size() - pos);
        if (n == 0) decode_error("image file is truncated (" + std::to_string(b.size()) + " bytes not processed)");
        b.append(data, pos, n);
        pos += n;
        int err = 0;
        const long used = dec.decode(reinterpret_cast<const unsigned char*>(b.data()), static_cast<long>(b.size()), err);
        if (used < 0) {
            if (err == -2) decode_error("broken data stream when reading image file");
            if (err == -1) decode_error("buffer overrun when reading image file");
            if (err == -8) decode_error("codec configuration error when reading image file");
            break;
        }
        b.erase(0, static_cast<std::size_t>(used));
    }
    return im;
}

}  // namespace qks::detail
