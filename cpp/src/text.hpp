// Text as the Python runtime writes it: UTF-8 checks, Python's repr() of strings and floats,
// JSON string escaping as json.dumps(ensure_ascii=False), Python's sort order for file names,
// str.splitlines/str.strip for label files.
#pragma once

#include <cstddef>
#include <string>
#include <vector>

namespace qks::detail {

// Length of the valid UTF-8 sequence starting at s[i] (Python's strict decoder), 0 if invalid.
std::size_t utf8_sequence(const std::string& s, std::size_t i);
// Index of the first byte that is not valid UTF-8, or npos.
std::size_t utf8_first_invalid(const std::string& s);

// Code points of `s`, each undecodable byte b as U+DC00+b (Python's surrogateescape): the order
// of these sequences is the order Python's sorted() gives the decoded names.
std::u32string py_code_points(const std::string& s);
std::string utf8_encode(char32_t c);

// Python's repr() of a str given as UTF-8, e.g. 'image_encoder.onnx'.
std::string py_repr(const std::string& s);
// Python's repr() of a bytes object, b'...'.
std::string py_bytes_repr(const std::string& b);
// Python's repr() of a float: the shortest string that reads back as `v` ("1.0", "1e-05").
std::string py_float_repr(double v);

// A JSON string literal as Python's json.dumps(s, ensure_ascii=False) writes it.
std::string json_quote(const std::string& utf8);

// Python's str.splitlines() and str.strip() on UTF-8 text.
std::vector<std::string> py_splitlines(const std::string& utf8);
std::string py_strip(const std::string& utf8);

}  // namespace qks::detail
