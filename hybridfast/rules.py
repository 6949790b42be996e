"""Rules shared by every part of hybridfast, defined once (see docs/architecture.md).

* the batch modes and the data splits;
* what a language code is (ISO 639-1, optionally with a region such as ``pt-BR``);
* atomic file writes (a reader sees the old file or the new one, never half of one; several
  files replaced as one result; permissions follow the umask), one-line messages for failed
  writes that name a full disk even where torch does not say so, file hashes, and reading text files: UTF-8 (optionally .gz), errors naming file:line;
* argument checks with one answer on bools: ``True`` is not an int or a number here,
  and only ``True``/``False`` (or numpy bools) are bools.

Import-light on purpose (no torch, no transformers): any module may import it.
"""
from __future__ import annotations

import errno
import gzip
import hashlib
import json
import math
import numbers
import os
import re
import shutil
import sys
import tempfile
import zlib
from pathlib import Path
from typing import Iterable, Iterator, List, Optional, Sequence, Tuple, Union

# ----------------------------------------------------------------------------- modes and splits

MODES = ("hybrid", "mono", "cross")
"""Batch kinds of hybrid-batch training: a mix (the paper, alpha = mono_prob), all mono, all cross."""

BENCHMARK_SPLITS = ("all", "train", "test")
"""LAReQA's deterministic article split (evaluation benchmarks and LAReQA training data)."""

TRAIN_SPLITS = BENCHMARK_SPLITS + ("dev",)
"""Training data splits: LAReQA's, plus 'dev' for mMARCO-style folders (queries.dev.tsv)."""


def check_choice(name: str, value, choices: Sequence[str]):
    """Raise ValueError naming `name` unless `value` is one of `choices`."""
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")
    return value


# ----------------------------------------------------------------------------- languages

# ISO 639-1 (the two-letter codes), 183 languages.
ISO_639_1 = frozenset("""
aa ab ae af ak am an ar as av ay az ba be bg bi bm bn bo br bs ca ce ch co cr cs cu cv cy
da de dv dz ee el en eo es et eu fa ff fi fj fo fr fy ga gd gl gn gu gv ha he hi ho hr ht
hu hy hz ia id ie ig ii ik io is it iu ja jv ka kg ki kj kk kl km kn ko kr ks ku kv kw ky
la lb lg li ln lo lt lu lv mg mh mi mk ml mn mr ms mt my na nb nd ne ng nl nn no nr nv ny
oc oj om or os pa pi pl ps pt qu rm rn ro ru rw sa sc sd se sg si sk sl sm sn so sq sr ss
st su sv sw ta te tg th ti tk tl tn to tr ts tt tw ty ug uk ur uz ve vi vo wa wo xh yi yo
za zh zu
""".split())

_LANG_RE = re.compile(r"^([a-z]{2})(?:[-_]([A-Za-z0-9]{2,8}))?$")


def is_language_code(code) -> bool:
    """True for an ISO 639-1 code ('en', 'zh'), optionally with a region or script
    subtag ('pt-BR', 'zh_Hans'); False for anything else ('english', 'xx', 'zzz')."""
    if not isinstance(code, str):
        return False
    m = _LANG_RE.match(code)
    return bool(m) and m.group(1) in ISO_639_1


def check_language_code(code, arg: str = "languages"):
    """Return `code` or raise ValueError naming `arg` unless it is a language code."""
    if not is_language_code(code):
        raise ValueError(f"{arg}: {code!r} is not a language code; use ISO 639-1 codes such as "
                         "'en', 'de', 'zh' (a region may follow: 'pt-BR')")
    return code


def split_list(value) -> List[str]:
    """'en, de' or ['en', 'de'] or ('en',) -> ['en', 'de'] (empty items dropped)."""
    if isinstance(value, str):
        return [s.strip() for s in value.split(",") if s.strip()]
    return list(value)


def flatten_languages(values) -> list:
    """['en,de', 'es'] -> ['en', 'de', 'es']: a command line may give `--languages en,de` or
    `--languages en de` (argparse nargs='+'); both mean the same list. Non-strings pass through
    untouched so that the checks that follow can name them."""
    out = []
    for value in values:
        out.extend(split_list(value) if isinstance(value, str) else [value])
    return out


