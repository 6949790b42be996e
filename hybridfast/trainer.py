"""`hybridfast train`: fine-tune a Hugging Face encoder with mono / cross / hybrid batches.

One training step:
  HybridBatchSampler -> [(example, query_lang, passage_lang)] for this rank
  -> collate: query texts q(e, x), passages positive(e, y) (+ k hard negatives in the
     sentence-transformers layout p = cat[positives, negs_1, ..., negs_k])
  -> Encoder.tokenize (prefixes) -> Encoder.forward -> HybridContrastiveLoss with
     query/passage groups (a translation or duplicate of the positive is never a negative)
  -> gradient all-reduce across ranks -> clip 1.0 -> AdamW -> linear warmup/decay.

`chunk_size` switches on GradCache (Gao et al. 2021): all chunks are embedded
without a graph, the loss and d loss / d embeddings are computed at full batch,
then every chunk is re-embedded with a graph (replaying its dropout RNG) and
the cached embedding gradients are back-propagated. Activation memory is then
bounded by one chunk; the batch is bounded by the loss, which never holds B x N.

Distributed (torchrun): each rank embeds its share of the global batch; the loss
gathers passages (and their groups) across ranks when gather_across_devices is
set; gradients are averaged with one flat all-reduce per bucket after the
backward passes. A manual all-reduce (instead of DistributedDataParallel) keeps
GradCache's several backward passes and unused parameters (a BERT pooler)
simple and exact.

Exact resume: a checkpoint holds the weights, optimizer, scheduler, sampler
state, the step, and every RNG state (python, numpy, torch CPU and CUDA); it is
written to a temporary folder and renamed, so a kill at any moment leaves either
the previous complete checkpoint or the new one. Hard negatives are drawn from a
generator seeded by (seed, step, example), so they need no saved state.
"""
import argparse
import json
import math
import os
import random
import re
import shutil
import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

import numpy as np
import torch

MODES = ("mono", "cross", "hybrid")
SPLITS = ("train", "test", "all", "dev")
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
TMP_PREFIX = ".tmp-"
STATE_FILE = "trainer_state.json"  # written last: its presence marks a complete checkpoint
KEEP_CHECKPOINTS = 2
MAX_GRAD_NORM = 1.0
ALLREDUCE_BUCKET = 1 << 24  # elements per gradient all-reduce (64 MiB fp32)

# Fields that fix the data order; a resumed run must not change them.
_ORDER_FIELDS = ("train", "split", "languages", "mode", "mono_prob", "lang_weights", "batch_size", "seed",
                 "hard_negatives")


