"""Findings and the table `fastdl inspect` prints, from the rows fastdl.inspection.compile writes."""
from __future__ import annotations

from fastdl.inspection.compile import MATMUL_KERNELS, MEMORY_BOUND_KERNELS, REDUCTION_KERNELS
from fastdl.inspection.sass import DEVICES

TENSOR_CORE_PRECISIONS = ("fp16", "bf16", "tf32")

COLUMNS = (
    # (header, width, value)
    ("kernel", 30, lambda r: r["kernel"]),
    ("case (first of n)", 46, lambda r: f"{r['case']}" + (f" +{len(r['cases']) - 1}" if len(r["cases"]) > 1 else "")),
    ("config", 38, lambda r: ("* " if r["default"] else "  ") + r["config"]),
    ("arch", 5, lambda r: r["arch"]),
    ("regs", 4, lambda r: r.get("registers", "")),
    ("spill", 5, lambda r: r.get("stack", "")),
    ("smem", 6, lambda r: r.get("shared", "")),
    ("blk/SM", 6, lambda r: r.get("blocks_per_sm", "")),
    ("wrp/SM", 6, lambda r: r.get("warps_per_sm", "")),
    ("mma", 4, lambda r: r.get("mma", "")),
    ("async(bits)", 16, lambda r: _bits(r.get("async_copies"), r.get("async_copy_bits"))),
    ("ld128/ld", 9, lambda r: f"{r['global_loads_128']}/{r['global_loads']}" if "global_loads" in r else ""),
    ("st128/st", 9, lambda r: f"{r['global_stores_128']}/{r['global_stores']}" if "global_stores" in r else ""),
    ("assert", 6, lambda r: r.get("asserts", "")),
    ("waves", 6, lambda r: f"{r['waves']:.2f}" if r.get("waves") is not None else ""),
)


def _bits(count, bits) -> str:
    if not count:
        return "0"
    return f"{count} ({','.join(f'{b}:{n}' for b, n in sorted((bits or {}).items(), key=lambda kv: -int(kv[0])))})"


def _aligned_rows(row: dict) -> bool:
    """Whether the row length (and each row's stride) of a memory-bound kernel is divisible by 16
    elements, so 16-byte accesses are possible at all."""
    divisible = set(row.get("divisible_by_16", ()))
    lengths = [name for name in row.get("signature", {}) if name in ("C", "numel")]
    return all(name in divisible for name in lengths)


def findings(row: dict) -> list[str]:
    """What is wrong with one (kernel, variant, config, arch) row, one short line each."""
    if row.get("error"):
        return [f"compile failure: {row['error'].splitlines()[0][:200]}"]
    out = []
    if row["stack"] or row["spill_stores"]:
        out.append(f"spills: {row['stack']} bytes of local memory per thread ({row['spill_stores']} STL)")
    limit = DEVICES[row["arch"]].shared_per_block
    if row["shared"] > limit:
        out.append(f"shared memory over the limit: {row['shared']} B, a block may use {limit} B (cannot launch)")
    if row["kernel"].removesuffix(".cu") in MATMUL_KERNELS and row["precision"] in TENSOR_CORE_PRECISIONS \
            and not row["mma"]:
        out.append(f"no tensor cores: a {row['precision']} matmul without HGMMA/HMMA")
    kernel = row["kernel"].removesuffix(".cu")
    if kernel in MEMORY_BOUND_KERNELS and row["global_loads"] \
            and not (row["global_loads_128"] and (row["global_stores_128"] or kernel in REDUCTION_KERNELS)):
        why = "" if _aligned_rows(row) else " (row length not a multiple of 16 elements)"
        out.append(f"no 128-bit accesses: memory-bound, no 128-bit {'loads' if not row['global_loads_128'] else 'stores'}{why}")
    narrow = {b: n for b, n in (row.get("async_copy_bits") or {}).items() if int(b) < 128}
    if narrow:
        out.append(f"narrow async copies: {sum(narrow.values())} of {row['async_copies']} cp.async under 16 bytes")
    if row.get("waves") is not None and row["waves"] < 1:
        out.append(f"under one wave: a grid of {row['grid']} blocks is {row['waves']:.2f} of a wave "
                   f"({row['blocks_per_sm']} blocks/SM x {DEVICES[row['arch']].sms} SMs)")
    return out


# The kinds of finding, as `fastdl inspect --fail-on` names them, by the text each finding starts with.
FINDING_KINDS = {
    "compile failure": "compile",
    "spills": "spills",
    "shared memory over the limit": "shared-memory",
    "no tensor cores": "no-tensor-cores",
    "no 128-bit accesses": "no-128-bit",
    "narrow async copies": "narrow-async",
    "under one wave": "under-one-wave",
}


def parse_fail_on(spec: str) -> list[tuple[str, str | None]]:
    """`--fail-on` "compile,spills:triton,..." -> [(kind, row kind or None for every row), ...]."""
    out = []
    for item in filter(None, (part.strip() for part in spec.split(","))):
        kind, _, scope = item.partition(":")
        if kind not in FINDING_KINDS.values():
            raise ValueError(f"--fail-on: unknown finding {kind!r} (one of {', '.join(FINDING_KINDS.values())})")
        if scope not in ("", "triton", "cuda"):
            raise ValueError(f"--fail-on: {item!r}: the scope after ':' is triton or cuda")
        out.append((kind, scope or None))
    return out


def failures(rows: list[dict], fail_on: list[tuple[str, str | None]]) -> list[str]:
    """One line per (row, finding) that `fail_on` (parse_fail_on's result) makes a failure."""
    out = []
    for row in rows:
        for finding in findings(row):
            kind = next(k for text, k in FINDING_KINDS.items() if finding.startswith(text))
            if any(kind == k and scope in (None, row["kind"]) for k, scope in fail_on):
                out.append(f"{row['arch']} {row['kernel']} [{row['case']}] {row['config']}: {finding}")
    return out


def table(rows: list[dict]) -> str:
    header = "  ".join(h.ljust(w) for h, w, _ in COLUMNS)
    lines = [header, "-" * len(header)]
    for row in rows:
        lines.append("  ".join(str(value(row) if not row.get("error") or h in ("kernel", "case (first of n)",
                                                                                "config", "arch") else "FAILED")
                               [:w].ljust(w) for h, w, value in COLUMNS))
    return "\n".join(lines)


def summary(rows: list[dict]) -> str:
    lines = []
    counted = {}
    for row in rows:
        for finding in findings(row):
            kind = finding.split(":")[0]
            counted.setdefault(kind, []).append(row)
    lines.append(f"{len(rows)} rows (kernel x variant x config x arch); "
                 f"{sum(1 for r in rows if r.get('error'))} compile failures")
    for kind, hit in sorted(counted.items(), key=lambda kv: -len(kv[1])):
        kernels = sorted({r["kernel"] for r in hit})
        lines.append(f"  {len(hit):4d} x {kind}: {', '.join(kernels)}")
    return "\n".join(lines)


def format_report(rows: list[dict]) -> str:
    out = [table(rows), "", "Findings:"]
    for row in rows:
        for finding in findings(row):
            out.append(f"  {row['arch']} {row['kernel']} [{row['case']}] {row['config']}: {finding}")
    out += ["", summary(rows)]
    return "\n".join(out)
