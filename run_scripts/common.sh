# Sourced by the run_*.sh scripts. Holds the LucaVirus v1.0 defaults of every variable (each can be
# set from the environment), turns them into lucatrain's dotted overrides, and launches.
# Nothing here knows about models or data beyond the variable names LucaVirus users know.
#
# Launch:  LAUNCHER=deepspeed (default) | torchrun | python (one process, no launcher)
#          nproc_per_node (processes on this node), CUDA_VISIBLE_DEVICES (deepspeed: --include),
#          HOSTFILE (multi-node DeepSpeed hostfile), MASTER_PORT, NNODES/NODE_RANK/MASTER_ADDR (torchrun)
# Tasks:   pretrain_task_level_type (all, token_level, span_level, seq_level, structure_level; comma list)
#          pretrain_task_level_name (exact task names, comma list), CLASSIFIER_SIZES ({task: size, ...}),
#          LABEL_DIR (label files <task>.txt; default: label/ beside the train files)
# TINY=1:  tiny sizes that run on 2 CPU cores in seconds (any variable set explicitly still wins).

if [[ "${TINY:-0}" == 1 ]]; then
  : "${MAX_LENGTH:=130}" "${HIDDEN_SIZE:=64}" "${NUM_ATTENTION_LAYERS:=2}" "${NUM_ATTENTION_HEADS:=4}"
  : "${batch_size:=4}" "${gradient_accumulation_steps:=1}" "${max_steps:=20}" "${warmup_steps:=2}"
  : "${loss_logging_steps:=5}" "${logging_steps:=10}" "${eval_steps:=10}" "${save_steps:=10}"
  : "${learning_rate:=2e-3}" "${lr2:=2e-4}" "${worker_num:=0}" "${nproc_per_node:=2}" "${PRECISION:=fp32}"
  : "${CLASSIFIER_SIZES:={gene_type: 32, prot_homo: 32, prot_site: 32, prot_domain: 32, gene_taxonomy: 32, prot_taxonomy: 32, prot_keyword: 32, prot_structure: 32\}}"
fi

: "${MAX_LENGTH:=3074}"
: "${HIDDEN_SIZE:=2560}"
: "${NUM_ATTENTION_LAYERS:=12}"
: "${NUM_ATTENTION_HEADS:=20}"
: "${batch_size:=1}"
: "${gradient_accumulation_steps:=32}"
: "${loss_logging_steps:=100}"
: "${logging_steps:=1000}"
: "${eval_steps:=5000}"
: "${save_steps:=5000}"
: "${warmup_steps:=2000}"
: "${max_steps:=300000}"
: "${learning_rate:=2e-4}"
: "${lr2:=2e-5}"
: "${worker_num:=4}"
: "${nproc_per_node:=8}"
: "${model_dirpath:=}"
: "${TRAIN_FILES:=examples/data/lucaone_sample/train}"
: "${DEV_FILES:=examples/data/lucaone_sample/dev}"
: "${DS_CONFIG:=zero2}"
: "${PRECISION:=bf16}"
: "${pretrain_task_level_type:=all}"
: "${pretrain_task_level_name:=gene_mask,prot_mask}"
: "${CLASSIFIER_SIZES:={\}}"  # empty: LucaOne v2.0's head sizes
: "${LABEL_DIR:=}"
: "${init_first_n_layers:=false}"
: "${EXTRA_ARGS:=}"   # more section.key=value overrides, space separated

# The variables above as `section.key=value` overrides (CLI > YAML recipe > defaults).
lucavirus_overrides() {
  OVERRIDES=(
    data.train_files="[$TRAIN_FILES]" data.dev_files="[$DEV_FILES]" data.max_length="$MAX_LENGTH"
    data.num_workers="$worker_num"
    model.hidden_size="$HIDDEN_SIZE" model.num_hidden_layers="$NUM_ATTENTION_LAYERS"
    model.num_attention_heads="$NUM_ATTENTION_HEADS" model.model_dirpath="$model_dirpath"
    model.init_first_n_layers="$init_first_n_layers"
    tasks.level_types="$pretrain_task_level_type" tasks.names="$pretrain_task_level_name"
    tasks.classifier_sizes="$CLASSIFIER_SIZES" tasks.label_dir="$LABEL_DIR"
    train.output_dir="$OUTPUT_DIR" train.batch_size="$batch_size"
    train.gradient_accumulation_steps="$gradient_accumulation_steps"
    train.loss_logging_steps="$loss_logging_steps" train.logging_steps="$logging_steps"
    train.eval_steps="$eval_steps" train.save_steps="$save_steps" train.warmup_steps="$warmup_steps"
    train.max_steps="$max_steps" train.learning_rate="$learning_rate" train.lr2="$lr2"
    deepspeed.config="$DS_CONFIG" deepspeed.precision="$PRECISION"
  )
  # shellcheck disable=SC2206  # EXTRA_ARGS is a list of words on purpose
  OVERRIDES+=($EXTRA_ARGS)
}

# launch VERB ARGS...: `lucatrain VERB ARGS...` under the chosen launcher.
launch() {
  local launcher=${LAUNCHER:-deepspeed}
  local port=${MASTER_PORT:-29500}
  local cmd=()
  case "$launcher" in
    deepspeed)
      cmd=(deepspeed --master_port "$port")
      if [[ -n "${HOSTFILE:-}" ]]; then
        cmd+=(--hostfile "$HOSTFILE")
      elif [[ -n "${CUDA_VISIBLE_DEVICES:-}" ]]; then
        # The deepspeed launcher sets CUDA_VISIBLE_DEVICES itself; --include is how it is told.
        cmd+=(--include "localhost:${CUDA_VISIBLE_DEVICES}")
        unset CUDA_VISIBLE_DEVICES
      else
        cmd+=(--num_gpus "$nproc_per_node")
      fi
      cmd+=(--module lucatrain)
      ;;
    torchrun)
      cmd=(python3 -m torch.distributed.run --nproc_per_node "$nproc_per_node" --master_port "$port"
           --nnodes "${NNODES:-1}" --node_rank "${NODE_RANK:-0}" --master_addr "${MASTER_ADDR:-127.0.0.1}" -m lucatrain)
      ;;
    python)
      cmd=(python3 -m lucatrain)
      ;;
    *)
      echo "run_scripts: LAUNCHER must be deepspeed, torchrun or python, got '$launcher'" >&2
      return 2
      ;;
  esac
  echo "+ ${cmd[*]} $*" >&2
  "${cmd[@]}" "$@"
}
