#!/usr/bin/env bash
# GPU validation in one call (contract §8): build, tests, sanitizers, benchmarks, JSON out.
#
#   bash tools/gpu_check.sh            # on a GPU machine: everything (8-11 minutes)
#   bash tools/gpu_check.sh --core     # first call of a lease: build, pytest -m gpu, sanitizers (< 5 min)
#   bash tools/gpu_check.sh --bench    # second call: the benchmarks (the --core build is reused)
#   bash tools/gpu_check.sh --quick    # anywhere (CI, no GPU): the CPU-side parts
#   ... --providers "eager triton cuda sdpa"  # the op benchmarks' providers (this is the default:
#                                           # no torch.compile warm-up; add it to the list to time it)
#
# Made for the lent H200 machine (Python 3.12, torch 2.11, triton 3.6, nvcc 13.0,
# compute-sanitizer, no network): nothing is installed, the package runs from this
# tree (PYTHONPATH), and every result lands in one folder, packed into one file:
#
#   1. versions (python, torch, triton, nvcc, the GPU) and the extension built in place
#      against the torch there (TORCH_CUDA_ARCH_LIST defaults to the GPU's own arch),
#      then msa_fast.build_info();
#   2. pytest -m gpu --maxfail=20 --timeout=120 (every GPU test: the Triton kernels compiled
#      for real, the CUDA mining kernel, against the reference; MSA_FAST_REQUIRE_CUDA_KERNELS=1,
#      so a CUDA kernel the build lost fails its tests instead of skipping them);
#   3. compute-sanitizer, probed on a trivial CUDA program first (a device runtime it refuses
#      is "skipped: unavailable", not a kernel error), then memcheck (with
#      PYTORCH_NO_CUDA_MEMORY_CACHING=1) and racecheck on tools/sanitize_calls.py: one
#      odd-shaped forward + backward per Triton op, and the CUDA mine_pairs kernel per dtype
#      (fp32 / fp16 / bf16 / fp64, with key splits so that the merge kernel runs too);
#   4. bench_auto.py (each op's backends at the model shapes, fp32: the data for the GPU's
#      auto order), inference (bench_inference.py: model.eval() vs the Predictor eager vs
#      CUDA graphs, MOSI aligned and MOSEI unaligned, batch 1 and 64), one training step of
#      every model (bench_train_step.py: eager, auto, bf16 autocast; MOSEI unaligned and MOSI
#      aligned), then every op benchmark at the MOSEI and large-batch shapes in bf16 and then
#      fp32 (--device cuda, the --providers list), pair mining at N = 16,326, D = 877, k = 10
#      and 50 -- the system rows first, so that a spent budget costs fp32 op rows, not them.
#
# Made so that a lease cannot end with nothing to show (the device tool kills a command
# at its timeout and brings back only what is under $OUT by then):
#
#   * a self-deadline, GPU_CHECK_DEADLINE seconds from the start (default 500, under the
#     device tool's 540 s timeout with room for the transfer): every step runs under its
#     own `timeout`, the smaller of its cap and the time left before the deadline, and a
#     step with under 10 s left is skipped, so the script itself ends in time;
#   * after every step the folder is packed again and summary.json rewritten, so a kill
#     between steps loses at most the step in flight;
#   * summary.json records each step as passed / failed / skipped / timed_out (with its
#     exit code, seconds and, when skipped, why), "finished": false until the end.
#
# Output: the folder $GPU_CHECK_OUT (default benchmarks/results/gpu_check), packed
# into gpu_check.tgz beside it; with $OUT set (the device tool's folder, which brings
# back at most 8 files) the folder is a scratch one and $OUT gets the .tgz plus
# summary.json. Steps run on when one fails; the exit status is 0 when no step failed or
# timed out, 1 otherwise, 2 without a GPU (without --quick: one line says so, nothing
# else runs). The benchmarks also share a time budget (BENCH_BUDGET, default 240 s;
# bf16 first). --quick (no GPU needed): a CPU-only build of the extension into a scratch
# folder, pytest -m gpu (which skips without a GPU), and the CPU benchmarks' --quick smoke;
# the GPU-only steps are listed as skipped.
set -uo pipefail
QUICK=0
MODE=full       # full | core (build, tests, sanitizer) | bench (the benchmarks, built once)
# the providers of the op benchmarks on a GPU: no torch.compile warm-up by default (minutes of
# a 15-minute lease for a baseline the CPU tables already show); --providers "... torch.compile" adds it
PROVIDERS=${GPU_CHECK_PROVIDERS:-"eager triton cuda sdpa"}
while [ $# -gt 0 ]; do
  case $1 in
    --quick) QUICK=1 ;;
    --core) MODE=core ;;
    --bench) MODE=bench ;;
    --providers) PROVIDERS=${2:?--providers needs a quoted list, e.g. --providers "eager triton"}; shift ;;
    -h|--help) sed -n '2,/^set -uo/p' "$0" | sed '$d'; exit 0 ;;
    *) echo "gpu_check: unknown argument $1 (expected --quick, --core, --bench, --providers LIST)"; exit 2 ;;
  esac
  shift
