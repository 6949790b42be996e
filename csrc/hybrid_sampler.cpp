// Hybrid batch sampler core; the algorithm and its invariants are described in
// hybrid_sampler.h. Any change here must be mirrored in hybridfast/sampler.py's
// reference_plan, which tests compare against this code slot for slot.
#include "hybrid_sampler.h"

#include <algorithm>
#include <cstring>
#include <stdexcept>

namespace hybridfast {

namespace {

// High and low 64 bits of a * b, portably (MSVC has no __int128).
inline void mul128(std::uint64_t a, std::uint64_t b, std::uint64_t& hi, std::uint64_t& lo) {
#if defined(__SIZEOF_INT128__)
    unsigned __int128 m = static_cast<unsigned __int128>(a) * b;
    hi = static_cast<std::uint64_t>(m >> 64);
    lo = static_cast<std::uint64_t>(m);
#else
    std::uint64_t a_lo = a & 0xFFFFFFFFULL, a_hi = a >> 32;
    std::uint64_t b_lo = b & 0xFFFFFFFFULL, b_hi = b >> 32;
    std::uint64_t p0 = a_lo * b_lo, p1 = a_lo * b_hi, p2 = a_hi * b_lo, p3 = a_hi * b_hi;
    std::uint64_t mid = (p0 >> 32) + (p1 & 0xFFFFFFFFULL) + (p2 & 0xFFFFFFFFULL);
    hi = p3 + (p1 >> 32) + (p2 >> 32) + (mid >> 32);
    lo = (mid << 32) | (p0 & 0xFFFFFFFFULL);
#endif
}

// SWAR popcount: without -mpopcnt, __builtin_popcountll is a libgcc call.
inline int popcount64(std::uint64_t x) {
    x = x - ((x >> 1) & 0x5555555555555555ULL);
    x = (x & 0x3333333333333333ULL) + ((x >> 2) & 0x3333333333333333ULL);
    x = (x + (x >> 4)) & 0x0F0F0F0F0F0F0F0FULL;
    return static_cast<int>((x * 0x0101010101010101ULL) >> 56);
}

inline int ctz64(std::uint64_t x) {
#if defined(__GNUC__) || defined(__clang__)
    return __builtin_ctzll(x);
#else
    int n = 0;
    for (; !(x & 1); x >>= 1) ++n;
    return n;
#endif
}

// In-place 64x64 bit-matrix transpose: bit j of a[i] becomes bit i of a[j]
// (recursive block swaps, 6 rounds of 32 masked exchanges).
void transpose64(std::uint64_t a[64]) {
    std::uint64_t m = 0x00000000FFFFFFFFULL;
    for (int j = 32; j != 0; j >>= 1, m ^= (m << j)) {
        for (int k = 0; k < 64; k = ((k | j) + 1) & ~j) {
            std::uint64_t t = ((a[k] >> j) ^ a[k | j]) & m;
            a[k] ^= t << j;
            a[k | j] ^= t;
        }
    }
}

// One epoch's planning state. kWords > 0 fixes the mask width at compile time
// (1 word covers up to 64 languages, the common case); 0 means `words_` words.
template <int kWords>
class Planner {
   public:
    Planner(const SamplerConfig& cfg, const std::uint8_t* avail, std::int64_t E, std::int64_t L,
            const std::int32_t* groups, std::int64_t num_groups)
        : cfg_(cfg), E_(E), L_(L), words_(kWords ? kWords : static_cast<int>((L + 63) / 64)),
          blocks_((E + 63) / 64), G_(cfg.batch_size * cfg.world_size), rng_(epoch_stream_base(cfg.seed, cfg.epoch)) {
        rem_.assign(static_cast<std::size_t>(L_), 0);
        {
            // Pack rows in example order (sequential reads of the big matrix), then
            // gather the small masks into position order.
            std::vector<std::uint64_t> by_example = pack_rows(avail);
            shuffle_positions();
            mask_.resize(static_cast<std::size_t>(E_) * words());
            constexpr std::int64_t kAhead = 16;  // random reads: prefetch ahead
            for (std::int64_t i = 0; i < E_; ++i) {
#if defined(__GNUC__) || defined(__clang__)
                if (i + kAhead < E_) __builtin_prefetch(&by_example[std::size_t(perm_[i + kAhead]) * words()]);
#endif
                const std::uint64_t* src = &by_example[std::size_t(perm_[i]) * words()];
                for (int w = 0; w < words(); ++w) mask(i)[w] = src[w];
            }
        }
        build_bitsets();
        if (groups != nullptr) {
            group_.resize(static_cast<std::size_t>(E_));
            for (std::int64_t i = 0; i < E_; ++i) group_[i] = groups[perm_[i]];
            stamp_.assign(static_cast<std::size_t>(num_groups), 0);
        }
        cursor_.assign(static_cast<std::size_t>(L_), 0);
        mono_dead_.assign(static_cast<std::size_t>(L_), 0);
    }

