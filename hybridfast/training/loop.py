"""`train(config)`: the training loop of `hybridfast train` (see docs/architecture.md).

    data -> HybridBatchSampler -> Collator (prefix + tokenise) -> Encoder -> loss
         -> backward (plain or GradCache) -> average over ranks -> clip -> AdamW -> schedule

Before anything is written: the config is checked, the data loaded, the output folder's
rules applied (hybridfast.training.rundir), a resume compared with the checkpoint's run
(strict: every setting that changes the result, and the training data's fingerprint), and
the model loaded. Then the folder is locked for the run. Exact resume: a checkpoint holds
the weights, optimizer, scheduler, sampler position and every RNG state; hard negatives
are drawn from a generator seeded by (seed, step, example), so they need no saved state.
"""
from __future__ import annotations

import json
import random
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import fields
from pathlib import Path
from typing import Callable, List, Optional

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import get_linear_schedule_with_warmup

from hybridfast import encoder as encoder_module
from hybridfast import rules
from hybridfast._backends import resolve_device
from hybridfast.data import load_benchmark
from hybridfast.evaluation.evaluator import RetrievalEvaluator
from hybridfast.loss import HybridContrastiveLoss
from hybridfast.models import default_model
from hybridfast.sampler import HybridBatchSampler
from hybridfast.data.pairs import load_training_pairs
from hybridfast.training import checkpoint as ckpt
from hybridfast.training import distributed
from hybridfast.training.batches import Collator, batch_kind, prefetch
from hybridfast.training.config import INVOCATION_ONLY, RESUMABLE_CHANGES, TrainConfig, looks_local
from hybridfast.training.log import Logger, Window
from hybridfast.training.rundir import RunFolder
from hybridfast.training.steps import (TrainingDiverged, enable_checkpointing, gradcache_step, param_groups,
                                       parameters_finite, plain_step, update)

StepCallback = Optional[Callable[[int], None]]


def train(config: TrainConfig, on_step: StepCallback = None) -> Path:
    """Fine-tune `config.model` on `config.train`; returns OUT/final (loadable by Encoder).
    `on_step(step)` is called after every optimizer step (logging and checkpointing done)."""
    if not isinstance(config, TrainConfig):
        raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
    config.validate()
    rank, world, device, created_group = distributed.init(resolve_device(config.device))
    try:
        return _train(config, device, rank, world, on_step)
    finally:
        distributed.shutdown(created_group)


def _train(config, device, rank, world, on_step):
    pairs, sampler, benchmark = load_data(config, rank, world)
    run_dir = RunFolder(config.output)
    run_dir.check_model(config.model)
    action, found = run_dir.plan(config.resume, config.overwrite)
    seen = run_dir.snapshot()
    fingerprint = pairs.fingerprint()
    if action == "finished":
        check_finished(config, found, fingerprint, world)
        warnings.warn(f"{config.output}: this run finished already ({found}); nothing to resume, left untouched",
                      stacklevel=3)
        return found
    state = resume_state(config, found, fingerprint, world) if action == "resume" else None
    encoder = load_encoder(config, found, device)  # may fail (hub, max_length): nothing is written yet
    distributed.barrier(world)  # every rank has read the folder before rank 0 changes it
    with run_dir.lock() if rank == 0 else nullcontext():
        if rank == 0:
            if run_dir.snapshot() != seen:  # another run got in between: decide again
                raise RuntimeError(f"{config.output} changed while the model loaded; run again")
            run_dir.clear_own() if action == "fresh" else run_dir.clean_temporaries()
        distributed.barrier(world)
        return _Run(config, device, rank, world, run_dir, pairs, sampler, benchmark, encoder, found, state,
                    fingerprint).loop(on_step)


def prepare(config: TrainConfig, rank=0, world=1):
    """Validate config and load data, sampler and eval benchmark: everything that can fail
    fast, before any model is loaded. Returns (pairs, sampler, benchmark)."""
    config.validate()
    return load_data(config, rank, world)


def load_data(config: TrainConfig, rank=0, world=1):
    """prepare() for a config that has been validated."""
    languages = rules.check_languages(config.languages)
    pairs = load_training_pairs(config.train, data_dir=config.data_dir, split=config.split, languages=languages)
    if config.mode != "mono" and len(pairs.languages) < 2:
        raise ValueError(f"mode={config.mode!r} needs at least two languages; the training data has "
                         f"{pairs.languages} (use mode='mono')")
    sampler = build_sampler(config, pairs, rank, world)
    if len(sampler) == 0:
        raise ValueError(f"batch_size={config.batch_size} x {world} process(es) leaves no full batch in "
                         f"{len(pairs)} examples")
    benchmark = None
    if config.eval is not None:
        benchmark = load_benchmark(config.eval, data_dir=config.data_dir, languages=languages,
                                   split=config.eval_split)
    return pairs, sampler, benchmark


