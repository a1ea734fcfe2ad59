"""Multi-node on one machine: two "nodes" on loopback, each started by its own launcher invocation
(DeepSpeed's `--no_ssh --node_rank` with a hostfile, and torchrun `--nnodes 2 --node_rank`), against
one node holding every process. The data a rank trains is chosen by its global rank; a run that used
the local rank (LucaOne's multi-node fault) would give two nodes the same shards."""

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from safetensors.torch import load_file

from conftest import REPO, _free_port, kill_step, launch, read_history, tiny_overrides

pytestmark = pytest.mark.multiprocess


def common(run_dir, **extra) -> list[str]:
    values = {"train.max_steps": 6, "train.save_steps": 2, "train.batch_size": 4, "train.loss_logging_steps": 1,
              "deepspeed.config": "zero2", **extra}  # fmt: skip
    return ["train", "--config", "demo_tiny", *tiny_overrides(run_dir, **values)]


def two_nodes(args: list[str], launcher: str, per_node: int, tmp_path, env_of=lambda node: {}, timeout: int = 600):
    """Both nodes' launcher invocations, started together; returns their CompletedProcess-like results."""
    port = _free_port()
    commands = []
    for node in (0, 1):
        if launcher == "deepspeed":
            hostfile = tmp_path / "hostfile"
            hostfile.write_text(f"node0 slots={per_node}\nnode1 slots={per_node}\n")
            cmd = [shutil.which("deepspeed") or "deepspeed", "--hostfile", str(hostfile), "--no_ssh", "--node_rank", str(node),
                   "--master_addr", "127.0.0.1", "--master_port", str(port), "--module", "lucatrain", *args]  # fmt: skip
        else:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(node), "--nproc_per_node",
                   str(per_node), "--master_addr", "127.0.0.1", "--master_port", str(port), "-m", "lucatrain", *args]  # fmt: skip
        commands.append(cmd)
    processes = [subprocess.Popen(cmd, cwd=REPO, env={**os.environ, "PYTHONUNBUFFERED": "1", **env_of(node)}, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True) for node, cmd in enumerate(commands)]  # fmt: skip
    outputs = []
    try:
        for process in processes:
            outputs.append(process.communicate(timeout=timeout)[0])
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
    return [(process.returncode, output) for process, output in zip(processes, outputs)]


def losses(run_dir) -> list[float]:
    return [h["loss"] for h in read_history(run_dir / "run") if "lr" in h]


def consumed(run_dir) -> list[int]:
    from lucatrain.progress import Ledger

    checkpoints = run_dir / "run" / "checkpoints"
    ledger = Ledger.from_checkpoint(checkpoints / (checkpoints / "latest").read_text().strip())
    return sorted(int(i) for epoch in ledger.epochs() for i in ledger.consumed_ids(epoch))


@pytest.mark.parametrize("launcher", ["deepspeed", "torchrun"])
def test_two_nodes_train_the_global_batches_of_one_node_and_resume_after_a_node_dies(tmp_path, launcher):
    one = tmp_path / "one"
    launch(common(one), nproc=2, launcher=launcher)
    nodes = tmp_path / "nodes"
    for code, output in two_nodes(common(nodes), launcher, 1, tmp_path):
        assert code == 0, output[-4000:]
    np.testing.assert_allclose(losses(nodes), losses(one), rtol=1e-5)
    assert consumed(nodes) == consumed(one)
    # Node 1 killed at a random step: node 0 fails too (its collectives lose their peer); both restarted resume.
    at = kill_step(3, 5)
    killed = tmp_path / "killed"
    results = two_nodes(common(killed), launcher, 1, tmp_path, env_of=lambda node: {"LUCATRAIN_FAULT": f"step:{at}"} if node else {},
                        timeout=300)  # fmt: skip
    assert all(code != 0 for code, _ in results), [r[1][-2000:] for r in results]
    for code, output in two_nodes(common(killed, **{"train.trained_checkpoint": "latest"}), launcher, 1, tmp_path):
        assert code == 0, output[-4000:]
    want, got = (load_file(str(run / "run" / "last" / "model.safetensors")) for run in (nodes, killed))
    for key in want:
        np.testing.assert_array_equal(got[key].numpy(), want[key].numpy(), err_msg=f"{key} (node 1 killed at step {at})")
    assert consumed(killed) == consumed(nodes)


def test_two_nodes_of_two_processes_shard_by_global_rank(tmp_path):
    """2 nodes x 2 processes: local ranks 0, 1, 0, 1 and ranks 0-3. The same losses and the same consumed
    samples as one node of 4 processes; sharding by local rank would train node 1 on node 0's shards."""
    one = tmp_path / "one"
    launch(common(one, **{"train.batch_size": 2}), nproc=4, launcher="torchrun")
    nodes = tmp_path / "nodes"
    results = two_nodes(common(nodes, **{"train.batch_size": 2}), "torchrun", 2, tmp_path)
    for code, output in results:
        assert code == 0, output[-4000:]
    np.testing.assert_allclose(losses(nodes), losses(one), rtol=1e-5)
    ids = consumed(nodes)
    assert ids == consumed(one) and len(ids) == len(set(ids)) == 6 * 8  # 6 steps x 4 ranks x 2, each sample once
    log = (nodes / "run" / "logs" / "training.log").read_text()
    assert "world_size=4" in log
