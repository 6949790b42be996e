// Hybrid batch sampler core: plans one epoch of (example, query_lang, passage_lang)
// slots for monolingual / cross-lingual / hybrid batches. Plain C++17, no Python.
//
// The algorithm is written so that a short pure-Python reference
// (hybridfast.sampler.reference_plan) reproduces it draw for draw:
//
//   1. Shuffle the examples (Fisher-Yates driven by the counter-based RNG below)
//      and work in that random order ("positions") from then on.
//   2. Lazy deletion: a position's language mask never changes; using it sets one
//      bit in a `used` bitset. Position-order bitsets (one per language, one for
//      "has >= 2 languages", built by 64x64 bit transposes) let a scan test 64
//      positions per word: "unused and available in l" = lang_bits[l] & ~used.
//   3. Each language and the cross-lingual kind own a cursor that only moves
//      forward over positions: a batch is the next G usable positions (skipping a
//      position whose group is already in the batch, without moving the cursor
//      past it). Without groups every word is scanned O(1) times per cursor:
//      O(E * L / 64) scanning per epoch plus O(E) for the shuffle and emission.
//   4. A step picks its kind (mono with probability mono_prob when both kinds can
//      fill a batch) and the mono language by integer weights, then fills.
//      A fill that fails can never succeed later (unused sets only shrink), so the
//      language (or the cross kind) drops out and the step is re-decided.
//   5. The epoch ends when no allowed kind can fill a batch; with drop_last off,
//      the largest partial batch of one option (mono languages in order, then
//      cross), rounded down to a multiple of world_size, is the final step.
//
// Determinism: only integer arithmetic on uint64 (splitmix64 stream, Lemire
// bounded integers); no std:: distributions, no floating point.
#pragma once

#include <cstdint>
#include <vector>

namespace hybridfast {

constexpr std::uint64_t kGolden = 0x9E3779B97F4A7C15ULL;

// splitmix64 finaliser of x + golden ratio (the k-th output of splitmix64 seeded at x - golden).
inline std::uint64_t splitmix64(std::uint64_t x) {
    x += kGolden;
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ULL;
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBULL;
    return x ^ (x >> 31);
}

// Counter-based stream: draw k (k = 0, 1, ...) is splitmix64(base + k * golden).
class Rng {
   public:
    explicit Rng(std::uint64_t base) : state_(base) {}
    std::uint64_t next() {
        std::uint64_t out = splitmix64(state_);
        state_ += kGolden;
        return out;
    }
    // Uniform integer in [0, n), n >= 1: Lemire's multiply-shift with rejection.
    std::uint64_t below(std::uint64_t n);

   private:
    std::uint64_t state_;
};

// The stream of one (seed, epoch).
inline std::uint64_t epoch_stream_base(std::uint64_t seed, std::uint64_t epoch) {
    return splitmix64(splitmix64(seed) + epoch);
}

struct SamplerConfig {
    std::int64_t batch_size = 1;    // per rank
    std::int64_t world_size = 1;
    bool allow_mono = true;
    bool allow_cross = true;
    // When both kinds can fill a batch: mono iff (next() >> 11) < mono_threshold,
    // i.e. P(mono) = mono_threshold / 2^53.
    std::uint64_t mono_threshold = 1ULL << 52;
    // Mono language weights: remaining examples per language ("size"), or fixed
    // integer weights (one per language; 0 = never a mono language).
    bool size_weights = false;
    // With size_weights: weight = rem^tau, tau = size_power / 2^32 in [0, 1] ("size^tau",
    // smoothed sampling); 2^32 is plain "size" (weight = rem exactly). See smoothed_size_weight.
    std::uint64_t size_power = 1ULL << 32;
    std::vector<std::uint64_t> lang_weights;
    bool drop_last = true;
    std::uint64_t seed = 0;
    std::uint64_t epoch = 0;
};

struct EpochPlan {
    std::int64_t steps = 0;
    std::int64_t slots = 0;  // world_size * batch_size
    // steps * slots * 3 int32: (example, query_lang, passage_lang); a final partial
    // batch is padded with -1.
    std::vector<std::int32_t> data;
};

// Smoothed size weight, integer arithmetic only (the same bits on every machine and in the
// Python twin, hybridfast.sampler._smoothed_weight): floor(2^16 * n^tau) up to the
// truncation of a 32-fraction-bit log2 and exp2, tau = power_q32 / 2^32 in [0, 1];
// n = 0 gives 0. log2 by repeated squaring of the Q62 mantissa; exp2 as a product of
// the Q62 constants floor(2^(2^-i) * 2^62), i = 1..32.
std::uint64_t smoothed_size_weight(std::uint64_t n, std::uint64_t power_q32);

// availability: row-major [num_examples, num_languages] of 0/1 bytes.
// groups: dense group ids in [0, num_groups) per example, or nullptr.
EpochPlan plan_epoch(const SamplerConfig& cfg, const std::uint8_t* availability,
                     std::int64_t num_examples, std::int64_t num_languages,
                     const std::int32_t* groups, std::int64_t num_groups);

// Largest batch each option can fill from a fresh epoch: for every language the
// number of distinct groups among its examples, then the same for examples with
// at least two languages (cross). Without groups every example is its own group.
std::vector<std::int64_t> fresh_capacities(const std::uint8_t* availability,
                                           std::int64_t num_examples, std::int64_t num_languages,
                                           const std::int32_t* groups, std::int64_t num_groups);

}  // namespace hybridfast