    EpochPlan run() {
        EpochPlan plan;
        plan.slots = G_;
        // Every full step uses G distinct examples; at most one partial step follows.
        plan.data.resize(static_cast<std::size_t>((E_ / G_ + 1) * G_ * 3));
        out_ = plan.data.data();
        while (step()) ++plan.steps;
        if (!cfg_.drop_last && final_partial_step()) ++plan.steps;
        plan.data.resize(static_cast<std::size_t>(out_ - plan.data.data()));
        return plan;
    }

   private:
    int words() const { return kWords ? kWords : words_; }
    std::uint64_t* mask(std::int64_t i) { return &mask_[static_cast<std::size_t>(i) * words()]; }
    int popcount(std::int64_t i) {
        int n = 0;
        for (int w = 0; w < words(); ++w) n += popcount64(mask(i)[w]);
        return n;
    }
    // At least two languages (a cross-lingual candidate).
    bool multilingual(std::int64_t i) {
        if (kWords == 1) return (mask(i)[0] & (mask(i)[0] - 1)) != 0;
        return popcount(i) >= 2;
    }
    // Language index of the n-th (0-based) set bit of position i.
    std::int32_t nth_language(std::int64_t i, int n) {
        for (int w = 0;; ++w) {
            std::uint64_t m = mask(i)[w];
            int c = popcount64(m);
            if (n < c) {
                for (; n > 0; --n) m &= m - 1;
                return static_cast<std::int32_t>(w * 64 + ctz64(m));
            }
            n -= c;
        }
    }

    // Fisher-Yates from the back, j = below(i + 1). The swap targets are random
    // memory accesses: draw them kAhead steps early (same draws, same order) and
    // prefetch, so the cache misses overlap.
    void shuffle_positions() {
        perm_.resize(static_cast<std::size_t>(E_));
        for (std::int64_t i = 0; i < E_; ++i) perm_[i] = static_cast<std::uint32_t>(i);
        constexpr std::int64_t kAhead = 32;
        std::uint64_t ring[kAhead];
        std::int64_t drawn = E_ - 1;  // the next i whose j is not drawn yet
        auto draw_until = [&](std::int64_t last) {
            for (; drawn > 0 && drawn >= last; --drawn) {
                std::uint64_t j = rng_.below(static_cast<std::uint64_t>(drawn + 1));
                ring[drawn % kAhead] = j;
#if defined(__GNUC__) || defined(__clang__)
                __builtin_prefetch(&perm_[j], 1);
#endif
            }
        };
        for (std::int64_t i = E_ - 1; i > 0; --i) {
            draw_until(i - kAhead + 1);
            std::swap(perm_[i], perm_[ring[i % kAhead]]);
        }
    }

    // Up to 8 availability bytes as one little-endian word, each byte 0 or 1.
    static std::uint64_t load_flags(const std::uint8_t* p, std::int64_t n) {
        std::uint64_t x = 0;
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
        if (n == 8) {
            std::memcpy(&x, p, 8);  // a constant size compiles to one load
        } else {
            for (std::int64_t k = 0; k < n; ++k) x |= static_cast<std::uint64_t>(p[k]) << (8 * k);
        }
#else
        for (std::int64_t k = 0; k < n; ++k) x |= static_cast<std::uint64_t>(p[k]) << (8 * k);
#endif
        // Any nonzero byte -> 1 (high bit of (b & 0x7F) + 0x7F, or b's own high bit).
        x = (((x & 0x7F7F7F7F7F7F7F7FULL) + 0x7F7F7F7F7F7F7F7FULL) | x) >> 7;
        return x & 0x0101010101010101ULL;
    }

