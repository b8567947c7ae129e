#!/usr/bin/env bash
# The accelerator check, in one go and within 10 minutes, on a GPU (or TPU) machine without
# network access that has Python 3.12, jax/jaxlib with its accelerator plugin, flax, optax,
# orbax-checkpoint, tensorboard, numpy, scikit-learn, matplotlib, pillow, absl-py and etils
# (no TensorFlow):
#   1. installs the wheels of .whl/ (experiments/fetch_gpu_wheels.sh downloads them: ml-collections,
#      clu, grain, array-record, portpicker) and this package, both with --no-deps, into a
#      target directory (the installed jax is never replaced);
#   2. records the environment and checks that training imports without TensorFlow;
#   3. runs the tests that need no ../shared (those of TESTS below that exist);
#   4. runs experiments/benchmark.py in accelerator mode: the train step at batch 64 of tiny,
#      74-10 and 45-6 in float32 and bfloat16, 128 samples of 74-10, the f32 and bf16 matmul
#      peaks, fractions of peak, device memory next to host RSS;
#   5. trains tiny for 200 steps in float32 and in bfloat16 on the offline data (the CIFAR-10
#      subset in .whl/data/ or ../shared/data/; without it the quickstart model on the
#      embedded digits) through the real loop (benchmark.py's loop rows: steps/s, time to the
#      first step, peak RSS, the bits/dim curve).
# Every step has a time limit; what does not fit in GPU_CHECK_BUDGET_S (default 570 s) is
# skipped and says so. Logs and JSON go to $OUT (default /tmp/denseflow_gpu_check); at most 8
# files: env.txt tests.log bench_accel.json bench_accel.log loop.json loop.log summary.txt.
#
# Usage: experiments/gpu_check.sh [--dry-run]
#   --dry-run  print the commands and check the wheels, run nothing
# Environment: OUT, PYTHON (default python3), GPU_CHECK_SITE (install target, default
# /tmp/denseflow_site), GPU_CHECK_BUDGET_S.
set -uo pipefail
cd "$(dirname "$0")/.."
REPO="$(pwd)"
DRY=0
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY=1 ;;
    -h|--help) sed -n '2,29p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "error: unknown argument $arg (expected --dry-run)" >&2; exit 2 ;;
  esac
done
OUT="${OUT:-/tmp/denseflow_gpu_check}"
PY="${PYTHON:-python3}"
SITE="${GPU_CHECK_SITE:-/tmp/denseflow_site}"
BUDGET="${GPU_CHECK_BUDGET_S:-570}"
START=$(date +%s)
TESTS="tests/test_export.py tests/test_precision.py tests/test_nets.py tests/test_bijectors.py tests/test_measure.py"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1

left() { echo $(( BUDGET - ($(date +%s) - START) )); }
say() { echo "== [$(( $(date +%s) - START ))s] $*"; }
run() {  # run LIMIT_S LOG cmd...: the command under a time limit, output also into LOG
  local limit="$1" log="$2"; shift 2
  echo "+ (limit ${limit}s) $*" | tee -a "$log"
  if [ "$DRY" = 1 ]; then return 0; fi
  if [ "$limit" -le 5 ]; then echo "skipped: out of time" | tee -a "$log"; return 124; fi
  timeout --signal=TERM --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$log"
  local rc=${PIPESTATUS[0]}
  [ "$rc" = 124 ] && echo "timed out after ${limit}s" | tee -a "$log"
  return "$rc"
}

