// pybind11 bindings for hybridfast._C. The cores in csrc/*.h know nothing of Python;
// this file only converts numpy arrays to raw pointers and results back to numpy.
// Argument checking with named arguments happens in hybridfast/sampler.py.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>

#include "hybrid_sampler.h"

namespace py = pybind11;
using hybridfast::EpochPlan;
using hybridfast::SamplerConfig;

namespace {

using ByteMatrix = py::array_t<std::uint8_t, py::array::c_style>;
using GroupIds = py::array_t<std::int32_t, py::array::c_style>;
using Weights = py::array_t<std::uint64_t, py::array::c_style>;

void check_matrix(const ByteMatrix& availability) {
    if (availability.ndim() != 2) throw std::invalid_argument("availability must be 2-D");
}

// groups is None or dense int32 ids in [0, num_groups), one per example.
const std::int32_t* group_pointer(const py::object& groups, std::int64_t num_examples, GroupIds& holder) {
    if (groups.is_none()) return nullptr;
    holder = groups.cast<GroupIds>();
    if (holder.ndim() != 1 || holder.shape(0) != num_examples)
        throw std::invalid_argument("groups must be 1-D with one id per example");
    return holder.data();
}

py::array_t<std::int32_t> plan_epoch(const ByteMatrix& availability, std::int64_t batch_size,
                                     std::int64_t world_size, bool allow_mono, bool allow_cross,
                                     std::uint64_t mono_threshold, bool size_weights,
                                     const Weights& lang_weights, const py::object& groups,
                                     std::int64_t num_groups, bool drop_last, std::uint64_t seed,
                                     std::uint64_t epoch, std::uint64_t size_power) {
    check_matrix(availability);
    SamplerConfig cfg;
    cfg.batch_size = batch_size;
    cfg.world_size = world_size;
    cfg.allow_mono = allow_mono;
    cfg.allow_cross = allow_cross;
    cfg.mono_threshold = mono_threshold;
    cfg.size_weights = size_weights;
    cfg.size_power = size_power;
    cfg.lang_weights.assign(lang_weights.data(), lang_weights.data() + lang_weights.size());
    cfg.drop_last = drop_last;
    cfg.seed = seed;
    cfg.epoch = epoch;
    const std::int64_t E = availability.shape(0), L = availability.shape(1);
    GroupIds group_holder;
    const std::int32_t* group_ids = group_pointer(groups, E, group_holder);

    auto plan = std::make_unique<EpochPlan>();
    {
        py::gil_scoped_release release;  // the inputs stay referenced by this frame
        *plan = hybridfast::plan_epoch(cfg, availability.data(), E, L, group_ids, num_groups);
    }
    const py::ssize_t steps = plan->steps, slots = plan->slots;
    if (steps == 0) return py::array_t<std::int32_t>({steps, slots, py::ssize_t(3)});
    // Hand the vector's buffer to numpy without a copy; the capsule frees it.
    std::int32_t* data = plan->data.data();
    py::capsule owner(plan.get(), [](void* p) { delete static_cast<EpochPlan*>(p); });
    plan.release();
    const py::ssize_t item = sizeof(std::int32_t);
    return py::array_t<std::int32_t>({steps, slots, py::ssize_t(3)}, {slots * 3 * item, 3 * item, item},
                                     data, owner);
}

py::array_t<std::int64_t> fresh_capacities(const ByteMatrix& availability, const py::object& groups,
                                           std::int64_t num_groups) {
    check_matrix(availability);
    const std::int64_t E = availability.shape(0), L = availability.shape(1);
    GroupIds group_holder;
    const std::int32_t* group_ids = group_pointer(groups, E, group_holder);
    std::vector<std::int64_t> cap;
    {
        py::gil_scoped_release release;
        cap = hybridfast::fresh_capacities(availability.data(), E, L, group_ids, num_groups);
    }
    return py::array_t<std::int64_t>(static_cast<py::ssize_t>(cap.size()), cap.data());
}

// Test hook: the (seed, epoch) stream; bound 0 gives a raw 64-bit draw, else below(bound).
py::array_t<std::uint64_t> rng_draws(std::uint64_t seed, std::uint64_t epoch, const Weights& bounds) {
    hybridfast::Rng rng(hybridfast::epoch_stream_base(seed, epoch));
    py::array_t<std::uint64_t> out(bounds.size());
    auto o = out.mutable_unchecked<1>();
    for (py::ssize_t k = 0; k < bounds.size(); ++k) {
        std::uint64_t n = bounds.data()[k];
        o(k) = n == 0 ? rng.next() : rng.below(n);
    }
    return out;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
    m.doc() = "hybridfast C++ cores (hybrid batch sampler)";
    m.def("splitmix64", &hybridfast::splitmix64, py::arg("x"), "splitmix64 mix of a 64-bit counter");
    m.def("plan_epoch", &plan_epoch, py::arg("availability"), py::arg("batch_size"), py::arg("world_size"),
          py::arg("allow_mono"), py::arg("allow_cross"), py::arg("mono_threshold"), py::arg("size_weights"),
          py::arg("lang_weights"), py::arg("groups"), py::arg("num_groups"), py::arg("drop_last"),
          py::arg("seed"), py::arg("epoch"), py::arg("size_power") = std::uint64_t(1) << 32,
          "Plan one epoch: int32 [steps, world_size*batch_size, 3]; -1 pads a final partial batch.\n"
          "availability: uint8 [E, L] C-contiguous; groups: None or dense int32 ids; size_power: tau of\n"
          "size^tau weights in Q32 (2^32: plain size). The GIL is released.");
    m.def("fresh_capacities", &fresh_capacities, py::arg("availability"), py::arg("groups"),
          py::arg("num_groups"),
          "Largest batch each option (languages, then cross) can fill from a fresh epoch.");
    m.def("rng_draws", &rng_draws, py::arg("seed"), py::arg("epoch"), py::arg("bounds"),
          "Test hook: draws of the (seed, epoch) stream; bound 0 = raw next(), else below(bound).");
}
