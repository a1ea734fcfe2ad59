#!/usr/bin/env bash
# Prepares .whl/: what bench/gpu_check.sh installs on a GPU machine that cannot reach a package
# registry, for its Python (default 3.12, the device machine's; PYTHON_VERSION=3.11 etc.). Run it here,
# where pip reaches the registry, in the repository root:
#   bash bench/make_wheelhouse.sh
# It holds the packages lucatrain needs that such a machine's image lacks (DeepSpeed, built here as a
# pure-Python wheel: its CUDA ops are JIT-built there only if used, and lucatrain uses torch's AdamW;
# pydantic (with the typing-extensions it needs) and hjson, which DeepSpeed needs; Biopython; bitsandbytes for the QLoRA test). torch and the
# rest stay the machine's own. Kept under 60 MB; the script says how much it holds.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON_VERSION=${PYTHON_VERSION:-3.12}
DEEPSPEED_VERSION=${DEEPSPEED_VERSION:-0.19.8}
out=.whl
rm -rf "$out" && mkdir -p "$out"
grep -qx "/.whl/" .git/info/exclude 2>/dev/null || echo "/.whl/" >> .git/info/exclude
platforms=()
for n in 17 24 27 28 31 34; do platforms+=(--platform "manylinux_2_${n}_x86_64"); done
platforms+=(--platform manylinux2014_x86_64 --platform manylinux1_x86_64)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PYTHON_VERSION" --implementation cp \
  "${platforms[@]}" -d "$out" \
  pydantic pydantic-core annotated-types typing-inspection typing-extensions hjson biopython bitsandbytes
# DeepSpeed is published as source: a wheel of its Python code, no ops compiled (DS_BUILD_OPS=0).
DS_BUILD_OPS=0 python3 -m pip wheel -q --no-deps --no-build-isolation "deepspeed==${DEEPSPEED_VERSION}" -w "$out"
size=$(du -sm "$out" | cut -f1)
echo "$out: $(ls "$out" | wc -l) wheels, ${size} MB"
ls -1 "$out"
if (( size > 60 )); then echo "make_wheelhouse: $out is ${size} MB, over 60 MB" >&2; exit 1; fi
