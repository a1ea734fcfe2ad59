#!/usr/bin/env bash
# LucaVirus v1.0 masked-LM pretraining (gene_mask + prot_mask) on all local devices via deepspeed.
# Variables and their defaults: run_scripts/common.sh; set any of them in the environment.
# The tiny CPU demo with two processes:
#   TINY=1 bash run_scripts/run_multi_mask_v1.0.sh
set -euo pipefail
cd "$(dirname "$0")/.."
: "${OUTPUT_DIR:=runs/lucavirus_v1.0_mask}"
: "${pretrain_task_level_type:=token_level}"
: "${pretrain_task_level_name:=gene_mask,prot_mask}"
source run_scripts/common.sh
lucavirus_overrides
launch train --config lucavirus_v1.0 "${OVERRIDES[@]}"
