// The image graph in an ONNX Runtime CPU session, set up as qks.engines.ort.OrtEngine sets it up
// (all graph optimisations, intra-op threads, NchwcTransformer off for FP16 graphs).
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "ort_runtime.hpp"

namespace qks::detail {

class Engine {
public:
    // Throws qks::Error(Status::runtime, "ort-cpu: cannot load <file>: <reason>"). `embedding`: the
    // name of the graph's embedding output ("" for none); Error(Status::bundle) if the graph lacks it.
    Engine(OrtRuntime& rt, const std::string& path, const std::string& file, int threads, bool fp16,
           const std::string& embedding = "");

    // pixels float32 [batch, 3, size, size] -> query features float32 [batch, Nq, D] (shape in `dims`);
    // with an embedding output and `embedding` given, also the embeddings float32 [batch, E] into it.
    std::vector<float> run(const std::vector<float>& pixels, std::int64_t batch, int size, std::vector<std::int64_t>& dims,
                           std::vector<float>* embedding = nullptr);

    std::int64_t queries() const { return queries_; }  // -1 when the graph leaves it dynamic
    std::int64_t dim() const { return dim_; }
    std::int64_t embedding_dim() const { return embedding_dim_; }  // -1: no embedding output

private:
    void find_embedding();  // sets embedding_dim_ or throws Error(Status::bundle)

    std::string file_;
    Ort::Session session_{nullptr};
    std::string input_, output_, embedding_;
    std::int64_t queries_ = -1, dim_ = -1, embedding_dim_ = -1;
};

}  // namespace qks::detail
