"""The command line: verbs, user errors as one clear line, run scripts through the real launchers."""

import os
import subprocess
import sys

import pytest
import yaml

from conftest import REPO, all_tasks_dataset, launch, read_history, shm_buffers, tiny_overrides


def lucatrain(*args, env=None, timeout=300):
    return subprocess.run([sys.executable, "-m", "lucatrain", *map(str, args)], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})})


def test_bad_config_key_fails_fast_naming_it(tmp_path):
    result = lucatrain("train", "--config", "demo_tiny", "train.gradient_acumulation_steps=4")
    assert result.returncode == 2
    assert "unknown config key `train.gradient_acumulation_steps`" in result.stderr
    assert "gradient_accumulation_steps" in result.stderr  # the valid keys are listed


def test_prepare_verb_and_bad_record_names_file_and_line(tmp_path):
    good = tmp_path / "good.fasta"
    good.write_text(">g1\nACGTACGTTT\n>p1\nMKLVVAAG\n")
    result = lucatrain("prepare", good, "--out", tmp_path / "prepared")
    assert result.returncode == 0, result.stderr
    assert "prepared 2 records" in result.stdout

    bad = tmp_path / "bad.csv"
    bad.write_text("obj_id,obj_type,obj_seq,obj_label\ng1,gene,ACGT,{}\ng2,gene,AC7T,{}\n")
    result = lucatrain("train", "--config", "demo_tiny", *tiny_overrides(tmp_path, **{"data.train_files": f"[{bad}]"}))
    assert result.returncode == 2
    assert f"{bad}:3:" in result.stderr and "'7'" in result.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.multiprocess
def test_bad_input_stops_every_rank(tmp_path):
    """Rank 0 finds the bad record; the other rank must stop too, not hang in a collective."""
    bad = tmp_path / "bad.csv"
    bad.write_text("obj_id,obj_type,obj_seq,obj_label\ng1,gene,ACGT\n")
    args = ["train", "--config", "demo_tiny", *tiny_overrides(tmp_path, **{"data.train_files": f"[{bad}]"})]
    result = launch(args, nproc=2, timeout=240, expect_failure=True)
    assert f"{bad}:2: expected 4 columns, found 3" in result.stderr
    assert result.shm_left == []  # nor does a failed run leave DeepSpeed's shared-memory buffers


def _tiny_script_env(tmp_path, **extra):
    return {
        **os.environ,
        "MAX_LENGTH": "66", "HIDDEN_SIZE": "32", "NUM_ATTENTION_LAYERS": "2", "NUM_ATTENTION_HEADS": "4",
        "batch_size": "4", "gradient_accumulation_steps": "2", "max_steps": "6", "warmup_steps": "1",
        "loss_logging_steps": "3", "save_steps": "3", "eval_steps": "3", "PRECISION": "fp32", "worker_num": "1",
        "OUTPUT_DIR": str(tmp_path / "run"),
        "EXTRA_ARGS": f"data.cache_dir={tmp_path / 'cache'} train.progress_bar=false",
        **extra,
    }


