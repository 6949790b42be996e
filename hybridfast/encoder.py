"""Encoder: a Hugging Face model turned into a sentence embedder for queries and passages.

    text --prefix--> tokens --AutoModel--> hidden states [n, T, H] --pool--> [n, H] --L2--> embedding

Pooling is "mean" (over non-padding tokens) or "cls" (first token); "auto" takes
it from a sentence-transformers folder (modules.json -> Pooling config) and
falls back to mean. Pooling and normalisation run in float32 whatever the model
dtype, so fp16/bf16 models only lose precision inside the transformer.

Encoding (encode_queries / encode_passages) tokenizes everything once, sorts by
token length (longest first, so a batch that does not fit shows up at once),
pads each batch only to its own longest text, and writes the rows back in the
caller's order. It runs in half precision where the hardware computes it natively: on CUDA
under bf16 (or fp16) autocast, on a CPU with AVX512-BF16 / AMX through a bf16 copy of the
model laid out for its GEMMs (hybridfast.models.packed); amp=None keeps fp32.
"""
import contextlib
import os
import time
import warnings
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

from hybridfast._backends import resolve_device
from hybridfast.models import st_folder
from hybridfast.models.cache import apply_umask
from hybridfast.models.checks import check_model_folder, repair_hint
from hybridfast.models.packed import cpu_bf16_native, inference_copy, weights_version
from hybridfast.models.fetch import resolve
from hybridfast.models.registry import DamagedModelError
from hybridfast.progress import Progress
from hybridfast.rules import atomic_write_json, check_bool

POOLINGS = ("auto", "mean", "cls")
KINDS = ("query", "passage")
DEFAULT_QUERY_PREFIX, DEFAULT_PASSAGE_PREFIX = "query: ", "passage: "
DEFAULT_MAX_LENGTH = 256  # for a model that records no length of its own
HYBRIDFAST_CONFIG = "hybridfast_config.json"
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
           "half": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def default_model_path() -> str:
    """Deprecated (removed in 0.3): the bundled English all-MiniLM-L6-v2 folder, NOT the default model.

    Its name suggested the project's default encoder, which is multilingual-e5-small
    (`hybridfast.models.default_model()`); the MiniLM folder is `hybridfast.models.minilm_path()`."""
    from hybridfast.models import minilm_path

    warnings.warn("hybridfast.encoder.default_model_path() returns the bundled English all-MiniLM-L6-v2, not "
                  "the default model; call hybridfast.models.minilm_path() for that folder or "
                  "hybridfast.models.default_model() for multilingual-e5-small (removed in 0.3)",
                  DeprecationWarning, stacklevel=2)
    return minilm_path()


def position_limit(model_config) -> Optional[int]:
    """Tokens the model can embed (its position table); RoBERTa-style models reserve padding_idx + 1
    positions. None where the config states no table (e.g. rotary or relative positions)."""
    limit = getattr(model_config, "max_position_embeddings", None)
    if not isinstance(limit, int) or isinstance(limit, bool) or limit <= 0:
        return None
    if "roberta" in str(getattr(model_config, "model_type", "")) and getattr(model_config, "pad_token_id", None) \
            is not None:
        limit -= model_config.pad_token_id + 1
    return limit


@contextlib.contextmanager
def quiet_loading():
    """No per-tensor "Loading weights" / "Writing model shards" bars from transformers."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


_read_json = st_folder.read_json


def _default_prefixes(folder: Path, saved: dict):
    """The model's own prefixes: what hybridfast saved, else a sentence-transformers
    folder's prompts (none at all for models such as all-MiniLM-L6-v2, which were
    trained without prefixes), else the paper's "query: " / "passage: "."""
    if "query_prefix" in saved or "passage_prefix" in saved:
        return saved.get("query_prefix", ""), saved.get("passage_prefix", "")
    return st_folder.prompts(folder) or (DEFAULT_QUERY_PREFIX, DEFAULT_PASSAGE_PREFIX)


