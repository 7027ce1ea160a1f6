// The .npy reader (npy.cpp) on a file of arbitrary bytes, as a label bank or a cached bank is read.
#include <cstddef>
#include <cstdint>
#include <string>

#include "harness.hpp"
#include "npy.hpp"
#include "qks/qks.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* bytes, std::size_t size) {
    const std::string path = qks::fuzz::write_scratch("bank.npy", std::string(reinterpret_cast<const char*>(bytes), size));
    try {
        const qks::detail::NpyArray a = qks::detail::read_npy(path, "label bank 'default'");
        std::size_t count = 1;
        for (std::size_t d : a.shape) count *= d;
        qks::fuzz::require(a.dtype != "float32" || a.data.size() == count, "float32 data of another size than its shape");
        qks::fuzz::require(a.dtype == "float32" || a.data.empty(), "data filled for another dtype than float32");
    } catch (const qks::Error& e) {
        qks::fuzz::require(e.status() == qks::Status::bundle, "an .npy error with another status than Status::bundle");
        qks::fuzz::require(std::string(e.what()).rfind("label bank 'default': ", 0) == 0, "an .npy error that does not name the bank");
    }
    return 0;
}
