"""Hybrid batch sampler: plan one epoch of 10M examples x 14 languages (90%
availability, batch 100, hybrid) with the C++ core, against the pure-Python
reference on 100k examples in the same run. Figures are per example planned.

Run: python -m pytest bench/bench_sampler.py --benchmark-only
Targets (2-core CPU): <= 0.5 us/example (10M in <= 5 s), >= 30x faster per example
than the reference, <= 64 bytes/example of extra memory beyond the availability
matrix (reported both with and without the int32 plan itself, 12 bytes/example).
"""
import os
import time

import numpy as np
import pytest
import torch

from bench.utils import peak_memory_bytes, save_results
from hybridfast import HybridBatchSampler
from hybridfast._backends import cpp_extension
from hybridfast.sampler import reference_plan

pytestmark = pytest.mark.skipif(cpp_extension() is None, reason="hybridfast._C is not built")

BIG_E, SMALL_E, L, BATCH, DENSITY = 10_000_000, 100_000, 14, 100, 0.9
CPU = torch.device("cpu")
RESULTS = {}


def availability(num_examples, seed=0):
    """Bernoulli(0.9) bool matrix, built in chunks (a float matrix of 10M x 14 would be 560 MB)."""
    rng = np.random.default_rng(seed)
    out = np.empty((num_examples, L), dtype=bool)
    for start in range(0, num_examples, 1_000_000):
        stop = min(start + 1_000_000, num_examples)
        out[start:stop] = rng.random((stop - start, L), dtype=np.float32) < DENSITY
    return out


@pytest.fixture(scope="module")
def big():
    return HybridBatchSampler(availability(BIG_E), BATCH, mode="hybrid", seed=0)


@pytest.fixture(scope="module")
def small_availability():
    return availability(SMALL_E, seed=1)


@pytest.fixture(scope="module", autouse=True)
def report():
    yield
    if "cpp_10m" not in RESULTS or "python_100k" not in RESULTS:
        return
    cpp, ref = RESULTS["cpp_10m"], RESULTS["python_100k"]
    cpp_small = RESULTS.get("cpp_100k")
    records = [
        dict(name="plan_epoch_cpp", examples=BIG_E, languages=L, batch_size=BATCH, density=DENSITY,
             mode="hybrid", **cpp),
        dict(name="plan_epoch_python_reference", examples=SMALL_E, languages=L, batch_size=BATCH,
             density=DENSITY, mode="hybrid", **ref),
        dict(name="speedup_per_example", cpp_10m_vs_python_100k=ref["us_per_example"] / cpp["us_per_example"],
             cpp_10m_vs_python_100k_cpu_time=ref["cpu_us_per_example"] / cpp["cpu_us_per_example"],
             cpp_100k_vs_python_100k=(ref["us_per_example"] / cpp_small["us_per_example"]) if cpp_small else None),
    ]
    if "iterate" in RESULTS:
        records.append(dict(name="iterate_rank_batches", **RESULTS["iterate"]))
    path = save_results("sampler", CPU, records)
    print(f"\nsampler results -> {path}")
    for r in records:
        print(r)


def test_plan_cpp_10m(benchmark, big):
    epochs = iter(range(1, 1000))  # a fresh epoch each round: no cached plan
    plan = benchmark.pedantic(lambda: big._compute(next(epochs)), rounds=3, iterations=1)
    assert plan.shape == (BIG_E // BATCH, BATCH, 3)  # 90% availability: every example fits
    seconds = benchmark.stats.stats.min
    # Process CPU time too: the core is single-threaded with the GIL released, so on
    # a shared machine CPU seconds show the work, wall seconds the contention.
    cpu_seconds = []
    for _ in range(3):
        start = time.process_time()
        big._compute(next(epochs))
        cpu_seconds.append(time.process_time() - start)
    # Peak RSS above the baseline while planning: includes the returned plan
    # (steps * 100 * 3 int32 = 12 bytes/example), which we also report without.
    peak = peak_memory_bytes(lambda: big._compute(0), CPU)
    plan_bytes = plan.nbytes
    RESULTS["cpp_10m"] = dict(
        seconds_min=seconds, seconds_mean=benchmark.stats.stats.mean,
        us_per_example=seconds / BIG_E * 1e6,
        cpu_seconds_min=min(cpu_seconds), cpu_us_per_example=min(cpu_seconds) / BIG_E * 1e6,
        load_average_1min=os.getloadavg()[0],
        peak_extra_bytes=peak, plan_bytes=plan_bytes,
        peak_extra_bytes_per_example=peak / BIG_E,
        peak_extra_bytes_per_example_without_plan=(peak - plan_bytes) / BIG_E,
        availability_bytes=big.availability.nbytes)


def test_plan_cpp_100k(benchmark, small_availability):
    s = HybridBatchSampler(small_availability, BATCH, mode="hybrid", seed=0)
    plan = benchmark.pedantic(lambda: s._compute(0), rounds=5, iterations=1)
    # The compared computations are the same: the reference gives this exact plan.
    RESULTS["cpp_100k_plan"] = plan
    RESULTS["cpp_100k"] = dict(seconds_min=benchmark.stats.stats.min,
                               us_per_example=benchmark.stats.stats.min / SMALL_E * 1e6)


def test_plan_python_reference_100k(benchmark, small_availability):
    cpu = []

    def run():
        start = time.process_time()
        out = reference_plan(small_availability, BATCH, mode="hybrid", seed=0)
        cpu.append(time.process_time() - start)
        return out

    plan = benchmark.pedantic(run, rounds=2, iterations=1)
    if "cpp_100k_plan" in RESULTS:
        np.testing.assert_array_equal(plan, RESULTS["cpp_100k_plan"])
    seconds = benchmark.stats.stats.min
    RESULTS["python_100k"] = dict(seconds_min=seconds, us_per_example=seconds / SMALL_E * 1e6,
                                  cpu_seconds_min=min(cpu), cpu_us_per_example=min(cpu) / SMALL_E * 1e6)


def test_iterate_rank_batches(benchmark, big):
    """Python-side cost per step of handing out a rank's tuples from the cached plan."""
    big.plan()  # cached once per epoch
    steps = 5000

    def run():
        it = iter(big)
        for _ in range(steps):
            next(it)

    benchmark.pedantic(run, rounds=3, iterations=1)
    start = time.perf_counter()
    run()
    RESULTS["iterate"] = dict(steps=steps, batch_size=BATCH,
                              us_per_step=benchmark.stats.stats.min / steps * 1e6,
                              check_us_per_step=(time.perf_counter() - start) / steps * 1e6)