@dataclass
class TrainConfig:
    """Everything `train` needs; defaults follow the paper (alpha 0.5, cos, AdamW 3e-5 / 0.01, batch 100).

    model: a local model folder or hub name (None: the bundled all-MiniLM-L6-v2).
    train: training data (see hybridfast.train_data.load_training_pairs).
    batch_size: examples per step per process (global batch = batch_size x world size).
    max_steps: stop after this many steps (overrides epochs).
    query_prefix / passage_prefix: None keeps the Encoder's default.
    chunk_size: GradCache chunk (rows per embedding pass); None embeds the whole batch at once.
    save_steps: checkpoint (and evaluate, with eval) every this many steps.
    eval: a benchmark name or folder evaluated on eval_split at each save and at the end.
    """

    model: Optional[str]
    train: Union[str, Path]
    data_dir: Optional[str] = None
    split: str = "train"
    languages: Optional[Sequence[str]] = None
    mode: str = "hybrid"
    mono_prob: float = 0.5
    lang_weights: Optional[Union[Dict[str, float], str]] = None
    batch_size: int = 100
    max_steps: Optional[int] = None
    epochs: int = 1
    lr: float = 3e-5
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    temperature: float = 0.05
    hard_negatives: int = 0
    max_length: int = 256
    query_prefix: Optional[str] = None
    passage_prefix: Optional[str] = None
    seed: int = 0
    device: str = "auto"
    bf16: bool = False
    fp16: bool = False
    gradient_checkpointing: bool = False
    chunk_size: Optional[int] = None
    gather_across_devices: bool = False
    save_steps: Optional[int] = None
    log_steps: int = 10
    eval: Optional[str] = None
    eval_split: str = "test"
    output: Union[str, Path] = "runs/train"
    resume: bool = False
    show_progress: bool = True

    def __post_init__(self):
        if isinstance(self.languages, (str, tuple)):  # "en,de" or a tuple: one canonical form
            self.languages = _split_list(self.languages)

    def validate(self):
        """Check every field without touching files; raise ValueError/TypeError naming the field."""
        from hybridfast.train_data import check_language_code

        def integer(name, minimum, optional=False):
            value = getattr(self, name)
            if value is None and optional:
                return
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise TypeError(f"{name} must be an int{' or None' if optional else ''}, got {value!r}")
            if value < minimum:
                raise ValueError(f"{name} must be >= {minimum}, got {value}")

        def number(name, low, high=None, low_open=False):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
                raise TypeError(f"{name} must be a number, got {value!r}")
            if value < low or (low_open and value == low) or (high is not None and value > high):
                rng = f"{'(' if low_open else '['}{low}, {high if high is not None else 'inf'}]"
                raise ValueError(f"{name} must be in {rng}, got {value}")

        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if not self.train:
            raise ValueError("train: give a training data set (a name such as 'xquad-r', a folder or a .jsonl file)")
        if self.split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {self.split!r}")
        if self.eval_split not in SPLITS:
            raise ValueError(f"eval_split must be one of {SPLITS}, got {self.eval_split!r}")
        number("mono_prob", 0.0, 1.0)
        integer("batch_size", 1)
        integer("max_steps", 1, optional=True)
        integer("epochs", 1)
        number("lr", 0.0, low_open=True)
        number("weight_decay", 0.0)
        number("warmup_ratio", 0.0, 1.0)
        number("temperature", 0.0, low_open=True)
        integer("hard_negatives", 0)
        integer("max_length", 1)
        integer("chunk_size", 1, optional=True)
        integer("save_steps", 1, optional=True)
        integer("log_steps", 1)
        integer("seed", 0)
        if self.bf16 and self.fp16:
            raise ValueError("bf16 and fp16 are both set; choose one mixed-precision dtype")
        if self.languages is not None:
            langs = _split_list(self.languages)
            if not langs:
                raise ValueError("languages: empty; give language codes or None for all")
            for lang in langs:
                check_language_code(lang)
        if self.lang_weights is not None and self.lang_weights != "size":
            if not isinstance(self.lang_weights, dict) or not self.lang_weights:
                raise TypeError("lang_weights must be a non-empty dict {lang: weight} or 'size' (proportional to "
                                f"the examples per language), got {self.lang_weights!r}")
            for lang, w in self.lang_weights.items():
                check_language_code(lang, arg="lang_weights")
                if isinstance(w, bool) or not isinstance(w, (int, float)) or not w >= 0 or math.isinf(w):
                    raise ValueError(f"lang_weights[{lang!r}] must be a finite number >= 0, got {w!r}")
            if not any(w > 0 for w in self.lang_weights.values()):
                raise ValueError("lang_weights: at least one weight must be > 0")
        for name in ("query_prefix", "passage_prefix"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise TypeError(f"{name} must be a string or None, got {value!r}")
        try:
            device = _resolve_device(self.device)
        except (RuntimeError, ValueError) as err:
            raise ValueError(f"device: {err}") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device={self.device!r} but CUDA is not available")
        if self.fp16 and device.type != "cuda":
            raise ValueError("fp16 needs a CUDA device (fp16 autocast with loss scaling); use bf16 on CPU")
        if self.model is not None:
            m = str(self.model)
            # hub ids look like "name" or "org/name"; anything else is meant as a local path
            looks_local = Path(m).is_absolute() or m.startswith((".", "~")) or m.count("/") > 1
            if looks_local and not Path(m).expanduser().exists():
                raise FileNotFoundError(f"model: {m!r} does not exist")


def _split_list(value):
    if isinstance(value, str):
        return [s.strip() for s in value.split(",") if s.strip()]
    return list(value)


def _resolve_device(device):
    from hybridfast._backends import resolve_device

    return resolve_device(device)


# ----------------------------------------------------------------------------- distributed

def _init_distributed(device: torch.device):
    """(rank, world_size, device, created): joins the torchrun process group when WORLD_SIZE > 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, device, False
    import torch.distributed as dist

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    created = False
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        created = True
    return dist.get_rank(), dist.get_world_size(), device, created


def _barrier(world):
    if world > 1:
        import torch.distributed as dist

        dist.barrier()


def _broadcast_parameters(model, world):
    """Start every rank from rank 0's weights (a randomly initialised head would differ)."""
    if world > 1:
        import torch.distributed as dist

        with torch.no_grad():
            for t in list(model.parameters()) + list(model.buffers()):
                dist.broadcast(t.data, src=0)


def _allreduce_gradients(params, world):
    """Average gradients over ranks, in flat buckets. Parameters without a gradient
    (unused, e.g. a pooler) have none on every rank and are skipped alike."""
    if world <= 1:
        return
    import torch.distributed as dist

    grads = [p.grad for p in params if p.grad is not None]
    bucket, size = [], 0
    for g in grads + [None]:
        if g is not None:
            bucket.append(g)
            size += g.numel()
        if bucket and (g is None or size >= ALLREDUCE_BUCKET):
            flat = torch.cat([b.reshape(-1) for b in bucket])
            dist.all_reduce(flat)
            flat.div_(world)
            offset = 0
            for b in bucket:
                b.copy_(flat[offset:offset + b.numel()].view_as(b))
                offset += b.numel()
            bucket, size = [], 0


def _mean_over_ranks(value: float, world: int, device) -> float:
    if world <= 1:
        return value
    import torch.distributed as dist

    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t) / world


