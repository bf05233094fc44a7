"""fastdl.functional.conv2d (ResNet-50's convolution layers, batch 32) against torch eager and torch.compile, under pytest-benchmark.

pytest-benchmark's own statistics time one call plus a synchronize on the host clock (a backward
call's graph is built in the untimed setup). The numbers that compare (CUDA-event median over
rotated inputs, TFLOP/s and its fraction of the floor, ratio to torch eager) are in each result's
extra_info, computed by fastdl.bench exactly as `fastdl bench` computes them (bench/conftest.py:
measure).
"""
import pytest

from fastdl import bench

CASES = bench.cases("conv2d", quick=bench.quick_from_env())


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_conv2d(case, measure):
    measure(case)