def check_languages(languages, arg: str = "languages") -> Optional[List[str]]:
    """None (all) or a non-empty list of distinct language codes; a comma string is split."""
    if languages is None:
        return None
    if not isinstance(languages, (str, list, tuple)):
        raise TypeError(f"{arg} must be a list of language codes, a comma-separated string or None, "
                        f"got {languages!r}")
    langs = flatten_languages(split_list(languages))
    if not langs:
        raise ValueError(f"{arg}: empty; give language codes or None for all")
    for lang in langs:
        check_language_code(lang, arg)
    if len(set(langs)) != len(langs):
        raise ValueError(f"{arg}: duplicates in {langs}")
    return langs


def language_weights(weights, languages: Sequence[str], arg: str = "lang_weights") -> List[float]:
    """{language: weight} -> one weight per language of `languages` (missing ones weigh 0);
    a language the data does not have is an error naming `arg`."""
    unknown = sorted(set(weights) - set(languages))
    if unknown:
        raise ValueError(f"{arg}: {unknown} not in the training data (it has {list(languages)})")
    return [float(weights.get(lang, 0.0)) for lang in languages]


# ----------------------------------------------------------------------------- argument checks

def is_bool(value) -> bool:
    """Python or numpy bool (numpy is imported only if already loaded)."""
    if isinstance(value, bool):
        return True
    np = _numpy()
    return np is not None and isinstance(value, np.bool_)


def is_int(value) -> bool:
    """An integer that is not a bool (numpy integers count)."""
    return isinstance(value, numbers.Integral) and not is_bool(value)


def is_number(value) -> bool:
    """A real number that is not a bool and not NaN."""
    return isinstance(value, numbers.Real) and not is_bool(value) and not math.isnan(float(value))


def check_bool(name: str, value):
    if not is_bool(value):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return bool(value)


def check_int(name: str, value, minimum: Optional[int] = None, optional: bool = False):
    """An int >= minimum (bools refused); None passes when optional."""
    if value is None and optional:
        return None
    if not is_int(value):
        raise TypeError(f"{name} must be an int{' or None' if optional else ''}, got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def check_number(name: str, value, low: float = -math.inf, high: float = math.inf,
                 low_open: bool = False, high_open: bool = False, optional: bool = False):
    """A real number in [low, high] (open ends on request); bools and NaN refused."""
    if value is None and optional:
        return None
    if not is_number(value):
        raise TypeError(f"{name} must be a number, got {value!r}")
    v = float(value)
    if v < low or v > high or (low_open and v == low) or (high_open and v == high):
        rng = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        raise ValueError(f"{name} must be in {rng}, got {value}")
    return value


def check_optional_str(name: str, value):
    if value is not None and not isinstance(value, str):
        raise TypeError(f"{name} must be a string or None, got {value!r}")
    return value


def _numpy():
    return sys.modules.get("numpy")


# ----------------------------------------------------------------------------- atomic files

def fsync_dir(folder: Union[str, Path]) -> None:
    """Make a rename inside `folder` durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(str(folder), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def current_umask() -> int:
    """The process umask, read without changing it where Linux tells it (/proc/self/status);
    elsewhere set and restored at once (a brief window other threads could see)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def follow_umask(path: Union[str, Path], mode: int = 0o666) -> Path:
    """Give `path` the permissions an ordinary new file gets (mode & ~umask). tempfile.mkstemp
    creates 0600 files and safetensors writes its own way: without this, results and models
    written through a temporary are unreadable by the user's group (reliability probe 2, #14)."""
    os.chmod(path, mode & ~current_umask())
    return Path(path)


def _write_temporary(path: Path, data: bytes) -> str:
    """`data` in a fsynced temporary beside `path`, with ordinary-file permissions -> its name."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=str(path.parent))
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        follow_umask(tmp)
    except BaseException:
        _unlink_quietly(tmp)
        raise
    return tmp


def _unlink_quietly(path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def atomic_write_bytes(path: Union[str, Path], data: bytes) -> Path:
    """Write `data` to `path` atomically: a temporary file in the same folder, fsync, rename.
    A kill or a full disk leaves the previous file (if any) untouched; the temporary is removed
    on failure. The file gets the permissions of an ordinary new file (umask), not mkstemp's 0600."""
    path = Path(path)
    tmp = _write_temporary(path, data)
    try:
        os.replace(tmp, path)
    except BaseException:
        _unlink_quietly(tmp)
        raise
    fsync_dir(path.parent)
    return path


