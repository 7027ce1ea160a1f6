#include "text.hpp"

#include <cmath>
#include <cstdio>
#include <cstdlib>

namespace qks::detail {

namespace {
bool cont(unsigned char c) { return (c & 0xC0) == 0x80; }

char32_t decode_at(const std::string& s, std::size_t i, std::size_t n) {
    auto b = [&](std::size_t k) { return static_cast<unsigned char>(s[i + k]); };
    switch (n) {
        case 1: return b(0);
        case 2: return (char32_t(b(0) & 0x1F) << 6) | (b(1) & 0x3F);
        case 3: return (char32_t(b(0) & 0x0F) << 12) | (char32_t(b(1) & 0x3F) << 6) | (b(2) & 0x3F);
        default:
            return (char32_t(b(0) & 0x07) << 18) | (char32_t(b(1) & 0x3F) << 12) | (char32_t(b(2) & 0x3F) << 6) |
                   (b(3) & 0x3F);
    }
}

bool py_isspace(char32_t c) {
    return (c >= 0x09 && c <= 0x0D) || (c >= 0x1C && c <= 0x20) || c == 0x85 || c == 0xA0 || c == 0x1680 ||
           (c >= 0x2000 && c <= 0x200A) || c == 0x2028 || c == 0x2029 || c == 0x202F || c == 0x205F ||
           c == 0x3000;
}

bool py_line_break(char32_t c) {
    return c == '\n' || c == '\r' || c == 0x0B || c == 0x0C || c == 0x1C || c == 0x1D || c == 0x1E || c == 0x85 ||
           c == 0x2028 || c == 0x2029;
}

// (code point, byte length) at i of valid UTF-8 text (invalid bytes count as one U+FFFD byte).
std::pair<char32_t, std::size_t> next_cp(const std::string& s, std::size_t i) {
    std::size_t n = utf8_sequence(s, i);
    if (n == 0) return {0xFFFD, 1};
    return {decode_at(s, i, n), n};
}
}  // namespace

std::size_t utf8_sequence(const std::string& s, std::size_t i) {
    const std::size_t left = s.size() - i;
    auto b = [&](std::size_t k) { return static_cast<unsigned char>(s[i + k]); };
    unsigned char c = b(0);
    if (c < 0x80) return 1;
    if (c >= 0xC2 && c <= 0xDF) return left >= 2 && cont(b(1)) ? 2 : 0;
    if (c >= 0xE0 && c <= 0xEF) {
        if (left < 3) return 0;
        unsigned char c1 = b(1);
        bool ok1 = c == 0xE0 ? (c1 >= 0xA0 && c1 <= 0xBF) : c == 0xED ? (c1 >= 0x80 && c1 <= 0x9F) : cont(c1);
        return ok1 && cont(b(2)) ? 3 : 0;
    }
    if (c >= 0xF0 && c <= 0xF4) {
        if (left < 4) return 0;
        unsigned char c1 = b(1);
        bool ok1 = c == 0xF0 ? (c1 >= 0x90 && c1 <= 0xBF) : c == 0xF4 ? (c1 >= 0x80 && c1 <= 0x8F) : cont(c1);
        return ok1 && cont(b(2)) && cont(b(3)) ? 4 : 0;
    }
    return 0;
}

std::size_t utf8_first_invalid(const std::string& s) {
    for (std::size_t i = 0; i < s.size();) {
        std::size_t n = utf8_sequence(s, i);
        if (n == 0) return i;
        i += n;
    }
    return std::string::npos;
}

std::u32string py_code_points(const std::string& s) {
    std::u32string out;
    for (std::size_t i = 0; i < s.size();) {
        std::size_t n = utf8_sequence(s, i);
        if (n == 0) {
            out += char32_t(0xDC00 + static_cast<unsigned char>(s[i]));
            ++i;
        } else {
            out += decode_at(s, i, n);
            i += n;
        }
    }
    return out;
}

std::string utf8_encode(char32_t c) {
    std::string o;
    if (c < 0x80) {
        o += char(c);
    } else if (c < 0x800) {
        o += char(0xC0 | (c >> 6));
        o += char(0x80 | (c & 0x3F));
    } else if (c < 0x10000) {
        o += char(0xE0 | (c >> 12));
        o += char(0x80 | ((c >> 6) & 0x3F));
        o += char(0x80 | (c & 0x3F));
    } else {
        o += char(0xF0 | (c >> 18));
        o += char(0x80 | ((c >> 12) & 0x3F));
        o += char(0x80 | ((c >> 6) & 0x3F));
        o += char(0x80 | (c & 0x3F));
    }
    return o;
}

namespace {
// The quote Python's repr() picks: ' unless the text has ' and no ".
char py_quote(const std::string& s) {
    return s.find('\'') != std::string::npos && s.find('"') == std::string::npos ? '"' : '\'';
}

// One byte below 0x80 (or any byte of a bytes object) as repr() writes it between quotes `q`.
void py_escape_byte(std::string& o, unsigned char c, char q, bool bytes) {
    char buf[8];
    if (c == '\\' || c == static_cast<unsigned char>(q)) {
        o += '\\';
        o += char(c);
    } else if (c == '\n') {
        o += "\\n";
    } else if (c == '\r') {
        o += "\\r";
    } else if (c == '\t') {
        o += "\\t";
    } else if (c < 0x20 || c == 0x7F || (bytes && c >= 0x80)) {
        std::snprintf(buf, sizeof buf, "\\x%02x", c);
        o += buf;
    } else {
        o += char(c);
    }
}
}  // namespace

std::string py_repr(const std::string& s) {
    const char q = py_quote(s);
    std::string o(1, q);
    char buf[8];
    for (std::size_t i = 0; i < s.size();) {
        std::size_t n = utf8_sequence(s, i);
        if (n == 0) {  // not produced by JSON; shown as Python shows a surrogate escape
            std::snprintf(buf, sizeof buf, "\\udc%02x", static_cast<unsigned char>(s[i]));
            o += buf;
            ++i;
            continue;
        }
        if (n == 1) {
            py_escape_byte(o, static_cast<unsigned char>(s[i]), q, false);
        } else if (decode_at(s, i, n) < 0xA0) {  // C1 controls are not printable in Python
            std::snprintf(buf, sizeof buf, "\\x%02x", unsigned(decode_at(s, i, n)));
            o += buf;
        } else {
            o.append(s, i, n);
        }
        i += n;
    }
    return o + q;
}

std::string py_bytes_repr(const std::string& b) {
    const char q = py_quote(b);
    std::string o = std::string("b") + q;
    for (unsigned char c : b) py_escape_byte(o, c, q, true);
    return o + q;
}

std::string py_float_repr(double v) {
    if (v != v) return "nan";
    if (v == 0) return std::signbit(v) ? "-0.0" : "0.0";
    if (v == HUGE_VAL) return "inf";
    if (v == -HUGE_VAL) return "-inf";
    char buf[40];
    int prec = 1;
    for (; prec <= 17; ++prec) {
        std::snprintf(buf, sizeof buf, "%.*e", prec - 1, v);
        if (std::strtod(buf, nullptr) == v) break;
    }
    std::string s(buf);
    std::string sign;
    if (s[0] == '-') {
        sign = "-";
        s.erase(0, 1);
    }
    std::size_t e = s.find('e');
    int exp10 = std::atoi(s.c_str() + e + 1);
    std::string digits;
    for (std::size_t i = 0; i < e; ++i)
        if (s[i] != '.') digits += s[i];
    while (digits.size() > 1 && digits.back() == '0') digits.pop_back();
    int decpt = exp10 + 1;  // value = 0.digits x 10^decpt
    std::string out;
    if (decpt > -4 && decpt <= 16) {
        if (decpt <= 0) {
            out = "0." + std::string(static_cast<std::size_t>(-decpt), '0') + digits;
        } else if (static_cast<std::size_t>(decpt) >= digits.size()) {
            out = digits + std::string(static_cast<std::size_t>(decpt) - digits.size(), '0') + ".0";
        } else {
            out = digits.substr(0, static_cast<std::size_t>(decpt)) + "." + digits.substr(static_cast<std::size_t>(decpt));
        }
    } else {
        out = digits.substr(0, 1);
        if (digits.size() > 1) out += "." + digits.substr(1);
        char eb[16];
        std::snprintf(eb, sizeof eb, "e%c%02d", exp10 < 0 ? '-' : '+', exp10 < 0 ? -exp10 : exp10);
        out += eb;
    }
    return sign + out;
}

std::string json_quote(const std::string& s) {
    std::string o = "\"";
    char buf[8];
    for (unsigned char c : s) {
        switch (c) {
            case '"': o += "\\\""; break;
            case '\\': o += "\\\\"; break;
            case '\n': o += "\\n"; break;
            case '\r': o += "\\r"; break;
            case '\t': o += "\\t"; break;
            case '\b': o += "\\b"; break;
            case '\f': o += "\\f"; break;
            default:
                if (c < 0x20) {
                    std::snprintf(buf, sizeof buf, "\\u%04x", c);
                    o += buf;
                } else {
                    o += char(c);
                }
        }
    }
    o += '"';
    return o;
}

std::vector<std::string> py_splitlines(const std::string& s) {
    std::vector<std::string> lines;
    std::size_t start = 0, i = 0;
    while (i < s.size()) {
        auto [cp, n] = next_cp(s, i);
        if (py_line_break(cp)) {
            lines.push_back(s.substr(start, i - start));
            i += n;
            if (cp == '\r' && i < s.size() && s[i] == '\n') ++i;
            start = i;
        } else {
            i += n;
        }
    }
    if (start < s.size()) lines.push_back(s.substr(start));
    return lines;
}

std::string py_strip(const std::string& s) {
    std::size_t b = 0, e = s.size();
    while (b < e) {
        auto [cp, n] = next_cp(s, b);
        if (!py_isspace(cp)) break;
        b += n;
    }
    while (e > b) {  // walk back to the start of the last code point
        std::size_t k = e - 1;
        while (k > b && cont(static_cast<unsigned char>(s[k]))) --k;
        auto [cp, n] = next_cp(s, k);
        if (!py_isspace(cp) || k + n != e) break;
        e = k;
    }
    return s.substr(b, e - b);
}

}  // namespace qks::detail