def build_sampler(config, pairs, rank, world):
    weights = config.lang_weights if isinstance(config.lang_weights, str) else None  # "size" or "size^TAU"
    if isinstance(config.lang_weights, dict):
        weights = np.array(rules.language_weights(config.lang_weights, pairs.languages))
    return HybridBatchSampler(pairs.availability, config.batch_size, mode=config.mode, mono_prob=config.mono_prob,
                              lang_weights=weights, groups=pairs.groups, seed=config.seed, rank=rank,
                              world_size=world, drop_last=True)


# ----------------------------------------------------------------------------- strict resume

def run_settings(config: TrainConfig) -> dict:
    """The config as recorded in a checkpoint; a local model path is made absolute so that
    two spellings of one folder compare equal."""
    settings = config.to_json()
    model = settings.get("model")
    if model is not None and looks_local(model) and Path(model).expanduser().exists():
        settings["model"] = str(Path(model).expanduser().resolve())
    return settings


def compare_settings(saved: dict, config, fingerprint: str, world, where) -> dict:
    """Refuse (ValueError listing every difference) when `saved` (a run's recorded settings, with
    its world_size and data_fingerprint) differs from this invocation in anything that changes
    the result. Returns the allowed changes {name: [before, after]}."""
    now = run_settings(config)
    strict = [f.name for f in fields(TrainConfig) if f.name not in RESUMABLE_CHANGES + INVOCATION_ONLY]
    diffs = [f"{name}: {saved.get(name)!r} -> {now[name]!r}" for name in strict
             if name in saved and saved[name] != now[name]]
    if saved.get("world_size", world) != world:
        diffs.append(f"world size (processes): {saved['world_size']} -> {world}")
    if saved.get("data_fingerprint") not in (None, fingerprint):
        diffs.append(f"training data: its content changed (fingerprint {saved['data_fingerprint'][:12]} -> "
                     f"{fingerprint[:12]})")
    if diffs:
        raise ValueError(f"resume: {where} was trained with other settings; these change the result and "
                         "cannot change on resume:\n  " + "\n  ".join(diffs) +
                         f"\n(only {', '.join(RESUMABLE_CHANGES)} may change)")
    return {name: [saved[name], now[name]] for name in RESUMABLE_CHANGES
            if name in saved and saved[name] != now[name] and name != "show_progress"}


def resume_state(config, checkpoint: Path, fingerprint: str, world) -> dict:
    """The checkpoint's state after compare_settings; the allowed changes under "changes"."""
    state = ckpt.read_state(checkpoint)
    saved = dict(state.get("config", {}), world_size=state.get("world_size", world),
                 data_fingerprint=state.get("data_fingerprint"))
    state["changes"] = compare_settings(saved, config, fingerprint, world, checkpoint)
    return state


def check_finished(config, final: Path, fingerprint: str, world):
    """--resume of a finished run: refuse other settings or a longer run; else nothing to do."""
    try:
        saved = json.loads((final.parent / "train_config.json").read_text())
    except (OSError, ValueError):
        saved = {}
    changes = compare_settings(saved, config, fingerprint, world, final.parent)
    longer = {k: v for k, v in changes.items() if k in ("max_steps", "epochs")}
    if longer:
        raise ValueError(f"resume: {final.parent} finished already; it cannot be extended ({longer}). Train "
                         f"further as a new run from its model: --model {final} --output <new folder>")


# ----------------------------------------------------------------------------- model

def load_encoder(config, checkpoint: Optional[Path], device):
    """The Encoder from the checkpoint (resume) or config.model, with clear errors for a model
    that cannot be loaded and a max_length beyond its position table."""
    random.seed(config.seed)
    np.random.seed(config.seed)
    torch.manual_seed(config.seed)
    path = str(checkpoint) if checkpoint is not None else (config.model or default_model())
    kwargs = dict(device=str(device), show_progress=False)
    for name in ("max_length", "query_prefix", "passage_prefix"):
        if getattr(config, name) is not None:
            kwargs[name] = getattr(config, name)
    try:
        encoder = encoder_module.Encoder(path, **kwargs)
    except (OSError, ValueError) as err:
        where = "a local folder" if looks_local(path) else "a hub name: not in the local cache and the hub " \
                                                             "could not be reached or has no such model"
        raise ValueError(f"model {path!r} could not be loaded ({where}): {str(err).splitlines()[0]}") from err
    limit = position_limit(encoder.model.config)
    if limit is not None and config.max_length is not None and config.max_length > limit:
        raise ValueError(f"max_length={config.max_length} exceeds the model's position table ({limit} tokens); "
                         f"use --max-length {limit} or less")
    return encoder