def _resolve_dtype(dtype):
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str) and dtype.lower() in _DTYPES:
        return _DTYPES[dtype.lower()]
    raise ValueError(f"dtype must be None, a torch dtype or one of {sorted(_DTYPES)}, got {dtype!r}")


def _check_texts(texts, arg="texts"):
    if isinstance(texts, str) or not isinstance(texts, (list, tuple)):
        raise TypeError(f"{arg} must be a list of str, got {type(texts).__name__}")
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise TypeError(f"{arg}[{i}] must be a str, got {type(t).__name__}")
    return list(texts)


def _check_positive_int(value, arg):
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{arg} must be a positive int, got {value!r}")
    return value


def _check_vocabulary(tokenizer, model, folder) -> None:
    """Refuse a tokenizer that cannot be the model's: ids past the embedding table, or a vocabulary
    covering under half of it (an empty or foreign tokenizer: most words would become one token)."""
    embeddings = model.get_input_embeddings()
    rows = getattr(embeddings, "num_embeddings", None)
    if rows is None:
        return
    size = len(tokenizer)
    if size > rows:
        raise ValueError(f"model_name_or_path: the tokenizer in {folder} has {size} tokens but the model's "
                         f"embedding table only {rows} rows: it is not this model's tokenizer")
    if size < rows // 2:
        raise ValueError(f"model_name_or_path: the tokenizer in {folder} has {size} tokens for a model with "
                         f"{rows} embedding rows: it is not this model's tokenizer (missing or replaced "
                         "tokenizer files?)")


def _check_arguments(model_name_or_path, pooling, query_prefix, passage_prefix, normalize, amp) -> None:
    if not isinstance(model_name_or_path, (str, os.PathLike)):
        raise TypeError(f"model_name_or_path must be a str or path, got {type(model_name_or_path).__name__}")
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    for arg, value in (("query_prefix", query_prefix), ("passage_prefix", passage_prefix)):
        if value is not None and not isinstance(value, str):
            raise TypeError(f"{arg} must be a str or None, got {type(value).__name__}")
    if normalize is not None:
        check_bool("normalize", normalize)
    if amp not in ("auto", "bf16", "fp16", None, False):
        raise ValueError(f"amp must be 'auto', 'bf16', 'fp16' or None, got {amp!r}")


def _load(model_dir: Path, source: str, dtype, max_length: Optional[int], saved: dict, folder: Path):
    """(tokenizer, model, max_length used): the model's config is read first so that a max_length beyond
    its position table is refused before any weight is loaded."""
    from safetensors import SafetensorError
    from transformers import AutoConfig, AutoModel, AutoTokenizer, __version__ as tf_version

    # transformers renamed torch_dtype to dtype in 4.56.
    dtype_kw = "dtype" if tuple(int(x) for x in tf_version.split(".")[:2]) >= (4, 56) else "torch_dtype"
    with quiet_loading():
        config = AutoConfig.from_pretrained(str(model_dir))
        limit = position_limit(config)
        if max_length is not None and limit is not None and max_length > limit:
            raise ValueError(f"max_length={max_length} exceeds the position table of {source} ({limit} tokens); "
                             f"pass max_length={limit} or less (None: the model's own length)")
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        try:
            model = AutoModel.from_pretrained(str(model_dir), config=config, **({dtype_kw: dtype} if dtype else {}))
        except SafetensorError as err:  # not an OSError/ValueError: the CLIs would print a traceback
            raise DamagedModelError(f"model_name_or_path: the weights in {model_dir} cannot be read "
                                    f"({str(err).splitlines()[0]}); {repair_hint(folder)}") from None
    if tokenizer.pad_token_id is None:
        raise ValueError(f"model_name_or_path: the tokenizer of {source} has no pad token")
    _check_vocabulary(tokenizer, model, model_dir)
    if max_length is None:  # the model's own: as saved by hybridfast, else by sentence-transformers
        max_length = saved.get("max_length") or st_folder.max_seq_length([folder, model_dir]) or DEFAULT_MAX_LENGTH
        max_length = min(_check_positive_int(max_length, "max_length"), limit or max_length)
    tokenizer_limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(tokenizer_limit, int) and tokenizer_limit < max_length:
        max_length = tokenizer_limit  # positions the tokenizer says the model cannot take
    return tokenizer, model, max_length



