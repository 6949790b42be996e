"""The model cache on disk: where it is, what a complete entry is, how entries are written.

- Completeness: every build ends by writing hybridfast_model.json with the size and
  sha256 of each file it wrote. An entry is complete when those files are there with
  those sizes (sizes always: a stat per file; hashes on request, `verify=True`).
  Folders without that record (the bundled MiniLM, older caches) must hold a config,
  weights and a tokenizer, and each safetensors file must be as long as its header says.
- Writing: into a staging sibling `.NAME.tmp-*` renamed into place when complete, so
  a kill leaves no half model under the real name. A damaged entry is replaced by
  moving it aside first (a plain rename onto a non-empty folder fails). Staging
  folders left by a killed run are removed by the next one.
- Permissions: mkdtemp and safetensors create owner-only entries; finished folders
  get the umask's modes like any file the user creates.
"""
import errno
import json
import os
import shutil
import socket
import struct
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

from hybridfast.rules import atomic_write_json, sha256_file

MODEL_INFO_FILE = "hybridfast_model.json"
_OWNER_FILE = ".hybridfast-stage.json"
_STARTED = time.time()           # stages older than this process, with no live owner, are leftovers
_FOREIGN_STAGE_AGE = 24 * 3600   # a stage from another host is left alone for a day
_WEIGHTS = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json", "pytorch_model.bin.index.json")
_TOKENIZERS = ("tokenizer.json", "vocab.txt", "sentencepiece.bpe.model", "spiece.model", "tokenizer.model",
               "vocab.json")