def atomic_write_many(files) -> List[Path]:
    """Replace several files as one result: {path: bytes}. Every temporary is written and fsynced
    before the first rename, so a full disk or any other write error leaves all previous files
    byte-identical (the temporaries are removed). Only the renames, which need no space, come
    after; a kill during them can leave some files new and some old (a rename is atomic, a
    group of renames is not)."""
    staged = []
    try:
        for path, data in files.items():
            staged.append((_write_temporary(Path(path), data), Path(path)))
        for tmp, path in staged:
            os.replace(tmp, path)
    except BaseException:
        for tmp, _ in staged:
            _unlink_quietly(tmp)
        raise
    for folder in {path.parent for _, path in staged}:
        fsync_dir(folder)
    return [path for _, path in staged]


# ----------------------------------------------------------------------------- write errors

_DISK_FULL_ERRNOS = (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))


def free_bytes(path: Union[str, Path]) -> Optional[int]:
    """Free bytes on the file system of `path` (or of its nearest existing parent)."""
    p = Path(path).absolute()
    for candidate in (p, *p.parents):
        if candidate.exists():
            try:
                return shutil.disk_usage(candidate).free
            except OSError:
                return None
    return None


def is_disk_full(error: BaseException, path: Union[str, Path], margin: int = 1 << 20) -> bool:
    """Whether `error`, raised while writing `path`, comes from a full disk (or quota).

    An OSError says so with its errno; torch.save and safetensors do not (torch raises a
    RuntimeError such as "unexpected pos ..."), so for any error the free space where `path`
    lives is measured: under `margin` bytes counts as full. Call it before removing the
    partial file, whose blocks would otherwise be free again."""
    if isinstance(error, OSError) and error.errno in _DISK_FULL_ERRNOS:
        return True
    if "No space left on device" in str(error) or "os error 28" in str(error):
        return True
    free = free_bytes(path)
    return free is not None and free < margin


def write_error_message(error: BaseException, path: Union[str, Path]) -> str:
    """One line for a failed write of `path`: "no space left on device" with the path and the
    free space when the disk is full (see is_disk_full), else the error's own text."""
    if is_disk_full(error, path):
        free = free_bytes(path)
        left = f" ({free:,} bytes free)" if free is not None else ""
        return f"{path}: no space left on device{left}; free some space and run again"
    reason = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
    return f"{path}: {reason}"


def atomic_savefig(fig, path: Union[str, Path], **kw) -> Path:
    """A matplotlib figure saved as PNG bytes, then written atomically: a crash or a full disk
    leaves the earlier plot as it was, never a truncated one."""
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", **kw)
    return atomic_write_bytes(path, buf.getvalue())


def atomic_write_text(path: Union[str, Path], text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Union[str, Path], obj, indent: Optional[int] = 2) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=indent) + "\n")


def atomic_write_lines(path: Union[str, Path], lines: Iterable[str]) -> Path:
    """Lines (without newlines) as a text file, atomically."""
    return atomic_write_text(path, "".join(line + "\n" for line in lines))


# ----------------------------------------------------------------------------- reading files

def sha256_file(path: Union[str, Path]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_lines(path: Union[str, Path], error: type = ValueError) -> Iterator[Tuple[int, str]]:
    """(line number, text) of a UTF-8 text file, gzip-compressed when it ends in .gz. A line
    that is not UTF-8, or a damaged .gz, raises `error` (a ValueError subclass) naming file:line."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    lineno = 0
    try:
        with opener(path, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                try:
                    yield lineno, raw.decode("utf-8")
                except UnicodeDecodeError as err:
                    raise error(f"{path}:{lineno}: not UTF-8 text (byte {err.start}: "
                                     f"{raw[err.start:err.start + 1]!r}); save the file as UTF-8") from None
    except (gzip.BadGzipFile, EOFError, zlib.error) as err:
        raise error(f"{path}:{lineno + 1}: damaged gzip file ({type(err).__name__}: {err})") from None


def json_objects(path: Union[str, Path], error: type = ValueError) -> Iterator[Tuple[int, dict]]:
    """(line number, object) of a JSONL file (blank lines skipped); a line that is not a JSON
    object raises `error` (a ValueError subclass) naming file:line."""
    for lineno, line in read_lines(path, error):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise error(f"{path}:{lineno}: not valid JSON ({err.msg})") from None
        if not isinstance(obj, dict):
            raise error(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
        yield lineno, obj
