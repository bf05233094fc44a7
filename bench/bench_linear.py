"""fastdl.functional.linear (+ activation) against torch eager and torch.compile, under pytest-benchmark.

pytest-benchmark's own statistics time one call plus a synchronize on the host clock (a backward
call's graph is built in the untimed setup). The numbers that compare (CUDA-event median over
rotated inputs, TFLOP/s, ratio to torch eager, fraction of the floor) are in each result's
extra_info, computed by fastdl.bench exactly as `fastdl bench` computes them.
"""
from __future__ import annotations

import itertools

import pytest
import torch

from fastdl import bench

CASES = bench.cases("linear", quick=bench.quick_from_env())


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_linear(case, benchmark, ceilings, baseline_ms):
    benchmark.group = f"linear {case.mode} {case.workload.dtype} {case.workload.label}"
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
