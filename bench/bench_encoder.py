"""Encoder throughput against the machine's GEMM peak (issue 21): multilingual-e5-small on
XQuAD-R text, fp32 against bf16 in the same run.

What is measured, each with its baseline in the same process:
- `gemm_peak[fp32|bf16]`: the best GFLOP/s of one [4096, 384] x [384, 1536] product (the
  encoder's FFN shape, weight stored [in, out]) -> the peak the encoder is held against;
- `eval_encoding[fp32|bf16]`: Encoder.encode_passages on XQuAD-R passages (sentence +
  paragraph, 128 tokens), texts/s; the linear layers' FLOPs counted from the padded batches,
  their achieved GFLOP/s from a profiled pass (time inside aten::mm / addmm) as a fraction of
  the peak of the same dtype; embedding cosine of bf16 to fp32;
- `train_step[fp32-before|fp32|bf16][plain|gradcache]`: one step of the real trainer's code
  (embed, loss, backward, clip, AdamW, schedule) at the demo's budget (16 pairs, 48 tokens);
  fp32-before is the step as it was before issue 21 (unfused AdamW), the issue's baseline;
- `profile_*`: the top operators by self CPU time of a bf16 encoding pass and a bf16 step.
Parity at the demo's scale (`test_demo_eval_parity`, `test_demo_loss_curve_parity`, marked slow):
every mAP of the demo's evaluation in bf16 against fp32, and the bf16 loss curve against fp32's
over the demo's 72 steps (same seed).

Results: bench/results/<device>.json under "encoder" (load average and CPU model with each).
Run on an idle machine: python -m pytest bench/bench_encoder.py --benchmark-only -s  (~15 min)
"""
import os
import time

import pytest
import torch
import torch.nn.functional as F

from bench.utils import cpu_model, peak_memory_bytes, save_results

N_TEXTS, EVAL_LENGTH, EVAL_BATCH = 192, 128, 32
TRAIN_PAIRS, TRAIN_LENGTH, GRADCACHE_CHUNK = 16, 48, 8
RESULTS, OUTPUTS = {}, {}
LINEAR_OPS = ("aten::mm", "aten::addmm", "aten::bmm")
PRECISIONS = {"fp32": None, "bf16": "bf16"}


def _data_root():
    return os.environ.get("HYBRIDFAST_DATA") or os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")


@pytest.fixture(scope="module")
def model_path():
    from hybridfast.models import get

    try:
        return str(get("multilingual-e5-small", show_progress=False))
    except Exception as e:  # noqa: BLE001 - no rebuild packages: nothing to measure
        pytest.skip(f"multilingual-e5-small unavailable: {e}")


@pytest.fixture(scope="module")
def xquad():
    from hybridfast.data import load_benchmark

    try:
        return load_benchmark("xquad-r", data_dir=_data_root())
    except (FileNotFoundError, ValueError) as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def passages(xquad):
    """N_TEXTS passages, the same share from every language (scripts tokenize differently)."""
    from hybridfast.data import candidate_text

    per_lang = -(-N_TEXTS // len(xquad.languages))
    return [candidate_text(*c) for lang in xquad.languages
            for c in list(xquad.candidates[lang].values())[:per_lang]][:N_TEXTS]


@pytest.fixture(scope="module", autouse=True)
def threads_and_report():
    torch.set_num_threads(os.cpu_count() or 1)  # intra-op threads = the cores
    yield
    if not RESULTS:
        return
    for key in ("fp32", "bf16"):
        peak = RESULTS.get(f"gemm_peak[{key}]", {}).get("gflops")
        rec = RESULTS.get(f"eval_encoding[{key}]")
        if peak and rec and rec.get("linear_gflops"):
            rec["linear_fraction_of_peak"] = rec["linear_gflops"] / peak
    for a, b, name in [("eval_encoding[bf16]", "eval_encoding[fp32]", "eval_speedup_bf16"),
                       ("train_step[bf16][plain]", "train_step[fp32][plain]", "train_speedup_bf16"),
                       ("train_step[bf16][gradcache]", "train_step[fp32][gradcache]", "train_speedup_bf16"),
                       ("train_step[bf16][plain]", "train_step[fp32-before][plain]", "train_speedup_vs_before"),
                       ("train_step[bf16][gradcache]", "train_step[fp32-before][gradcache]",
                        "train_speedup_vs_before")]:
        if a in RESULTS and b in RESULTS:
            RESULTS[a][name] = RESULTS[b]["seconds"] / RESULTS[a]["seconds"]
    path = save_results("encoder", torch.device("cpu"), list(RESULTS.values()))
    print(f"\nencoder results -> {path}")
    for r in RESULTS.values():
        print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items() if k != "top_ops"})


