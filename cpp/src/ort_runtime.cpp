#include "ort_runtime.hpp"

#include <dirent.h>
#include <dlfcn.h>

#include <cstdio>
#include <cstdlib>
#include <memory>
#include <mutex>
#include <vector>

#include "files.hpp"
#include "qks/qks.hpp"

namespace qks::detail {
namespace {

[[noreturn]] void fail(const std::string& msg) { throw Error(Status::runtime, msg); }

// "1.32.0" -> {1, 32, 0}; used to pick the newest libonnxruntime.so.1.* in a folder
std::vector<int> version_of(const std::string& s) {
    std::vector<int> v;
    std::size_t i = 0;
    while (i < s.size()) {
        std::size_t j = i;
        while (j < s.size() && s[j] >= '0' && s[j] <= '9') ++j;
        if (j == i) break;
        v.push_back(std::atoi(s.substr(i, j - i).c_str()));
        if (j >= s.size() || s[j] != '.') break;
        i = j + 1;
    }
    return v;
}

std::string newest_in(const std::string& dir) {
    struct Closedir {
        void operator()(DIR* d) const noexcept { closedir(d); }
    };
    std::unique_ptr<DIR, Closedir> d(opendir(dir.c_str()));
    if (!d) return "";
    std::string best;
    std::vector<int> best_v;
    const std::string prefix = "libonnxruntime.so.";
    while (dirent* e = readdir(d.get())) {
        std::string name = e->d_name;
        if (name.compare(0, prefix.size(), prefix) != 0) continue;
        std::vector<int> v = version_of(name.substr(prefix.size()));
        if (best.empty() || v > best_v) {
            best = name;
            best_v = v;
        }
    }
    return best.empty() ? "" : join_path(dir, best);
}

std::string from_python() {  // the onnxruntime wheel that `python3 -c "import onnxruntime"` finds
    const char* py = std::getenv("QKS_PYTHON");
    std::string cmd = std::string(py && *py ? py : "python3") +
                      " -c \"import os, onnxruntime; print(os.path.join(os.path.dirname(onnxruntime.__file__), 'capi'))\""
                      " 2>/dev/null";
    struct Pclose {
        void operator()(std::FILE* f) const noexcept { pclose(f); }
    };
    std::unique_ptr<std::FILE, Pclose> p(popen(cmd.c_str(), "r"));
    if (!p) return "";
    char buf[4096];
    std::string out;
    while (std::fgets(buf, sizeof buf, p.get())) out += buf;
    while (!out.empty() && (out.back() == '\n' || out.back() == '\r')) out.pop_back();
    return out.empty() ? "" : newest_in(out);
}

struct Loaded {
    // The library stays loaded for the life of the process: ONNX Runtime keeps thread pools and
    // static state whose teardown after dlclose would run unmapped code.
    void* handle = nullptr;
    std::string library, version;
    std::unique_ptr<Ort::Env> env;
};

Loaded load(const std::string& requested) {
    std::vector<std::string> tried;
    std::string path = requested;
    if (path.empty()) {
        const char* env = std::getenv("QKS_ORT_LIBRARY");
        if (env && *env) path = env;
    }
    Loaded l;
    if (!path.empty()) {
        if (is_dir(path)) {
            std::string f = newest_in(path);
            if (f.empty()) fail("no libonnxruntime.so.1.* in " + path);
            path = f;
        }
        l.handle = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
        if (!l.handle) {
            const char* e = dlerror();
            fail("cannot load ONNX Runtime from " + path + " (" + (e ? e : "dlopen failed") + ")");
        }
    } else {
        std::string py = from_python();
        if (!py.empty()) {
            path = py;
            l.handle = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
        }
        for (const char* name : {"libonnxruntime.so.1", "libonnxruntime.so"}) {
            if (l.handle) break;
            path = name;
            l.handle = dlopen(name, RTLD_NOW | RTLD_LOCAL);
        }
        if (!l.handle)
            fail("cannot find ONNX Runtime: pass --ort-library PATH (or set QKS_ORT_LIBRARY) to a "
                 "libonnxruntime.so >= 1.21, e.g. onnxruntime/capi/libonnxruntime.so.1.* of the onnxruntime wheel");
    }
    using GetApiBase = const OrtApiBase* (*)();
    auto get = reinterpret_cast<GetApiBase>(dlsym(l.handle, "OrtGetApiBase"));
    if (!get) fail(path + " is not ONNX Runtime (no OrtGetApiBase)");
    const OrtApiBase* base = get();
    l.version = base->GetVersionString();
    std::vector<int> v = version_of(l.version);
    const OrtApi* api = base->GetApi(ORT_API_VERSION);
    if (v < std::vector<int>{1, 21} || !api)
        fail("ONNX Runtime " + l.version + " at " + path + " is too old: libqks needs >= 1.21 (API version " +
             std::to_string(ORT_API_VERSION) + ")");
    Ort::InitApi(api);
    l.library = path;
    try {
        l.env = std::make_unique<Ort::Env>(ORT_LOGGING_LEVEL_ERROR, "qks");
    } catch (const Ort::Exception& e) {
        fail(std::string("ONNX Runtime: cannot create its environment: ") + e.what());
    }
    return l;
}

}  // namespace

OrtRuntime& ort_runtime(const std::string& library) {
    static std::mutex mu;
    static Loaded* loaded = nullptr;  // never freed: see Loaded
    static std::unique_ptr<OrtRuntime> runtime;
    std::lock_guard<std::mutex> lock(mu);
    if (!loaded) {
        loaded = new Loaded(load(library));
        runtime.reset(new OrtRuntime{loaded->library, loaded->version, *loaded->env});
    }
    return *runtime;
}

}  // namespace qks::detail
