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
                                      "train_batch"]
    assert suite["measured"] is torch.cuda.is_available()
    assert suite["matmul"]["tflops"] > 0
    assert suite["correctness"] and all(r["ok"] for r in suite["correctness"]), suite["correctness"]
    engines = {r["engine"] for r in suite["loss"] if r["status"] == "ok"}
    assert {"eager", "torch", "chunked", "triton"} <= engines
    for r in suite["loss"]:
        assert r["forward_s"] > 0 and r["backward_s"] > 0 and r["peak_extra_bytes"] >= 0
    assert suite["eval"]["pairs"] == 9 and 0 <= suite["eval"]["multi_map"] <= 1
    batches = suite["train_batch"]["results"]
    assert batches["eager"]["tried"] and batches["fused+gradcache"]["tried"]
    assert "| engine | B | N | D |" in run.stdout  # the README table
