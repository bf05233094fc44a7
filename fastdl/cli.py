"""`fastdl verify` (parity report against the float64 reference), `fastdl bench` (GPU benchmarks),
`fastdl inspect` (what the kernels compile to for sm_80/sm_90, without a GPU) and `fastdl demo` (a
primer's network and its fastdl.convert twin trained on handwritten digits)."""
from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fastdl", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    verify = sub.add_parser("verify", help="every op, backend and dtype against the float64 reference")
    verify.add_argument("--ops", nargs="*", help="only these ops (default: all)")
    verify.add_argument("--backends", nargs="*", help="only these backends (default: all available)")
    verify.add_argument("--json", help="also write the rows to this JSON file")
    bench = sub.add_parser("bench", help="benchmarks against torch (needs a CUDA GPU)")
    bench.add_argument("--out", default="bench-results", help="folder for the JSON data and plots")
    bench.add_argument("--ops", nargs="*", help="only these ops (default: all)")
    bench.add_argument("--quick", action="store_true", help="a few shapes only")
    bench.add_argument("--plot", metavar="DIR", help="only redraw the plots of DIR/<op>.json (no GPU needed)")
    inspect = sub.add_parser("inspect", help="compile every kernel for a GPU target and read the binaries (no GPU needed)")
    inspect.add_argument("--arch", choices=("sm_90", "sm_80", "native"), default="sm_90",
                         help="target (native: this machine's CUDA device)")
    inspect.add_argument("--op", action="append", help="only this op (repeatable; default: all)")
    inspect.add_argument("--json", help="also write the rows to this JSON file")
    inspect.add_argument("--configs", choices=("all", "default", "sample"), default="all",
                         help="every config the autotuner can pick for each variant (its kernel's list for "
                              "that precision and epilogue), only the first (default) one, or the default "
                              "one plus, per matmul kernel and config list, its biggest tile in its "
                              "heaviest-epilogue variant (CI)")
    inspect.add_argument("--fail-on", default="compile", metavar="KIND[:triton|cuda],...",
                         help="exit 1 when a row has one of these findings (default: compile); kinds: "
                              "compile, spills, shared-memory, no-tensor-cores, no-128-bit, narrow-async, "
                              "under-one-wave; ':triton' or ':cuda' limits a kind to those kernels")
    inspect.add_argument("--jobs", type=int, help="compile processes (default: one per CPU)")
    inspect.add_argument("--traffic", action="store_true",
                         help="instead: compulsory memory traffic per op against torch eager's and the floor")
    demo = sub.add_parser("demo", help="train a primer's network and its converted twin on handwritten digits")
    demo.add_argument("--model", choices=("mlp", "cnn", "resnet"), default="mlp")
    demo.add_argument("--epochs", type=int, help="default: 15 (mlp), 12 (cnn), 6 (resnet)")
    demo.add_argument("--backend", choices=("triton", "cupy", "reference"),
                      help="the converted model's backend (default: triton on a GPU, reference on CPU)")
    demo.add_argument("--out", default="demo-out", help="folder for the PNG plots and the JSON data")
    demo.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if args.command == "demo":
        from fastdl import demo as _demo

        return _demo.main(args)
    if args.command == "inspect":
        return _inspect(args)
    if args.command == "verify":
        from fastdl import verify as _verify

        return _verify.run(ops=args.ops, backends=args.backends, json_path=args.json)
    from fastdl import bench as _bench

    if args.plot:
        return _bench.plot_dir(args.plot)
    return _bench.run(out_dir=args.out, ops=args.ops, quick=args.quick)


def _inspect(args) -> int:
    import json
    import time

    if args.traffic:
        try:
            from fastdl.inspection import traffic
        except ImportError as exc:
            print(f"fastdl inspect --traffic: traffic accounting is not available here ({exc})", file=sys.stderr)
            return 2
        print(traffic.format(traffic.report(args.op)))
        return 0
    arch = args.arch
    if arch == "native":
        import torch

        from fastdl.inspection.sass import DEVICES

        if not torch.cuda.is_available():
            print("fastdl inspect --arch native: no CUDA device here; name a target (--arch sm_90 or sm_80), "
                  "which needs no GPU", file=sys.stderr)
            return 2
        major, minor = torch.cuda.get_device_capability()
        arch = f"sm_{major}{minor}"
        if arch not in DEVICES:
            print(f"fastdl inspect --arch native: this device is {arch}; fastdl inspect knows the limits of "
                  f"{', '.join(sorted(DEVICES))} only", file=sys.stderr)
            return 2
    from fastdl.inspection import inspect as _run_inspect
    from fastdl.inspection import report

    try:
        fail_on = report.parse_fail_on(args.fail_on)
    except ValueError as exc:
        print(f"fastdl inspect: {exc}", file=sys.stderr)
        return 2
    start = time.perf_counter()
    result = _run_inspect([arch], args.op, args.configs, args.jobs)
    rows = result["rows"]
    print(report.format_report(rows))
    print(f"{result['variants']} Triton variants from {result['launches']} launches, {result['pickable']} pickable "
          f"(variant, config) pairs ({result['pruned']} pruned by the kernels' config lists); capture "
          f"{result['capture_s']:.1f} s, compile and read {result['compile_s']:.1f} s, "
          f"total {time.perf_counter() - start:.1f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump([dict(r, findings=report.findings(r)) for r in rows], f, indent=1)
    failed = report.failures(rows, fail_on)
    if failed:
        print(f"\nfastdl inspect --fail-on {args.fail_on}: {len(failed)} failures", file=sys.stderr)
        print("\n".join(f"  {line}" for line in failed), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
