#!/usr/bin/env bash
# One-GPU benchmark: tools/bench_gpu.py with the environment it needs on a bare
# GPU image. Run from anywhere; it works in the repository root.
#
#   tools/bench_gpu.sh --out=DIR               # one H100/H200: every figure, under 8 minutes
#   tools/bench_gpu.sh --smoke --out=DIR       # CPU: the same code at tiny shapes (~15 s)
#   tools/bench_gpu.sh fetch-wheels            # where pip reaches PyPI: fill .whl/ (below)
#
# Packages. The benchmark needs jax (with its CUDA plugin), flax, optax, orbax-checkpoint,
# absl-py, numpy, ml-dtypes, jinja2, msgpack, etils and PyYAML, which a GPU image with JAX
# usually has, plus two it may not: grain (imported by jaxdistill's data pipeline, which the
# train step's module imports) and ml-collections (configs/base.py, where the optimizer and
# train defaults live). Neither is avoidable without changing library imports, so they
# travel as wheels: `fetch-wheels` downloads grain, array-record and portpicker (grain's
# needs that such an image lacks) and ml-collections for CPython 3.12 on x86-64 Linux into
# .whl/ (git-ignored); copy .whl/ beside the checkout on the GPU machine, and this script
# installs them into a temporary directory (no network, nothing else upgraded) when an
# import fails. PYTHON, PY_VERSION and WHEEL_DIR override the interpreter, the target
# Python version of fetch-wheels and the wheel folder.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
WHEEL_DIR=${WHEEL_DIR:-.whl}
# Versions this repository was tested with (its .venv); grain needs array-record>=0.8.1.
WHEELS=(grain==0.2.18 array_record==0.8.6 portpicker==1.6.0 ml_collections==1.1.0)

if [[ ${1:-} == fetch-wheels ]]; then
  platforms=()
  for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 \
           manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
    platforms+=(--platform "$p")
  done
  exec "$PYTHON" -m pip download --no-deps --only-binary=:all: \
      --python-version "${PY_VERSION:-3.12}" --implementation cp "${platforms[@]}" \
      -d "$WHEEL_DIR" "${WHEELS[@]}"
fi

if ! "$PYTHON" -c "import grain, ml_collections" 2>/dev/null; then
  files=()
  for spec in "${WHEELS[@]}"; do  # these wheels only: the folder may hold others
    found=("$WHEEL_DIR/${spec%%==*}-${spec#*==}"-*.whl)
    if [[ ! -e ${found[0]} ]]; then
      echo "bench_gpu.sh: grain or ml-collections is missing and $WHEEL_DIR/ has no wheel of" \
           "$spec; run 'tools/bench_gpu.sh fetch-wheels' where pip reaches PyPI and bring" \
           "$WHEEL_DIR/ along" >&2
      exit 1
    fi
    files+=("${found[0]}")
  done
  site=$(mktemp -d "${TMPDIR:-/tmp}/bench-gpu-site.XXXXXX")
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
      --target "$site" "${files[@]}"
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi

# The figures' processes print as they go; most of the GPU's memory goes to the one running.
export PYTHONUNBUFFERED=1
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.95}
exec "$PYTHON" tools/bench_gpu.py "$@"
