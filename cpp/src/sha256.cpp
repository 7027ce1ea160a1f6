#include "sha256.hpp"

#include <openssl/evp.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <memory>
#include <vector>

#include "qks/qks.hpp"
#include "text.hpp"

namespace qks::detail {
namespace {

struct CtxFree {
    void operator()(EVP_MD_CTX* c) const noexcept { EVP_MD_CTX_free(c); }
};
struct FileClose {
    void operator()(std::FILE* f) const noexcept { std::fclose(f); }
};
using Ctx = std::unique_ptr<EVP_MD_CTX, CtxFree>;

Ctx new_ctx() {
    Ctx ctx(EVP_MD_CTX_new());
    if (!ctx || EVP_DigestInit_ex(ctx.get(), EVP_sha256(), nullptr) != 1)
        throw Error(Status::internal, "OpenSSL: cannot start a SHA-256 digest");
    return ctx;
}

std::string finish(EVP_MD_CTX* ctx) {
    unsigned char md[EVP_MAX_MD_SIZE];
    unsigned int n = 0;
    if (EVP_DigestFinal_ex(ctx, md, &n) != 1) throw Error(Status::internal, "OpenSSL: SHA-256 failed");
    static const char* hex = "0123456789abcdef";
    std::string out;
    for (unsigned int i = 0; i < n; ++i) {
        out += hex[md[i] >> 4];
        out += hex[md[i] & 15];
    }
    return out;
}

}  // namespace

std::string sha256_file(const std::string& path) {
    std::unique_ptr<std::FILE, FileClose> f(std::fopen(path.c_str(), "rb"));
    if (!f) throw Error(Status::bundle, "cannot read " + path + " (" + std::strerror(errno) + ")");
    Ctx ctx = new_ctx();
    std::vector<unsigned char> buf(1 << 20);
    for (;;) {
        std::size_t n = std::fread(buf.data(), 1, buf.size(), f.get());
        if (n > 0 && EVP_DigestUpdate(ctx.get(), buf.data(), n) != 1)
            throw Error(Status::internal, "OpenSSL: SHA-256 failed");
        if (n < buf.size()) {
            if (std::ferror(f.get())) throw Error(Status::bundle, "cannot read " + path);
            break;
        }
    }
    return finish(ctx.get());
}

std::string sha256_bytes(const std::string& data) {
    Ctx ctx = new_ctx();
    if (EVP_DigestUpdate(ctx.get(), data.data(), data.size()) != 1)
        throw Error(Status::internal, "OpenSSL: SHA-256 failed");
    return finish(ctx.get());
}

}  // namespace qks::detail
