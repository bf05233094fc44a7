"""How a case is timed: rotated input copies beyond L2 (Prepared), CUDA-event passes (time_cuda),
and the copy-bandwidth and matmul ceilings every floor is computed from (measure_ceilings)."""
from __future__ import annotations

import math
import statistics
from typing import Callable

import torch

from fastdl.bench.spec import DTYPES, OPS, Case, provider_fn, random_tensor

FALLBACK_L2_BYTES = 60 << 20
MAX_SETS = 1024
TIMING_FULL = dict(warmup_ms=25.0, rep_ms=100.0, min_reps=5)
TIMING_BUDGET = dict(warmup_ms=10.0, rep_ms=40.0, min_reps=3)


def l2_bytes() -> int:
    return getattr(torch.cuda.get_device_properties(torch.cuda.current_device()), "L2_cache_size", 0) \
        or FALLBACK_L2_BYTES


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def _like(output: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """values in output's memory layout: the gradient the next layer hands back has it (a
    channels_last network's grad_outputs are channels_last), and a backward that reads a gradient
    in another layout than its output's is timing a transpose."""
    return values if values.stride() == output.stride() else torch.empty_like(output).copy_(values)


class Prepared:
    """A case's rotated input copies and its timed step; build and use it inside case_context."""

    def __init__(self, case: Case, n_sets: int | None = None):
        spec, w = OPS[case.workload.op], case.workload
        self.case, self.fn = case, provider_fn(case)
        first = spec.make_inputs(w, 0)
        # The first call compiles or autotunes; its output is also what check() compares.
        self.first_output = self.fn(*first).detach()
        grad_out = _like(self.first_output, random_tensor(self.first_output.shape, self.first_output.dtype, seed=7919))
        set_bytes = _nbytes(first) + (0 if case.mode == "forward" else _nbytes([grad_out]))
        if n_sets is None:
            n_sets = min(MAX_SETS, max(2, math.ceil(2 * l2_bytes() / max(set_bytes, 1))))
        self.n_sets = n_sets
        self.inputs = [first] + [spec.make_inputs(w, i) for i in range(1, n_sets)]
        self.diff = [tuple(t for t in s if isinstance(t, torch.Tensor) and t.requires_grad)
                     for s in self.inputs]
        self.grad_outs = [grad_out] + [_like(grad_out, random_tensor(grad_out.shape, grad_out.dtype, seed=7919 + i))
                                       for i in range(1, n_sets)]
        self.outputs: list = [None] * n_sets
        # Backward alone differentiates graphs built before the timed pass, each once: retaining
        # graphs is not what training does, and torch.compile's donated buffers forbid it.
        self.setup = self.build_graphs if case.mode == "backward" else None

    def build_graph(self, i: int) -> None:
        self.outputs[i] = self.fn(*self.inputs[i])

    def build_graphs(self) -> None:
        for i in range(self.n_sets):
            self.build_graph(i)

    def step(self, i: int) -> None:
        mode = self.case.mode
        if mode == "forward":
            self.fn(*self.inputs[i])
        elif mode == "backward":
            # autograd.grad, not .backward(): no accumulation into .grad, which would add a kernel.
            out, self.outputs[i] = self.outputs[i], None
            torch.autograd.grad(out, self.diff[i], self.grad_outs[i])
        else:
            torch.autograd.grad(self.fn(*self.inputs[i]), self.diff[i], self.grad_outs[i])

    def check(self) -> float:
        """Largest |output - torch eager's| over max|torch eager's| on the first copy (nan if not finite)."""
        spec = OPS[self.case.workload.op]
        if spec.check is not None:
            with torch.no_grad():
                return spec.check(self.case.workload, self.inputs[0], self.first_output)
        with torch.no_grad():
            expected = OPS[self.case.workload.op].torch_fn(self.case.workload)(*self.inputs[0]).float()
            actual = self.first_output.float()
            if actual.shape != expected.shape or not bool(torch.isfinite(actual).all()):
                return math.nan
            scale = expected.abs().max().clamp_min(1e-30)
            return ((actual - expected).abs().max() / scale).item()

    def time(self, **timing) -> dict:
        return time_cuda(self.step, self.n_sets, setup=self.setup, **timing)

    def peak_memory(self) -> int:
        """Bytes allocated at the peak of one step beyond what existed before it."""
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        if self.setup is not None:
            self.build_graph(0)
        base = torch.cuda.memory_allocated()
        self.step(0)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base


def time_cuda(step: Callable[[int], object], n_sets: int, *, setup: Callable[[], object] | None = None,
              warmup_ms: float = 25.0, rep_ms: float = 100.0, min_reps: int = 5, max_reps: int = 1000) -> dict:
    """Median milliseconds per call of step(i), i rotating over n_sets input copies.

    The first call and about warmup_ms of calls are not timed. Each rep is one pass over all copies
    between two CUDA events, which spreads the events' own cost over n_sets calls; `setup`, if
    given, runs before every pass, outside the events.
    """
    def one_pass(events=None):
        if setup is not None:
            setup()
        if events:
            events[0].record()
        for i in range(n_sets):
            step(i)
        if events:
            events[1].record()

    def new_events():
        return torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

    one_pass()  # compiles, autotunes, allocates
    torch.cuda.synchronize()
    first = new_events()
    one_pass(first)
    first[1].synchronize()
    pass_ms = max(first[0].elapsed_time(first[1]), 1e-3)
    for _ in range(int(warmup_ms // pass_ms)):
        one_pass()
    reps = int(min(max_reps, max(min_reps, rep_ms // pass_ms)))
    events = [new_events() for _ in range(reps)]
    for pair in events:
        one_pass(pair)
    torch.cuda.synchronize()
    per_call = sorted(s.elapsed_time(e) / n_sets for s, e in events)
    return dict(ms=statistics.median(per_call), ms_min=per_call[0], ms_max=per_call[-1], reps=reps,
                calls_per_rep=n_sets)


def measure_ceilings(timing: dict = TIMING_FULL, matmul_size: int = 8192, copy_bytes: int = 1 << 30) -> dict:
    """Copy bandwidth and torch matmul FLOP/s per dtype, the ceilings every floor is computed from."""
    src = torch.rand(copy_bytes // 4, device="cuda")
    dst = torch.empty_like(src)
    t = time_cuda(lambda i: dst.copy_(src), 1, **timing)
    ceilings = dict(copy_bytes=copy_bytes, copy_bytes_per_s=2 * copy_bytes / (t["ms"] * 1e-3),
                    matmul_shape=[matmul_size] * 3, matmul_tflops={})
    src = dst = None  # noqa: F841 - free the 2 GiB before the matmuls
    n = matmul_size
    for name, (dtype, tf32) in DTYPES.items():
        a = [random_tensor((n, n), dtype, seed=i) for i in range(2)]
        b = [random_tensor((n, n), dtype, seed=10 + i, scale=n ** -0.5) for i in range(2)]
        previous = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = tf32
        try:
            t = time_cuda(lambda i: torch.mm(a[i], b[i]), 2, **timing)
        finally:
            torch.backends.cuda.matmul.allow_tf32 = previous
        ceilings["matmul_tflops"][name] = 2.0 * n ** 3 / (t["ms"] * 1e-3) / 1e12
        a = b = None
    torch.cuda.empty_cache()
    return ceilings
