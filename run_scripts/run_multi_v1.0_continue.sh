#!/usr/bin/env bash
# Resume a run after a failure, as LucaVirus users do: same variables as the run being continued,
# (pretrain_task_level_name included: the tasks must be those of the checkpoint), plus `trained_checkpoint`
# ('auto', the default: the newest complete checkpoint, or a fresh start when the run died before its
# first one, so a scheduler can rerun this one command after a preemption at any moment; 'latest', a
# step number, or a checkpoint directory) and optionally
# `model_dirpath` (the run directory or the checkpoint directory to resume from; default: OUTPUT_DIR).
# The model, optimizer, LR schedule, RNG states and the sample-id ledger are restored; training
# continues with the next unseen sample, also when nproc_per_node differs from the first run.
# Variables and their defaults: run_scripts/common.sh; set any of them in the environment.
#   trained_checkpoint=latest OUTPUT_DIR=runs/lucavirus_v1.0_mask bash run_scripts/run_multi_v1.0_continue.sh
set -euo pipefail
cd "$(dirname "$0")/.."
: "${OUTPUT_DIR:=runs/lucavirus_v1.0_mask}"
: "${trained_checkpoint:=auto}"
source run_scripts/common.sh
lucavirus_overrides
launch train --config lucavirus_v1.0 train.trained_checkpoint="$trained_checkpoint" "${OVERRIDES[@]}"
