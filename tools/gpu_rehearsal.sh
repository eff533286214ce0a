#!/usr/bin/env bash
# Device-image rehearsal: the lent GPU machine's software, on this CPU, before a GPU minute is spent.
#
#   bash tools/gpu_rehearsal.sh                 # venv (made once), tests, compile gate, gpu_check --quick
#   REHEARSAL_STEPS=tests bash tools/gpu_rehearsal.sh   # a subset: any of venv,build,tests,gate,quick
#
# The device (tools/gpu_check.sh's target) runs Python 3.12 with torch 2.11.0+cu130,
# Triton 3.6.0 and numpy 2.5.2 and has no network, while CI and the developers' machines
# run the project's own newer pins (torch 2.14.1, Triton 3.8). Version drift between the
# two has cost a GPU lease before (Triton 3.6's interpreter rejecting a loop bound that 3.8
# took), so this script rebuilds the device's package set here and runs, against it:
#
#   1. a virtual environment outside the repository ($REHEARSAL_VENV, default
#      ~/.cache/msa_fast_rehearsal/venv; reused while its stamp matches the pins below):
#      torch==2.11.0 (PyPI's default Linux wheel, the cu130 build the device has; it runs
#      on a CPU), triton==3.6.0, the nearest numpy to the device's 2.5.2 that this Python
#      gets (2.5 needs Python >= 3.12: 2.4.6 on 3.11), and the device's other test-relevant
#      packages -- deliberately NOT the serve / ONNX-export extras (starlette, uvicorn,
#      pydantic, onnx, onnxscript, tritonclient, litserve), which the device lacks, so the
#      tests that need them must skip with a reason rather than fail;
#   2. a copy of the tree (git's tracked + untracked-not-ignored files, i.e. what the device
#      tool sends) with the C++ extension built in place, CPU-only, against torch 2.11 --
#      as gpu_check.sh builds it on the device, minus CUDA (the extension built here for
#      torch 2.14 would not load in torch 2.11); REHEARSAL_BUILD_EXT=0 skips the build and
#      the tests of the cpp backend then skip;
#   3. the whole test suite with TRITON_INTERPRET=1 (REHEARSAL_JOBS workers, default 2;
#      REHEARSAL_TESTS: pytest paths / -k instead of the whole suite, e.g. the Triton
#      kernels' files for a shorter run);
#   4. the compile gate with Triton 3.6 (tools/compile_gate.py; REHEARSAL_GATE_ARGS,
#      default --no-cuda: the CUDA sources' check does not depend on Triton and CI runs it
#      with its own build; --quick for a smoke);
#   5. bash tools/gpu_check.sh --quick with the venv's python.
#
# Installing (step 1) is the only step that needs the package registry; the rest is offline,
# like the device. Logs go to $REHEARSAL_OUT (default ~/.cache/msa_fast_rehearsal/last);
# the last line is one summary ("rehearsal: N passed, N skipped, N failed; ..."), and the
# exit status is 1 when any step failed.
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BASE=${REHEARSAL_BASE:-$HOME/.cache/msa_fast_rehearsal}
VENV=${REHEARSAL_VENV:-$BASE/venv}
OUTDIR=${REHEARSAL_OUT:-$BASE/last}
STEPS=${REHEARSAL_STEPS:-venv,build,tests,gate,quick}
JOBS=${REHEARSAL_JOBS:-2}
# Python 3.12 as on the device when one runs here (a pyenv shim may exist and fail: try it)
PYTHON_BASE=${REHEARSAL_PYTHON:-$(python3.12 -c 'import sys; print(sys.executable)' 2>/dev/null || command -v python3)}
start=$(date +%s)
mkdir -p "$OUTDIR"
declare -A RESULT
ORDER=()
step() { printf '\n=== [%4ss] %s\n' "$(( $(date +%s) - start ))" "$*"; }
want() { [[ ",$STEPS," == *",$1,"* ]]; }
record() { RESULT[$1]=$2; ORDER+=("$1"); echo "--- $1: $2"; }

