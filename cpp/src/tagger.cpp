// qks::Tagger: the bundle, its label bank and the image graph behind the public C++ API.
#include <algorithm>
#include <cmath>
#include <thread>

#include "bundle.hpp"
#include "engine.hpp"
#include "image.hpp"
#include "labels.hpp"
#include "preprocess.hpp"
#include "qks/qks.hpp"
#include "scoring.hpp"
#include "text.hpp"
#include "thread_pool.hpp"

namespace qks {

using detail::Bundle;
using detail::LabelBankData;

struct Tagger::Impl {
    Bundle bundle;
    LabelBankData bank;
    const detail::GraphInfo* graph = nullptr;
    std::unique_ptr<detail::Engine> engine;
    std::string ort_version;
    int queries = -1, dim = -1, embedding_dim = 0;
};

namespace {

const detail::GraphInfo& pick_graph(const Bundle& b, const std::string& precision) {
    static const std::pair<const char*, const char*> by_precision[] = {
        {"fp32", "image_encoder"}, {"fp16", "image_encoder_fp16"}, {"int8", "image_encoder_int8"}};
    if (precision != "auto") {
        for (const auto& [p, g] : by_precision)
            if (precision == p) {
                if (const detail::GraphInfo* info = b.graph(g)) return *info;
                std::string have;
                for (const auto& [p2, g2] : by_precision)
                    if (b.graph(g2)) have += (have.empty() ? "" : ", ") + std::string(p2);
                std::string hint = precision == "int8" ? " (qks-export --int8)" : precision == "fp16" ? " (qks-export --fp16)" : "";
                throw Error(Status::bundle, "the bundle has no " + precision + " image graph" + hint + "; it has: " + have);
            }
    }
    for (const char* g : {"image_encoder_int8", "image_encoder", "image_encoder_fp16"})  // the CPU's order
        if (const detail::GraphInfo* info = b.graph(g)) return *info;
    throw Error(Status::bundle, "bundle has no image encoder graph");
}

}  // namespace

Tagger::Tagger(const std::string& bundle_dir, const Options& options) : impl_(std::make_unique<Impl>()) {
    const std::string& p = options.precision;
    if (p != "auto" && p != "fp32" && p != "fp16" && p != "int8")
        throw Error(Status::invalid_argument, "unknown precision " + detail::py_repr(p) + " (one of auto, fp32, fp16, int8)");
    if (options.threads < 0) throw Error(Status::invalid_argument, "threads must be 0 (default) or more");
    if (!options.bank.empty() && !options.labels_file.empty())
        throw Error(Status::invalid_argument, "give --labels or --bank, not both");
    Impl& m = *impl_;
    m.bundle = Bundle::load(bundle_dir, options.verify);
    m.graph = &pick_graph(m.bundle, p);
    detail::OrtRuntime& rt = detail::ort_runtime(options.ort_library);
    m.ort_version = rt.version;
    const bool fp16 = m.graph->precision == "fp16" || (m.graph->name.size() >= 4 && m.graph->name.substr(m.graph->name.size() - 4) == "fp16");
    m.engine = std::make_unique<detail::Engine>(rt, m.graph->path, m.graph->file, options.threads, fp16,
                                                m.bundle.embedding_output);
    m.embedding_dim = m.engine->embedding_dim() > 0 ? static_cast<int>(m.engine->embedding_dim()) : 0;
    if (!options.labels_file.empty()) {
        detail::LabelList list = detail::read_label_file(options.labels_file);
        m.bank = detail::bank_for_labels(m.bundle, list.names, options.labels_file);
    } else {
        m.bank = m.bundle.load_bank(options.bank.empty() ? m.bundle.default_bank() : options.bank);
    }
    const auto& model = m.bundle.manifest["model"];
    m.queries = m.engine->queries() > 0 ? static_cast<int>(m.engine->queries())
                : model.contains("queries") && model["queries"].is_number() ? model["queries"].get<int>() : -1;
    m.dim = m.engine->dim() > 0 ? static_cast<int>(m.engine->dim()) : static_cast<int>(m.bundle.embed_dim);
    if (m.dim > 0 && m.bank.cols != static_cast<std::size_t>(m.dim))
        throw Error(Status::labels, "label bank " + m.bank.source + " has dimension " + std::to_string(m.bank.cols) +
                                        ", the image graph's is " + std::to_string(m.dim));
}

Tagger::~Tagger() = default;
Tagger::Tagger(Tagger&&) noexcept = default;
Tagger& Tagger::operator=(Tagger&&) noexcept = default;

const std::vector<std::string>& Tagger::labels() const { return impl_->bank.names; }
const std::vector<float>& Tagger::thresholds() const { return impl_->bank.thresholds; }
int Tagger::queries() const { return impl_->queries; }
int Tagger::dim() const { return impl_->dim; }
int Tagger::image_size() const { return impl_->bundle.preprocess.size; }
std::string Tagger::graph() const { return impl_->graph->file; }
std::string Tagger::bank_source() const { return impl_->bank.source; }
std::string Tagger::ort_version() const { return impl_->ort_version; }
int Tagger::embedding_dim() const { return impl_->embedding_dim; }

Tagger::EmbeddingSource Tagger::embedding_source() const {
    const Bundle& b = impl_->bundle;
    const detail::GraphInfo* g = b.graph("image_encoder");
    for (const auto& other : b.graphs)  // as embeddings_meta: the fp32 graph, else the first image graph
        if (!g && other.name.rfind("image_encoder", 0) == 0) g = &other;
    const auto& model = b.manifest["model"];
    return {b.root, g ? g->sha256 : "",
            model.contains("backbone") && model["backbone"].is_string() ? model["backbone"].get<std::string>() : ""};
}

void Tagger::require_embedding() const {
    if (impl_->embedding_dim <= 0)
        throw Error(Status::bundle, impl_->bundle.root + ": this bundle has no image embedding output (exported before "
                                                         "embeddings); re-export it with qks-export");
}

Pixels Tagger::preprocess_file(const std::string& path) const {
    const detail::PreprocessConfig& cfg = impl_->bundle.preprocess;
    detail::RgbImage rgb = detail::load_rgb(path);
    return Pixels{cfg.size, detail::normalize(detail::resize_crop(rgb, cfg), cfg)};
}

Pixels Tagger::preprocess_rgb(const std::uint8_t* rgb, int width, int height, std::size_t stride) const {
    if (!rgb || width <= 0 || height <= 0) throw Error(Status::invalid_argument, "an RGB image needs pixels and a positive size");
    if (stride == 0) stride = static_cast<std::size_t>(width) * 3;
    if (stride < static_cast<std::size_t>(width) * 3) throw Error(Status::invalid_argument, "stride is smaller than 3 * width");
    detail::RgbImage img;
    img.width = width;
    img.height = height;
    img.px.resize(static_cast<std::size_t>(width) * static_cast<std::size_t>(height) * 3);
    for (int y = 0; y < height; ++y)
        std::copy_n(rgb + static_cast<std::size_t>(y) * stride, static_cast<std::size_t>(width) * 3,
                    img.px.begin() + static_cast<std::ptrdiff_t>(static_cast<std::size_t>(y) * width * 3));
    const detail::PreprocessConfig& cfg = impl_->bundle.preprocess;
    return Pixels{cfg.size, detail::normalize(detail::resize_crop(img, cfg), cfg)};
}

std::vector<Result> Tagger::run(const std::vector<Pixels>& batch) {
    Impl& m = *impl_;
    std::vector<Result> out(batch.size());
    if (batch.empty()) return out;
    const int size = m.bundle.preprocess.size;
    const std::size_t per = static_cast<std::size_t>(3) * size * size;
    std::vector<float> pixels;
    pixels.reserve(per * batch.size());
    for (const Pixels& p : batch) {
        if (p.size != size || p.data.size() != per)
            throw Error(Status::invalid_argument, "pixels must be float32 [3, " + std::to_string(size) + ", " + std::to_string(size) + "]");
        pixels.insert(pixels.end(), p.data.begin(), p.data.end());
    }
    std::vector<std::int64_t> dims;
    std::vector<float> emb;
    std::vector<float> qf = m.engine->run(pixels, static_cast<std::int64_t>(batch.size()), size, dims,
                                          m.embedding_dim > 0 ? &emb : nullptr);
    const std::size_t e = static_cast<std::size_t>(m.embedding_dim);
    const std::size_t nq = static_cast<std::size_t>(dims[1]), d = static_cast<std::size_t>(dims[2]);
    if (d != m.bank.cols)
        throw Error(Status::runtime, "query features [" + std::to_string(dims[0]) + ", " + std::to_string(nq) + ", " + std::to_string(d) +
                                         "] and label embeddings [" + std::to_string(m.bank.rows) + ", " + std::to_string(m.bank.cols) +
                                         "] do not match");
    for (std::size_t i = 0; i < batch.size(); ++i) {
        const float* q = qf.data() + i * nq * d;
        Result& r = out[i];
        std::vector<float> lg = detail::logits(q, nq, d, m.bank.embeddings, m.bank.rows, m.bundle.scoring_mode, m.bundle.scoring_k);
        bool finite = std::all_of(q, q + nq * d, [](float v) { return std::isfinite(v); }) &&
                      std::all_of(lg.begin(), lg.end(), [](float v) { return std::isfinite(v); });
        if (!finite) {
            r.error = "model output is not finite (NaN or inf)";
            continue;
        }
        r.query_features.assign(q, q + nq * d);
        if (e > 0) r.embedding.assign(emb.begin() + static_cast<std::ptrdiff_t>(i * e),
                                      emb.begin() + static_cast<std::ptrdiff_t>((i + 1) * e));
        r.probabilities.resize(lg.size());
        std::transform(lg.begin(), lg.end(), r.probabilities.begin(), detail::sigmoid);
    }
    return out;
}

Result Tagger::tag_file(const std::string& path) { return tag_files({path}, 1).front(); }

Result Tagger::tag_rgb(const std::uint8_t* rgb, int width, int height, std::size_t stride) {
    Pixels p;
    try {
        p = preprocess_rgb(rgb, width, height, stride);
    } catch (const Error& e) {
        if (e.status() != Status::image) throw;
        Result r;
        r.error = e.what();
        return r;
    }
    return run({p}).front();
}

std::vector<Result> Tagger::tag_files(const std::vector<std::string>& paths, int workers) {
    if (workers <= 0) workers = static_cast<int>(std::min<unsigned>(4, std::max(1u, std::thread::hardware_concurrency())));
    workers = std::min<int>(workers, static_cast<int>(std::max<std::size_t>(1, paths.size())));
    std::vector<Pixels> pixels(paths.size());
    std::vector<std::string> errors(paths.size());
    {
        detail::ThreadPool pool(workers);
        std::vector<std::future<void>> done;
        for (std::size_t i = 0; i < paths.size(); ++i)
            done.push_back(pool.submit([&, i] {
                try {
                    pixels[i] = preprocess_file(paths[i]);
                } catch (const Error& e) {
                    errors[i] = e.status() == Status::image ? e.what() : std::string("cannot decode image: ") + e.what();
                } catch (const std::exception& e) {  // a decoder bug must not end a run: that image's error
                    errors[i] = std::string("cannot decode image: ") + e.what();
                }
            }));
        for (auto& f : done) f.get();
    }
    std::vector<Pixels> ok;
    for (std::size_t i = 0; i < paths.size(); ++i)
        if (errors[i].empty()) ok.push_back(std::move(pixels[i]));
    std::vector<Result> ran = run(ok);
    std::vector<Result> out(paths.size());
    for (std::size_t i = 0, j = 0; i < paths.size(); ++i) {
        if (errors[i].empty()) {
            out[i] = std::move(ran[j++]);
        } else {
            out[i].error = errors[i];
        }
    }
    return out;
}

std::vector<std::pair<std::string, float>> Tagger::select(const Result& result, int top_k, double threshold) const {
    std::vector<std::pair<std::string, float>> out;
    if (!result.ok()) return out;
    for (std::size_t i : detail::select_for(result.probabilities, top_k, threshold, impl_->bank.thresholds))
        out.emplace_back(impl_->bank.names[i], result.probabilities[i]);
    return out;
}

const char* version() noexcept { return QKS_VERSION; }

}  // namespace qks
