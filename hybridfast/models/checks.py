"""Checks on a local model folder before it is loaded, each a one-line error naming the folder and the fix.

- a `hybridfast train --output` folder given as a model: point at its final/ or checkpoint-N/;
- no tokenizer files: every word would become the unknown token;
- damaged files (models.cache.problem: a file missing or changed size since it was built,
  a safetensors file shorter than its header says): DamagedModelError, with how to rebuild it.
"""
from pathlib import Path
from typing import Optional

from hybridfast.models.cache import cache_dir, problem, read_info
from hybridfast.models.registry import DamagedModelError, display_name

# Files one of which a local model folder needs for AutoTokenizer to load its real vocabulary.
_TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "sentencepiece.bpe.model", "spiece.model",
                    "tokenizer.model", "vocab.json")


def _training_output_hint(folder: Path) -> Optional[str]:
    """For a `hybridfast train --output` folder: which of its model folders to pass instead."""
    if not any((folder / f).exists() for f in ("train_config.json", ".hybridfast-run.json", "final")):
        return None
    steps = sorted((int(p.name.split("-", 1)[1]), p) for p in folder.glob("checkpoint-*")
                   if p.name.split("-", 1)[1].isdigit() and (p / "config.json").is_file())
    latest = f"; the latest checkpoint is {steps[-1][1]}" if steps else ""
    return (f"model_name_or_path: {folder} is a training output folder, not a model; pass {folder / 'final'} "
            f"(the finished model) or {folder / 'checkpoint-N'} (a checkpoint){latest}")


def check_model_folder(folder: Path, model_dir: Path) -> None:
    """One-line errors, naming the folder and the fix, for a local folder that is no loadable model."""
    if not model_dir.is_dir():
        return  # a hub id: transformers fetches it
    hint = _training_output_hint(folder) if not (model_dir / "config.json").is_file() else None
    if hint:
        raise ValueError(hint)
    if not any((model_dir / f).is_file() for f in _TOKENIZER_FILES):
        raise ValueError(f"model_name_or_path: {model_dir} holds no tokenizer files (one of "
                         f"{', '.join(_TOKENIZER_FILES)}); copy the tokenizer of the model it was trained "
                         "from into the folder (without it every word would become the unknown token)")
    trouble = problem(folder) if read_info(folder).get("files") else problem(model_dir)
    if trouble:
        raise DamagedModelError(f"model_name_or_path: {folder} is damaged ({trouble}); {repair_hint(folder)}")


def repair_hint(folder: Path) -> str:
    """How to mend a damaged `folder`: `models get` rebuilds a cache entry in place; anything
    else is the user's folder, which hybridfast never rewrites on its own."""
    info = read_info(folder)
    try:
        in_cache = folder.resolve().parent == cache_dir().resolve()
    except OSError:
        in_cache = False
    if in_cache:
        name = info.get("name")
        target = display_name(name, info.get("layers")) if isinstance(name, str) else folder.name
        return f"run `hybridfast models get {target}` to rebuild it in place"
    return "copy or save the model into it again (or delete it)"
