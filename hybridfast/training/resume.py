"""Strict resume: a run continues only with the settings that produced its checkpoint.

A checkpoint (and train_config.json of a finished run) records the TrainConfig, the
number of processes and the training data's fingerprint. A resume compares them with
this invocation and refuses every difference that changes the result, listing all of
them at once; only RESUMABLE_CHANGES may differ, and each allowed change is returned so
that the loop records it (train_config.json "changes", a config_change log row).

Read-only: nothing here writes to the output folder.
"""
from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path

from hybridfast.training import checkpoint as ckpt
from hybridfast.training.config import INVOCATION_ONLY, RESUMABLE_CHANGES, TrainConfig, looks_local

FINAL_EVAL_FILE = "final_eval.json"


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


def check_total_steps(state: dict, total_steps: int, checkpoint: Path):
    """A checkpoint already past the new total would be saved as final/ of a shorter run
    (step-80 weights labelled a 30-step run): refuse, saying how to get either."""
    step = int(state.get("step", 0))
    if step > total_steps:
        raise ValueError(f"resume: {checkpoint} is at step {step}, beyond this run's {total_steps} steps "
                         f"(--max-steps / --epochs); a shorter run cannot be resumed from it. Resume with "
                         f"--max-steps {step} or more, or start a new run (another --output)")


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


def final_eval_missing(config, output: Path) -> bool:
    """A finished run whose final evaluation (asked for by --eval) is missing or unreadable:
    the evaluation failed after final/ was complete (e.g. a full disk), and --resume runs it."""
    if config.eval is None:
        return False
    try:
        json.loads((Path(output) / FINAL_EVAL_FILE).read_text())
    except (OSError, ValueError):
        return True
    return False
