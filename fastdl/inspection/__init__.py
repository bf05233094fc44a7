"""`fastdl inspect`: what each kernel compiles to for sm_80 / sm_90, on a machine without a GPU.

Method.
1. Capture (capture.py). The library's own launch path runs (fastdl.ops.get(op, "triton"),
   forward and backward through autograd) at GPU-sized shapes (linear 8192x4096->4096 and
   4096x1024->4096 per dtype, TF32 on and off, activation and bias; cross_entropy 8192 x 32000 /
   50257 / 128256 with each option; linear_cross_entropy 8192x4096->128256) on CPU tensors from
   torch.empty, which touches no memory. wrap_triton's `launch_interceptor` records each launch
   (kernel, arguments, constexprs, the grid of each autotune config) and runs nothing. Tensors
   are kept as their dtype and address modulo 256 (torch's CUDA allocations are 256-byte aligned,
   so only a view's offset misaligns a pointer).
2. Specialize as the GPU runtime does, with triton's own code: the binder JITFunction.run uses
   (create_function_from_signature on the CUDA backend: pointers 16-byte aligned and ints
   divisible by 16 get tt.divisibility=16, an int equal to 1 becomes a constexpr, i32 or i64 by
   value) and JITFunction._pack_args. Launches with the same specialization are one variant.
3. Compile every variant with every autotune config the autotuner can pick for it: the kernel's
   early_config_prune applied to the variant's arguments, as Autotuner.run applies it, choosing for
   the arch compiled (fastdl.kernels.triton.target: the matmuls pick from one list per precision,
   epilogue and target; `--configs all` compiles the pickable ones and
   reports how many the lists pruned, `default` the first of each, `sample` the first plus each
   list's biggest tile in its heaviest-epilogue variant), through triton.compile(ASTSource(...),
   target=GPUTarget("cuda", 80 or 90, 32)); triton picks its bundled ptxas-blackwell for sm_90.
   The CUDA sources are compiled by NVRTC to cubins with the cupy backend's instantiations.
   A compile failure is a failure of `fastdl inspect` (exit status 1); `--fail-on` names more
   findings that fail it (CI: spills, shared memory and missing tensor cores in Triton kernels).
4. Read each cubin with cuobjdump from Triton's wheel (sass.py): registers, local memory per
   thread (spills), static + dynamic shared memory, SASS counts (HGMMA/HMMA/DMMA; LDGSTS, TMA;
   global loads and stores by width; assert calls), and occupancy from the per-SM limits (H100/H200
   for sm_90, A100 for sm_80: 64K registers allocated per warp in units of 256, 64 warps, 32
   blocks, 228 / 164 KB shared memory with 1 KB reserved per block).
5. Findings (report.py): compile failures, spills, shared memory over the per-block limit,
   fp16/bf16/TF32 matmuls without tensor-core instructions, memory-bound kernels without 128-bit
   accesses, cp.async narrower than 16 bytes, grids under one wave at the captured shape.

Steps 1-4 run in a subprocess with TRITON_INTERPRET=0 (python -m fastdl.inspection.compile); the
triton cache (TRITON_CACHE_DIR) makes a second pass fast.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile


def inspect(archs: list[str], ops: list[str] | None = None, configs: str = "all", jobs: int | None = None,
            cases: list[str] | None = None, cuda: bool = True) -> dict:
    """Run the capture and compile worker in a subprocess; its result ({"rows": [...], timings})."""
    env = dict(os.environ, TRITON_INTERPRET="0")
    env.pop("FASTDL_AUTOTUNE", None)  # "0" would cut every config list to one
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "rows.json")
        command = [sys.executable, "-m", "fastdl.inspection.compile", "--out", out, "--configs", configs]
        command += [a for arch in archs for a in ("--arch", arch)]
        command += [a for op in ops or () for a in ("--op", op)]
        command += [a for case in cases or () for a in ("--case", case)]
        command += [] if cuda else ["--no-cuda"]
        if jobs:
            command += ["--jobs", str(jobs)]
        done = subprocess.run(command, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"fastdl inspect: the compile worker failed ({done.returncode}):\n{done.stderr[-4000:]}")
        with open(out) as f:
            return json.load(f)
