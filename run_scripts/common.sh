# Sourced by the run_*.sh scripts. Holds the LucaVirus v1.0 defaults of every variable (each can be
# set from the environment), turns them into lucatrain's dotted overrides, and launches.
# Nothing here knows about models or data beyond the variable names LucaVirus users know.
#
# Launch:  LAUNCHER=deepspeed (default) | torchrun | python (one process, no launcher)
#          nproc_per_node (processes on this node), CUDA_VISIBLE_DEVICES (deepspeed: --include),
#          HOSTFILE (multi-node DeepSpeed hostfile; with NODE_RANK and MASTER_ADDR each node launches itself,
#          --no_ssh), MASTER_PORT, NNODES/NODE_RANK/MASTER_ADDR (torchrun)
# Tasks:   pretrain_task_level_type (all, token_level, span_level, seq_level, structure_level; comma list)
#          pretrain_task_level_name (exact task names, comma list), CLASSIFIER_SIZES ({task: size, ...}),
#          LABEL_DIR (label files <task>.txt; default: label/ beside the train files)
# TINY=1:  tiny sizes that run on 2 CPU cores in seconds (any variable set explicitly still wins).

# Each variable and the override it becomes (`%s`: its value). CLI > YAML recipe > defaults.
OVERRIDE_OF=(
  "TRAIN_FILES data.train_files=[%s]" "DEV_FILES data.dev_files=[%s]" "MAX_LENGTH data.max_length=%s"
  "worker_num data.num_workers=%s"
  "HIDDEN_SIZE model.hidden_size=%s" "NUM_ATTENTION_LAYERS model.num_hidden_layers=%s"
  "NUM_ATTENTION_HEADS model.num_attention_heads=%s" "model_dirpath model.model_dirpath=%s"
  "init_first_n_layers model.init_first_n_layers=%s"
  "pretrain_task_level_type tasks.level_types=%s" "pretrain_task_level_name tasks.names=%s"
  "CLASSIFIER_SIZES tasks.classifier_sizes=%s" "LABEL_DIR tasks.label_dir=%s"
  "OUTPUT_DIR train.output_dir=%s" "batch_size train.batch_size=%s"
  "gradient_accumulation_steps train.gradient_accumulation_steps=%s"
  "loss_logging_steps train.loss_logging_steps=%s" "logging_steps train.logging_steps=%s"
  "eval_steps train.eval_steps=%s" "save_steps train.save_steps=%s" "warmup_steps train.warmup_steps=%s"
  "max_steps train.max_steps=%s" "learning_rate train.learning_rate=%s" "lr2 train.lr2=%s"
  "DS_CONFIG deepspeed.config=%s" "PRECISION deepspeed.precision=%s"
)

# The variables the caller set (environment or the calling script), before any default is filled in:
# the continue script applies only these on top of the run's own config.yaml.
SET_BY_CALLER=()
for _entry in "${OVERRIDE_OF[@]}"; do
  _name=${_entry%% *}
  if [[ -n "${!_name+set}" ]]; then SET_BY_CALLER+=("$_name"); fi
done
unset _entry _name

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

# overrides_of NAME...: OVERRIDES=(the override of each named variable..., then EXTRA_ARGS).
overrides_of() {
  OVERRIDES=()
  local entry name
  for entry in "${OVERRIDE_OF[@]}"; do
    name=${entry%% *}
    if [[ " $* " == *" $name "* ]]; then
      # shellcheck disable=SC2059  # the format comes from the table above
      OVERRIDES+=("$(printf "${entry#* }" "${!name}")")
    fi
  done
  # shellcheck disable=SC2206  # EXTRA_ARGS is a list of words on purpose
  OVERRIDES+=($EXTRA_ARGS)
}

# Every variable as an override: what the run scripts launch.
lucavirus_overrides() {
  local names=() entry
  for entry in "${OVERRIDE_OF[@]}"; do names+=("${entry%% *}"); done
  overrides_of "${names[@]}"
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
        # NODE_RANK set: every node runs this script itself (a scheduler, or no ssh between nodes);
        # unset: this node starts the others over ssh (pdsh), DeepSpeed's default.
        if [[ -n "${NODE_RANK:-}" ]]; then
          cmd+=(--no_ssh --node_rank "$NODE_RANK" --master_addr "${MASTER_ADDR:?set MASTER_ADDR to the address of node 0}")
        fi
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
