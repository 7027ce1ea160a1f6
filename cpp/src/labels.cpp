#include "labels.hpp"

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <set>

#include "files.hpp"
#include "npy.hpp"
#include "qks/qks.hpp"
#include "sha256.hpp"
#include "text.hpp"

namespace qks::detail {
namespace {
[[noreturn]] void fail(const std::string& msg) { throw Error(Status::labels, msg); }
}  // namespace

LabelList read_label_file(const std::string& path) {
    const std::string shown = py_path_str(path);
    std::string data;
    if (!read_file(path, data)) {
        if (errno == ENOENT) fail("label file not found: " + shown);
        if (errno == EISDIR) fail("label file is a directory: " + shown);
        fail("cannot read label file " + shown + ": " + std::strerror(errno));
    }
    std::size_t bad = utf8_first_invalid(data);
    if (bad != std::string::npos) {
        std::size_t line = 1;
        for (std::size_t i = 0; i < bad; ++i) line += data[i] == '\n';
        char hex[8];
        std::snprintf(hex, sizeof hex, "0x%02x", static_cast<unsigned char>(data[bad]));
        fail(shown + ": not UTF-8 (byte " + hex + " on line " + std::to_string(line) + "); save it as UTF-8");
    }
    if (data.compare(0, 3, "\xEF\xBB\xBF") == 0) data.erase(0, 3);
    LabelList out;
    std::set<std::string> seen;
    for (const std::string& line : py_splitlines(data)) {
        std::string label = py_strip(line);
        if (label.empty()) continue;
        if (!seen.insert(label).second) {
            out.duplicates.push_back(label);
            continue;
        }
        out.names.push_back(label);
    }
    if (out.names.empty()) fail(shown + ": no labels (the file is empty or blank)");
    return out;
}

std::string bank_key(const Bundle& bundle, const std::vector<std::string>& names) {
    const GraphInfo* g = bundle.graph("label_encoder");
    if (!g) {
        std::vector<std::string> have;
        for (const auto& x : bundle.graphs) have.push_back(x.name);
        std::sort(have.begin(), have.end());
        std::string list;
        for (std::size_t i = 0; i < have.size(); ++i) list += (i ? ", " : "") + have[i];
        throw Error(Status::bundle, "bundle has no 'label_encoder' graph (it has: " + list + ")");
    }
    const std::string prompts = bundle.prompts_file();
    if (prompts.empty()) throw Error(Status::bundle, "bundle has no prompts file: it cannot encode new labels");
    std::string blob = g->sha256 + std::string(1, '\0') + bundle.file_sha256(prompts) + std::string(1, '\0');
    for (const auto& n : names) blob += n + std::string(1, '\0');
    return sha256_bytes(blob);
}

LabelBankData bank_for_labels(const Bundle& bundle, const std::vector<std::string>& names, const std::string& path) {
    const std::string key = bank_key(bundle, names);
    for (const auto& b : bundle.banks)
        if (b.key == key) {
            LabelBankData d = bundle.load_bank(b.name);
            if (d.names == names) return d;
        }
    std::vector<std::string> dirs = {join_path(join_path(bundle.root, "labels"), "cache")};
    const char* cache = std::getenv("QKS_CACHE_DIR");
    const char* xdg = std::getenv("XDG_CACHE_HOME");
    const char* home = std::getenv("HOME");
    std::string user = cache && *cache ? cache
                       : xdg && *xdg   ? join_path(xdg, "qks")
                                       : join_path(join_path(home && *home ? home : "/", ".cache"), "qks");
    dirs.push_back(join_path(user, "banks"));
    for (const auto& d : dirs) {
        const std::string npy = join_path(d, key + ".npy"), txt = join_path(d, key + ".txt");
        if (!is_file(npy) || !is_file(txt)) continue;
        try {  // a damaged cache entry is not trusted (qks-infer recomputes it)
            NpyArray arr = read_npy(npy, "cached label bank");
            if (read_names(txt) != names || arr.dtype != "float32" || arr.shape.size() != 2 || arr.shape[0] != names.size())
                continue;
            LabelBankData bank;
            bank.names = names;
            bank.embeddings = std::move(arr.data);
            bank.rows = arr.shape[0];
            bank.cols = arr.shape[1];
            bank.key = key;
            bank.source = "cache:" + npy;
            return bank;
        } catch (const Error&) {
            continue;
        }
    }
    fail("no label bank for the " + std::to_string(names.size()) + " labels of " + py_path_str(path) +
         " (qks-tag has no tokenizer to encode label text): run qks-labels --bundle " + py_path_str(bundle.root) +
         " --labels " + py_path_str(path) + " --name NAME, then pass --bank NAME");
}

}  // namespace qks::detail