# ----------------------------------------------------------------------------- RNG

def _rng_state(device):
    """The torch RNG streams dropout draws from on `device`."""
    return torch.get_rng_state(), (torch.cuda.get_rng_state(device) if device.type == "cuda" else None)


def _set_rng_state(state, device):
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def _all_rng_states():
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def _restore_all_rng_states(states):
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if states.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


@contextmanager
def _preserved_rng():
    """Run something (evaluation) without disturbing any RNG stream of training."""
    states = _all_rng_states()
    try:
        yield
    finally:
        _restore_all_rng_states(states)


# ----------------------------------------------------------------------------- batches

class Collator:
    """Sampler tuples -> tokenised queries and passages plus their loss groups."""

    def __init__(self, pairs, encoder, hard_negatives=0, seed=0, max_length=None):
        self.pairs, self.encoder = pairs, encoder
        self.hard_negatives, self.seed, self.max_length = hard_negatives, seed, max_length

    def texts(self, batch, step):
        """(queries, passages, query_groups, passage_groups) as Python lists."""
        pairs = self.pairs
        queries = [pairs.query(e, x) for e, x, _ in batch]
        passages = [pairs.positive(e, y) for e, _, y in batch]
        q_groups = [pairs.group_of(e) for e, _, _ in batch]
        p_groups = list(q_groups)
        k = self.hard_negatives
        if k:
            negs = [self._pick_negatives(e, y, step, batch) for e, _, y in batch]
            for j in range(k):  # layout: cat[positives, negs_1, ..., negs_k]
                for (e, _, y), chosen in zip(batch, negs):
                    text = chosen[j]
                    passages.append(text)
                    # a negative that is some example's positive carries its group: for that
                    # example's query it is a false negative
                    p_groups.append(pairs.positive_groups(y).get(text, -1))
        return queries, passages, q_groups, p_groups

    def _pick_negatives(self, e, y, step, batch):
        k = self.hard_negatives
        # seeded by (seed, step, example): independent of rank layout and of saved RNG state
        rng = np.random.default_rng([self.seed, step, int(e)])
        pool = self.pairs.negatives(e, y)
        if len(pool) >= k:
            return [pool[i] for i in rng.choice(len(pool), size=k, replace=False)]
        chosen = list(pool)
        # too few mined negatives: fill with positives of other examples in the same language,
        # not in this batch (those are negatives already) and not duplicates of e
        avail = np.flatnonzero(self.pairs.availability[:, y])
        own = self.pairs.group_of(e)
        taken = {int(b[0]) for b in batch}
        for _ in range(64 * k):
            if len(chosen) == k:
                break
            f = int(avail[rng.integers(len(avail))])
            if f not in taken and self.pairs.group_of(f) != own:
                chosen.append(self.pairs.positive(f, y))
        while len(chosen) < k:  # tiny data: repeat a negative (or, with none, the positive:
            # it carries e's group, so the loss masks it for e's own query)
            chosen.append(chosen[0] if chosen else self.pairs.positive(e, y))
        return chosen

    def __call__(self, batch, step):
        queries, passages, q_groups, p_groups = self.texts(batch, step)
        enc = self.encoder
        q_in = enc.tokenize(queries, kind="query", max_length=self.max_length)
        p_in = enc.tokenize(passages, kind="passage", max_length=self.max_length)
        dev = enc.device
        return (q_in, p_in, torch.tensor(q_groups, dtype=torch.int64, device=dev),
                torch.tensor(p_groups, dtype=torch.int64, device=dev))


def prefetch(sampler, collate, first_step):
    """Yield (batch, collate(batch, step)) for the sampler's batches, collating batch
    i+1 in a background thread while the caller trains on batch i (tokenisers release
    the GIL; on a GPU this hides the collate time). Collate is a pure function of
    (batch, step), so results do not depend on the timing. If the caller stops early,
    one extra batch was drawn from the sampler: checkpoints therefore save the
    sampler position explicitly (state_dict(step=...))."""
    from concurrent.futures import ThreadPoolExecutor

    batches = iter(sampler)

    def draw():
        batch = next(batches, None)
        return None if batch is None else [tuple(int(v) for v in t) for t in batch]

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="hybridfast-collate") as pool:
        step, batch = first_step, draw()
        pending = pool.submit(collate, batch, step) if batch is not None else None
        while pending is not None:
            current, result = batch, pending.result()
            step, batch = step + 1, draw()
            pending = pool.submit(collate, batch, step) if batch is not None else None
            yield current, result


