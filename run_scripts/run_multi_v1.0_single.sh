#!/usr/bin/env bash
# LucaVirus v1.0 masked-LM pretraining on ONE device (one GPU, or one CPU process), no launcher.
# Variables and their defaults: run_scripts/common.sh; set any of them in the environment.
# The tiny CPU demo:
#   MAX_LENGTH=130 HIDDEN_SIZE=64 NUM_ATTENTION_LAYERS=2 NUM_ATTENTION_HEADS=4 batch_size=4 \
#   gradient_accumulation_steps=1 max_steps=20 warmup_steps=2 PRECISION=fp32 \
#   bash run_scripts/run_multi_v1.0_single.sh
set -euo pipefail
cd "$(dirname "$0")/.."
: "${OUTPUT_DIR:=runs/lucavirus_v1.0_single}"
: "${CUDA_VISIBLE_DEVICES:=0}"
export CUDA_VISIBLE_DEVICES
LAUNCHER=python
source run_scripts/common.sh
lucavirus_overrides
launch train --config lucavirus_v1.0 "${OVERRIDES[@]}"