@pytest.mark.multiprocess
@pytest.mark.parametrize("script,nproc", [("run_multi_mask_v1.0.sh", "2"), ("run_multi_v1.0_single.sh", "1")])
def test_run_scripts_run_tiny_on_cpu(tmp_path, script, nproc):
    env = _tiny_script_env(tmp_path, nproc_per_node=nproc, MASTER_PORT=str(_port()))
    env.pop("CUDA_VISIBLE_DEVICES", None)
    result = subprocess.run(["bash", f"run_scripts/{script}"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert shm_buffers(env["MASTER_PORT"]) == []  # no 69 MB DeepSpeed all-reduce buffer per rank left behind
    assert result.returncode == 0, result.stderr[-4000:]
    log = (tmp_path / "run" / "logs" / "training.log").read_text()
    assert f"world_size={nproc}" in log
    assert "done: 6 steps" in log
    assert (tmp_path / "run" / "checkpoints" / "step-000003" / "manifest.json").is_file()
    assert (tmp_path / "run" / "best" / "model.safetensors").is_file()


def _port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.multiprocess
def test_continue_script_resumes_the_mask_run(tmp_path):
    env = _tiny_script_env(tmp_path, nproc_per_node="2", MASTER_PORT=str(_port()))
    env.pop("CUDA_VISIBLE_DEVICES", None)
    first = subprocess.run(["bash", "run_scripts/run_multi_mask_v1.0.sh"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-4000:]
    env.update(max_steps="9", nproc_per_node="1", MASTER_PORT=str(_port()))  # trained_checkpoint: the default, auto
    result = subprocess.run(["bash", "run_scripts/run_multi_v1.0_continue.sh"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    log = (tmp_path / "run" / "logs" / "training.log").read_text()
    assert f"resumed from {tmp_path / 'run' / 'checkpoints' / 'step-000006'}" in log
    assert "world size 2 -> 1" in log
    assert "done: 9 steps" in log


@pytest.mark.multiprocess
def test_continue_script_after_a_kill_before_the_first_checkpoint_starts_afresh(tmp_path):
    """The scheduler's one command: the same continue command works whether or not a checkpoint exists."""
    env = _tiny_script_env(tmp_path, nproc_per_node="1", LAUNCHER="python", max_steps="4", save_steps="0", eval_steps="0")
    killed = subprocess.run(["bash", "run_scripts/run_multi_v1.0_continue.sh"], cwd=REPO, env={**env, "LUCATRAIN_FAULT": "step:2"},
                            capture_output=True, text=True, timeout=600)  # fmt: skip
    assert killed.returncode != 0 and not (tmp_path / "run" / "checkpoints" / "latest").exists()
    result = subprocess.run(["bash", "run_scripts/run_multi_v1.0_continue.sh"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    log = (tmp_path / "run" / "logs" / "training.log").read_text()
    assert "no complete checkpoint" in log and "done: 4 steps" in log


@pytest.mark.multiprocess
def test_continue_script_continues_the_runs_own_config_with_only_what_is_set(tmp_path):
    """Issue 9.9: the continue script's own defaults (run_multi_v1.0.sh's nine tasks, LucaVirus sizes) must
    not replace what the run used: a protein-only tiny run continues with only max_steps and the learning rate
    changed, no TINY, no sizes."""
    env = _tiny_script_env(tmp_path, nproc_per_node="1", LAUNCHER="python", max_steps="3", save_steps="3", eval_steps="0")
    env.pop("CUDA_VISIBLE_DEVICES", None)
    first = subprocess.run(["bash", "run_scripts/run_multi_v1.0_prot.sh"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-4000:]
    before = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    plain = {k: v for k, v in os.environ.items() if k not in env or k in ("PATH", "HOME", "PYTHONPATH")}
    plain.pop("CUDA_VISIBLE_DEVICES", None)
    result = subprocess.run(["bash", "run_scripts/run_multi_v1.0_continue.sh"], cwd=REPO, capture_output=True, text=True, timeout=600,
                            env={**plain, "OUTPUT_DIR": str(tmp_path / "run"), "LAUNCHER": "python", "max_steps": "5",
                                 "learning_rate": "1e-4", "lr2": "0"})  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    assert "continuing" in result.stderr and "max_steps learning_rate lr2" in result.stderr
    after = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert after["tasks"]["names"] == before["tasks"]["names"]  # the protein tasks, not the script's nine
    sizes = ("hidden_size", "num_hidden_layers", "num_attention_heads")
    assert [after["model"][k] for k in sizes] == [before["model"][k] for k in sizes] == [32, 2, 4]  # not LucaVirus's 2560
    assert after["data"] == before["data"]
    assert (after["train"]["max_steps"], after["train"]["learning_rate"], after["train"]["lr2"]) == (5, 1e-4, 0.0)
    log = (tmp_path / "run" / "logs" / "training.log").read_text()
    assert "resumed from" in log and "done: 5 steps" in log


def _run_script(tmp_path, script, **env_values):
    env = {**os.environ, "TINY": "1", "max_steps": "6", "eval_steps": "3", "save_steps": "6", "loss_logging_steps": "1",
           "OUTPUT_DIR": str(tmp_path / "run"), "MASTER_PORT": str(_port()),
           "EXTRA_ARGS": f"data.cache_dir={tmp_path / 'cache'} train.progress_bar=false", **env_values}  # fmt: skip
    env.pop("CUDA_VISIBLE_DEVICES", None)
    result = subprocess.run(["bash", f"run_scripts/{script}"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return (tmp_path / "run" / "logs" / "training.log").read_text(), read_history(tmp_path / "run")


@pytest.mark.multiprocess
@pytest.mark.parametrize("script,trained,skipped", [
    ("run_multi_v1.0_gene.sh", ["gene_mask", "gene_taxonomy"], ["gene_type"]),
    ("run_multi_v1.0_prot.sh", ["prot_mask", "prot_site", "prot_domain", "prot_taxonomy", "prot_keyword"], ["prot_homo"]),
])  # fmt: skip
def test_gene_and_protein_scripts_train_every_task_the_shipped_sample_has_labels_for(tmp_path, script, trained, skipped):
    log, history = _run_script(tmp_path, script)
    tasks_line = next(line for line in log.splitlines() if " tasks: " in line)
    assert [t.split(" (")[0] for t in tasks_line.split(" tasks: ")[1].split(", ")] == trained
    for task in skipped:
        assert f"task {task} is not trained: no training record carries" in log
    other = "prot" if script.endswith("gene.sh") else "gene"
    assert "train_records=" + ("2411" if other == "prot" else "83") in log  # the other molecule is left out
    for task in trained:
        assert any(f"{task}/loss" in h for h in history if "lr" in h), task
        assert any(f"eval/{task}/loss" in h for h in history), task
    assert not any(k.startswith(other) for h in history for k in h)


@pytest.mark.multiprocess
def test_full_script_trains_all_lucavirus_tasks_from_a_lucaone_checkpoint(tmp_path):
    from test_lucaone_checkpoint import lucaone_config, lucaone_state_dict, write_checkpoint

    train = all_tasks_dataset(tmp_path / "data")
    checkpoint = tmp_path / "lucaone" / "checkpoint-step100"
    write_checkpoint(checkpoint, lucaone_state_dict(layers=3), lucaone_config(layers=3))
    log, history = _run_script(tmp_path, "run_multi_v1.0.sh", model_dirpath=str(checkpoint), NUM_ATTENTION_LAYERS="2",
                               TRAIN_FILES=str(train), DEV_FILES=str(train), batch_size="2")  # fmt: skip
    assert "initialised from LucaOne checkpoint" in log and "first_n_layers: initialised the model's 2 layers" in log
    lucavirus = ["gene_mask", "gene_type", "gene_taxonomy", "prot_mask", "prot_homo", "prot_site", "prot_domain",
                 "prot_taxonomy", "prot_keyword"]  # fmt: skip
    for task in lucavirus:
        assert any(f"{task}/loss" in h for h in history if "lr" in h), task
    assert not any("prot_structure" in k for h in history for k in h)  # labelled, but not a LucaVirus task
    assert "world_size=2" in log and "done: 6 steps" in log
