"""fastdl.functional.cross_entropy and linear_cross_entropy against torch eager and torch.compile, under pytest-benchmark.

pytest-benchmark's own statistics time one call plus a synchronize on the host clock (a backward
call's graph is built in the untimed setup). The numbers that compare (CUDA-event median over
rotated inputs, ratio to torch eager, fraction of the floor) are in each result's extra_info,
computed by fastdl.bench exactly as `fastdl bench` computes them (bench/conftest.py: measure).
"""
import pytest

from fastdl import bench

CE_CASES = bench.cases("cross_entropy", quick=bench.quick_from_env())
LCE_CASES = bench.cases("linear_cross_entropy", quick=bench.quick_from_env())


@pytest.mark.parametrize("case", CE_CASES, ids=[c.id for c in CE_CASES])
def test_cross_entropy(case, measure):
    measure(case)


@pytest.mark.parametrize("case", LCE_CASES, ids=[c.id for c in LCE_CASES])
def test_linear_cross_entropy(case, measure):
    measure(case)
