"""Encoder throughput: all-MiniLM-L6-v2 embedding XQuAD-R candidates (sentence + paragraph,
truncated at 256 tokens), in texts per second.

Baselines in the same run, on the same texts and batch size:
- `hf_loop_unsorted`: the plain Hugging Face loop (tokenize each batch in input
  order, pad to its longest text, mean-pool), i.e. what Encoder does minus length sorting;
- `sentence_transformers`: SentenceTransformer.encode on the same folder.
CPU case on a few hundred texts; the CUDA case (more texts, bf16/fp16 autocast
against fp32) skips without a GPU.

Run: python -m pytest bench/bench_encoder.py --benchmark-only -s
"""
import os
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from bench.utils import peak_memory_bytes, save_results
from hybridfast.data import candidate_text, load_benchmark
from hybridfast.encoder import Encoder, default_model_path

CPU_TEXTS, GPU_TEXTS, BATCH = 176, 4096, 32
RESULTS, OUTPUTS = {}, {}


def _texts(n):
    """n candidate texts, the same share from every language (scripts tokenize very differently)."""
    root = os.environ.get("HYBRIDFAST_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data"
    try:
        bench = load_benchmark("xquad-r", data_dir=root)
    except FileNotFoundError as e:
        pytest.skip(str(e))
    per_lang = -(-n // len(bench.languages))
    texts = [candidate_text(*c) for lang in bench.languages
             for c in list(bench.candidates[lang].values())[:per_lang]]
    return texts[:n]


def _hf_loop_unsorted(enc, texts, batch_size):
    """The plain reference: batches in input order, no sorting (same model, same pooling)."""
    out = []
    enc.eval()
    with torch.no_grad():
        for i in range(0, len(texts), batch_size):
            batch = enc.tokenize(texts[i:i + batch_size], kind="passage")
            out.append(enc(**batch).float().cpu())
    return torch.cat(out)


def _run(benchmark, name, fn, device, texts, rounds, batch_size=BATCH, **extra):
    """Time fn (best of `rounds`); each round also records its own peak memory, so no extra pass."""
    peaks, outs = [], []

    def measured():
        cpu0 = time.process_time()
        peaks.append(peak_memory_bytes(lambda: outs.append(fn()), device))
        cpu.append(time.process_time() - cpu0)

    cpu, load0 = [], os.getloadavg()[0]
    benchmark.pedantic(measured, rounds=rounds, iterations=1, warmup_rounds=0)
    seconds = benchmark.stats.stats.min
    # The CPU is shared: CPU seconds and the load average say how much of the wall time was ours.
    RESULTS[name] = dict(name=name, device=device.type, texts=len(texts), batch_size=batch_size,
                         seconds=seconds, texts_per_s=len(texts) / seconds, cpu_seconds=min(cpu),
                         texts_per_cpu_s=len(texts) / min(cpu), load_avg_1min=(load0 + os.getloadavg()[0]) / 2,
                         peak_memory_bytes=max(peaks), **extra)
    return outs[-1]


@pytest.fixture(scope="module")
def cpu_setup():
    texts = _texts(CPU_TEXTS)
    enc = Encoder(default_model_path(), query_prefix="", passage_prefix="", device="cpu", batch_size=BATCH,
                  show_progress=False)
    tokens = sum(len(r) for r in enc.tokenizer(texts, truncation=True, max_length=256)["input_ids"])
    return enc, texts, tokens


@pytest.fixture(scope="module", autouse=True)
def report():
    yield
    for device_type in ("cpu", "cuda"):
        records = [r for r in RESULTS.values() if r["device"] == device_type]
        if not records:
            continue
        ours = next((r for r in records if r["name"].startswith("encoder_")), None)
        for r in records:
            if ours is not None and r is not ours:
                r["encoder_speedup_wall"] = ours["texts_per_s"] / r["texts_per_s"]
                r["encoder_speedup_cpu"] = ours["texts_per_cpu_s"] / r["texts_per_cpu_s"]
        path = save_results("encoder", torch.device(device_type), records)
        print(f"\nencoder results -> {path}")
        for r in records:
            print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()})


def test_cpu_encoder(benchmark, cpu_setup):
    enc, texts, tokens = cpu_setup
    torch.set_num_threads(os.cpu_count() or 1)
    out = _run(benchmark, "encoder_length_sorted", lambda: enc.encode_passages(texts), torch.device("cpu"),
               texts, rounds=1, tokens=tokens)
    assert out.shape == (len(texts), 384)
    OUTPUTS["cpu"] = out


def test_cpu_hf_loop_unsorted(benchmark, cpu_setup):
    enc, texts, tokens = cpu_setup
    out = _run(benchmark, "hf_loop_unsorted", lambda: _hf_loop_unsorted(enc, texts, BATCH), torch.device("cpu"),
               texts, rounds=1, tokens=tokens)
    if "cpu" in OUTPUTS:  # same embeddings, whatever the batching
        assert F.cosine_similarity(out, OUTPUTS["cpu"]).min() > 0.9999


def test_cpu_sentence_transformers(benchmark, cpu_setup):
    st_module = pytest.importorskip("sentence_transformers")
    enc, texts, tokens = cpu_setup
    st = st_module.SentenceTransformer(default_model_path(), device="cpu")
    out = _run(benchmark, "sentence_transformers", lambda: st.encode(texts, batch_size=BATCH), torch.device("cpu"),
               texts, rounds=1, tokens=tokens)
    assert out.shape == (len(texts), 384)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("amp", ["auto", None])
def test_cuda_encoder(benchmark, amp):
    texts = _texts(GPU_TEXTS)
    enc = Encoder(default_model_path(), query_prefix="", passage_prefix="", device="cuda", batch_size=256,
                  show_progress=False, amp=amp)
    enc.encode_passages(texts[:512])  # warm-up: kernels, allocator

    def fn():  # peak_memory_bytes synchronizes on CUDA
        return enc.encode_passages(texts)

    name = "encoder_length_sorted_amp" if amp else "fp32_length_sorted"
    out = _run(benchmark, name, fn, torch.device("cuda"), texts, rounds=3, batch_size=256, amp=str(amp))
    assert out.shape == (len(texts), 384)
