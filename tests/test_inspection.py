"""fastdl.inspection: the kernels compiled for sm_80 / sm_90 without a GPU, and the rules issue 7 sets
for the configs the autotuner can pick (no spills, shared memory within the limit, tensor cores in
fp16/bf16/TF32 matmuls, 128-bit accesses in memory-bound kernels on aligned rows).

A fast subset runs here (CI's `fastdl inspect` step compiles every variant x config for both
targets, with the same triton cache, before this suite):
  sm_90, default config: linear without activation in every precision (+ relu fp16, gelu bf16),
         every cross_entropy and linear_cross_entropy variant, and the CUDA sources;
  sm_90, every config:   linear bf16+gelu, fp32 without activation and fp64+gelu (every config the
                         autotuner can pick for them: their kernels' config lists);
  sm_80, default config: linear fp16 / bf16 / TF32 and linear_cross_entropy bf16, and the CUDA sources;
  both, default config:  dropout (alone, and fused after relu into linear's epilogue with its
                         backward's regeneration pass) and batch_norm's kernels (channels_last at
                         stage 1 and stage 4, NCHW at stage 1 and stage 3);
  sm_80, every config:   linear TF32 (the biggest operand tiles against the A100's 163 KB).
Known failures are strict xfails, one per case, naming the finding and the part of issue 7 that
fixes it: each flips to a failure ("XPASS(strict)") when fixed, so its mark must then go.
"""
from __future__ import annotations

import pytest

from fastdl import nvrtc
from fastdl.inspection import report, sass

pytest.importorskip("cuda.bindings.nvrtc", reason="NVRTC (cuda-bindings) is needed for the CUDA cubins")

SUBSETS = {
    "sm_90 default": dict(archs=["sm_90"], configs="default", cases=[
        "linear fp16 none", "linear bf16 none", "linear tf32 none", "linear fp32 none", "linear fp64 none",
        "linear bf16 gelu", "linear fp16 relu", "linear tf32 gelu 8192x4096->4096", "cross_entropy",
        "linear_cross_entropy", "conv2d bf16 channels_last none 3x3 stage1", "conv2d bf16 channels_last relu 3x3/2",
        "conv2d tf32 channels_last relu 1x1 reduce", "conv2d tf32 channels_last none 3x3", "conv2d depthwise bf16 channels_last relu 3x3/2 96x112x112",
        "conv2d depthwise fp32 channels_last relu 3x3 144x56x56",
        # dropout in every precision; fused after relu into linear's epilogue (Philox beside the
        # accumulator tile); batch_norm's two mappings (channels_last: S = 3136 and 49; NCHW).
        "dropout", "linear bf16 relu dropout", "batch_norm bf16 channels_last relu residual 32x256x56x56",
        "batch_norm fp32 channels_last relu residual 32x2048x7x7", "batch_norm fp16 NCHW relu residual 32x256x56x56"]),
    # Every pickable config where the old single list spilled or overflowed: bf16 with the heaviest
    # epilogue (its list drops the 128x256 / 256x128 tiles), fp32 without TF32 (FFMA) and fp64 with
    # GELU (DMMA; its backward list has reduction blocks of 16).
    "sm_90 all configs": dict(archs=["sm_90"], configs="all", cuda=False, cases=[
        "linear bf16 gelu 8192", "linear fp32 none 8192x4096->4096", "linear fp64 gelu 8192x4096->4096"]),
    "sm_80 default": dict(archs=["sm_80"], configs="default", cases=[
        "linear fp16 none 8192x4096->4096", "linear bf16 none 8192x4096->4096", "linear tf32 none 8192x4096->4096",
        "linear_cross_entropy bf16", "conv2d fp16 channels_last relu 3x3 stage1", "conv2d tf32 channels_last relu 3x3/2",
        "conv2d depthwise bf16 channels_last relu 3x3 144x56x56",
        "dropout bf16", "dropout fp32", "linear fp16 relu dropout",
        "batch_norm fp16 channels_last relu residual 32x256x56x56", "batch_norm fp32 NCHW relu residual 32x1024x14x14"]),
    # The A100's 163 KB per block: the TF32 list's biggest tiles (4-byte operands).
    "sm_80 all configs": dict(archs=["sm_80"], configs="all", cuda=False, cases=["linear tf32 none 8192x4096->4096"]),
}


@pytest.fixture(scope="session")
def inspected():
    from fastdl.inspection import inspect

    return {name: inspect(**subset)["rows"] for name, subset in SUBSETS.items()}


