"""Training-step throughput and memory: all-MiniLM-L6-v2 on XQuAD-R training pairs.

One step is what `hybridfast train` does per batch: collate (prefixes + tokenise),
embed queries and passages, loss, backward, clip, AdamW. Measured:

CPU (batch 32, max_length 256, hybrid batches from the sampler):
  - `plain`: whole batch with a graph (HybridContrastiveLoss, torch backend);
  - `gradcache_8`: GradCache with chunks of 8 rows;
  - `checkpointing`: activation checkpointing;
  steps/s, examples/s and peak memory (RSS high-water mark) of each.
CUDA (skipped without a GPU), under a fixed memory budget (BUDGET_GIB):
  - `naive`: the usual recipe: whole batch with a graph, logits materialised
    (F.cross_entropy on the B x N similarity matrix, as sentence-transformers' MNRL);
  - `fused_gradcache`: HybridContrastiveLoss (Triton) + GradCache chunks of 128;
  both under bf16 autocast, so only the loss and the chunking differ;
  the largest batch (power of two, then bisection) that fits, and steps/s of both at
  that batch and at the naive method's largest batch.

Results go to bench/results/<device>.json under the key "train".
Run explicitly (not part of the test suite): python -m bench.bench_train [--steps 3]
"""
import argparse
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from bench.utils import peak_memory_bytes, save_results
from hybridfast.training import Collator, gradcache_step, plain_step
from hybridfast.training.steps import MAX_GRAD_NORM, enable_checkpointing, param_groups
from hybridfast.encoder import Encoder, default_model_path
from hybridfast.loss import HybridContrastiveLoss
from hybridfast.data.pairs import load_training_pairs

BATCH = 32
MAX_LENGTH = 256
BUDGET_GIB = 16
GPU_CHUNK = 128


def _data_root():
    return os.environ.get("HYBRIDFAST_DATA") or str(Path(__file__).resolve().parents[2] / "shared" / "data")


def naive_loss(q, p, temperature=0.05, **_):
    """The plain recipe: normalise, full B x N logits, cross-entropy (no group mask needed here)."""
    logits = F.normalize(q, dim=1) @ F.normalize(p, dim=1).T / temperature
    return F.cross_entropy(logits, torch.arange(q.shape[0], device=q.device))


class Step:
    """One optimizer step of the trainer on a fixed encoder, loss and method."""

    def __init__(self, encoder, loss_fn, chunk_size=None, amp_dtype=None):
        self.encoder, self.loss_fn, self.chunk_size, self.amp_dtype = encoder, loss_fn, chunk_size, amp_dtype
        self.params = [p for p in encoder.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(param_groups(encoder, 0.01), lr=3e-5)

    def __call__(self, collated):
        q_in, p_in, qg, pg = collated
        if self.chunk_size:
            loss = gradcache_step(self.encoder, self.loss_fn, q_in, p_in, qg, pg, self.chunk_size,
                                          self.amp_dtype)
        else:
            loss = plain_step(self.encoder, self.loss_fn, q_in, p_in, qg, pg, self.amp_dtype)
        torch.nn.utils.clip_grad_norm_(self.params, MAX_GRAD_NORM)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.encoder.device.type == "cuda":
            torch.cuda.synchronize()
        return loss


def _pairs():
    return load_training_pairs("xquad-r", data_dir=_data_root(), split="train")


def _timed(step, batches, cpu=False):
    """Seconds per step over `batches` (collate included, as in training), after one warm-up step;
    with cpu=True also this process's CPU seconds per step (on a shared CPU, wall time
    depends on the neighbours' load; CPU time much less)."""
    step(batches[0]())
    t0, c0 = time.perf_counter(), time.process_time()
    for make in batches[1:]:
        step(make())
    wall = (time.perf_counter() - t0) / (len(batches) - 1)
    return (wall, (time.process_time() - c0) / (len(batches) - 1)) if cpu else wall


def bench_cpu(steps):
    from hybridfast.sampler import HybridBatchSampler

    device = torch.device("cpu")
    pairs = _pairs()
    sampler = HybridBatchSampler(pairs.availability, BATCH, groups=pairs.groups, seed=0)
    plan = list(iter(sampler))[:steps + 1]
    records = []
    for name, chunk, ckpt in (("plain", None, False), ("gradcache_8", 8, False), ("checkpointing", None, True)):
        torch.manual_seed(0)
        enc = Encoder(default_model_path(), device="cpu", max_length=MAX_LENGTH, show_progress=False)
        enc.train()
        if ckpt:
            enable_checkpointing(enc.model)
        collate = Collator(pairs, enc, max_length=MAX_LENGTH)
        step = Step(enc, HybridContrastiveLoss(), chunk_size=chunk)
        batches = [lambda b=b, i=i: collate(b, i) for i, b in enumerate(plan)]
        load_before = os.getloadavg()[0]
        seconds, cpu_seconds = _timed(step, batches, cpu=True)
        peak = peak_memory_bytes(lambda: step(batches[-1]()), device)
        tokens = sum(int(t["attention_mask"].sum()) for t in collate(plan[-1], 0)[:2])
        records.append(dict(name=name, device="cpu", model="all-MiniLM-L6-v2", batch_size=BATCH,
                            max_length=MAX_LENGTH, chunk_size=chunk, gradient_checkpointing=ckpt,
                            threads=torch.get_num_threads(), steps_timed=len(plan) - 1,
                            seconds_per_step=seconds, steps_per_s=1 / seconds, examples_per_s=BATCH / seconds,
                            cpu_seconds_per_step=cpu_seconds, loadavg_1min=[load_before, os.getloadavg()[0]],
                            tokens_per_step=tokens, peak_memory_bytes=peak))
        print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in records[-1].items()}, flush=True)
    return records


