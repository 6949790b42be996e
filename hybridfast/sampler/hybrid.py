"""Hybrid batch sampler: monolingual, cross-lingual or hybrid batches of
(example, query_lang, passage_lang) for multilingual retrieval training.

The epoch plan comes from the C++ core (csrc/hybrid_sampler.cpp, hybridfast._C);
hybridfast.sampler.reference is the same algorithm in plain Python, draw for draw
(`reference_plan` below runs it), used by the tests and as the fallback when the
extension is not built. The algorithm
(see csrc/hybrid_sampler.h for the long form):

1. Shuffle the examples with Fisher-Yates driven by a splitmix64 stream seeded by
   (seed, epoch); work in that random order ("positions").
2. Each position holds a bit mask of its unused languages; using an example clears
   it. Each language, and the cross-lingual kind, has a cursor that only moves
   forward: a batch is the next G = world_size * batch_size usable positions, one
   per group (a position skipped for its group keeps the cursor behind it). (The C++
   core keeps masks fixed plus a `used` bitset, and scans per-language bitsets 64
   positions per word: the same sets, faster.)
3. A step is mono with probability mono_prob when both kinds can fill a batch
   (integer test on 53 random bits); the mono language is drawn by integer weights
   among languages with at least G unused examples; a cross slot draws an ordered
   pair x != y uniformly among its example's languages. A fill that fails (too few
   distinct groups) can never succeed later, so that option drops out.
4. The epoch ends when no allowed kind can fill a batch. drop_last=False adds one
   final smaller batch: the largest partial fill of one option (mono languages in
   index order, then cross), rounded down to a multiple of world_size.

Every rank computes the same global plan; rank r takes slots [r*b, (r+1)*b) of each
step (b = batch_size, or the partial batch's size / world_size).
"""
import hashlib
import warnings
from typing import List, Optional, Tuple

import numpy as np

from hybridfast._backends import cpp_extension, fallback_warning
from hybridfast.rules import MODES, check_int
from hybridfast.sampler.checks import _validate, parse_lang_weights
from hybridfast.sampler.reference import _ReferencePlanner, _reference_capacities, splitmix64

__all__ = ["HybridBatchSampler", "reference_plan", "splitmix64", "parse_lang_weights", "MODES"]


def reference_plan(availability, batch_size, mode="hybrid", mono_prob=0.5, lang_weights="size", groups=None,
                   seed=0, epoch=0, world_size=1, drop_last=True) -> np.ndarray:
    """The epoch plan in plain Python: int32 [steps, world_size*batch_size, 3] of
    (example, query_lang, passage_lang), -1 padding a final partial batch.
    Identical, slot for slot, to HybridBatchSampler(...).plan(epoch)."""
    avail, cfg, dense, _ = _validate(availability, batch_size, mode, mono_prob, lang_weights, groups, seed,
                                     world_size, drop_last)
    epoch = check_int("epoch", epoch, 0)
    return _ReferencePlanner(cfg, avail, dense, epoch).run()