    // One bit mask per example (example order). Also counts rem_ (per language) and
    // rem_cross_, with byte-lane counters flushed every 255 rows.
    std::vector<std::uint64_t> pack_rows(const std::uint8_t* avail) {
        const std::int64_t chunks = (L_ + 7) / 8;
        std::vector<std::uint64_t> packed(static_cast<std::size_t>(E_) * words(), 0), lanes(chunks, 0);
        auto flush = [&]() {
            for (std::int64_t c = 0; c < chunks; ++c) {
                for (std::int64_t t = 0; t < 8 && 8 * c + t < L_; ++t) rem_[8 * c + t] += (lanes[c] >> (8 * t)) & 0xFF;
                lanes[c] = 0;
            }
        };
        for (std::int64_t e = 0; e < E_; ++e) {
            const std::uint8_t* row = avail + e * L_;
            std::uint64_t* out = &packed[static_cast<std::size_t>(e) * words()];
            int languages = 0;
            for (std::int64_t c = 0; c < chunks; ++c) {
                std::uint64_t x = load_flags(row + 8 * c, std::min<std::int64_t>(8, L_ - 8 * c));
                lanes[c] += x;
                // Byte k's low bit lands on bit 56 + k: a movemask of the 0/1 bytes.
                std::uint64_t bits = (x * 0x0102040810204080ULL) >> 56;
                out[c / 8] |= bits << (8 * (c % 8));
                languages += popcount64(bits);
            }
            rem_cross_ += languages >= 2;
            if (e % 255 == 254) flush();
        }
        flush();
        return packed;
    }

    // Position-order bitsets for the cursors' scans: one per language plus one for
    // "at least two languages", 64 positions per word, built by transposing blocks
    // of 64 masks. A scan then skips 64 unusable positions per word.
    void build_bitsets() {
        lang_bits_.assign(static_cast<std::size_t>(L_ * blocks_), 0);
        multi_bits_.assign(static_cast<std::size_t>(blocks_), 0);
        used_.assign(static_cast<std::size_t>(blocks_), 0);
        std::uint64_t block[64];
        for (std::int64_t b = 0; b < blocks_; ++b) {
            std::uint64_t ones = 0, twos = 0;  // positions with >= 1, >= 2 languages
            for (int w = 0; w < words(); ++w) {
                for (std::int64_t k = 0; k < 64; ++k) {
                    std::int64_t i = 64 * b + k;
                    block[k] = i < E_ ? mask(i)[w] : 0;
                }
                transpose64(block);
                const std::int64_t languages = std::min<std::int64_t>(64, L_ - 64 * w);
                for (std::int64_t t = 0; t < languages; ++t) {
                    lang_bits_[static_cast<std::size_t>((64 * w + t) * blocks_ + b)] = block[t];
                    twos |= ones & block[t];
                    ones |= block[t];
                }
            }
            multi_bits_[static_cast<std::size_t>(b)] = twos;
        }
    }

    // Collects into picked_ the first `need` unused positions of `bits` from `cursor`
    // on, one per group. On success moves the cursor to the first position it may
    // still need later (a group-skipped one, else just past the last pick).
    bool fill(std::int64_t& cursor, std::int64_t need, const std::uint64_t* bits) {
        picked_.resize(static_cast<std::size_t>(need));
        std::int64_t* picked = picked_.data();
        std::int64_t count = 0, first_skip = -1, last = -1;
        std::int64_t b = cursor >> 6;
        if (need > 0 && b < blocks_) {
            ++attempt_;
            std::uint64_t word = bits[b] & ~used_[b] & (~0ULL << (cursor & 63));
            for (;;) {
                while (word == 0) {
                    if (++b == blocks_) goto scanned;
                    word = bits[b] & ~used_[b];
                }
                const std::int64_t i = (b << 6) | ctz64(word);
                word &= word - 1;
                if (!group_.empty()) {
                    std::uint32_t& s = stamp_[group_[i]];
                    if (s == attempt_) {
                        if (first_skip < 0) first_skip = i;
                        continue;
                    }
                    s = attempt_;
                }
                picked[count++] = i;
                if (count == need) {
                    last = i;
                    break;
                }
            }
        }
    scanned:
        picked_.resize(static_cast<std::size_t>(count));
        if (count < need) return false;
        cursor = first_skip >= 0 ? first_skip : last + 1;
        return true;
    }

    bool fill_mono(std::int64_t l, std::int64_t& cursor, std::int64_t need) {
        return fill(cursor, need, &lang_bits_[static_cast<std::size_t>(l * blocks_)]);
    }
    bool fill_cross(std::int64_t& cursor, std::int64_t need) { return fill(cursor, need, multi_bits_.data()); }