done
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
PY=${PYTHON:-python3}
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
start=$(date +%s)
DEADLINE=${GPU_CHECK_DEADLINE:-500}

# GPU_CHECK_DRY_RUN=1: every step prints its command and counts as passed, nothing runs (the
# step order, caps and arguments of a GPU run, reviewable and tested on a machine without one)
DRY=${GPU_CHECK_DRY_RUN:-0}
if [ "$QUICK" = 0 ] && [ "$DRY" != 1 ] && [ "$(timeout 60 "$PY" -c "import torch; print(int(torch.cuda.is_available()))" 2>/dev/null)" != 1 ]; then
  echo "gpu_check: no CUDA GPU here (torch.cuda.is_available() is not True); run with --quick for the CPU-side parts"
  exit 2
fi

if [ -n "${GPU_CHECK_OUT:-}" ]; then DIR=$GPU_CHECK_OUT
elif [ -n "${OUT:-}" ]; then DIR=$(mktemp -d)/gpu_check
else DIR=$ROOT/benchmarks/results/gpu_check; fi
PACK=${OUT:+$OUT/gpu_check.tgz}
PACK=${PACK:-$DIR.tgz}
mkdir -p "$DIR"
declare -A STATUS RCODE SECS WHY
ORDER=()
elapsed() { echo $(( $(date +%s) - start )); }
banner() { printf '\n=== [%4ss] %s\n' "$(elapsed)" "$*"; }

summary() {  # $1: true once every step has run
  {
    printf '{"quick": %s, "mode": "%s", "providers": "%s", "finished": %s, "seconds": %s, "deadline_s": %s, "steps": {' \
      "$([ "$QUICK" = 1 ] && echo true || echo false)" "$MODE" "$PROVIDERS" "$1" "$(elapsed)" "$DEADLINE"
    local sep="" k
    for k in "${ORDER[@]}"; do
      printf '%s\n  "%s": {"status": "%s", "rc": %s, "seconds": %s' "$sep" "$k" "${STATUS[$k]}" \
        "${RCODE[$k]:-null}" "${SECS[$k]:-0}"
      [ -n "${WHY[$k]:-}" ] && printf ', "reason": "%s"' "${WHY[$k]//\"/\'}"
      printf '}'
      sep=","
    done
    printf '\n}}\n'
  } > "$DIR/summary.json.tmp" && mv "$DIR/summary.json.tmp" "$DIR/summary.json"
  tar czf "$PACK.tmp" -C "$(dirname "$DIR")" "$(basename "$DIR")" 2>/dev/null && mv "$PACK.tmp" "$PACK"
  [ -n "${OUT:-}" ] && cp "$DIR/summary.json" "$OUT/summary.json"
  return 0
}

