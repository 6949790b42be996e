// Counting pass of the exact search's "tiles" engine (hybridfast/evaluation/tiles.py): one
// read of a float32 score tile per relevant slot, instead of numpy's two compares, two
// row sums and a mask per slot. Plain C++17, no Python: bindings.cpp converts the arrays.
#pragma once

#include <cstdint>
#include <vector>

namespace hybridfast {

// Columns [begin, end) of a tile (relative to its first column) that belong to one block.
struct TilePiece {
    std::int64_t begin, end, block;
};
static_assert(sizeof(TilePiece) == 3 * sizeof(std::int64_t), "bindings.cpp reads int64 [n, 3] rows as TilePieces");

// Scores of one query tile against one candidate tile: rows x width floats, row stride ld.
struct ScoreTile {
    const float* scores;
    std::int64_t rows, width, ld;
};

// Per relevant slot (row-major rows x R): the band [lo, hi] around the relevant candidate's
// score (+inf for padding), the block it lives in and its column (candidate id).
struct SlotBands {
    const float* lo;
    const float* hi;
    const std::int64_t* block;
    const std::int64_t* column;
    std::int64_t R;
};

// A score in a slot's band [lo, hi] other than the relevant candidate's own: the caller
// resolves it exactly once the relevant candidate's score is known.
struct BandMember {
    std::int64_t row, slot, column;
    float score;
};

// What one tile adds. total/own: += #{s > hi} over the tile / over the slot's own block.
struct TileCounts {
    std::int64_t* total;
    std::int64_t* own;
};

// The running top-k of every row (rows x k, best first; id -1 and -inf pad an unfilled list),
// in trec_eval's order: score descending, then priority descending (prio[id]). k == 0: none.
struct RunningTopK {
    float* vals;
    std::int64_t* ids;
    std::int64_t k;
    const std::int64_t* prio;
};

// col0: the candidate id of the tile's first column.
// Returns the tile's band members, by row.
std::vector<BandMember> count_tile(const ScoreTile& tile, std::int64_t col0, const TilePiece* pieces,
                                   std::int64_t num_pieces, const SlotBands& bands, const TileCounts& out,
                                   const RunningTopK& topk, int threads);

// dst[i] = the float32 whose top 16 bits are src[i] (bfloat16 -> float32, exact).
void widen_bf16(const std::uint16_t* src, float* dst, std::int64_t n, int threads);

}  // namespace hybridfast