def batch_kind(batch) -> str:
    return "mono" if all(x == y for _, x, y in batch) else "cross"


def _chunks(inputs, size, trim):
    """Row chunks of a tokenised batch; with right padding each chunk drops the
    padding columns none of its rows use (shorter chunks, less work)."""
    n = inputs["input_ids"].shape[0]
    width = inputs["input_ids"].shape[1]
    lengths = inputs["attention_mask"].sum(1).tolist() if trim and "attention_mask" in inputs else None
    for start in range(0, n, size):
        chunk = {k: v[start:start + size] for k, v in inputs.items()}
        if lengths is not None:
            used = int(max(lengths[start:start + size]))
            chunk = {k: (v[:, :used] if v.dim() == 2 and v.shape[1] == width else v) for k, v in chunk.items()}
        yield chunk


# ----------------------------------------------------------------------------- one step

def _autocast(device, dtype):
    if dtype is None:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def plain_step(encoder, loss_fn, q_in, p_in, q_groups, p_groups, amp_dtype=None, scaler=None):
    """Embed the whole batch with a graph, loss, backward. Returns the detached loss tensor
    (not a float: reading it would wait for the device every step)."""
    with _autocast(encoder.device, amp_dtype):
        q = encoder(**q_in)
        p = encoder(**p_in)
    loss = loss_fn(q.float(), p.float(), query_groups=q_groups, passage_groups=p_groups)
    (scaler.scale(loss) if scaler is not None else loss).backward()
    return loss.detach()


def gradcache_step(encoder, loss_fn, q_in, p_in, q_groups, p_groups, chunk_size, amp_dtype=None, scaler=None):
    """GradCache: the same gradients as plain_step with activations of one chunk at a time.

    Pass 1 embeds every chunk without a graph, recording the RNG state each chunk
    started from; the loss and its gradients w.r.t. the (leaf) embeddings are
    computed at full batch; pass 2 re-embeds each chunk from its recorded RNG state
    (same dropout masks) with a graph and back-propagates the cached gradients.
    """
    device = encoder.device
    trim = getattr(encoder.tokenizer, "padding_side", "right") == "right"
    plan = [list(_chunks(q_in, chunk_size, trim)), list(_chunks(p_in, chunk_size, trim))]
    states, embeds = [], []
    with torch.no_grad(), _autocast(device, amp_dtype):
        for chunks in plan:
            out = []
            for chunk in chunks:
                states.append(_rng_state(device))
                out.append(encoder(**chunk).float())
            embeds.append(torch.cat(out))
    end_state = _rng_state(device)
    q = embeds[0].requires_grad_()
    p = embeds[1].requires_grad_()
    loss = loss_fn(q, p, query_groups=q_groups, passage_groups=p_groups)
    (scaler.scale(loss) if scaler is not None else loss).backward()
    grads = [q.grad, p.grad]
    i = 0
    for chunks, grad in zip(plan, grads):
        start = 0
        for chunk in chunks:
            _set_rng_state(states[i], device)
            i += 1
            with _autocast(device, amp_dtype):
                emb = encoder(**chunk)
            rows = emb.shape[0]
            emb.float().backward(grad[start:start + rows])
            start += rows
    _set_rng_state(end_state, device)
    return loss.detach()


# ----------------------------------------------------------------------------- checkpoints

def list_checkpoints(output) -> List[Path]:
    """Complete checkpoints in `output`, oldest first (temporary folders are ignored)."""
    out = Path(output)
    if not out.is_dir():
        return []
    found = []
    for d in out.iterdir():
        m = CHECKPOINT_RE.match(d.name)
        if m and d.is_dir() and _is_complete(d):
            found.append((int(m.group(1)), d))
    return [d for _, d in sorted(found)]


def _is_complete(folder: Path) -> bool:
    try:
        state = json.loads((folder / STATE_FILE).read_text())
    except (OSError, ValueError):
        return False
    return all((folder / name).exists() for name in state.get("files", []))


def _write_checkpoint(tmp: Path, encoder, optimizer, scheduler, scaler, sampler, state, rank, world):
    """Everything a resume needs, into `tmp`; the state file goes last."""
    torch.save({"sampler": sampler.state_dict(step=state["batch_in_epoch"]), "rng": _all_rng_states()},
               tmp / f"rank{rank}.pt")
    _barrier(world)
    if rank != 0:
        return
    encoder.save_pretrained(tmp)
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    files = ["optimizer.pt", "scheduler.pt"] + [f"rank{r}.pt" for r in range(world)]
    if scaler is not None:
        torch.save(scaler.state_dict(), tmp / "scaler.pt")
        files.append("scaler.pt")
    state = dict(state, files=files)
    with open(tmp / STATE_FILE, "w") as f:
        json.dump(state, f, indent=2)
        f.flush()
        os.fsync(f.fileno())


