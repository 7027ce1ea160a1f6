// Label files (labels.cpp, read_label_file: --labels) and bank names files (bundle.cpp, read_names)
// of arbitrary bytes.
#include <cstddef>
#include <cstdint>
#include <set>
#include <string>

#include "bundle.hpp"
#include "harness.hpp"
#include "labels.hpp"
#include "qks/qks.hpp"
#include "text.hpp"

using qks::fuzz::require;

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* bytes, std::size_t size) {
    const std::string path = qks::fuzz::write_scratch("labels.txt", std::string(reinterpret_cast<const char*>(bytes), size));
    try {
        const qks::detail::LabelList l = qks::detail::read_label_file(path);
        require(!l.names.empty(), "a label list without labels");
        std::set<std::string> seen;
        for (const std::string& n : l.names) {
            require(!n.empty() && qks::detail::py_strip(n) == n, "a label that is empty or not stripped");
            require(qks::detail::utf8_first_invalid(n) == std::string::npos, "a label that is not UTF-8");
            require(qks::detail::py_splitlines(n).size() == 1, "a label with a line break in it");
            require(seen.insert(n).second, "a label listed twice");
        }
        for (const std::string& d : l.duplicates) require(seen.count(d) == 1, "a duplicate of no label");
    } catch (const qks::Error& e) {
        require(e.status() == qks::Status::labels, "a label-file error with another status than Status::labels");
    }
    try {
        for (const std::string& n : qks::detail::read_names(path)) {
            require(n.find('\n') == std::string::npos, "a bank name with a newline");
            require(qks::detail::utf8_first_invalid(n) == std::string::npos, "a bank name that is not UTF-8");
        }
    } catch (const qks::Error& e) {
        require(e.status() == qks::Status::bundle, "a names-file error with another status than Status::bundle");
    }
    return 0;
}