def rows_of(inspected, arch, kernel, precision=None, case=None):
    rows = [r for subset in inspected.values() for r in subset
            if r["arch"] == arch and r["kernel"] == kernel and (precision is None or r.get("precision") == precision)
            and (case is None or case in r["case"] or any(case in c for c in r["cases"]))]
    assert rows, f"no {arch} {kernel} {precision or ''} {case or ''} row was compiled"
    return rows


def _known(params: list[tuple], failures: dict) -> list:
    return [pytest.param(*p, marks=pytest.mark.xfail(strict=True, reason=failures[p])) if p in failures
            else pytest.param(*p) for p in params]


# --- compile failures -----------------------------------------------------------------------------

@pytest.mark.parametrize("subset", list(SUBSETS))
def test_every_variant_compiles(inspected, subset):
    rows = inspected[subset]
    # Each subset compiles at least its three matmul kernels in more than one config or case.
    assert len(rows) >= 10
    failed = [f"{r['arch']} {r['kernel']} [{r['case']}] {r['config']}: {r['error']}" for r in rows if r["error"]]
    assert not failed, "\n".join(failed)
    assert {r["kind"] for r in rows} >= ({"triton", "cuda"} if SUBSETS[subset].get("cuda", True) else {"triton"})


# --- tensor cores ------------------------------------------------------------------------------------

TRITON_MATMULS = ("linear_fwd", "linear_bwd_input", "linear_bwd_weight")
CUDA_MATMULS = ("linear_fwd.cu", "linear_bwd_input.cu", "linear_bwd_weight.cu", "linear_grad_weight_accumulate.cu")
TENSOR_CORE_CASES = [(arch, kernel, precision) for arch in ("sm_90", "sm_80")
                     for kernel in TRITON_MATMULS + ("linear_grad_weight_accumulate",) + CUDA_MATMULS
                     for precision in ("fp16", "bf16", "tf32")
                     if not (kernel == "linear_grad_weight_accumulate" and precision != "bf16" and arch == "sm_80")
                     and not (kernel == "linear_grad_weight_accumulate" and precision == "fp16")]
TENSOR_CORE_FAILURES: dict = {}  # the .cu matmuls: mma.sync (mma.cuh) for fp16, bf16 and TF32


@pytest.mark.parametrize("arch, kernel, precision", _known(TENSOR_CORE_CASES, TENSOR_CORE_FAILURES))
def test_matmuls_use_tensor_cores(inspected, arch, kernel, precision):
    rows = rows_of(inspected, arch, kernel, precision)
    missing = [f"{r['case']} {r['config']}" for r in rows if not r["mma"]]
    assert not missing, f"no HGMMA/HMMA in: {missing}"
    expected = "HGMMA" if arch == "sm_90" and not kernel.endswith(".cu") else "HMMA"
    assert all(expected in r["mma_ops"] for r in rows), [r["mma_ops"] for r in rows]


CONV_MATMULS = ("conv2d_fwd", "conv2d_bwd_input", "conv2d_bwd_weight")


@pytest.mark.parametrize("arch, kernel, precision", [
    (arch, kernel, precision) for arch, precisions in (("sm_90", ("bf16", "tf32")), ("sm_80", ("fp16", "tf32")))
    for kernel in CONV_MATMULS for precision in precisions])
def test_conv2d_on_tensor_cores_without_spills(inspected, arch, kernel, precision):
    rows = rows_of(inspected, arch, kernel, precision, case="conv2d")
    assert all(r["mma"] for r in rows), [(r["case"], r["config"]) for r in rows if not r["mma"]]
    assert not [(r["case"], r["config"], r["stack"]) for r in rows if r["stack"] or r["spill_stores"]]


@pytest.mark.parametrize("kernel", CONV_MATMULS)
def test_conv2d_channels_last_copies_16_bytes(inspected, kernel):
    # The 3x3 layer without an activation (no mask bytes): every operand copy along C is 16 bytes.
    rows = rows_of(inspected, "sm_90", kernel, "bf16", case="conv2d bf16 channels_last none 3x3")
    assert all(r["async_copies"] and set(r["async_copy_bits"]) == {"128"} for r in rows), \
        [(r["async_copies"], r["async_copy_bits"]) for r in rows]


# --- spills and shared memory (every config the autotuner can pick) ---------------------------------

SPILL_CASES = [(arch, kernel, precision) for arch, kernels, precisions in (
    ("sm_90", TRITON_MATMULS, ("fp16", "bf16", "tf32", "fp32", "fp64")),
    ("sm_80", TRITON_MATMULS, ("fp16", "bf16", "tf32")),
    ("sm_90", ("cross_entropy_fwd", "scale_rows"), ("fp16", "bf16", "fp32", "fp64")),
) for kernel in kernels for precision in precisions]
SPILL_FAILURES: dict = {}  # the Triton matmuls: per-precision and per-epilogue config lists (kernels/triton/linear.py)


