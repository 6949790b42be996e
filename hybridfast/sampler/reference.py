"""The plain-Python twin of the C++ sampler core (csrc/hybrid_sampler.cpp): the same
state and the same draws, slot for slot. HybridBatchSampler plans with it when
hybridfast._C is not built, and the tests compare the two (hybridfast.sampler.hybrid's
docstring has the algorithm). Integer arithmetic only, like the core.
"""
from typing import List

import numpy as np

_MASK = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15


# ---------------------------------------------------------------- random numbers
def splitmix64(x: int) -> int:
    """splitmix64 finaliser of x + golden ratio (same as hybridfast._C.splitmix64)."""
    x = (x + _GOLDEN) & _MASK
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK
    return x ^ (x >> 31)


def _stream_base(seed: int, epoch: int) -> int:
    return splitmix64((splitmix64(seed & _MASK) + epoch) & _MASK)


class _Rng:
    """Counter-based stream: draw k is splitmix64(base + k * golden)."""

    def __init__(self, base: int):
        self.state = base

    def next(self) -> int:
        out = splitmix64(self.state)
        self.state = (self.state + _GOLDEN) & _MASK
        return out

    def below(self, n: int) -> int:
        """Uniform integer in [0, n), n >= 1 (Lemire: multiply-shift with rejection)."""
        m = self.next() * n
        if m & _MASK < n:
            threshold = ((1 << 64) - n) % n
            while m & _MASK < threshold:
                m = self.next() * n
        return m >> 64


def _popcount(m: int) -> int:
    return bin(m).count("1")


# ---------------------------------------------------------------- smoothed size weights
_ONE_Q32 = 1 << 32
# floor(2^(2^-i) * 2^62), i = 1..32 (the C++ core's kExp2Q62; tests recompute them with isqrt)
_EXP2_Q62 = (
    0x5a827999fcef3242, 0x4c1bf828c6dc54b7, 0x45cae0f1f545eb73, 0x42d561b3e6243d8a,
    0x4166c34c5615d0eb, 0x40b268f9de0183b9, 0x4058f6a7ecccd5b6, 0x402c6be96af2fb58,
    0x4016321b687027a8, 0x400b18178ba33b14, 0x40058bce410147e8, 0x4002c5d7bff71dae,
    0x400162e807ee7e5b, 0x4000b1730df6a524, 0x400058b9497b8151, 0x40002c5c955dd701,
    0x4000162e46d6f26b, 0x40000b1722757b1b, 0x4000058b90fd3e0c, 0x400002c5c86f3f26,
    0x40000162e433c79b, 0x400000b17218edcf, 0x40000058b90c3968, 0x4000002c5c860d54,
    0x400000162e4302d2, 0x4000000b17218073, 0x400000058b90bffc, 0x40000002c5c85fee,
    0x4000000162e42ff3, 0x40000000b17217f8, 0x4000000058b90bfc, 0x400000002c5c85fe,
)

def _smoothed_weight(n: int, power_q32: int) -> int:
    """floor(2^16 * n^tau), tau = power_q32 / 2^32, in integer arithmetic: the C++ core's
    smoothed_size_weight bit for bit (32-bit fixed-point log2 by squaring, exp2 by the
    constants above). n = 0 gives 0."""
    if n == 0:
        return 0
    msb = n.bit_length() - 1
    x = n << (62 - msb)
    frac = 0
    for _ in range(32):
        x = (x * x) >> 62
        frac <<= 1
        if x >> 63:
            frac |= 1
            x >>= 1
    y = (power_q32 * ((msb << 32) | frac)) >> 32
    ip, f = y >> 32, y & 0xFFFFFFFF
    r = 1 << 62
    for i in range(1, 33):
        if (f >> (32 - i)) & 1:
            r = (r * _EXP2_Q62[i - 1]) >> 62
    return r >> (62 - 16 - ip)


