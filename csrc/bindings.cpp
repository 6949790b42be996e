// pybind11 bindings for hybridfast._C. The cores in csrc/*.h know nothing of Python;
// this file only converts numpy arrays to raw pointers and results back to numpy.
// Argument checking with named arguments happens in hybridfast/sampler.py.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <memory>
#include <stdexcept>
#include <string>

#include "hybrid_sampler.h"
#include "tile_count.h"

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

// A float32 matrix whose rows are contiguous (a column slice of a C-contiguous buffer is fine).
const float* row_major(const py::array& a, const char* name, std::int64_t* rows, std::int64_t* cols,
                       std::int64_t* ld) {
    if (a.ndim() != 2 || !a.dtype().is(py::dtype::of<float>()))
        throw std::invalid_argument(std::string(name) + " must be a 2-D float32 array");
    if (a.shape(1) > 1 && a.strides(1) != sizeof(float))
        throw std::invalid_argument(std::string(name) + " must have contiguous rows");
    if (a.strides(0) % sizeof(float) != 0 || a.strides(0) < 0)
        throw std::invalid_argument(std::string(name) + " has an unsupported row stride");
    *rows = a.shape(0);
    *cols = a.shape(1);
    *ld = a.strides(0) / sizeof(float);
    return static_cast<const float*>(a.data());
}

// An output written in place: no conversion may happen (it would write into a copy).
template <class T>
T* output(py::array& a, std::int64_t size, const char* name, const char* what) {
    if (!a.dtype().is(py::dtype::of<T>()) || !(a.flags() & py::array::c_style) || !a.writeable() || a.size() != size)
        throw std::invalid_argument(std::string(name) + " must be a writeable C-contiguous " + what + " array");
    return static_cast<T*>(a.mutable_data());
}

// count_tile over numpy arrays; returns the band members as (rows, slots, columns, scores).
using Int64s = py::array_t<std::int64_t, py::array::c_style>;
using Floats = py::array_t<float, py::array::c_style>;

py::tuple count_tile(const py::array& scores, const Int64s& pieces, const Floats& lo, const Floats& hi,
                     const Int64s& slot_block, const Int64s& rel, py::array total, py::array own,
                     py::array topk_vals, py::array topk_ids, const Int64s& prio, std::int64_t col0, int threads) {
    hybridfast::ScoreTile tile{};
    tile.scores = row_major(scores, "scores", &tile.rows, &tile.width, &tile.ld);
    if (lo.ndim() != 2 || lo.shape(0) != tile.rows) throw std::invalid_argument("lo must be [rows, R]");
    const std::int64_t R = lo.shape(1), n = tile.rows * R;
    if (hi.size() != n || slot_block.size() != n || rel.size() != n)
        throw std::invalid_argument("hi, slot_block and rel must be [rows, R]");
    if (pieces.ndim() != 2 || pieces.shape(1) != 3) throw std::invalid_argument("pieces must be [n, 3]");
    const auto* piece = reinterpret_cast<const hybridfast::TilePiece*>(pieces.data());
    for (py::ssize_t p = 0; p < pieces.shape(0); ++p)
        if (piece[p].begin < 0 || piece[p].end < piece[p].begin || piece[p].end > tile.width)
            throw std::invalid_argument("pieces must lie inside the tile's columns");
    hybridfast::SlotBands bands{lo.data(), hi.data(), slot_block.data(), rel.data(), R};
    if (col0 < 0) throw std::invalid_argument("col0 must be >= 0");
    hybridfast::RunningTopK topk{};
    topk.k = topk_vals.ndim() == 2 ? topk_vals.shape(1) : 0;
    if (topk.k > 0) {
        topk.vals = output<float>(topk_vals, tile.rows * topk.k, "topk_vals", "float32 [rows, k]");
        topk.ids = output<std::int64_t>(topk_ids, tile.rows * topk.k, "topk_ids", "int64 [rows, k]");
        if (prio.size() < col0 + tile.width) throw std::invalid_argument("prio must cover the tile's columns");
        topk.prio = prio.data();
    }
    hybridfast::TileCounts out{output<std::int64_t>(total, n, "total", "int64 [rows, R]"),
                               output<std::int64_t>(own, n, "own", "int64 [rows, R]")};
    std::vector<hybridfast::BandMember> members;
    {
        py::gil_scoped_release release;  // every array stays referenced by this frame
        members = hybridfast::count_tile(tile, col0, piece, pieces.shape(0), bands, out, topk, std::max(1, threads));
    }
    const auto m = static_cast<py::ssize_t>(members.size());
    py::array_t<std::int64_t> rows(m), slots(m), columns(m);
    py::array_t<float> scores_out(m);
    for (py::ssize_t i = 0; i < m; ++i) {
        rows.mutable_data()[i] = members[i].row;
        slots.mutable_data()[i] = members[i].slot;
        columns.mutable_data()[i] = members[i].column;
        scores_out.mutable_data()[i] = members[i].score;
    }
    return py::make_tuple(rows, slots, columns, scores_out);
}

void widen_bf16(const py::array_t<std::uint16_t, py::array::c_style>& src, py::array dst, int threads) {
    float* d = output<float>(dst, src.size(), "dst", "float32 (src's size)");
    const std::uint16_t* s = src.data();
    py::gil_scoped_release release;
    hybridfast::widen_bf16(s, d, src.size(), std::max(1, threads));
}

}  // namespace

PYBIND11_MODULE(_C, m) {
    m.doc() = "hybridfast C++ cores (hybrid batch sampler, the exact search's counting pass)";
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
    m.def("count_tile", &count_tile, py::arg("scores"), py::arg("pieces"), py::arg("lo"), py::arg("hi"),
          py::arg("slot_block"), py::arg("rel"), py::arg("total"), py::arg("own"), py::arg("topk_vals"), py::arg("topk_ids"),
          py::arg("prio"), py::arg("col0"), py::arg("threads") = 1,
          "Counting pass of the tiles search over one float32 score tile [rows, width]: total/own\n"
          "(int64 [rows, R]) += #{s > hi} over the tile / the slot's block; the running top-k\n"
          "(topk_vals float32 / topk_ids int64 [rows, k], best first; k = 0: none) merged with the\n"
          "tile's columns col0 + c in trec_eval's order (score, then prio). Returns the band members\n"
          "(rows, slots, columns, scores): every s in [lo, hi] besides rel's own. pieces: int64\n"
          "[n, 3] (begin, end, block) column ranges of the tile. The GIL is released.");
    m.def("widen_bf16", &widen_bf16, py::arg("src"), py::arg("dst"), py::arg("threads") = 1,
          "bfloat16 bits (uint16) -> float32 into dst (same size, C-contiguous); the GIL is released.");
}
