"""Compile every captured Triton variant x autotune config, and every CUDA instantiation, for a
named GPU target, and read the binaries (see fastdl/inspection/__init__.py for the method).

Run as a worker, in a process where triton does not interpret (fastdl inspect starts it so):

    TRITON_INTERPRET=0 python -m fastdl.inspection.compile --arch sm_90 [--op linear]
        [--configs all|default|sample] [--jobs N] --out rows.json
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor

ARCHS = {"sm_80": 80, "sm_90": 90}
# Kernels whose work is a matmul (tensor cores expected) and those bound by memory bandwidth.
MATMUL_KERNELS = ("linear_fwd", "linear_bwd_input", "linear_bwd_weight", "linear_grad_weight_accumulate",
                  "conv2d_fwd", "conv2d_bwd_input", "conv2d_bwd_weight")
MEMORY_BOUND_KERNELS = ("cross_entropy_fwd", "scale_rows", "sum_splits", "max_pool2d_fwd", "max_pool2d_bwd",
                        "dropout", "batch_norm_elemt", "batch_norm_backward_elemt", "batch_norm_stats",
                        "batch_norm_backward_reduce", "conv2d_depthwise_fwd", "conv2d_depthwise_bwd_input",
                        "conv2d_depthwise_bwd_weight", "conv2d_dw_fwd", "conv2d_dw_bwd_input", "conv2d_dw_bwd_weight")
# Memory-bound reductions whose only stores are per-channel sums or partials: 128-bit loads expected,
# no 128-bit stores (there is nothing 16 bytes wide to store).
REDUCTION_KERNELS = ("batch_norm_stats", "batch_norm_backward_reduce", "conv2d_depthwise_bwd_weight",
                     "conv2d_dw_bwd_weight")

_VARIANTS: list = []  # set before the worker pool forks: tasks name variants by index


def _target(arch: str):
    from triton.backends.compiler import GPUTarget

    return GPUTarget("cuda", ARCHS[arch], 32)


def compile_variant(variant, config, arch: str):
    """triton.compile of one variant with one config for `arch`, specialized as JITFunction.run
    does on a GPU: its binder (create_function_from_signature) and _pack_args, then ASTSource."""
    import triton
    from triton import knobs
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    fn = variant.jit_function
    target = _target(arch)
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    kwargs = {**variant.kwargs, **(config.all_kwargs() if config is not None else {})}
    # What JITFunction.run adds before binding.
    kwargs["debug"] = kwargs.get("debug", fn.debug) or knobs.runtime.debug
    kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
    kwargs["fpsan_homomorphic_casts"] = knobs.compilation.fpsan_homomorphic_casts
    bound, specialization, options = binder(*variant.args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=options.__dict__)
    names = list(signature)
    spec = {
        "signature": {n: t for n, t in signature.items() if t != "constexpr"},
        "constexprs": {names[path[0]]: str(value) for path, value in constexprs.items()},
        "divisible_by_16": [names[path[0]] for path, attr in attrs.items() if attr],
    }
    return compiled, spec


# What `--configs sample` compiles besides every variant's default config: for each matmul kernel
# and config list, the variant with the heaviest epilogue (SAMPLE_ACTIVATIONS order; bf16 over fp16,
# with bias) with the list's biggest tile (the most accumulator elements per thread, then the most
# operand bytes in shared memory): where spills and shared memory overflow show first. 23 compiles
# per target today.
SAMPLE_ACTIVATIONS = (3, 4, 5, 7, 6, 2, 1, 0)  # gelu, gelu_tanh, silu, tanh, sigmoid, leaky_relu, relu, none


def _sample_rank(variant) -> tuple:
    kw = variant.kwargs
    code = kw.get("ACTIVATION", 0)
    dtypes = {str(getattr(a, "dtype", "")) for a in variant.args}
    return (SAMPLE_ACTIVATIONS.index(code), "torch.bfloat16" not in dtypes, not kw.get("HAS_BIAS", True),
            not kw.get("ACCUMULATE", True), variant.cases[0][0])


def _config_lists(kernel: str):
    """The kernel module whose config lists (config_list_name, tile_of) a matmul kernel uses."""
    import importlib

    return importlib.import_module(f"fastdl.kernels.triton.{kernel.split('_')[0]}")


def _tile_size(kernel: str, config) -> tuple:
    a, b, r, warps, stages = _config_lists(kernel).tile_of(config, kernel)
    return (a * b / (32 * warps), (a + b) * r * stages)


def sampled_variants(variants, arch: str) -> dict:
    """{variant index: [config index]} that `--configs sample` adds to the default configs on `arch`."""
    groups = {}
    for index, variant in enumerate(variants):
        # (`is None`: triton.Config's __eq__ cannot compare with None.)
        if variant.arch != arch or variant.name not in MATMUL_KERNELS or variant.configs(arch)[0] is None:
            continue
        named = dict(zip(variant.jit_function.arg_names, variant.args))
        key = (variant.name, _config_lists(variant.name).config_list_name(variant.name, named, variant.kwargs))
        if key not in groups or _sample_rank(variant) < _sample_rank(variants[groups[key]]):
            groups[key] = index
    out = {}
    for index in groups.values():
        pickable = variants[index].configs(arch)
        others = range(1, len(pickable))
        if others:
            out[index] = [max(others, key=lambda c: _tile_size(variants[index].name, pickable[c]))]
    return out


def config_indices(index: int, variant, configs: str, sampled: dict, arch: str) -> list[int]:
    """Indices into variant.configs(arch) (the pickable ones) that `--configs all|default|sample`
    compiles (`sampled`: sampled_variants(..., arch), by variant index)."""
    if configs == "all":
        return list(range(len(variant.configs(arch))))
    if configs == "sample":
        return [0] + sampled.get(index, [])
    return [0]


def _config_label(config) -> str:
    if config is None:
        return "-"
    blocks = " ".join(f"{k}={v}" for k, v in config.kwargs.items() if k != "GROUP")
    return f"{blocks} w{config.num_warps} s{config.num_stages}"


def _precision(spec: dict) -> str:
    dtype = next((t[1:] for t in spec["signature"].values() if t.startswith("*")), "")
    if dtype == "fp32" and spec["constexprs"].get("INPUT_PRECISION") == "tf32":
        return "tf32"
    return dtype


def _triton_task(task) -> dict:
    from fastdl.inspection import sass

    index, config_index, arch = task
    variant = _VARIANTS[index]
    config = variant.configs(arch)[config_index]
    row = {"kind": "triton", "kernel": variant.name, "variant": index, "op": variant.cases[0][0].split()[0],
           "case": variant.cases[0][0], "cases": [c for c, _ in variant.cases], "config": _config_label(config),
           "default": config_index == 0, "arch": arch,
           "num_warps": config.num_warps if config is not None else variant.kwargs.get("num_warps", 4),
           "num_stages": config.num_stages if config is not None else variant.kwargs.get("num_stages", 3),
           "grid": min(_blocks(variant.grid(config, grids)) for _, grids in variant.cases), "error": None}
    start = time.perf_counter()
    try:
        compiled, spec = compile_variant(variant, config, arch)
    except Exception as exc:  # noqa: BLE001 - a compile failure is a result, reported as such
        row["error"] = f"{type(exc).__name__}: {str(exc).strip()[:2000]}"
        row["compile_s"] = time.perf_counter() - start
        return row
    row["compile_s"] = time.perf_counter() - start
    row.update(spec, precision=_precision(spec))
    stats = sass.read_cubin(compiled.asm["cubin"])
    function = stats.get(compiled.metadata.name) or next(iter(stats.values()))
    return _with_stats(row, function, int(compiled.metadata.shared), arch)


def _blocks(grid) -> int:
    total = 1
    for g in grid:
        total *= g
    return total


def _with_stats(row: dict, function, dynamic_shared: int, arch: str) -> dict:
    from fastdl.inspection import sass

    row.update(function.as_dict())
    row["shared"] = function.static_shared + dynamic_shared
    row.update(sass.occupancy(function.registers, row["shared"], row["num_warps"], arch))
    if row.get("grid") and row["blocks_per_sm"]:
        row["waves"] = row["grid"] / (row["blocks_per_sm"] * sass.DEVICES[arch].sms)
    return row


def cuda_rows(arch: str, ops: list[str] | None = None) -> list[dict]:
    """One row per CUDA kernel instantiation the cupy backend compiles (NVRTC, for `arch`), of the
    sources named after `ops` (default all)."""
    from fastdl import nvrtc
    from fastdl.backends.cupy import _runtime
    from fastdl.inspection import sass

    rows = []
    for source in nvrtc.cuda_sources():
        if ops and source.stem not in ops:
            continue
        start = time.perf_counter()
        compiled = nvrtc.compile_cubin(source, arch)
        elapsed = time.perf_counter() - start
        expressions = nvrtc.instantiations(source.stem)
        stats = sass.read_cubin(compiled.cubin) if compiled.ok else {}
        for expression in expressions:
            kernel, ctype = expression.rstrip(">").split("<")
            dtype = {v: k for k, v in _runtime.CUDA_TYPES.items()}[ctype]
            row = {"kind": "cuda", "kernel": f"{kernel}.cu", "variant": expression, "op": source.stem,
                   "case": f"{source.name} {expression}", "cases": [], "config": f"{_runtime.THREADS} threads",
                   "default": True, "arch": arch, "num_warps": _runtime.THREADS // 32, "num_stages": None,
                   "grid": None, "compile_s": elapsed, "precision": str(dtype).replace("torch.float", "fp")
                   .replace("torch.bfloat16", "bf16"), "error": None if compiled.ok else compiled.log[-2000:]}
            function = stats.get(compiled.lowered.get(expression, ""))
            if compiled.ok and function is None:
                row["error"] = f"{expression} not found in the cubin"
            rows.append(_with_stats(row, function, 0, arch) if function is not None else row)
    return rows


def run(archs: list[str], ops: list[str] | None = None, configs: str = "all", jobs: int | None = None,
        cases: list[str] | None = None, cuda: bool = True) -> dict:
    """Capture, compile and read every variant for every arch: {"rows": [...], timings}."""
    from triton.compiler import make_backend

    from fastdl.inspection import capture

    global _VARIANTS
    start = time.perf_counter()
    # Captured once per target: a launcher may launch differently on each (linear's TF32 operands).
    launches, _VARIANTS = 0, []
    for arch in archs:
        captured_launches = capture.capture(ops, cases, arch)
        launches += len(captured_launches)
        _VARIANTS += capture.variants(captured_launches, make_backend(_target(arch)), arch)
    captured = time.perf_counter()
    sampled = {arch: sampled_variants(_VARIANTS, arch) if configs == "sample" else {} for arch in archs}
    tasks = [(i, c, v.arch) for i, v in enumerate(_VARIANTS)
             for c in config_indices(i, v, configs, sampled[v.arch], v.arch)]
    jobs = jobs or os.cpu_count() or 1
    if jobs > 1:
        with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("fork")) as pool:
            rows = list(pool.map(_triton_task, tasks, chunksize=4))
    else:
        rows = [_triton_task(t) for t in tasks]
    if cuda:
        for arch in archs:
            rows += cuda_rows(arch, ops)
    return {"rows": rows, "variants": len(_VARIANTS), "launches": launches,
            "configs": configs, "pickable": sum(len(v.configs(v.arch)) for v in _VARIANTS),
            "pruned": sum(len(v.all_configs) - len(v.configs(v.arch)) for v in _VARIANTS),
            "capture_s": captured - start, "compile_s": time.perf_counter() - captured}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastdl.inspection.compile", description=__doc__)
    parser.add_argument("--arch", action="append", choices=sorted(ARCHS), required=True)
    parser.add_argument("--op", action="append")
    parser.add_argument("--configs", choices=("all", "default", "sample"), default="all")
    parser.add_argument("--jobs", type=int)
    parser.add_argument("--case", action="append", help="only cases whose label starts with this")
    parser.add_argument("--no-cuda", action="store_true", help="leave out the CUDA sources")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    result = run(args.arch, args.op, args.configs, args.jobs, args.case, not args.no_cuda)
    with open(args.out, "w") as f:
        json.dump(result, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
