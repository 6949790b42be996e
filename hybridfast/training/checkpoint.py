"""Checkpoints: atomic, verified, pruned, resumable (see docs/architecture.md).

OUT/checkpoint-<step>/ holds the weights (save_pretrained), optimizer, scheduler, the
sampler position and every RNG state per rank (rank<r>.pt), trainer_state.json and,
written last, manifest.json: the size and sha256 of every other file. Everything is
written into OUT/.tmp-checkpoint-<step>/ and renamed into place, so a kill (or a full
disk) at any moment leaves the previous checkpoint intact. A checkpoint without a
manifest is incomplete and ignored; one whose files do not match their manifest
(truncated, corrupted) is skipped on resume with a warning naming it and the file, and
the newest intact one is used instead.

Hand-written rather than transformers.Trainer's checkpoints because resume must be
bit-exact: the hybrid sampler's mid-epoch position and every RNG stream of every rank
are part of the state.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional, Tuple

import numpy as np
import torch

from hybridfast import rules
from hybridfast.training import distributed

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
TMP_PREFIX = ".tmp-"
STATE_FILE = "trainer_state.json"
MANIFEST = "manifest.json"  # written last: its presence marks a complete checkpoint
KEEP_CHECKPOINTS = 2


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or read; the message names the folder and file."""


# ----------------------------------------------------------------------------- RNG

def all_rng_states():
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def restore_rng_states(states):
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if states.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


# ----------------------------------------------------------------------------- listing and verifying

def list_checkpoints(output) -> List[Path]:
    """Complete checkpoints (with a manifest) in `output`, oldest first. Not verified: see newest_intact."""
    out = Path(output)
    if not out.is_dir():
        return []
    found = []
    for d in out.iterdir():
        m = CHECKPOINT_RE.match(d.name)
        if m and d.is_dir() and (d / MANIFEST).is_file():
            found.append((int(m.group(1)), d))
    return [d for _, d in sorted(found)]


def _files(folder: Path) -> List[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)


def write_manifest(folder: Path):
    files = {name: {"size": (folder / name).stat().st_size, "sha256": rules.sha256_file(folder / name)}
             for name in _files(folder)}
    rules.atomic_write_json(folder / MANIFEST, {"files": files})


