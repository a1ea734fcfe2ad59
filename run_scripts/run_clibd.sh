#!/usr/bin/env bash
# CLIBD-style contrastive pretraining (image + DNA barcode + taxonomy text) with the deepspeed launcher.
# Every CLIBD config key has a variable (defaults: CLIBD's BIOSCAN-5M setting where it applies):
#   HDF5 (CLIBD's BIOSCAN_5M.hdf5 layout)      batch_size 500 (per process)   epochs 30, max_steps 40000
#   max_lr 5e-5 (the peak; CLIBD's lr_config)   output_dim 768                 default_seed 42
#   all_gather / gather_with_grad true, local_loss false (loss_setup)         fix_temperature false
#   amp true (bf16; false: fp32)                disable_lora true (false: LoRA adapters on every tower, r 8)
#   evaluation_period 1, eval_skip_epoch 0 (in epochs of steps_per_epoch steps, 1250: 8 x 500 per step on BIOSCAN-5M)
#   model_output_name (the run directory under RUNS_DIR, default runs/), ckpt_path (resume: a checkpoint or 'latest')
#   wandb_project_name (empty: no wandb; WANDB_MODE=offline logs without a network), port (MASTER_PORT)
#   nproc_per_node, MASTER_PORT, HOSTFILE, LAUNCHER (deepspeed | torchrun | python): see common.sh
#   TINY=1: the CPU-sized recipe (clibd_tiny) on the shipped sample, 2 processes.
#   STAGE=contrastive (default) | fine_tune (CLIBD's fine_tuning_set: a linear species classifier on the
#     image tower of runs/$model_output_name/best, into runs/$model_output_name/supervise_fine_tune;
#     fine_tuning_batch_size 150, fine_tuning_epochs 15) | both (one after the other)
#   TINY=1 bash run_scripts/run_clibd.sh
#   TINY=1 STAGE=both bash run_scripts/run_clibd.sh
#   HDF5=/data/BIOSCAN_5M.hdf5 nproc_per_node=8 bash run_scripts/run_clibd.sh
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ "${TINY:-0}" == 1 ]]; then
  : "${RECIPE:=clibd_tiny}" "${batch_size:=16}" "${epochs:=20}" "${max_steps:=60}" "${max_lr:=1e-3}" "${output_dim:=32}"
  : "${amp:=false}" "${steps_per_epoch:=3}" "${evaluation_period:=10}"  # 99 specimens, 2 x 16 per step
  : "${nproc_per_node:=2}"
  : "${FINE_TUNE_RECIPE:=clibd_finetune_tiny}" "${fine_tuning_batch_size:=16}"
fi
: "${RECIPE:=clibd}"
: "${HDF5:=examples/data/clibd_sample.hdf5}"
: "${batch_size:=500}"
: "${epochs:=30}"
: "${max_steps:=40000}"  # the cosine schedule ends here (BIOSCAN-5M, 8 x 500 per step: about 30 epochs)
: "${max_lr:=5e-5}"
: "${output_dim:=768}"
: "${default_seed:=42}"
: "${all_gather:=true}"
: "${gather_with_grad:=true}"
: "${local_loss:=false}"
: "${use_horovod:=false}"
: "${fix_temperature:=false}"
: "${amp:=true}"
: "${disable_lora:=true}"
: "${wandb_project_name:=}"
if [[ -n "${port:-}" ]]; then export MASTER_PORT="$port"; fi
: "${evaluation_period:=1}"
: "${eval_skip_epoch:=0}"
: "${steps_per_epoch:=1250}"
: "${model_output_name:=clibd}"
: "${RUNS_DIR:=runs}"
: "${ckpt_path:=}"
: "${DS_CONFIG:=zero2}"
: "${STAGE:=contrastive}"
: "${FINE_TUNE_RECIPE:=clibd_finetune}"
: "${fine_tuning_batch_size:=150}"
: "${fine_tuning_epochs:=15}"
: "${EXTRA_ARGS:=}"
lora_towers="[]"
if [[ "$disable_lora" != true ]]; then lora_towers="[image, dna, text]"; fi
precision=fp32
if [[ "$amp" == true ]]; then precision=bf16; fi
source run_scripts/common.sh
splits="{val_seen: [$HDF5], val_unseen: [$HDF5], all_keys: [$HDF5]}"
args=(
  train --config "$RECIPE" data.train_files="[$HDF5]" data.dev_splits="$splits"
  train.output_dir="$RUNS_DIR/$model_output_name" train.batch_size="$batch_size" train.num_train_epochs="$epochs"
  train.max_steps="$max_steps" train.learning_rate="$max_lr" train.seed="$default_seed"
  clibd.output_dim="$output_dim" clibd.all_gather="$all_gather" clibd.gather_with_grad="$gather_with_grad"
  clibd.local_loss="$local_loss" clibd.use_horovod="$use_horovod" clibd.fix_temperature="$fix_temperature"
  clibd.lora_towers="$lora_towers"
  train.eval_steps="$((evaluation_period * steps_per_epoch))" train.eval_start_step="$((eval_skip_epoch * steps_per_epoch))"
  logger.wandb_project="$wandb_project_name"
  deepspeed.config="$DS_CONFIG" deepspeed.precision="$precision"
)
if [[ -n "$ckpt_path" ]]; then args+=(train.trained_checkpoint="$ckpt_path"); fi
fine_tune=(
  train --config "$FINE_TUNE_RECIPE" model.model_dirpath="$RUNS_DIR/$model_output_name/best"
  data.train_files="[$HDF5]" data.dev_splits="{val_seen: [$HDF5], val_unseen: [$HDF5], unseen_keys: [$HDF5]}"
  train.output_dir="$RUNS_DIR/$model_output_name/supervise_fine_tune" train.batch_size="$fine_tuning_batch_size"
  train.num_train_epochs="$fine_tuning_epochs" train.seed="$default_seed" deepspeed.config="$DS_CONFIG" deepspeed.precision="$precision"
  logger.wandb_project="$wandb_project_name"
)
# shellcheck disable=SC2206  # EXTRA_ARGS is a list of words on purpose (given to both stages)
args+=($EXTRA_ARGS)
# shellcheck disable=SC2206
fine_tune+=($EXTRA_ARGS)
case "$STAGE" in
  contrastive) launch "${args[@]}" ;;
  fine_tune) launch "${fine_tune[@]}" ;;
  both) launch "${args[@]}" && launch "${fine_tune[@]}" ;;
  *) echo "run_clibd.sh: STAGE must be contrastive, fine_tune or both, got '$STAGE'" >&2; exit 2 ;;
esac
