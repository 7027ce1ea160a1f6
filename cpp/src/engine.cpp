#include "engine.hpp"

#include "qks/qks.hpp"

namespace qks::detail {
namespace {
std::string first_line(const char* what) {
    std::string s = what ? what : "";
    std::size_t k = s.find('\n');
    return k == std::string::npos ? s : s.substr(0, k);
}
}  // namespace

Engine::Engine(OrtRuntime& rt, const std::string& path, const std::string& file, int threads, bool fp16,
               const std::string& embedding)
    : file_(file), embedding_(embedding) {
    try {
        Ort::SessionOptions opts;
        opts.SetLogSeverityLevel(3);  // errors only, as the Python engine
        opts.SetGraphOptimizationLevel(GraphOptimizationLevel::ORT_ENABLE_ALL);
        if (threads > 0) opts.SetIntraOpNumThreads(threads);
        if (fp16) opts.AddConfigEntry("optimization.disable_specified_optimizers", "NchwcTransformer");
        session_ = Ort::Session(rt.env, path.c_str(), opts);
        Ort::AllocatorWithDefaultOptions alloc;
        if (session_.GetInputCount() < 1 || session_.GetOutputCount() < 1)
            throw Error(Status::runtime, "ort-cpu: cannot load " + file + ": the graph has no input or output");
        input_ = session_.GetInputNameAllocated(0, alloc).get();
        output_ = session_.GetOutputNameAllocated(0, alloc).get();
        Ort::TypeInfo in_type = session_.GetInputTypeInfo(0);
        auto in_info = in_type.GetTensorTypeAndShapeInfo();
        if (in_info.GetElementType() != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT || in_info.GetDimensionsCount() != 4)
            throw Error(Status::runtime, "ort-cpu: " + file + ": the image graph's input must be float32 [batch, 3, H, W]");
        Ort::TypeInfo out_type = session_.GetOutputTypeInfo(0);
        auto out_info = out_type.GetTensorTypeAndShapeInfo();
        std::vector<std::int64_t> shape = out_info.GetShape();
        if (out_info.GetElementType() != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT || shape.size() != 3)
            throw Error(Status::runtime, "ort-cpu: " + file + ": the image graph's output must be float32 [batch, Nq, D]");
        queries_ = shape[1];
        dim_ = shape[2];
        if (!embedding_.empty()) find_embedding();
    } catch (const Ort::Exception& e) {
        throw Error(Status::runtime, "ort-cpu: cannot load " + file + ": " + first_line(e.what()));
    }
}

void Engine::find_embedding() {
    Ort::AllocatorWithDefaultOptions alloc;
    for (std::size_t i = 1; i < session_.GetOutputCount(); ++i) {
        if (embedding_ != session_.GetOutputNameAllocated(i, alloc).get()) continue;
        Ort::TypeInfo type = session_.GetOutputTypeInfo(i);
        auto info = type.GetTensorTypeAndShapeInfo();
        std::vector<std::int64_t> shape = info.GetShape();
        if (info.GetElementType() != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT || shape.size() != 2)
            throw Error(Status::bundle, file_ + ": the image graph's " + embedding_ + " output must be float32 [batch, E]");
        embedding_dim_ = shape[1];
        return;
    }
    throw Error(Status::bundle, file_ + ": the manifest names the embedding output " + embedding_ +
                                    " but the graph has none; re-export the bundle with qks-export");
}

std::vector<float> Engine::run(const std::vector<float>& pixels, std::int64_t batch, int size, std::vector<std::int64_t>& dims,
                               std::vector<float>* embedding) {
    try {
        Ort::MemoryInfo mem = Ort::MemoryInfo::CreateCpu(OrtArenaAllocator, OrtMemTypeDefault);
        const std::int64_t shape[4] = {batch, 3, size, size};
        Ort::Value input = Ort::Value::CreateTensor<float>(mem, const_cast<float*>(pixels.data()), pixels.size(), shape, 4);
        const char* in_names[] = {input_.c_str()};
        const bool want = embedding && !embedding_.empty();
        const char* out_names[] = {output_.c_str(), embedding_.c_str()};
        std::vector<Ort::Value> out = session_.Run(Ort::RunOptions{nullptr}, in_names, &input, 1, out_names, want ? 2 : 1);
        auto info = out[0].GetTensorTypeAndShapeInfo();
        dims = info.GetShape();
        if (dims.size() != 3 || dims[0] != batch)
            throw Error(Status::runtime, "ort-cpu: " + file_ + ": unexpected output shape from the image graph");
        if (want) {
            auto e = out[1].GetTensorTypeAndShapeInfo();
            std::vector<std::int64_t> edims = e.GetShape();
            if (edims.size() != 2 || edims[0] != batch)
                throw Error(Status::runtime, "ort-cpu: " + file_ + ": unexpected shape of the " + embedding_ + " output");
            const float* q = out[1].GetTensorData<float>();
            embedding->assign(q, q + e.GetElementCount());
        }
        const float* p = out[0].GetTensorData<float>();
        return std::vector<float>(p, p + info.GetElementCount());
    } catch (const Ort::Exception& e) {
        throw Error(Status::runtime, "ort-cpu: run failed: " + first_line(e.what()));
    }
}

}  // namespace qks::detail
