#!/usr/bin/env bash
# LucaVirus v1.0 pretraining on the gene tasks only: gene_mask, gene_type, gene_taxonomy.
# Protein records in the inputs are left out of the epochs (no selected task scores them).
# Variables and their defaults: run_scripts/common.sh; set any of them in the environment.
# The tiny CPU demo on the shipped sample, two processes:
#   TINY=1 bash run_scripts/run_multi_v1.0_gene.sh
set -euo pipefail
cd "$(dirname "$0")/.."
: "${OUTPUT_DIR:=runs/lucavirus_v1.0_gene}"
: "${pretrain_task_level_name:=gene_mask,gene_type,gene_taxonomy}"
source run_scripts/common.sh
lucavirus_overrides
launch train --config lucavirus_v1.0 "${OVERRIDES[@]}"