def _record(name, seconds, cpu_seconds, **extra):
    RESULTS[name] = dict(name=name, device=f"{cpu_model()} ({os.cpu_count()} cores)", seconds=seconds,
                         cpu_seconds=cpu_seconds, load_avg_1min=os.getloadavg()[0],
                         threads=torch.get_num_threads(), **extra)
    return RESULTS[name]


def _timed(benchmark, fn, rounds):
    """Best wall time of `rounds` calls of fn (one warm-up first), and its CPU time."""
    fn()
    cpu = []

    def measured():
        c0 = time.process_time()
        fn()
        cpu.append(time.process_time() - c0)

    benchmark.pedantic(measured, rounds=rounds, iterations=1, warmup_rounds=0)
    return benchmark.stats.stats.min, min(cpu)


def _profile(fn, top=12):
    """(seconds inside the linear-layer GEMMs, top operators by self CPU time) of one call."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    events = prof.key_averages()
    linear_s = sum(e.self_cpu_time_total for e in events if e.key in LINEAR_OPS) / 1e6
    total = sum(e.self_cpu_time_total for e in events) or 1
    ops = sorted(events, key=lambda e: -e.self_cpu_time_total)[:top]
    return linear_s, [{"op": e.key, "self_cpu_ms": e.self_cpu_time_total / 1e3, "calls": e.count,
                       "share": e.self_cpu_time_total / total} for e in ops]


def linear_flops_per_token(config) -> int:
    """Multiply-adds x 2 of one encoder layer's linear maps (Q, K, V, output, FFN in and out), all layers."""
    h, i = config.hidden_size, config.intermediate_size
    return config.num_hidden_layers * 2 * (4 * h * h + 2 * h * i)


def padded_tokens(encoder, texts, batch_size) -> int:
    """Tokens the encoder actually runs: its length-sorted batches, each padded to its longest."""
    lengths = sorted((len(ids) for ids in encoder.tokenizer([encoder.passage_prefix + t for t in texts],
                                                             truncation=True, max_length=encoder.max_length)
                      ["input_ids"]), reverse=True)
    return sum(len(lengths[i:i + batch_size]) * lengths[i] for i in range(0, len(lengths), batch_size))


# ------------------------------------------------------------------ the GEMM peak

@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_gemm_peak(benchmark, precision):
    dtype = torch.float32 if precision == "fp32" else torch.bfloat16
    a, w = torch.randn(4096, 384, dtype=dtype), torch.randn(384, 1536, dtype=dtype)
    seconds, cpu = _timed(benchmark, lambda: torch.mm(a, w), rounds=20)
    _record(f"gemm_peak[{precision}]", seconds, cpu, shape=[4096, 384, 1536],
            gflops=2 * 4096 * 384 * 1536 / seconds / 1e9)


# ------------------------------------------------------------------ evaluation encoding