# ---------------------------------------------------------------- reference planner
class _ReferencePlanner:
    """Plain-Python twin of csrc/hybrid_sampler.cpp's Planner: same state, same draws.
    cfg: hybridfast.sampler.hybrid._Config."""

    def __init__(self, cfg, avail: np.ndarray, groups, epoch: int):
        self.cfg = cfg
        self.E, self.L = avail.shape
        self.G = cfg.batch_size * cfg.world_size
        self.rng = _Rng(_stream_base(cfg.seed, epoch))
        perm = list(range(self.E))
        for i in range(self.E - 1, 0, -1):
            j = self.rng.below(i + 1)
            perm[i], perm[j] = perm[j], perm[i]
        self.perm = perm
        rows = avail.tolist()
        self.masks = []  # position -> int bit mask of unused languages (0 once used)
        for e in perm:
            m = 0
            for lang, present in enumerate(rows[e]):
                if present:
                    m |= 1 << lang
            self.masks.append(m)
        self.group = None if groups is None else [int(groups[e]) for e in perm]
        self.rem = [0] * self.L
        self.rem_cross = 0
        for m in self.masks:
            for lang in range(self.L):
                if m >> lang & 1:
                    self.rem[lang] += 1
            if _popcount(m) >= 2:
                self.rem_cross += 1
        self.cursor = [0] * self.L
        self.cross_cursor = 0
        self.mono_dead = [False] * self.L
        self.cross_dead = False
        self.out: List[List[int]] = []

    def fill(self, cursor: int, need: int, usable):
        """-> (picked positions, cursor after a success or None on failure)."""
        picked, taken, first_skip, i = [], set(), None, cursor
        while i < self.E and len(picked) < need:
            if usable(i):
                if self.group is not None and self.group[i] in taken:
                    if first_skip is None:
                        first_skip = i
                else:
                    if self.group is not None:
                        taken.add(self.group[i])
                    picked.append(i)
            i += 1
        if len(picked) < need:
            return picked, None
        return picked, (first_skip if first_skip is not None else i)

    def fill_mono(self, lang, cursor, need):
        return self.fill(cursor, need, lambda i: self.masks[i] >> lang & 1)

    def fill_cross(self, cursor, need):
        return self.fill(cursor, need, lambda i: _popcount(self.masks[i]) >= 2)

    def consume(self, i):
        m = self.masks[i]
        if _popcount(m) >= 2:
            self.rem_cross -= 1
        for lang in range(self.L):
            if m >> lang & 1:
                self.rem[lang] -= 1
        self.masks[i] = 0

    def emit_mono(self, lang, picked):
        for i in picked:
            self.out.append([self.perm[i], lang, lang])
            self.consume(i)

    def emit_cross(self, picked):
        for i in picked:
            langs = [lang for lang in range(self.L) if self.masks[i] >> lang & 1]
            n = len(langs)
            r = self.rng.below(n * (n - 1))
            a, b = r // (n - 1), r % (n - 1)
            if b >= a:
                b += 1
            self.out.append([self.perm[i], langs[a], langs[b]])
            self.consume(i)

    def weight(self, lang):
        if not self.cfg.size_weights:
            return self.cfg.lang_weights[lang]
        if self.cfg.size_power == _ONE_Q32:
            return self.rem[lang]
        return _smoothed_weight(self.rem[lang], self.cfg.size_power)

    def step(self) -> bool:
        cfg, G = self.cfg, self.G
        while True:
            eligible = [lang for lang in range(self.L)
                        if cfg.allow_mono and not self.mono_dead[lang] and self.rem[lang] >= G]
            total = sum(self.weight(lang) for lang in eligible)
            mono_ok = total > 0
            cross_ok = cfg.allow_cross and not self.cross_dead and self.rem_cross >= G
            if not mono_ok and not cross_ok:
                return False
            mono = mono_ok
            if mono_ok and cross_ok:
                mono = (self.rng.next() >> 11) < cfg.mono_threshold
            if mono:
                r = self.rng.below(total)
                for lang in eligible:
                    if r < self.weight(lang):
                        break
                    r -= self.weight(lang)
                picked, cursor = self.fill_mono(lang, self.cursor[lang], G)
                if cursor is None:
                    self.mono_dead[lang] = True
                    continue
                self.cursor[lang] = cursor
                self.emit_mono(lang, picked)
            else:
                picked, cursor = self.fill_cross(self.cross_cursor, G)
                if cursor is None:
                    self.cross_dead = True
                    continue
                self.cross_cursor = cursor
                self.emit_cross(picked)
            return True

    def final_partial_step(self) -> bool:
        best, best_option = [], None
        for option in range(self.L + 1):
            if option < self.L:
                if not self.cfg.allow_mono or self.weight(option) == 0:
                    continue
                picked, _ = self.fill_mono(option, self.cursor[option], self.G)
            else:
                if not self.cfg.allow_cross:
                    continue
                picked, _ = self.fill_cross(self.cross_cursor, self.G)
            if len(picked) > len(best):
                best, best_option = picked, option
        n = len(best) - len(best) % self.cfg.world_size
        if n == 0:
            return False
        if best_option < self.L:
            self.emit_mono(best_option, best[:n])
        else:
            self.emit_cross(best[:n])
        self.out.extend([[-1, -1, -1]] * (self.G - n))
        return True

    def run(self) -> np.ndarray:
        steps = 0
        while self.step():
            steps += 1
        if not self.cfg.drop_last and self.final_partial_step():
            steps += 1
        return np.array(self.out, dtype=np.int32).reshape(steps, self.G, 3)


def _reference_capacities(avail: np.ndarray, groups) -> np.ndarray:
    """Largest batch each option can fill in a fresh epoch (languages, then cross)."""
    usable = np.concatenate([avail, (avail.sum(axis=1) >= 2)[:, None]], axis=1)
    if groups is None:
        return usable.sum(axis=0).astype(np.int64)
    return np.array([np.unique(groups[usable[:, k]]).shape[0] for k in range(usable.shape[1])], dtype=np.int64)
