"""The one-shot GPU suite runs end to end on tiny shapes (CPU, Triton interpreted), so it cannot rot."""
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]


def test_gpu_suite_tiny_runs_every_section(tmp_path):
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT))
    run = subprocess.run([sys.executable, "-m", "bench.gpu_suite", "--tiny", "--device", "cpu",
                          "--results-dir", str(tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    (path,) = tmp_path.glob("*.json")
    suite = json.loads(path.read_text())["gpu_suite"]["records"]
    assert suite["sections_done"] == ["environment", "matmul", "correctness", "loss", "autotune", "eval",
                                      "search", "train_batch"]
    assert "errors" not in suite, suite.get("errors")
    assert suite["measured"] is torch.cuda.is_available()
    assert suite["matmul"]["tflops"] > 0
    assert suite["correctness"] and all(r["ok"] for r in suite["correctness"]), suite["correctness"]
    engines = {r["engine"] for r in suite["loss"] if r["status"] == "ok"}
    assert {"eager", "torch", "chunked", "triton"} <= engines
    for r in suite["loss"]:
        assert r["total_s"] > 0 and r["peak_extra_bytes"] >= 0 and r["measured"] is torch.cuda.is_available()
        assert r["hw_tflops"] >= r["effective_tflops"] > 0
    assert suite["eval"]["pairs"] == 9 and 0 <= suite["eval"]["multi_map"] <= 1
    (point,) = suite["search"]
    assert point["search_s"] > 0 and point["matmul_s"] > 0 and point["ratio"] == point["search_s"] / point["matmul_s"]
    batches = suite["train_batch"]["results"]
    assert batches["eager"]["tried"] and batches["fused+gradcache"]["tried"] and batches["eager+gradcache"]["tried"]
    assert "| engine | B | N | D |" in run.stdout  # the README table


# ----------------------------------------------------------------------------- first GPU run (issue 18)

import pytest  # noqa: E402

from bench import gpu_suite  # noqa: E402

first_run = pytest.mark.gpu_first_run


@first_run
def test_6_flops_count_what_each_engine_executes():
    assert gpu_suite.engine_flops("triton", 2, 3, 5) == (8 * 30, 6 * 30)
    for name in ("eager", "torch", "chunked", "inf-cl"):
        assert gpu_suite.engine_flops(name, 2, 3, 5) == (6 * 30, 6 * 30)


@first_run
def test_7_peak_extra_clears_stale_grads_and_leaves_out_the_gradient_buffers(monkeypatch):
    q = torch.zeros(4, 8, requires_grad=True)
    p = torch.zeros(6, 8, requires_grad=True)
    q.grad, p.grad = torch.ones(4, 8), torch.ones(6, 8)  # stale, from the timing rounds
    seen = {}

    def fake_peak(step, device):
        seen["stale"] = (q.grad, p.grad)
        step()
        return 10_000

    def step():
        q.grad, p.grad = torch.ones(4, 8), torch.ones(6, 8)

    monkeypatch.setattr(gpu_suite, "peak_memory_bytes", fake_peak)
    box = {"loss": torch.ones(3)}
    assert gpu_suite.peak_extra_bytes(step, q, p, torch.device("cpu"), box) == 10_000 - (4 + 6) * 8 * 4
    assert seen["stale"] == (None, None) and box == {}


@first_run
def test_14_small_shapes_get_enough_rounds():
    assert gpu_suite.rounds_for(4096, 4096, 768, 5) >= 20
    assert gpu_suite.rounds_for(65536, 65536, 768, 5) == 5


@first_run
def test_15_inf_cl_failing_in_any_way_skips_its_row(monkeypatch):
    class CompilationError(Exception):
        pass

    def broken(*a, **k):
        raise CompilationError("no lowering")

    monkeypatch.setattr(gpu_suite, "_loss", broken)
    row = gpu_suite._loss_case("inf-cl", 4, 4, 8, torch.float32, torch.device("cpu"), 1, {})
    assert row["status"].startswith("skipped: CompilationError")
    with pytest.raises(CompilationError):  # the library's own engines still fail loudly
        gpu_suite._loss_case("torch", 4, 4, 8, torch.float32, torch.device("cpu"), 1, {})


@first_run
def test_15_nvidia_smi_with_several_gpus():
    out = "1980, 1980, 2619, 700.00 W, 550.54\n1755, 1980, 2619, 700.00 W, 550.54\n"
    fields = ["clocks.sm", "clocks.max.sm", "clocks.mem", "power.limit", "driver_version"]
    assert gpu_suite.parse_nvidia_smi(out, fields)["driver_version"] == "550.54"
    assert gpu_suite.parse_nvidia_smi("", fields) == {}


@first_run
def test_15_a_failing_section_keeps_its_saved_rows(monkeypatch, tmp_path):
    def loss_section(cfg, device, state, deadline):
        state["partial"]([dict(engine="torch", B=1, N=1, D=1, status="ok-ish")])
        raise RuntimeError("later shape broke")

    monkeypatch.setattr(gpu_suite, "section_loss", loss_section)
    for name in ("section_matmul", "section_correctness", "section_autotune", "section_eval",
                 "section_train_batch"):
        monkeypatch.setattr(gpu_suite, name, lambda *a: {})
    assert gpu_suite.main(["--tiny", "--device", "cpu", "--results-dir", str(tmp_path)]) == 1
    (path,) = tmp_path.glob("*.json")
    suite = json.loads(path.read_text())["gpu_suite"]["records"]
    assert suite["loss"] == [dict(engine="torch", B=1, N=1, D=1, status="ok-ish")]
    assert "later shape broke" in suite["errors"]["loss"]
