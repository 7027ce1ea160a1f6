// qks.runtime.scoring: logits from query features and label embeddings, sigmoid, label choice.
#pragma once

#include <cstddef>
#include <string>
#include <utility>
#include <vector>

namespace qks::detail {

// qf [nq x d], emb [labels x d] -> logits [labels]: "max": max_q <qf_q, e_l> (the paper); "topk":
// the sum of the k largest. Dot products in double, rounded to float32 once.
std::vector<float> logits(const float* qf, std::size_t nq, std::size_t d, const std::vector<float>& emb,
                          std::size_t labels, const std::string& mode, int k);
// 1 / (1 + exp(-x)) in float32 without overflow, as qks.runtime.scoring.sigmoid.
float sigmoid(float x);
// Indices chosen by qks-infer, most probable first (stable for ties): those with p >= threshold
// (threshold >= 0), of those the top k (k > 0).
std::vector<std::size_t> select(const std::vector<float>& probs, int top_k, double threshold);
// The same with per-label thresholds (bank order): up to k labels, each with p >= its own threshold.
std::vector<std::size_t> select(const std::vector<float>& probs, int top_k, const std::vector<float>& thresholds);
// A run's choice, the rule of qks.runtime.scoring.thresholds_for: an explicit threshold (>= 0) for
// every label; else the bank's per-label thresholds when it has them (non-empty); else 0.5 unless
// top_k is given.
std::vector<std::size_t> select_for(const std::vector<float>& probs, int top_k, double threshold,
                                    const std::vector<float>& per_label);
// The threshold a run applies: the given one, else 0.5 unless top_k is given (-1: none).
double effective_threshold(int top_k, double threshold);

}  // namespace qks::detail
