// Label lists (qks.runtime.labels.read_label_file) and the banks that exist for them: a bundle
// bank with the list's key, or one qks-infer cached (labels/cache/ in the bundle, then
// $QKS_CACHE_DIR, $XDG_CACHE_HOME/qks or ~/.cache/qks, under banks/). There is no C++ tokenizer:
// a list without a bank is an error that says to run qks-labels.
#pragma once

#include <string>
#include <vector>

#include "bundle.hpp"

namespace qks::detail {

struct LabelList {
    std::vector<std::string> names;
    std::vector<std::string> duplicates;  // kept once: the caller warns as qks-infer does
};

// Throws qks::Error(Status::labels).
LabelList read_label_file(const std::string& path);
// manifest.bank_key: sha256 of (label encoder sha256, prompts sha256, names), each + "\0".
std::string bank_key(const Bundle& bundle, const std::vector<std::string>& names);
// The bank for `names`, or Error(Status::labels) saying how to make one.
LabelBankData bank_for_labels(const Bundle& bundle, const std::vector<std::string>& names, const std::string& path);

}  // namespace qks::detail