note() {  # name, status, reason: a step that did not run
  STATUS[$1]=$2; WHY[$1]=$3; ORDER+=("$1")
  echo "--- $1: $2 ($3)"
  summary false
}

# run NAME CAP_S CMD...: CMD under `timeout` (the smaller of CAP_S and the time left),
# output to the console and $DIR/NAME.log; status from the exit code, then pack
run() {
  local name=$1 cap=$2; shift 2
  local left=$(( DEADLINE - $(elapsed) - 5 ))
  if [ "$left" -lt 10 ]; then note "$name" skipped "the ${DEADLINE} s deadline is reached"; return; fi
  local limit=$(( cap < left ? cap : left )) t0; t0=$(date +%s)
  banner "$name (timeout ${limit} s)"
  local rc
  if [ "$DRY" = 1 ]; then echo "dry run: $*" | tee "$DIR/$name.log"; rc=0
  else timeout -k 10 "$limit" "$@" 2>&1 | tee "$DIR/$name.log"; rc=${PIPESTATUS[0]}; fi
  RCODE[$name]=$rc; SECS[$name]=$(( $(date +%s) - t0 )); ORDER+=("$name")
  case $rc in
    0) STATUS[$name]=passed ;;
    124|137) STATUS[$name]=timed_out; WHY[$name]="killed after ${limit} s" ;;
    *) STATUS[$name]=failed ;;
  esac
  echo "--- $name: ${STATUS[$name]} (rc $rc, ${SECS[$name]} s)"
  summary false
}

versions() {
  "$PY" - <<'PY'
import platform, torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda)
try:
    import triton
    print("triton", triton.__version__)
except ImportError:
    print("triton not installed")
print("gpu", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none",
      torch.cuda.get_device_capability(0) if torch.cuda.is_available() else "")
PY
  command -v nvcc >/dev/null && nvcc --version | tail -2
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  return 0
}

build() {
  if [ "$QUICK" = 1 ]; then
    # CPU-only, into a scratch folder: the installed extension of this tree stays as it is
    local scratch rc; scratch=$(mktemp -d)
    MSA_FAST_BUILD_CUDA=0 "$PY" setup.py -q build_ext --build-lib "$scratch/lib" --build-temp "$scratch/tmp" \
      > "$DIR/build_output.log" 2>&1
    rc=$?
    [ $rc = 0 ] && ls "$scratch"/lib/msa_fast/_C*.so
    rm -rf "$scratch"
  else
    if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then
      TORCH_CUDA_ARCH_LIST=$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability(0))")
      export TORCH_CUDA_ARCH_LIST
    fi
    MSA_FAST_BUILD_CUDA=1 MAX_JOBS=${MAX_JOBS:-16} "$PY" setup.py build_ext --inplace > "$DIR/build_output.log" 2>&1
    rc=$?
  fi
  [ $rc = 0 ] || tail -40 "$DIR/build_output.log"
  return $rc
}

sanitize() {
  # a probe first: compute-sanitizer refuses some device runtimes outright, which is "the
  # sanitizer is unavailable here", not a kernel error (exit 3: recorded as skipped)
  if ! compute-sanitizer --tool memcheck --error-exitcode 1 "$PY" -c \
      "import torch; x = torch.ones(8, device='cuda'); torch.cuda.synchronize(); print(float((x + 1).sum()))" \
      > "$DIR/sanitizer_probe.log" 2>&1; then
    echo "compute-sanitizer cannot run a trivial CUDA program here (see sanitizer_probe.log):"
    tail -5 "$DIR/sanitizer_probe.log"
    return 3
  fi
  local san_rc=0 tool rc
  for tool in memcheck racecheck; do
    # no caching allocator under memcheck: an overrun inside one of its blocks is invisible.
    # Set only there, not to 0 elsewhere: older torch reads the variable's presence, not its value
    local uncached=(); [ "$tool" = memcheck ] && uncached=(PYTORCH_NO_CUDA_MEMORY_CACHING=1)
    env "${uncached[@]}" MSA_FAST_MINE_PAIRS_SPLITS=2 \
      compute-sanitizer --tool "$tool" --error-exitcode 1 \
      "$PY" tools/sanitize_calls.py --device cuda > "$DIR/sanitizer_$tool.log" 2>&1
    rc=$?
    echo "$tool: rc=$rc $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$DIR/sanitizer_$tool.log" | tr '\n' ' ') $(grep -c ' ok' "$DIR/sanitizer_$tool.log") calls ok"
    [ $rc = 0 ] || san_rc=$rc
  done
  return $san_rc
}

