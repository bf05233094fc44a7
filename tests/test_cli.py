"""The two console commands: `fastdl verify` exits non-zero on any failing row; `fastdl bench`
says plainly that it needs a GPU instead of failing obscurely."""
import json

import numpy as np
import pytest
import torch

import fastdl
from fastdl import cli, verify


def test_verify_reference_rows_pass_and_write_json(tmp_path, capsys):
    path = tmp_path / "verify.json"
    assert cli.main(["verify", "--backends", "reference", "--json", str(path)]) == 0
    rows = json.loads(path.read_text())["rows"]
    assert rows and all(r["status"] == "pass" for r in rows)
    assert {"op", "backend", "dtype", "shape", "check", "max_abs", "max_rel"} <= set(rows[0])
    assert "passed, 0 failed" in capsys.readouterr().out


def test_verify_exits_nonzero_on_a_failing_row(monkeypatch, capsys):
    def wrong(backend, dtype, device):
        yield verify.compare_row("linear", backend, dtype, "3x3", "out", torch.ones(3), torch.zeros(3))

    monkeypatch.setattr(verify, "CHECKS", {"linear": wrong})
    assert cli.main(["verify", "--backends", "triton", "--ops", "linear"]) == 1
    assert "FAIL" in capsys.readouterr().out


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message printed where there is no GPU")
def test_bench_without_gpu_says_so(tmp_path, capsys):
    assert cli.main(["bench", "--out", str(tmp_path)]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err


# --- max_pool2d: verify rows and bench cases ---------------------------------------------------------

def test_verify_max_pool2d_rows_cover_layouts_paths_and_indices(tmp_path, monkeypatch):
    # Interpreter rows: both layouts, the 1-byte-tap path and return_indices' path, indices exact.
    monkeypatch.setattr(verify, "DTYPES", (torch.bfloat16, torch.float32))
    path = tmp_path / "verify.json"
    assert cli.main(["verify", "--backends", "triton", "--ops", "max_pool2d", "--json", str(path)]) == 0
    rows = [r for r in json.loads(path.read_text())["rows"] if r["op"] == "max_pool2d"]
    assert rows and all(r["status"] == "pass" for r in rows)
    assert {r["dtype"] for r in rows} == {"bfloat16", "float32"}
    assert {r["check"] for r in rows} == {"out", "grad_input", "indices", "grad_input (indices)"}
    assert {r["shape"].rsplit(" ", 1)[1] for r in rows} == {"channels_last", "contiguous"}
    assert len(rows) == 2 * 2 * 4 * len(verify.max_pool2d_cases("cpu"))


def test_verify_conv2d_rows_cover_layouts_gradients_and_the_stem(tmp_path, monkeypatch):
    # Interpreter rows: both layouts, out and the three gradients, the C=3 stem and a strided shape.
    monkeypatch.setattr(verify, "DTYPES", (torch.bfloat16, torch.float64))
    full = verify.conv2d_cases("cpu")
    assert any(c[1] == 3 and c[5] == 7 for c in full) and all(c[7] == 2 for c in full)
    cases = full[:2]  # the stem and the 3x3/2 (the whole list: `fastdl verify`)
    monkeypatch.setattr(verify, "conv2d_cases", lambda device: cases)
    path = tmp_path / "verify.json"
    assert cli.main(["verify", "--backends", "triton", "--ops", "conv2d", "--json", str(path)]) == 0
    rows = [r for r in json.loads(path.read_text())["rows"] if r["op"] == "conv2d"]
    assert rows and all(r["status"] == "pass" for r in rows)
    assert {r["dtype"] for r in rows} == {"bfloat16", "float64"}
    assert {r["check"] for r in rows} == {"out", "grad_input", "grad_weight", "grad_bias"}
    assert {r["shape"].rsplit(" ", 1)[1] for r in rows} == {"channels_last", "contiguous"}
    assert any("stem C=3" in r["shape"] for r in rows) and any(" s2 " in r["shape"] for r in rows)
    assert len(rows) == 2 * 2 * 4 * 2


def test_verify_indices_row_is_exact():
    want = np.arange(6).reshape(2, 3)
    same = verify._exact_row("max_pool2d", "triton", torch.float32, "-", "indices", torch.tensor(want), want)
    assert same["status"] == "pass"
    off = torch.tensor(want)
    off[1, 2] += 1
    row = verify._exact_row("max_pool2d", "triton", torch.float32, "-", "indices", off, want)
    assert row["status"] == "FAIL" and row["max_abs"] == 1.0


def test_bench_max_pool2d_cases_and_floor():
    from fastdl import bench
    from fastdl.bench import max_pool2d as pool_bench

    full = bench.OPS["max_pool2d"].workloads(False)
    # ResNet-50's stem output, N 32 and 256, bf16/fp16/fp32, both layouts; labels unique per dtype.
    assert {w.shape for w in full} == {(32, 64, 112, 112), (256, 64, 112, 112)}
    assert {(w.dtype, w.param["layout"]) for w in full} == {(d, l) for d in ("bf16", "fp16", "fp32")
                                                          for l in ("channels_last", "NCHW")}
    assert len(full) == 12 and len({(w.dtype, w.label) for w in full}) == 12
    assert len(bench.OPS["max_pool2d"].workloads(True)) < len(full)
    cases = bench.cases("max_pool2d")
    assert {c.mode for c in cases} == set(bench.MODES) and {"torch", "torch-compile", "fastdl-triton"} <= {
        c.provider for c in cases}
    assert len({c.id for c in cases}) == len(cases)
    # The floor: input + output each once, and 4 bits a window (which of 9 taps) written, then read.
    w = next(w for w in full if w.dtype == "bf16" and w.shape[0] == 32)
    assert pool_bench.output_shape(w) == (32, 64, 56, 56)
    inputs, outputs = 32 * 64 * 112 * 112, 32 * 64 * 56 * 56
    fwd = 2 * (inputs + outputs) + outputs / 2
    assert bench.OPS["max_pool2d"].cost(w, "forward") == (0.0, fwd)
    assert bench.OPS["max_pool2d"].cost(w, "forward+backward") == (0.0, 2 * fwd)


def test_bench_max_pool2d_functions_agree_on_cpu():
    from fastdl import bench

    spec = bench.OPS["max_pool2d"]
    w = spec.workloads(True)[0]
    x = torch.randn(2, 8, 14, 14).contiguous(memory_format=torch.channels_last)
    with fastdl.use_backend("reference"):
        ours = spec.fastdl_fn(w)(x)
    theirs = spec.torch_fn(w)(x)
    assert torch.equal(ours, theirs) and ours.stride() == theirs.stride()


def test_bench_grad_outputs_take_the_outputs_layout():
    from fastdl.bench import timing

    out = torch.empty(2, 8, 4, 4).contiguous(memory_format=torch.channels_last)
    values = torch.randn(2, 8, 4, 4)
    grad = timing._like(out, values)
    assert grad.stride() == out.stride() and torch.equal(grad, values)
    assert timing._like(values, values) is values


def test_bench_progress_line_gives_bandwidth_for_memory_bound_ops():
    from fastdl.bench import runner

    rec = dict(op="max_pool2d", mode="forward", dtype="bf16", label="32 NCHW", provider="fastdl-triton", ms=0.1,
               flops=0.0, tflops=0.0, gbps=3500.0, bandwidth_fraction=0.81, speedup_vs_torch=1.5, floor_fraction=0.8)
    line = runner._progress(rec)
    assert "3500 GB/s 0.81 bw" in line and "TFLOP/s" not in line


# --- conv2d: bench cases ---------------------------------------------------------------------------

def test_bench_conv2d_cases_and_cost():
    from fastdl import bench
    from fastdl.bench import conv2d as conv_bench

    full = bench.OPS["conv2d"].workloads(False)
    # ResNet-50's layers at batch 32, bf16/fp16/TF32, both layouts; labels unique per dtype.
    assert {w.shape[0] for w in full} == {32}
    assert {(w.dtype, w.param["layout"]) for w in full} == {(d, l) for d in ("bf16", "fp16", "tf32")
                                                          for l in ("channels_last", "NCHW")}
    assert len(full) == len(conv_bench.LAYERS) * 6 and len({(w.dtype, w.label) for w in full}) == len(full)
    assert any(w.shape[1] == 3 and w.shape[5] == 7 for w in full)  # the stem
    quick = bench.OPS["conv2d"].workloads(True)
    assert 0 < len(quick) < len(full)
    cases = bench.cases("conv2d")
    assert {c.mode for c in cases} == set(bench.MODES) and {"torch", "torch-compile", "fastdl-triton"} <= {
        c.provider for c in cases}
    assert len({c.id for c in cases}) == len(cases)
    # The stem: (32, 3, 224, 224) -> (32, 64, 112, 112); 2 NPQKCRS FLOPs forward, twice that backward.
    w = next(w for w in full if w.dtype == "bf16" and w.label.startswith("stem"))
    assert conv_bench.output_shape(w) == (32, 64, 112, 112)
    flops = 2.0 * 32 * 112 * 112 * 64 * 3 * 7 * 7
    x, weight, out = 32 * 3 * 224 * 224, 64 * 3 * 7 * 7, 32 * 64 * 112 * 112
    assert bench.OPS["conv2d"].cost(w, "forward") == (flops, 2 * (x + weight + out))
    assert bench.OPS["conv2d"].cost(w, "backward") == (2 * flops, 2 * (out + 2 * x + 2 * weight))
    assert bench.OPS["conv2d"].cost(w, "forward+backward") == (3 * flops, 2 * (2 * x + 2 * weight + 2 * out))


def test_bench_conv2d_functions_agree_on_cpu():
    from fastdl import bench

    spec = bench.OPS["conv2d"]
    w = next(w for w in spec.workloads(True) if w.param["stride"] == 2)
    x = torch.randn(2, 3, 15, 14, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    weight = torch.randn(8, 3, 7, 7, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    with fastdl.use_backend("reference"):
        ours = spec.fastdl_fn(w)(x, weight)
    theirs = spec.torch_fn(w)(x, weight)
    torch.testing.assert_close(ours, theirs)
    assert ours.stride() == theirs.stride()
