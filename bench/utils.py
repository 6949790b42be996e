"""Shared benchmark plumbing: device naming, peak memory, and the results file.

Every figure is stored with the device, library versions and peak memory in
bench/results/<device>.json, one top-level key per benchmarked op.
"""
import ctypes
import json
import os
import platform
import re
import tempfile
from pathlib import Path

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_model()} ({os.cpu_count()} cores)"


def device_slug(device: torch.device) -> str:
    """File name for a device: 'nvidia-h100-80gb-hbm3', 'cpu-2cores-<model>'."""
    if device.type == "cuda":
        return _slug(torch.cuda.get_device_name(device))
    return _slug(f"cpu {os.cpu_count()}cores {cpu_model()}")


def environment(device: torch.device) -> dict:
    from hybridfast._backends import report

    env = report()
    env["device"] = device_name(device)
    return env


def _rss_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1])
    raise RuntimeError(f"{key} not in /proc/self/status")


def peak_memory_bytes(fn, device: torch.device) -> int:
    """Peak extra memory while fn() runs, above what was live before it.

    CUDA: the caching allocator's peak. CPU: the process's resident-set high-water
    mark, reset just before the call (Linux clear_refs "5") after returning freed
    heap pages to the OS, so earlier runs do not hide this one's allocations.
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    before = _rss_kib("VmRSS:")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    fn()
    return max(0, _rss_kib("VmHWM:") - before) * 1024


def save_results(op: str, device: torch.device, records, directory=None) -> Path:
    """Merge `records` under key `op` into <directory or bench/results>/<device>.json atomically
    ($HYBRIDFAST_BENCH_RESULTS_DIR, when set, replaces bench/results: trial runs)."""
    directory = directory or os.environ.get("HYBRIDFAST_BENCH_RESULTS_DIR") or RESULTS_DIR
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{device_slug(device)}.json"
    data = json.loads(path.read_text()) if path.exists() else {}
    data[op] = {"environment": environment(device), "records": records}
    text = json.dumps(data, indent=2, sort_keys=True)  # fails before any file is touched
    fd, tmp = tempfile.mkstemp(dir=directory, suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text + "\n")
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; results are meant to be read
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    return path
