"""Which model a cell holds: resolution of --models entries, identity, labels, parameter counts.

A cell is keyed by the model's identity, never by a folder's basename (every
`hybridfast train` output ends in `final/`): the identity is the name the model
was asked for (a named model, optionally truncated: `multilingual-e5-small@3`)
or the resolved absolute folder, plus a hash of the folder's contents (config.json
bytes, and the names and sizes of its weight files).
"""
import hashlib
import importlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence

from hybridfast.models.registry import BUNDLED_MINILM, canonical_name
from hybridfast.study.config import ModelChoice

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".h5", ".msgpack", ".ckpt")
BUNDLED_LABEL = BUNDLED_MINILM  # its aliases ("minilm", the hub id) are the registry's


@dataclass(frozen=True)
class ResolvedModel:
    spec: ModelChoice
    path: str        # what Encoder/TrainConfig load: a folder, or a hub name
    name: str        # identity name: the requested name (+@layers), or the absolute folder
    content: str     # hash of config and weight file names/sizes ("" for a hub name not on disk)
    label: str       # short readable name, unique within the study
    family: str

    @property
    def model_id(self) -> str:
        return hashlib.sha1(f"{self.name}|{self.content}".encode()).hexdigest()[:10]


def content_hash(folder) -> str:
    """sha1 of config.json's bytes and the (relative name, size) of every weight file under `folder`."""
    folder = Path(folder)
    h = hashlib.sha1()
    cfg = folder / "config.json"
    h.update(cfg.read_bytes() if cfg.is_file() else b"<no config.json>")
    for f in sorted(p for p in folder.rglob("*") if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES)):
        h.update(f"\n{f.relative_to(folder).as_posix()}:{f.stat().st_size}".encode())
    return h.hexdigest()[:16]


def _bundled() -> str:
    from hybridfast.models import minilm_path

    return minilm_path()


def _models_get(name: str, layers: Optional[int]) -> Optional[str]:
    """hybridfast.models.get(name, layers=...) when that module exists and knows the name."""
    try:
        models = importlib.import_module("hybridfast.models")
    except ImportError:
        if layers is not None:
            raise ValueError(f"models: {name}@L{layers} needs hybridfast.models (truncation by layers), "
                             "which this installation lacks") from None
        return None
    try:
        return str(models.get(name, layers=layers))
    except (KeyError, LookupError, ValueError):
        if layers is not None:
            raise
        return None  # a name hybridfast.models does not know: left to the Encoder (hub name)


def resolve(spec: ModelChoice) -> tuple:
    """(path to load, identity name) of one spec."""
    if spec.layers is None and os.path.exists(spec.name):
        path = str(Path(spec.name).resolve())
        try:
            if path == str(Path(_bundled()).resolve()):
                return path, BUNDLED_LABEL
        except (FileNotFoundError, ImportError, OSError):
            pass
        return path, path
    if spec.layers is None and canonical_name(spec.name) == BUNDLED_MINILM:
        return _bundled(), BUNDLED_LABEL
    got = _models_get(spec.name, spec.layers)
    ident = str(ModelChoice(spec.name, spec.layers))
    if got is not None:
        return got, ident
    return spec.name, ident  # a hub name: the Encoder and trainer download it


def _suffix_labels(paths: Sequence[str]) -> List[str]:
    """The shortest trailing path of each folder that no other folder shares."""
    parts = [Path(p).parts for p in paths]
    labels = []
    for i, p in enumerate(parts):
        for n in range(1, len(p) + 1):
            tail = p[-n:]
            if all(q[-n:] != tail for j, q in enumerate(parts) if j != i):
                break
        labels.append("/".join(tail))
    return labels


def resolve_models(specs: Sequence[ModelChoice]) -> List[ResolvedModel]:
    """Resolve every spec; labels are unique (folders by their shortest distinguishing path)."""
    resolved = [(s, *resolve(s)) for s in specs]
    folders = [i for i, (s, path, ident) in enumerate(resolved) if ident == path]
    labels = [str(ModelChoice(s.name, s.layers)) if ident != path else None for s, path, ident in resolved]
    labels = [BUNDLED_LABEL if ident == BUNDLED_LABEL else l for l, (_, _, ident) in zip(labels, resolved)]
    for i, label in zip(folders, _suffix_labels([resolved[i][1] for i in folders])):
        labels[i] = label
    out, seen = [], {}
    for (spec, path, ident), label in zip(resolved, labels):
        content = content_hash(path) if os.path.isdir(path) else ""
        family = spec.family or (spec.name if spec.layers is not None else label)
        m = ResolvedModel(spec, path, ident, content, label, family)
        if m.model_id in seen:
            raise ValueError(f"models: {spec} and {seen[m.model_id]} are the same model")
        seen[m.model_id] = spec
        out.append(m)
    if len({m.label for m in out}) != len(out):  # e.g. a folder named like a requested model
        out = [ResolvedModel(m.spec, m.path, m.name, m.content, f"{m.label} [{m.model_id[:6]}]", m.family)
               for m in out]
    return out


def parameter_counts(model) -> dict:
    """Total parameters, and those outside the embedding tables.

    Non-embedding = total minus the weights of the nn.Embedding modules inside the
    model's `embeddings` block (token, position and token-type tables; Kaplan et
    al. 2020's convention). With a 250k-token vocabulary the token table is most
    of multilingual-e5-small's 118M parameters, so size is plotted against this.
    """
    import torch

    total = int(sum(p.numel() for p in model.parameters()))
    scope = getattr(model, "embeddings", None) or model
    emb = int(sum(m.weight.numel() for m in scope.modules() if isinstance(m, torch.nn.Embedding)))
    return {"params_total": total, "params_non_embedding": total - emb,
            "layers": getattr(model.config, "num_hidden_layers", None)}
