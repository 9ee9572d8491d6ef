#!/usr/bin/env bash
# Verifies the CUDA path on a machine with an NVIDIA GPU in one go (sized for one H200: under 8 minutes):
# builds deformable._C for that GPU, runs the CUDA tests, benchmarks the op against its memory floor, CoPE offsets
# against linear ones, and the detector against the PyTorch path and transformers' Deformable DETR, and trains the
# demo for 2 epochs.
#
#   tools/gpu_check.sh OUTDIR [WHEELDIR]
#
# OUTDIR gets these 8 files and nothing else: report.md (tools/benchmarks/gpu_report.py), steps.tsv (each step's
# status and seconds), build.log, tests.log, bench.log, bench_op.json, bench_detector.json, train.log.
# WHEELDIR: wheels installed first with pip --target /tmp/site, which goes on PYTHONPATH (pycocotools for training).
#
# Each step runs under `timeout`, with its own limit cut to what is left of GPU_CHECK_BUDGET (default 465 s); a
# failing step does not stop the later ones. Exit status: 0 when every step passed, 1 when any failed, timed out or
# was skipped for lack of time, 2 on bad arguments. Environment: PYTHON (default python3), MAX_JOBS (default 16),
# TORCH_CUDA_ARCH_LIST (default: the GPU's compute capability), CUDA_HOME (default: where nvcc is, else torch's).
# Nothing in CI runs this script: it needs a GPU.
set -u

usage() {
  echo "usage: $0 OUTDIR [WHEELDIR]" >&2
  echo "  runs the GPU verification, writing its logs and report.md into OUTDIR (see the script's header)" >&2
}

