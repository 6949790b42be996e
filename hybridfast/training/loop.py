"""`train(config)`: the training loop of `hybridfast train` (see docs/training.md).

    data -> HybridBatchSampler -> Collator (prefix + tokenise) -> Encoder -> loss
         -> backward (plain or GradCache) -> average over ranks -> clip -> AdamW -> schedule

Before anything is written: the config is checked, the data loaded, the output folder's
rules applied (hybridfast.training.rundir), a resume compared with the checkpoint's run
(hybridfast.training.resume: strict, every setting that changes the result, and the
training data's fingerprint), and the model loaded with a length that fits its position
table. Then the folder is locked for the run. Exact resume: a checkpoint holds the weights,
optimizer, scheduler, sampler position and every RNG state; hard negatives are drawn from a
generator seeded by (seed, step, example), so they need no saved state. SIGINT / SIGTERM
stop after the current step with a checkpoint (hybridfast.training.signals).
"""
from __future__ import annotations

import json
import random
import signal
import warnings
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional

import numpy as np
import torch
from transformers import get_linear_schedule_with_warmup

from hybridfast import encoder as encoder_module
from hybridfast import rules
from hybridfast._backends import resolve_device
from hybridfast.data import load_benchmark
from hybridfast.data.pairs import load_training_pairs
from hybridfast.loss import HybridContrastiveLoss
from hybridfast.models import default_model
from hybridfast.sampler import HybridBatchSampler
from hybridfast.training import checkpoint as ckpt
from hybridfast.training import distributed
from hybridfast.training.batches import Collator, batch_kind, prefetch
from hybridfast.training.config import TrainConfig, looks_local
from hybridfast.training.log import Logger, TrainingProgress, Window, read_log
from hybridfast.training.periodic_eval import PeriodicEvaluator
from hybridfast.training.resume import (FINAL_EVAL_FILE, check_finished, check_total_steps, final_eval_missing,
                                        resume_state, run_settings)
from hybridfast.training.rundir import RunFolder
from hybridfast.training.signals import Interrupted, graceful_stop
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


@dataclass
class Prepared:
    """Everything a run needs, checked and loaded before the output folder is touched."""

    config: TrainConfig
    device: torch.device
    rank: int
    world: int
    run_dir: RunFolder
    pairs: object
    sampler: HybridBatchSampler
    benchmark: object             # the --eval benchmark, or None
    encoder: object
    checkpoint: Optional[Path]    # the checkpoint resumed from, or None
    state: Optional[dict]         # its trainer state (with the allowed "changes"), or None
    fingerprint: str              # of the training data


def _train(config, device, rank, world, on_step):
    pairs, sampler, benchmark = load_data(config, rank, world)
    run_dir = RunFolder(config.output)
    run_dir.check_model(config.model)
    action, found = run_dir.plan(config.resume, config.overwrite)
    seen = run_dir.snapshot()
    fingerprint = pairs.fingerprint()
    if action == "finished":
        check_finished(config, found, fingerprint, world)
        return _finished(config, found, benchmark, device, rank, run_dir)
    state = None
    if action == "resume":
        state = resume_state(config, found, fingerprint, world)
        check_total_steps(state, config.max_steps or epoch_steps(sampler, config.epochs), found)
    encoder = load_encoder(config, found, device)  # may fail (hub, max_length): nothing is written yet
    distributed.barrier(world)  # every rank has read the folder before rank 0 changes it
    with run_dir.lock() if rank == 0 else nullcontext():
        if rank == 0:
            if run_dir.snapshot() != seen:  # another run got in between: decide again
                raise RuntimeError(f"{config.output} changed while the model loaded; run again")
            run_dir.clear_own() if action == "fresh" else run_dir.clean_temporaries()
        distributed.barrier(world)
        prepared = Prepared(config, device, rank, world, run_dir, pairs, sampler, benchmark, encoder, found, state,
                            fingerprint)
        return _Run(prepared).loop(on_step)


def _finished(config, final: Path, benchmark, device, rank, run_dir: RunFolder) -> Path:
    """--resume of a finished run: nothing to train. If its final evaluation did not complete
    (e.g. the disk filled up after final/ was written), run it now; else leave it untouched."""
    if benchmark is None or not final_eval_missing(config, run_dir.path):
        warnings.warn(f"{config.output}: this run finished already ({final}); nothing to resume, left untouched",
                      stacklevel=3)
        return final
    if rank == 0:
        with run_dir.lock():
            encoder = encoder_module.Encoder(str(final), device=str(device), show_progress=False)
            rows = read_log(run_dir.path / "train_log.jsonl") if (run_dir.path / "train_log.jsonl").exists() else []
            step = max((r.get("step", 0) for r in rows), default=0)
            logger = Logger(run_dir.path, True, None, run_dir.own)
            try:
                write_final_eval(run_dir, PeriodicEvaluator(benchmark), encoder, {"step": step}, logger.log)
            finally:
                logger.close()
        warnings.warn(f"{config.output}: this run finished already ({final}); its final evaluation was missing "
                      f"and is now written ({run_dir.path / FINAL_EVAL_FILE})", stacklevel=3)
    return final