def save_checkpoint(output: Path, step, encoder, optimizer, scheduler, scaler, sampler, state, rank, world):
    """Write OUT/checkpoint-<step> atomically (temp folder, then rename) and keep the newest two."""
    final = output / f"checkpoint-{step}"
    tmp = output / f"{TMP_PREFIX}checkpoint-{step}"
    if rank == 0:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    _barrier(world)
    _write_checkpoint(tmp, encoder, optimizer, scheduler, scaler, sampler, state, rank, world)
    _barrier(world)
    if rank == 0:
        if final.exists():  # left by an earlier run that got further than the one resumed
            _remove(final)
        os.replace(tmp, final)
        for old in list_checkpoints(output)[:-KEEP_CHECKPOINTS]:
            _remove(old)
    _barrier(world)
    return final


def _remove(folder: Path):
    # rename first: a kill during rmtree must not leave a half-deleted "complete" checkpoint
    doomed = folder.with_name(f"{TMP_PREFIX}delete-{folder.name}")
    os.replace(folder, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def _clean_temporaries(output: Path):
    for d in output.glob(f"{TMP_PREFIX}*"):
        shutil.rmtree(d, ignore_errors=True)


def _load(path, device=None):
    # our own files: optimizer state and RNG tuples (numpy arrays) need full unpickling
    return torch.load(path, map_location=device or "cpu", weights_only=False)


# ----------------------------------------------------------------------------- logging

class _Logger:
    """OUT/train_log.jsonl (+ TensorBoard when installed); rank 0 only."""

    def __init__(self, output: Path, enabled: bool, resume_step: Optional[int]):
        self.enabled = enabled
        self.path = output / "train_log.jsonl"
        self.writer = None
        if not enabled:
            return
        if resume_step is not None and self.path.exists():
            # drop rows a killed run wrote after the checkpoint we resume from
            rows = [l for l in self.path.read_text().splitlines() if l.strip()]
            kept = [l for l in rows if json.loads(l).get("step", 0) <= resume_step]
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text("".join(l + "\n" for l in kept))
            os.replace(tmp, self.path)
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # tensorboard is optional
            SummaryWriter = None
        if SummaryWriter is not None:
            self.writer = SummaryWriter(str(output / "tensorboard"))

    def log(self, row: dict):
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.writer is not None:
            for key, value in row.items():
                if isinstance(value, (int, float)) and key != "step":
                    self.writer.add_scalar(key if "/" in key else f"train/{key}", value, row["step"])

    def close(self):
        if self.writer is not None:
            self.writer.close()


# ----------------------------------------------------------------------------- setup

def _build_sampler(config, pairs, rank, world):
    from hybridfast.sampler import HybridBatchSampler

    weights = config.lang_weights if config.lang_weights == "size" else None
    if isinstance(config.lang_weights, dict):
        unknown = sorted(set(config.lang_weights) - set(pairs.languages))
        if unknown:
            raise ValueError(f"lang_weights: {unknown} not in the training data (it has {pairs.languages})")
        weights = np.array([float(config.lang_weights.get(l, 0.0)) for l in pairs.languages])
    return HybridBatchSampler(pairs.availability, config.batch_size, mode=config.mode, mono_prob=config.mono_prob,
                              lang_weights=weights, groups=pairs.groups, seed=config.seed, rank=rank,
                              world_size=world, drop_last=True)


def _epoch_steps(sampler, epochs):
    """Steps in the first `epochs` epochs (hybrid epochs can differ in length)."""
    current = sampler.epoch
    total = 0
    for e in range(epochs):
        sampler.set_epoch(e)
        total += len(sampler)
    sampler.set_epoch(current)
    return total


def _param_groups(model, weight_decay):
    """No weight decay on biases and norm weights (1-D tensors), as usual for transformers."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def linear_schedule(total_steps, warmup_steps):
    """Linear warmup from 0 to the peak lr, then linear decay to 0 at total_steps."""
    def factor(step):
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))
    return factor


class _PeriodicEvaluator:
    """RetrievalEvaluator built once (its text layout is reused), run without
    disturbing training's RNG streams or train/eval mode."""

    def __init__(self, benchmark):
        self.benchmark, self.evaluator = benchmark, None

    def __call__(self, encoder):
        from hybridfast.evaluator import RetrievalEvaluator

        if self.evaluator is None:
            self.evaluator = RetrievalEvaluator(self.benchmark, device=encoder.device, show_progress=False)
        was_training = encoder.training
        encoder.eval()
        try:
            with _preserved_rng(), torch.no_grad():
                result = self.evaluator.evaluate(encoder)
        finally:
            encoder.train(was_training)
        flat = {f"eval/{setting}/{metric}": float(v) for setting, metrics in result.summary.items()
                for metric, v in metrics.items()}
        return result, flat


# ----------------------------------------------------------------------------- train

def prepare(config: TrainConfig, rank=0, world=1):
    """Validate config and load data, sampler and eval benchmark: everything that can fail
    fast, before any model is loaded. Returns (pairs, sampler, benchmark)."""
    from hybridfast.train_data import load_training_pairs

    config.validate()
    languages = _split_list(config.languages) if config.languages is not None else None
    pairs = load_training_pairs(config.train, data_dir=config.data_dir, split=config.split, languages=languages)
    if config.mode != "mono" and len(pairs.languages) < 2:
        raise ValueError(f"mode={config.mode!r} needs at least two languages; the training data has "
                         f"{pairs.languages} (use mode='mono')")
    sampler = _build_sampler(config, pairs, rank, world)
    if len(sampler) == 0:
        raise ValueError(f"batch_size={config.batch_size} x {world} process(es) leaves no full batch in "
                         f"{len(pairs)} examples")
    benchmark = None
    if config.eval is not None:
        from hybridfast.data import load_benchmark

        benchmark = load_benchmark(config.eval, data_dir=config.data_dir, languages=languages,
                                   split=config.eval_split)
    output = Path(config.output)
    if not config.resume and output.exists() and (list_checkpoints(output) or (output / "train_log.jsonl").exists()):
        raise ValueError(f"output: {output} already holds a training run; pass resume=True (--resume) to "
                         "continue it or choose another output folder")
    return pairs, sampler, benchmark


def _encoder_kwargs(config, device):
    kw = dict(max_length=config.max_length, device=str(device), show_progress=False)
    if config.query_prefix is not None:
        kw["query_prefix"] = config.query_prefix
    if config.passage_prefix is not None:
        kw["passage_prefix"] = config.passage_prefix
    return kw


def enable_checkpointing(model):
    """Activation (gradient) checkpointing of a Hugging Face model. Non-reentrant
    checkpoints restore the RNG state, so recomputed dropout masks match."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # the newer transformers name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def _update(params, optimizer, scheduler, scaler, world):
    """Average gradients over ranks, clip at 1.0, step the optimizer and schedule."""
    _allreduce_gradients(params, world)
    if scaler is not None:
        scaler.unscale_(optimizer)
    torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)


class _Window:
    """Losses since the last log row, per batch kind, kept as device tensors
    (reading them every step would stall the GPU queue)."""

    def __init__(self):
        self.sums, self.counts = {}, {}
        self.restart_clock()

    def restart_clock(self):
        self.t0 = time.perf_counter()

    def add(self, kind, loss):
        self.sums[kind] = self.sums.get(kind, 0.0) + loss
        self.counts[kind] = self.counts.get(kind, 0) + 1

    def summary(self, examples_per_step, world, device):
        n = sum(self.counts.values())
        elapsed = max(time.perf_counter() - self.t0, 1e-9)
        # ranks share each step's kind, so every rank has the same keys here
        means = {k: _mean_over_ranks(float(self.sums[k]) / self.counts[k], world, device) for k in sorted(self.sums)}
        row = {"loss": sum(means[k] * self.counts[k] for k in means) / n}
        row.update({f"loss_{k}": v for k, v in means.items()})
        row["examples_per_s"] = n * examples_per_step / elapsed
        self.__init__()
        return row


def _after_step(step):
    """Hook called after every optimizer step (tests inject failures here)."""


def train(config: TrainConfig) -> Path:
    """Fine-tune `config.model` on `config.train`; returns OUT/final (loadable by Encoder)."""
    if not isinstance(config, TrainConfig):
        raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
    config.validate()
    device = _resolve_device(config.device)
    rank, world, device, created_group = _init_distributed(device)
    try:
        return _train(config, device, rank, world)
    finally:
        if created_group:
            import torch.distributed as dist

            dist.destroy_process_group()


def _train(config, device, rank, world):
    from tqdm.auto import tqdm

    from hybridfast.encoder import Encoder, default_model_path
    from hybridfast.loss import HybridContrastiveLoss

    pairs, sampler, benchmark = prepare(config, rank, world)
    evaluate = _PeriodicEvaluator(benchmark) if benchmark is not None else None
    output = Path(config.output)
    output.mkdir(parents=True, exist_ok=True)
    resume_from = list_checkpoints(output)[-1] if config.resume and list_checkpoints(output) else None
    _barrier(world)
    if rank == 0:
        _clean_temporaries(output)  # a save killed half-way; the previous checkpoint is intact

    state = {"step": 0, "epoch": 0, "batch_in_epoch": 0}
    if resume_from is not None:
        state = json.loads((resume_from / STATE_FILE).read_text())
        saved = state.get("config", {})
        changed = [f for f in _ORDER_FIELDS if f in saved and saved[f] != _jsonable(getattr(config, f))]
        if changed or state.get("world_size", world) != world:
            raise ValueError(f"resume: {resume_from} was trained with different {changed or ['world size']}; "
                             "these fix the data order and cannot change on resume")

    # the model: from the checkpoint when resuming (weights saved by save_pretrained are exact)
    random.seed(config.seed)
    np.random.seed(config.seed)
    torch.manual_seed(config.seed)
    model_path = str(resume_from) if resume_from is not None else (config.model or default_model_path())
    encoder = Encoder(model_path, **_encoder_kwargs(config, device))
    encoder.train()
    if config.gradient_checkpointing:
        enable_checkpointing(encoder.model)
    _broadcast_parameters(encoder, world)
    torch.manual_seed(config.seed + rank)  # each rank its own dropout masks

    loss_fn = HybridContrastiveLoss(temperature=config.temperature, similarity="cos",
                                    gather_across_devices=config.gather_across_devices and world > 1)
    params = [p for p in encoder.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(_param_groups(encoder, config.weight_decay), lr=config.lr)
    total_steps = config.max_steps or _epoch_steps(sampler, config.epochs)
    warmup = int(round(config.warmup_ratio * total_steps))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, linear_schedule(total_steps, warmup))
    amp_dtype = torch.bfloat16 if config.bf16 else torch.float16 if config.fp16 else None
    scaler = torch.amp.GradScaler("cuda") if config.fp16 else None

    step, epoch, in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]
    if resume_from is not None:
        optimizer.load_state_dict(_load(resume_from / "optimizer.pt", device))
        scheduler.load_state_dict(_load(resume_from / "scheduler.pt"))
        if scaler is not None and (resume_from / "scaler.pt").exists():
            scaler.load_state_dict(_load(resume_from / "scaler.pt"))
        mine = _load(resume_from / f"rank{rank}.pt")
        sampler.load_state_dict(mine["sampler"])
        _restore_all_rng_states(mine["rng"])
    else:
        sampler.set_epoch(epoch)
    steps_this_epoch = len(sampler)

    collate = Collator(pairs, encoder, config.hard_negatives, config.seed, config.max_length)
    # resuming (even with no checkpoint yet) drops log rows of steps that will be redone
    logger = _Logger(output, rank == 0, step if config.resume else None)
    if rank == 0:
        (output / "train_config.json").write_text(json.dumps(_config_json(config), indent=2))
    bar = tqdm(total=total_steps, initial=step, desc="train", unit="step",
               disable=not config.show_progress or rank != 0)
    window = _Window()

    def checkpoint_state():
        return {"step": step, "epoch": epoch, "batch_in_epoch": in_epoch, "world_size": world,
                "total_steps": total_steps, "config": _config_json(config)}

    def epoch_progress():
        return round(epoch + in_epoch / max(1, steps_this_epoch), 4)

    while step < total_steps:
        # a resumed sampler starts at its saved position; the next batch is tokenised
        # while this one trains
        for batch, (q_in, p_in, q_groups, p_groups) in prefetch(sampler, collate, step):
            kind = batch_kind(batch)
            if config.chunk_size:
                loss = gradcache_step(encoder, loss_fn, q_in, p_in, q_groups, p_groups, config.chunk_size,
                                      amp_dtype, scaler)
            else:
                loss = plain_step(encoder, loss_fn, q_in, p_in, q_groups, p_groups, amp_dtype, scaler)
            lr = scheduler.get_last_lr()[0]
            _update(params, optimizer, scheduler, scaler, world)
            step += 1
            in_epoch += 1
            bar.update(1)
            window.add(kind, loss)
            row = None
            if step % config.log_steps == 0 or step == total_steps:
                row = dict({"step": step, "epoch": epoch_progress(), "lr": lr, "kind": kind},
                           **window.summary(config.batch_size * world, world, device))
                bar.set_postfix(loss=f"{row['loss']:.4f}", kind=kind)
            if config.save_steps and step % config.save_steps == 0 and step < total_steps:
                save_checkpoint(output, step, encoder, optimizer, scheduler, scaler, sampler,
                                checkpoint_state(), rank, world)
                if evaluate is not None:
                    row = row or {"step": step, "epoch": epoch_progress()}
                    if rank == 0:
                        row.update(evaluate(encoder)[1])
                    _barrier(world)
                window.restart_clock()  # saving and evaluating are not training time
            if row is not None:
                logger.log(row)
            _after_step(step)
            if step >= total_steps:
                break
        else:  # the epoch ran out: the next one (epochs may differ in length)
            epoch, in_epoch = epoch + 1, 0
            sampler.set_epoch(epoch)
            steps_this_epoch = len(sampler)
            if steps_this_epoch == 0:
                raise RuntimeError(f"epoch {epoch} of the sampler has no batch")
    bar.close()

    final = output / "final"
    if rank == 0:
        tmp = output / f"{TMP_PREFIX}final"
        if tmp.exists():
            shutil.rmtree(tmp)
        encoder.save_pretrained(tmp)
        if final.exists():
            _remove(final)
        os.replace(tmp, final)
        if evaluate is not None:
            result, flat = evaluate(encoder)
            result.to_json(output / "final_eval.json")
            logger.log(dict({"step": step, "epoch": epoch_progress()}, **flat))
    logger.close()
    _barrier(world)
    return final


def _jsonable(value):
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple):
        return list(value)
    return value


def _config_json(config):
    return {f.name: _jsonable(getattr(config, f.name)) for f in fields(config)}


# ----------------------------------------------------------------------------- CLI

def _lang_weights(text):
    if text.strip() == "size":
        return "size"
    out = {}
    for item in text.split(","):
        if not item.strip():
            continue
        lang, sep, w = item.partition("=")
        if not sep:
            raise argparse.ArgumentTypeError(f"expected lang=weight pairs like 'en=2,de=1', got {item!r}")
        try:
            out[lang.strip()] = float(w)
        except ValueError:
            raise argparse.ArgumentTypeError(f"weight of {lang!r} is not a number: {w!r}") from None
    return out


def add_arguments(parser):
    d = TrainConfig(model=None, train="")
    a = parser.add_argument
    a("--model", default=None, help="model folder or name (default: the bundled all-MiniLM-L6-v2)")
    a("--train", required=True, help="training data: xquad-r, mlqa-r, a LAReQA folder, a .jsonl file or an "
                                     "mMARCO-style folder")
    a("--data-dir", default=None, help="where named data sets live (default: $HYBRIDFAST_DATA, then the cache)")
    a("--split", default=d.split, choices=SPLITS, help="training split (LAReQA article split; mMARCO queries file)")
    a("--languages", default=None, help="comma-separated ISO 639-1 codes (default: all in the data)")
    a("--mode", default=d.mode, choices=MODES, help="batch kind: mono, cross, or hybrid (paper, alpha=mono-prob)")
    a("--mono-prob", type=float, default=d.mono_prob, help="probability of a monolingual batch in hybrid mode")
    a("--lang-weights", type=_lang_weights, default=None, help="mono-batch language weights, e.g. en=2,de=1, or 'size' (by examples per language)")
    a("--batch-size", type=int, default=d.batch_size, help="examples per step per process")
    a("--max-steps", type=int, default=None, help="stop after this many steps (overrides --epochs)")
    a("--epochs", type=int, default=d.epochs)
    a("--lr", type=float, default=d.lr)
    a("--weight-decay", type=float, default=d.weight_decay)
    a("--warmup-ratio", type=float, default=d.warmup_ratio)
    a("--temperature", type=float, default=d.temperature)
    a("--hard-negatives", type=int, default=d.hard_negatives, help="hard negatives per query")
    a("--max-length", type=int, default=d.max_length, help="tokens per text")
    a("--query-prefix", default=None, help="prefix of queries (default: the Encoder's; '' for none)")
    a("--passage-prefix", default=None, help="prefix of passages (default: the Encoder's; '' for none)")
    a("--seed", type=int, default=d.seed)
    a("--device", default=d.device, help="auto, cpu, cuda, cuda:1 ...")
    prec = parser.add_mutually_exclusive_group()
    prec.add_argument("--bf16", action="store_true", help="bfloat16 autocast")
    prec.add_argument("--fp16", action="store_true", help="float16 autocast with loss scaling (CUDA)")
    a("--gradient-checkpointing", action="store_true", help="recompute activations in backward")
    a("--chunk-size", type=int, default=None, help="GradCache chunk size (rows per embedding pass)")
    a("--gather-across-devices", action="store_true", help="in-batch negatives from all processes (torchrun)")
    a("--save-steps", type=int, default=None, help="checkpoint every N steps")
    a("--log-steps", type=int, default=d.log_steps, help="log every N steps")
    a("--eval", default=None, help="benchmark evaluated at each checkpoint and at the end, e.g. xquad-r")
    a("--eval-split", default=d.eval_split, choices=SPLITS)
    a("--output", default=str(d.output), help="output folder (train_log.jsonl, checkpoint-N/, final/)")
    a("--resume", action="store_true", help="continue from the newest complete checkpoint in --output")
    a("--no-progress", action="store_true", help="no progress bar")


def config_from_args(args) -> TrainConfig:
    kw = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if hasattr(args, f.name)}
    kw["show_progress"] = not getattr(args, "no_progress", False)
    if kw.get("languages"):
        kw["languages"] = _split_list(kw["languages"])
    return TrainConfig(**kw)


def run(args) -> int:
    try:
        final = train(config_from_args(args))
    except (ValueError, TypeError, FileNotFoundError) as err:
        print(f"hybridfast train: error: {err}", file=sys.stderr)
        return 2
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"final model: {final}")
    return 0
