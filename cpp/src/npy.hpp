// A small reader for NumPy .npy files holding a 2-D float32 array (a label bank): versions 1-3,
// little-endian float32, C or Fortran order, never pickle. Messages as qks.runtime.bundle.load_npy.
#pragma once

#include <cstddef>
#include <string>
#include <vector>

namespace qks::detail {

struct NpyArray {
    std::string dtype;                // NumPy's name: "float32", "float64", ">f4", ...
    std::vector<std::size_t> shape;
    std::vector<float> data;          // C order; filled only for float32
};

// Reads `path`; `what` names it in errors ("label bank 'default'"). Throws Error(Status::bundle).
// dtypes other than float32 are returned with empty data (the caller reports them as qks-infer does).
NpyArray read_npy(const std::string& path, const std::string& what);

}  // namespace qks::detail
