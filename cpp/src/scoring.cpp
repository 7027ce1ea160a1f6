#include "scoring.hpp"

#include <algorithm>
#include <cmath>
#include <numeric>

namespace qks::detail {

std::vector<float> logits(const float* qf, std::size_t nq, std::size_t d, const std::vector<float>& emb,
                          std::size_t labels, const std::string& mode, int k) {
    std::vector<float> out(labels);
    std::vector<float> sims(nq);
    const std::size_t kk = static_cast<std::size_t>(std::max(1, std::min<int>(k, static_cast<int>(nq))));
    for (std::size_t l = 0; l < labels; ++l) {
        const float* e = emb.data() + l * d;
        for (std::size_t q = 0; q < nq; ++q) {
            const float* a = qf + q * d;
            double acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};  // independent sums: vectorisable without reassociation
            std::size_t i = 0;
            for (; i + 8 <= d; i += 8)
                for (std::size_t j = 0; j < 8; ++j) acc[j] += static_cast<double>(a[i + j]) * static_cast<double>(e[i + j]);
            double s = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
            for (; i < d; ++i) s += static_cast<double>(a[i]) * static_cast<double>(e[i]);
            sims[q] = static_cast<float>(s);
        }
        if (mode == "topk") {
            std::vector<float> v = sims;
            std::sort(v.begin(), v.end());
            float sum = 0.0f;  // numpy sums the k largest in float32, smallest first
            for (std::size_t j = v.size() - kk; j < v.size(); ++j) sum += v[j];
            out[l] = sum;
        } else {
            float m = sims.empty() ? -INFINITY : sims[0];  // numpy's max: NaN wins
            for (float v : sims) {
                if (std::isnan(v)) {
                    m = v;
                    break;
                }
                if (v > m) m = v;
            }
            out[l] = m;
        }
    }
    return out;
}

float sigmoid(float x) {
    const float e = std::exp(-std::fabs(x));
    return x >= 0 ? 1.0f / (1.0f + e) : e / (1.0f + e);
}

double effective_threshold(int top_k, double threshold) { return threshold >= 0 ? threshold : (top_k > 0 ? -1.0 : 0.5); }

namespace {

std::vector<std::size_t> descending(const std::vector<float>& probs) {
    std::vector<std::size_t> order(probs.size());
    std::iota(order.begin(), order.end(), 0);
    // np.argsort(-probs, kind="stable"): descending, NaN last, ties in bank order
    std::stable_sort(order.begin(), order.end(), [&](std::size_t a, std::size_t b) {
        const float pa = probs[a], pb = probs[b];
        if (std::isnan(pa)) return false;
        if (std::isnan(pb)) return true;
        return -pa < -pb;
    });
    return order;
}

std::vector<std::size_t> first(std::vector<std::size_t> order, int top_k) {
    if (top_k > 0 && order.size() > static_cast<std::size_t>(top_k)) order.resize(static_cast<std::size_t>(top_k));
    return order;
}

}  // namespace

std::vector<std::size_t> select(const std::vector<float>& probs, int top_k, double threshold) {
    std::vector<std::size_t> order = descending(probs);
    if (threshold >= 0) {  // numpy compares a float32 array with a Python float in float32
        const float t = static_cast<float>(threshold);
        std::vector<std::size_t> kept;
        for (std::size_t i : order)
            if (probs[i] >= t) kept.push_back(i);
        order.swap(kept);
    }
    return first(std::move(order), top_k);
}

std::vector<std::size_t> select(const std::vector<float>& probs, int top_k, const std::vector<float>& thresholds) {
    std::vector<std::size_t> kept;
    for (std::size_t i : descending(probs))
        if (i < thresholds.size() && probs[i] >= thresholds[i]) kept.push_back(i);
    return first(std::move(kept), top_k);
}

std::vector<std::size_t> select_for(const std::vector<float>& probs, int top_k, double threshold,
                                    const std::vector<float>& per_label) {
    if (threshold < 0 && !per_label.empty()) return select(probs, top_k, per_label);
    return select(probs, top_k, effective_threshold(top_k, threshold));
}

}  // namespace qks::detail