@pytest.mark.parametrize("arch, kernel, precision", _known(SPILL_CASES, SPILL_FAILURES))
def test_no_spills(inspected, arch, kernel, precision):
    rows = rows_of(inspected, arch, kernel, precision)
    spilling = [f"{r['case']} {r['config']}: {r['stack']} B" for r in rows if r["stack"] or r["spill_stores"]]
    assert not spilling, spilling


@pytest.mark.parametrize("arch", ("sm_80", "sm_90"))
def test_no_cuda_instantiation_spills(inspected, arch):
    """Every instantiation of every .cu source the cupy backend compiles (conv and pooling included as
    they arrive: the rows come from nvrtc.cuda_sources())."""
    rows = [r for subset in inspected.values() for r in subset if r["kind"] == "cuda" and r["arch"] == arch]
    assert {r["kernel"] for r in rows} >= set(CUDA_MATMULS) | {"cross_entropy_fwd.cu", "scale_rows.cu", "dropout_apply.cu"} \
        | {f"batch_norm_{k}.cu" for k in CUDA_BATCH_NORM}
    spilling = [f"{r['case']}: {r['stack']} B" for r in rows if r.get("error") is None and (r["stack"] or r["spill_stores"])]
    assert not spilling, spilling


# --- dropout and batch_norm (memory-bound: no spills, 16-byte accesses where rows allow them) ----------

CUDA_BATCH_NORM = ("stats", "stats_combine", "elemt", "backward_reduce", "backward_reduce_combine", "backward_elemt")
TRITON_BATCH_NORM = ("batch_norm_stats", "batch_norm_stats_combine", "batch_norm_elemt", "batch_norm_backward_reduce",
                     "batch_norm_sum_partials", "batch_norm_backward_elemt")


@pytest.mark.parametrize("arch", ("sm_80", "sm_90"))
def test_dropout_and_batch_norm_compile_without_spills(inspected, arch):
    rows = [r for subset in inspected.values() for r in subset if r["arch"] == arch and r["kind"] == "triton"
            and (r["kernel"] == "dropout" or r["kernel"].startswith("batch_norm"))]
    assert {r["kernel"] for r in rows} == {"dropout", *TRITON_BATCH_NORM}
    # The dropout kernel on a flat tensor (fastdl.functional.dropout) and on linear's (M, N) gradient.
    assert {r["case"].split()[0] for r in rows if r["kernel"] == "dropout"} == {"dropout", "linear"}
    bad = [(r["kernel"], r["case"], r["error"], r["stack"], r["spill_stores"]) for r in rows
           if r["error"] or r["stack"] or r["spill_stores"]]
    assert not bad, bad


@pytest.mark.parametrize("arch, precision", [("sm_90", "bf16"), ("sm_80", "fp16")])
def test_linear_dropout_epilogue_on_tensor_cores_without_spills(inspected, arch, precision):
    # Philox's words sit beside the accumulator tile in the epilogue.
    rows = rows_of(inspected, arch, "linear_fwd", precision, case="relu dropout")
    assert all(r["mma"] and not (r["stack"] or r["spill_stores"]) for r in rows), rows


@pytest.mark.parametrize("arch", ("sm_80", "sm_90"))
def test_dropout_uses_128_bit_accesses(inspected, arch):
    rows = rows_of(inspected, arch, "dropout")
    scalar = [(r["case"], r["precision"], r["global_load_bits"], r["global_store_bits"]) for r in rows
              if not (r["global_loads_128"] and r["global_stores_128"])]
    assert not scalar, scalar


@pytest.mark.parametrize("arch", ("sm_80", "sm_90"))
@pytest.mark.parametrize("kernel", ("batch_norm_elemt", "batch_norm_backward_elemt"))
def test_batch_norm_channels_last_elemt_uses_128_bit_accesses(inspected, arch, kernel):
    # Channels are contiguous in channels_last: the element-wise passes load and store 16 bytes a
    # lane at every spatial size (NCHW rows of 196 or 49 positions cannot be 16-byte aligned).
    rows = rows_of(inspected, arch, kernel, case="channels_last")
    scalar = [(r["case"], r["global_load_bits"], r["global_store_bits"]) for r in rows
              if not (r["global_loads_128"] and r["global_stores_128"])]
    assert not scalar, scalar


