"""One-shot GPU suite: everything the GPU path claims, measured in one command.

    python -m bench.gpu_suite                 # on one H100/H200: about 7-8 minutes
    python -m bench.gpu_suite --tiny          # tiny shapes; runs on the CPU under TRITON_INTERPRET=1 (CI)

Sections, in order; bench/results/<device>.json (key "gpu_suite") is rewritten after
every section, and no section starts after --budget-s seconds (default 420), so a
run cut short still leaves what it measured:
environment (device, clocks, versions); matmul (torch.matmul bf16 TFLOP/s at
8192^3, the denominator); correctness (every engine against the fp64 reference on a
small shape, relative Frobenius error of every gradient, with a negative control); loss
(eager and every engine, and inf-cl when installed: forward+backward time by CUDA
events over enough rounds, peak extra memory, TFLOP/s counted two ways, see below); autotune (the configs Triton's autotuner chose, and what
backend="auto" measured); eval (an XQuAD-R-sized retrieval evaluation: 11
languages x 1190 queries, 1200 candidates per language); search (exact ranks + top-10 at 1M-4M
candidates against a bare matmul of the same scores); train_batch (largest
batch whose training step fits a fixed memory cap: eager loss on the full batch vs
HybridContrastiveLoss + GradCache, and eager + GradCache so the loss's own saving shows).
At the end it prints the README table.

FLOPs: forward + backward of InfoNCE is 6*B*N*D (S, then dA and dB); engines that
keep S per chunk (eager, torch, chunked) execute that, the fused "triton" engine
recomputes S and executes 8*B*N*D. "hw TFLOP/s" counts what each engine executes;
"effective TFLOP/s" counts 6*B*N*D for every engine (comparable across engines).
Peak extra memory: peak allocated during forward+backward minus what was allocated
before (the inputs, stale .grad cleared first) minus the gradient buffers of q and p.
Figures are measurements only with "measured": true (a CUDA device); on the CPU the
suite is a smoke test and its timings say nothing about a GPU.
"""
import argparse
import json
import math
import shutil
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from bench.utils import device_name, environment, peak_memory_bytes, save_results
from hybridfast.loss import hybrid_contrastive_loss, reference_contrastive_loss
from hybridfast.loss.reference import GRAD_TOL, gradient_ok, relative_error

TEMPERATURE = 0.05
FULL = dict(dtype=torch.bfloat16, D=768, shapes=[(4096, 4096), (16384, 16384), (65536, 65536), (16384, 65536)],
            matmul=8192, eval_langs=11, eval_queries=1190, eval_cands=1200, rounds=5,
            train=dict(layers=6, hidden=768, heads=12, seq=64, cap_gib=24, chunk=256, max_batch=16384),
            search=[(1_000_000, 384, 2000), (4_000_000, 384, 2000), (1_000_000, 768, 2000)])
TINY = dict(dtype=torch.float32, D=32, shapes=[(24, 40)], matmul=256, eval_langs=3, eval_queries=20,
            eval_cands=25, rounds=1, train=dict(layers=1, hidden=32, heads=2, seq=8, cap_gib=0.05, chunk=8,
                                                 max_batch=64), search=[(500, 16, 20)])
ENGINES = ["eager", "torch", "chunked", "triton", "inf-cl"]


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device, rounds, flush=None):
    """Median seconds of fn() over `rounds` after one warm-up; CUDA events on a GPU (no host
    timer around Python overhead), with `flush()` (an L2 flush) before every round."""
    fn()
    _sync(device)
    times = []
    for _ in range(rounds):
        if flush is not None:
            flush()
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def rounds_for(B, N, D, base):
    """Rounds so that about 2e12 executed flops are timed: small shapes get more (host overhead
    and noise would otherwise dominate), never fewer than `base`, at most 200."""
    return int(min(200, max(base, math.ceil(2e12 / (6 * B * N * D)))))


def engine_flops(name, B, N, D):
    """(executed, effective) flops of forward+backward: 8BND for the fused engine (S twice), 6BND else."""
    return (8 if name == "triton" else 6) * B * N * D, 6 * B * N * D


def l2_flusher(device, mib=256):
    """A function that evicts the L2 cache (50 MB on H100/H200) by writing a large buffer."""
    if device.type != "cuda":
        return None
    buf = torch.empty(mib << 20, dtype=torch.uint8, device=device)
    return lambda: buf.zero_()


