#!/usr/bin/env bash
# LucaVirus v1.0 pretraining on the protein tasks only: prot_mask, prot_homo, prot_site, prot_domain,
# prot_taxonomy, prot_keyword. Gene records in the inputs are left out of the epochs.
# Variables and their defaults: run_scripts/common.sh; set any of them in the environment.
# The tiny CPU demo on the shipped sample, two processes:
#   TINY=1 bash run_scripts/run_multi_v1.0_prot.sh
set -euo pipefail
cd "$(dirname "$0")/.."
: "${OUTPUT_DIR:=runs/lucavirus_v1.0_prot}"
: "${pretrain_task_level_name:=prot_mask,prot_homo,prot_site,prot_domain,prot_taxonomy,prot_keyword}"
source run_scripts/common.sh
lucavirus_overrides
launch train --config lucavirus_v1.0 "${OVERRIDES[@]}"