SHARED_CASES = [(arch, kernel, precision) for arch, precisions in (
    ("sm_90", ("bf16", "fp32", "fp64")), ("sm_80", ("fp16", "bf16", "tf32"))) for kernel in TRITON_MATMULS
    for precision in precisions]
SHARED_FAILURES: dict = {}  # fp64 has no 3-stage 128x256x64 / 256x128x64 tiles (393 KB) any more


@pytest.mark.parametrize("arch, kernel, precision", _known(SHARED_CASES, SHARED_FAILURES))
def test_shared_memory_within_the_limit(inspected, arch, kernel, precision):
    limit = sass.DEVICES[arch].shared_per_block
    over = [f"{r['case']} {r['config']}: {r['shared']} B" for r in rows_of(inspected, arch, kernel, precision)
            if r["shared"] > limit]
    assert not over, over


# --- 128-bit accesses in the memory-bound kernels -----------------------------------------------------

VOCABULARIES = (32000, 50257, 128256)
ACCESS_CASES = [(kernel, precision, vocab) for kernel in ("cross_entropy_fwd", "scale_rows")
                for precision in ("fp16", "bf16", "fp32", "fp64") for vocab in VOCABULARIES]
ACCESS_FAILURES: dict = {}  # rows of 50257 (not a multiple of 16): the row split's aligned body


@pytest.mark.parametrize("kernel, precision, vocab", _known(ACCESS_CASES, ACCESS_FAILURES))
def test_memory_bound_kernels_use_128_bit_accesses(inspected, kernel, precision, vocab):
    rows = rows_of(inspected, "sm_90", kernel, precision, case=f"cross_entropy {precision} 8192x{vocab}")
    scalar = [f"{r['case']}: {r['global_load_bits']} {r['global_store_bits']}" for r in rows
              if not (r["global_loads_128"] and r["global_stores_128"])]
    assert not scalar, scalar


@pytest.mark.parametrize("precision", ("fp16", "bf16", "fp32", "fp64"))
def test_cuda_scale_rows_uses_128_bit_accesses(inspected, precision):
    rows = rows_of(inspected, "sm_90", "scale_rows.cu", precision)
    assert all(r["global_loads_128"] and r["global_stores_128"] for r in rows), rows


# wgmma reads a 32-bit operand from shared memory only K-major and only A may come from registers: the
# launchers copy a B operand reduced along its strided dimension K-major on sm_90 (k_major in
# fastdl/backends/triton/linear.py) and feed g.T from registers (REGISTER_A).
TF32_COPIES = (
    ("linear_bwd_input", "linear tf32 none"),   # the transposed product w.T @ g.T: w.T from registers
    ("linear_bwd_input", "linear tf32 gelu"),   # g computed in registers (A), w copied K-major (B)
    ("linear_bwd_weight", "linear tf32 none"),  # g.T from registers, x copied K-major
    ("linear_bwd_weight", "linear tf32 gelu"),
    ("linear_grad_weight_accumulate", "linear_cross_entropy tf32"),
    ("conv2d_bwd_input", "conv2d tf32 channels_last none 3x3"),  # the weight copied contiguous along K
    # Not conv2d_bwd_weight: its g.T comes from registers, but its B operand, the input window gathered
    # pixel by pixel (divisions by Q and P), has no contiguity the compiler can prove: 4-byte copies.
)


@pytest.mark.parametrize("kernel, case", TF32_COPIES)
def test_tf32_backward_copies_16_bytes(inspected, kernel, case):
    rows = rows_of(inspected, "sm_90", kernel, "tf32", case=case)
    assert rows and all(set(r["async_copy_bits"]) == {"128"} for r in rows), [r["async_copy_bits"] for r in rows]


@pytest.mark.parametrize("arch", ("sm_90", "sm_80"))
def test_depthwise_conv2d_kernels_clean(inspected, arch):
    """The direct depthwise kernels (Triton and CUDA): compiled, no spills, no finding but a small grid's
    wave count (their split sum's one block), forward and grad_input all 128-bit."""
    rows = [r for subset in inspected.values() for r in subset if r["arch"] == arch and
            r["kernel"].removesuffix(".cu") in ("conv2d_depthwise_fwd", "conv2d_depthwise_bwd_input",
                                                "conv2d_depthwise_bwd_weight", "conv2d_dw_fwd", "conv2d_dw_bwd_input",
                                                "conv2d_dw_bwd_weight")]
    assert {r["kind"] for r in rows} == {"triton", "cuda"}, {r["kernel"] for r in rows}
    bad = {(r["kernel"], r["case"]): f for r in rows if (f := [x for x in report.findings(r) if "wave" not in x])}
    assert not bad, bad
    stencils = [r for r in rows if "bwd_weight" not in r["kernel"] and r["global_loads"]]
    assert stencils and all(r["global_loads_128"] and r["global_stores_128"] for r in stencils)


