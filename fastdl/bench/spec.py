"""What a benchmark case is and who computes it: workloads, cases, op specs and their registry,
the providers that can run here, and the switches a case runs under."""
from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import os
from typing import Callable

import torch

from fastdl.backends import available_backends, use_backend

MODES = ("forward", "backward", "forward+backward")
# Under a time budget, what runs first: the full training step is the headline.
MODE_PRIORITY = ("forward+backward", "forward", "backward")
PROVIDERS = ("torch", "torch-compile", "fastdl-triton", "fastdl-cupy")
BASELINE = "torch"
# name -> (torch dtype, TF32 allowed in matmuls)
DTYPES = {"fp32": (torch.float32, False), "tf32": (torch.float32, True),
          "bf16": (torch.bfloat16, False), "fp16": (torch.float16, False)}
# Largest |provider - torch| / max|torch| of a forward output before a result is flagged as suspect.
CHECK_TOLERANCE = {"fp32": 1e-4, "tf32": 2e-2, "bf16": 5e-2, "fp16": 1e-2}
BUDGET_ENV = "FASTDL_BENCH_BUDGET"
QUICK_ENV = "FASTDL_BENCH_QUICK"


# --------------------------------------------------------------------------- cases

@dataclasses.dataclass(frozen=True)
class Workload:
    """One problem, independent of who computes it and how (provider, mode)."""
    op: str
    group: str                  # family of shapes summarized together: "square", "mlp", "gelu"
    dtype: str                  # key of DTYPES
    shape: tuple[int, ...]      # op-specific; linear: (M, N, K)
    params: tuple = ()          # op parameters as (name, value) pairs, e.g. (("activation", "relu"),)
    label: str = ""             # how tables and plots name it

    @property
    def param(self) -> dict:
        return dict(self.params)


@dataclasses.dataclass(frozen=True)
class Case:
    workload: Workload
    provider: str
    mode: str

    @property
    def id(self) -> str:
        w = self.workload
        params = "-".join(f"{v}" for _, v in w.params)
        return "-".join(p for p in (w.op, self.mode, w.dtype, "x".join(map(str, w.shape)), params,
                                    self.provider) if p)


@dataclasses.dataclass(frozen=True)
class OpSpec:
    name: str
    workloads: Callable[[bool], list]       # quick -> [Workload], most important first
    make_inputs: Callable[[Workload, int], tuple]  # (workload, seed) -> CUDA tensors; differentiable ones require grad
    torch_fn: Callable[[Workload], Callable]   # the eager torch computation fastdl replaces
    fastdl_fn: Callable[[Workload], Callable]  # fastdl's (backend picked by use_backend)
    cost: Callable[[Workload, str], tuple]     # (workload, mode) -> (FLOPs, minimal bytes moved)
    # (workload, inputs, output) -> what Prepared.check returns, for an op whose output cannot equal
    # torch's (dropout: each draws its own mask); None compares with torch eager's output.
    check: Callable | None = None


def random_tensor(shape, dtype: torch.dtype, *, seed: int, scale: float = 1.0, device="cuda") -> torch.Tensor:
    """fastdl.testing.make_tensor's distribution, drawn on the GPU (the CPU float64 path is too slow at 8192^2)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    shape = tuple(shape)
    t = torch.randn(shape, generator=gen, device=device, dtype=torch.float32)
    if len(shape) >= 2:
        t.mul_(torch.exp(0.5 * torch.randn(shape[:-1] + (1,), generator=gen, device=device)))
        t.add_(0.2 * torch.randn(shape[-1:], generator=gen, device=device))
    return t.mul_(scale).to(dtype)


OPS: dict = {}


def register(spec: "OpSpec") -> "OpSpec":
    OPS[spec.name] = spec
    return spec


# --------------------------------------------------------------------------- providers and cases

def providers() -> tuple[list[str], dict[str, str]]:
    """Providers that can run here (baseline first), and why the others cannot."""
    missing = {}
    if "cupy" not in available_backends():
        missing["fastdl-cupy"] = "cupy is not installed or there is no CUDA device"
    elif importlib.util.find_spec("fastdl.backends.cupy") is None:
        missing["fastdl-cupy"] = "fastdl has no cupy backend module yet"
    return [p for p in PROVIDERS if p not in missing], missing


def cases(op: str, quick: bool = False) -> list[Case]:
    """Every case of an op in report order: workload, mode, provider (baseline first)."""
    available, _ = providers()
    return [Case(w, p, m) for w in OPS[op].workloads(quick) for m in MODES for p in available]


def quick_from_env() -> bool:
    return os.environ.get(QUICK_ENV, "0") not in ("", "0")




def budget_from_env() -> float | None:
    value = os.environ.get(BUDGET_ENV)
    return float(value) if value else None

_COMPILED: dict = {}


def _raise_recompile_limits() -> None:
    # Every (shape, dtype) recompiles the same code object; past dynamo's limit of 8 it would
    # silently run eager and the torch-compile column would lie.
    cfg = torch._dynamo.config
    for name, value in (("recompile_limit", 1024), ("cache_size_limit", 1024),
                        ("accumulated_recompile_limit", 8192), ("accumulated_cache_size_limit", 8192),
                        ("fail_on_recompile_limit_hit", True)):
        with contextlib.suppress(AttributeError):
            if hasattr(cfg, name):
                setattr(cfg, name, value)


def provider_fn(case: Case) -> Callable:
    spec, w = OPS[case.workload.op], case.workload
    if case.provider == "torch":
        return spec.torch_fn(w)
    if case.provider == "torch-compile":
        key = (w.op, w.params)
        if key not in _COMPILED:
            _raise_recompile_limits()
            # Static shapes: the best torch.compile can do for each shape, not a dynamic-shape kernel.
            _COMPILED[key] = torch.compile(spec.torch_fn(w), dynamic=False)
        return _COMPILED[key]
    return spec.fastdl_fn(w)


@contextlib.contextmanager
def case_context(case: Case):
    """The global switches a case runs under: TF32 for fp32 matmuls, and fastdl's backend."""
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = DTYPES[case.workload.dtype][1]
    backend = {"fastdl-triton": "triton", "fastdl-cupy": "cupy"}.get(case.provider)
    try:
        with use_backend(backend):
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous
