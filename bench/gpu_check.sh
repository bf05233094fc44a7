#!/usr/bin/env bash
# Everything that needs the GPU, in one call: tests, `fastdl verify`, `fastdl bench`.
#
#   bash bench/gpu_check.sh OUTDIR
#
# OUTDIR ends up flat and small (the device tool brings back at most 8 files, each under 16 MB):
#   check.log           environment, install, verify and bench output, and the summary printed last
#   tests.log           both pytest runs (GPU-marked tests first, then the rest)
#   verify.json         `fastdl verify --json`
#   <op>.json           `fastdl bench` data per op, written after every workload (survives a kill)
# The plots are drawn from the data wherever it lands: `fastdl bench --plot DIR`.
#
# The whole call stays under FASTDL_CHECK_SECONDS (default 530 s; the tool allows 600): each step
# gets a share of what is left, and the bench gets the rest as its FASTDL_BENCH_BUDGET. The GPU
# machine has no network and no fastdl installed, so fastdl is installed from this tree without
# an index (editable, else a plain install, else a copy on PYTHONPATH).
set -u -o pipefail

OUT=${1:?usage: bash bench/gpu_check.sh OUTDIR}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${PYTHON:-python3}
TOTAL_S=${FASTDL_CHECK_SECONDS:-530}
START=$(date +%s)
SCRATCH=$(mktemp -d)
LOG="$OUT/check.log"
STATUS=0
: > "$LOG"

left() { echo $(( TOTAL_S - ($(date +%s) - START) )); }
# cap SECONDS RESERVE: at most SECONDS, and never into the RESERVE kept for later steps.
cap() { local c=$1 r=$(( $(left) - $2 )); (( r < c )) && c=$r; (( c < 10 )) && c=10; echo "$c"; }
section() { printf '\n==== %s (%ss in, %ss left) ====\n' "$1" $(( $(date +%s) - START )) "$(left)" >> "$LOG"; }
note() { echo "$*" | tee -a "$LOG"; }

section environment
{
    nvidia-smi 2>&1 | head -20
    "$PY" -c 'import sys, torch, triton; print(sys.version); print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available()); print("triton", triton.__version__)' 2>&1
    "$PY" -c 'import cupy; print("cupy", cupy.__version__)' 2>&1 | tail -1
} >> "$LOG"

section install
# With an editable install the repo root may be the working directory. Otherwise its fastdl/
# would shadow the installed package (whose fastdl.kernels comes from kernels/), so commands run
# from an empty directory instead.
RUN_DIR=$REPO
imports() { (cd "$1" && "$PY" -c 'import fastdl, fastdl.kernels.triton, fastdl.bench; print("fastdl from", fastdl.__file__)') >> "$LOG" 2>&1; }
if (cd "$REPO" && "$PY" -m pip install --no-deps --no-build-isolation --no-index -e .) >> "$LOG" 2>&1 \
        && imports "$REPO"; then
    note "install: editable"
else
    RUN_DIR=$SCRATCH/run
    mkdir -p "$RUN_DIR"
    if (cd "$REPO" && "$PY" -m pip install --no-deps --no-build-isolation --no-index .) >> "$LOG" 2>&1 \
            && imports "$RUN_DIR"; then
        note "install: regular (pip)"
    else
        mkdir -p "$SCRATCH/site/fastdl"
        cp -r "$REPO/fastdl/." "$SCRATCH/site/fastdl/"
        cp -r "$REPO/kernels" "$SCRATCH/site/fastdl/kernels"
        export PYTHONPATH="$SCRATCH/site${PYTHONPATH:+:$PYTHONPATH}"
        if imports "$RUN_DIR"; then note "install: copy on PYTHONPATH"; else note "install: FAILED"; STATUS=1; fi
    fi
fi

section tests
cd "$RUN_DIR" || exit 1
PYTEST=("$PY" -m pytest "$REPO/tests" -p no:cacheprovider -q -rfEs --durations=10)
echo "== pytest -m gpu ==" > "$OUT/tests.log"
timeout -s INT -k 20 "$(cap 150 330)" "${PYTEST[@]}" -m gpu >> "$OUT/tests.log" 2>&1
rc=$?; note "tests -m gpu: exit $rc"; (( rc != 0 && rc != 5 )) && STATUS=1
echo "== pytest -m 'not gpu' ==" >> "$OUT/tests.log"
timeout -s INT -k 20 "$(cap 150 270)" "${PYTEST[@]}" -m "not gpu" >> "$OUT/tests.log" 2>&1
rc=$?; note "tests -m 'not gpu': exit $rc"; (( rc != 0 && rc != 5 )) && STATUS=1

section verify
timeout -s INT -k 20 "$(cap 90 200)" "$PY" -m fastdl verify --json "$OUT/verify.json" >> "$LOG" 2>&1
rc=$?; note "verify: exit $rc"; (( rc != 0 )) && STATUS=1

section bench
# The bench stops starting workloads when its budget is spent; the margin covers the workload in
# flight, the plot and the summary. The timeout is the backstop; the JSON survives it.
BUDGET=$(( $(left) - 45 )); (( BUDGET < 30 )) && BUDGET=30
note "bench budget: ${BUDGET}s"
FASTDL_BENCH_BUDGET=$BUDGET timeout -s INT -k 20 "$(cap 600 15)" "$PY" -m fastdl bench --out "$OUT" >> "$LOG" 2>&1
rc=$?; note "bench: exit $rc"; (( rc != 0 )) && STATUS=1
# Pictures are redrawn from the JSON where the results are committed; only data comes back.
mv "$OUT"/*.png "$SCRATCH"/ 2>/dev/null

section summary
rm -f "$OUT"/*.tmp
{
    grep -E '(passed|failed|skipped|error|no tests ran).* in [0-9.]+s' "$OUT/tests.log"
    sed -n '/^== fastdl bench summary/,$p' "$LOG" | grep -v '^====' | head -120
    echo "files:"; ls -l "$OUT"
    echo "elapsed: $(( $(date +%s) - START ))s, status $STATUS"
} | tee -a "$LOG"
# The device tool drops files of 16 MB or more: keep the ends of an oversized log.
for f in "$OUT"/*.log; do
    if (( $(stat -c %s "$f") > 15000000 )); then
        { head -c 5000000 "$f"; printf '\n... [truncated] ...\n'; tail -c 9000000 "$f"; } > "$SCRATCH/cut" && mv "$SCRATCH/cut" "$f"
    fi
done
rm -rf "$SCRATCH"
exit $STATUS