if [ $# -eq 1 ] && { [ "$1" = "-h" ] || [ "$1" = "--help" ]; }; then
  usage
  exit 0
fi
if [ $# -lt 1 ] || [ $# -gt 2 ] || [ -z "$1" ]; then
  usage
  exit 2
fi
WHEELDIR=${2:-}
if [ -n "$WHEELDIR" ]; then
  if [ ! -d "$WHEELDIR" ]; then
    echo "error: WHEELDIR '$WHEELDIR' does not exist or is not a folder" >&2
    exit 2
  fi
  if ! compgen -G "$WHEELDIR/*.whl" >/dev/null; then
    echo "error: WHEELDIR '$WHEELDIR' holds no .whl files" >&2
    exit 2
  fi
  WHEELDIR=$(cd "$WHEELDIR" && pwd)
fi
if ! mkdir -p "$1"; then
  echo "error: cannot create OUTDIR '$1'" >&2
  exit 2
fi
OUTDIR=$(cd "$1" && pwd)
cd "$(dirname "$0")/.." || exit 2 # the repository root
# The tools import the package from this checkout even before (or without) the editable install of step b.
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}

PYTHON=${PYTHON:-python3}
BUDGET=${GPU_CHECK_BUDGET:-465}
if ! [[ $BUDGET =~ ^[0-9]+$ ]]; then
  echo "error: GPU_CHECK_BUDGET must be a number of seconds, got '$BUDGET'" >&2
  exit 2
fi
STEPS=$OUTDIR/steps.tsv
BUILD_LOG=$OUTDIR/build.log
TESTS_LOG=$OUTDIR/tests.log
BENCH_LOG=$OUTDIR/bench.log
TRAIN_LOG=$OUTDIR/train.log
TRAIN_DIR=/tmp/gpu_check_train
FAILED=0
START=$SECONDS
rm -f "$STEPS" "$BUILD_LOG" "$TESTS_LOG" "$BENCH_LOG" "$TRAIN_LOG" \
  "$OUTDIR/bench_op.json" "$OUTDIR/bench_detector.json" "$OUTDIR/report.md"

# run_step NAME LIMIT_S LOG OK_CODES WHAT -- COMMAND...: runs COMMAND under timeout, its output appended to LOG after
# a "### step NAME: COMMAND" line, and records the step in steps.tsv. OK_CODES: exit codes that count as a pass.
run_step() {
  local name=$1 want=$2 log=$3 ok=$4 what=$5
  shift 6
  local left=$((BUDGET - (SECONDS - START)))
  local limit=$((want < left ? want : left))
  echo "### step $name: $*" >>"$log"
  if [ "$limit" -lt 5 ]; then
    echo "skipped: the time budget of ${BUDGET} s is spent" >>"$log"
    record "$name" skipped - 0 "$want" "$what"
    return 1
  fi
  local began rc status seconds
  began=$(now_us)
  timeout --kill-after=10 "$limit" "$@" >>"$log" 2>&1
  rc=$?
  local us=$(($(now_us) - began))
  printf -v seconds '%d.%d' $((us / 1000000)) $((us % 1000000 / 100000))
  if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
    status=timeout
  elif [[ " $ok " == *" $rc "* ]]; then
    status=pass
  else
    status=fail
  fi
  record "$name" "$status" "$rc" "$seconds" "$limit" "$what"
  [ "$status" = pass ]
}

# now_us: microseconds since the epoch (whole seconds on a bash without EPOCHREALTIME).
now_us() {
  if [ -n "${EPOCHREALTIME:-}" ]; then
    echo "${EPOCHREALTIME/[.,]/}"
  else
    echo $((SECONDS * 1000000))
  fi
}

# record NAME STATUS RC SECONDS LIMIT WHAT: one line of steps.tsv, and one of progress on stdout.
record() {
  printf 'step\t%s\t%s\t%s\t%s\t%s\t%s\n' "$@" >>"$STEPS"
  echo "gpu_check: $1: $2 ($4 s)"
  [ "$2" = pass ] || FAILED=1
}

info() {
  printf 'info\t%s\t%s\n' "$1" "$2" >>"$STEPS"
}

# a. Wheels, the GPU, torch and CUDA.
if [ -n "$WHEELDIR" ]; then
  if run_step wheels 60 "$BUILD_LOG" 0 "install $WHEELDIR/*.whl into /tmp/site" -- \
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    "$WHEELDIR"/*.whl; then
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  fi
fi
# shellcheck disable=SC2016  # expanded by the inner bash
run_step machine 60 "$BUILD_LOG" 0 "nvidia-smi, torch and CUDA versions" -- bash -c '
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; smi=$?
  "$1" -c "import torch
print(\"torch_version=\" + torch.__version__)
print(\"cuda_version=\" + str(torch.version.cuda))
print(\"cuda_available=\" + str(torch.cuda.is_available()))
print(\"capability=%d.%d\" % torch.cuda.get_device_capability())" && [ "$smi" -eq 0 ]' _ "$PYTHON"
info gpu "$(timeout 20 nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null |
  head -n 1)"
info torch "$(sed -n 's/^torch_version=//p' "$BUILD_LOG" | tail -n 1)"
info cuda "$(sed -n 's/^cuda_version=//p' "$BUILD_LOG" | tail -n 1)"
ARCH=${TORCH_CUDA_ARCH_LIST:-$(sed -n 's/^capability=//p' "$BUILD_LOG" | tail -n 1)}
ARCH=${ARCH:-9.0}

# b. Build in place for this GPU only, against the torch installed here; then the diagnosis must show a CUDA kernel.
if [ -z "${CUDA_HOME:-}" ] && command -v nvcc >/dev/null 2>&1; then
  # nvcc may be a wrapper script: ask it where the toolkit really is.
  top=$(nvcc --dryrun -c -x cu /dev/null 2>&1 | sed -n 's/^#\$ TOP=//p' | head -n 1)
  CUDA_HOME=$(cd "${top:-$(dirname "$(command -v nvcc)")/..}" && pwd)
  export CUDA_HOME
fi
nvcc_version=$(command -v nvcc >/dev/null 2>&1 && nvcc --version | tail -n 1)
info nvcc "${nvcc_version:-not found}, CUDA_HOME=${CUDA_HOME:-unset, torch finds it}"
run_step build 180 "$BUILD_LOG" 0 "pip install -e . (TORCH_CUDA_ARCH_LIST=$ARCH)" -- \
  env TORCH_CUDA_ARCH_LIST="$ARCH" MAX_JOBS="${MAX_JOBS:-16}" FORCE_CUDA=1 \
  "$PYTHON" -m pip install -v --no-build-isolation --no-deps --no-index -e .
# shellcheck disable=SC2016  # expanded by the inner bash
run_step diagnose 30 "$BUILD_LOG" 0 "python -m deformable reports a CUDA kernel" -- bash -c '
  out=$("$1" -m deformable 2>&1); rc=$?; echo "$out"
  [ "$rc" -eq 0 ] && grep -q "cuda kernel: yes" <<<"$out"' _ "$PYTHON"

# c. The CUDA tests: test_ops_cuda.py whole, the build check, and any test marked cuda elsewhere (5: none there).
run_step tests_ops 120 "$TESTS_LOG" 0 "pytest tests/test_ops_cuda.py + test_cuda_kernel_is_built" -- \
  "$PYTHON" -m pytest -q -rfE -p no:cacheprovider tests/test_ops_cuda.py \
  tests/test_ops_autograd.py::test_cuda_kernel_is_built
# Only the files that mark a test cuda are collected: the others may import what the device image lacks (matplotlib).
# shellcheck disable=SC2016  # expanded by the inner bash
run_step tests_marked 45 "$TESTS_LOG" "0 5" "pytest -m cuda, in the other files marking tests cuda" -- bash -c '
  files=$(grep -l "mark.cuda" tests/test_*.py | grep -v "^tests/test_ops_cuda.py$")
  [ -n "$files" ] || exit 5
  # shellcheck disable=SC2086  # one argument per file
  exec "$1" -m pytest -q -rfE -p no:cacheprovider -m cuda $files' _ "$PYTHON"

# d. The op on the encoder shape: native vs PyTorch, fp32 and bf16, CUDA events, against the memory floor.
run_step bench_op 60 "$BENCH_LOG" 0 "tools/benchmarks/benchmark_op.py --device cuda, encoder shape" -- \
  "$PYTHON" tools/benchmarks/benchmark_op.py --device cuda --shapes encoder --batch 1,2 --dtypes float32,bfloat16 \
  --locations realistic,uniform --iters 30 --warmup 5 --json "$OUTDIR/bench_op.json"

# e. CoPE offsets against linear ones, the module at encoder and decoder shapes (issue 17's table, on CUDA).
run_step bench_cope 45 "$BENCH_LOG" 0 "tools/benchmarks/benchmark_cope.py --device cuda" -- \
  "$PYTHON" tools/benchmarks/benchmark_cope.py --device cuda --batch 2 --repeats 10 --warmup 3

# f. The detector: ours (native, PyTorch path) and transformers', training at batch 2 and inference at batch 1.
run_step bench_detector 120 "$BENCH_LOG" 0 "tools/benchmarks/benchmark_detector.py, configs/coco.yaml" -- \
  "$PYTHON" tools/benchmarks/benchmark_detector.py --config configs/coco.yaml --devices cuda \
  --backends native,transformers,pytorch --amp none,bf16 --train-shape 2x800x1333 --infer-shapes 1x800x1333 \
  --iters 10 --warmup 3 --no-shares --json "$OUTDIR/bench_detector.json"

# g. The demo, trained for 2 epochs on the GPU; its checkpoints stay in /tmp, log.jsonl's tail goes to train.log.
rm -rf "$TRAIN_DIR"
run_step train 90 "$TRAIN_LOG" 0 "tools/train.py configs/shapes.yaml, 2 epochs" -- \
  "$PYTHON" tools/train.py configs/shapes.yaml train.epochs=2 train.device=cuda "output_dir=$TRAIN_DIR" \
  data.root=/tmp/gpu_check_shapes
if [ -f "$TRAIN_DIR/log.jsonl" ]; then
  echo "### tail of $TRAIN_DIR/log.jsonl" >>"$TRAIN_LOG"
  tail -n 5 "$TRAIN_DIR/log.jsonl" >>"$TRAIN_LOG"
fi

# The report, from the files above; a plain one from steps.tsv if the generator itself fails.
if ! timeout 60 "$PYTHON" tools/benchmarks/gpu_report.py "$OUTDIR" --train-log "$TRAIN_DIR/log.jsonl" \
  >>"$BENCH_LOG" 2>&1; then
  FAILED=1
  {
    echo "# GPU check"
    echo
    echo "tools/benchmarks/gpu_report.py failed (see the end of bench.log); the steps as recorded:"
    echo
    echo '```'
    cat "$STEPS"
    echo '```'
  } >"$OUTDIR/report.md"
fi
cat "$OUTDIR/report.md"
echo "gpu_check: $((SECONDS - START)) s, $([ "$FAILED" -eq 0 ] && echo 'every step passed' || echo 'FAILED')"
exit "$FAILED"