def parse_nvidia_smi(stdout, fields):
    """The first GPU's line of `nvidia-smi --query-gpu=... --format=csv,noheader` (one line per GPU)."""
    lines = [line for line in stdout.splitlines() if line.strip()]
    if not lines:
        return {}
    return dict(zip(fields, [v.strip() for v in lines[0].split(",")]))


# ----------------------------------------------------------------------------- sections

def section_environment(cfg, device, state):
    env = environment(device)
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(sms=props.multi_processor_count, memory_gib=round(props.total_memory / 2**30, 1))
        if shutil.which("nvidia-smi"):
            q = "clocks.sm,clocks.max.sm,clocks.mem,power.limit,driver_version"
            index = device.index if device.index is not None else torch.cuda.current_device()
            out = subprocess.run(["nvidia-smi", "-i", str(index), f"--query-gpu={q}", "--format=csv,noheader"],
                                 capture_output=True, text=True)
            env["nvidia_smi"] = parse_nvidia_smi(out.stdout, q.split(","))
    return env


def section_matmul(cfg, device, state):
    n = cfg["matmul"]
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    seconds = _timed(lambda: torch.matmul(a, b), device, 10)
    state["matmul_tflops"] = 2 * n**3 / seconds / 1e12
    return dict(shape=[n, n, n], dtype=str(dtype), seconds=seconds, tflops=state["matmul_tflops"])


def _engines_here(device):
    from hybridfast._backends import triton_available_for

    names = ["eager", "torch"]
    if triton_available_for(torch.empty(0, device=device)):
        names += ["chunked", "triton"]
    try:
        import inf_cl  # noqa: F401
        if device.type == "cuda":
            names.append("inf-cl")
    except ImportError:
        pass
    return names


def _loss(name, q, p, labels, **kw):
    if name == "eager":
        sim = F.normalize(q, dim=1) @ F.normalize(p, dim=1).T
        return F.cross_entropy(sim.float() / TEMPERATURE, labels)
    if name == "inf-cl":
        from inf_cl import cal_inf_loss

        return cal_inf_loss(F.normalize(q, dim=1), F.normalize(p, dim=1), labels=labels,
                            scale=torch.tensor(1.0 / TEMPERATURE, device=q.device))
    return hybrid_contrastive_loss(q, p, labels, temperature=TEMPERATURE, backend=name, **kw)


def section_correctness(cfg, device, state):
    rows = []
    g = torch.Generator().manual_seed(0)
    B, N, D = 333, 999, 100
    q32, p32 = torch.randn(B, D, generator=g), torch.randn(N, D, generator=g)
    labels = torch.randperm(N, generator=g)[:B].to(device)
    qg, pg = torch.randint(0, 7, (B,), generator=g).to(device), torch.randint(0, 7, (N,), generator=g).to(device)
    for dtype in ([torch.float32, torch.bfloat16] if device.type == "cuda" else [torch.float32]):
        q, p = q32.to(device, dtype), p32.to(device, dtype)
        ref = []
        for fn in ("ref", *[e for e in _engines_here(device) if e in ("torch", "chunked", "triton")]):
            qq, pp = q.clone().requires_grad_(True), p.clone().requires_grad_(True)
            if fn == "ref":
                loss = reference_contrastive_loss(qq, pp, labels, qg, pg, temperature=TEMPERATURE, symmetric=True)
            else:
                loss = hybrid_contrastive_loss(qq, pp, labels, qg, pg, temperature=TEMPERATURE, symmetric=True,
                                               backend=fn)
            loss.backward()
            got = [loss.detach().double(), qq.grad.double(), pp.grad.double()]
            if fn == "ref":
                ref = got
                continue
            err = [relative_error(a, b) for a, b in zip(got, ref)]
            rows.append(dict(engine=fn, dtype=str(dtype), rel_frobenius_err=dict(zip(("loss", "dq", "dp"), err)),
                             tol=GRAD_TOL[dtype], ok=max(err) <= GRAD_TOL[dtype]))
        rows.append(negative_control(ref, dtype))
    return rows


def negative_control(ref, dtype):
    """The check must reject a zero and a 10%-perturbed gradient, or it proves nothing."""
    g = ref[1]
    noise = torch.randn(g.shape, generator=torch.Generator().manual_seed(1), dtype=g.dtype).to(g.device)
    perturbed = g + 0.1 * noise * torch.linalg.vector_norm(g) / torch.linalg.vector_norm(noise)
    rejected = not gradient_ok(torch.zeros_like(g), g, dtype) and not gradient_ok(perturbed, g, dtype)
    return dict(engine="negative control (zero and 10%-perturbed dq)", dtype=str(dtype), ok=rejected)


