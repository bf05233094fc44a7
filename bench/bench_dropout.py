"""fastdl.functional.dropout (alone, on a transformer MLP's activations) and dropout fused into
fastdl.functional.linear after relu, against torch eager and torch.compile, under pytest-benchmark;
linear + relu without dropout is measured alongside (the fused epilogue's target: within 5% of it).

pytest-benchmark's own statistics time one call plus a synchronize on the host clock (a backward
call's graph is built in the untimed setup). The numbers that compare (CUDA-event median over
rotated inputs, GB/s and its fraction of the measured copy bandwidth, ratio to torch eager) are in
each result's extra_info, computed by fastdl.bench exactly as `fastdl bench` computes them
(bench/conftest.py: measure).
"""
import pytest

from fastdl import bench

CASES = bench.cases("dropout", quick=bench.quick_from_env())


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_dropout(case, measure):
    measure(case)
