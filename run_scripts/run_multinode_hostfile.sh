#!/usr/bin/env bash
# LucaVirus pretraining on several nodes with DeepSpeed's launcher and a hostfile.
#
# With passwordless ssh between the nodes (DeepSpeed starts the other nodes through pdsh): on node 0 only,
#   HOSTFILE=hostfile bash run_scripts/run_multinode_hostfile.sh
# Without ssh (each node starts its own share): on every node, with its NODE_RANK,
#   HOSTFILE=hostfile NODE_RANK=0 MASTER_ADDR=node0.cluster bash run_scripts/run_multinode_hostfile.sh   # node 0
#   HOSTFILE=hostfile NODE_RANK=1 MASTER_ADDR=node0.cluster bash run_scripts/run_multinode_hostfile.sh   # node 1
#
# hostfile, one line per node (slots = processes, usually its GPUs):
#   node0.cluster slots=8
#   node1.cluster slots=8
# Every other variable is run_multi_v1.0.sh's (common.sh): the run, its data and sizes are the same at
# any number of nodes; the global batch is slots x nodes x batch_size x gradient_accumulation_steps.
set -euo pipefail
cd "$(dirname "$0")/.."
: "${HOSTFILE:?set HOSTFILE to a DeepSpeed hostfile (one 'host slots=N' line per node)}"
export HOSTFILE LAUNCHER=deepspeed
exec bash run_scripts/run_multi_v1.0.sh "$@"
