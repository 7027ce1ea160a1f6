// File-system helpers that behave like the pathlib calls the Python runtime makes.
#pragma once

#include <cstdint>
#include <string>

namespace qks::detail {

// str(pathlib.Path(p)): repeated and trailing slashes and "." parts dropped ("" -> ".").
std::string py_path_str(const std::string& p);
// pathlib.Path(p).resolve() (not strict): absolute, symlinks resolved as far as the path exists.
std::string resolve_path(const std::string& p);
std::string join_path(const std::string& a, const std::string& b);
std::string base_name(const std::string& p);

bool is_dir(const std::string& p);   // follows symlinks
bool is_file(const std::string& p);  // a regular file, following symlinks
// Size in bytes following symlinks, or -1.
std::int64_t file_size(const std::string& p);
// The whole file; false (errno set) if it cannot be read.
bool read_file(const std::string& p, std::string& out);

}  // namespace qks::detail
