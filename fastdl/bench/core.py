"""`fastdl bench`: every op against torch on the GPU, kept as data (<op>.json) and drawn from it (<op>_speedup.png).

How the numbers are made, and why (ARCHITECTURE.md, performance method):

- Each rep is one pass of back-to-back calls between two CUDA events; the median over reps is
  reported, per call. When the host launches slower than the GPU finishes (tiny shapes), the time
  is the launch rate, which is what a caller of a drop-in layer gets.
- The first call (torch.compile, Triton autotuning, first allocations) and a warm-up are not timed.
- Calls rotate over enough copies of the inputs that one pass reads more than twice the L2 cache:
  a layer in a real step does not find its operands hot in L2.
- Inputs are random with rows and columns of different scale and offset (fastdl.testing.make_tensor's
  distribution, drawn on the GPU); zeros would flatter a relu and hide a wrong kernel. Each
  provider's forward output is also compared with torch's before it is timed.
- Every result is a ratio to torch eager measured in the same run, and a fraction of its floor:
  max(FLOPs / peak FLOP/s, minimal bytes / copy bandwidth), both ceilings measured in the same run.

Adding an op: write an OpSpec (its workloads, inputs, torch and fastdl functions, and cost model)
and put it in OPS. Providers, modes, timing, the JSON, the plot and the summary are shared, and
bench/bench_<op>.py gets its pytest-benchmark cases from `cases(op)`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import json
import math
import os
import statistics
import subprocess
import sys
import time
import traceback
from typing import Callable

import torch

import fastdl
from fastdl.backends import available_backends, use_backend

SCHEMA = 1
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
FALLBACK_L2_BYTES = 60 << 20
MAX_SETS = 1024
TIMING_FULL = dict(warmup_ms=25.0, rep_ms=100.0, min_reps=5)
TIMING_BUDGET = dict(warmup_ms=10.0, rep_ms=40.0, min_reps=3)
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


def _l2_bytes() -> int:
    return getattr(torch.cuda.get_device_properties(torch.cuda.current_device()), "L2_cache_size", 0) \
        or FALLBACK_L2_BYTES


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


class Prepared:
    """A case's rotated input copies and its timed step; build and use it inside case_context."""

    def __init__(self, case: Case, n_sets: int | None = None):
        spec, w = OPS[case.workload.op], case.workload
        self.case, self.fn = case, provider_fn(case)
        first = spec.make_inputs(w, 0)
        # The first call compiles or autotunes; its output is also what check() compares.
        self.first_output = self.fn(*first).detach()
        grad_out = random_tensor(self.first_output.shape, self.first_output.dtype, seed=7919)
        set_bytes = _nbytes(first) + (0 if case.mode == "forward" else _nbytes([grad_out]))
        if n_sets is None:
            n_sets = min(MAX_SETS, max(2, math.ceil(2 * _l2_bytes() / max(set_bytes, 1))))
        self.n_sets = n_sets
        self.inputs = [first] + [spec.make_inputs(w, i) for i in range(1, n_sets)]
        self.diff = [tuple(t for t in s if isinstance(t, torch.Tensor) and t.requires_grad)
                     for s in self.inputs]
        self.grad_outs = [grad_out] + [random_tensor(grad_out.shape, grad_out.dtype, seed=7919 + i)
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


# One record per case in <op>.json's "records" (next to "schema", "op", "meta" and "ceilings"):
#   op, provider, mode, dtype, shape, group, label, params   what was run
#   ms (median per call), ms_min, ms_max, reps, n_sets       how long it took, over how many
#   tflops, flops, bytes                                     work done and minimal bytes moved
#   speedup_vs_torch                                         torch eager's ms / this ms, same run
#   floor_ms, floor_fraction                                 max(FLOPs/peak, bytes/bandwidth), floor_ms / ms
#   peak_mem_bytes                                           forward+backward only: peak allocation beyond the inputs
#   max_rel_err_vs_torch, check                              not for torch: forward output against torch eager's
#   error | skipped                                          instead of the numbers, when it failed or ran out of time
def base_record(case: Case) -> dict:
    w = case.workload
    return dict(op=w.op, provider=case.provider, mode=case.mode, dtype=w.dtype, shape=list(w.shape),
                group=w.group, label=w.label, params=w.param, ms=None, tflops=None, speedup_vs_torch=None,
                floor_ms=None, floor_fraction=None, peak_mem_bytes=None)


def metrics(case: Case, ms: float, ceilings: dict) -> dict:
    """TFLOP/s and the floor of a case timed at `ms` per call."""
    flops, nbytes = OPS[case.workload.op].cost(case.workload, case.mode)
    peak = ceilings["matmul_tflops"][case.workload.dtype] * 1e12
    floor_ms = 1e3 * max(flops / peak, nbytes / ceilings["copy_bytes_per_s"])
    return dict(ms=ms, tflops=flops / (ms * 1e-3) / 1e12, flops=flops, bytes=nbytes,
                gbps=nbytes / (ms * 1e-3) / 1e9,
                bandwidth_fraction=nbytes / (ms * 1e-3) / ceilings["copy_bytes_per_s"],
                floor_ms=floor_ms, floor_fraction=floor_ms / ms)


def measure_case(case: Case, ceilings: dict, timing: dict = TIMING_FULL) -> dict:
    """One record; an exception becomes its `error` field instead of ending the run."""
    record = base_record(case)
    prepared = None
    try:
        with case_context(case):
            prepared = Prepared(case)
            if case.provider != BASELINE:
                err = prepared.check()
                record["max_rel_err_vs_torch"] = None if math.isnan(err) else err
                record["check"] = "ok" if err <= CHECK_TOLERANCE[case.workload.dtype] else "mismatch"
            t = prepared.time(**timing)
            if case.mode == "forward+backward":
                record["peak_mem_bytes"] = prepared.peak_memory()
            torch.cuda.synchronize()
        record.update(metrics(case, t["ms"], ceilings))
        record.update(ms_min=t["ms_min"], ms_max=t["ms_max"], reps=t["reps"], n_sets=prepared.n_sets)
    except Exception as exc:  # noqa: BLE001 - one failing provider must not end the run
        message = "".join(traceback.format_exception_only(type(exc), exc)).strip()
        record["error"] = message if len(message) <= 3000 else message[:2000] + " ... " + message[-1000:]
    finally:
        del prepared
        torch.cuda.empty_cache()
    return record


# --------------------------------------------------------------------------- run

def _versions() -> dict:
    out = dict(torch=torch.__version__, cuda=torch.version.cuda, fastdl=fastdl.__version__, python=sys.version.split()[0])
    for name in ("triton", "cupy"):
        try:
            out[name] = __import__(name).__version__
        except Exception:  # noqa: BLE001
            out[name] = None
    try:
        out["git"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                    timeout=5, cwd=os.path.dirname(__file__)).stdout.strip() or None
    except Exception:  # noqa: BLE001
        out["git"] = None
    return out


def _write_json(path: str, data: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1, default=float)
    os.replace(tmp, path)


def _first_line(message: str) -> str:
    # A dynamo failure ends with advice on logging; the line that says what failed comes first.
    return next((line for line in message.splitlines() if line.strip()), "")[:160]


def _progress(rec: dict) -> str:
    head = f"{rec['op']} {rec['mode']:<16} {rec['dtype']:<4} {rec['label']:<18} {rec['provider']:<13}"
    if rec.get("error"):
        return f"{head} ERROR {_first_line(rec['error'])}"
    if rec.get("skipped"):
        return f"{head} skipped: {rec['skipped']}"
    speedup = f"{rec['speedup_vs_torch']:.2f}x" if rec.get("speedup_vs_torch") else "-"
    flag = "" if rec.get("check", "ok") == "ok" else f"  MISMATCH vs torch: {rec['max_rel_err_vs_torch']}"
    return (f"{head} {rec['ms']:9.4f} ms {rec['tflops']:8.1f} TFLOP/s {speedup:>7} "
            f"{rec['floor_fraction']:5.2f} of floor{flag}")


def run_op(op: str, quick: bool, ceilings: dict, meta: dict, json_path: str, deadline: float,
           timing: dict) -> dict:
    """Measure every case of an op, writing the JSON after each workload so a killed run keeps its data."""
    available, _ = providers()
    workloads = OPS[op].workloads(quick)
    records: dict[Case, dict] = {}

    def data():
        order = [Case(w, p, m) for w in workloads for m in MODES for p in available]
        return dict(schema=SCHEMA, op=op, meta=meta, ceilings=ceilings,
                    records=[records[c] for c in order if c in records])

    announced = False
    for mode in MODE_PRIORITY:
        for w in workloads:
            group = [Case(w, p, mode) for p in available]
            # The budget is checked per workload, so the baseline is never measured without the rest.
            over = time.monotonic() > deadline
            if over and not announced:
                print(f"{op}: time budget spent; the remaining cases are recorded as skipped", flush=True)
                announced = True
            for case in group:
                records[case] = (dict(base_record(case), skipped="time budget spent") if over
                                 else measure_case(case, ceilings, timing))
            base_ms = records[group[0]]["ms"]
            for case in group:
                rec = records[case]
                if base_ms and rec["ms"]:
                    rec["speedup_vs_torch"] = base_ms / rec["ms"]
                if not rec.get("skipped"):
                    print(_progress(rec), flush=True)
            _write_json(json_path, data())
    return data()


def _budget_from_env() -> float | None:
    value = os.environ.get(BUDGET_ENV)
    return float(value) if value else None


def run(out_dir: str, ops=None, quick: bool = False, budget_s: float | None = None) -> int:
    """Benchmark `ops` (default all) into out_dir; 2 without CUDA or for an unknown op, 1 if a case failed."""
    if not torch.cuda.is_available():
        print("fastdl bench: needs a CUDA GPU, and torch sees none "
              f"(torch {torch.__version__}, built with CUDA {torch.version.cuda or 'none'}); nothing was run.",
              file=sys.stderr)
        return 2
    names = list(ops) if ops else list(OPS)
    unknown = [n for n in names if n not in OPS]
    if unknown:
        print(f"fastdl bench: no benchmark for {', '.join(unknown)}; known: {', '.join(OPS)}", file=sys.stderr)
        return 2
    quick = quick or quick_from_env()
    budget_s = budget_s if budget_s is not None else _budget_from_env()
    timing = TIMING_FULL if budget_s is None else TIMING_BUDGET
    os.makedirs(out_dir, exist_ok=True)
    start = time.monotonic()
    available, unavailable = providers()
    ceilings = measure_ceilings(timing)
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    meta = dict(gpu=torch.cuda.get_device_name(), capability=f"{props.major}.{props.minor}",
                sm_count=props.multi_processor_count, memory_bytes=props.total_memory, l2_bytes=_l2_bytes(),
                versions=_versions(), date=time.strftime("%Y-%m-%dT%H:%M:%S%z"), quick=quick, budget_s=budget_s,
                providers=available, providers_unavailable=unavailable, baseline=BASELINE,
                timing=dict(timing, method="CUDA events around passes of back-to-back calls over rotated input "
                            "copies (> 2x L2); median per call; first call and warm-up not timed",
                            torch_compile="torch.compile(dynamic=False), default mode"))
    print(f"fastdl bench on {meta['gpu']}: copy {ceilings['copy_bytes_per_s'] / 1e12:.2f} TB/s, matmul TFLOP/s "
          + ", ".join(f"{k} {v:.0f}" for k, v in ceilings["matmul_tflops"].items()), flush=True)
    failed = 0
    for i, op in enumerate(names):
        now = time.monotonic()
        # Each op gets an equal share of what is left of the budget.
        deadline = math.inf if budget_s is None else now + (start + budget_s - now) / (len(names) - i)
        json_path = os.path.join(out_dir, f"{op}.json")
        data = run_op(op, quick, ceilings, dict(meta), json_path, deadline, timing)
        data["meta"]["elapsed_s"] = time.monotonic() - now
        _write_json(json_path, data)
        try:
            plot(json_path, os.path.join(out_dir, f"{op}_speedup.png"))
        except Exception as exc:  # noqa: BLE001 - the data matters more than the picture
            print(f"fastdl bench: no plot for {op}: {exc}", file=sys.stderr)
        print(summary(data), flush=True)
        failed += sum(1 for r in data["records"] if r.get("error"))
    return 1 if failed else 0


# --------------------------------------------------------------------------- reading the data

def _geomean(values) -> float | None:
    values = [v for v in values if v]
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else None


def summary(data: dict, mode: str = "forward+backward") -> str:
    """A text table of one op's JSON: per workload, then geometric means per group and the largest shape."""
    recs = [r for r in data["records"] if r["mode"] == mode]
    others = [p for p in PROVIDERS if p != BASELINE and any(r["provider"] == p for r in recs)]
    by_key = {(r["dtype"], r["label"], r["provider"]): r for r in recs}
    workloads = list(dict.fromkeys((r["dtype"], r["label"], r["group"], tuple(r["shape"])) for r in recs))

    def cell(r):
        if r is None:
            return "-"
        if r.get("error"):
            return "error"
        if r.get("skipped"):
            return "skipped"
        return f"{r['speedup_vs_torch']:.2f}x" if r.get("speedup_vs_torch") else "-"

    lines = [f"== fastdl bench summary: {data['op']} {mode}, speedup over torch eager "
             f"({data['meta'].get('gpu', '?')}) ==",
             f"{'dtype':<5} {'workload':<18} {'torch ms':>9} {'of floor':>8} " + " ".join(f"{p:>14}" for p in others)]
    for dtype, label, _, _ in workloads:
        base = by_key.get((dtype, label, BASELINE))
        ms = f"{base['ms']:.4f}" if base and base.get("ms") else cell(base)
        frac = f"{base['floor_fraction']:.2f}" if base and base.get("floor_fraction") else "-"
        lines.append(f"{dtype:<5} {label:<18} {ms:>9} {frac:>8} "
                     + " ".join(f"{cell(by_key.get((dtype, label, p))):>14}" for p in others))
    lines.append("geometric mean per group (n: workloads with both numbers), then the group's largest workload:")
    lines.append(f"  {'group':<7} {'dtype':<5} " + " ".join(f"{p:>14}" for p in others)
                 + f"   {'largest':<14} " + " ".join(f"{p:>14}" for p in others))
    for group in dict.fromkeys(g for _, _, g, _ in workloads):
        for dtype in dict.fromkeys(d for d, _, g, _ in workloads if g == group):
            in_group = [(label, shape) for d, label, g, shape in workloads if g == group and d == dtype]
            largest = max(in_group, key=lambda ls: math.prod(ls[1]))[0]
            cells = []
            for p in others:
                speedups = [by_key.get((dtype, label, p), {}).get("speedup_vs_torch") for label, _ in in_group]
                g = _geomean(speedups)
                cells.append(f"{g:.2f}x n={sum(1 for s in speedups if s)}" if g else "-")
            tail = " ".join(f"{cell(by_key.get((dtype, largest, p))):>14}" for p in others)
            lines.append(f"  {group:<7} {dtype:<5} " + " ".join(f"{c:>14}" for c in cells)
                         + f"   {largest:<14} " + tail)
    errors = [r for r in data["records"] if r.get("error")]
    skipped = [r for r in data["records"] if r.get("skipped")]
    suspect = [r for r in data["records"] if r.get("check") == "mismatch"]
    lines.append(f"cases: {len(data['records'])}, errors: {len(errors)}, skipped (budget): {len(skipped)}, "
                 f"output mismatches vs torch: {len(suspect)}")
    for r in errors[:5]:
        lines.append(f"  error: {r['mode']} {r['dtype']} {r['label']} {r['provider']}: "
                     f"{_first_line(r['error'])}")
    return "\n".join(lines)


def plot(json_path: str, png_path: str, mode: str = "forward+backward") -> None:
    """Speedup over torch eager per workload, one panel per dtype, drawn from a stored JSON."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    with open(json_path) as f:
        data = json.load(f)
    recs = [r for r in data["records"] if r["mode"] == mode]
    dtypes = [d for d in DTYPES if any(r["dtype"] == d for r in recs)]
    others = [p for p in PROVIDERS if p != BASELINE and any(r["provider"] == p for r in recs)]
    if not dtypes or not others:
        raise ValueError(f"{json_path}: no {mode} records to plot")
    by_key = {(r["dtype"], r["label"], r["provider"]): r for r in recs}
    n_labels = max(len({r["label"] for r in recs if r["dtype"] == d}) for d in dtypes)
    fig, axes = plt.subplots(len(dtypes), 1, figsize=(max(8.0, 0.7 * n_labels + 2), 3.0 * len(dtypes)),
                             squeeze=False)
    width = 0.8 / len(others)
    order = list(dict.fromkeys(r["label"] for r in recs))
    colors = {p: f"C{i}" for i, p in enumerate(others)}
    handles = [Patch(facecolor=colors[p], label=p) for p in others]
    if any(r.get("check") == "mismatch" for r in recs):
        handles.append(Patch(facecolor="white", edgecolor="black", hatch="//", label="output differs from torch"))
    for ax, dtype in zip(axes[:, 0], dtypes):
        labels = [label for label in order if any(r["label"] == label and r["dtype"] == dtype for r in recs)]
        for j, p in enumerate(others):
            xs = [i + (j - (len(others) - 1) / 2) * width for i in range(len(labels))]
            ys = [(by_key.get((dtype, label, p)) or {}).get("speedup_vs_torch") or 0.0 for label in labels]
            # Hatched: the output differed from torch eager's (see max_rel_err_vs_torch).
            bars = ax.bar(xs, ys, width, color=colors[p])
            for patch, label in zip(bars.patches, labels):
                if (by_key.get((dtype, label, p)) or {}).get("check") == "mismatch":
                    patch.set_hatch("//")
            for x, y, label in zip(xs, ys, labels):
                r = by_key.get((dtype, label, p)) or {}
                if y:
                    ax.text(x, y, f"{y:.2f}", ha="center", va="bottom", fontsize=6)
                elif r.get("error") or r.get("skipped"):
                    ax.text(x, 0.02, "err" if r.get("error") else "skip", ha="center", va="bottom",
                            fontsize=6, rotation=90, color=colors[p])
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xticks(range(len(labels)), labels, rotation=20, fontsize=8)
        ax.set_ylabel("speedup vs torch eager")
        ax.set_title(f"{data['op']} {mode}, {dtype}", fontsize=10)
        ax.set_ylim(0, 1.15 * max([1.0] + [p.get_height() for p in ax.patches]))
        ax.legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    v = data["meta"].get("versions", {})
    fig.suptitle(f"{data['meta'].get('gpu', '?')}: torch {v.get('torch')}, triton {v.get('triton')} "
                 f"({data['meta'].get('date', '')})", fontsize=9)
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)


def plot_dir(out_dir: str) -> int:
    """Redraw <op>_speedup.png for every <op>.json of a results folder (the data is the source)."""
    drawn = 0
    for name in sorted(os.listdir(out_dir)):
        op = name[:-5]
        if name.endswith(".json") and op in OPS:
            plot(os.path.join(out_dir, name), os.path.join(out_dir, f"{op}_speedup.png"))
            drawn += 1
    print(f"fastdl bench: drew {drawn} plot(s) in {out_dir}")
    return 0 if drawn else 2
