#!/usr/bin/env bash
# LucaVirus v1.0 masked-LM pretraining on ONE device (one GPU, or one CPU process), no launcher.
# Variables and their defaults: run_scripts/common.sh; set any of them in the environment.
# Other tasks: set pretrain_task_level_name (see run_multi_v1.0.sh). The tiny CPU demo:
#   TINY=1 bash run_scripts/run_multi_v1.0_single.sh
set -euo pipefail
cd "$(dirname "$0")/.."
: "${OUTPUT_DIR:=runs/lucavirus_v1.0_single}"
: "${CUDA_VISIBLE_DEVICES:=0}"
export CUDA_VISIBLE_DEVICES
LAUNCHER=python
source run_scripts/common.sh
lucavirus_overrides
launch train --config lucavirus_v1.0 "${OVERRIDES[@]}"
