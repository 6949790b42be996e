// See tile_count.h. The loops are written so that the compiler vectorises them (a compare
// yields 0/1 added to an int counter); target_clones builds AVX-512 and AVX2 variants picked
// at load time, since the extension itself is compiled for the baseline x86-64.
#include "tile_count.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <exception>
#include <system_error>
#include <thread>
#include <vector>

#if defined(__GNUC__) && defined(__x86_64__) && defined(__linux__)
#define HF_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define HF_CLONES
#endif

namespace hybridfast {
namespace {

// #{s > hi} and #{s >= lo} of s[0:n) in one read. n is a tile width (<= 2^31).
HF_CLONES void count_above(const float* s, std::int64_t n, float lo, float hi, std::int64_t* gt,
                           std::int64_t* ge) {
    std::int32_t g = 0, e = 0;
    for (std::int64_t i = 0; i < n; ++i) {
        g += s[i] > hi;
        e += s[i] >= lo;
    }
    *gt = g;
    *ge = e;
}

HF_CLONES std::int32_t count_at_least(const float* s, std::int64_t n, float t) {
    std::int32_t c = 0;
    for (std::int64_t i = 0; i < n; ++i) c += s[i] >= t;
    return c;
}

// Merge one row of scores into its running top-k. Most blocks of 64 hold nothing >= the
// current k-th score (a vectorised count says so); only the others are walked one by one.
void merge_row(const float* s, std::int64_t n, std::int64_t col0, const RunningTopK& topk, float* vals,
               std::int64_t* ids) {
    const std::int64_t k = topk.k;
    auto prio_of = [&](std::int64_t id) { return id < 0 ? std::int64_t(-1) : topk.prio[id]; };
    constexpr std::int64_t kBlock = 64;
    for (std::int64_t b0 = 0; b0 < n; b0 += kBlock) {
        const std::int64_t b1 = std::min(n, b0 + kBlock);
        if (count_at_least(s + b0, b1 - b0, vals[k - 1]) == 0) continue;
        for (std::int64_t i = b0; i < b1; ++i) {
            const float v = s[i];
            if (v < vals[k - 1]) continue;
            const std::int64_t id = col0 + i, p = topk.prio[id];
            // ranked before the k-th? (score, then priority: trec_eval's order)
            if (v == vals[k - 1] && p <= prio_of(ids[k - 1])) continue;
            std::int64_t pos = k - 1;
            while (pos > 0 && (v > vals[pos - 1] || (v == vals[pos - 1] && p > prio_of(ids[pos - 1])))) {
                vals[pos] = vals[pos - 1];
                ids[pos] = ids[pos - 1];
                --pos;
            }
            vals[pos] = v;
            ids[pos] = id;
        }
    }
}

HF_CLONES void widen_range(const std::uint16_t* src, float* dst, std::int64_t n) {
    for (std::int64_t i = 0; i < n; ++i) {
        const std::uint32_t bits = std::uint32_t(src[i]) << 16;
        std::memcpy(dst + i, &bits, sizeof bits);  // a bit copy, not a conversion
    }
}

// Sure counts of one slot over columns [begin, end) of a row; band members listed as found.
// The count runs in chunks so that a chunk holding band members is walked again while in L1.
std::int64_t count_slot(const float* s, std::int64_t begin, std::int64_t end, float lo, float hi,
                        std::int64_t own_col, std::int64_t row, std::int64_t slot, std::int64_t col0,
                        std::vector<BandMember>& members) {
    constexpr std::int64_t kChunk = 1024;
    std::int64_t sure = 0;
    for (std::int64_t c0 = begin; c0 < end; c0 += kChunk) {
        const std::int64_t c1 = std::min(end, c0 + kChunk);
        std::int64_t gt = 0, ge = 0;
        count_above(s + c0, c1 - c0, lo, hi, &gt, &ge);
        sure += gt;
        if (ge == gt) continue;  // nothing in [lo, hi]: the common case
        for (std::int64_t c = c0; c < c1; ++c)
            if (s[c] >= lo && s[c] <= hi && c != own_col) members.push_back({row, slot, col0 + c, s[c]});
    }
    return sure;
}

void count_rows(const ScoreTile& tile, std::int64_t col0, const TilePiece* pieces, std::int64_t num_pieces,
                const SlotBands& bands, const TileCounts& out, const RunningTopK& topk, std::int64_t r0,
                std::int64_t r1, std::vector<BandMember>& members) {
    const std::int64_t R = bands.R;
    for (std::int64_t r = r0; r < r1; ++r) {
        const float* s = tile.scores + r * tile.ld;
        for (std::int64_t j = 0; j < R; ++j) {
            const std::int64_t slot = r * R + j;
            const float lo = bands.lo[slot], hi = bands.hi[slot];
            if (std::isinf(lo) && lo > 0) continue;  // padding: no finite score reaches +inf
            const std::int64_t own_col = bands.column[slot] - col0;  // r itself is no band member
            for (std::int64_t p = 0; p < num_pieces; ++p) {
                const std::int64_t sure =
                    count_slot(s, pieces[p].begin, pieces[p].end, lo, hi, own_col, r, j, col0, members);
                out.total[slot] += sure;
                if (pieces[p].block == bands.block[slot]) out.own[slot] += sure;
            }
        }
        if (topk.k > 0) merge_row(s, tile.width, col0, topk, topk.vals + r * topk.k, topk.ids + r * topk.k);
    }
}

// How many parts parallel_ranges splits n items into: at most `threads`, each >= min_per_part.
std::int64_t num_parts(std::int64_t n, int threads, std::int64_t min_per_part) {
    return std::max<std::int64_t>(1, std::min<std::int64_t>(threads, n / min_per_part));
}

// Runs body(part, begin, end) over [0, n) split into num_parts contiguous parts, one thread
// each (the caller's thread takes part 0). Every thread is joined before an exception (say
// std::bad_alloc) leaves, and the first one is rethrown: pybind11 turns it into a Python error
// instead of std::terminate.
template <class Body>
void parallel_ranges(std::int64_t n, int threads, std::int64_t min_per_part, Body body) {
    const std::int64_t parts = num_parts(n, threads, min_per_part);
    if (parts == 1) return body(0, 0, n);
    std::vector<std::exception_ptr> errors(parts);
    auto guarded = [&](std::int64_t p, std::int64_t a, std::int64_t b) {
        try {
            body(p, a, b);
        } catch (...) {
            errors[p] = std::current_exception();
        }
    };
    std::vector<std::thread> pool;
    const std::int64_t step = (n + parts - 1) / parts;
    for (std::int64_t p = 1; p < parts; ++p) {
        const std::int64_t a = std::min(n, p * step), b = std::min(n, (p + 1) * step);
        try {
            pool.emplace_back(guarded, p, a, b);
        } catch (const std::system_error&) {  // no thread to be had: this one does the part
            guarded(p, a, b);
        }
    }
    guarded(0, 0, std::min(n, step));
    for (auto& t : pool) t.join();
    for (auto& e : errors)
        if (e) std::rethrow_exception(e);
}

}  // namespace

std::vector<BandMember> count_tile(const ScoreTile& tile, std::int64_t col0, const TilePiece* pieces,
                                   std::int64_t num_pieces, const SlotBands& bands, const TileCounts& out,
                                   const RunningTopK& topk, int threads) {
    constexpr std::int64_t kMinRows = 16;
    // one list per part of the rows, joined in row order
    std::vector<std::vector<BandMember>> parts(num_parts(tile.rows, threads, kMinRows));
    parallel_ranges(tile.rows, threads, kMinRows, [&](std::int64_t part, std::int64_t r0, std::int64_t r1) {
        count_rows(tile, col0, pieces, num_pieces, bands, out, topk, r0, r1, parts[part]);
    });
    std::vector<BandMember> members;
    for (auto& p : parts) members.insert(members.end(), p.begin(), p.end());
    return members;
}

void widen_bf16(const std::uint16_t* src, float* dst, std::int64_t n, int threads) {
    parallel_ranges(n, threads, 1 << 18,
                    [&](std::int64_t, std::int64_t a, std::int64_t b) { widen_range(src + a, dst + a, b - a); });
}

}  // namespace hybridfast