def test_report_names_every_finding_kind(inspected):
    """The real rows no longer show most kinds (fixed), so each kind is provoked on a copy of a real row."""
    # Real rows, made clean (a small grid's "under one wave" is real for some of them).
    matmul = dict(next(r for r in rows_of(inspected, "sm_90", "linear_fwd", "bf16") if not report.findings(r)))
    row_kernel = dict(rows_of(inspected, "sm_90", "scale_rows", "fp16")[0], waves=None)
    provoked = {
        "spills": dict(matmul, stack=64, spill_stores=4),
        "shared memory over the limit": dict(matmul, shared=300_000),
        "no tensor cores": dict(matmul, mma=0),
        "narrow async copies": dict(matmul, async_copies=10, async_copy_bits={"32": 6, "128": 4}),
        "no 128-bit accesses": dict(row_kernel, global_loads_128=0),
        "under one wave": dict(row_kernel, waves=0.5, grid=(66, 1, 1)),
        "compile failure": dict(matmul, error="ptxas fatal: out of resources"),
    }
    assert set(provoked) == set(report.FINDING_KINDS)
    for text, row in provoked.items():
        assert [f for f in report.findings(row) if f.startswith(text)], (text, report.findings(row))
        assert text in report.format_report([row])
        kind = report.FINDING_KINDS[text]
        assert report.failures([row], report.parse_fail_on(kind)), kind
    assert not report.findings(matmul) and not report.findings(row_kernel)


# --- the reader on a known cubin ----------------------------------------------------------------------

KNOWN_SOURCE = r"""
extern "C" __global__ void copy4(const float4* __restrict__ x, float4* __restrict__ y, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < 0) __assertfail("i >= 0", "copy4.cu", 3, "copy4", 1);  // assert(): NVRTC declares __assertfail
    if (i < n) y[i] = x[i];
}
extern "C" __global__ void copy1(const short* __restrict__ x, short* __restrict__ y, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] = x[i];
}
"""


@pytest.mark.parametrize("arch", ("sm_80", "sm_90"))
def test_reader_on_a_known_cubin(arch):
    compiled = nvrtc.compile_cubin(KNOWN_SOURCE, arch, name_expressions=())
    assert compiled.ok, compiled.log
    stats = sass.read_cubin(compiled.cubin)
    assert set(stats) == {"copy4", "copy1"}
    wide, narrow = stats["copy4"], stats["copy1"]
    assert (wide.global_loads_128, wide.global_stores_128) == (1, 1)
    assert wide.asserts == 1 and narrow.asserts == 0
    assert narrow.global_load_bits == {"16": 1} and narrow.global_store_bits == {"16": 1}
    assert 0 < narrow.registers <= wide.registers and wide.stack == 0 and wide.mma == 0


def test_width_and_occupancy_arithmetic():
    assert [sass.width_bits(op) for op in ("LDG.E.128", "STG.E.U16", "LDG.E.64.CONSTANT", "LDG.E", "LDGSTS.E.BYPASS.128")] \
        == [128, 16, 64, 32, 128]
    # 128 registers x 32 threads = 4096 per warp: 16 warps fit, 2 blocks of 8 warps.
    assert sass.occupancy(128, 0, 8, "sm_90") == {"blocks_per_sm": 2, "warps_per_sm": 16, "limited_by": "registers"}
    # 100 registers round up to 3328 per warp (units of 256): 19 warps, 4 blocks of 4 warps.
    assert sass.occupancy(100, 0, 4, "sm_90")["blocks_per_sm"] == 4
    # 100 KB of shared memory (+1 KB reserved) per block: 2 blocks in 228 KB, 1 in the A100's 164 KB.
    assert sass.occupancy(32, 100 * 1024, 4, "sm_90")["blocks_per_sm"] == 2
    assert sass.occupancy(32, 100 * 1024, 4, "sm_80")["blocks_per_sm"] == 1
    assert sass.occupancy(32, 228 * 1024, 4, "sm_90")["blocks_per_sm"] == 0


def test_cross_entropy_keeps_its_device_assert(inspected):
    # _cross_entropy_fwd is compiled with debug=True so a bad class index trips an assert on the GPU;
    # probability targets have no index to check.
    rows = rows_of(inspected, "sm_90", "cross_entropy_fwd")
    for row in rows:
        assert row["asserts"] == (0 if "probabilities" in row["case"] else 1), row["case"]
