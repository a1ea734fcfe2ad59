#!/usr/bin/env bash
# The GPU check, on a machine with NVIDIA GPUs and no package registry (e.g. the device machine):
# keeps its own CUDA torch, installs what lucatrain needs from .whl/ (prepared beforehand, elsewhere,
# by `bash bench/make_wheelhouse.sh`), runs the gpu-marked tests, then measures bf16 training MFU of
# the LucaVirus size (bench/gpu_mfu.py: ZeRO-2 and ZeRO-3, with and without activation checkpointing)
# and prints one table; JSON and logs go to ${OUT:-bench/out}. Fails loudly, never falls back to the CPU.
#   bash bench/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-bench/out}
mkdir -p "$out"
started=$(date +%s)
python3 - <<'PY'
import sys
import torch
if not torch.cuda.is_available():
    sys.exit("gpu_check: torch sees no CUDA device (torch %s); this check never runs on the CPU" % torch.__version__)
print(f"gpu_check: torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.device_count()} x {torch.cuda.get_device_name()}")
PY
if [[ ! -d .whl ]] || ! compgen -G ".whl/*.whl" > /dev/null; then
  echo "gpu_check: .whl/ holds no wheels; prepare it where pip reaches a registry: bash bench/make_wheelhouse.sh" >&2
  exit 2
fi
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH="$PWD:/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
python3 -c "import deepspeed, lucatrain; print('gpu_check: deepspeed', deepspeed.__version__)"
set -o pipefail
python3 -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider 2>&1 | tee "$out/gpu_tests.log"
PYTHONUNBUFFERED=1 python3 bench/gpu_mfu.py --out "$out/gpu_mfu.json" 2>&1 | tee "$out/gpu_mfu.log"
echo "gpu_check: done in $(( $(date +%s) - started )) s"
