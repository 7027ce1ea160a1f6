#include "npy.hpp"

#include <cstdint>
#include <cstring>
#include <fstream>
#include <iterator>

#include "qks/qks.hpp"

namespace qks::detail {
namespace {

std::string base_name(const std::string& path) {
    std::size_t k = path.find_last_of('/');
    return k == std::string::npos ? path : path.substr(k + 1);
}

// The value of 'key' in the header dict literal, as written ("'<f4'", "False", "(5, 16)").
bool header_value(const std::string& h, const std::string& key, std::string& out) {
    std::size_t k = h.find("'" + key + "'");
    if (k == std::string::npos) return false;
    k = h.find(':', k);
    if (k == std::string::npos) return false;
    ++k;
    while (k < h.size() && h[k] == ' ') ++k;
    std::size_t e = k;
    if (k < h.size() && h[k] == '(') {
        e = h.find(')', k);
        if (e == std::string::npos) return false;
        ++e;
    } else if (k < h.size() && (h[k] == '\'' || h[k] == '"')) {
        e = h.find(h[k], k + 1);
        if (e == std::string::npos) return false;
        ++e;
    } else {
        while (e < h.size() && h[e] != ',' && h[e] != '}') ++e;
    }
    out = h.substr(k, e - k);
    while (!out.empty() && out.back() == ' ') out.pop_back();
    return true;
}

std::string dtype_name(const std::string& descr) {
    static const char* names[][2] = {{"<f4", "float32"}, {"<f8", "float64"}, {"<f2", "float16"},
                                     {"<i8", "int64"},   {"<i4", "int32"},   {"<i2", "int16"},
                                     {"|i1", "int8"},    {"|u1", "uint8"},   {"<u2", "uint16"},
                                     {"<u4", "uint32"},  {"<u8", "uint64"},  {"|b1", "bool"}};
    for (auto& n : names)
        if (descr == n[0]) return n[1];
    return descr;
}

}  // namespace

NpyArray read_npy(const std::string& path, const std::string& what) {
    const std::string name = base_name(path);
    auto invalid = [&](const std::string& why) {
        return Error(Status::bundle, what + ": " + name + " is not a valid .npy file (" + why + ")");
    };
    std::ifstream f(path, std::ios::binary);
    if (!f) throw Error(Status::bundle, what + ": cannot read " + name + " (" + std::strerror(errno) + ")");
    std::string bytes((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
    if (bytes.size() < 6 || bytes.compare(0, 6, "\x93NUMPY") != 0)
        throw Error(Status::bundle, what + ": " + name + " is not a valid .npy file (no NumPy header)");
    if (bytes.size() < 10) throw invalid("truncated header");
    const int major = static_cast<unsigned char>(bytes[6]);
    std::size_t hlen = 0, start = 0;
    if (major == 1) {
        hlen = static_cast<unsigned char>(bytes[8]) | (std::size_t(static_cast<unsigned char>(bytes[9])) << 8);
        start = 10;
    } else if (major == 2 || major == 3) {
        if (bytes.size() < 12) throw invalid("truncated header");
        for (int i = 0; i < 4; ++i) hlen |= std::size_t(static_cast<unsigned char>(bytes[8 + i])) << (8 * i);
        start = 12;
    } else {
        throw invalid("unsupported format version " + std::to_string(major));
    }
    if (bytes.size() < start + hlen) throw invalid("truncated header");
    const std::string header = bytes.substr(start, hlen);
    std::string descr, fortran, shape;
    if (!header_value(header, "descr", descr) || !header_value(header, "fortran_order", fortran) ||
        !header_value(header, "shape", shape))
        throw invalid("cannot parse the header");
    if (descr.size() >= 2 && (descr.front() == '\'' || descr.front() == '"')) descr = descr.substr(1, descr.size() - 2);
    if (descr.empty()) throw invalid("no dtype in the header");
    if (descr.find('O') != std::string::npos || descr.front() == '[' || descr.front() == '{')
        throw Error(Status::bundle, what + ": " + name + " needs pickle to load; refused (save a plain float32 array)");
    NpyArray arr;
    arr.dtype = dtype_name(descr);
    if (shape.size() < 2 || shape.front() != '(' || shape.back() != ')') throw invalid("bad shape");
    std::size_t count = 1;
    for (std::size_t i = 1; i + 1 < shape.size();) {
        while (i + 1 < shape.size() && (shape[i] == ' ' || shape[i] == ',')) ++i;
        if (i + 1 >= shape.size()) break;
        std::size_t j = i;
        while (j + 1 < shape.size() && shape[j] >= '0' && shape[j] <= '9') ++j;
        if (j == i) throw invalid("bad shape");
        if (j - i > 18) throw invalid("shape too large");  // std::stoull would throw out_of_range
        std::size_t d = std::stoull(shape.substr(i, j - i));
        arr.shape.push_back(d);
        if (d != 0 && count > (std::size_t(1) << 40) / d) throw invalid("shape too large");
        count *= d;
        i = j;
    }
    if (arr.dtype != "float32") return arr;
    const std::size_t data_start = start + hlen;
    if (bytes.size() - data_start < count * 4)
        throw invalid("cannot reshape array of size " + std::to_string((bytes.size() - data_start) / 4) +
                      " into the header's shape");
    arr.data.resize(count);
    if (count > 0)  // an empty array has no buffer to copy into (memcpy of a null pointer)
        std::memcpy(arr.data.data(), bytes.data() + data_start, count * 4);  // x86-64 and ARM64 are little-endian
    if (fortran == "True" && arr.shape.size() == 2) {
        const std::size_t rows = arr.shape[0], cols = arr.shape[1];
        std::vector<float> c(count);
        for (std::size_t r = 0; r < rows; ++r)
            for (std::size_t k = 0; k < cols; ++k) c[r * cols + k] = arr.data[k * rows + r];
        arr.data.swap(c);
    }
    return arr;
}

}  // namespace qks::detail