@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_eval_encoding(benchmark, model_path, passages, precision):
    from hybridfast.encoder import Encoder

    enc = Encoder(model_path, max_length=EVAL_LENGTH, device="cpu", batch_size=EVAL_BATCH, show_progress=False,
                  amp=PRECISIONS[precision])
    assert enc.precision == precision
    out = []
    seconds, cpu = _timed(benchmark, lambda: out.append(enc.encode_passages(passages)), rounds=2)
    peak = peak_memory_bytes(lambda: enc.encode_passages(passages), torch.device("cpu"))
    tokens = padded_tokens(enc, passages, EVAL_BATCH)
    flops = tokens * linear_flops_per_token(enc.model.config)
    linear_s, top = _profile(lambda: enc.encode_passages(passages))
    rec = _record(f"eval_encoding[{precision}]", seconds, cpu, texts=len(passages), max_length=EVAL_LENGTH,
                  batch_size=EVAL_BATCH, padded_tokens=tokens, texts_per_s=len(passages) / seconds,
                  linear_gflop=flops / 1e9, linear_seconds_profiled=linear_s,
                  linear_gflops=flops / 1e9 / linear_s if linear_s else None,
                  linear_share_of_time=linear_s / seconds, peak_memory_bytes=peak, top_ops=top)
    OUTPUTS[precision] = out[-1]
    if "fp32" in OUTPUTS and "bf16" in OUTPUTS:
        cos = F.cosine_similarity(OUTPUTS["bf16"], OUTPUTS["fp32"])
        rec.update(cosine_to_fp32_min=float(cos.min()), cosine_to_fp32_mean=float(cos.mean()))
        assert float(cos.min()) >= 0.995


# ------------------------------------------------------------------ one training step

@pytest.mark.parametrize("chunked", ["plain", "gradcache"])
@pytest.mark.parametrize("precision", ["fp32-before", "fp32", "bf16"])
def test_train_step(benchmark, model_path, xquad, precision, chunked):
    """fp32-before is the trainer's step before issue 21 (fp32, unfused AdamW): the baseline the
    issue's target is set against; fp32 is today's fp32 step (fused AdamW)."""
    from transformers import get_linear_schedule_with_warmup

    from hybridfast import HybridContrastiveLoss
    from hybridfast.data import candidate_text
    from hybridfast.encoder import Encoder
    from hybridfast.training.loop import make_optimizer
    from hybridfast.training.steps import gradcache_step, plain_step, update

    langs = xquad.languages
    qids = list(xquad.queries["en"])[:TRAIN_PAIRS]
    queries = [xquad.queries[langs[i % len(langs)]][q] for i, q in enumerate(qids)]
    cands = [c for lang in langs for c in xquad.candidates[lang].values()]
    texts = [candidate_text(*cands[7 * i]) for i in range(TRAIN_PAIRS)]
    enc = Encoder(model_path, max_length=TRAIN_LENGTH, device="cpu", show_progress=False).train()
    q_in, p_in = enc.tokenize(queries, "query"), enc.tokenize(texts, "passage")
    loss_fn = HybridContrastiveLoss()
    if precision == "fp32-before":
        from hybridfast.training.steps import param_groups

        opt = torch.optim.AdamW(param_groups(enc, 0.01), lr=3e-5)
    else:
        opt = make_optimizer(enc, type("C", (), {"lr": 3e-5, "weight_decay": 0.01}))
    sched = get_linear_schedule_with_warmup(opt, 0, 1000)
    amp = torch.bfloat16 if precision == "bf16" else None
    params = [p for p in enc.parameters() if p.requires_grad]

    def step():
        if chunked == "gradcache":
            loss = gradcache_step(enc, loss_fn, q_in, p_in, None, None, GRADCACHE_CHUNK, amp_dtype=amp)
        else:
            loss = plain_step(enc, loss_fn, q_in, p_in, None, None, amp_dtype=amp)
        update(params, opt, sched, None, 1, loss, 0)

    seconds, cpu = _timed(benchmark, step, rounds=3)
    extra = {}
    if precision == "bf16" and chunked == "plain":
        extra["top_ops"] = _profile(step)[1]
    _record(f"train_step[{precision}][{chunked}]", seconds, cpu, pairs=TRAIN_PAIRS, max_length=TRAIN_LENGTH,
            gradcache_chunk=GRADCACHE_CHUNK if chunked == "gradcache" else None, **extra)


# ------------------------------------------------------------------ parity at the demo's scale