export -f versions build sanitize
export PY DIR QUICK

run versions 60 bash -c versions
# --bench on a machine still warm from a --core call: the extension built there is reused
if [ "$MODE" = bench ] && [ "$QUICK" = 0 ] && [ "$DRY" != 1 ] && "$PY" -c \
    "import msa_fast, sys; i = msa_fast.build_info(); sys.exit(0 if i['extension'] and i['cuda_ops'] else 1)" 2>/dev/null; then
  note build skipped "--bench: the extension built by an earlier call is there and has its CUDA ops"
else
  run build 240 bash -c build
fi
run build_info 60 "$PY" -c "import json, msa_fast; print(json.dumps(msa_fast.build_info()))"
cp "$DIR/build_info.log" "$DIR/build_info.json" 2>/dev/null
# not -x: one failure must not hide the rest; a hung kernel is one test's timeout, not the step's
PYTEST_LIMITS=(--maxfail=20)
"$PY" -c "import pytest_timeout" 2>/dev/null && PYTEST_LIMITS+=(--timeout=120)
# on the device the CUDA kernels must have been built: their tests fail instead of skipping
[ "$QUICK" = 1 ] || export MSA_FAST_REQUIRE_CUDA_KERNELS=1
if [ "$MODE" = bench ]; then note pytest_gpu skipped "--bench (the tests ran with --core)"
else run pytest_gpu 180 "$PY" -m pytest -m gpu -q -p no:cacheprovider "${PYTEST_LIMITS[@]}" --junitxml="$DIR/pytest_gpu.xml"
fi
if [ "$MODE" = bench ]; then note sanitizer skipped "--bench (the sanitizers ran with --core)"
elif [ "$QUICK" = 1 ]; then note sanitizer skipped "--quick"
elif ! command -v compute-sanitizer >/dev/null; then note sanitizer skipped "compute-sanitizer not found"
else
  run sanitizer 150 bash -c sanitize
  if [ "${RCODE[sanitizer]:-}" = 3 ]; then STATUS[sanitizer]=skipped; WHY[sanitizer]="compute-sanitizer unavailable on this device (probe failed)"; summary false; fi
fi

bench_start=$(date +%s)
BUDGET=${BENCH_BUDGET:-240}
bench() {  # name, then the command; the scripts share the time budget
  local name=bench_$1; shift
  local left=$(( BUDGET - ($(date +%s) - bench_start) ))
  if [ "$left" -lt 20 ]; then note "$name" skipped "the ${BUDGET} s benchmark budget is spent"; return; fi
  run "$name" "$left" "$@"
}
read -r -a OP_PROVIDERS <<< "$PROVIDERS"
if [ "$MODE" = core ]; then
  note benchmarks skipped "--core (run --bench in a second call)"
elif [ "$QUICK" = 1 ]; then
  bench auto "$PY" benchmarks/ops/bench_auto.py --quick --device cpu --out "$DIR/auto_cpu.json"
  bench pair_mining "$PY" benchmarks/ops/bench_pair_mining.py --quick --device cpu --out "$DIR/pair_mining_cpu.json"
  for op in dual_gate gap layer_norm attention; do
    # --providers as on the GPU (those this CPU cannot run drop out): the option's plumbing is smoked
    bench "$op" "$PY" "benchmarks/ops/bench_$op.py" --quick --device cpu --providers "${OP_PROVIDERS[@]}" \
      --out "$DIR/${op}_cpu.json"
  done
  bench contrastive "$PY" benchmarks/ops/bench_contrastive.py --quick --device cpu --out "$DIR/contrastive_cpu.json"
  bench train_step "$PY" benchmarks/models/bench_train_step.py --quick --device cpu --out "$DIR/train_step_cpu.json"
  bench inference "$PY" benchmarks/models/bench_inference.py --quick --device cpu --out "$DIR/inference_cpu.json"
