// qks-tag --embeddings OUT.npy: the file pair qks.runtime.embeddings.save_embeddings writes, read by
// qks-similar and qks-dupes: OUT.npy (float32 [N, D], one L2-normalised row per tagged image) and
// OUT.json (the names in row order, the .npy's sha256, the bundle and its image graph's sha256).
// Both go to temp files beside them and are renamed into place, the .npy first, the index last.
#pragma once

#include <unistd.h>

#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "../src/sha256.hpp"
#include "qks/qks.hpp"
#include "qks/records.hpp"

namespace qks::tools {

// "OUT.npy", "OUT.json" or "OUT" -> {OUT.npy, OUT.json}
inline std::pair<std::string, std::string> embeddings_paths(const std::string& path) {
    std::string stem = path;
    for (const char* ext : {".npy", ".json", ".NPY", ".JSON"}) {
        const std::size_t n = std::strlen(ext);
        if (stem.size() > n && stem.compare(stem.size() - n, n, ext) == 0) {
            stem.resize(stem.size() - n);
            break;
        }
    }
    return {stem + ".npy", stem + ".json"};
}

inline std::string npy_bytes(const std::vector<float>& rows, std::size_t n, std::size_t dim) {
    static_assert(sizeof(float) == 4, "float32");
    const std::uint16_t one = 1;
    if (*reinterpret_cast<const std::uint8_t*>(&one) != 1) throw Error(Status::internal, "a big-endian host: .npy is written little-endian");
    std::string header = "{'descr': '<f4', 'fortran_order': False, 'shape': (" + std::to_string(n) + ", " + std::to_string(dim) + "), }";
    const std::size_t unpadded = 10 + header.size() + 1;  // magic, version, length, header, newline
    header += std::string((64 - unpadded % 64) % 64, ' ') + "\n";
    std::string out("\x93NUMPY\x01\x00", 8);
    out += static_cast<char>(header.size() & 0xff);
    out += static_cast<char>(header.size() >> 8);
    out += header;
    out.append(reinterpret_cast<const char*>(rows.data()), rows.size() * sizeof(float));
    return out;
}

inline void write_file(const std::string& path, const std::string& data) {
    std::FILE* f = std::fopen(path.c_str(), "wb");
    if (!f) throw Error(Status::io, "cannot write " + path + ": " + std::strerror(errno));
    const bool ok = std::fwrite(data.data(), 1, data.size(), f) == data.size();
    if (std::fclose(f) != 0 || !ok) throw Error(Status::io, "cannot write " + path + ": " + std::strerror(errno));
}

// Writes the pair; throws Error(Status::io) with one line.
inline void write_embeddings(const std::string& path, const std::vector<std::string>& names, const std::vector<float>& rows,
                             std::size_t dim, const Tagger::EmbeddingSource& source, const std::string& root) {
    const auto [npy, idx] = embeddings_paths(path);
    const std::string tmp_npy = npy + ".tmp-" + std::to_string(::getpid()), tmp_idx = idx + ".tmp-" + std::to_string(::getpid());
    try {
        const std::string bytes = npy_bytes(rows, names.size(), dim);
        write_file(tmp_npy, bytes);
        nlohmann::ordered_json index = {
            {"bundle", source.bundle}, {"bundle_sha256", source.bundle_sha256}, {"model", source.model},
            {"output", "embedding"}, {"root", root}, {"format", "qks-embeddings"}, {"version", 1},
            {"images", nlohmann::ordered_json::array()}, {"count", names.size()}, {"dim", dim},
            {"npy_sha256", detail::sha256_bytes(bytes)}, {"writer", "qks-tag"}};
        for (const std::string& n : names) index["images"].push_back(display_name(n));
        write_file(tmp_idx, index.dump() + "\n");
        if (std::rename(tmp_npy.c_str(), npy.c_str()) != 0 || std::rename(tmp_idx.c_str(), idx.c_str()) != 0)
            throw Error(Status::io, "cannot move the embeddings into " + npy + ": " + std::strerror(errno));
    } catch (...) {
        std::remove(tmp_npy.c_str());
        std::remove(tmp_idx.c_str());
        throw;
    }
}

}  // namespace qks::tools