def verify(folder: Path) -> Optional[str]:
    """None when every file matches the manifest; else what is wrong, naming the file."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        return f"{folder / MANIFEST} is unreadable ({err})"
    for name, meta in manifest.items():
        path = folder / name
        if not path.is_file():
            return f"{path} is missing"
        if path.stat().st_size != meta["size"]:
            return f"{path} has {path.stat().st_size} bytes, the manifest says {meta['size']}"
        if rules.sha256_file(path) != meta["sha256"]:
            return f"{path} does not match its sha256 in the manifest"
    return None


def newest_intact(output) -> Tuple[Optional[Path], List[str]]:
    """(the newest checkpoint whose files match its manifest, problems of newer broken ones).
    Each broken one is named in a warning."""
    problems = []
    for folder in reversed(list_checkpoints(output)):
        problem = verify(folder)
        if problem is None:
            return folder, problems
        problems.append(problem)
        warnings.warn(f"checkpoint {folder} is damaged and skipped: {problem}", stacklevel=2)
    return None, problems


# ----------------------------------------------------------------------------- writing

@dataclass
class TrainingObjects:
    """What a checkpoint saves and restores besides the step counters: the model and the
    objects whose state continues the run exactly."""

    encoder: object
    optimizer: object
    scheduler: object
    scaler: Optional[object]
    sampler: object


def _no_record(name: str) -> None:
    """Default for own/disown when no run folder records names (direct library use)."""


def save_checkpoint(output: Path, step, objects: TrainingObjects, state, rank, world,
                    own: Callable[[str], None] = _no_record, disown: Callable[[str], None] = _no_record) -> Path:
    """Write OUT/checkpoint-<step> atomically (temp folder, manifest last, rename) and keep the
    newest KEEP_CHECKPOINTS. `own`/`disown` record the names in the run folder's ownership list.
    On a failed write (e.g. no space left) the temp folder is removed and the previous
    checkpoints stay; CheckpointError says so."""
    final = output / f"checkpoint-{step}"
    tmp = output / f"{TMP_PREFIX}checkpoint-{step}"
    try:
        if rank == 0:
            own(tmp.name)
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
        distributed.barrier(world)
        torch.save({"sampler": objects.sampler.state_dict(step=state["batch_in_epoch"]), "rng": all_rng_states()},
                   tmp / f"rank{rank}.pt")
        distributed.barrier(world)
        if rank == 0:
            _write_rank0_files(tmp, objects, state)
    except (OSError, RuntimeError) as err:
        full = rules.is_disk_full(err, tmp)  # measured before the partial files are removed
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            disown(tmp.name)
        previous = list_checkpoints(output)
        raise CheckpointError(
            f"could not write {final}: {'no space left on device' if full else err}; it was discarded and "
            + (f"the previous checkpoint {previous[-1]} is kept" if previous else "no earlier checkpoint exists")
        ) from err
    distributed.barrier(world)
    if rank == 0:
        own(final.name)
        if final.exists():  # left by an earlier run that got further than the one resumed
            remove(final, own, disown)
        os.replace(tmp, final)
        rules.fsync_dir(output)
        disown(tmp.name)
        for old in list_checkpoints(output)[:-KEEP_CHECKPOINTS]:
            remove(old, own, disown)
    distributed.barrier(world)
    return final


def _write_rank0_files(tmp: Path, objects: TrainingObjects, state: dict):
    objects.encoder.save_pretrained(tmp)
    torch.save(objects.optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save(objects.scheduler.state_dict(), tmp / "scheduler.pt")
    if objects.scaler is not None:
        torch.save(objects.scaler.state_dict(), tmp / "scaler.pt")
    rules.atomic_write_json(tmp / STATE_FILE, state)
    follow_umask_tree(tmp)
    write_manifest(tmp)


def follow_umask_tree(folder: Path):
    """Ordinary permissions (the umask's) for a folder written through safetensors and
    temporaries, which create owner-only files: colleagues in the group can load the model."""
    rules.follow_umask(folder, 0o777)
    for root, dirs, files in os.walk(folder):
        for name in dirs:
            rules.follow_umask(os.path.join(root, name), 0o777)
        for name in files:
            rules.follow_umask(os.path.join(root, name))


def remove(folder: Path, own=_no_record, disown=_no_record):
    """Delete one of our folders. Renamed first: a kill during rmtree must not leave a
    half-deleted folder under a name that looks complete."""
    doomed = folder.with_name(f"{TMP_PREFIX}delete-{folder.name}")
    own(doomed.name)
    os.replace(folder, doomed)
    disown(folder.name)
    shutil.rmtree(doomed, ignore_errors=True)
    disown(doomed.name)


# ----------------------------------------------------------------------------- reading

def load(path: Path, device=None):
    """One of our own files (optimizer state, RNG tuples: full unpickling needed); a failure names it."""
    try:
        return torch.load(path, map_location=device or "cpu", weights_only=False)
    except Exception as err:  # noqa: BLE001 - any unpickling error becomes one clear message
        raise CheckpointError(f"cannot read {path}: {type(err).__name__}: {err}") from err


def read_state(folder: Path) -> dict:
    try:
        return json.loads((folder / STATE_FILE).read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"cannot read {folder / STATE_FILE}: {err}") from err


def restore(folder: Path, objects: TrainingObjects, rank, device):
    """Optimizer, schedule, loss scaler, this rank's sampler position and RNG streams (the
    weights were loaded with the model)."""
    objects.optimizer.load_state_dict(load(folder / "optimizer.pt", device))
    objects.scheduler.load_state_dict(load(folder / "scheduler.pt"))
    if objects.scaler is not None and (folder / "scaler.pt").exists():
        objects.scaler.load_state_dict(load(folder / "scaler.pt"))
    mine = load(folder / f"rank{rank}.pt")
    objects.sampler.load_state_dict(mine["sampler"])
    restore_rng_states(mine["rng"])


# ----------------------------------------------------------------------------- the final model

def save_final(output: Path, encoder, own: Callable[[str], None] = _no_record,
               disown: Callable[[str], None] = _no_record) -> Path:
    """Write OUT/final through OUT/.tmp-final and a rename: final/ is complete or absent. On a
    failed write (a full disk inside safetensors included) the partial .tmp-final is removed
    and CheckpointError names the folder and the checkpoint a --resume would continue from."""
    final, tmp = output / "final", output / f"{TMP_PREFIX}final"
    own(tmp.name)
    try:
        if tmp.exists():
            remove(tmp, own, disown)
        encoder.save_pretrained(tmp)
        follow_umask_tree(tmp)
    except Exception as err:  # noqa: BLE001 - safetensors raises its own error type on a full disk
        full = rules.is_disk_full(err, tmp)
        shutil.rmtree(tmp, ignore_errors=True)
        disown(tmp.name)
        kept = list_checkpoints(output)
        raise CheckpointError(
            f"could not write {final}: {'no space left on device' if full else err}; the partial copy was "
            "removed. " + (f"Free some space and run again with --resume (it continues from {kept[-1]})"
                           if kept else "No checkpoint exists (use --save-steps to keep one); free some space "
                                        "and run again")) from err
    own(final.name)
    if final.exists():
        remove(final, own, disown)
    os.replace(tmp, final)
    rules.fsync_dir(output)
    disown(tmp.name)
    return final
