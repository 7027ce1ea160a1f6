#include "bundle.hpp"

#include <algorithm>

#include "files.hpp"
#include "npy.hpp"
#include "qks/qks.hpp"
#include "sha256.hpp"
#include "text.hpp"

namespace qks::detail {
namespace {

using json = nlohmann::ordered_json;

[[noreturn]] void fail(const std::string& msg) { throw Error(Status::bundle, msg); }

std::string shape_str(const std::vector<std::size_t>& s) {
    std::string o = "[";
    for (std::size_t i = 0; i < s.size(); ++i) o += (i ? ", " : "") + std::to_string(s[i]);
    return o + "]";
}

// A bank's thresholds file (qks.runtime.thresholds.read_thresholds): its format, one number in [0, 1]
// per label, fitted for this bank's key; each refusal one line, in the Python runtime's words.
std::vector<float> read_thresholds(const std::string& path, const std::string& rel, const std::string& bank,
                                   std::size_t labels, const std::string& key) {
    const std::string what = "label bank " + py_repr(bank) + " thresholds (" + rel.substr(rel.rfind('/') + 1) + ")";
    std::string text;
    json doc;
    try {
        if (!read_file(path, text)) fail(what + ": not a readable JSON file (OSError)");
        doc = json::parse(text);
    } catch (const json::exception&) {
        fail(what + ": not a readable JSON file (JSONDecodeError)");
    }
    if (!doc.is_object() || doc.value("format", json()) != "qks-thresholds" || doc.value("version", json()) != 1)
        fail(what + ": not a qks-thresholds version 1 file");
    const json values = doc.value("thresholds", json());
    if (!values.is_array() || values.size() != labels)
        fail(what + ": needs " + std::to_string(labels) + " thresholds (one per label), has " +
             (values.is_array() ? std::to_string(values.size()) : "none"));
    std::vector<float> out;
    for (const auto& v : values) {
        if (!v.is_number() || !(v.get<double>() >= 0 && v.get<double>() <= 1))
            fail(what + ": every threshold must be a number in [0, 1]");
        out.push_back(static_cast<float>(v.get<double>()));  // written from float32: exact
    }
    const json fitted = doc.value("bank_key", json());
    if (!(fitted.is_string() ? fitted.get<std::string>() == key : fitted.is_null() && key.empty()))
        fail(what + ": fitted for another version of the bank (its labels or label encoder changed): rerun qks-calibrate");
    return out;
}

}  // namespace

std::string json_repr(const json& v) {
    if (v.is_null()) return "None";
    if (v.is_boolean()) return v.get<bool>() ? "True" : "False";
    if (v.is_number_integer() || v.is_number_unsigned()) return v.dump();
    if (v.is_number_float()) return py_float_repr(v.get<double>());
    if (v.is_string()) return py_repr(v.get<std::string>());
    if (v.is_array()) {
        std::string o = "[";
        bool first = true;
        for (const auto& e : v) {
            o += (first ? "" : ", ") + json_repr(e);
            first = false;
        }
        return o + "]";
    }
    std::string o = "{";
    bool first = true;
    for (auto it = v.begin(); it != v.end(); ++it) {
        o += (first ? "" : ", ") + py_repr(it.key()) + ": " + json_repr(it.value());
        first = false;
    }
    return o + "}";
}

void check_relpath(const json& path) {
    if (!path.is_string() || path.get<std::string>().empty())
        fail("manifest path " + json_repr(path) + " is not a file name");
    const std::string p = path.get<std::string>();
    bool bad = p.find('\\') != std::string::npos || p.find('\0') != std::string::npos || p[0] == '/' || p[0] == '~';
    std::size_t i = 0;
    while (!bad && i <= p.size()) {
        std::size_t j = p.find('/', i);
        if (j == std::string::npos) j = p.size();
        std::string part = p.substr(i, j - i);
        if (part.empty() || part == "." || part == "..") bad = true;
        i = j + 1;
    }
    if (bad) fail("manifest path " + py_repr(p) + " must be a plain relative path inside the bundle");
}

std::vector<std::string> read_names(const std::string& path) {
    std::string text;
    if (!read_file(path, text)) fail(base_name(path) + ": cannot read the label names");
    if (utf8_first_invalid(text) != std::string::npos) fail(base_name(path) + ": label names are not UTF-8");
    if (text.compare(0, 3, "\xEF\xBB\xBF") == 0) text.erase(0, 3);
    std::vector<std::string> lines;
    std::size_t i = 0;
    for (;;) {
        std::size_t j = text.find('\n', i);
        if (j == std::string::npos) {
            lines.push_back(text.substr(i));
            break;
        }
        lines.push_back(text.substr(i, j - i));
        i = j + 1;
    }
    if (!lines.empty() && lines.back().empty()) lines.pop_back();
    for (auto& l : lines)
        if (!l.empty() && l.back() == '\r') l.pop_back();
    return lines;
}

std::string Bundle::resolve(const std::string& rel) const {
    check_relpath(json(rel));
    std::string full = resolve_path(join_path(root, rel));
    if (full != root && full.compare(0, root.size() + 1, root + "/") != 0)
        fail("manifest path " + py_repr(rel) + " points outside the bundle");
    return full;
}

std::string Bundle::listed(const std::string& rel, const std::string& what) const {
    std::string path = resolve(rel);
    if (!manifest["files"].contains(rel))
        fail(what + " file " + rel + " is not listed (with its sha256) in the manifest's files");
    return path;
}

Bundle Bundle::load(const std::string& dir, bool verify) {
    const std::string shown = py_path_str(dir);
    if (!is_dir(dir)) fail("bundle folder not found: " + shown);
    const std::string mpath = py_path_str(join_path(shown, "manifest.json"));
    if (!is_file(mpath)) fail(shown + ": not a qks bundle (no manifest.json)");
    std::string text;
    if (!read_file(mpath, text)) fail(mpath + ": cannot read the manifest");
    Bundle b;
    try {
        if (utf8_first_invalid(text) != std::string::npos) throw std::runtime_error("not UTF-8");
        b.manifest = json::parse(text);
    } catch (const std::exception& e) {
        std::string why = e.what();
        why = why.substr(0, why.find('\n'));
        fail(mpath + ": manifest is not valid JSON (" + why + ")");
    }
    const json& m = b.manifest;
    if (!m.is_object() || !m.contains("format") || m["format"] != "qks-bundle")
        fail(mpath + ": not a qks bundle manifest");
    json version = m.contains("schema_version") ? m["schema_version"] : json();
    if (!(version.is_number() && version == 1))
        fail(mpath + ": bundle schema version " + json_repr(version) +
             " is not supported (this qks reads version 1); re-export it with this qks");
    if (m.contains("files") && m["files"].is_object())
        for (auto it = m["files"].begin(); it != m["files"].end(); ++it) check_relpath(json(it.key()));
    b.root = resolve_path(dir);
    b.check_files(verify);
    b.check_sections();
    return b;
}

void Bundle::check_files(bool verify) {
    const json* files = manifest.contains("files") ? &manifest["files"] : nullptr;
    if (!files || !files->is_object() || files->empty()) fail(root + ": manifest lists no files");
    for (auto it = files->begin(); it != files->end(); ++it) {
        const std::string& rel = it.key();
        const json& rec = it.value();
        std::string path = resolve(rel);
        if (!is_file(path)) fail("bundle file missing: " + rel);
        if (!rec.is_object() || !rec.contains("sha256")) fail("manifest entry for " + rel + " has no sha256");
        if (rec.contains("bytes")) {
            long long size = file_size(path);
            const json& want = rec["bytes"];
            if (!(want.is_number() && want == size))
                fail("bundle file " + rel + " is " + std::to_string(size) + " bytes, manifest says " +
                     json_repr(want) + " (truncated or replaced)");
        }
        if (verify && !(rec["sha256"].is_string() && sha256_file(path) == rec["sha256"].get<std::string>()))
            fail("bundle file " + rel + " does not match its sha256 in the manifest (corrupt or modified)");
    }
}

// The optional "embedding" record: its output counts only when every image graph lists it (as the
// Python runtime decides), so the precision picked never decides whether embeddings work.
void Bundle::check_embedding() {
    const json& m = manifest;
    if (!m.contains("embedding") || !m["embedding"].is_object()) return;
    const json& rec = m["embedding"];
    if (!rec.contains("output") || !rec["output"].is_string()) return;
    const std::string name = rec["output"].get<std::string>();
    for (auto it = m["graphs"].begin(); it != m["graphs"].end(); ++it) {
        if (it.key().rfind("image_encoder", 0) != 0) continue;
        const json& outs = it.value().contains("outputs") ? it.value()["outputs"] : json();
        bool listed = outs.is_array() && std::any_of(outs.begin(), outs.end(), [&](const json& o) {
            return o.is_object() && o.contains("name") && o["name"] == name;
        });
        if (!listed) return;
    }
    embedding_output = name;
    if (rec.contains("dim") && rec["dim"].is_number_integer()) embedding_dim = rec["dim"].get<long long>();
}

void Bundle::check_sections() {
    const json& m = manifest;
    for (const char* key : {"model", "preprocess", "graphs"})
        if (!m.contains(key) || !m[key].is_object()) fail(std::string("manifest has no '") + key + "' section");
    const json& pp = m["preprocess"];
    const std::pair<const char*, json> fixed[] = {
        {"channels", "RGB"}, {"layout", "NCHW"}, {"crop", "center"}, {"value_range", json::array({0.0, 1.0})}};
    for (const auto& [key, supported] : fixed)
        if (pp.contains(key) && pp[key] != supported)
            fail(std::string("manifest preprocess ") + key + "=" + json_repr(pp[key]) +
                 " is not supported (this runtime does " + json_repr(supported) + ")");
    auto invalid = [](const std::string& why) { fail("manifest preprocess section is invalid (" + why + ")"); };
    for (const char* key : {"size", "mean", "std"})
        if (!pp.contains(key)) invalid(py_repr(key));
    if (!pp["size"].is_number()) invalid("size must be a number");
    preprocess.size = static_cast<int>(pp["size"].get<double>());
    if (pp.contains("resize_mode")) {
        if (!pp["resize_mode"].is_string()) invalid("resize_mode must be a string");
        preprocess.resize_mode = pp["resize_mode"].get<std::string>();
    }
    if (pp.contains("interpolation")) {
        if (!pp["interpolation"].is_string()) invalid("interpolation must be a string");
        preprocess.interpolation = pp["interpolation"].get<std::string>();
    }
    for (const char* key : {"mean", "std"}) {
        const json& v = pp[key];
        if (!v.is_array() || v.size() != 3 || !std::all_of(v.begin(), v.end(), [](const json& x) { return x.is_number(); }))
            invalid(std::string(key) + " must be 3 numbers");
        for (int c = 0; c < 3; ++c)
            (std::string(key) == "mean" ? preprocess.mean : preprocess.std)[c] = static_cast<float>(v[c].get<double>());
    }
    if (preprocess.resize_mode != "shortest" && preprocess.resize_mode != "squash")
        invalid("unsupported resize mode " + py_repr(preprocess.resize_mode) + " (shortest or squash)");
    if (preprocess.interpolation != "bicubic" && preprocess.interpolation != "bilinear")
        invalid("unsupported interpolation " + py_repr(preprocess.interpolation) + " (bicubic or bilinear)");
    if (preprocess.size <= 0) invalid("image size must be positive, got " + std::to_string(preprocess.size));

    for (auto it = m["graphs"].begin(); it != m["graphs"].end(); ++it) {
        const json& rec = it.value();
        if (!rec.is_object() || !rec.contains("file")) fail("graph " + py_repr(it.key()) + " has no file");
        if (!rec["file"].is_string()) check_relpath(rec["file"]);
        GraphInfo g;
        g.name = it.key();
        g.file = rec["file"].get<std::string>();
        g.path = listed(g.file, "graph " + py_repr(g.name));
        g.sha256 = file_sha256(g.file);
        g.precision = rec.contains("precision") && rec["precision"].is_string() ? rec["precision"].get<std::string>()
                                                                                : "fp32";
        graphs.push_back(g);
    }
    if (!graph("image_encoder") && !graph("image_encoder_fp16"))
        fail("bundle has no image encoder graph (image_encoder or image_encoder_fp16)");
    check_embedding();
    for (const char* section : {"tokenizer", "prompts"}) {
        if (!m.contains(section) || m[section].is_null()) continue;
        const json& rec = m[section];
        if (!rec.is_object() || !rec.contains("file")) fail(std::string("manifest ") + section + " section has no file");
        if (!rec["file"].is_string()) check_relpath(rec["file"]);
        listed(rec["file"].get<std::string>(), section);
    }
    if (m["model"].contains("embed_dim") && m["model"]["embed_dim"].is_number())
        embed_dim = static_cast<long long>(m["model"]["embed_dim"].get<double>());
    if (m.contains("label_banks") && m["label_banks"].is_object())
        for (auto it = m["label_banks"].begin(); it != m["label_banks"].end(); ++it)
            banks.push_back(check_bank(it.key(), it.value()));
    if (m.contains("engines") && m["engines"].is_array())
        for (const json& rec : m["engines"]) {
            if (!rec.is_object() || !rec.contains("file")) fail("an engines entry has no file");
            if (!rec["file"].is_string()) check_relpath(rec["file"]);
            listed(rec["file"].get<std::string>(), "TensorRT plan");
            if (rec.contains("sidecar") && rec["sidecar"].is_string() && !rec["sidecar"].get<std::string>().empty())
                listed(rec["sidecar"].get<std::string>(), "TensorRT plan sidecar");
        }
    if (m.contains("scoring") && m["scoring"].is_object()) {
        const json& s = m["scoring"];
        if (s.contains("mode") && s["mode"].is_string()) scoring_mode = s["mode"].get<std::string>();
        if (s.contains("k") && s["k"].is_number()) scoring_k = static_cast<int>(s["k"].get<double>());
        if (scoring_mode != "max" && scoring_mode != "topk")
            fail("manifest scoring mode " + py_repr(scoring_mode) + " is not supported (max or topk)");
    }
}

BankInfo Bundle::check_bank(const std::string& name, const json& rec) {
    const std::string what = "label bank " + py_repr(name);
    if (!rec.is_object() || !rec.contains("file") || !rec.contains("names_file"))
        fail(what + ": needs 'file' and 'names_file'");
    for (const char* k : {"file", "names_file"})
        if (!rec[k].is_string()) check_relpath(rec[k]);
    BankInfo b;
    b.name = name;
    b.path = listed(rec["file"].get<std::string>(), what);
    b.names_path = listed(rec["names_file"].get<std::string>(), what + " names");
    NpyArray arr = read_npy(b.path, what);
    if (arr.shape.size() != 2 || arr.dtype != "float32")
        fail(what + " must be float32 [L, D], is " + arr.dtype + " " + shape_str(arr.shape));
    if (rec.contains("shape")) {
        const json& want = rec["shape"];
        json have = json::array({arr.shape[0], arr.shape[1]});
        if (want != have) fail(what + " is " + shape_str(arr.shape) + ", manifest says " + json_repr(want));
    }
    if (embed_dim >= 0 && static_cast<long long>(arr.shape[1]) != embed_dim)
        fail(what + " has dimension " + std::to_string(arr.shape[1]) + ", the model's is " + std::to_string(embed_dim));
    std::vector<std::string> names = read_names(b.names_path);
    if (names.size() != arr.shape[0])
        fail(what + " has " + std::to_string(arr.shape[0]) + " vectors but " + std::to_string(names.size()) + " names");
    b.rows = arr.shape[0];
    b.cols = arr.shape[1];
    b.key = rec.contains("key") && rec["key"].is_string() ? rec["key"].get<std::string>() : "";
    if (rec.contains("thresholds_file") && !rec["thresholds_file"].is_null()) {  // hashed like the bank
        if (!rec["thresholds_file"].is_string()) check_relpath(rec["thresholds_file"]);
        const std::string rel = rec["thresholds_file"].get<std::string>();
        b.thresholds = read_thresholds(listed(rel, what + " thresholds"), rel, name, b.rows, b.key);
    }
    return b;
}

const GraphInfo* Bundle::graph(const std::string& name) const {
    for (const auto& g : graphs)
        if (g.name == name) return &g;
    return nullptr;
}

const BankInfo* Bundle::bank(const std::string& name) const {
    for (const auto& b : banks)
        if (b.name == name) return &b;
    return nullptr;
}

std::string Bundle::default_bank() const {
    if (manifest.contains("default_bank") && manifest["default_bank"].is_string() &&
        !manifest["default_bank"].get<std::string>().empty()) {
        std::string name = manifest["default_bank"].get<std::string>();
        if (!bank(name)) fail("manifest default_bank " + py_repr(name) + " is not one of its label banks");
        return name;
    }
    if (bank("default")) return "default";
    if (banks.size() == 1) return banks[0].name;
    if (banks.empty())
        throw Error(Status::labels, "bundle has no label bank: encode your labels into one with qks-labels "
                                    "--bundle BUNDLE --labels labels.txt --name NAME, then pass --bank NAME");
    std::vector<std::string> names;
    for (const auto& b : banks) names.push_back(b.name);
    std::sort(names.begin(), names.end());
    std::string list;
    for (std::size_t i = 0; i < names.size(); ++i) list += (i ? ", " : "") + names[i];
    throw Error(Status::labels, "bundle has several label banks (" + list + "): pick one with --bank");
}

std::string Bundle::file_sha256(const std::string& rel) const {
    const json& rec = manifest["files"][rel];
    return rec.is_object() && rec.contains("sha256") && rec["sha256"].is_string() ? rec["sha256"].get<std::string>()
                                                                                    : "";
}

std::string Bundle::prompts_file() const {
    if (!manifest.contains("prompts") || !manifest["prompts"].is_object()) return "";
    const json& f = manifest["prompts"]["file"];
    return f.is_string() ? f.get<std::string>() : "";
}

LabelBankData Bundle::load_bank(const std::string& name) const {
    const BankInfo* info = bank(name);
    if (!info) {
        std::vector<std::string> names;
        for (const auto& b : banks) names.push_back(b.name);
        std::sort(names.begin(), names.end());
        std::string list;
        for (std::size_t i = 0; i < names.size(); ++i) list += (i ? ", " : "") + names[i];
        throw Error(Status::labels, "bundle has no label bank " + py_repr(name) + " (it has: " +
                                        (list.empty() ? "none" : list) + ")");
    }
    LabelBankData d;
    NpyArray arr = read_npy(info->path, "label bank " + py_repr(name));
    d.embeddings = std::move(arr.data);
    d.rows = info->rows;
    d.cols = info->cols;
    d.names = read_names(info->names_path);
    d.key = info->key;
    d.thresholds = info->thresholds;
    d.source = "bundle:" + name;
    return d;
}

}  // namespace qks::detail
