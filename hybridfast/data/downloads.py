"""Where the named benchmarks live: local folders, the cache, and pinned downloads.

XQuAD-R and MLQA-R come from google-research-datasets/lareqa on GitHub at pinned
commits, every file checked against a pinned sha256; `--data-dir`, $HYBRIDFAST_DATA
and the cache are searched first. A named set found locally is checked against the same
pins when it is loaded (`verify_dataset`, hybridfast.data.checksums). Re-exported by
hybridfast.data (docs/data.md).
"""
import hashlib
import os
import re
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Dict, List, NamedTuple, Optional

from hybridfast import rules
from hybridfast.data.beir import detect_layout
from hybridfast.data.benchmark import is_language_file
from hybridfast.data.checksums import verify_files
from hybridfast.data.lareqa import LAReQAFormatError, check_file


class _Source(NamedTuple):
    commit: str
    folder: str
    files: Dict[str, Optional[str]]  # file name -> pinned sha256 (None: not pinned, see below)
    license: str


_REPO = "google-research-datasets/lareqa"
URL_TEMPLATE = "https://raw.githubusercontent.com/{repo}/{commit}/{folder}/{file}"

DATASETS: Dict[str, _Source] = {
    # Checksums of the files at this commit, as verified for ../shared/data/xquad-r/SHA256SUMS.
    "xquad-r": _Source("9bc8c7fb6dd8d01d72a05a93c2cb96882b0d299c", "xquad-r", {
        "ar.json": "c52922d3b8ac1ae03ed5ac38647ad59870dca3dda2beefe18ecdc30729acb69d",
        "de.json": "16fb0f4bf4916154b585a20c24c66074591c9718a1affe764ff4697572328949",
        "el.json": "163fd43ee785a30eb534ae2061e9eaa766a7ee4e8ffce5e4b422480c150f64b6",
        "en.json": "7b0954f39297c27a31fef610f0883337dd2907fa8699151dc922afdd0fa12ffe",
        "es.json": "f8e836b2d91009c4363e04315f7ede363eedbbb49c67dda60de6c4aa782f58de",
        "hi.json": "ea45ba8ae4513d1533b222bebdc02a90bc319c055d3aeea68584a053d2e92872",
        "ru.json": "7f4dff853538b9a5fcc28c070b8bb983a5c5d190ac747b8e005a1ada9cab18f1",
        "th.json": "c3a041864c3a9fb0b4dd91cfdf99cf36b411b3e704c58a303c97bc6dc786cfe4",
        "tr.json": "f3e8c13002bbce154a4578f535f7533cb70f3da08840e6b62735935baec7bd94",
        "vi.json": "e35926bf5cc6fc6ecbdfca49467aabeb454f08d152d7818143a906bd31dde995",
        "zh.json": "80c2cde7b9c2fb134c303cbb52f2ba396ead9eb0014aec43993543d2ba9e93ed",
    }, "CC BY-SA 4.0"),
    # MLQA-R lives only in the repository's history (later renamed mlqa-dev-r/); checksums of
    # the files at this commit, as in ../shared/data/mlqa-r/SHA256SUMS. License CC BY-NC 4.0:
    # non-commercial use only.
    "mlqa-r": _Source("354d67d1cd066854cdfbf5ad0e6105528976141d", "mlqa-r", {
        "ar.json": "2132fbc03208535c0fe01f2e2c5121d06f9c2aa799af93b0a719dbc105bdf137",
        "de.json": "ce9454dc5aa6f2d85c23cd6e49cb367fbb7c4c6e62d7f71e355c6b5dae4d0886",
        "en.json": "fedd9a5cc0848dda80caf84aa36f482adaae230526a3f6e9e86926a93ef3b1e4",
        "es.json": "70ecba276b8c96a692b120693a595d076ce94ad21d4b28311538a9fcbfe0f9d7",
        "hi.json": "4dd0fb3c06f737a5481d705bc1dcac7876712a5815c9265908fbb3a0696cb654",
        "vi.json": "9d3baff6ba03e6793b25594217265ea59a136b9733833dca8a9582a84a78ff85",
        "zh.json": "57f01d2fff50cf3392805635b01445339f225ad5bf28ba8443b12f8dbd1e69dc",
    }, "CC BY-NC 4.0 (non-commercial use only)"),
}