else
  # what auto should pick on this GPU: every op at its model shapes, each backend vs eager and
  # SDPA, interleaved (no compiling: its minutes go to the scripts below)
  bench auto "$PY" benchmarks/ops/bench_auto.py --device cuda --no-compile --rounds 3 --seconds 0.2 \
    --out "$DIR/auto_cuda.json"
  # the system numbers before the per-op sweeps: a budget that runs out loses fp32 op rows, not these.
  # inference: model.eval() vs the Predictor eager vs its CUDA graphs (one graph per bucket),
  # fp32, batch 1 and 64 (targets: batch-1 p50 < 1 ms with CUDA graphs and >= 3x eager)
  bench inference "$PY" benchmarks/models/bench_inference.py --device cuda --models agfn fd_cmdie promma lf_dnn \
    --shapes mosi_aligned mosei_unaligned --batches 1 64 \
    --providers eager predictor_eager predictor_cuda_graphs --iters 50 --out "$DIR/inference_cuda.json"
  # one training step of every model at MOSEI unaligned and MOSI aligned: eager fp32, auto, bf16
  # autocast (the trainer's GPU mode); no torch.compile of every model, no 2-rank row on one GPU
  bench train_step "$PY" benchmarks/models/bench_train_step.py --device cuda --shapes mosei_unaligned,mosi_aligned \
    --providers eager auto bf16 --steps 20 --out "$DIR/train_step_cuda.json"
  for dt in bfloat16 float32; do
    bench "dual_gate_$dt" "$PY" benchmarks/ops/bench_dual_gate.py --device cuda --dtype $dt \
      --shapes mosei_b1024,train_b16384 --providers "${OP_PROVIDERS[@]}" --out "$DIR/dual_gate_$dt.json"
    bench "gap_$dt" "$PY" benchmarks/ops/bench_gap.py --device cuda --dtype $dt \
      --shapes mosei_unaligned,train_large --providers "${OP_PROVIDERS[@]}" --out "$DIR/gap_$dt.json"
    bench "layer_norm_$dt" "$PY" benchmarks/ops/bench_layer_norm.py --device cuda --dtype $dt \
      --shapes mosei_unaligned,train_large --providers "${OP_PROVIDERS[@]}" --out "$DIR/layer_norm_$dt.json"
    bench "attention_$dt" "$PY" benchmarks/ops/bench_attention.py --device cuda --dtype $dt \
      --shapes mosei_self_unaligned,train_large,mosei_self_dh128 --providers "${OP_PROVIDERS[@]}" \
      --out "$DIR/attention_$dt.json"
    bench "contrastive_$dt" "$PY" benchmarks/ops/bench_contrastive.py --device cuda --dtype $dt \
      --shapes mosei_b64_k50_d256,large_b1024_k50_d256 --providers "${OP_PROVIDERS[@]}" \
      --out "$DIR/contrastive_$dt.json"
    bench "pair_mining_$dt" "$PY" benchmarks/ops/bench_pair_mining.py --device cuda --dtype $dt --n 16326 --d 877 \
      --k 10 50 --providers eager-chunked triton cuda --out "$DIR/pair_mining_$dt.json"
  done
fi

banner "summary"
summary true
cat "$DIR/summary.json"
echo "packed $PACK"
bad=0
for k in "${ORDER[@]}"; do
  case ${STATUS[$k]} in failed|timed_out) echo "gpu_check: $k ${STATUS[$k]}"; bad=1 ;; esac
done
exit $bad