class TextProgress(Progress):
    """Encoding progress (hybridfast.progress.Progress counting texts): a bar on a terminal, plain
    lines "encode passage texts: 1280/3446 (37%), 412 texts/s, ETA 0:05" in a log."""

    def __init__(self, total, desc, enabled=True, every=10.0, stream=None, initial=0):
        super().__init__(total, desc, "text", enabled=enabled, initial=initial, every=every, stream=stream)


class Encoder(torch.nn.Module):
    """Sentence embeddings from a Hugging Face model, with query/passage prefixes.

    query_prefix / passage_prefix: None means the model's own: those recorded by
    save_pretrained, else a sentence-transformers folder's prompts (empty for models
    trained without prefixes, such as all-MiniLM-L6-v2), else "query: " / "passage: ".
    normalize: None means what save_pretrained recorded in the folder, else True.
    max_length: None means the model's own length (what save_pretrained recorded, else
    sentence_bert_config.json's max_seq_length, else 256), clamped to its position
    table; an explicit length beyond the table raises ValueError. `encoder.max_length`
    is the length actually used. model_name_or_path: a folder, a name known to `hybridfast.models`
    (e.g. "multilingual-e5-small", fetched or rebuilt on first use) or a hub id.
    amp: the precision of encode_* ("auto": on CUDA bf16 autocast where supported, else
    fp16; on a CPU bf16 where it computes bf16 natively (AVX512-BF16, AMX), else fp32;
    "bf16"; "fp16" (CUDA only); None: fp32). `encoder.precision` says what encode_* uses.
    Pooling and normalisation are fp32 in every case; `forward` (training) is never changed.
    """

    def __init__(self, model_name_or_path, pooling="auto", normalize=None, query_prefix=None,
                 passage_prefix=None, max_length=None, device="auto", dtype=None, batch_size=64,
                 show_progress=True, amp="auto"):
        super().__init__()
        _check_arguments(model_name_or_path, pooling, query_prefix, passage_prefix, normalize, amp)
        if max_length is not None:
            _check_positive_int(max_length, "max_length")
        self.batch_size = _check_positive_int(batch_size, "batch_size")
        dtype = _resolve_dtype(dtype)
        # a known name ("multilingual-e5-small", "all-MiniLM-L6-v2", "...@L6") becomes its local folder
        self.source = source = resolve(model_name_or_path)
        folder = Path(source)
        saved = _read_json(folder / HYBRIDFAST_CONFIG) if (folder / HYBRIDFAST_CONFIG).is_file() else {}
        model_dir, st_pooling, dense_dirs, ignored = st_folder.layout(folder) if folder.is_dir() else (
            folder, None, [], [])
        if ignored:
            warnings.warn(f"{folder}: sentence-transformers modules {ignored} are not applied by Encoder; "
                          "its embeddings will differ from SentenceTransformer's", RuntimeWarning, stacklevel=2)
        if pooling == "auto" and st_pooling not in (None, "mean", "cls"):
            raise ValueError(f"pooling: {st_pooling}; Encoder supports mean and cls pooling only "
                             "(pass pooling='mean' or 'cls' to override)")
        self.pooling = (st_pooling or saved.get("pooling") or "mean") if pooling == "auto" else pooling
        # None: what save_pretrained recorded, else normalised
        self.normalize = bool(saved.get("normalize", True)) if normalize is None else bool(normalize)
        default_query, default_passage = _default_prefixes(folder, saved)
        self.query_prefix = default_query if query_prefix is None else query_prefix
        self.passage_prefix = default_passage if passage_prefix is None else passage_prefix
        self.show_progress = bool(show_progress)
        self.amp = amp or None
        self._packed = None  # (weights version, packed half-precision copy) for CPU encoding
        check_model_folder(folder, model_dir)
        self.tokenizer, self.model, self.max_length = _load(model_dir, source, dtype, max_length, saved, folder)
        # Dense layers after pooling (sentence-transformers folders such as LaBSE's)
        self.dense = torch.nn.ModuleList(st_folder.Dense.load(d) for d in dense_dirs)
        self.model.to(resolve_device(device))
        self.dense.to(resolve_device(device))
        self.eval()  # inference by default, as from_pretrained leaves models; trainers call .train()

    # ------------------------------------------------------------------ basics

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dim(self) -> int:
        return self.dense[-1].linear.out_features if len(self.dense) else int(self.model.config.hidden_size)

    def _prefix(self, kind):
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        return self.query_prefix if kind == "query" else self.passage_prefix

    def tokenize(self, texts, kind="query", max_length=None):
        """Prefixed, padded, truncated tokens of `texts` as tensors on self.device."""
        prefix = self._prefix(kind)
        texts = _check_texts(texts)
        max_length = self.max_length if max_length is None else _check_positive_int(max_length, "max_length")
        batch = self.tokenizer([prefix + t for t in texts], padding=True, truncation=True,
                               max_length=max_length, return_tensors="pt")
        return {k: v.to(self.device) for k, v in batch.items()}

    def pool(self, hidden, attention_mask):
        """[n, T, H] hidden states -> [n, H] float32 embeddings (normalised if self.normalize)."""
        hidden = hidden.float()
        if self.pooling == "cls":
            out = hidden[:, 0]
        else:
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            out = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        for dense in self.dense:
            out = dense(out)
        return F.normalize(out, p=2, dim=-1) if self.normalize else out

    def forward(self, input_ids, attention_mask, **extra):
        """Pooled (and L2-normalised) embeddings [n, H]; differentiable, no autocast of its own."""
        if input_ids.dim() != 2 or attention_mask.shape != input_ids.shape:
            raise ValueError(f"input_ids and attention_mask must both be [n, T], got "
                             f"{tuple(input_ids.shape)} and {tuple(attention_mask.shape)}")
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, **extra)
        return self.pool(out[0], attention_mask)

    # ------------------------------------------------------------------ batched encoding

    @property
    def precision(self) -> str:
        """What encode_* computes in: "bf16", "fp16" or "fp32" (or the model's own dtype name
        when it was loaded in half precision)."""
        weights = next(self.model.parameters()).dtype
        if weights != torch.float32:
            return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(weights, str(weights))
        if self.amp is None:
            return "fp32"
        if self.device.type == "cuda":
            if self.amp == "auto":
                return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
            return self.amp
        if self.amp == "fp16":
            raise ValueError("amp='fp16' needs a CUDA device (fp16 GEMMs are emulated on CPUs); use 'bf16' or None")
        return "bf16" if self.amp == "bf16" or cpu_bf16_native() else "fp32"

    def _inference_model(self):
        """(model, autocast context) for encode_*: the model itself (fp32, or CUDA autocast), or
        on a CPU in bf16 a packed bf16 copy, rebuilt only when the weights changed."""
        precision = self.precision
        if precision == "fp32" or next(self.model.parameters()).dtype != torch.float32:
            return self.model, contextlib.nullcontext()
        if self.device.type == "cuda":
            return self.model, torch.autocast("cuda", dtype=_DTYPES[precision])
        version = weights_version(self.model)
        if self._packed is None or self._packed[0] != version:
            self._packed = None  # free the stale copy before building the new one
            self._packed = (version, inference_copy(self.model, _DTYPES[precision]))
        return self._packed[1], contextlib.nullcontext()

    def _pad(self, rows, key):
        """Pad lists of ids to a [len(rows), longest] long tensor on the tokenizer's side."""
        fill = {"input_ids": self.tokenizer.pad_token_id, "attention_mask": 0}.get(
            key, getattr(self.tokenizer, "pad_token_type_id", 0))
        width = max(len(r) for r in rows)
        out = torch.full((len(rows), width), fill, dtype=torch.long)
        for i, r in enumerate(rows):
            if self.tokenizer.padding_side == "left":
                out[i, width - len(r):] = torch.as_tensor(r)
            else:
                out[i, :len(r)] = torch.as_tensor(r)
        return out

    def _encode(self, texts, kind, batch_size):
        prefix = self._prefix(kind)
        texts = _check_texts(texts)
        batch_size = self.batch_size if batch_size is None else _check_positive_int(batch_size, "batch_size")
        out = torch.empty(len(texts), self.dim, dtype=torch.float32)
        if not texts:
            return out
        tokens = self.tokenizer([prefix + t for t in texts], truncation=True, max_length=self.max_length)
        keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in tokens]
        order = sorted(range(len(texts)), key=lambda i: -len(tokens["input_ids"][i]))  # stable: ties keep order
        was_training = self.training
        self.eval()
        try:
            model, autocast = self._inference_model()
            with torch.no_grad(), autocast, TextProgress(len(texts), f"encode {kind} texts",
                                                         self.show_progress) as bar:
                for start in range(0, len(order), batch_size):
                    idx = order[start:start + batch_size]
                    batch = {k: self._pad([tokens[k][i] for i in idx], k).to(self.device) for k in keys}
                    emb = self.pool(model(**batch)[0], batch["attention_mask"])
                    out[torch.as_tensor(idx)] = emb.float().cpu()
                    bar.update(len(idx))
        finally:
            self.train(was_training)
        return out

    def encode_queries(self, texts, batch_size=None) -> torch.Tensor:
        """[n, H] float32 CPU embeddings of queries (query prefix applied), in input order."""
        return self._encode(texts, "query", batch_size)

    def encode_passages(self, texts, batch_size=None) -> torch.Tensor:
        """[n, H] float32 CPU embeddings of passages (passage prefix applied), in input order."""
        return self._encode(texts, "passage", batch_size)

    # ------------------------------------------------------------------ diagnostics and saving

    def unk_rate(self, texts) -> float:
        """Fraction of the texts' tokens (no prefix, no special tokens) that are the unknown token.

        High rates mean the tokenizer cannot read the script (e.g. an English
        WordPiece vocabulary on Thai), so retrieval in that language is blind.
        """
        texts = _check_texts(texts)
        unk = self.tokenizer.unk_token_id
        if unk is None or not texts:
            return 0.0
        ids = self.tokenizer(texts, add_special_tokens=False, truncation=False, verbose=False)["input_ids"]
        total = sum(len(r) for r in ids)
        return sum(r.count(unk) for r in ids) / total if total else 0.0

    def save_pretrained(self, path):
        """Write the model and tokenizer (safetensors) plus the sentence-transformers files.

        Both Encoder(path) and sentence_transformers.SentenceTransformer(path) load the
        result with the same pooling and normalisation; the prefixes are kept in
        hybridfast_config.json (and as sentence-transformers prompts "query" / "passage").
        Files follow the umask (safetensors alone would make them owner-only).
        """
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        started = time.time() - 1  # mtimes may be rounded down to the second
        with quiet_loading():
            self.model.save_pretrained(str(path))
            self.tokenizer.save_pretrained(str(path))
        dense_dirs = st_folder.write(path, hidden=int(self.model.config.hidden_size), pooling=self.pooling,
                                     normalize=self.normalize, n_dense=len(self.dense),
                                     prompts=(self.query_prefix, self.passage_prefix), max_seq_length=self.max_length)
        for dense, where in zip(self.dense, dense_dirs):
            dense.save(where)
        atomic_write_json(path / HYBRIDFAST_CONFIG, {"query_prefix": self.query_prefix,
                                                     "passage_prefix": self.passage_prefix, "pooling": self.pooling,
                                                     "normalize": self.normalize, "max_length": self.max_length})
        apply_umask(path, since=started)
        return path

    def extra_repr(self):
        return (f"source={self.source!r}, pooling={self.pooling!r}, normalize={self.normalize}, "
                f"query_prefix={self.query_prefix!r}, passage_prefix={self.passage_prefix!r}, "
                f"max_length={self.max_length}")
