// A small command-line parser with click's wording for usage errors (qks-infer is a click app),
// so qks-tag's one-line errors read like qks-infer's.
#pragma once

#include <cstdlib>
#include <map>
#include <string>
#include <vector>

namespace qks::cli {

struct UsageError {
    std::string message;
};

struct Spec {
    std::string name;  // "--top-k"
    std::string alias; // "-o" or ""
    bool flag = false; // takes no value
};

class Args {
public:
    Args(const std::vector<Spec>& specs, int argc, char** argv) {
        for (int i = 1; i < argc; ++i) {
            std::string a = argv[i];
            if (a == "--") {
                for (++i; i < argc; ++i) positional.push_back(argv[i]);
                break;
            }
            if (a.size() > 1 && a[0] == '-') {
                std::string value;
                bool has_value = false;
                std::size_t eq = a.find('=');
                if (a.compare(0, 2, "--") == 0 && eq != std::string::npos) {
                    value = a.substr(eq + 1);
                    a = a.substr(0, eq);
                    has_value = true;
                }
                const Spec* spec = nullptr;
                for (const auto& s : specs)
                    if (s.name == a || (!s.alias.empty() && s.alias == a)) spec = &s;
                if (!spec) throw UsageError{"No such option '" + a + "'."};
                if (spec->flag) {
                    if (has_value) throw UsageError{"Option '" + spec->name + "' does not take a value."};
                    values[spec->name] = "1";
                    continue;
                }
                if (!has_value) {
                    if (i + 1 >= argc) throw UsageError{"Option '" + a + "' requires an argument."};
                    value = argv[++i];
                }
                values[spec->name] = value;
            } else {
                positional.push_back(a);
            }
        }
    }

    bool has(const std::string& name) const { return values.count(name) > 0; }
    std::string get(const std::string& name, const std::string& fallback = "") const {
        auto it = values.find(name);
        return it == values.end() ? fallback : it->second;
    }
    // click.IntRange(min): "Invalid value for '--x': 0 is not in the range x>=1."
    int get_int(const std::string& name, int fallback, int min) const {
        if (!has(name)) return fallback;
        const std::string v = get(name);
        char* end = nullptr;
        long n = std::strtol(v.c_str(), &end, 10);
        if (v.empty() || *end != '\0' || n > 1000000000L || n < -1000000000L)
            throw UsageError{"Invalid value for '" + name + "': '" + v + "' is not a valid integer range."};
        if (n < min)
            throw UsageError{"Invalid value for '" + name + "': " + v + " is not in the range x>=" + std::to_string(min) + "."};
        return static_cast<int>(n);
    }

    std::vector<std::string> positional;

private:
    std::map<std::string, std::string> values;
};

}  // namespace qks::cli
