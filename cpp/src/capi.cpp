// qks.h over the C++ API: every entry point catches everything; failures become a status and a
// thread-local message.
#include "qks/qks.h"

#include <cstring>
#include <memory>
#include <new>
#include <string>
#include <vector>

#include "qks/qks.hpp"
#include "qks/records.hpp"
#include "scoring.hpp"

struct qks_tagger {
    qks::Tagger tagger;
};

struct qks_results {
    std::vector<qks::Result> items;
    std::vector<std::string> labels;
    std::vector<float> thresholds;     // the bank's per-label thresholds (empty: none)
    std::vector<std::string> records;  // storage for qks_results_record
};

namespace {

thread_local std::string last_error;

qks_status set_error(qks_status s, const std::string& msg) {
    last_error = msg;
    return s;
}

template <class F>
qks_status guarded(F f) {
    try {
        f();
        last_error.clear();
        return QKS_OK;
    } catch (const qks::Error& e) {
        return set_error(static_cast<qks_status>(e.status()), e.what());
    } catch (const std::bad_alloc&) {
        return set_error(QKS_ERROR_INTERNAL, "out of memory");
    } catch (const std::exception& e) {
        return set_error(QKS_ERROR_INTERNAL, e.what());
    } catch (...) {
        return set_error(QKS_ERROR_INTERNAL, "unknown error");
    }
}

}  // namespace