    // Marks the first `count` picked positions used (a bit in used_) and takes them
    // off rem_ / rem_cross_. Per-language decrements go through byte lanes
    // (8 languages per word, flushed every 255 examples) instead of one
    // read-modify-write per language per example.
    void consume_picked(std::int64_t count) {
        static const std::vector<std::uint64_t> spread = [] {  // bit t of b -> byte t
            std::vector<std::uint64_t> table(256, 0);
            for (int b = 0; b < 256; ++b)
                for (int t = 0; t < 8; ++t) table[b] |= static_cast<std::uint64_t>((b >> t) & 1) << (8 * t);
            return table;
        }();
        const std::int64_t chunks = (L_ + 7) / 8;
        lanes_.assign(static_cast<std::size_t>(chunks), 0);
        auto flush = [&]() {
            for (std::int64_t c = 0; c < chunks; ++c) {
                for (std::int64_t t = 0; t < 8 && 8 * c + t < L_; ++t)
                    rem_[8 * c + t] -= static_cast<std::int64_t>((lanes_[c] >> (8 * t)) & 0xFF);
                lanes_[c] = 0;
            }
        };
        for (std::int64_t k = 0; k < count; ++k) {
            const std::int64_t i = picked_[k];
            if (multilingual(i)) --rem_cross_;
            const std::uint64_t* m = mask(i);
            for (std::int64_t c = 0; c < chunks; ++c) lanes_[c] += spread[(m[c / 8] >> (8 * (c % 8))) & 0xFF];
            used_[static_cast<std::size_t>(i >> 6)] |= 1ULL << (i & 63);
            if (k % 255 == 254) flush();
        }
        flush();
    }

    void emit_mono(std::int64_t l, std::int64_t count) {
        for (std::int64_t k = 0; k < count; ++k) {
            *out_++ = static_cast<std::int32_t>(perm_[picked_[k]]);
            *out_++ = static_cast<std::int32_t>(l);
            *out_++ = static_cast<std::int32_t>(l);
        }
        consume_picked(count);
    }

    // Each slot: an ordered pair (x, y), x != y, uniform over the example's languages.
    void emit_cross(std::int64_t count) {
        for (std::int64_t k = 0; k < count; ++k) {
            std::int64_t i = picked_[k];
            std::uint64_t n = static_cast<std::uint64_t>(popcount(i));
            std::uint64_t r = rng_.below(n * (n - 1));
            int a = static_cast<int>(r / (n - 1)), b = static_cast<int>(r % (n - 1));
            if (b >= a) ++b;
            *out_++ = static_cast<std::int32_t>(perm_[i]);
            *out_++ = nth_language(i, a);
            *out_++ = nth_language(i, b);
        }
        consume_picked(count);
    }

    std::uint64_t weight(std::int64_t l) const {
        if (!cfg_.size_weights) return cfg_.lang_weights[l];
        const std::uint64_t rem = static_cast<std::uint64_t>(rem_[l]);
        return cfg_.size_power == (1ULL << 32) ? rem : smoothed_size_weight(rem, cfg_.size_power);
    }

    // Plans one full step; false when no allowed kind can fill a batch.
    bool step() {
        for (;;) {
            std::uint64_t total = 0;
            if (cfg_.allow_mono)
                for (std::int64_t l = 0; l < L_; ++l)
                    if (!mono_dead_[l] && rem_[l] >= G_) total += weight(l);
            bool mono_ok = total > 0;
            bool cross_ok = cfg_.allow_cross && !cross_dead_ && rem_cross_ >= G_;
            if (!mono_ok && !cross_ok) return false;
            bool mono = mono_ok;
            if (mono_ok && cross_ok) mono = (rng_.next() >> 11) < cfg_.mono_threshold;
            if (mono) {
                std::uint64_t r = rng_.below(total);
                std::int64_t l = 0;
                for (;; ++l) {
                    if (mono_dead_[l] || rem_[l] < G_) continue;
                    std::uint64_t w = weight(l);
                    if (r < w) break;
                    r -= w;
                }
                if (!fill_mono(l, cursor_[l], G_)) {
                    mono_dead_[l] = 1;  // too few distinct groups left: never again
                    continue;
                }
                emit_mono(l, G_);
            } else {
                if (!fill_cross(cross_cursor_, G_)) {
                    cross_dead_ = true;
                    continue;
                }
                emit_cross(G_);
            }
            return true;
        }
    }