# the device's numpy is 2.5.2; numpy 2.5 has no wheel for Python < 3.12
pyver=$("$PYTHON_BASE" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
if [ "$pyver" = "3.11" ] || [ "$pyver" = "3.10" ]; then NUMPY=${REHEARSAL_NUMPY:-numpy==2.4.6}
else NUMPY=${REHEARSAL_NUMPY:-numpy==2.5.2}; fi
# the device's versions where KINDS.md lists them (transformers, safetensors, onnxruntime),
# the rest unpinned; psutil, pyyaml, tqdm, pybind11, ninja, setuptools and wheel are in the
# device image too
PINS=(torch==2.11.0 triton==3.6.0 "$NUMPY" transformers==5.17.0 safetensors==0.8.0 onnxruntime==1.30.0
      pytest pytest-xdist pytest-timeout hypothesis scikit-learn matplotlib prometheus-client psutil
      pyyaml tqdm pybind11 ninja setuptools wheel)
# in no device image: removed again when a dependency pulls one in (typer pulls pydantic)
ABSENT=(pydantic pydantic-core starlette fastapi uvicorn litserve onnx onnxscript tritonclient)
STAMP="$VENV/.msa_fast_rehearsal_pins"

if want venv; then
  step "virtual environment $VENV (python $pyver)"
  if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "${PINS[*]}" ] && [ -x "$VENV/bin/python" ]; then
    echo "reused (pins unchanged)"
    record venv passed
  else
    # pip moves an existing venv to changed pins without re-downloading the rest
    { [ -x "$VENV/bin/python" ] || "$PYTHON_BASE" -m venv "$VENV"; } \
      && "$VENV/bin/python" -m pip install -q "${PINS[@]}" > "$OUTDIR/venv.log" 2>&1 \
      && "$VENV/bin/python" -m pip uninstall -q -y "${ABSENT[@]}" >> "$OUTDIR/venv.log" 2>&1 \
      && printf '%s' "${PINS[*]}" > "$STAMP"
    rc=$?
    [ $rc = 0 ] && record venv passed || { tail -30 "$OUTDIR/venv.log"; record venv failed; }
  fi
fi
PY=$VENV/bin/python
if [ ! -x "$PY" ]; then echo "no virtual environment at $VENV: run with the venv step first"; exit 1; fi
"$PY" - <<'PY' | tee "$OUTDIR/versions.txt"
import platform, numpy, torch, triton
print("python", platform.python_version(), "torch", torch.__version__, "triton", triton.__version__,
      "numpy", numpy.__version__)
PY

# a copy of what the device tool sends: tracked and untracked-not-ignored files
TREE=$BASE/tree
step "tree copy $TREE"
rm -rf "$TREE" && mkdir -p "$TREE"
(cd "$ROOT" && git ls-files -z -co --exclude-standard | xargs -0 -r tar cf - --ignore-failed-read) \
  | tar xf - -C "$TREE"
cd "$TREE" || exit 1

if want build && [ "${REHEARSAL_BUILD_EXT:-1}" != 0 ]; then
  step "build the extension, CPU-only, in place against torch 2.11"
  MSA_FAST_BUILD_CUDA=0 "$PY" setup.py -q build_ext --inplace > "$OUTDIR/build.log" 2>&1
  rc=$?
  [ $rc = 0 ] && record build passed || { tail -30 "$OUTDIR/build.log"; record build failed; }
  "$PY" -c "import json, msa_fast; print(json.dumps(msa_fast.build_info()))" 2>&1 | tail -1
elif want build; then
  record build "skipped (REHEARSAL_BUILD_EXT=0)"
fi
export PYTHONPATH=$TREE PYTHONUNBUFFERED=1

counts=""
if want tests; then
  step "tests: TRITON_INTERPRET=1 pytest -n $JOBS"
  # shellcheck disable=SC2086
  TRITON_INTERPRET=1 "$PY" -m pytest -q -n "$JOBS" -p no:cacheprovider --junitxml="$OUTDIR/pytest.xml" \
    ${REHEARSAL_TESTS:-} > "$OUTDIR/pytest.log" 2>&1
  rc=$?
  tail -25 "$OUTDIR/pytest.log"
  counts=$(grep -E '[0-9]+ (passed|failed|error).* in [0-9.]+s' "$OUTDIR/pytest.log" | tail -1 | tr -d '=' | xargs)
  [ $rc = 0 ] && record tests passed || record tests failed
fi

if want gate; then
  step "compile gate with triton $("$PY" -c 'import triton; print(triton.__version__)')"
  # shellcheck disable=SC2086
  "$PY" tools/compile_gate.py --out "$OUTDIR/gate" ${REHEARSAL_GATE_ARGS---no-cuda} > "$OUTDIR/gate.log" 2>&1
  rc=$?
  grep -E '^FAIL|kernel rows' "$OUTDIR/gate.log" | tail -20
  [ $rc = 0 ] && record gate passed || record gate failed
fi

if want quick; then
  step "gpu_check.sh --quick"
  PYTHON=$PY GPU_CHECK_OUT=$OUTDIR/gpu_check bash tools/gpu_check.sh --quick > "$OUTDIR/gpu_check.log" 2>&1
  rc=$?
  tail -5 "$OUTDIR/gpu_check.log"
  [ $rc = 0 ] && record quick passed || record quick failed
fi

secs=$(( $(date +%s) - start ))
line="rehearsal: ${counts:-tests not run}; $(for k in "${ORDER[@]}"; do printf '%s %s, ' "$k" "${RESULT[$k]}"; done)${secs} s"
echo "$line" | tee "$OUTDIR/summary.txt"
for k in "${ORDER[@]}"; do [ "${RESULT[$k]}" = failed ] && exit 1; done
exit 0
