// SHA-256 of a file, hex, through OpenSSL's libcrypto (EVP, RAII-owned context).
#pragma once

#include <string>

namespace qks::detail {

// Lowercase hex digest of the file's bytes. Throws qks::Error(Status::bundle) if it cannot be read.
std::string sha256_file(const std::string& path);

// Lowercase hex digest of a byte string.
std::string sha256_bytes(const std::string& data);

}  // namespace qks::detail