def position_limit(model_config) -> Optional[int]:
    """Tokens the model can embed; RoBERTa-style models reserve padding_idx + 1 positions."""
    limit = getattr(model_config, "max_position_embeddings", None)
    if not isinstance(limit, int) or limit <= 0:
        return None
    if "roberta" in str(getattr(model_config, "model_type", "")) and getattr(model_config, "pad_token_id", None) \
            is not None:
        limit -= model_config.pad_token_id + 1
    return limit


def epoch_steps(sampler, epochs):
    """Steps in the first `epochs` epochs (hybrid epochs can differ in length)."""
    current, total = sampler.epoch, 0
    for e in range(epochs):
        sampler.set_epoch(e)
        total += len(sampler)
    sampler.set_epoch(current)
    return total


# ----------------------------------------------------------------------------- the run

class _Run:
    """One training run's objects and position; `loop` is the whole training."""

    def __init__(self, config, device, rank, world, run_dir, pairs, sampler, benchmark, encoder, checkpoint,
                 state, fingerprint):
        self.config, self.device, self.rank, self.world, self.run_dir = config, device, rank, world, run_dir
        self.output, self.sampler, self.encoder, self.fingerprint = Path(config.output), sampler, encoder, fingerprint
        self.evaluate = PeriodicEvaluator(benchmark) if benchmark is not None else None
        encoder.train()
        if config.gradient_checkpointing:
            enable_checkpointing(encoder.model)
        self.model = distributed.wrap(encoder, world, device)  # the forward passes go through this
        torch.manual_seed(config.seed + rank)  # each rank its own dropout masks
        self.loss_fn = HybridContrastiveLoss(temperature=config.temperature, similarity="cos",
                                             gather_across_devices=config.gather_across_devices and world > 1)
        self.params = [p for p in encoder.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(param_groups(encoder, config.weight_decay), lr=config.lr)
        self.total_steps = config.max_steps or epoch_steps(sampler, config.epochs)
        self.scheduler = get_linear_schedule_with_warmup(
            self.optimizer, int(round(config.warmup_ratio * self.total_steps)), self.total_steps)
        self.amp_dtype = torch.bfloat16 if config.bf16 else torch.float16 if config.fp16 else None
        self.scaler = torch.amp.GradScaler("cuda") if config.fp16 else None
        state = state or {"step": 0, "epoch": 0, "batch_in_epoch": 0, "changes": {}}
        self.step, self.epoch, self.in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]
        if checkpoint is not None:
            ckpt.restore(checkpoint, self.optimizer, self.scheduler, self.scaler, sampler, rank, device)
        else:
            sampler.set_epoch(self.epoch)
        self.steps_this_epoch = len(sampler)
        self.collate = Collator(pairs, encoder, config.hard_negatives, config.seed, encoder.max_length)
        # resuming drops log rows of steps that will be redone
        self.logger = Logger(self.output, rank == 0, self.step if checkpoint is not None else None, run_dir.own)
        self.window = Window()
        if rank == 0:
            self._write_config(state["changes"], checkpoint is not None)

    def loop(self, on_step: StepCallback) -> Path:
        bar = tqdm(total=self.total_steps, initial=self.step, desc="train", unit="step",
                   disable=not self.config.show_progress or self.rank != 0)
        try:
            while self.step < self.total_steps:
                # a resumed sampler starts at its saved position; the next batch is tokenised meanwhile
                for batch, inputs in prefetch(self.sampler, self.collate, self.step):
                    self.train_step(batch, inputs)
                    bar.update(1)
                    if on_step is not None:
                        on_step(self.step)
                    if self.step >= self.total_steps:
                        break
                else:  # the epoch ran out: the next one (epochs may differ in length)
                    self.next_epoch()
            bar.close()
            return self.finish()
        except TrainingDiverged as err:
            kept = ckpt.list_checkpoints(self.output)
            raise TrainingDiverged(err.step, err.what, err.value, note=(
                f"The last good checkpoint is kept: {kept[-1]}." if kept else "No checkpoint was written yet.")
                + " No final/ was written.") from None
        finally:
            self.logger.close()

    def train_step(self, batch, inputs):
        config = self.config
        kind = batch_kind(batch)
        if config.chunk_size:
            loss = gradcache_step(self.encoder, self.loss_fn, *inputs, config.chunk_size, self.amp_dtype,
                                  self.scaler, model=self.model)
        else:
            loss = plain_step(self.encoder, self.loss_fn, *inputs, self.amp_dtype, self.scaler, model=self.model)
        lr = self.scheduler.get_last_lr()[0]
        update(self.params, self.optimizer, self.scheduler, self.scaler, self.world, loss, self.step + 1)
        self.step += 1
        self.in_epoch += 1
        self.window.add(kind, loss)
        row = None
        if self.step % config.log_steps == 0 or self.step == self.total_steps:
            row = dict({"step": self.step, "epoch": self.epoch_progress(), "lr": lr, "kind": kind},
                       **self.window.summary(config.batch_size * self.world, self.world, self.device))
        if config.save_steps and self.step % config.save_steps == 0 and self.step < self.total_steps:
            self.save()
            if self.evaluate is not None:
                row = row or {"step": self.step, "epoch": self.epoch_progress()}
                if self.rank == 0:
                    row.update(self.evaluate(self.encoder)[1])
                distributed.barrier(self.world)
            self.window.restart_clock()  # saving and evaluating are not training time
        if row is not None:
            self.logger.log(row)

    def next_epoch(self):
        self.epoch, self.in_epoch = self.epoch + 1, 0
        self.sampler.set_epoch(self.epoch)
        self.steps_this_epoch = len(self.sampler)
        if self.steps_this_epoch == 0:
            raise RuntimeError(f"epoch {self.epoch} of the sampler has no batch")

    def epoch_progress(self):
        return round(self.epoch + self.in_epoch / max(1, self.steps_this_epoch), 4)

    def state(self):
        return {"step": self.step, "epoch": self.epoch, "batch_in_epoch": self.in_epoch, "world_size": self.world,
                "total_steps": self.total_steps, "config": run_settings(self.config),
                "data_fingerprint": self.fingerprint}

    def save(self):
        if not parameters_finite(self.encoder):
            raise TrainingDiverged(self.step, "model weights", "not finite")
        ckpt.save_checkpoint(self.output, self.step, self.encoder, self.optimizer, self.scheduler, self.scaler,
                             self.sampler, self.state(), self.rank, self.world, self.run_dir.own,
                             self.run_dir.disown)

    def finish(self) -> Path:
        final = self.output / "final"
        if self.rank == 0:
            if not parameters_finite(self.encoder):
                raise TrainingDiverged(self.step, "model weights", "not finite")
            tmp = self.output / f"{ckpt.TMP_PREFIX}final"
            self.run_dir.own(tmp.name)
            if tmp.exists():
                ckpt.remove(tmp, self.run_dir.own, self.run_dir.disown)
            self.encoder.save_pretrained(tmp)
            self.run_dir.own(final.name)
            if final.exists():
                ckpt.remove(final, self.run_dir.own, self.run_dir.disown)
            tmp.replace(final)
            self.run_dir.disown(tmp.name)
            if self.evaluate is not None:
                result, flat = self.evaluate(self.encoder)
                self.run_dir.own("final_eval.json")
                result.to_json(self.output / "final_eval.json")
                self.logger.log(dict({"step": self.step, "epoch": self.epoch_progress()}, **flat))
            self.run_dir.set_finished(True)
        distributed.barrier(self.world)
        return final

    def _write_config(self, changes: dict, resumed: bool):
        """train_config.json: the settings, the data fingerprint, and every allowed change made
        on a resume with the step it took effect at (also logged as a config_change row)."""
        path = self.output / "train_config.json"
        history: List[dict] = []
        if resumed and path.exists():
            try:
                history = list(json.loads(path.read_text()).get("changes", []))
            except ValueError:
                history = []
        if changes:
            history.append({"step": self.step, **{k: {"before": a, "after": b} for k, (a, b) in changes.items()}})
            self.logger.log({"step": self.step, "config_change": {k: [a, b] for k, (a, b) in changes.items()}})
        self.run_dir.own(path.name)
        rules.atomic_write_json(path, dict(run_settings(self.config), data_fingerprint=self.fingerprint,
                                           world_size=self.world, changes=history))


class PeriodicEvaluator:
    """RetrievalEvaluator built once (its text layout is reused), run without
    disturbing training's RNG streams or train/eval mode."""

    def __init__(self, benchmark):
        self.benchmark, self.evaluator = benchmark, None

    def __call__(self, encoder):
        if self.evaluator is None:
            self.evaluator = RetrievalEvaluator(self.benchmark, device=encoder.device, show_progress=False)
        was_training = encoder.training
        encoder.eval()
        try:
            with preserved_rng(), torch.no_grad():
                result = self.evaluator.evaluate(encoder)
        finally:
            encoder.train(was_training)
        flat = {f"eval/{setting}/{metric}": float(v) for setting, metrics in result.summary.items()
                for metric, v in metrics.items()}
        return result, flat


@contextmanager
def preserved_rng():
    """Run something (evaluation) without disturbing any RNG stream of training."""
    states = ckpt.all_rng_states()
    try:
        yield
    finally:
        ckpt.restore_rng_states(states)
