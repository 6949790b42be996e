"""The output folder of a training run: what it owns, who holds it (see docs/architecture.md).

Rules (docs/training.md states them for users):
* A run writes only into a folder that is new, empty, or holds an earlier run of
  hybridfast train. OUT/.hybridfast-run.json lists every name the runs wrote there
  (recorded before the file or folder is created); anything else is the user's.
* A user's file is never deleted or overwritten. A folder holding user files is
  refused unless --overwrite (or --resume) is given, and even then a user's file with a
  name the run writes (final/, checkpoint-N/, train_log.jsonl, ...) is refused.
* An earlier run is continued with --resume or replaced with --overwrite, which removes
  only the names listed as the run's own.
* The model must not live inside the output folder (the run would overwrite it).
* OUT/.hybridfast.lock (pid and host of the owner) keeps a second run out; it is removed
  when the run ends, and a lock whose process is gone (same host) is taken over with a
  warning.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import socket
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import List, Optional

from hybridfast import rules
from hybridfast.training.checkpoint import CHECKPOINT_RE, TMP_PREFIX, list_checkpoints, newest_intact, remove

OWNER_FILE = ".hybridfast-run.json"
LOCK_FILE = ".hybridfast.lock"
# names a run writes; a user's entry with one of these names is never replaced
_WRITES = ("train_config.json", "train_log.jsonl", "tensorboard", "final", "final_eval.json")
# rules.atomic_write's temporaries of our own files
_ATOMIC_TMP = re.compile(r"^\.(train_log\.jsonl|train_config\.json|final_eval\.json|\.hybridfast-run\.json)\..+\.tmp$")


class OutputFolderError(ValueError):
    """The output folder cannot be used as asked; the message says why and what to do."""


def _would_write(name: str) -> bool:
    return name in _WRITES or bool(CHECKPOINT_RE.match(name)) or name.startswith(TMP_PREFIX)


class RunFolder:
    def __init__(self, path):
        self.path = Path(path).expanduser()
        self.record_path = self.path / OWNER_FILE

    # ------------------------------------------------------------------ ownership record
    def record(self) -> Optional[dict]:
        try:
            data = json.loads(self.record_path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as err:
            raise OutputFolderError(f"output: {self.record_path} is unreadable ({err}); move the folder away") from None
        if not isinstance(data, dict) or not isinstance(data.get("entries"), list):
            raise OutputFolderError(f"output: {self.record_path} is not a hybridfast run record")
        return data

    def _save(self, data):
        rules.atomic_write_json(self.record_path, data)

    def own(self, name: str):
        data = self.record() or {"entries": [], "finished": False}
        if name not in data["entries"]:
            data["entries"].append(name)
            self._save(data)

    def disown(self, name: str):
        data = self.record()
        if data is not None and name in data["entries"] and not (self.path / name).exists():
            data["entries"].remove(name)
            self._save(data)

    def set_finished(self, finished: bool):
        data = self.record() or {"entries": []}
        data["finished"] = finished
        self._save(data)

    def own_names(self) -> List[str]:
        data = self.record()
        return list(data["entries"]) if data else []

    def foreign(self) -> List[str]:
        """Entries of the folder that no run wrote (the user's)."""
        if not self.path.is_dir():
            return []
        mine = set(self.own_names()) | {OWNER_FILE, LOCK_FILE}
        return sorted(p.name for p in self.path.iterdir() if p.name not in mine and not _ATOMIC_TMP.match(p.name))

    # ------------------------------------------------------------------ decisions
    def check_model(self, model: Optional[str]):
        """Refuse a model folder inside (or equal to) the output folder."""
        if model is None or not Path(str(model)).expanduser().exists():
            return
        m, out = Path(str(model)).expanduser().resolve(), self.path.resolve()
        if m == out or out in m.parents:
            raise OutputFolderError(f"model {str(model)!r} lies inside the output folder {self.path}: training "
                                    "would overwrite it; copy the model elsewhere or choose another --output")

    def plan(self, resume: bool, overwrite: bool):
        """What to do: ("fresh", None), ("resume", checkpoint) or ("finished", final folder).
        Reads only; raises OutputFolderError for anything the rules refuse."""
        out = self.path
        if out.exists() and not out.is_dir():
            raise OutputFolderError(f"output: {out} exists and is not a folder")
        if not out.is_dir() or not any(out.iterdir()):
            if resume:
                raise OutputFolderError(f"--resume: {out} holds no training run to resume (no checkpoint); "
                                        "run without --resume to start one")
            return "fresh", None
        foreign = self.foreign()
        clash = [n for n in foreign if _would_write(n)]
        if clash:
            raise OutputFolderError(f"output: {out} holds {clash}, which hybridfast did not write but a run writes "
                                    "under these names; it will not replace them. Move them away or choose "
                                    "another --output")
        record = self.record()
        if resume:
            if record is None:
                raise OutputFolderError(f"--resume: {out} holds no hybridfast training run")
            if _has_final(out, record):
                return "finished", out / "final"
            checkpoint, problems = newest_intact(out)
            if checkpoint is None:
                why = f" (damaged: {'; '.join(problems)})" if problems else ""
                raise OutputFolderError(f"--resume: no intact checkpoint in {out}{why}; the run stopped before "
                                        "its first --save-steps checkpoint. Start again with --overwrite")
            return "resume", checkpoint
        if record is not None and _has_final(out, record) and not overwrite:
            raise OutputFolderError(f"output: {out} already holds a training run that finished (its model: "
                                    f"{out / 'final'}); "
                                    "it is left untouched. --resume reports it (and runs a final evaluation "
                                    "that did not complete); to train again, choose another --output")
        if record is not None and [n for n in record["entries"] if (out / n).exists()] and not overwrite:
            raise OutputFolderError(f"output: {out} already holds a training run; pass resume=True (--resume) to "
                                    "continue it, overwrite=True (--overwrite) to start again (removes only "
                                    "hybridfast's own files there), or choose another output folder")
        if foreign and not overwrite:
            raise OutputFolderError(f"output: {out} holds files hybridfast did not write ({foreign[:5]}"
                                    f"{' ...' if len(foreign) > 5 else ''}); choose a new or empty folder, or pass "
                                    "--overwrite to write beside them (they are left untouched)")
        return "fresh", None

    def snapshot(self):
        """What plan() decided on, cheaply comparable: the entries, the run record and the
        checkpoints' manifests (names and sizes), ignoring the lock."""
        if not self.path.is_dir():
            return [], None, {}
        entries = sorted(p.name for p in self.path.iterdir() if p.name != LOCK_FILE)
        manifests = {c.name: (c / "manifest.json").stat().st_size for c in self.path.iterdir()
                     if CHECKPOINT_RE.match(c.name) and (c / "manifest.json").is_file()}
        return entries, self.record(), manifests

    def clear_own(self):
        """--overwrite / a fresh start: remove every entry a run wrote (never the user's)."""
        for name in self.own_names():
            target = self.path / name
            if target.is_dir():
                remove(target, self.own, self.disown)
            elif target.exists():
                target.unlink()
                self.disown(name)
            else:
                self.disown(name)
        for p in self.path.iterdir():
            if _ATOMIC_TMP.match(p.name):
                p.unlink()
        self.set_finished(False)

    def clean_temporaries(self):
        """Our own temporaries left by a killed run (never a user's .tmp-* folder)."""
        for name in self.own_names():
            if name.startswith(TMP_PREFIX) and (self.path / name).exists():
                target = self.path / name
                if target.is_dir():
                    shutil.rmtree(target, ignore_errors=True)
                else:
                    target.unlink()
                self.disown(name)

    # ------------------------------------------------------------------ lock
    @contextmanager
    def lock(self, kind: str = "training run"):
        """Hold OUT/.hybridfast.lock for the block (the folder is created if needed). Re-entrant
        within a process: a study holds its cell's folder and the training inside takes the same
        lock again. `kind` names the holder in the message another process gets."""
        created = not self.path.exists()
        self.path.mkdir(parents=True, exist_ok=True)
        path = self.path / LOCK_FILE
        key = str(path.resolve())
        if key in _HELD:  # this process holds it already (an outer block releases it)
            yield self
            return
        me = {"pid": os.getpid(), "host": socket.gethostname(), "kind": kind,
              "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
        try:
            self._acquire(path, me)
        except BaseException:
            if created:
                _rmdir_if_empty(self.path)
            raise
        _HELD.add(key)
        try:
            yield self
        finally:
            _HELD.discard(key)
            try:
                holder = json.loads(path.read_text())
                if holder.get("pid") == me["pid"] and holder.get("host") == me["host"]:
                    path.unlink()
            except (OSError, ValueError):
                pass
            if created:
                _rmdir_if_empty(self.path)  # nothing was written: leave no empty folder behind

    def _acquire(self, path: Path, me: dict):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            self._take_over_if_stale(path)
            rules.atomic_write_json(path, me)
            return
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
        except BaseException:  # e.g. no space left: an empty lock must not stay behind
            path.unlink()
            raise

    def _take_over_if_stale(self, path: Path):
        try:
            holder = json.loads(path.read_text())
            pid, host = int(holder["pid"]), str(holder["host"])
        except (OSError, ValueError, KeyError, TypeError):
            warnings.warn(f"{path} is unreadable (a run killed while taking it?); taking it over", stacklevel=3)
            return
        if host == socket.gethostname() and not _alive(pid):
            warnings.warn(f"{path}: the run that held it (pid {pid} on {host}) is gone; taking the lock over",
                          stacklevel=3)
            return
        kind = holder.get("kind", "training run")
        raise OutputFolderError(f"output: {self.path} is in use by another {kind} (pid {pid} on host {host}, "
                                f"lock file {path}); wait for it, or delete the lock file if that run is gone")


# lock files this process holds (resolved paths): what makes RunFolder.lock re-entrant
_HELD: set = set()


def _rmdir_if_empty(folder: Path):
    try:
        if not any(folder.iterdir()):
            folder.rmdir()
    except OSError:
        pass


def run_status(output) -> str:
    """What `output` holds, for callers that decide between resume and overwrite (the study):
    "empty" (missing or empty), "foreign" (files no run wrote, no run), "finished",
    "resumable" (an unfinished run with a complete checkpoint; verified on resume), or
    "unfinished" (a run that stopped before its first checkpoint: start it again with overwrite)."""
    folder = RunFolder(output)
    if not folder.path.is_dir() or not any(p.name != LOCK_FILE for p in folder.path.iterdir()):
        return "empty"
    record = folder.record()
    if record is None:
        return "foreign"
    if _has_final(folder.path, record):
        return "finished"
    return "resumable" if list_checkpoints(folder.path) else "unfinished"


def _has_final(out: Path, record: dict) -> bool:
    """The run wrote final/ (renamed into place only once complete): it finished training, even
    if the record was not marked (a crash right after the rename) or its final evaluation failed."""
    return (out / "final").is_dir() and (bool(record.get("finished")) or "final" in record.get("entries", []))


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True
