// The record writer (records.cpp: jsonl_record, display_name, format_probability) with arbitrary
// bytes in file names and error texts. Input: 4 bytes of float32 probability, then NUL-separated
// fields: the image name, the error text (empty: a tagged image), the labels (UTF-8, as the label
// readers guarantee; others are replaced by their display form).
//
// Oracles: every line is valid UTF-8 and strict JSON (nlohmann::json parses it), the image name
// (and error) read back equal display_name of the bytes, a UTF-8 name reads back unchanged, and a
// finite probability reads back as the float of its 7-significant-digit text.
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "harness.hpp"
#include "qks/records.hpp"
#include "text.hpp"

using qks::fuzz::require;

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* bytes, std::size_t size) {
    if (size < 4) return -1;
    float p;
    std::memcpy(&p, bytes, 4);
    std::vector<std::string> fields(1);
    for (std::size_t i = 4; i < size; ++i) {
        if (bytes[i] == 0) fields.emplace_back();
        else fields.back() += static_cast<char>(bytes[i]);
    }
    fields.resize(std::max<std::size_t>(fields.size(), 2));
    const std::string image = fields[0];
    qks::Result result;
    result.error = fields[1];
    std::vector<std::string> labels;
    for (std::size_t i = 2; i < fields.size(); ++i) {
        labels.push_back(qks::display_name(fields[i]));
        result.probabilities.push_back(i % 2 ? p : 1.0f - p);
    }
    qks::RecordOptions opt;
    opt.all_scores = size % 3 == 0;
    opt.top_k = size % 3 == 1 ? 2 : 0;
    const std::string line = qks::jsonl_record(image, result, labels, opt);
    require(qks::detail::utf8_first_invalid(line) == std::string::npos, "a record that is not UTF-8");
    const std::string shown = qks::display_name(image);
    require(qks::detail::utf8_first_invalid(shown) == std::string::npos, "a display name that is not UTF-8");
    if (qks::detail::utf8_first_invalid(image) == std::string::npos) require(shown == image, "a UTF-8 name changed");
    const bool finite = std::isfinite(p);
    nlohmann::json rec;
    try {
        rec = nlohmann::json::parse(line);
    } catch (const nlohmann::json::exception&) {
        // NaN and Infinity: not strict JSON, but what Python's json.dumps writes for them
        require(!finite && result.ok() && !labels.empty() &&
                    (line.find("NaN") != std::string::npos || line.find("Infinity") != std::string::npos),
                "a record that is not JSON");
        return 0;
    }
    require(rec["image"] == shown, "the image name does not read back");
    if (!result.ok()) {
        require(rec["error"] == qks::display_name(result.error), "the error text does not read back");
        return 0;
    }
    auto seven = [](float v) {  // float(f"{v:.7g}")
        char buf[32];
        std::snprintf(buf, sizeof buf, "%.7g", static_cast<double>(v));
        return std::strtod(buf, nullptr);
    };
    const auto& scores = rec.contains("scores") ? rec["scores"] : rec["labels"];
    for (auto it = scores.begin(); it != scores.end(); ++it) {
        require(it.value().is_number(), "a score that is not a number");
        const double v = it.value().get<double>();
        require(v == seven(p) || v == seven(1.0f - p), "a probability that does not read back");
    }
    return 0;
}