def cache_dir() -> Path:
    """$XDG_CACHE_HOME/hybridfast, else ~/.cache/hybridfast."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "hybridfast"


def _search_roots(data_dir=None) -> List[Path]:
    roots = []
    if data_dir is not None:
        roots.append(Path(data_dir))
    if os.environ.get("HYBRIDFAST_DATA"):
        roots.append(Path(os.environ["HYBRIDFAST_DATA"]))
    roots.append(cache_dir())
    return roots


def _has_lang_files(path: Path) -> bool:
    return path.is_dir() and any(is_language_file(p) for p in path.glob("*.json"))


def resolve_dataset(name_or_path, data_dir=None) -> Path:
    """The folder of a benchmark.

    A known name ("xquad-r", "mlqa-r") is looked up as <root>/<name> (or a root that
    is itself the dataset folder) under data_dir, then $HYBRIDFAST_DATA, then the
    cache folder, then as a folder of that name here; anything else must be an
    existing benchmark folder: <lang>.json files (LAReQA), or a BEIR / MIRACL folder, so that
    callers that resolve before loading (demo, study) take every format load_benchmark reads.
    """
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise TypeError(f"name_or_path must be a str or path, got {type(name_or_path).__name__}")
    given, name = Path(name_or_path), str(name_or_path)
    tried = []
    if name in DATASETS:  # a known name: the search roots come before a same-named folder here
        for root in _search_roots(data_dir):
            for cand in (root / name, root):
                if (cand is root and root.name != name) or cand in tried:
                    continue
                tried.append(cand)
                if _has_lang_files(cand):
                    return cand
    if given.is_dir():
        if not _has_lang_files(given) and detect_layout(given) is None:
            raise FileNotFoundError(f"name_or_path: {given} holds no <lang>.json files and is no BEIR or "
                                    "MIRACL folder")
        return given
    if name not in DATASETS:
        raise FileNotFoundError(
            f"name_or_path: {name!r} is neither a folder nor a known dataset ({', '.join(DATASETS)})")
    raise FileNotFoundError(
        f"{name} not found (looked in {', '.join(map(str, tried))}). Download it with "
        f"`hybridfast data download {name}`, or point --data-dir / HYBRIDFAST_DATA at a folder "
        f"holding {name}/")


def verify_dataset(name: str, folder, allow_modified: bool = False) -> Path:
    """Check the language files in `folder` of named data set `name` against their pinned sha256
    (hybridfast.data.checksums: ModifiedDataError naming the file, or a loud warning when
    allow_modified). Stamps in the cache folder keep repeated loads from hashing again."""
    if name not in DATASETS:
        raise ValueError(f"name must be one of {list(DATASETS)}, got {name!r}")
    folder = Path(folder)
    present = sorted(p.name for p in folder.glob("*.json") if is_language_file(p))
    verify_files(name, folder, DATASETS[name].files, present, allow_modified=allow_modified, cache=cache_dir())
    return folder


def ensure_dataset(name_or_path, data_dir=None, show_progress: bool = True, log=None) -> Path:
    """resolve_dataset, downloading a known dataset that is not found yet (first use).

    The download goes to data_dir when given, else $HYBRIDFAST_DATA, else the cache
    folder. Offline (or on any download failure) it raises FileNotFoundError with
    resolve_dataset's message (where it looked, how to provide the files) and the reason.
    """
    try:
        return resolve_dataset(name_or_path, data_dir)
    except FileNotFoundError as missing:
        name = str(name_or_path)
        if name not in DATASETS:
            raise
        if log is not None:
            log(f"{name} not found locally: downloading it ({DATASETS[name].license}) from "
                f"github.com/{_REPO} at commit {DATASETS[name].commit[:7]}")
        try:
            return download(name, to=data_dir, show_progress=show_progress)
        except DownloadError as e:
            raise FileNotFoundError(f"{missing}\n(download failed: {e})") from None


# ----------------------------------------------------------------------------- download

class DownloadError(RuntimeError):
    """A download failed; the message is one line naming the URL or folder, and nothing is left."""


def _fetch(url: str, timeout: float = 60.0) -> bytes:
    """Bytes at `url` (https or file://). Tests replace this function."""
    import urllib.request

    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.read()


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _read_sums(path: Path) -> Dict[str, str]:
    """{file: sha256} from a `sha256sum` style file (missing file: {}; malformed lines are ignored
    with a warning: they only mean a present file is fetched again)."""
    if not path.is_file():
        return {}
    sums, bad = {}, []
    for n, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        parts = line.split(None, 1)
        if not line.strip():
            continue
        if len(parts) != 2 or not re.fullmatch(r"[0-9a-fA-F]{64}", parts[0]):
            bad.append(n)
            continue
        sums[parts[1].strip().lstrip("*")] = parts[0].lower()
    if bad:
        warnings.warn(f"{path}: lines {bad[:5]} are not '<sha256>  <file>'; ignored", stacklevel=3)
    return sums


def _make_folders(root: Path) -> List[Path]:
    """Create `root` and its missing parents -> the folders created, deepest first, so that a
    failed download removes every one of them (reliability probe 2, #27). A destination that
    is a file or cannot be written is a DownloadError naming it (#13)."""
    missing = [p for p in (root, *root.parents) if not p.exists()]
    blocker = next((p for p in (root, *root.parents) if p.exists()), None)
    if blocker is not None and not blocker.is_dir():
        raise DownloadError(f"destination {root}: {blocker} exists and is not a folder; choose another folder")
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        _remove_empty(missing)
        raise DownloadError(f"destination {root}: cannot be created ({rules.write_error_message(e, root)})") from None
    if not os.access(root, os.W_OK | os.X_OK):
        _remove_empty(missing)
        raise DownloadError(f"destination {root}: not writable; choose another --to folder or HYBRIDFAST_DATA")
    return missing


def _remove_empty(folders: List[Path]) -> None:
    for folder in folders:  # deepest first
        try:
            folder.rmdir()
        except OSError:
            return  # not empty (or gone): its parents hold something too


def _fetch_checked(name: str, fname: str, stage: Path) -> str:
    """One file of data set `name` fetched into `stage` and checked against its pin and LAReQA's
    structure -> its sha256."""
    import urllib.error

    src = DATASETS[name]
    url = URL_TEMPLATE.format(repo=_REPO, commit=src.commit, folder=src.folder, file=fname)
    try:
        data = _fetch(url)
    except (urllib.error.URLError, OSError) as e:
        raise DownloadError(
            f"could not download {url} ({getattr(e, 'reason', e)}). Without internet access, "
            f"copy the {name} files ({', '.join(src.files)}) into a folder DIR/{name}/ and pass "
            f"--data-dir DIR or set HYBRIDFAST_DATA=DIR.") from None
    got, want = _sha256(data), src.files[fname]
    if want is not None and got != want:
        raise DownloadError(f"{url}: sha256 {got} does not match the pinned {want}; nothing was written")
    (stage / fname).write_bytes(data)
    try:
        check_file(stage / fname)
    except LAReQAFormatError as e:
        raise DownloadError(f"{url}: downloaded file is not LAReQA data ({e})") from None
    return got


def download(name: str, to=None, show_progress: bool = True) -> Path:
    """Fetch dataset `name` into <to>/<name>/ (default: $HYBRIDFAST_DATA, else the cache folder).

    Every file is fetched into a staging folder and checked (sha256 where pinned,
    LAReQA structure always) before any is moved into place with os.replace, so a
    failure leaves the destination as it was, and removes every folder it created.
    Files already present with the pinned checksum are kept. Every failure (offline, a
    checksum, a read-only or full destination, a file in the way) is a one-line DownloadError.
    """
    if name not in DATASETS:
        raise ValueError(f"name must be one of {list(DATASETS)}, got {name!r}")
    if to is not None:
        root = Path(to)
    else:
        root = Path(os.environ["HYBRIDFAST_DATA"]) if os.environ.get("HYBRIDFAST_DATA") else cache_dir()
    created = _make_folders(root)
    try:
        return _download_into(name, root, show_progress)
    except OSError as e:  # a full or read-only disk while staging or moving into place
        raise DownloadError(f"could not write {name} into {root}: {rules.write_error_message(e, root)}") from None
    finally:
        _remove_empty(created)


def _download_into(name: str, root: Path, show_progress: bool) -> Path:
    from tqdm.auto import tqdm

    src = DATASETS[name]
    dest = root / name
    if dest.exists() and not dest.is_dir():
        raise DownloadError(f"destination {dest} exists and is not a folder; choose another folder")
    recorded = _read_sums(dest / "SHA256SUMS")
    present = {f: _sha256((dest / f).read_bytes()) for f in src.files if (dest / f).is_file()}
    # keep a present file whose checksum is the pinned one (or, unpinned, the one recorded at download)
    kept = {f: sha for f, sha in present.items() if sha == (src.files[f] or recorded.get(f))}
    todo = [f for f in src.files if f not in kept]
    stage = Path(tempfile.mkdtemp(prefix=f".{name}-download-", dir=root))
    try:
        sums = {}
        for fname in tqdm(todo, desc=f"download {name}", disable=not show_progress or not todo):
            sums[fname] = _fetch_checked(name, fname, stage)
        dest.mkdir(exist_ok=True)
        for fname in todo:  # all fetched and checked: move into place
            rules.follow_umask(stage / fname)
            os.replace(stage / fname, dest / fname)
        if todo:
            sums.update(kept)
            rules.atomic_write_text(dest / "SHA256SUMS", "".join(f"{sums[f]}  {f}\n" for f in sorted(sums)))
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return dest
