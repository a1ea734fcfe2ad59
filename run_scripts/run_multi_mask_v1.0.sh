#!/usr/bin/env bash
# LucaVirus v1.0 masked-LM pretraining (gene_mask + prot_mask) on all local devices via deepspeed.
# Variables and their defaults: run_scripts/common.sh; set any of them in the environment.
# The tiny CPU demo with two processes:
#   MAX_LENGTH=130 HIDDEN_SIZE=64 NUM_ATTENTION_LAYERS=2 NUM_ATTENTION_HEADS=4 batch_size=4 \
#   gradient_accumulation_steps=1 max_steps=20 warmup_steps=2 PRECISION=fp32 nproc_per_node=2 \
#   bash run_scripts/run_multi_mask_v1.0.sh
set -euo pipefail
cd "$(dirname "$0")/.."
: "${OUTPUT_DIR:=runs/lucavirus_v1.0_mask}"
source run_scripts/common.sh
lucavirus_overrides
launch train --config lucavirus_v1.0 tasks.names="[gene_mask, prot_mask]" "${OVERRIDES[@]}"
