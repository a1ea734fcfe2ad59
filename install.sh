#!/usr/bin/env bash
# Installs lucatrain and its dependencies into the current Python environment.
# torch goes first: with no torch present, a plain `pip install torch` would pull a multi-GB CUDA
# build, while torch==2.13.0 has a CPU wheel. An existing torch (e.g. a CUDA build on a GPU box) is kept.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
if ! "$PYTHON" -c "import torch" 2>/dev/null; then
  "$PYTHON" -m pip install -q "torch==2.13.0"
fi
"$PYTHON" -m pip install -q -e ".[test]"
