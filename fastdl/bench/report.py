"""Reading the data back: the text summary and the speedup plot of an <op>.json."""
from __future__ import annotations

import json
import math
import os

from fastdl.bench.spec import BASELINE, DTYPES, OPS, PROVIDERS


def first_line(message: str) -> str:
    # A dynamo failure ends with advice on logging; the line that says what failed comes first.
    return next((line for line in message.splitlines() if line.strip()), "")[:160]


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
                     f"{first_line(r['error'])}")
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