def section_loss(cfg, device, state, deadline):
    rows = []
    D, dtype = cfg["D"], cfg["dtype"]
    for B, N in cfg["shapes"]:
        for name in _engines_here(device):
            if time.monotonic() > deadline:
                rows.append(dict(engine=name, B=B, N=N, status="skipped: suite time budget spent"))
                continue
            rows.append(_loss_case(name, B, N, D, dtype, device, cfg["rounds"], state))
            state["partial"](rows)
    return rows


def peak_extra_bytes(step, q, p, device, box=None):
    """Peak extra memory of step() (forward+backward): stale .grad and saved losses are cleared
    before the baseline is taken, and the gradient buffers step() leaves in q.grad / p.grad
    (outputs, like the inputs) are subtracted."""
    q.grad = p.grad = None
    if box is not None:
        box.clear()
    peak = peak_memory_bytes(step, device)
    grads = sum(t.grad.numel() * t.grad.element_size() for t in (q, p) if t.grad is not None)
    return max(0, peak - grads)


def _loss_case(name, B, N, D, dtype, device, rounds, state):
    row = dict(engine=name, B=B, N=N, D=D, dtype=str(dtype).replace("torch.", ""))
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, D, generator=g).to(device, dtype).requires_grad_(True)
    p = torch.randn(N, D, generator=g).to(device, dtype).requires_grad_(True)
    labels = torch.arange(B, device=device)

    def step():
        q.grad = p.grad = None
        _loss(name, q, p, labels).backward()

    try:
        # forward and backward are timed together: the hybridfast engines compute every
        # gradient in forward, so a forward/backward split would mean nothing
        n = rounds_for(B, N, D, rounds) if device.type == "cuda" else rounds  # the CPU run is a smoke test
        total = _timed(step, device, n, flush=l2_flusher(device))
        peak = peak_extra_bytes(step, q, p, device)
    except Exception as exc:  # noqa: BLE001 - one engine's failure is a row, not the end of the section
        oom = isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc)
        if not oom and name != "inf-cl":
            raise
        row["status"] = "out of memory" if oom else f"skipped: {type(exc).__name__}: {exc}"[:300]
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return row
    hw, effective = engine_flops(name, B, N, D)
    row.update(status="ok", total_s=total, peak_extra_bytes=peak, hw_tflops=hw / total / 1e12,
               effective_tflops=effective / total / 1e12, measured=device.type == "cuda")
    if state.get("matmul_tflops"):
        row["fraction_of_matmul"] = row["hw_tflops"] / state["matmul_tflops"]
    return row


def section_autotune(cfg, device, state):
    from hybridfast.kernels.contrastive import chosen_configs
    from hybridfast.loss.dispatch import backend_choices

    if device.type == "cuda":  # let "auto" measure on the middle shape so its choice is recorded
        B, N = cfg["shapes"][min(1, len(cfg["shapes"]) - 1)]
        q = torch.randn(B, cfg["D"], device=device, dtype=cfg["dtype"], requires_grad=True)
        p = torch.randn(N, cfg["D"], device=device, dtype=cfg["dtype"], requires_grad=True)
        hybrid_contrastive_loss(q, p, backend="auto").backward()
    return dict(triton_autotuner=chosen_configs(), auto_backend=backend_choices())


def section_eval(cfg, device, state, deadline):
    from hybridfast.data import RetrievalBenchmark
    from hybridfast.evaluation.evaluator import RetrievalEvaluator

    langs = [f"l{i}" for i in range(cfg["eval_langs"])]
    nq, nc = cfg["eval_queries"], cfg["eval_cands"]
    queries = {lang: {f"q{i}": f"{lang} question {i}" for i in range(nq)} for lang in langs}
    candidates = {lang: {f"{lang}-c{j}": (f"{lang} sentence {j}", f"{lang} context {j // 5}") for j in range(nc)}
                  for lang in langs}
    qrels = {f"q{i}": {f"{lang}-c{i % nc}" for lang in langs} for i in range(nq)}
    bench = RetrievalBenchmark(queries, candidates, qrels)

    class RandomEncoder:  # embeddings keyed by text: deterministic, and the search does the work
        def __init__(self, dim=cfg["D"]):
            self.dim = dim

        def _embed(self, texts):
            g = torch.Generator().manual_seed(len(texts))
            return F.normalize(torch.randn(len(texts), self.dim, generator=g), dim=1)

        encode_queries = encode_passages = _embed

    if time.monotonic() > deadline:
        return dict(status="skipped: suite time budget spent")
    evaluator = RetrievalEvaluator(bench, device=str(device), show_progress=False)
    t0 = time.perf_counter()
    result = evaluator.evaluate(RandomEncoder())
    seconds = time.perf_counter() - t0
    return dict(languages=len(langs), queries_per_language=nq, candidates_per_language=nc, seconds=seconds,
                pairs=len(result.per_pair), multi_map=result.summary["multi"]["map"])


