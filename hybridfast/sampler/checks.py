"""Argument checks of the hybrid batch sampler: every argument named in its error, lang_weights
specs, integer weights (both backends draw with integer arithmetic only) and the configuration
fingerprint that a saved state must match to resume."""
import math
import re
from dataclasses import dataclass
from fractions import Fraction
from typing import Tuple

import numpy as np

from hybridfast.rules import MODES, check_bool, check_int, check_number
from hybridfast.sampler.reference import _MASK, _ONE_Q32

_MAX_EXAMPLES = (1 << 31) - 1  # the plan is int32


# ---------------------------------------------------------------- lang_weights specs
_SIZE_SPEC = re.compile(r"^size\^(\d+(?:\.\d*)?|\.\d+)$")


def parse_lang_weights(value):
    """Normalise a lang_weights spec: None, "size", "size^TAU" (0 <= TAU <= 1, a decimal)
    or a sequence of numbers -> (kind, detail): ("uniform", None), ("size", power_q32)
    with power_q32 = round(TAU * 2^32) (2^32 for plain "size"), or ("fixed", value).
    "size^1" is "size" and "size^0" is uniform (None), exactly."""
    if value is None:
        return "uniform", None
    if isinstance(value, str):
        spec = value.strip().replace(" ", "")
        if spec == "size":
            return "size", _ONE_Q32
        m = _SIZE_SPEC.match(spec)
        if not m:
            raise ValueError(f"lang_weights must be None, 'size', 'size^TAU' (0 <= TAU <= 1, e.g. 'size^0.3') "
                             f"or one weight per language, got {value!r}")
        tau = Fraction(m.group(1))
        if tau > 1:
            raise ValueError(f"lang_weights {value!r}: TAU must be in [0, 1] (1 = 'size', 0 = uniform)")
        power = int(tau * _ONE_Q32 + Fraction(1, 2))
        if power == 0:
            return "uniform", None
        return "size", power
    return "fixed", value


# ---------------------------------------------------------------- arguments
@dataclass(frozen=True)
class _Config:
    batch_size: int
    world_size: int
    mode: str
    mono_prob: float
    allow_mono: bool
    allow_cross: bool
    mono_threshold: int  # P(mono) = mono_threshold / 2^53
    size_weights: bool
    lang_weights: Tuple[int, ...]  # integer weights (unused with size_weights)
    drop_last: bool
    seed: int
    size_power: int = _ONE_Q32  # size_weights: weight = rem^(size_power / 2^32); 2^32 = plain size

    def _weights_spec(self):
        if not self.size_weights:
            return list(self.lang_weights)
        return "size" if self.size_power == _ONE_Q32 else f"size^{self.size_power / _ONE_Q32:.9g}"

    def fingerprint(self, shape, data_sha256=None) -> dict:
        """What a saved state must match to resume (rank may differ); data_sha256: the
        availability and groups contents (HybridBatchSampler._data_sha256)."""
        return {"examples": int(shape[0]), "languages": int(shape[1]), "data_sha256": data_sha256,
                "batch_size": self.batch_size,
                "world_size": self.world_size, "mode": self.mode, "mono_prob": self.mono_prob,
                "lang_weights": self._weights_spec(),
                "drop_last": self.drop_last, "seed": self.seed}


def _check_availability(availability) -> np.ndarray:
    arr = np.asarray(availability)
    if arr.dtype != np.bool_:
        raise TypeError(f"availability must be a bool array [examples, languages], got dtype {arr.dtype}")
    if arr.ndim != 2:
        raise ValueError(f"availability must be 2-D [examples, languages], got shape {arr.shape}")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"availability must have at least one example and one language, got shape {arr.shape}")
    if arr.shape[0] > _MAX_EXAMPLES:
        raise ValueError(f"availability: at most {_MAX_EXAMPLES} examples (the plan is int32)")
    return arr


def _integer_weights(lang_weights, num_languages: int) -> Tuple[int, ...]:
    """Fixed weights -> integers in [0, 2^32] (positive stays >= 1), so that both
    backends draw the mono language with integer arithmetic only."""
    try:
        w = np.asarray(lang_weights, dtype=np.float64)
    except (TypeError, ValueError):
        raise TypeError("lang_weights must be None, 'size' or a sequence of numbers") from None
    if w.ndim != 1 or w.shape[0] != num_languages:
        raise ValueError(f"lang_weights must have one weight per language ({num_languages}), got shape {w.shape}")
    if not np.all(np.isfinite(w)) or np.any(w < 0):
        raise ValueError("lang_weights must be finite and non-negative")
    top = float(w.max())
    if top == 0:
        raise ValueError("lang_weights are all zero: no language can be a monolingual batch")
    return tuple(0 if x == 0 else max(1, int(x / top * 4294967296.0)) for x in w.tolist())


def _validate(availability, batch_size, mode, mono_prob, lang_weights, groups, seed, world_size,
              drop_last):
    """Checks every argument (naming it) -> (availability, _Config, dense groups, num_groups)."""
    avail = _check_availability(availability)
    num_languages = avail.shape[1]
    batch_size = check_int("batch_size", batch_size, 1)
    world_size = check_int("world_size", world_size, 1)
    if not isinstance(mode, str) or mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if isinstance(mono_prob, float) and math.isnan(mono_prob):  # a value out of range, not a wrong type
        raise ValueError(f"mono_prob must be in [0, 1], got {mono_prob}")
    mono_prob = float(check_number("mono_prob", mono_prob, 0.0, 1.0))
    check_int("seed", seed)
    check_bool("drop_last", drop_last)

    # hybrid with mono_prob 1 (0) is exactly mono (cross): the other kind never runs.
    allow_mono = mode == "mono" or (mode == "hybrid" and mono_prob > 0.0)
    allow_cross = mode == "cross" or (mode == "hybrid" and mono_prob < 1.0)
    if allow_cross and num_languages < 2:
        raise ValueError(f"mode={mode!r} needs cross-lingual batches, which need at least 2 languages "
                         f"(availability has {num_languages}); use mode='mono'")

    kind, detail = parse_lang_weights(lang_weights)
    size_power = _ONE_Q32
    if kind == "uniform":
        size_weights, weights = False, (1,) * num_languages
    elif kind == "size":
        size_weights, weights, size_power = True, (0,) * num_languages, detail
        if size_power != _ONE_Q32 and num_languages > (1 << 16):
            raise ValueError("lang_weights 'size^TAU': at most 65536 languages")
    else:
        size_weights, weights = False, _integer_weights(lang_weights, num_languages)

    dense, num_groups = None, 0
    if groups is not None:
        g = np.asarray(groups)
        if g.dtype.kind not in "iu":
            raise TypeError(f"groups must be an integer array, got dtype {g.dtype}")
        if g.ndim != 1 or g.shape[0] != avail.shape[0]:
            raise ValueError(f"groups must be 1-D with one id per example ({avail.shape[0]}), got shape {g.shape}")
        # Dense ids 0..n-1 keep the core's per-group table small, whatever the ids are.
        uniques, inverse = np.unique(g, return_inverse=True)
        dense, num_groups = inverse.reshape(-1).astype(np.int32), int(uniques.shape[0])

    cfg = _Config(batch_size=batch_size, world_size=world_size, mode=mode, mono_prob=mono_prob,
                  allow_mono=allow_mono, allow_cross=allow_cross,
                  mono_threshold=int(mono_prob * 9007199254740992.0),  # * 2^53, exact
                  size_weights=size_weights, lang_weights=weights, drop_last=bool(drop_last),
                  seed=int(seed) & _MASK, size_power=size_power)
    return avail, cfg, dense, num_groups