# ----------------------------------------------------------------------- 1. install
say "install into $SITE"
shopt -s nullglob
WHEELS=(.whl/*.whl)
if [ "${#WHEELS[@]}" = 0 ]; then
  echo "error: no wheels in .whl/: run experiments/fetch_gpu_wheels.sh where pip has network" >&2
  exit 2
fi
printf '  %s\n' "${WHEELS[@]}"
run 120 "$OUT/env.txt" "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
    --upgrade --target "$SITE" "${WHEELS[@]}" || { echo "error: installing the wheels failed" >&2; exit 1; }
run 120 "$OUT/env.txt" "$PY" -m pip install -q --no-index --no-deps --no-build-isolation \
    --no-cache-dir --upgrade --target "$SITE" . || { echo "error: installing the package failed" >&2; exit 1; }
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"

# ----------------------------------------------------------------------- 2. environment
say "environment"
run 120 "$OUT/env.txt" "$PY" -c '
import sys, importlib.metadata as md
import jax
print("python", sys.version.split()[0], "jax", jax.__version__, "backend", jax.default_backend())
print("devices", jax.devices())
for n in ("jaxlib", "flax", "optax", "orbax-checkpoint", "clu", "grain", "ml-collections", "numpy"):
    try: print(n, md.version(n))
    except md.PackageNotFoundError: print(n, "missing")
import denseflow_jax.train, denseflow_jax.evaluation, denseflow_jax.sampling
try:
    import denseflow_jax.metric_writer
except ImportError as e:
    print("metric_writer does not import:", e)
print("tensorflow imported:", "tensorflow" in sys.modules)
'
command -v nvidia-smi >/dev/null && run 20 "$OUT/env.txt" nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv

# ----------------------------------------------------------------------- 3. tests
say "tests"
EXISTING=""
for t in $TESTS; do [ -f "$t" ] && EXISTING="$EXISTING $t"; done
LIMIT=$(( $(left) - 380 )); [ "$LIMIT" -gt 120 ] && LIMIT=120
# shellcheck disable=SC2086
run "$LIMIT" "$OUT/tests.log" "$PY" -m pytest -q -p no:cacheprovider --timeout=100 $EXISTING

# ----------------------------------------------------------------------- data of the loop rows
if [ -f .whl/data/cifar10_train_subset.npz ]; then
  LOOP=(--config=configs/tiny.py --loop_data="$REPO/.whl/data/cifar10_train_subset.npz")
elif [ -f ../shared/data/cifar10_train_subset.npz ]; then
  LOOP=(--config=configs/tiny.py --loop_data="$REPO/../shared/data/cifar10_train_subset.npz")
else
  echo "no CIFAR-10 subset in .whl/data or ../shared/data: the 200 steps train the quickstart model on the digits" | tee -a "$OUT/loop.log"
  LOOP=(--config=configs/quickstart.py --loop_data=digits)
fi

# ----------------------------------------------------------------------- 4. benchmark rows
say "accelerator benchmark"
LIMIT=$(( $(left) - 170 ))
run "$LIMIT" "$OUT/bench_accel.log" "$PY" experiments/benchmark.py --mode=accelerator \
    --jobs=step,sample --accel_configs=configs/tiny.py,configs/denseflow_74_10.py,configs/denseflow_45_6.py \
    --accel_sample_configs=configs/denseflow_74_10.py --sample_sizes=128 \
    --deadline_s=$(( LIMIT - 15 )) --out="$OUT/bench_accel.json"

# ----------------------------------------------------------------------- 5. 200 training steps
say "200 training steps, float32 and bfloat16"
LIMIT=$(( $(left) - 10 ))
run "$LIMIT" "$OUT/loop.log" "$PY" experiments/benchmark.py --mode=accelerator --jobs=loop \
    "${LOOP[@]}" --dtypes=float32,bfloat16 --loop_batch_sizes=64 --loop_steps=200 \
    --loop_log_every=20 --deadline_s=$(( LIMIT - 10 )) --out="$OUT/loop.json"

# ----------------------------------------------------------------------- summary
say "summary"
[ "$DRY" = 1 ] && exit 0
"$PY" - "$OUT" <<'PYEOF' 2>&1 | tee "$OUT/summary.txt"
import json, os, sys
out = sys.argv[1]
from denseflow_jax.benchmarking import report
for name in ('bench_accel.json', 'loop.json'):
    path = os.path.join(out, name)
    if not os.path.exists(path):
        print(f'{name}: missing'); continue
    r = json.load(open(path))
    print(report.format_rows(r['rows'], title=f'{name} ({r["meta"]["mode"]})'))
    for row in r['rows']:
        if row['kind'] == 'loop':
            print(f"loop {row['dtype']}: train bpd curve {row['train_bpd_curve']}")
    for s in r['skipped']:
        print(f"skipped {s['row']}: {s['reason']}")
PYEOF
say "done"
