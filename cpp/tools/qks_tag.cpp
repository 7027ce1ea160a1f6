// qks-tag: tag every image under a folder with a qks bundle, writing qks-infer's JSONL records.
//
//     qks-tag photos/ --bundle bundle --top-k 5 --out tags.jsonl
//
// The same options, records and exit codes as `qks-infer` (0 all tagged, 1 some images became
// error records, 2 the run could not start, 130 interrupted), on the C++ library. Images are
// decoded in worker threads while ONNX Runtime runs the previous batch.
#include <signal.h>
#include <sys/stat.h>

#include <atomic>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <deque>
#include <future>
#include <iostream>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "../src/files.hpp"
#include "../src/labels.hpp"
#include "../src/text.hpp"
#include "../src/thread_pool.hpp"
#include "cli_args.hpp"
#include "embeddings_file.hpp"
#include "qks/qks.hpp"
#include "qks/records.hpp"

namespace {

const char* kProg = "qks-tag";
std::atomic<bool> g_interrupted{false};

void on_sigint(int) { g_interrupted.store(true); }

[[noreturn]] void fail(const std::string& msg, int code = 2) {
    std::fprintf(stderr, "%s: error: %s\n", kProg, msg.c_str());
    std::exit(code);
}

const char* kHelp =
    "Usage: qks-tag [OPTIONS] IMAGES\n"
    "\n"
    "  Tag every image under IMAGES (recursively) with label probabilities, as qks-infer does.\n"
    "\n"
    "Options:\n"
    "  --bundle PATH                   Bundle folder written by qks-export.  [default: ./bundle]\n"
    "  --bank TEXT                     Name of a label bank stored in the bundle (qks-labels --name).\n"
    "  --labels FILE                   Label file (UTF-8, one label a line) whose bank exists: stored by\n"
    "                                  qks-labels or cached by qks-infer. Default: the bundle's default bank.\n"
    "  --precision [auto|fp32|fp16|int8|bf16]\n"
    "                                  ONNX image graph; auto: int8 (if exported), else fp32.  [default: auto]\n"
    "  --batch-size INTEGER RANGE      [default: 16; x>=1]\n"
    "  --workers INTEGER RANGE         Decode threads (default: min(4, CPUs)).  [x>=1]\n"
    "  --threads INTEGER RANGE         ONNX Runtime intra-op threads (default: all cores).  [x>=1]\n"
    "  --top-k INTEGER RANGE           Keep the k most probable labels per image.  [x>=1]\n"
    "  --threshold FLOAT RANGE         Keep labels with probability >= this, for every label (default: the\n"
    "                                  bank's per-label thresholds from qks-calibrate if it has them, else\n"
    "                                  0.5 unless --top-k is given).  [0<=x<=1]\n"
    "  --all-scores                    Write every label's probability: {\"image\", \"scores\"}.\n"
    "  -o, --out FILE                  Output file (default: stdout).\n"
    "  --overwrite                     Replace an existing --out.\n"
    "  --embeddings FILE               Also write each image's L2-normalised embedding to this .npy (row\n"
    "                                  order in the .json beside it), for qks-similar and qks-dupes.\n"
    "  --no-progress                   Accepted for qks-infer compatibility (qks-tag draws no bar).\n"
    "  --no-verify                     Skip the sha256 check of the bundle's files.\n"
    "  --ort-library PATH              libonnxruntime.so to load (default: $QKS_ORT_LIBRARY, else the\n"
    "                                  onnxruntime Python package's).\n"
    "  --version                       Show the version and exit.\n"
    "  -h, --help                      Show this message and exit.\n";

struct File {
    std::FILE* f = nullptr;
    bool owned = false;
    ~File() {
        if (owned && f) std::fclose(f);
    }
};

struct Decoded {
    std::string name;
    qks::Pixels pixels;
    std::string error;
};

}  // namespace

struct Config {
    std::string images, bundle = "./bundle", out, embeddings;
    bool overwrite = false;
    int batch_size = 16, workers = 0;
    qks::Options options;
    qks::RecordOptions record;
};