@pytest.mark.slow
def test_demo_eval_parity(benchmark, model_path):
    """Every mAP the demo reports (mono, cross, multi and multi per query language; base model,
    6 XQuAD-R articles, 7 languages, 48 tokens) in bf16 within 0.003 of fp32; the 49 per-pair
    mAPs are recorded beside them."""
    from hybridfast.encoder import Encoder
    from hybridfast.evaluation import RetrievalEvaluator
    from hybridfast.study.demo import BUDGETS, _load_test

    budget = BUDGETS[("cpu", False)]
    test, _, _ = _load_test(os.path.join(_data_root(), "xquad-r"), budget, "zero-shot")
    evaluator = RetrievalEvaluator(test, device="cpu", show_progress=False)
    results, seconds = {}, {}
    for precision, amp in PRECISIONS.items():
        enc = Encoder(model_path, max_length=budget.max_length, device="cpu", show_progress=False, amp=amp)
        t0 = time.perf_counter()
        results[precision] = evaluator.evaluate(enc)
        seconds[precision] = time.perf_counter() - t0
    # the demo's reported mAPs: mono / cross / multi, and multi per query language (its second table)
    maps = {f"{s}": (results["fp32"].summary[s]["map"], results["bf16"].summary[s]["map"])
            for s in results["fp32"].summary}
    maps.update({f"multi[{l}]": (v["map"], results["bf16"].per_language[l]["map"])
                 for l, v in results["fp32"].per_language.items()})
    worst = max(abs(a - b) for a, b in maps.values())
    # per language pair (not shown by the demo; ~180 queries each, so one query moving one rank at
    # the top changes its mAP by up to 0.003): recorded, not part of the target
    pairs = {(x, y): abs(v["map"] - results["bf16"].per_pair[(x, y)]["map"])
             for (x, y), v in results["fp32"].per_pair.items()}
    _record("demo_eval_parity", seconds["bf16"], None, fp32_seconds=seconds["fp32"], maps_compared=len(maps),
            max_abs_map_difference=worst, maps={k: list(v) for k, v in maps.items()},
            per_pair_maps=len(pairs), per_pair_max_abs_map_difference=max(pairs.values()),
            per_pair_over_0_003=sum(d > 0.003 for d in pairs.values()))
    benchmark.extra_info["max_abs_map_difference"] = worst
    assert worst <= 0.003


@pytest.mark.slow
def test_demo_loss_curve_parity(benchmark, model_path, tmp_path):
    """The demo's hybrid training (MLQA-R, 5 languages, 72 steps x 16, 48 tokens, seed 0) in bf16
    and fp32: the loss curve, averaged over windows of 8 steps, within 2%."""
    import json

    from hybridfast.study.demo import BUDGETS
    from hybridfast.training import TrainConfig, train

    budget = BUDGETS[("cpu", False)]
    curves, seconds = {}, {}
    for precision in ("fp32", "bf16"):
        out = tmp_path / precision
        config = TrainConfig(model=model_path, train="mlqa-r", data_dir=_data_root(), split="all",
                             languages=list(budget.languages), batch_size=budget.batch_size,
                             max_steps=budget.steps, max_length=budget.max_length, seed=0, device="cpu",
                             bf16=precision == "bf16", log_steps=1, output=str(out), show_progress=False)
        t0 = time.perf_counter()
        train(config)
        seconds[precision] = time.perf_counter() - t0
        rows = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
        curves[precision] = [r["loss"] for r in rows if "loss" in r]
    window = 8
    means = {p: [sum(c[i:i + window]) / window for i in range(0, len(c) - window + 1, window)]
             for p, c in curves.items()}
    rel = [abs(b - a) / a for a, b in zip(means["fp32"], means["bf16"])]
    _record("demo_loss_curve_parity", seconds["bf16"], None, fp32_seconds=seconds["fp32"],
            train_speedup_bf16=seconds["fp32"] / seconds["bf16"], steps=budget.steps, window=window,
            max_window_relative_difference=max(rel), final_window_loss={p: m[-1] for p, m in means.items()})
    benchmark.extra_info["max_window_relative_difference"] = max(rel)
    assert max(rel) <= 0.02
