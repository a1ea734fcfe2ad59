#!/usr/bin/env bash
# Resume a run after a failure or a preemption, as LucaVirus users do. It continues what the run
# script started: the run's own OUTPUT_DIR/config.yaml (every setting the run used, its tasks
# included) plus only the variables you set now, e.g. a lower learning_rate after a loss spike.
#   OUTPUT_DIR=runs/lucavirus_v1.0_mask bash run_scripts/run_multi_v1.0_continue.sh
#   learning_rate=1e-5 lr2=0 bash run_scripts/run_multi_v1.0_continue.sh
# trained_checkpoint: 'auto' (default: the newest complete checkpoint, or a fresh start when the run
# died before its first one, so a scheduler can rerun this one command at any moment), 'latest', a
# step number, or a checkpoint directory; model_dirpath: the run or checkpoint directory to resume
# from (default: OUTPUT_DIR). The model, optimizer, LR schedule, RNG states and the sample-id ledger
# are restored; training continues with the next unseen sample, also when nproc_per_node differs.
# A directory without config.yaml (the run never got past its start-up checks) is started as
# run_multi_v1.0.sh would start it, with your variables. Defaults: run_scripts/common.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
: "${OUTPUT_DIR:=runs/lucavirus_v1.0}"  # where run_multi_v1.0.sh writes
: "${trained_checkpoint:=auto}"
if [[ ! -f "$OUTPUT_DIR/config.yaml" ]]; then
  echo "run_multi_v1.0_continue.sh: $OUTPUT_DIR/config.yaml not found; starting the run as run_multi_v1.0.sh" >&2
  EXTRA_ARGS="${EXTRA_ARGS:-} train.trained_checkpoint=$trained_checkpoint" exec bash run_scripts/run_multi_v1.0.sh
fi
source run_scripts/common.sh
overrides_of "${SET_BY_CALLER[@]}"
echo "run_multi_v1.0_continue.sh: continuing $OUTPUT_DIR/config.yaml with ${SET_BY_CALLER[*]:-no changes}" >&2
launch train --config "$OUTPUT_DIR/config.yaml" train.trained_checkpoint="$trained_checkpoint" "${OVERRIDES[@]}"