Config parse(int argc, char** argv) {
    using qks::cli::Spec;
    using qks::cli::UsageError;
    const std::vector<Spec> specs = {
        {"--bundle", "", false},     {"--bank", "", false},       {"--labels", "", false},      {"--precision", "", false},
        {"--batch-size", "", false}, {"--workers", "", false},    {"--threads", "", false},     {"--top-k", "", false},
        {"--threshold", "", false},  {"--all-scores", "", true},  {"--out", "-o", false},       {"--overwrite", "", true},
        {"--no-progress", "", true}, {"--no-verify", "", true},   {"--ort-library", "", false}, {"--format", "", false},
        {"--version", "", true},     {"--help", "-h", true},     {"--embeddings", "", false},
    };
    qks::cli::Args args(specs, argc, argv);
    if (args.has("--help")) {
        std::fputs(kHelp, stdout);
        std::exit(0);
    }
    if (args.has("--version")) {
        std::printf("qks-tag %s\n", qks::version());
        std::exit(0);
    }
    Config c;
    if (args.positional.empty()) throw UsageError{"Missing argument 'IMAGES'."};
    if (args.positional.size() > 1) throw UsageError{"Got unexpected extra argument (" + args.positional[1] + ")"};
    c.images = args.positional[0];
    struct stat st;
    if (::stat(c.images.c_str(), &st) != 0)
        throw UsageError{"Invalid value for 'IMAGES': Directory '" + c.images + "' does not exist."};
    if (!S_ISDIR(st.st_mode)) throw UsageError{"Invalid value for 'IMAGES': Directory '" + c.images + "' is a file."};
    qks::Options& o = c.options;
    o.precision = args.get("--precision", "auto");
    if (o.precision != "auto" && o.precision != "fp32" && o.precision != "fp16" && o.precision != "int8" &&
        o.precision != "bf16")
        throw UsageError{"Invalid value for '--precision': '" + o.precision +
                         "' is not one of 'auto', 'fp32', 'fp16', 'int8', 'bf16'."};
    if (o.precision == "bf16")  // qks-infer's choices, so the usage errors match; bf16 is OpenVINO's
        fail("--precision bf16 runs on OpenVINO (qks-infer --backend openvino); qks-tag runs ONNX Runtime, "
             "which has no bf16 kernels for these graphs");
    if (args.has("--format") && args.get("--format") != "jsonl") {
        if (args.get("--format") == "csv") fail("qks-tag writes JSONL only (qks-infer --format csv writes CSV)");
        throw UsageError{"Invalid value for '--format': '" + args.get("--format") + "' is not 'jsonl'."};
    }
    c.batch_size = args.get_int("--batch-size", 16, 1);
    c.workers = args.get_int("--workers", 0, 1);
    o.threads = args.get_int("--threads", 0, 1);
    c.record.top_k = args.get_int("--top-k", 0, 1);
    if (args.has("--threshold")) {
        const std::string v = args.get("--threshold");
        char* end = nullptr;
        double t = std::strtod(v.c_str(), &end);
        if (v.empty() || *end != '\0' || std::isnan(t)) throw UsageError{"Invalid value for '--threshold': '" + v + "' is not a valid float range."};
        if (t < 0 || t > 1)
            throw UsageError{"Invalid value for '--threshold': " + qks::detail::py_float_repr(t) + " is not in the range 0<=x<=1."};
        c.record.threshold = t;
    }
    c.record.all_scores = args.has("--all-scores");
    c.bundle = args.get("--bundle", "./bundle");
    o.bank = args.get("--bank");
    o.labels_file = args.get("--labels");
    o.ort_library = args.get("--ort-library");
    o.verify = !args.has("--no-verify");
    c.out = args.get("--out");
    if (c.out == "-") c.out.clear();
    c.overwrite = args.has("--overwrite");
    c.embeddings = args.get("--embeddings");
    return c;
}

