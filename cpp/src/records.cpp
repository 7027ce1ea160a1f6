// qks-infer's folder listing and records (qks.runtime.infer): find_images, display_name, the
// 7-significant-digit probabilities and the JSONL line.
#include "qks/records.hpp"

#include <dirent.h>
#include <sys/stat.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <set>
#include <utility>

#include "files.hpp"
#include "scoring.hpp"
#include "text.hpp"

namespace qks {
namespace {

bool image_extension(const std::string& name) {
    static const char* exts[] = {".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".bmp", ".gif", ".webp", ".tif",
                                 ".tiff", ".ppm", ".pgm", ".pbm", ".pnm", ".tga", ".ico", ".heic", ".heif", ".avif"};
    std::size_t dot = name.rfind('.');
    if (dot == std::string::npos || dot == 0 || dot == name.size() - 1) return false;  // pathlib's suffix
    std::string suffix = name.substr(dot);
    for (char& c : suffix)
        if (c >= 'A' && c <= 'Z') c = static_cast<char>(c - 'A' + 'a');
    for (const char* e : exts)
        if (suffix == e) return true;
    return false;
}

struct Walker {
    std::set<std::pair<dev_t, ino_t>> seen;
    std::vector<std::string> found;

    // os.walk(followlinks=True), top-down, folders in sorted order; a folder reached twice is skipped
    void walk(const std::string& dir, const std::string& rel) {
        struct stat st;
        if (::stat(dir.c_str(), &st) != 0) return;
        if (!seen.insert({st.st_dev, st.st_ino}).second) return;
        struct Closedir {
            void operator()(DIR* d) const noexcept { closedir(d); }
        };
        std::unique_ptr<DIR, Closedir> d(opendir(dir.c_str()));
        if (!d) return;
        std::vector<std::string> dirs, files;
        while (dirent* e = readdir(d.get())) {
            std::string name = e->d_name;
            if (name == "." || name == "..") continue;
            struct stat es;
            const std::string full = detail::join_path(dir, name);
            if (::stat(full.c_str(), &es) == 0 && S_ISDIR(es.st_mode)) {
                dirs.push_back(name);
            } else {
                files.push_back(name);
            }
        }
        d.reset();
        for (const std::string& name : files) {
            if (!image_extension(name)) continue;
            struct stat fs;
            const std::string full = detail::join_path(dir, name);
            if (::stat(full.c_str(), &fs) == 0 && !S_ISREG(fs.st_mode)) continue;  // FIFOs and devices
            found.push_back(rel.empty() ? name : rel + "/" + name);                // broken links are listed
        }
        std::sort(dirs.begin(), dirs.end(), [](const std::string& a, const std::string& b) {
            return detail::py_code_points(a) < detail::py_code_points(b);
        });
        for (const std::string& name : dirs) walk(detail::join_path(dir, name), rel.empty() ? name : rel + "/" + name);
    }
};

// A probability as json.dumps writes float(f"{p:.7g}"): NaN and Infinity by their JSON names.
std::string json_probability(float p) {
    if (std::isnan(p)) return "NaN";
    if (std::isinf(p)) return p > 0 ? "Infinity" : "-Infinity";
    return format_probability(p);
}

// A dict of name -> value as Python builds it: a repeated name keeps its first place, last value.
std::string json_object(const std::vector<std::pair<std::string, float>>& items) {
    std::vector<std::pair<std::string, float>> dict;
    for (const auto& item : items) {  // not a structured binding: clang (the fuzz build) cannot capture one
        auto it = std::find_if(dict.begin(), dict.end(), [&](const auto& e) { return e.first == item.first; });
        if (it == dict.end()) {
            dict.push_back(item);
        } else {
            it->second = item.second;
        }
    }
    std::string o = "{";
    for (std::size_t i = 0; i < dict.size(); ++i)
        o += (i ? ", " : "") + detail::json_quote(dict[i].first) + ": " + json_probability(dict[i].second);
    return o + "}";
}

}  // namespace

std::vector<std::string> find_images(const std::string& root) {
    if (!detail::is_dir(root)) throw Error(Status::invalid_argument, "image folder not found: " + detail::py_path_str(root));
    Walker w;
    w.walk(root, "");
    std::sort(w.found.begin(), w.found.end(), [](const std::string& a, const std::string& b) {
        return detail::py_code_points(a) < detail::py_code_points(b);
    });
    return w.found;
}

std::string display_name(const std::string& name) {
    std::string out;
    char buf[8];
    for (std::size_t i = 0; i < name.size();) {
        std::size_t n = detail::utf8_sequence(name, i);
        if (n == 0) {
            std::snprintf(buf, sizeof buf, "\\x%02x", static_cast<unsigned char>(name[i]));
            out += buf;
            ++i;
        } else {
            out.append(name, i, n);
            i += n;
        }
    }
    return out;
}

std::string format_probability(float p) {
    char buf[32];
    std::snprintf(buf, sizeof buf, "%.7g", static_cast<double>(p));
    return detail::py_float_repr(std::strtod(buf, nullptr));
}

std::string jsonl_record(const std::string& image, const Result& result, const std::vector<std::string>& labels,
                         const RecordOptions& options) {
    std::string o = "{\"image\": " + detail::json_quote(display_name(image));
    if (!result.ok()) return o + ", \"error\": " + detail::json_quote(display_name(result.error)) + "}";
    std::vector<std::pair<std::string, float>> items;
    if (options.all_scores) {
        for (std::size_t i = 0; i < labels.size() && i < result.probabilities.size(); ++i)
            items.emplace_back(labels[i], result.probabilities[i]);
        return o + ", \"scores\": " + json_object(items) + "}";
    }
    for (std::size_t i : detail::select_for(result.probabilities, options.top_k, options.threshold, options.thresholds))
        items.emplace_back(labels[i], result.probabilities[i]);
    return o + ", \"labels\": " + json_object(items) + "}";
}

}  // namespace qks