extern "C" {

const char* qks_version(void) { return qks::version(); }

const float* qks_label_thresholds(const qks_tagger* t) {
    return t && !t->tagger.thresholds().empty() ? t->tagger.thresholds().data() : nullptr;
}
const char* qks_last_error(void) { return last_error.c_str(); }

void qks_options_init(qks_options* o) {
    if (!o) return;
    std::memset(o, 0, sizeof *o);
    o->verify = 1;
}

qks_status qks_open(const char* bundle_dir, const qks_options* options, qks_tagger** out) {
    if (!out) return set_error(QKS_ERROR_ARGUMENT, "qks_open: out is NULL");
    *out = nullptr;
    if (!bundle_dir) return set_error(QKS_ERROR_ARGUMENT, "qks_open: bundle_dir is NULL");
    return guarded([&] {
        qks::Options o;
        if (options) {
            if (options->precision) o.precision = options->precision;
            o.threads = options->threads;
            if (options->bank) o.bank = options->bank;
            if (options->labels_file) o.labels_file = options->labels_file;
            if (options->ort_library) o.ort_library = options->ort_library;
            o.verify = options->verify != 0;
        }
        *out = new qks_tagger{qks::Tagger(bundle_dir, o)};
    });
}

void qks_close(qks_tagger* t) { delete t; }

size_t qks_label_count(const qks_tagger* t) { return t ? t->tagger.labels().size() : 0; }
const char* qks_label_name(const qks_tagger* t, size_t i) {
    return t && i < t->tagger.labels().size() ? t->tagger.labels()[i].c_str() : nullptr;
}
size_t qks_queries(const qks_tagger* t) { return t && t->tagger.queries() > 0 ? static_cast<size_t>(t->tagger.queries()) : 0; }
size_t qks_dim(const qks_tagger* t) { return t && t->tagger.dim() > 0 ? static_cast<size_t>(t->tagger.dim()) : 0; }
size_t qks_image_size(const qks_tagger* t) { return t ? static_cast<size_t>(t->tagger.image_size()) : 0; }
size_t qks_embedding_dim(const qks_tagger* t) { return t ? static_cast<size_t>(t->tagger.embedding_dim()) : 0; }

qks_status qks_require_embedding(const qks_tagger* t) {
    if (!t) return set_error(QKS_ERROR_ARGUMENT, "qks_require_embedding: NULL tagger");
    return guarded([&] { t->tagger.require_embedding(); });
}

qks_status qks_tag_files(qks_tagger* t, const char* const* paths, size_t count, qks_results** out) {
    if (!out) return set_error(QKS_ERROR_ARGUMENT, "qks_tag_files: out is NULL");
    *out = nullptr;
    if (!t || (!paths && count)) return set_error(QKS_ERROR_ARGUMENT, "qks_tag_files: NULL tagger or paths");
    return guarded([&] {
        std::vector<std::string> p;
        for (size_t i = 0; i < count; ++i) {
            if (!paths[i]) throw qks::Error(qks::Status::invalid_argument, "qks_tag_files: path " + std::to_string(i) + " is NULL");
            p.emplace_back(paths[i]);
        }
        auto r = std::make_unique<qks_results>();
        r->items = t->tagger.tag_files(p);
        r->labels = t->tagger.labels();
        r->thresholds = t->tagger.thresholds();
        *out = r.release();
    });
}

qks_status qks_tag_rgb(qks_tagger* t, const uint8_t* rgb, int width, int height, size_t stride, qks_results** out) {
    if (!out) return set_error(QKS_ERROR_ARGUMENT, "qks_tag_rgb: out is NULL");
    *out = nullptr;
    if (!t) return set_error(QKS_ERROR_ARGUMENT, "qks_tag_rgb: NULL tagger");
    return guarded([&] {
        auto r = std::make_unique<qks_results>();
        r->items.push_back(t->tagger.tag_rgb(rgb, width, height, stride));
        r->labels = t->tagger.labels();
        r->thresholds = t->tagger.thresholds();
        *out = r.release();
    });
}

qks_status qks_preprocess_file(const qks_tagger* t, const char* path, float* out, size_t out_count) {
    if (!t || !path || !out) return set_error(QKS_ERROR_ARGUMENT, "qks_preprocess_file: NULL argument");
    return guarded([&] {
        qks::Pixels p = t->tagger.preprocess_file(path);
        if (out_count < p.data.size())
            throw qks::Error(qks::Status::invalid_argument, "qks_preprocess_file: out holds " + std::to_string(out_count) +
                                                                " floats, the image needs " + std::to_string(p.data.size()));
        std::memcpy(out, p.data.data(), p.data.size() * sizeof(float));
    });
}

size_t qks_results_count(const qks_results* r) { return r ? r->items.size() : 0; }

const char* qks_results_error(const qks_results* r, size_t i) {
    if (!r || i >= r->items.size()) return "no such result";
    return r->items[i].ok() ? nullptr : r->items[i].error.c_str();
}

const float* qks_results_probabilities(const qks_results* r, size_t i) {
    return r && i < r->items.size() && r->items[i].ok() ? r->items[i].probabilities.data() : nullptr;
}

const float* qks_results_query_features(const qks_results* r, size_t i) {
    return r && i < r->items.size() && r->items[i].ok() ? r->items[i].query_features.data() : nullptr;
}

const float* qks_results_embedding(const qks_results* r, size_t i) {
    return r && i < r->items.size() && r->items[i].ok() && !r->items[i].embedding.empty() ? r->items[i].embedding.data()
                                                                                          : nullptr;
}

size_t qks_results_select(const qks_results* r, size_t i, int top_k, double threshold, size_t* idx, size_t capacity) {
    if (!r || i >= r->items.size() || !r->items[i].ok()) return 0;
    try {
        const std::vector<size_t> chosen = qks::detail::select_for(r->items[i].probabilities, top_k, threshold, r->thresholds);
        for (size_t n = 0; idx && n < chosen.size() && n < capacity; ++n) idx[n] = chosen[n];
        return chosen.size();
    } catch (...) {
        last_error = "qks_results_select failed";
        return 0;
    }
}

const char* qks_results_record(qks_results* r, size_t i, const char* image_name, int top_k, double threshold, int all_scores) {
    if (!r || i >= r->items.size()) return nullptr;
    try {
        qks::RecordOptions o;
        o.top_k = top_k;
        o.threshold = threshold;
        o.thresholds = r->thresholds;
        o.all_scores = all_scores != 0;
        if (r->records.size() < r->items.size()) r->records.resize(r->items.size());
        r->records[i] = qks::jsonl_record(image_name ? image_name : "", r->items[i], r->labels, o);
        return r->records[i].c_str();
    } catch (...) {
        last_error = "qks_results_record failed";
        return nullptr;
    }
}

void qks_results_free(qks_results* r) { delete r; }

}  // extern "C"
