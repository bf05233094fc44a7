"""pytest-benchmark suite over fastdl.bench's cases: `pytest bench` on a CUDA machine.

The cases, inputs and CUDA-event timing all come from fastdl.bench; these files only hand them to
pytest-benchmark. bench_<op>.py files are collected here (pytest's default pattern is test_*.py),
and nothing here is seen by the CPU test run, which collects tests/ only.
FASTDL_BENCH_QUICK=1 runs the small subset.
"""
from __future__ import annotations

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
