"""Named data sets are checked against their pinned sha256 every time they are loaded.

A file edited by mistake or half synced would otherwise change every metric without a word
(reliability probe 2, #4). Hashing XQuAD-R's 11 files on every load would cost a second, so a
file's verdict is remembered as a stamp (size, mtime_ns, sha256) in memory and in
``<cache>/verified.json``: a file whose size and mtime still match its stamp is not hashed
again. Any change of size or mtime hashes it again. The stamp file is a cache only: when it
cannot be read or written, files are simply hashed (never an error).

A file whose hash is not the pinned one is refused (`ModifiedDataError`, naming the file and
both hashes) unless the caller passes ``allow_modified=True`` (the CLIs' ``--allow-modified-data``);
then it is used with a `ModifiedDataWarning` on every load.
"""
import json
import warnings
from pathlib import Path
from typing import Dict, Iterable, Optional

from hybridfast import rules

STAMP_FILE = "verified.json"
_stamps: Dict[str, dict] = {}  # resolved path -> {"size", "mtime_ns", "sha256"}


class ModifiedDataError(ValueError):
    """A file of a named data set does not have its pinned sha256 (the message names it)."""


class ModifiedDataWarning(UserWarning):
    """A modified file of a named data set is used because the caller allowed it."""


def _stamp_path(cache: Path) -> Path:
    return cache / STAMP_FILE


def _load_stamps(cache: Path) -> Dict[str, dict]:
    try:
        data = json.loads(_stamp_path(cache).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _save_stamps(cache: Path, stamps: Dict[str, dict]) -> None:
    try:
        cache.mkdir(parents=True, exist_ok=True)
        rules.atomic_write_json(_stamp_path(cache), stamps)
    except OSError:  # a read-only home or cache: hash again next time, nothing else changes
        pass


def file_sha256(path: Path, cache: Optional[Path] = None) -> str:
    """sha256 of `path`, reusing a stamp whose size and mtime still match (see module docstring)."""
    path = Path(path)
    st = path.stat()
    key = str(path.resolve())
    stamp = _stamps.get(key)
    if stamp is None and cache is not None:
        stamp = _load_stamps(cache).get(key)
    if isinstance(stamp, dict) and stamp.get("size") == st.st_size and stamp.get("mtime_ns") == st.st_mtime_ns \
            and isinstance(stamp.get("sha256"), str):
        _stamps[key] = stamp
        return stamp["sha256"]
    digest = rules.sha256_file(path)
    _stamps[key] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": digest}
    if cache is not None:
        stamps = _load_stamps(cache)
        stamps[key] = _stamps[key]
        _save_stamps(cache, stamps)
    return digest


def verify_files(name: str, folder: Path, pinned: Dict[str, Optional[str]], files: Iterable[str],
                 allow_modified: bool = False, cache: Optional[Path] = None) -> None:
    """Check `files` (names inside `folder`) of data set `name` against their `pinned` sha256.

    Unpinned files (None) and files the pin list does not know (a language added by the
    user) are not checked. Raises ModifiedDataError, or warns when allow_modified."""
    rules.check_bool("allow_modified", allow_modified)
    modified = []
    for fname in files:
        want = pinned.get(fname)
        if want is None or not (folder / fname).is_file():
            continue
        got = file_sha256(folder / fname, cache)
        if got != want:
            modified.append((folder / fname, got, want))
    if not modified:
        return
    listing = "; ".join(f"{p} has sha256 {got[:12]}..., pinned {want[:12]}..." for p, got, want in modified)
    if allow_modified:
        warnings.warn(f"USING MODIFIED DATA: {listing}. Results are not comparable with published "
                      f"{name} numbers.", ModifiedDataWarning, stacklevel=3)
        return
    raise ModifiedDataError(
        f"{name}: {listing}: the file was changed after download (edited or partly synced). "
        f"Fetch it again with `hybridfast data download {name}` (into a fresh folder), or pass "
        f"allow_modified=True (--allow-modified-data) to use it anyway")


def forget_stamps() -> None:
    """Drop the in-memory stamps (tests; a long-lived process that wants every file hashed again)."""
    _stamps.clear()


__all__ = ["ModifiedDataError", "ModifiedDataWarning", "verify_files", "file_sha256", "forget_stamps"]
