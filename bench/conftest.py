"""pytest-benchmark suite over fastdl.bench's cases: `pytest bench` on a CUDA machine.

The cases, inputs and CUDA-event timing all come from fastdl.bench; these files only hand them to
pytest-benchmark. bench_<op>.py files are collected here (pytest's default pattern is test_*.py),
and nothing here is seen by the CPU test run, which collects tests/ only.
FASTDL_BENCH_QUICK=1 runs the small subset.
"""
from __future__ import annotations

import itertools

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
NO_CUDA_REASON = ("benchmarks need a CUDA GPU and torch sees none; run them with `pytest bench` on a GPU "
                  "machine (bench/gpu_check.sh runs `fastdl bench` there)")


def pytest_collect_file(file_path, parent):
    if file_path.suffix == ".py" and file_path.name.startswith("bench_"):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason=NO_CUDA_REASON)
    for item in items:
        item.add_marker(skip)


@pytest.fixture(scope="session")
def ceilings():
    """Copy bandwidth and matmul FLOP/s of this GPU, measured once per session."""
    from fastdl import bench

    return bench.measure_ceilings(bench.TIMING_BUDGET)


@pytest.fixture(scope="session")
def baseline_ms():
    """ms of torch eager for a case's workload and mode; measured once, shared by every provider."""
    from fastdl import bench

    cache: dict = {}

    def get(case: bench.Case, ms: float | None = None) -> float:
        key = (case.workload, case.mode)
        if ms is not None:
            cache[key] = ms
        if key not in cache:
            base = bench.Case(case.workload, bench.BASELINE, case.mode)
            with bench.case_context(base):
                prepared = bench.Prepared(base)
                cache[key] = prepared.time(**bench.TIMING_FULL)["ms"]
                del prepared
        return cache[key]

    return get


@pytest.fixture
def measure(benchmark, ceilings, baseline_ms):
    """measure(case): time one case under pytest-benchmark, its fastdl.bench metrics in extra_info."""
    from fastdl import bench

    def run(case):
        benchmark.group = f"{case.workload.op} {case.mode} {case.workload.dtype} {case.workload.label}"
        with bench.case_context(case):
            prepared = bench.Prepared(case)
            error = None if case.provider == bench.BASELINE else prepared.check()
            timed = prepared.time(**bench.TIMING_FULL)
            calls = itertools.count()
            current = [0]

            def setup():
                current[0] = next(calls) % prepared.n_sets
                if prepared.setup is not None:
                    prepared.build_graph(current[0])
                torch.cuda.synchronize()

            def one_call():
                prepared.step(current[0])
                torch.cuda.synchronize()

            rounds = int(min(200, max(5, 100.0 / timed["ms"])))
            benchmark.pedantic(one_call, setup=setup, rounds=rounds, iterations=1, warmup_rounds=2)
            peak = prepared.peak_memory() if case.mode == "forward+backward" else None
        prepared = None
        torch.cuda.empty_cache()
        info = bench.metrics(case, timed["ms"], ceilings)
        base = baseline_ms(case, timed["ms"] if case.provider == bench.BASELINE else None)
        info.update(speedup_vs_torch=base / timed["ms"], peak_mem_bytes=peak, reps=timed["reps"],
                    n_sets=timed["calls_per_rep"], max_rel_err_vs_torch=error)
        benchmark.extra_info.update(info)
        if error is not None:
            assert error <= bench.CHECK_TOLERANCE[case.workload.dtype], \
                f"{case.id}: forward output differs from torch eager by {error:.3g} of its largest value"

    return run
