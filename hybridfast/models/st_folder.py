"""The sentence-transformers folder files: the one writer and the one reader.

    modules.json                        Transformer -> Pooling -> Dense* -> Normalize?
    1_Pooling/config.json               mean or cls pooling
    sentence_bert_config.json           max_seq_length
    config_sentence_transformers.json   prompts {"query", "passage"} and the similarity

`write` serves both the named models (models.fetch / models.me5) and
`Encoder.save_pretrained`, so a folder hybridfast writes loads the same way in
Encoder and in sentence_transformers.SentenceTransformer whoever wrote it. `Dense`
reads and writes a Dense module folder (Linear + activation after pooling, e.g. LaBSE).
"""
import importlib
import json
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import torch

from hybridfast.rules import atomic_write_json

MODULES = "modules.json"
POOLING_DIR = "1_Pooling"
SBERT_CONFIG = "sentence_bert_config.json"
ST_CONFIG = "config_sentence_transformers.json"
_KNOWN_MODULES = ("Transformer", "Pooling", "Dense", "Normalize")


def read_json(path: Path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def write(folder, *, hidden: int, prompts: Tuple[str, str], max_seq_length: int, pooling: str = "mean",
          normalize: bool = True, n_dense: int = 0, modules: bool = True) -> List[Path]:
    """Write the sentence-transformers files into `folder`; returns the Dense folders to fill.

    modules=False writes the prompts only (a hub folder that has its own pipeline)."""
    folder = Path(folder)
    similarity = "cosine" if normalize else "dot"
    atomic_write_json(folder / ST_CONFIG, {"prompts": {"query": prompts[0], "passage": prompts[1]},
                                           "default_prompt_name": None, "similarity_fn_name": similarity})
    if not modules:
        return []
    # sentence-transformers' pipeline: Transformer -> Pooling -> Dense* -> Normalize
    stages = [("", "Transformer"), (POOLING_DIR, "Pooling")]
    stages += [(f"{2 + i}_Dense", "Dense") for i in range(n_dense)]
    if normalize:
        stages.append((f"{len(stages)}_Normalize", "Normalize"))
    for path, _ in stages[1:]:
        (folder / path).mkdir(exist_ok=True)
    atomic_write_json(folder / MODULES, [{"idx": i, "name": str(i), "path": p,
                                          "type": f"sentence_transformers.models.{kind}"}
                                         for i, (p, kind) in enumerate(stages)])
    atomic_write_json(folder / POOLING_DIR / "config.json", {
        "word_embedding_dimension": int(hidden), "pooling_mode_cls_token": pooling == "cls",
        "pooling_mode_mean_tokens": pooling == "mean", "pooling_mode_max_tokens": False,
        "pooling_mode_mean_sqrt_len_tokens": False, "pooling_mode_weightedmean_tokens": False,
        "pooling_mode_lasttoken": False, "include_prompt": True})
    atomic_write_json(folder / SBERT_CONFIG, {"max_seq_length": int(max_seq_length), "do_lower_case": False})
    return [folder / p for p, kind in stages if kind == "Dense"]


def _pooling_of(config_file: Path) -> str:
    """'mean' or 'cls', or a sentence describing an unsupported mode."""
    cfg = read_json(config_file)
    mode = cfg.get("pooling_mode")  # sentence-transformers >= 6: "mean", "cls" or a list of modes
    if mode is not None:
        modes = [mode] if isinstance(mode, str) else list(mode)
        return modes[0] if modes in (["mean"], ["cls"]) else f"{config_file} asks for {modes}"
    if cfg.get("pooling_mode_cls_token"):
        return "cls"
    if cfg.get("pooling_mode_mean_tokens"):
        return "mean"
    # max, lasttoken, ...: an error only where the caller asks for "auto"
    return f"{config_file} asks for {[k for k, v in cfg.items() if k.startswith('pooling_mode') and v is True]}"


def layout(folder) -> Tuple[Path, Optional[str], List[Path], List[str]]:
    """(transformer subfolder, pooling from the Pooling config or None, Dense folders, ignored module types).

    A folder without modules.json is a plain Hugging Face folder: (folder, None, [], [])."""
    folder = Path(folder)
    sub, pooling, dense, ignored = folder, None, [], []
    if not (folder / MODULES).is_file():
        return sub, pooling, dense, ignored
    for module in read_json(folder / MODULES):
        kind = module.get("type", "").rsplit(".", 1)[-1]
        where = folder / module.get("path", "")
        if kind == "Transformer":
            sub = where
        elif kind == "Pooling":
            pooling = _pooling_of(where / "config.json")
        elif kind == "Dense":
            dense.append(where)
        if kind not in _KNOWN_MODULES:
            ignored.append(kind)
    return sub, pooling, dense, ignored


def prompts(folder) -> Optional[Tuple[str, str]]:
    """(query, passage) prompts of a sentence-transformers folder ('' where it has none), else None."""
    folder = Path(folder)
    if not (folder / MODULES).is_file():
        return None
    found = (read_json(folder / ST_CONFIG).get("prompts") or {}) if (folder / ST_CONFIG).is_file() else {}
    return found.get("query", ""), found.get("passage", found.get("document", ""))


def max_seq_length(folders: Sequence) -> Optional[int]:
    """The first sentence_bert_config.json max_seq_length found in `folders`, else None."""
    for folder in folders:
        path = Path(folder) / SBERT_CONFIG
        if path.is_file():
            value = read_json(path).get("max_seq_length")
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
    return None


class Dense(torch.nn.Module):
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
        cfg = read_json(folder / "config.json")
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