# ---------------------------------------------------------------- the sampler
class HybridBatchSampler:
    """Batches of (example, query_lang, passage_lang) for hybrid-batch training.

    Args:
        availability: bool [examples, languages]; True where the example exists in
            that language (copied).
        batch_size: examples per step per rank (the global batch is world_size times it).
        mode: "hybrid" (mono with probability mono_prob, else cross), "mono" (one
            language per global batch) or "cross" (every slot its own x != y).
        mono_prob: probability of a monolingual step in hybrid mode.
        lang_weights: how a mono step picks its language among those that can still
            fill a batch: "size" (the default and the paper's sampling "based on dataset
            size": proportional to the language's unused examples), None (uniform),
            "size^TAU" (proportional to unused examples to the power TAU in [0, 1]:
            smoothed sampling as in multilingual pre-training, e.g. "size^0.3"; exact
            integer arithmetic, identical in C++ and Python) or one non-negative weight
            per language (0: never a mono language).
        groups: one integer per example; no two examples of one global batch share one
            (translations or duplicates of one question).
        seed, rank, world_size: every rank plans the same global batches from
            (seed, epoch) and takes its own disjoint slice of each.
        drop_last: False adds one final smaller batch of leftovers (one language or
            cross, a multiple of world_size examples).

    Iterating yields this rank's list of (example, query_lang, passage_lang) tuples
    per step, so it works as ``DataLoader(dataset, batch_sampler=sampler)``.
    ``len()`` is the exact number of steps the next iteration yields (the whole epoch, or its
    rest after ``load_state_dict``); ``epoch_length()`` is the whole epoch's. The epoch is
    planned once (in C++) and cached; call ``set_epoch(e)`` before each epoch.
    """

    def __init__(self, availability, batch_size, mode="hybrid", mono_prob=0.5, lang_weights="size",
                 groups=None, seed=0, rank=0, world_size=1, drop_last=True):
        avail, cfg, dense, num_groups = _validate(availability, batch_size, mode, mono_prob, lang_weights,
                                                  groups, seed, world_size, drop_last)
        rank = check_int("rank", rank, 0)
        if rank >= cfg.world_size:
            raise ValueError(f"rank must be < world_size ({cfg.world_size}), got {rank}")
        self.availability = np.array(avail, dtype=np.bool_, order="C", copy=True)
        self.availability.flags.writeable = False
        self._cfg, self._groups, self._num_groups = cfg, dense, num_groups
        self.batch_size, self.world_size, self.rank = cfg.batch_size, cfg.world_size, rank
        self.mode, self.mono_prob, self.seed, self.drop_last = cfg.mode, cfg.mono_prob, seed, cfg.drop_last
        self.lang_weights = lang_weights
        # A flag, not the module: the sampler stays picklable / deep-copyable.
        self._use_cpp = cpp_extension() is not None
        if not self._use_cpp:
            fallback_warning("cpp_sampler", "hybridfast._C is not built: HybridBatchSampler plans epochs with "
                             "the pure-Python reference (identical plans, far slower). Rebuild with a C++17 "
                             "compiler: pip install -e . --no-build-isolation")
        self._check_feasible()
        self.epoch = 0
        self._start = 0    # first step of the next __iter__ (set by load_state_dict)
        self._yielded = 0  # steps of this epoch handed out so far
        self._cached: Optional[Tuple[int, np.ndarray]] = None
        self._data_digest: Optional[str] = None  # _data_sha256, computed on first use

    def _check_feasible(self):
        cfg, G = self._cfg, self._cfg.batch_size * self._cfg.world_size
        if self._use_cpp:
            cap = cpp_extension().fresh_capacities(self.availability.view(np.uint8), self._groups, self._num_groups)
        else:
            cap = _reference_capacities(self.availability, self._groups)
        L = self.availability.shape[1]
        mono = [int(cap[l]) for l in range(L) if cfg.allow_mono and (cfg.size_weights or cfg.lang_weights[l] > 0)]
        best_mono, cross = max(mono, default=0), int(cap[L]) if cfg.allow_cross else 0
        E = self.availability.shape[0]
        n_parallel = int(np.count_nonzero(self.availability.sum(axis=1) >= 2))
        if cfg.mode == "cross" and cross < G:
            if n_parallel == 0:
                raise ValueError(f"availability: not even one batch of {G} can be filled in mode='cross': it needs "
                                 f"parallel examples (available in >= 2 languages), and none of the {E} examples "
                                 "is: the data is not parallel; use mode='mono'")
            unit = "distinct groups" if self._groups is not None else "examples"
            raise ValueError(f"availability: not even one batch of {G} can be filled in mode='cross': only "
                             f"{cross} {unit} are available in >= 2 languages "
                             f"({n_parallel} of {E} examples, {100 * n_parallel / E:.1f}%), fewer than one global "
                             f"batch of {G}; use a smaller batch or mode='hybrid' / 'mono'")
        if cfg.mode == "hybrid" and cfg.allow_cross and cross < G <= best_mono:
            warnings.warn(
                f"mode='hybrid': only {n_parallel} of {E} examples ({100 * n_parallel / E:.1f}%) are available in "
                f">= 2 languages, fewer than one cross-lingual batch of {G}: every batch will be monolingual "
                "(the data is not parallel enough for hybrid batches)", UserWarning, stacklevel=3)
        if max(best_mono, cross) < G:
            unit = "distinct groups" if self._groups is not None else "examples"
            raise ValueError(
                f"availability: not even one batch of {G} (batch_size {cfg.batch_size} x world_size "
                f"{cfg.world_size}) can be filled in mode={cfg.mode!r}: the best language has {best_mono} "
                f"{unit}, cross-lingual slots (examples with >= 2 languages) have {cross}")

    # ------------------------------------------------------------ planning
    def _compute(self, epoch: int) -> np.ndarray:
        cfg = self._cfg
        if not self._use_cpp:
            return _ReferencePlanner(cfg, self.availability, self._groups, epoch).run()
        return cpp_extension().plan_epoch(
            self.availability.view(np.uint8), cfg.batch_size, cfg.world_size, cfg.allow_mono, cfg.allow_cross,
            cfg.mono_threshold, cfg.size_weights, np.asarray(cfg.lang_weights, dtype=np.uint64), self._groups,
            self._num_groups, cfg.drop_last, cfg.seed, epoch, cfg.size_power)

    def plan(self, epoch: Optional[int] = None) -> np.ndarray:
        """The whole epoch (default: the current one) as a read-only int32 array
        [steps, world_size*batch_size, 3] of (example, query_lang, passage_lang);
        a final partial batch (drop_last=False) is padded with -1."""
        epoch = self.epoch if epoch is None else check_int("epoch", epoch, 0)
        if self._cached is not None and self._cached[0] == epoch:
            return self._cached[1]
        plan = self._compute(epoch)
        plan.flags.writeable = False
        if epoch == self.epoch:
            self._cached = (epoch, plan)
        return plan

    def set_epoch(self, epoch: int) -> None:
        """Switch to another epoch's plan (a no-op for the current epoch, so that a
        resumed sampler keeps its position when the loop calls set_epoch again)."""
        epoch = check_int("epoch", epoch, 0)
        if epoch != self.epoch:
            self.epoch, self._start, self._yielded = epoch, 0, 0
            self._cached = None

    def epoch_length(self, epoch: Optional[int] = None) -> int:
        """Steps of the whole epoch (default: the current one)."""
        return int(self.plan(epoch).shape[0])

    def __len__(self) -> int:
        """Steps the next iteration yields: the whole epoch, or what is left of it after
        load_state_dict (so a DataLoader or progress bar over a resumed sampler counts right)."""
        return self.epoch_length() - self._start

    def _rank_slice(self, batch: np.ndarray) -> List[Tuple[int, int, int]]:
        per = self.batch_size
        if batch[-1, 0] < 0:  # the final partial batch: split its valid slots evenly
            per = int(np.count_nonzero(batch[:, 0] >= 0)) // self.world_size
        rows = batch[self.rank * per:(self.rank + 1) * per].tolist()
        return [(e, q, p) for e, q, p in rows]

    def __iter__(self):
        # Not a generator function: the position resets as soon as iter() is called,
        # so state_dict() right after it already describes the new pass.
        plan = self.plan()
        start, self._start = self._start, 0
        self._yielded = start
        return self._batches(plan, start)

    def _batches(self, plan: np.ndarray, start: int):
        for step in range(start, plan.shape[0]):
            self._yielded = step + 1
            yield self._rank_slice(plan[step])

    # ------------------------------------------------------------ resume
    def _data_sha256(self) -> str:
        """sha256 of the availability matrix and the (dense) groups: a state saved for other
        data of the same shape must not resume here. Computed once, on first use."""
        if getattr(self, "_data_digest", None) is None:
            h = hashlib.sha256()
            h.update(np.asarray(self.availability.shape, dtype="<i8").tobytes())
            h.update(np.packbits(self.availability, axis=None).tobytes())
            if self._groups is not None:
                h.update(b"groups")
                h.update(np.ascontiguousarray(self._groups, dtype="<i4").tobytes())
            self._data_digest = h.hexdigest()
        return self._data_digest

    def state_dict(self, step: Optional[int] = None) -> dict:
        """Where to resume: epoch and steps of it done (default: steps yielded so far;
        pass your own count when a DataLoader prefetches batches ahead of training)."""
        step = self._yielded if step is None else check_int("step", step, 0)
        return {"epoch": self.epoch, "step": step,
                "config": self._cfg.fingerprint(self.availability.shape, self._data_sha256())}

    def load_state_dict(self, state: dict) -> None:
        """The next iteration starts at the saved step of the saved epoch (no replay).
        Checked first, applied last: a refused state leaves the sampler as it was."""
        if not isinstance(state, dict) or not {"epoch", "step", "config"} <= set(state):
            raise ValueError("state must be a dict from HybridBatchSampler.state_dict() "
                             "(keys 'epoch', 'step', 'config')")
        saved = state["config"]
        if not isinstance(saved, dict):
            raise ValueError("state['config'] must be a dict from HybridBatchSampler.state_dict()")
        mine = self._cfg.fingerprint(self.availability.shape, self._data_sha256())
        if "data_sha256" not in saved:  # a state saved before the contents were fingerprinted
            warnings.warn("sampler state has no fingerprint of the availability and groups contents (saved by an "
                          "older hybridfast): only their shape is checked", UserWarning, stacklevel=2)
            mine.pop("data_sha256")
        diff = {k: (saved.get(k), v) for k, v in mine.items() if saved.get(k) != v}
        if diff:
            detail = ", ".join(
                ("data_sha256: the availability or groups contents differ (same shape, other data)"
                 if k == "data_sha256" else f"{k}: saved {a!r}, here {b!r}") for k, (a, b) in diff.items())
            raise ValueError(f"state was saved by a differently configured sampler ({detail})")
        epoch = check_int("epoch", state["epoch"], 0)
        step = check_int("step", state["step"], 0)
        steps = len(self.plan(epoch))  # plan(epoch) of another epoch is not cached: no state change
        if step > steps:
            raise ValueError(f"step {step} is past the end of epoch {epoch} ({steps} steps)")
        self.set_epoch(epoch)
        self._start = self._yielded = step

    def __repr__(self):
        E, L = self.availability.shape
        return (f"HybridBatchSampler(examples={E}, languages={L}, batch_size={self.batch_size}, "
                f"mode={self.mode!r}, mono_prob={self.mono_prob}, world_size={self.world_size}, "
                f"rank={self.rank}, epoch={self.epoch}, backend={'C++' if self._use_cpp else 'python'})")