int run(const Config& c) {
    struct sigaction sa {};
    sa.sa_handler = on_sigint;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGINT, &sa, nullptr);
    if (!c.out.empty()) {
        struct stat st;
        if (::stat(c.out.c_str(), &st) == 0 && S_ISREG(st.st_mode) && st.st_size > 0 && !c.overwrite)
            fail(c.out + " exists: pass --overwrite to replace it");
    }
    std::unique_ptr<qks::Tagger> tagger;
    try {
        tagger = std::make_unique<qks::Tagger>(c.bundle, c.options);
    } catch (const qks::Error& e) {
        fail(e.what());
    }
    if (!c.embeddings.empty()) {
        try {
            tagger->require_embedding();
        } catch (const qks::Error& e) {
            fail(e.what());
        }
    }
    if (g_interrupted.load()) fail("interrupted", 130);
    std::fprintf(stderr, "%s: backend ort-cpu (%s%s, ONNX Runtime %s), labels %s (%zu)\n", kProg, tagger->graph().c_str(),
                 c.options.threads ? (", threads=" + std::to_string(c.options.threads)).c_str() : "",
                 tagger->ort_version().c_str(), tagger->bank_source().c_str(), tagger->labels().size());
    qks::RecordOptions record = c.record;  // the bank's per-label thresholds apply unless --threshold is given
    record.thresholds = tagger->thresholds();
    if (!record.thresholds.empty() && record.threshold < 0)
        std::fprintf(stderr, "%s: per-label thresholds of the bank (qks-calibrate); --threshold X overrides them\n", kProg);
    if (!c.options.labels_file.empty()) {  // qks-infer warns about repeated labels
        qks::detail::LabelList list;
        try {
            list = qks::detail::read_label_file(c.options.labels_file);  // read once already: cannot fail
        } catch (const qks::Error&) {
        }
        if (!list.duplicates.empty()) {
            std::string shown;
            for (std::size_t i = 0; i < list.duplicates.size() && i < 5; ++i)
                shown += (i ? ", " : "") + qks::detail::py_repr(list.duplicates[i]);
            std::fprintf(stderr, "%s: warning: %s: %zu duplicate label(s) kept once: %s%s\n", kProg,
                         qks::detail::py_path_str(c.options.labels_file).c_str(), list.duplicates.size(), shown.c_str(),
                         list.duplicates.size() > 5 ? " ..." : "");
        }
    }
    std::vector<std::string> names;
    try {
        names = qks::find_images(c.images);
    } catch (const qks::Error& e) {
        fail(e.what());
    }
    if (names.empty())
        std::fprintf(stderr, "%s: warning: no images under %s (extensions: .bmp, .gif, .ico, .jfif, .jpe, .jpeg, .jpg, "
                     ".pbm, .pgm, .png, .pnm, .ppm, .tga, .tif, .tiff, .webp)\n", kProg, qks::display_name(c.images).c_str());

    File out;
    if (c.out.empty()) {
        out.f = stdout;
    } else {
        out.f = std::fopen(c.out.c_str(), "w");
        out.owned = true;
        if (!out.f) fail("cannot write " + c.out + ": " + std::strerror(errno));
    }
    const int workers = c.workers ? c.workers : static_cast<int>(std::min<unsigned>(4, std::max(1u, std::thread::hardware_concurrency())));
    const std::size_t window = static_cast<std::size_t>(2 * c.batch_size + workers);
    const auto start = std::chrono::steady_clock::now();
    std::size_t written = 0, errors = 0, next = 0;
    const std::string root = c.images;
    bool interrupted = false;
    std::string fatal;  // reported once the decode threads have stopped
    std::vector<std::string> embedded;  // --embeddings: the names and rows of the tagged images
    std::vector<float> rows;
    {
        qks::detail::ThreadPool pool(workers);
        std::deque<std::future<Decoded>> pending;
        const qks::Tagger& t = *tagger;
        auto fill = [&] {
            while (pending.size() < window && next < names.size()) {
                const std::string name = names[next++];
                pending.push_back(pool.submit([&t, &root, name] {
                    Decoded d;
                    d.name = name;
                    try {
                        d.pixels = t.preprocess_file(root + "/" + name);
                    } catch (const qks::Error& e) {
                        d.error = e.status() == qks::Status::image ? e.what() : std::string("cannot decode image: ") + e.what();
                    } catch (const std::exception& e) {
                        d.error = std::string("cannot decode image: ") + e.what();
                    }
                    return d;
                }));
            }
        };
        fill();
        while (!pending.empty()) {
            if (g_interrupted.load()) {
                interrupted = true;
                break;
            }
            std::vector<Decoded> items;
            while (!pending.empty() && items.size() < static_cast<std::size_t>(c.batch_size)) {
                items.push_back(pending.front().get());
                pending.pop_front();
                fill();
            }
            std::vector<qks::Pixels> batch;
            for (auto& d : items)
                if (d.error.empty()) batch.push_back(std::move(d.pixels));
            std::vector<qks::Result> results;
            try {
                results = tagger->run(batch);
            } catch (const qks::Error& e) {
                fatal = e.what();
                break;
            }
            std::string lines;
            for (std::size_t i = 0, j = 0; i < items.size(); ++i) {
                qks::Result r;
                if (items[i].error.empty()) {
                    r = std::move(results[j++]);
                } else {
                    r.error = items[i].error;
                }
                errors += r.ok() ? 0 : 1;
                if (!c.embeddings.empty() && r.ok()) {
                    embedded.push_back(items[i].name);
                    rows.insert(rows.end(), r.embedding.begin(), r.embedding.end());
                }
                lines += qks::jsonl_record(items[i].name, r, tagger->labels(), record) + "\n";
            }
            if (std::fwrite(lines.data(), 1, lines.size(), out.f) != lines.size() || std::fflush(out.f) != 0) {
                fatal = "cannot write " + (c.out.empty() ? std::string("stdout") : c.out) + ": " + std::strerror(errno);
                break;
            }
            written += items.size();
        }
        for (auto& f : pending) f.wait();  // let the workers finish before the pool goes
    }
    if (!fatal.empty()) fail(fatal);
    if (interrupted || g_interrupted.load()) fail("interrupted (the output holds every finished batch)", 130);
    if (!c.embeddings.empty()) {
        try {
            qks::tools::write_embeddings(c.embeddings, embedded, rows, static_cast<std::size_t>(tagger->embedding_dim()),
                                         tagger->embedding_source(), c.images);
        } catch (const qks::Error& e) {
            fail(e.what());
        }
    }
    const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    std::fprintf(stderr, "%s: %zu images tagged (%zu errors, 0 already done) in %.1f s, %.1f images/s -> %s\n", kProg, written,
                 errors, secs, secs > 0 ? static_cast<double>(written) / secs : 0.0, c.out.empty() ? "stdout" : c.out.c_str());
    return errors ? 1 : 0;
}

int main(int argc, char** argv) {
    Config c;
    try {
        c = parse(argc, argv);
    } catch (const qks::cli::UsageError& e) {
        fail(e.message + " (see qks-tag --help)");
    }
    try {
        return run(c);
    } catch (const std::exception& e) {
        fail(std::string("internal error: ") + e.what());
    }
}
