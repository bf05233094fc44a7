"""`fastdl bench`'s run: one record per case (measure_case), written to <op>.json after each
workload (run_op), every op under one time budget (run)."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
import traceback

import torch

import fastdl
from fastdl.bench.report import first_line, plot, summary
from fastdl.bench.spec import (BASELINE, CHECK_TOLERANCE, MODE_PRIORITY, MODES, OPS, Case, budget_from_env,
                               case_context, providers, quick_from_env)
from fastdl.bench.timing import TIMING_BUDGET, TIMING_FULL, Prepared, l2_bytes, measure_ceilings

SCHEMA = 1


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



def _progress(rec: dict) -> str:
    head = f"{rec['op']} {rec['mode']:<16} {rec['dtype']:<4} {rec['label']:<18} {rec['provider']:<13}"
    if rec.get("error"):
        return f"{head} ERROR {first_line(rec['error'])}"
    if rec.get("skipped"):
        return f"{head} skipped: {rec['skipped']}"
    speedup = f"{rec['speedup_vs_torch']:.2f}x" if rec.get("speedup_vs_torch") else "-"
    flag = "" if rec.get("check", "ok") == "ok" else f"  MISMATCH vs torch: {rec['max_rel_err_vs_torch']}"
    # Memory-bound ops (no FLOPs counted): GB/s and its fraction of the measured copy bandwidth.
    rate = (f"{rec['tflops']:8.1f} TFLOP/s" if rec.get("flops") else
            f"{rec['gbps']:6.0f} GB/s {rec['bandwidth_fraction']:4.2f} bw")
    return (f"{head} {rec['ms']:9.4f} ms {rate} {speedup:>7} "
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



def run(out_dir: str, ops=None, quick: bool = False, budget_s: float | None = None) -> int:
    """Benchmark `ops` (default all) into out_dir; 2 without CUDA or for an unknown op, 1 if a case failed."""
    if not torch.cuda.is_available():
        print("fastdl bench: needs a CUDA GPU, and torch sees none "
              f"(torch {torch.__version__}, built with CUDA {torch.version.cuda or 'none'}); nothing was run.",
              file=sys.stderr)
        return 2
    names = list(ops) if ops else list(OPS) + ["models"]
    with_models = "models" in names  # whole-model training steps (fastdl/bench/models.py), after the ops
    names = [n for n in names if n != "models"]
    unknown = [n for n in names if n not in OPS]
    if unknown:
        print(f"fastdl bench: no benchmark for {', '.join(unknown)}; known: {', '.join(OPS)}", file=sys.stderr)
        return 2
    quick = quick or quick_from_env()
    budget_s = budget_s if budget_s is not None else budget_from_env()
    timing = TIMING_FULL if budget_s is None else TIMING_BUDGET
    os.makedirs(out_dir, exist_ok=True)
    start = time.monotonic()
    available, unavailable = providers()
    ceilings = measure_ceilings(timing)
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    meta = dict(gpu=torch.cuda.get_device_name(), capability=f"{props.major}.{props.minor}",
                sm_count=props.multi_processor_count, memory_bytes=props.total_memory, l2_bytes=l2_bytes(),
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
    if with_models:
        from fastdl.bench import models as _models

        if budget_s is not None and time.monotonic() > start + budget_s:
            print("models: time budget spent; whole-model steps not measured", flush=True)
        else:  # under a budget: quick batches, fewer steps (ResNet-50 at batch 16 is ~0.1 s a step)
            _models.run(out_dir, quick=quick or budget_s is not None, device="cuda",
                        **({} if budget_s is None else {"warmup": 2, "reps": 5}))
    return 1 if failed else 0
