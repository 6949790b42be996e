"""Training logs: OUT/train_log.jsonl (+ TensorBoard when installed), rank 0 only
(see docs/architecture.md)."""
from __future__ import annotations

import json
import time
import warnings
from pathlib import Path
from typing import Optional

from hybridfast import rules
from hybridfast.progress import Progress
from hybridfast.training import distributed

LOG_FILE = "train_log.jsonl"


def read_log(path: Path):
    """The rows of a train_log.jsonl. A torn last line (a kill mid-write) is dropped with a
    warning; a bad line before the last is an error naming file:line."""
    lines = [l for l in path.read_text(encoding="utf-8", errors="replace").splitlines() if l.strip()]
    rows = []
    for i, line in enumerate(lines, 1):
        try:
            rows.append(json.loads(line))
        except ValueError:
            if i == len(lines):
                warnings.warn(f"{path}:{i}: the last line is torn (a run killed while writing it); dropped",
                              stacklevel=2)
                break
            raise ValueError(f"{path}:{i}: not a JSON row; the log is damaged (remove the line to resume)") from None
    return rows


class Logger:
    """Appends rows to OUT/train_log.jsonl. On resume the rows after the resumed step (written
    by the killed run for steps that will be redone) are dropped first."""

    def __init__(self, output: Path, enabled: bool, resume_step: Optional[int], own=lambda name: None):
        self.enabled = enabled
        self.path = output / LOG_FILE
        self.writer = None
        if not enabled:
            return
        own(LOG_FILE)
        if resume_step is not None and self.path.exists():
            kept = [r for r in read_log(self.path) if r.get("step", 0) <= resume_step]
            rules.atomic_write_lines(self.path, [json.dumps(r) for r in kept])
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # tensorboard is optional
            SummaryWriter = None
        if SummaryWriter is not None:
            own("tensorboard")
            self.writer = SummaryWriter(str(output / "tensorboard"))

    def log(self, row: dict):
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.writer is not None:
            for key, value in row.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "step":
                    self.writer.add_scalar(key if "/" in key else f"train/{key}", value, row["step"])

    def close(self):
        if self.writer is not None:
            self.writer.close()


class Window:
    """Losses since the last log row, per batch kind, kept as device tensors."""

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
        means = {k: distributed.mean_over_ranks(float(self.sums[k]) / self.counts[k], world, device)
                 for k in sorted(self.sums)}
        row = {"loss": sum(means[k] * self.counts[k] for k in means) / n}
        row.update({f"loss_{k}": v for k, v in means.items()})
        row["examples_per_s"] = n * examples_per_step / elapsed
        self.__init__()
        return row


class TrainingProgress(Progress):
    """Progress of a training run (hybridfast.progress.Progress): off a terminal one plain line per
    log row, "train: step 40/72 (56%), 1.93 steps/s, loss 1.2345, ETA 0:17"."""

    def __init__(self, total, initial, enabled, stream=None):
        super().__init__(total, "train", "step", enabled=enabled, initial=initial, every=None, stream=stream,
                         label="step", digits=2)

    def row(self, row: dict) -> None:
        if "step" in row:
            loss = f", loss {row['loss']:.4f}" if isinstance(row.get("loss"), float) else ""
            self.line(done=row["step"], extra=loss)
