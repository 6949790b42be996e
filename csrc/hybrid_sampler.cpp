// Hybrid batch sampler core; the algorithm and its invariants are described in
// hybrid_sampler.h. Any change here must be mirrored in hybridfast/sampler.py's
// reference_plan, which tests compare against this code slot for slot.
#include "hybrid_sampler.h"

#include <algorithm>
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

inline int popcount64(std::uint64_t x) {
#if defined(__GNUC__) || defined(__clang__)
    return __builtin_popcountll(x);
#else
    int n = 0;
    for (; x; x &= x - 1) ++n;
    return n;
#endif
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

// One epoch's planning state. kWords > 0 fixes the mask width at compile time
// (1 word covers up to 64 languages, the common case); 0 means `words_` words.
template <int kWords>
class Planner {
   public:
    Planner(const SamplerConfig& cfg, const std::uint8_t* avail, std::int64_t E, std::int64_t L,
            const std::int32_t* groups, std::int64_t num_groups)
        : cfg_(cfg), E_(E), L_(L), words_(kWords ? kWords : static_cast<int>((L + 63) / 64)),
          G_(cfg.batch_size * cfg.world_size), rng_(epoch_stream_base(cfg.seed, cfg.epoch)) {
        shuffle_positions();
        build_masks(avail);
        if (groups != nullptr) {
            group_.resize(static_cast<std::size_t>(E_));
            for (std::int64_t i = 0; i < E_; ++i) group_[i] = groups[perm_[i]];
            stamp_.assign(static_cast<std::size_t>(num_groups), 0);
        }
        rem_.assign(static_cast<std::size_t>(L_), 0);
        for (std::int64_t i = 0; i < E_; ++i) {
            for (int w = 0; w < words(); ++w)
                for (std::uint64_t m = mask(i)[w]; m; m &= m - 1) ++rem_[w * 64 + ctz64(m)];
            if (popcount(i) >= 2) ++rem_cross_;
        }
        cursor_.assign(static_cast<std::size_t>(L_), 0);
        mono_dead_.assign(static_cast<std::size_t>(L_), 0);
    }

    EpochPlan run() {
        EpochPlan plan;
        plan.slots = G_;
        // Every full step uses G distinct examples; at most one partial step follows.
        plan.data.reserve(static_cast<std::size_t>((E_ / G_ + 1) * G_ * 3));
        out_ = &plan.data;
        while (step()) ++plan.steps;
        if (!cfg_.drop_last && final_partial_step()) ++plan.steps;
        return plan;
    }

   private:
    int words() const { return kWords ? kWords : words_; }
    std::uint64_t* mask(std::int64_t i) { return &mask_[static_cast<std::size_t>(i) * words()]; }
    bool has(std::int64_t i, std::int64_t l) { return (mask(i)[l >> 6] >> (l & 63)) & 1ULL; }
    int popcount(std::int64_t i) {
        int n = 0;
        for (int w = 0; w < words(); ++w) n += popcount64(mask(i)[w]);
        return n;
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

    void shuffle_positions() {
        perm_.resize(static_cast<std::size_t>(E_));
        for (std::int64_t i = 0; i < E_; ++i) perm_[i] = static_cast<std::uint32_t>(i);
        for (std::int64_t i = E_ - 1; i > 0; --i) {
            std::uint64_t j = rng_.below(static_cast<std::uint64_t>(i + 1));
            std::swap(perm_[i], perm_[j]);
        }
    }

    void build_masks(const std::uint8_t* avail) {
        mask_.assign(static_cast<std::size_t>(E_) * words(), 0);
        constexpr std::int64_t kAhead = 16;  // rows are read in random order: prefetch
        for (std::int64_t i = 0; i < E_; ++i) {
#if defined(__GNUC__) || defined(__clang__)
            if (i + kAhead < E_) __builtin_prefetch(avail + static_cast<std::int64_t>(perm_[i + kAhead]) * L_);
#endif
            const std::uint8_t* row = avail + static_cast<std::int64_t>(perm_[i]) * L_;
            std::uint64_t* m = mask(i);
            for (std::int64_t l = 0; l < L_; ++l)
                m[l >> 6] |= static_cast<std::uint64_t>(row[l] != 0) << (l & 63);
        }
    }

    // Collects into picked_ the first `need` usable positions from `cursor` on, one
    // per group. On success moves the cursor to the first position it may still
    // need later (a group-skipped one, else just past the last pick).
    template <class Usable>
    bool fill(std::int64_t& cursor, std::int64_t need, Usable usable) {
        picked_.clear();
        ++attempt_;
        std::int64_t i = cursor, first_skip = -1;
        for (; i < E_ && static_cast<std::int64_t>(picked_.size()) < need; ++i) {
            if (!usable(i)) continue;
            if (!group_.empty()) {
                std::uint32_t& s = stamp_[group_[i]];
                if (s == attempt_) {
                    if (first_skip < 0) first_skip = i;
                    continue;
                }
                s = attempt_;
            }
            picked_.push_back(i);
        }
        if (static_cast<std::int64_t>(picked_.size()) < need) return false;
        cursor = first_skip >= 0 ? first_skip : i;
        return true;
    }

    bool fill_mono(std::int64_t l, std::int64_t& cursor, std::int64_t need) {
        return fill(cursor, need, [this, l](std::int64_t i) { return has(i, l); });
    }
    bool fill_cross(std::int64_t& cursor, std::int64_t need) {
        return fill(cursor, need, [this](std::int64_t i) { return popcount(i) >= 2; });
    }

    void consume(std::int64_t i) {
        std::uint64_t* m = mask(i);
        if (popcount(i) >= 2) --rem_cross_;
        for (int w = 0; w < words(); ++w) {
            for (std::uint64_t b = m[w]; b; b &= b - 1) --rem_[w * 64 + ctz64(b)];
            m[w] = 0;
        }
    }

    void emit_mono(std::int64_t l, std::int64_t count) {
        for (std::int64_t k = 0; k < count; ++k) {
            std::int64_t i = picked_[k];
            out_->push_back(static_cast<std::int32_t>(perm_[i]));
            out_->push_back(static_cast<std::int32_t>(l));
            out_->push_back(static_cast<std::int32_t>(l));
            consume(i);
        }
    }

    // Each slot: an ordered pair (x, y), x != y, uniform over the example's languages.
    void emit_cross(std::int64_t count) {
        for (std::int64_t k = 0; k < count; ++k) {
            std::int64_t i = picked_[k];
            std::uint64_t n = static_cast<std::uint64_t>(popcount(i));
            std::uint64_t r = rng_.below(n * (n - 1));
            int a = static_cast<int>(r / (n - 1)), b = static_cast<int>(r % (n - 1));
            if (b >= a) ++b;
            out_->push_back(static_cast<std::int32_t>(perm_[i]));
            out_->push_back(nth_language(i, a));
            out_->push_back(nth_language(i, b));
            consume(i);
        }
    }

    std::uint64_t weight(std::int64_t l) const {
        return cfg_.size_weights ? static_cast<std::uint64_t>(rem_[l]) : cfg_.lang_weights[l];
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
        out_->insert(out_->end(), static_cast<std::size_t>((G_ - n) * 3), -1);
        return true;
    }

    const SamplerConfig& cfg_;
    std::int64_t E_, L_;
    int words_;
    std::int64_t G_;
    Rng rng_;
    std::vector<std::uint32_t> perm_;   // position -> example
    std::vector<std::uint64_t> mask_;   // position -> unused languages (cleared once used)
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
    std::vector<std::int32_t>* out_ = nullptr;
};

void check_args(const SamplerConfig& cfg, std::int64_t E, std::int64_t L) {
    if (E < 1 || L < 1) throw std::invalid_argument("availability must have at least one row and one column");
    if (E > 0x7FFFFFFFLL) throw std::invalid_argument("availability: at most 2^31 - 1 examples (int32 plan)");
    if (cfg.batch_size < 1 || cfg.world_size < 1)
        throw std::invalid_argument("batch_size and world_size must be positive");
    if (!cfg.size_weights && static_cast<std::int64_t>(cfg.lang_weights.size()) != L)
        throw std::invalid_argument("lang_weights must have one weight per language");
}

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
