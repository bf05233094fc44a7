"""`fastdl verify` (parity report against the float64 reference) and `fastdl bench` (GPU benchmarks)."""
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
    args = parser.parse_args(argv)
    if args.command == "verify":
        from fastdl import verify as _verify

        return _verify.run(ops=args.ops, backends=args.backends, json_path=args.json)
    from fastdl import bench as _bench

    if args.plot:
        return _bench.plot_dir(args.plot)
    return _bench.run(out_dir=args.out, ops=args.ops, quick=args.quick)


if __name__ == "__main__":
    sys.exit(main())
