// ONNX Runtime, loaded at run time: dlopen of libonnxruntime.so, OrtGetApiBase, Ort::InitApi
// (ORT_API_MANUAL_INIT), so one build of libqks works with any ONNX Runtime >= 1.21 (the API
// version of the headers it was built with). Found from, in order: an explicit path,
// $QKS_ORT_LIBRARY, the onnxruntime Python wheel ($QKS_PYTHON or python3), the system's
// libonnxruntime.so.1.
#pragma once

#include <string>

#define ORT_API_MANUAL_INIT
#include <onnxruntime_cxx_api.h>

namespace qks::detail {

struct OrtRuntime {
    std::string library;  // the file that was loaded
    std::string version;  // e.g. "1.32.0"
    Ort::Env& env;
};

// The process-wide runtime (loaded once; later calls return it whatever `library` says).
// Throws qks::Error(Status::runtime) with a one-line reason.
OrtRuntime& ort_runtime(const std::string& library);

}  // namespace qks::detail
