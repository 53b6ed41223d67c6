#!/usr/bin/env bash
# Fill .whl/ with the wheels tools/gpu_check.py (and tests/gpu) need on a GPU machine that has only
# torch, transformers and triton installed and no package registry. Run it here, where pip can
# reach PyPI, in a Python environment that has torch (e.g. `source .venv/bin/activate`):
#
#     bash tools/gpu_wheels.sh            # everything below
#     bash tools/gpu_wheels.sh --minimal  # without datasets and its data stack (pyarrow, pandas: ~60 MB)
#
# then copy the checkout (with .whl/) to the GPU machine and there:
#
#     python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
#     python3 tools/gpu_check.py
#
# * deepspeed has no wheel on PyPI: one is built from its source release with
#   `pip wheel --no-deps --no-build-isolation deepspeed==0.19.8` (no ops compiled in: DeepSpeed
#   compiles an op on first use; the pipeline uses none of them, its optimizer is torch's fused AdamW).
# * The rest are downloaded as binary wheels for CPython 3.12 on x86-64 Linux (manylinux), without
#   their dependencies (`--no-deps`): the list below is the closure of what the GPU machine lacks.
#   Packages that torch or transformers already bring (numpy, packaging, pyyaml, tqdm, regex,
#   safetensors, tokenizers, huggingface-hub, filelock, fsspec, jinja2, httpx) are left out, so the
#   copies in /tmp/site never shadow the ones torch was built against.
# * Versions are those installed in the Python that runs this script (the environment the test
#   suite passes in), so pydantic and pydantic-core, for one, stay a matching pair; a package not
#   installed here is taken at its newest version.
# Environment: WHEEL_DIR (default .whl), PYTHON (default python3), PY_VERSION (default 3.12).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEST="${WHEEL_DIR:-$ROOT/.whl}"
PYTHON="${PYTHON:-python3}"
PY_VERSION="${PY_VERSION:-3.12}"
DEEPSPEED_VERSION="0.19.8"

minimal=0
for arg in "$@"; do
  case "$arg" in
    --minimal) minimal=1 ;;
    *) echo "gpu_wheels.sh: unknown argument $arg (only --minimal)" >&2; exit 2 ;;
  esac
done

# What the GPU machine lacks, by who needs it.
DEEPSPEED_DEPS="hjson msgpack ninja psutil py-cpuinfo einops pydantic pydantic-core annotated-types
  typing-inspection typing-extensions"
PIPELINE="accelerate protobuf sentencepiece"  # accelerate: loading a model shard by shard under ZeRO-3
PIPELINE="$PIPELINE liger-kernel"  # student.liger_*: pure Python over torch and triton (both on the GPU machine)
TEKKEN="tiktoken mistral-common requests urllib3 idna certifi charset-normalizer jsonschema
  jsonschema-specifications referencing rpds-py attrs pillow pydantic-extra-types"
TESTS="pytest pluggy iniconfig pytest-timeout"
DATASETS="datasets dill multiprocess xxhash pyarrow pandas python-dateutil six tzdata"
PACKAGES="$DEEPSPEED_DEPS $PIPELINE $TEKKEN $TESTS"
[ "$minimal" = 1 ] || PACKAGES="$PACKAGES $DATASETS"

if ! "$PYTHON" -c "import torch" 2>/dev/null; then
  echo "gpu_wheels.sh: $PYTHON has no torch; DeepSpeed's build imports it. Activate the project's" \
       "environment first (source .venv/bin/activate) or set PYTHON=/path/to/python" >&2
  exit 2
fi
mkdir -p "$DEST"
printf '*\n' > "$DEST/.gitignore"  # the folder ignores itself: wheels never reach git

# name==version as installed here, else the bare name (newest)
pins=$("$PYTHON" - $PACKAGES <<'EOF'
import sys
from importlib.metadata import PackageNotFoundError, version
out = []
for name in sys.argv[1:]:
    try:
        out.append(f"{name}=={version(name)}")
    except PackageNotFoundError:
        out.append(name)
print(" ".join(out))
EOF
)

echo "building deepspeed==$DEEPSPEED_VERSION (no wheel on PyPI) into $DEST"
DS_BUILD_OPS=0 "$PYTHON" -m pip wheel -q --no-deps --no-build-isolation -w "$DEST" "deepspeed==$DEEPSPEED_VERSION"

echo "downloading cp${PY_VERSION/./} manylinux wheels into $DEST: $pins"
# shellcheck disable=SC2086
"$PYTHON" -m pip download -q --only-binary=:all: --no-deps --dest "$DEST" \
  --python-version "$PY_VERSION" --implementation cp --abi "cp${PY_VERSION/./}" --abi abi3 --abi none \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
  $pins

count=$(find "$DEST" -maxdepth 1 -name '*.whl' | wc -l)
size=$(du -sh "$DEST" | cut -f1)
echo "$DEST: $count wheels, $size. On the GPU machine:"
echo "  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site"
