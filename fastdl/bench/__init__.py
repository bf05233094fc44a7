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
in a module of its own stem that register()s it into OPS, and import that module below. Providers,
modes, timing, the JSON, the plot and the summary are shared, and bench/bench_<op>.py gets its
pytest-benchmark cases from `cases(op)`.

Modules: spec (workloads, cases, op specs, providers), timing (rotated inputs, CUDA-event timing,
ceilings), runner (records, the JSON, `fastdl bench`'s run), report (summary and plot of a JSON).
"""
from fastdl.bench.spec import (BASELINE, BUDGET_ENV, CHECK_TOLERANCE, DTYPES, MODE_PRIORITY, MODES, OPS,
                               PROVIDERS, QUICK_ENV, Case, OpSpec, Workload, case_context, cases, provider_fn,
                               providers, quick_from_env, random_tensor, register)
from fastdl.bench.timing import (FALLBACK_L2_BYTES, MAX_SETS, TIMING_BUDGET, TIMING_FULL, Prepared,
                                 measure_ceilings, time_cuda)
from fastdl.bench.report import plot, plot_dir, summary
from fastdl.bench.runner import SCHEMA, base_record, measure_case, metrics, run, run_op
# Importing the op modules registers their OpSpecs.
from fastdl.bench import batch_norm, conv2d, cross_entropy, dropout, linear, max_pool2d  # noqa: F401

__all__ = [
    "BASELINE", "BUDGET_ENV", "CHECK_TOLERANCE", "DTYPES", "MODE_PRIORITY", "MODES", "OPS", "PROVIDERS",
    "QUICK_ENV", "Case", "OpSpec", "Workload", "case_context", "cases", "provider_fn", "providers",
    "quick_from_env", "random_tensor", "register",
    "FALLBACK_L2_BYTES", "MAX_SETS", "TIMING_BUDGET", "TIMING_FULL", "Prepared", "measure_ceilings", "time_cuda",
    "plot", "plot_dir", "summary",
    "SCHEMA", "base_record", "measure_case", "metrics", "run", "run_op",
]