    // drop_last=false: the largest partial batch of one option, a multiple of world_size.
    bool final_partial_step() {
        std::int64_t best_count = 0, best_option = -1;  // option L = cross
        for (std::int64_t option = 0; option <= L_; ++option) {
            std::int64_t cursor;
            if (option < L_) {
                if (!cfg_.allow_mono || weight(option) == 0) continue;
                cursor = cursor_[option];
                fill_mono(option, cursor, G_);
            } else {
                if (!cfg_.allow_cross) continue;
                cursor = cross_cursor_;
                fill_cross(cursor, G_);
            }
            std::int64_t count = static_cast<std::int64_t>(picked_.size());
            if (count > best_count) best_count = count, best_option = option;
        }
        std::int64_t n = best_count - best_count % cfg_.world_size;
        if (n == 0) return false;
        std::int64_t cursor;
        if (best_option < L_) {
            cursor = cursor_[best_option];
            fill_mono(best_option, cursor, G_);
            emit_mono(best_option, n);
        } else {
            cursor = cross_cursor_;
            fill_cross(cursor, G_);
            emit_cross(n);
        }
        out_ = std::fill_n(out_, (G_ - n) * 3, -1);
        return true;
    }

    const SamplerConfig& cfg_;
    std::int64_t E_, L_;
    int words_;
    std::int64_t blocks_;  // 64-position words per bitset
    std::int64_t G_;
    Rng rng_;
    std::vector<std::uint32_t> perm_;   // position -> example
    std::vector<std::uint64_t> mask_;   // position -> its languages (words() words)
    std::vector<std::uint64_t> lang_bits_;   // [language][block]: position has the language
    std::vector<std::uint64_t> multi_bits_;  // [block]: position has >= 2 languages
    std::vector<std::uint64_t> used_;        // [block]: position already in a batch
    std::vector<std::int32_t> group_;   // position -> dense group id (empty: no groups)
    std::vector<std::uint32_t> stamp_;  // group -> last fill attempt that took it
    std::uint32_t attempt_ = 0;
    std::vector<std::int64_t> rem_;     // unused examples per language
    std::int64_t rem_cross_ = 0;        // unused examples with >= 2 languages
    std::vector<std::int64_t> cursor_;
    std::int64_t cross_cursor_ = 0;
    std::vector<char> mono_dead_;
    bool cross_dead_ = false;
    std::vector<std::int64_t> picked_;
    std::vector<std::uint64_t> lanes_;  // consume_picked's byte-lane counters
    std::int32_t* out_ = nullptr;  // next free int of the plan (sized for the bound above)
};

void check_args(const SamplerConfig& cfg, std::int64_t E, std::int64_t L) {
    if (E < 1 || L < 1) throw std::invalid_argument("availability must have at least one row and one column");
    if (E > 0x7FFFFFFFLL) throw std::invalid_argument("availability: at most 2^31 - 1 examples (int32 plan)");
    if (cfg.batch_size < 1 || cfg.world_size < 1)
        throw std::invalid_argument("batch_size and world_size must be positive");
    if (cfg.batch_size > 0x7FFFFFFFLL / cfg.world_size)
        throw std::invalid_argument("batch_size * world_size must be below 2^31");
    if (!cfg.size_weights && static_cast<std::int64_t>(cfg.lang_weights.size()) != L)
        throw std::invalid_argument("lang_weights must have one weight per language");
    if (cfg.size_power > (1ULL << 32)) throw std::invalid_argument("size_power must be in [0, 2^32] (tau <= 1)");
    if (cfg.size_weights && cfg.size_power != (1ULL << 32) && L > (1LL << 16))
        throw std::invalid_argument("size^tau weights: at most 65536 languages (the weight sum is 64-bit)");
}

// floor(2^(2^-i) * 2^62), i = 1..32 (exact integer square roots at 256 bits).
constexpr std::uint64_t kExp2Q62[32] = {
    0x5a827999fcef3242ULL, 0x4c1bf828c6dc54b7ULL, 0x45cae0f1f545eb73ULL, 0x42d561b3e6243d8aULL,
    0x4166c34c5615d0ebULL, 0x40b268f9de0183b9ULL, 0x4058f6a7ecccd5b6ULL, 0x402c6be96af2fb58ULL,
    0x4016321b687027a8ULL, 0x400b18178ba33b14ULL, 0x40058bce410147e8ULL, 0x4002c5d7bff71daeULL,
    0x400162e807ee7e5bULL, 0x4000b1730df6a524ULL, 0x400058b9497b8151ULL, 0x40002c5c955dd701ULL,
    0x4000162e46d6f26bULL, 0x40000b1722757b1bULL, 0x4000058b90fd3e0cULL, 0x400002c5c86f3f26ULL,
    0x40000162e433c79bULL, 0x400000b17218edcfULL, 0x40000058b90c3968ULL, 0x4000002c5c860d54ULL,
    0x400000162e4302d2ULL, 0x4000000b17218073ULL, 0x400000058b90bffcULL, 0x40000002c5c85feeULL,
    0x4000000162e42ff3ULL, 0x40000000b17217f8ULL, 0x4000000058b90bfcULL, 0x400000002c5c85feULL};

}  // namespace

std::uint64_t Rng::below(std::uint64_t n) {
    std::uint64_t hi, lo;
    mul128(next(), n, hi, lo);
    if (lo < n) {
        std::uint64_t threshold = (0 - n) % n;  // 2^64 mod n
        while (lo < threshold) mul128(next(), n, hi, lo);
    }
    return hi;
}

std::uint64_t smoothed_size_weight(std::uint64_t n, std::uint64_t power_q32) {
    // n <= 2^31 here (rem of an int32-indexed plan), so tau * log2(n) < 32 and the final
    // shift below is >= 16.
    if (n == 0) return 0;
    // log2(n) in Q32: integer part, then 32 fraction bits of the mantissa x in [1, 2) (Q62)
    int msb = 63 - __builtin_clzll(n);
    std::uint64_t x = n << (62 - msb);  // msb <= 31
    std::uint64_t frac = 0, hi, lo;
    for (int i = 0; i < 32; ++i) {
        mul128(x, x, hi, lo);
        x = (hi << 2) | (lo >> 62);  // x * x / 2^62, in [2^62, 2^64)
        frac <<= 1;
        if (x >> 63) {
            frac |= 1;
            x >>= 1;
        }
    }
    const std::uint64_t log2_q32 = (static_cast<std::uint64_t>(msb) << 32) | frac;
    // y = tau * log2(n) in Q32 (a 128-bit product)
    mul128(power_q32, log2_q32, hi, lo);
    const std::uint64_t y = (hi << 32) | (lo >> 32);
    const std::uint64_t ip = y >> 32, f = y & 0xFFFFFFFFULL;
    std::uint64_t r = 1ULL << 62;  // 2^frac(y) in Q62
    for (int i = 1; i <= 32; ++i) {
        if ((f >> (32 - i)) & 1) {
            mul128(r, kExp2Q62[i - 1], hi, lo);
            r = (hi << 2) | (lo >> 62);
        }
    }
    return r >> (62 - 16 - ip);  // 2^16 * 2^ip * r / 2^62
}

EpochPlan plan_epoch(const SamplerConfig& cfg, const std::uint8_t* availability,
                     std::int64_t num_examples, std::int64_t num_languages,
                     const std::int32_t* groups, std::int64_t num_groups) {
    check_args(cfg, num_examples, num_languages);
    if (num_languages <= 64)
        return Planner<1>(cfg, availability, num_examples, num_languages, groups, num_groups).run();
    return Planner<0>(cfg, availability, num_examples, num_languages, groups, num_groups).run();
}

std::vector<std::int64_t> fresh_capacities(const std::uint8_t* availability,
                                           std::int64_t num_examples, std::int64_t num_languages,
                                           const std::int32_t* groups, std::int64_t num_groups) {
    const std::int64_t E = num_examples, L = num_languages;
    std::vector<std::int64_t> cap(static_cast<std::size_t>(L + 1), 0);
    auto languages_of = [&](std::int64_t e) {
        std::int64_t n = 0;
        for (std::int64_t l = 0; l < L; ++l) n += availability[e * L + l] != 0;
        return n;
    };
    if (groups == nullptr) {  // one pass over the rows
        for (std::int64_t e = 0; e < E; ++e) {
            for (std::int64_t l = 0; l < L; ++l) cap[l] += availability[e * L + l] != 0;
            cap[L] += languages_of(e) >= 2;
        }
        return cap;
    }
    // Distinct groups per option, one option at a time with one stamp per group
    // (a groups x options table could be far larger than the data).
    std::vector<std::int64_t> stamp(static_cast<std::size_t>(num_groups), -1);
    for (std::int64_t option = 0; option <= L; ++option) {
        for (std::int64_t e = 0; e < E; ++e) {
            bool usable = option < L ? availability[e * L + option] != 0 : languages_of(e) >= 2;
            if (!usable || stamp[groups[e]] == option) continue;
            stamp[groups[e]] = option;
            ++cap[option];
        }
    }
    return cap;
}

}  // namespace hybridfast
