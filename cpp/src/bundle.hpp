// The bundle as qks.runtime.bundle.Bundle.load reads it: manifest format and schema version,
// plain relative paths inside the bundle (symlinks too), every listed file's size and sha256,
// the sections the runtime needs, and label banks that are float32 [L, D] .npy files with as
// many names. Each refusal is one line naming the file, in the Python runtime's words.
#pragma once

#include <cstddef>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

namespace qks::detail {

struct PreprocessConfig {
    int size = 0;
    std::string resize_mode = "shortest";  // "shortest" | "squash"
    std::string interpolation = "bicubic"; // "bicubic" | "bilinear"
    float mean[3] = {0, 0, 0};
    float std[3] = {1, 1, 1};
};

struct GraphInfo {
    std::string name, file, path, precision, sha256;
};

struct BankInfo {
    std::string name, path, names_path, key;
    std::size_t rows = 0, cols = 0;
    std::vector<float> thresholds;  // per-label thresholds (qks-calibrate), [rows]; empty: none
};

struct LabelBankData {
    std::vector<std::string> names;
    std::vector<float> embeddings;  // [rows x cols], C order
    std::size_t rows = 0, cols = 0;
    std::string key, source;
    std::vector<float> thresholds;  // [rows] or empty, as BankInfo
};

class Bundle {
public:
    // Throws qks::Error(Status::bundle, message).
    static Bundle load(const std::string& dir, bool verify);

    std::string root;  // resolved absolute path
    nlohmann::ordered_json manifest;
    PreprocessConfig preprocess;
    std::vector<GraphInfo> graphs;
    std::vector<BankInfo> banks;
    long long embed_dim = -1;  // -1: not in the manifest
    // The image graphs' embedding output (manifest "embedding", listed by every image graph), as
    // Bundle.embedding_output: "" for a bundle exported before embeddings.
    std::string embedding_output;
    long long embedding_dim = -1;
    std::string scoring_mode = "max";
    int scoring_k = 1;

    const GraphInfo* graph(const std::string& name) const;
    const BankInfo* bank(const std::string& name) const;
    std::string default_bank() const;           // as Bundle.default_bank(): Error(Status::bundle) if none
    std::string file_sha256(const std::string& rel) const;  // from the manifest's files
    std::string prompts_file() const;           // "" if the bundle has none
    LabelBankData load_bank(const std::string& name) const;  // Error(Status::labels) if unknown

private:
    std::string resolve(const std::string& rel) const;  // refuses paths outside the bundle
    std::string listed(const std::string& rel, const std::string& what) const;
    void check_files(bool verify);
    void check_sections();
    void check_embedding();
    BankInfo check_bank(const std::string& name, const nlohmann::ordered_json& rec);
};

// A manifest path: relative, POSIX, inside the bundle; Error(Status::bundle) otherwise.
void check_relpath(const nlohmann::ordered_json& path);
// A bank's names file: UTF-8, one label a line, exactly as written.
std::vector<std::string> read_names(const std::string& path);
// Python's repr() of a JSON value, for messages.
std::string json_repr(const nlohmann::ordered_json& v);

}  // namespace qks::detail
