// The bundle checker (bundle.cpp: Bundle::load, then the bank and label paths qks-tag takes) on a
// bundle folder built from the input:
//
//     <manifest.json bytes>\n--file NAME\n<bytes of NAME>\n--file NAME2\n<bytes> ...
//
// NAME may have folders ("labels/default.npy"); names that would leave the folder are dropped.
// The sha256 check runs for inputs of even length (else only sizes), so that the fuzzer also gets
// past it. Every refusal must be a qks::Error with Status::bundle or Status::labels.
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string>

#include "bundle.hpp"
#include "harness.hpp"
#include "labels.hpp"
#include "qks/qks.hpp"

using qks::fuzz::require;

namespace {

bool safe_name(const std::string& n) {
    if (n.empty() || n[0] == '/' || n.find('\0') != std::string::npos || n.size() > 200) return false;
    for (std::size_t i = 0; i <= n.size();) {
        std::size_t j = n.find('/', i);
        if (j == std::string::npos) j = n.size();
        const std::string part = n.substr(i, j - i);
        if (part.empty() || part == "." || part == "..") return false;
        i = j + 1;
    }
    return true;
}

std::string build_bundle(const std::string& data) {
    static const std::string sep = "\n--file ";
    qks::fuzz::clear_scratch();
    std::size_t k = data.find(sep);
    qks::fuzz::write_scratch("b/manifest.json", data.substr(0, k));
    for (int files = 0; k != std::string::npos && files < 16; ++files) {
        const std::size_t name_at = k + sep.size(), eol = data.find('\n', name_at);
        if (eol == std::string::npos) break;
        const std::string name = data.substr(name_at, eol - name_at);
        k = data.find(sep, eol + 1);
        if (safe_name(name) && name != "manifest.json")
            qks::fuzz::write_scratch("b/" + name, data.substr(eol + 1, k == std::string::npos ? std::string::npos : k - eol - 1));
    }
    return qks::fuzz::scratch_dir() + "/b";
}

void expect(const qks::Error& e) {
    require(e.status() == qks::Status::bundle || e.status() == qks::Status::labels,
            "a bundle error with another status than bundle or labels");
    require(e.what()[0] != '\0', "an empty bundle error");
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* bytes, std::size_t size) {
    static const bool cache_set = ::setenv("QKS_CACHE_DIR", (qks::fuzz::scratch_dir() + "/b/cache").c_str(), 1) == 0;
    require(cache_set, "setenv");
    const std::string dir = build_bundle(std::string(reinterpret_cast<const char*>(bytes), size));
    qks::detail::Bundle b;
    try {
        b = qks::detail::Bundle::load(dir, size % 2 == 0);
    } catch (const qks::Error& e) {
        expect(e);
        return 0;
    }
    require(b.preprocess.size > 0, "a bundle with a non-positive image size");
    for (const auto& info : b.banks) {
        try {
            const qks::detail::LabelBankData d = b.load_bank(info.name);
            require(d.embeddings.size() == d.rows * d.cols && d.names.size() == d.rows, "a bank of inconsistent size");
            qks::detail::bank_for_labels(b, d.names, "labels.txt");
        } catch (const qks::Error& e) {
            expect(e);
        }
    }
    try {
        b.default_bank();
    } catch (const qks::Error& e) {
        expect(e);
    }
    return 0;
}