def write_final_eval(run_dir: RunFolder, evaluate: PeriodicEvaluator, encoder, row: dict, log: Callable):
    """Evaluate the final model; final_eval.json is replaced atomically and `log` gets its row."""
    result, flat = evaluate(encoder)
    run_dir.own(FINAL_EVAL_FILE)
    rules.atomic_write_json(run_dir.path / FINAL_EVAL_FILE, result.to_dict())
    log(dict(row, **flat))


def prepare(config: TrainConfig, rank=0, world=1):
    """Validate config and load data, sampler and eval benchmark: everything that can fail
    fast, before any model is loaded. Returns (pairs, sampler, benchmark)."""
    config.validate()
    return load_data(config, rank, world)


def load_data(config: TrainConfig, rank=0, world=1):
    """prepare() for a config that has been validated."""
    languages = rules.check_languages(config.languages)
    pairs = load_training_pairs(config.train, data_dir=config.data_dir, split=config.split, languages=languages,
                                allow_modified=config.allow_modified_data)
    if config.mode != "mono" and len(pairs.languages) < 2:
        raise ValueError(f"mode={config.mode!r} needs at least two languages; the training data has "
                         f"{pairs.languages} (use mode='mono')")
    sampler = build_sampler(config, pairs, rank, world)
    if sampler.epoch_length() == 0:
        raise ValueError(f"batch_size={config.batch_size} x {world} process(es) leaves no full batch in "
                         f"{len(pairs)} examples")
    benchmark = None
    if config.eval is not None:
        benchmark = load_benchmark(config.eval, data_dir=config.data_dir, languages=languages,
                                   split=config.eval_split, allow_modified=config.allow_modified_data)
    return pairs, sampler, benchmark


def build_sampler(config, pairs, rank, world):
    weights = config.lang_weights if isinstance(config.lang_weights, str) else None  # "size" or "size^TAU"
    if isinstance(config.lang_weights, dict):
        weights = np.array(rules.language_weights(config.lang_weights, pairs.languages))
    return HybridBatchSampler(pairs.availability, config.batch_size, mode=config.mode, mono_prob=config.mono_prob,
                              lang_weights=weights, groups=pairs.groups, seed=config.seed, rank=rank,
                              world_size=world, drop_last=True)


# ----------------------------------------------------------------------------- model

def load_encoder(config, checkpoint: Optional[Path], device):
    """The Encoder from the checkpoint (resume) or config.model, with clear errors for a model
    that cannot be loaded. The length rule is the Encoder's: without max_length the model's
    saved length clamped to its position table; an explicit one beyond the table is refused
    (its ValueError names max_length and passes through as it is)."""
    random.seed(config.seed)
    np.random.seed(config.seed)
    torch.manual_seed(config.seed)
    path = str(checkpoint) if checkpoint is not None else (config.model or default_model())
    kwargs = dict(device=str(device), show_progress=False)
    for name in ("max_length", "query_prefix", "passage_prefix"):
        if getattr(config, name) is not None:
            kwargs[name] = getattr(config, name)
    try:
        return encoder_module.Encoder(path, **kwargs)
    except (OSError, ValueError) as err:
        if isinstance(err, ValueError) and str(err).startswith("max_length"):
            raise
        where = "a local folder" if looks_local(path) else "a hub name: not in the local cache and the hub " \
                                                             "could not be reached or has no such model"
        raise ValueError(f"model {path!r} could not be loaded ({where}): {str(err).splitlines()[0]}") from err


def epoch_steps(sampler, epochs):
    """Steps in the first `epochs` epochs (hybrid epochs can differ in length)."""
    current, total = sampler.epoch, 0
    for e in range(epochs):
        sampler.set_epoch(e)
        total += sampler.epoch_length()
    sampler.set_epoch(current)
    return total


# ----------------------------------------------------------------------------- the run

def make_optimizer(encoder, config):
    """AdamW, fused where PyTorch has the fused kernel (CPU and CUDA): one pass over the
    parameters instead of a dozen elementwise sweeps. It matters for XLM-R vocabularies: a
    250k x 384 embedding table is 96M of multilingual-e5-small's 118M parameters, and its
    update took 0.93 s per step unfused against 0.08 s fused on the 2-core development CPU."""
    groups = param_groups(encoder, config.weight_decay)
    try:
        return torch.optim.AdamW(groups, lr=config.lr, fused=True)
    except (RuntimeError, ValueError):  # a device or dtype the fused kernel does not take
        return torch.optim.AdamW(groups, lr=config.lr)