def cache_dir() -> Path:
    """$HYBRIDFAST_MODELS, else <$XDG_CACHE_HOME or ~/.cache>/hybridfast/models."""
    if os.environ.get("HYBRIDFAST_MODELS"):
        return Path(os.environ["HYBRIDFAST_MODELS"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "hybridfast" / "models"


# ----------------------------------------------------------------------------- the build record

def write_info(folder: Path, info: dict) -> None:
    """Record `info` plus the size and sha256 of every file of `folder`; a build's last step."""
    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(folder).as_posix()
        if rel not in (MODEL_INFO_FILE, _OWNER_FILE):
            files[rel] = {"size": path.stat().st_size, "sha256": sha256_file(path)}
    atomic_write_json(folder / MODEL_INFO_FILE, {**{k: v for k, v in info.items() if k != "files"},
                                                 "files": files})


def read_info(folder) -> dict:
    """The build record of `folder` ({} where there is none or it cannot be read)."""
    try:
        info = json.loads((Path(folder) / MODEL_INFO_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


def safetensors_problem(path: Path) -> Optional[str]:
    """Why a safetensors file cannot be whole (shorter or longer than its header says), else None."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
            header = json.loads(f.read(n)) if 0 <= n <= size - 8 else None
        ends = [t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"] if header else None
    except (OSError, ValueError, TypeError, KeyError, IndexError):
        ends = None
    if ends is None:
        return f"{path.name} has no readable safetensors header ({path.stat().st_size} bytes)"
    want = 8 + n + max(ends, default=0)
    return None if want == size else f"{path.name} is {size} bytes, its header says {want} (truncated?)"


def problem(folder, verify: bool = False) -> Optional[str]:
    """Why `folder` is not a complete model folder (one short phrase), or None when it is.

    verify=True also compares every recorded sha256 (reads every byte)."""
    folder = Path(folder)
    if not folder.is_dir():
        return "missing" if not folder.exists() else "not a folder"
    files = read_info(folder).get("files")
    if isinstance(files, dict) and files:
        for rel, facts in files.items():
            path = folder / rel
            if not path.is_file():
                return f"{rel} is missing"
            if path.stat().st_size != facts.get("size"):
                return f"{rel} is {path.stat().st_size} bytes, {facts.get('size')} when it was built"
            if verify and sha256_file(path) != facts.get("sha256"):
                return f"{rel} differs from what was built (sha256)"
        return None
    if not (folder / "config.json").is_file():
        return "config.json is missing"
    if not any((folder / f).is_file() for f in _WEIGHTS):
        return "the weights (model.safetensors) are missing"
    if not any((folder / f).is_file() for f in _TOKENIZERS):
        return "the tokenizer files are missing"
    for weights in sorted(folder.glob("*.safetensors")):
        trouble = safetensors_problem(weights)
        if trouble:
            return trouble
    return None


# ----------------------------------------------------------------------------- staging

def _owner_alive(stage: Path) -> Optional[bool]:
    """Whether the process that made `stage` still runs (None: unknown, e.g. another host)."""
    try:
        owner = json.loads((stage / _OWNER_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if owner.get("host") != socket.gethostname() or not isinstance(owner.get("pid"), int):
        return None
    try:
        os.kill(owner["pid"], 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


def _newest_mtime(stage: Path) -> float:
    times = [stage.stat().st_mtime]
    for root, _, files in os.walk(stage):
        times += [os.stat(os.path.join(root, f)).st_mtime for f in files]
    return max(times)


def remove_stale_stages(dest: Path) -> None:
    """Remove `.NAME.tmp-*` siblings of `dest` that no running process is writing."""
    for stage in dest.parent.glob(f".{dest.name}.tmp-*"):
        try:
            alive = _owner_alive(stage)
            if alive is None:
                age_limit = _STARTED if not (stage / _OWNER_FILE).exists() else time.time() - _FOREIGN_STAGE_AGE
                alive = _newest_mtime(stage) >= age_limit
            if not alive:
                shutil.rmtree(stage, ignore_errors=True)
        except OSError:
            continue  # vanished meanwhile (its owner finished): nothing to do


def _as_os_error(err: BaseException, dest: Path) -> Optional[OSError]:
    """A one-line OSError for a failure to write `dest` (read-only, no space, ...), else None."""
    text = str(err)
    code = err.errno if isinstance(err, OSError) else (
        errno.ENOSPC if "No space left" in text or "os error 28" in text else None)
    if code is None:
        return None
    hints = {errno.ENOSPC: "no space left on device; free some space or choose another folder",
             errno.EROFS: "read-only file system", errno.EACCES: "permission denied",
             errno.EPERM: "permission denied", errno.EDQUOT: "disk quota exceeded"}
    hint = hints.get(code, getattr(err, "strerror", None) or text.splitlines()[0])
    where = ("set HYBRIDFAST_MODELS to a writable folder with room for the model, or pass --to DIR"
             if dest.parent == cache_dir() else "pass another --to folder")
    return OSError(code, f"could not write {dest}: {hint} ({where}; nothing was left there)")


def stage_and_rename(dest: Path, build: Callable[[Path], None], heal: bool = False) -> None:
    """Build into a staging sibling of `dest`, then rename it into place (atomic on one filesystem).

    heal=True: a damaged `dest` (see `problem`) is replaced; an empty `dest` folder always is.
    A complete `dest` written meanwhile by another process is kept."""
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_stages(dest)
        stage = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    except OSError as e:
        raise (_as_os_error(e, dest) or e) from None
    try:
        atomic_write_json(stage / _OWNER_FILE, {"host": socket.gethostname(), "pid": os.getpid()})
        build(stage)
        (stage / _OWNER_FILE).unlink()
        apply_umask(stage)
        _rename_into_place(stage, dest, heal)
    except Exception as e:  # noqa: BLE001  (only disk errors are reworded; anything else goes up as it is)
        clear = _as_os_error(e, dest)
        if clear is None:
            raise
        raise clear from None
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _rename_into_place(stage: Path, dest: Path, heal: bool) -> None:
    if dest.is_dir() and not any(dest.iterdir()):
        dest.rmdir()
    try:
        os.rename(stage, dest)
        return
    except OSError:
        if problem(dest) is None:  # another process finished the same folder first: keep theirs
            return
        if not (heal and dest.is_dir()):
            raise
    # the damaged entry goes aside under a staging name (removed here, or by the next run after a kill)
    aside = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-damaged-", dir=dest.parent))
    os.rename(dest, aside / "old")
    os.rename(stage, dest)
    shutil.rmtree(aside, ignore_errors=True)


def apply_umask(folder, since: Optional[float] = None) -> None:
    """Give `folder`'s tree the modes the umask allows (mkdtemp: 0o700, safetensors files: 0o600).

    since: only files modified at or after that time, and no folder (those the caller made
    with mkdir already follow the umask; a folder of the user's keeps the modes they chose)."""
    umask = os.umask(0)
    os.umask(umask)
    for root, _, files in os.walk(folder):
        if since is None:
            os.chmod(root, 0o777 & ~umask)
        for name in files:
            path = os.path.join(root, name)
            if since is None or os.stat(path).st_mtime >= since:
                os.chmod(path, 0o666 & ~umask)