def _random_batch(pairs, size, rng):
    """`size` (example, x, y) tuples with replacement: batches beyond the data's size, for memory tests."""
    langs = len(pairs.languages)
    out = []
    while len(out) < size:
        e = int(rng.integers(len(pairs)))
        x, y = (int(v) for v in rng.integers(langs, size=2))
        if pairs.availability[e, x] and pairs.availability[e, y]:
            out.append((e, x, y))
    return out


def _fits(method, pairs, size):
    """Does one step at `size` run within the memory budget? Returns seconds per step or None."""
    enc, step, collate = method
    rng = np.random.default_rng(size)
    try:
        batches = [lambda: collate(_random_batch(pairs, size, rng), 0) for _ in range(3)]
        seconds = _timed(step, batches)
    except (torch.cuda.OutOfMemoryError, RuntimeError) as err:
        # Triton and cuBLAS may report an allocation failure as a plain RuntimeError
        if not isinstance(err, torch.cuda.OutOfMemoryError) and "out of memory" not in str(err).lower():
            raise
        seconds = None
    step.optimizer.zero_grad(set_to_none=True)
    torch.cuda.empty_cache()
    return seconds


def _largest_batch(method, pairs, limit=1 << 15):
    lo, hi, times = 0, None, {}
    size = 16
    while size <= limit:  # doubling, then bisection between the last fit and the first failure
        t = _fits(method, pairs, size)
        if t is None:
            hi = size
            break
        lo, times[size] = size, t
        size *= 2
    while hi is not None and hi - lo > max(16, lo // 16):
        mid = (lo + hi) // 2
        t = _fits(method, pairs, mid)
        if t is None:
            hi = mid
        else:
            lo, times[mid] = mid, t
    return lo, times.get(lo)


def bench_cuda():
    device = torch.device("cuda")
    total = torch.cuda.get_device_properties(device).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, BUDGET_GIB * 2**30 / total), device)
    pairs = _pairs()

    def method(name):
        torch.manual_seed(0)
        enc = Encoder(default_model_path(), device="cuda", max_length=MAX_LENGTH, show_progress=False)
        enc.train()
        collate = Collator(pairs, enc, max_length=MAX_LENGTH)
        if name == "naive":  # bf16 autocast too: only the loss and the chunking differ
            return enc, Step(enc, naive_loss, amp_dtype=torch.bfloat16), collate
        return enc, Step(enc, HybridContrastiveLoss(backend="auto"), chunk_size=GPU_CHUNK,
                         amp_dtype=torch.bfloat16), collate

    records = {}
    for name in ("naive", "fused_gradcache"):
        m = method(name)
        largest, seconds = _largest_batch(m, pairs)
        records[name] = dict(name=name, device="cuda", model="all-MiniLM-L6-v2", max_length=MAX_LENGTH,
                             memory_budget_gib=BUDGET_GIB, largest_batch=largest,
                             seconds_per_step=seconds, steps_per_s=1 / seconds if seconds else None,
                             examples_per_s=largest / seconds if seconds else None,
                             chunk_size=GPU_CHUNK if name != "naive" else None,
                             amp="bf16")
        del m
        torch.cuda.empty_cache()
        print(records[name], flush=True)
    # the fused method at the naive method's largest batch: same work, speed compared directly
    m = method("fused_gradcache")
    b = records["naive"]["largest_batch"]
    t = _fits(m, pairs, b)
    records["fused_gradcache"]["at_naive_batch"] = dict(batch=b, seconds_per_step=t,
                                                        steps_per_s=1 / t if t else None)
    records["fused_gradcache"]["batch_ratio"] = (records["fused_gradcache"]["largest_batch"]
                                                 / max(1, records["naive"]["largest_batch"]))
    return list(records.values())


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3, help="timed CPU steps per method (after one warm-up)")
    parser.add_argument("--skip-cpu", action="store_true")
    args = parser.parse_args(argv)
    if not args.skip_cpu:
        torch.set_num_threads(os.cpu_count() or 1)
        path = save_results("train", torch.device("cpu"), bench_cpu(args.steps))
        print(f"cpu results -> {path}")
    if torch.cuda.is_available():
        path = save_results("train", torch.device("cuda"), bench_cuda())
        print(f"cuda results -> {path}")
    else:
        print("no CUDA device: GPU part skipped")


if __name__ == "__main__":
    main()