class _Run:
    """One training run's objects and position; `loop` is the whole training."""

    def __init__(self, prep: Prepared):
        config, encoder, sampler = prep.config, prep.encoder, prep.sampler
        self.config, self.device, self.rank, self.world, self.run_dir = (config, prep.device, prep.rank, prep.world,
                                                                         prep.run_dir)
        self.output, self.sampler, self.encoder = Path(config.output), sampler, encoder
        self.fingerprint = prep.fingerprint
        self.evaluate = PeriodicEvaluator(prep.benchmark) if prep.benchmark is not None else None
        encoder.train()
        if config.gradient_checkpointing:
            enable_checkpointing(encoder.model)
        self.model = distributed.wrap(encoder, self.world, self.device)  # the forward passes go through this
        torch.manual_seed(config.seed + self.rank)  # each rank its own dropout masks
        self.loss_fn = HybridContrastiveLoss(temperature=config.temperature, similarity="cos",
                                             gather_across_devices=config.gather_across_devices and self.world > 1)
        self.params = [p for p in encoder.parameters() if p.requires_grad]
        optimizer = make_optimizer(encoder, config)
        self.total_steps = config.max_steps or epoch_steps(sampler, config.epochs)
        scheduler = get_linear_schedule_with_warmup(optimizer, int(round(config.warmup_ratio * self.total_steps)),
                                                    self.total_steps)
        self.amp_dtype = torch.bfloat16 if config.bf16 else torch.float16 if config.fp16 else None
        scaler = torch.amp.GradScaler("cuda") if config.fp16 else None
        self.objects = ckpt.TrainingObjects(encoder, optimizer, scheduler, scaler, sampler)
        state = prep.state or {"step": 0, "epoch": 0, "batch_in_epoch": 0, "changes": {}}
        self.step, self.epoch, self.in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]
        self.saved_step = self.step if prep.checkpoint is not None else None
        if prep.checkpoint is not None:
            ckpt.restore(prep.checkpoint, self.objects, self.rank, self.device)
        else:
            sampler.set_epoch(self.epoch)
        self.steps_this_epoch = sampler.epoch_length()
        self.collate = Collator(prep.pairs, encoder, config.hard_negatives, config.seed, encoder.max_length)
        # resuming drops log rows of steps that will be redone
        self.logger = Logger(self.output, self.rank == 0, self.step if prep.checkpoint is not None else None,
                             self.run_dir.own)
        self.window = Window()
        self.progress: Optional[TrainingProgress] = None  # set by loop()
        if self.rank == 0:
            self._write_config(state["changes"], prep.checkpoint is not None)

    def loop(self, on_step: StepCallback) -> Path:
        bar = self.progress = TrainingProgress(self.total_steps, self.step, self.config.show_progress and self.rank == 0)
        try:
            with graceful_stop() as stop:
                while self.step < self.total_steps:
                    # a resumed sampler starts at its saved position; the next batch is tokenised meanwhile
                    for batch, inputs in prefetch(self.sampler, self.collate, self.step):
                        self.train_step(batch, inputs)
                        bar.update()
                        if on_step is not None:
                            on_step(self.step)
                        self.stop_if_asked(stop)
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

    def stop_if_asked(self, stop):
        """After a step: on SIGINT / SIGTERM (on any rank) save a checkpoint here and stop."""
        if not distributed.any_rank(bool(stop), self.world, self.device):
            return
        if self.saved_step != self.step:
            self.save()
        raise Interrupted(stop.signum or signal.SIGINT, self.step, self.output / f"checkpoint-{self.step}")

    def train_step(self, batch, inputs):
        config = self.config
        kind = batch_kind(batch)
        if config.chunk_size:
            loss = gradcache_step(self.encoder, self.loss_fn, *inputs, config.chunk_size, self.amp_dtype,
                                  self.objects.scaler, model=self.model)
        else:
            loss = plain_step(self.encoder, self.loss_fn, *inputs, self.amp_dtype, self.objects.scaler,
                              model=self.model)
        objects = self.objects
        lr = objects.scheduler.get_last_lr()[0]
        update(self.params, objects.optimizer, objects.scheduler, objects.scaler, self.world, loss, self.step + 1)
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
            if self.progress is not None:
                self.progress.row(row)

    def next_epoch(self):
        self.epoch, self.in_epoch = self.epoch + 1, 0
        self.sampler.set_epoch(self.epoch)
        self.steps_this_epoch = self.sampler.epoch_length()
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
        ckpt.save_checkpoint(self.output, self.step, self.objects, self.state(), self.rank, self.world,
                             self.run_dir.own, self.run_dir.disown)
        self.saved_step = self.step

    def finish(self) -> Path:
        """final/ (complete or absent), marked finished at once; then the final evaluation, whose
        failure leaves a finished run that --resume evaluates (never one to retrain)."""
        final = self.output / "final"
        if self.rank == 0:
            if not parameters_finite(self.encoder):
                raise TrainingDiverged(self.step, "model weights", "not finite")
            ckpt.save_final(self.output, self.encoder, self.run_dir.own, self.run_dir.disown)
            self.run_dir.set_finished(True)
            if self.evaluate is not None:
                write_final_eval(self.run_dir, self.evaluate, self.encoder,
                                 {"step": self.step, "epoch": self.epoch_progress()}, self.logger.log)
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
                                           world_size=self.world, max_length_used=self.encoder.max_length,
                                           changes=history))
