#!/usr/bin/env bash
# SimCLR self-supervised pretraining on specimen photographs (Phenoscape's workflow), multispectral too,
# with the deepspeed launcher. Either a Phenoscape config file, mapped key by key:
#   PHENOSCAPE_CONFIG=their_simclr.yaml devices=4 bash run_scripts/run_simclr.sh
# or its keys as variables (defaults: Phenoscape's):
#   data_dir (an image folder; with train/ and val/ folders those are the splits)   out_dir (runs/simclr)
#   backbone resnet50   weights (empty: random; a local file or directory)   input_size 224
#   lr 1e-3   batch_size 32 (per process)   max_epochs 100   temperature 0.1   seed 42
#   devices (processes: nproc_per_node)   precision 16 | bf16 | 32   accumulate_grad_batches 1
#   log_every_n_steps 50   num_workers 4   eta_min 0   resume (a run directory or its last.ckpt path)
#   LAUNCHER, MASTER_PORT, HOSTFILE: see common.sh.   EXTRA_ARGS: more section.key=value overrides.
#   TINY=1: the CPU recipe (simclr_tiny) on the shipped sample images.
#   TINY=1 bash run_scripts/run_simclr.sh
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -n "${devices:-}" ]]; then : "${nproc_per_node:=$devices}"; fi
: "${EXTRA_ARGS:=}"
source run_scripts/common.sh
# shellcheck disable=SC2206  # EXTRA_ARGS is a list of words on purpose
extra=($EXTRA_ARGS)
if [[ -n "${PHENOSCAPE_CONFIG:-}" ]]; then
  launch train --phenoscape "$PHENOSCAPE_CONFIG" "${extra[@]}"
  exit
fi
if [[ "${TINY:-0}" == 1 ]]; then
  : "${RECIPE:=simclr_tiny}" "${data_dir:=examples/data/simclr_sample}" "${backbone:=vit_tiny}" "${input_size:=32}"
  : "${batch_size:=32}" "${max_epochs:=20}" "${precision:=32}" "${out_dir:=runs/simclr_tiny}" "${nproc_per_node:=1}"
fi
: "${RECIPE:=simclr}"
: "${data_dir:=data/images}" "${out_dir:=runs/simclr}" "${backbone:=resnet50}" "${weights:=}" "${input_size:=224}"
: "${lr:=1e-3}" "${batch_size:=32}" "${max_epochs:=100}" "${temperature:=0.1}" "${seed:=42}" "${precision:=16}"
: "${accumulate_grad_batches:=1}" "${log_every_n_steps:=50}" "${num_workers:=4}" "${eta_min:=0}" "${resume:=}"
# The same mapping as `--phenoscape`: write the variables as a Phenoscape config and let lucatrain map it.
config=$(mktemp "${TMPDIR:-/tmp}/simclr_XXXXXX.yaml")
trap 'rm -f "$config"' EXIT
cat > "$config" <<YAML
data_dir: $data_dir
out_dir: $out_dir
backbone: $backbone
weights: ${weights:-null}
input_size: $input_size
lr: $lr
batch_size: $batch_size
max_epochs: $max_epochs
temperature: $temperature
seed: $seed
precision: $precision
accumulate_grad_batches: $accumulate_grad_batches
log_every_n_steps: $log_every_n_steps
num_workers: $num_workers
eta_min: $eta_min
YAML
if [[ -n "$resume" ]]; then echo "resume: $resume" >> "$config"; fi
launch train --config "$RECIPE" --phenoscape "$config" "${extra[@]}"
