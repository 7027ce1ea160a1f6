#include "files.hpp"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <climits>
#include <cstdlib>
#include <memory>
#include <vector>

namespace qks::detail {

std::string py_path_str(const std::string& p) {
    if (p.empty()) return ".";
    const bool abs = p[0] == '/';
    std::vector<std::string> parts;
    std::size_t i = 0;
    while (i <= p.size()) {
        std::size_t j = p.find('/', i);
        if (j == std::string::npos) j = p.size();
        std::string part = p.substr(i, j - i);
        if (!part.empty() && part != ".") parts.push_back(part);
        i = j + 1;
    }
    std::string out = abs ? "/" : "";
    // POSIX keeps a leading "//" as is; pathlib does too
    if (abs && p.size() >= 2 && p[1] == '/' && (p.size() < 3 || p[2] != '/')) out = "//";
    for (std::size_t k = 0; k < parts.size(); ++k) out += (k ? "/" : "") + parts[k];
    return out.empty() ? "." : out;
}

std::string join_path(const std::string& a, const std::string& b) {
    if (!b.empty() && b[0] == '/') return b;
    if (a.empty()) return b;
    return a.back() == '/' ? a + b : a + "/" + b;
}

std::string base_name(const std::string& p) {
    std::size_t k = p.find_last_of('/');
    return k == std::string::npos ? p : p.substr(k + 1);
}

std::string resolve_path(const std::string& p) {
    std::string abs = p;
    if (abs.empty() || abs[0] != '/') {
        std::unique_ptr<char, decltype(&std::free)> cwd(getcwd(nullptr, 0), &std::free);
        abs = join_path(cwd ? cwd.get() : "/", p);
    }
    // realpath of the longest existing prefix, then the rest appended lexically ("..": one up)
    std::string head = abs, tail;
    for (;;) {
        std::unique_ptr<char, decltype(&std::free)> r(realpath(head.c_str(), nullptr), &std::free);
        if (r) {
            std::string out = r.get();
            std::size_t i = 0;
            while (i < tail.size()) {
                std::size_t j = tail.find('/', i);
                if (j == std::string::npos) j = tail.size();
                std::string part = tail.substr(i, j - i);
                if (part == "..") {
                    std::size_t k = out.find_last_of('/');
                    out = k == 0 || k == std::string::npos ? "/" : out.substr(0, k);
                } else if (!part.empty() && part != ".") {
                    out = join_path(out, part);
                }
                i = j + 1;
            }
            return out;
        }
        std::size_t k = head.find_last_of('/');
        if (k == std::string::npos || head == "/") return py_path_str(abs);
        tail = head.substr(k + 1) + (tail.empty() ? "" : "/" + tail);
        head = k == 0 ? "/" : head.substr(0, k);
    }
}

bool is_dir(const std::string& p) {
    struct stat st;
    return ::stat(p.c_str(), &st) == 0 && S_ISDIR(st.st_mode);
}

bool is_file(const std::string& p) {
    struct stat st;
    return ::stat(p.c_str(), &st) == 0 && S_ISREG(st.st_mode);
}

std::int64_t file_size(const std::string& p) {
    struct stat st;
    return ::stat(p.c_str(), &st) == 0 ? static_cast<std::int64_t>(st.st_size) : -1;
}

namespace {
struct Fd {
    int fd = -1;
    explicit Fd(int f) : fd(f) {}
    ~Fd() {
        if (fd >= 0) ::close(fd);
    }
    Fd(const Fd&) = delete;
    Fd& operator=(const Fd&) = delete;
};
}  // namespace

bool read_file(const std::string& p, std::string& out) {
    Fd f(::open(p.c_str(), O_RDONLY | O_CLOEXEC));
    if (f.fd < 0) return false;
    struct stat st;
    if (::fstat(f.fd, &st) != 0) return false;
    if (S_ISDIR(st.st_mode)) {
        errno = EISDIR;
        return false;
    }
    out.clear();
    if (S_ISREG(st.st_mode) && st.st_size > 0) out.reserve(static_cast<std::size_t>(st.st_size));
    char buf[1 << 16];
    for (;;) {
        ssize_t n = ::read(f.fd, buf, sizeof buf);
        if (n < 0) {
            if (errno == EINTR) continue;
            return false;
        }
        if (n == 0) break;
        out.append(buf, static_cast<std::size_t>(n));
    }
    return true;
}

}  // namespace qks::detail
