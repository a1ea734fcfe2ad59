#!/usr/bin/env bash
# LucaVirus v1.0 pretraining with every LucaVirus task: gene_mask, gene_type, gene_taxonomy, prot_mask,
# prot_homo, prot_site, prot_domain, prot_taxonomy, prot_keyword (weights: mask and keyword 1.0, span and
# taxonomy 0.2), on all local devices via deepspeed, initialised from `model_dirpath`: a LucaOne checkpoint
# directory (checkpoint-step<N>/ with config.json + pytorch.pth) or a lucatrain export. LucaVirus took
# the first 12 of LucaOne's 20 layers; init_first_n_layers=true (the default here) does the same.
# Tasks without labels in the training data are skipped with a warning; label files come from
# label/ beside the train files (or LABEL_DIR).
# Variables and their defaults: run_scripts/common.sh; set any of them in the environment.
#   model_dirpath=/models/lucaone/checkpoint-step36000000 bash run_scripts/run_multi_v1.0.sh
# The tiny CPU demo on the shipped sample, two processes:
#   TINY=1 bash run_scripts/run_multi_v1.0.sh
set -euo pipefail
cd "$(dirname "$0")/.."
: "${OUTPUT_DIR:=runs/lucavirus_v1.0}"
: "${pretrain_task_level_type:=all}"
: "${pretrain_task_level_name:=gene_mask,gene_type,gene_taxonomy,prot_mask,prot_homo,prot_site,prot_domain,prot_taxonomy,prot_keyword}"
: "${init_first_n_layers:=true}"
source run_scripts/common.sh
lucavirus_overrides
launch train --config lucavirus_v1.0 "${OVERRIDES[@]}"