def section_search(cfg, device, state, deadline):
    """Exact ranks + top-10 (hybridfast.evaluation.search on this device) against a bare matmul of
    the same Q x C scores in candidate chunks, in the same run (issue 23's ratio, on the GPU)."""
    from hybridfast.evaluation.search import search

    rows = []
    for C, D, Q in cfg["search"]:
        if time.monotonic() > deadline:
            rows.append(dict(C=C, D=D, Q=Q, status="skipped: suite time budget spent"))
            continue
        g = torch.Generator(device="cpu").manual_seed(0)
        q = F.normalize(torch.randn(Q, D, generator=g), dim=1).to(device)
        c = F.normalize(torch.randn(C, D, generator=g), dim=1).to(device)
        rel = torch.randint(0, C, (Q, 3), generator=g).numpy()
        chunk = 1 << 16

        def bare():
            for s in range(0, C, chunk):
                (q @ c[s:s + chunk].T).max()  # the scores, reduced so the work cannot be skipped

        rounds = max(1, cfg["rounds"] // 2)
        matmul_s = _timed(bare, device, rounds)
        search_s = _timed(lambda: search(q, c, rel, k=10, device=str(device)), device, rounds)
        rows.append(dict(C=C, D=D, Q=Q, k=10, search_s=search_s, matmul_s=matmul_s, ratio=search_s / matmul_s))
        state["rows"] = list(rows)
        del q, c
    return rows


def section_train_batch(cfg, device, state, deadline):
    """Largest batch (doubling) whose training step stays under a fixed memory cap."""
    from transformers import BertConfig, BertModel

    from hybridfast.gradcache import GradCache

    t = cfg["train"]
    torch.manual_seed(0)
    model = BertModel(BertConfig(vocab_size=1000, hidden_size=t["hidden"], num_hidden_layers=t["layers"],
                                 num_attention_heads=t["heads"], intermediate_size=4 * t["hidden"],
                                 max_position_embeddings=max(64, t["seq"]))).to(device)
    cap = int(t["cap_gib"] * 2**30)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def embed(features):
        with autocast:
            return model(**features).last_hidden_state[:, 0]  # bf16 on CUDA: the loss takes it as is

    def features(B):
        ids = torch.randint(5, 1000, (B, t["seq"]), device=device)
        return dict(input_ids=ids, attention_mask=torch.ones_like(ids))

    def eager_step(B):
        model.zero_grad(set_to_none=True)
        q, p = embed(features(B)), embed(features(B))
        _loss("eager", q, p, torch.arange(B, device=device)).backward()

    def cached_step(B, loss_name):
        model.zero_grad(set_to_none=True)
        cache = GradCache(embed, t["chunk"])
        q, p = cache.embed([features(B), features(B)])
        labels = torch.arange(B, device=device)
        # the engine is forced: an "auto" timing per new bucket would land inside the peak
        loss = _loss(loss_name, q, p, labels) if loss_name == "eager" else hybrid_contrastive_loss(
            q, p, temperature=TEMPERATURE, backend="chunked" if device.type == "cuda" else "torch")
        loss.backward()
        cache.backward([q.grad, p.grad])

    rows = {}
    steps = (("eager", eager_step), ("eager+gradcache", lambda B: cached_step(B, "eager")),
             ("fused+gradcache", lambda B: cached_step(B, "fused")))
    for name, step in steps:
        best, B, tried = None, 16 if device.type == "cuda" else 4, []
        while B <= t["max_batch"] and time.monotonic() < deadline:
            try:
                step(B)  # warm-up: kernels compiled and autotuned outside the peak
                peak = peak_memory_bytes(lambda: step(B), device)
            except (torch.cuda.OutOfMemoryError, RuntimeError) as exc:
                if not isinstance(exc, torch.cuda.OutOfMemoryError) and "out of memory" not in str(exc):
                    raise
                torch.cuda.empty_cache()
                peak = math.inf
            tried.append(dict(batch=B, peak_bytes=None if peak == math.inf else peak))
            if peak > cap:
                break
            best, B = B, 2 * B
        rows[name] = dict(largest_batch=best, tried=tried)
    return dict(cap_bytes=cap, model=t, results=rows)


# ----------------------------------------------------------------------------- driver

def readme_table(payload) -> str:
    dev = payload.get("environment", {}).get("device", "?")
    kind = "Measured" if payload.get("measured") else "NOT a GPU measurement (CPU smoke run)"
    lines = [f"{kind}: `python -m bench.gpu_suite` on {dev}. hw TFLOP/s counts what the engine executes "
             "(8BND fused, 6BND else); effective counts 6BND for all. Peak extra = peak during forward+backward "
             "minus inputs and their gradient buffers.", "",
             "| engine | B | N | D | total ms | hw TFLOP/s | % of matmul | effective TFLOP/s | peak extra GiB |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in payload.get("loss", []):
        if r.get("status") != "ok":
            lines.append(f"| {r['engine']} | {r['B']} | {r['N']} | {r.get('D', '')} | {r.get('status')} | | | | |")
            continue
        frac = f"{100 * r['fraction_of_matmul']:.0f}%" if "fraction_of_matmul" in r else ""
        lines.append(f"| {r['engine']} | {r['B']} | {r['N']} | {r['D']} | {1e3 * r['total_s']:.2f} | "
                     f"{r['hw_tflops']:.3g} | {frac} | {r['effective_tflops']:.3g} | "
                     f"{r['peak_extra_bytes'] / 2**30:.3f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.gpu_suite", description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="tiny shapes (CPU under TRITON_INTERPRET=1; for CI)")
    ap.add_argument("--budget-s", type=float, default=420.0, help="start no section after this many seconds")
    ap.add_argument("--device", default="auto", help="cuda, cpu or auto")
    ap.add_argument("--results-dir", default=None, help="where <device>.json goes (default bench/results)")
    args = ap.parse_args(argv)
    device = torch.device(args.device if args.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu")
    cfg = TINY if args.tiny or device.type != "cuda" else FULL
    start = time.monotonic()
    deadline = start + args.budget_s
    payload = {"config": {k: (str(v) if isinstance(v, torch.dtype) else v) for k, v in cfg.items()},
               "measured": device.type == "cuda", "sections_done": [],
               "flop_accounting": "hw: 8BND fused (triton), 6BND others; effective: 6BND for all",
               "peak_extra_definition": "peak allocated in forward+backward - allocated before (inputs, stale "
                                        "grads cleared) - gradient buffers of q and p"}
    save = lambda p: save_results("gpu_suite", device, p, directory=args.results_dir)  # noqa: E731
    def partial(rows):
        state["rows"] = list(rows)
        save({**payload, "loss": rows})

    state = {"partial": partial}
    sections = [("environment", section_environment), ("matmul", section_matmul),
                ("correctness", section_correctness), ("loss", section_loss), ("autotune", section_autotune),
                ("eval", section_eval), ("search", section_search), ("train_batch", section_train_batch)]
    path = None
    for name, fn in sections:
        if time.monotonic() > deadline:
            payload.setdefault("skipped", []).append(name)
            continue
        t0 = time.perf_counter()
        print(f"[gpu_suite] {name} ...", flush=True)
        state["rows"] = []
        try:
            needs_deadline = name in ("loss", "train_batch", "eval", "search")
            payload[name] = fn(cfg, device, state, deadline) if needs_deadline else fn(cfg, device, state)
        except Exception as exc:  # one broken section must not lose the others' figures, nor its own rows
            payload.setdefault("errors", {})[name] = f"{type(exc).__name__}: {exc}"[:500]
            if state["rows"]:
                payload[name] = list(state["rows"])
        payload["sections_done"].append(name)
        payload.setdefault("section_seconds", {})[name] = time.perf_counter() - t0
        path = save(payload)
    print(readme_table(payload))
    print(f"[gpu_suite] {device_name(device)}: {time.monotonic() - start:.0f} s; results in {path}")
    errors = payload.get("errors", {})
    if errors:
        print(f"[gpu_suite] sections with errors: " + json.dumps(errors))
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
