"""fastdl.functional.batch_norm (training, plain and with the fused ReLU and residual, on ResNet-50's
activation shapes) against torch eager and torch.compile, under pytest-benchmark.

pytest-benchmark's own statistics time one call plus a synchronize on the host clock (a backward
call's graph is built in the untimed setup). The numbers that compare (CUDA-event median over
rotated inputs, GB/s and its fraction of the measured copy bandwidth, ratio to torch eager) are in
each result's extra_info, computed by fastdl.bench exactly as `fastdl bench` computes them
(bench/conftest.py: measure).
"""
import pytest

from fastdl import bench

CASES = bench.cases("batch_norm", quick=bench.quick_from_env())


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_batch_norm(case, measure):
    measure(case)
