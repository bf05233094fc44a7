"""fastdl.inspection.traffic: the counting itself on hand-checkable cases, then the traffic ratios
issue 7 asks for (cross_entropy forward+backward at most 0.7x torch eager's bytes, linear with
relu forward+backward below torch's) and issue 9's (relu(bn(x) + residual) at most 0.65x torch
eager's bytes forward and 0.9x forward+backward; dropout no more than torch's)."""
import json

import numpy as np

import pytest
import torch

import fastdl
from fastdl.inspection import traffic

pytestmark = pytest.mark.skipif(not fastdl.backends.triton_interpreting(),
                                reason="counts the kernels' loads and stores in Triton's interpreter")


def _kernel_count(fn):
    count = traffic.Count()
    with traffic.counting(count):
        fn()
    return count


# --- kernel bytes -------------------------------------------------------------------------------------

@pytest.mark.parametrize("per_row_scale", [False, True])
def test_scale_rows_reads_and_writes_each_byte_once_and_not_the_masked_tail(per_row_scale):
    # C = 1000 runs in one 1024-wide block per row: 24 masked lanes per row must not count.
    R, C = 3, 1000
    x = torch.randn(R, C)
    scale = torch.rand(R) + 0.5 if per_row_scale else torch.tensor(0.5)
    base = torch.empty(R, C + 7)
    out = base[:, 3:3 + C]  # strided rows: distinct bytes, not the span
    count = _kernel_count(lambda: fastdl.backends.get("triton").cross_entropy_bwd(x, scale, out))
    (launch,) = count.launches
    assert launch.kernel == "_scale_rows"
    assert launch.read_bytes == R * C * 4 + scale.numel() * 4
    assert launch.write_bytes == R * C * 4
    assert count.torch_op_bytes == 0  # views only
    torch.testing.assert_close(out, x * (scale[:, None] if per_row_scale else scale), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cross_entropy_forward_counts_its_two_sweeps_once(dtype):
    # Sweep 1 and sweep 2 read every logit, and the target's logit once more: distinct bytes are one
    # read of the logits; a bf16 launch moves 2 bytes per logit (not the interpreter's float32 copy).
    R, C = 4, 300
    logits = torch.randn(R, C, dtype=dtype)
    target = torch.randint(0, C, (R,))
    scale = torch.tensor(0.25)
    launchers = fastdl.backends.get("triton")
    count = _kernel_count(lambda: launchers.cross_entropy_fwd(logits, target, None, scale, -100, 0.0, True))
    (launch,) = count.launches
    elt = logits.element_size()
    assert launch.read_bytes == R * C * elt + R * 8 + 4          # logits, target, scale
    assert launch.write_bytes == R * C * elt + R * 4            # gradient, fp32 loss rows
    assert launch.accessed_bytes >= launch.read_bytes + launch.write_bytes + R * C * elt  # the second sweep


def test_an_access_outside_the_arguments_raises():
    launch = traffic.Launch("k", [torch.empty(4)])
    start = torch.empty(0).data_ptr()
    with pytest.raises(RuntimeError, match="outside"):
        launch.touch("read", np.array([start + 10**12]), 4)


# --- torch op bytes -----------------------------------------------------------------------------------

def _aten_bytes(fn):
    count = traffic.Count()
    with traffic.counting(count, kernels=False):
        fn()
    return [(op.name, op.bytes) for op in count.aten_ops]


def test_torch_op_bytes_rules():
    a, b = torch.randn(8, 16), torch.randn(8, 16)
    row = torch.randn(1, 16)
    assert _aten_bytes(lambda: a.t()) == [("aten.t.default", 0)]                        # a view
    assert _aten_bytes(lambda: torch.empty(8, 16)) == [("aten.empty.memory_format", 0)]  # no bytes written
    assert _aten_bytes(lambda: a + b) == [("aten.add.Tensor", 3 * 512)]
    assert _aten_bytes(lambda: a.clone().add_(b))[1] == ("aten.add_.Tensor", 3 * 512)   # read a, b; write a
    assert _aten_bytes(lambda: a.clone().zero_())[1] == ("aten.zero_.default", 512)     # write only
    assert _aten_bytes(lambda: a.clone().copy_(b))[1] == ("aten.copy_.default", 2 * 512)
    assert _aten_bytes(lambda: a * row.expand(8, 16))[1] == ("aten.mul.Tensor", 2 * 512 + 64)  # broadcast: 16 floats
    assert _aten_bytes(lambda: a * a) == [("aten.mul.Tensor", 2 * 512)]                 # one tensor read once
    # aten.contiguous (as a custom op's body dispatches it, undecomposed): its schema says view, but
    # a layout change is a copy (conv2d's NCHW operands)
    x = torch.randn(2, 4, 4, 4)
    contiguous = torch.ops.aten.contiguous.default
    assert traffic.aten_op_bytes(contiguous, (x,), {}, x) == 0
    assert traffic.aten_op_bytes(contiguous, (x,), {"memory_format": torch.channels_last},
                                 x.contiguous(memory_format=torch.channels_last)) == 2 * 512


def test_nll_loss_counts_what_it_gathers():
    logp = torch.randn(6, 50).log_softmax(1)
    target = torch.randint(0, 50, (6,))
    ops = dict(_aten_bytes(lambda: torch.ops.aten.nll_loss_forward(logp, target, None, 1, -100)))
    # 6 gathered log-probabilities, 6 int64 targets, the loss and total_weight scalars
    assert ops["aten.nll_loss_forward.default"] == 6 * 4 + 6 * 8 + 4 + 4


# --- whole ops ----------------------------------------------------------------------------------------

def _row(rows, mode):
    return next(r for r in rows if r["mode"] == mode)


def test_linear_without_activation_forward_is_the_floor_and_backward_fuses_the_bias_sum():
    M, K, N = 40, 72, 56  # masked tiles in every dimension
    rows = traffic.rows_of(traffic.measure(traffic.linear_case(M, K, N, torch.float32)))
    forward, backward = _row(rows, "forward"), _row(rows, "backward")
    assert forward["floor_bytes"] == 4 * (M * K + N * K + N + M * N)
    assert forward["fastdl_bytes"] == forward["floor_bytes"] == forward["torch_bytes"]
    assert forward["launches"] == 1
    # grad_input reads g and w; grad_weight reads g and x and writes grad_bias beside grad_weight
    assert backward["fastdl_bytes"] == 4 * ((M * N + N * K + M * K) + (M * N + M * K + N * K + N))
    assert backward["launches"] == 2
    assert backward["fastdl_bytes"] < backward["torch_bytes"]  # torch's bias sum is a third pass over g


@pytest.fixture(scope="module")
def cross_entropy_rows():
    return {dtype: traffic.rows_of(traffic.measure(traffic.cross_entropy_case(64, 4000, dtype)))
            for dtype in (torch.float32, torch.bfloat16)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cross_entropy_forward_backward_moves_at_most_0_7_of_torch(cross_entropy_rows, dtype):
    # fastdl: the forward reads the logits and writes the gradient, the backward scales it (4 passes);
    # torch: log_softmax (2), nll_loss's backward (1), log_softmax's backward (3).
    row = _row(cross_entropy_rows[dtype], "forward+backward")
    assert row["launches"] == 2
    assert row["fastdl_bytes"] <= 0.7 * row["torch_bytes"], row
    passes = row["fastdl_bytes"] / (64 * 4000 * torch.empty(0, dtype=dtype).element_size())
    assert 4.0 <= passes <= 4.01, passes


def test_linear_relu_forward_backward_moves_less_than_torch():
    rows = traffic.rows_of(traffic.measure(traffic.linear_case(64, 128, 96, torch.float32, "relu")))
    row = _row(rows, "forward+backward")
    assert row["launches"] == 3
    assert row["fastdl_bytes"] < row["torch_bytes"], row


# Issue 9's targets for ResNet's block tail relu(bn(x) + residual), training: fastdl's bytes at most
# these fractions of torch eager's (batch_norm, add, relu and their backwards).
BATCH_NORM_TAIL_TARGETS = {"forward": 0.65, "forward+backward": 0.9}
# bf16 channels_last (the tightest margin: forward 0.6497 against 0.65) and float32 NCHW measured here;
# all four (dtype, layout) pairs at the issue's shape are checked in the committed JSON below.
BATCH_NORM_TAIL_CASES = [(torch.bfloat16, True), (torch.float32, False)]


@pytest.fixture(scope="module")
def batch_norm_tail_rows():
    # 8 x 64 x 28 x 28: the issue's 32 x 64 x 28 x 28 at a quarter of the batch, 64 channels and
    # 784 positions as there, so the per-channel bytes (statistics, split partials) weigh as much
    # against the activations (the committed JSON holds the issue's shape; its ratios are checked
    # below). Smaller shapes do not keep the ratio: at 4 x 16 x 7 x 7 bf16's forward is 0.654.
    return {case: traffic.rows_of(traffic.measure(traffic.batch_norm_case(8, 64, 28, 28, *case, fused=True)))
            for case in BATCH_NORM_TAIL_CASES}


@pytest.mark.parametrize("dtype, channels_last", BATCH_NORM_TAIL_CASES,
                         ids=[f"{str(d).replace('torch.', '')}-{'cl' if cl else 'nchw'}" for d, cl in BATCH_NORM_TAIL_CASES])
def test_batch_norm_relu_residual_meets_the_issue_targets(batch_norm_tail_rows, dtype, channels_last):
    # Per element of the activation (A bytes in its dtype, plus one mask byte): forward reads x for
    # the statistics, then x and the residual, writing out and the relu mask (4A + 1); backward's
    # reduction reads grad_out, x and the mask and writes dy, the residual's gradient (3A + 1), the
    # elementwise pass reads dy and x and writes grad_input (3A). torch eager: 7A and 6A.
    rows = batch_norm_tail_rows[(dtype, channels_last)]
    A = 8 * 64 * 28 * 28 * torch.empty(0, dtype=dtype).element_size()
    mask = 8 * 64 * 28 * 28
    forward, backward = _row(rows, "forward"), _row(rows, "backward")
    assert 7 * A <= forward["torch_bytes"] <= 7.01 * A and 6 * A <= backward["torch_bytes"] <= 6.01 * A
    assert 4 * A + mask <= forward["fastdl_bytes"] <= 1.015 * (4 * A + mask), forward
    assert 6 * A + mask <= backward["fastdl_bytes"] <= 1.015 * (6 * A + mask), backward
    for mode, target in BATCH_NORM_TAIL_TARGETS.items():
        row = _row(rows, mode)
        assert row["fastdl_bytes"] <= target * row["torch_bytes"], (mode, row["fastdl_vs_torch"])


def test_committed_batch_norm_rows_meet_the_issue_targets_at_its_shape():
    doc = json.loads(traffic.JSON_PATH.read_text())
    rows = [r for r in doc["rows"] if r["op"] == "batch_norm+relu+residual" and r["shape"].startswith("32x64x28x28")]
    assert {(r["dtype"], r["shape"].split()[-1]) for r in rows} == \
        {(d, layout) for d in ("bfloat16", "float32") for layout in ("channels_last", "NCHW")}
    for row in rows:
        target = BATCH_NORM_TAIL_TARGETS.get(row["mode"])
        if target is not None:
            assert row["fastdl_bytes"] <= target * row["torch_bytes"], row["fastdl_vs_torch"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dropout_moves_no_more_than_torch(dtype):
    # fastdl reads x and writes out (the mask regenerated from the seed, never stored); torch's GPU
    # dropout also writes a 1-byte mask and its backward reads it.
    R, C = 48, 200
    rows = traffic.rows_of(traffic.measure(traffic.dropout_case(R, C, dtype)))
    A = R * C * torch.empty(0, dtype=dtype).element_size()
    for row in rows:
        assert row["fastdl_bytes"] <= row["torch_bytes"], row
    forward, backward = _row(rows, "forward"), _row(rows, "backward")
    assert forward["launches"] == backward["launches"] == 1
    assert 2 * A <= forward["fastdl_bytes"] <= 2 * A + 32           # + the 16-byte seed drawn, read
    assert 2 * A <= backward["fastdl_bytes"] <= 2 * A + 16
    assert forward["torch_bytes"] == 2 * A + R * C                   # native_dropout: x, out, bool mask


def test_committed_json_covers_every_case_and_is_current_for_cross_entropy(cross_entropy_rows):
    doc = json.loads(traffic.JSON_PATH.read_text())
    stored = {(r["op"], r["shape"], r["dtype"], r["mode"]): r for r in doc["rows"]}
    expected = {(c.op, c.shape, str(c.dtype).replace("torch.", ""), mode)
                for c in traffic.default_cases() for mode in traffic.MODES}
    assert set(stored) == expected
    for rows in cross_entropy_rows.values():
        for row in rows:
            old = stored[(row["op"], row["shape"], row["dtype"], row["mode"])]
            assert (old["fastdl_bytes"], old["torch_bytes"], old["floor_bytes"], old["launches"]) == \
                (row["fastdl_bytes"], row["torch_bytes"], row["floor_bytes"], row["launches"])


def test_format_and_write_json(tmp_path, cross_entropy_rows):
    rows = cross_entropy_rows[torch.float32]
    table = traffic.format(rows)
    lines = table.splitlines()
    assert len(lines) == 2 + len(rows)
    assert "fastdl/torch" in lines[0] and "0.67" in lines[-1]
    path = traffic.write_json(rows, tmp_path / "traffic.json")
    assert json.loads(path.read_text())["rows"] == rows


def test_depthwise_conv2d_relu_moves_less_than_torch():
    """The direct depthwise kernels: forward reads x once and writes out and a 1-byte relu mask (torch:
    convolution then relu, 2 more passes); backward reads g and the mask in each of its two kernels.
    Measured bf16 3x3/1: forward 0.64x, backward 0.84x, forward+backward 0.76x torch eager."""
    rows = traffic.rows_of(traffic.measure(traffic.depthwise_conv2d_case(2, 96, 16, 16, torch.bfloat16)))
    for row in rows:
        assert row["fastdl_bytes"] < row["torch_bytes"], row
    assert _row(rows, "forward")["fastdl_bytes"] <= 0.7 * _row(rows, "forward")["torch_bytes"]
    assert _row(rows, "forward+backward")["fastdl_bytes"] <= 0.8 * _row(rows, "forward+backward")["torch_bytes"]
    assert _row(rows, "forward+backward")["launches"] == 3
