// pybind11 bindings for hybridfast._C. The cores in csrc/*.h know nothing of Python.
#include <pybind11/pybind11.h>

#include <cstdint>

namespace py = pybind11;

namespace {
// Stateless counter-based mixer (splitmix64 finaliser); the sampler's RNG builds on it.
std::uint64_t splitmix64(std::uint64_t x) {
    x += 0x9E3779B97F4A7C15ULL;
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ULL;
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBULL;
    return x ^ (x >> 31);
}
}  // namespace

PYBIND11_MODULE(_C, m) {
    m.doc() = "hybridfast C++ cores (hybrid batch sampler)";
    m.def("splitmix64", &splitmix64, py::arg("x"), "splitmix64 mix of a 64-bit counter");
}
