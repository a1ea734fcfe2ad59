import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "examples" / "data"
LUCAONE_TRAIN = DATA / "lucaone_sample" / "train" / "train.csv"
LUCAONE_DEV = DATA / "lucaone_sample" / "dev" / "dev.csv"


def pytest_configure(config):
    config.addinivalue_line("markers", "multiprocess: launches several real processes over gloo")
    config.addinivalue_line("markers", "slow: minutes on 2 cores; run with -m slow")


def tiny_overrides(tmp_path: Path, **extra) -> list[str]:
    """A tiny, deterministic fp32 run on the shipped dev split (312 real records)."""
    values = {
        "train.output_dir": tmp_path / "run",
        "data.cache_dir": tmp_path / "cache",
        "data.train_files": f"[{LUCAONE_DEV}]",
        "data.dev_files": "[]",
        "data.max_length": 66,
        "model.hidden_size": 32,
        "model.num_hidden_layers": 2,
        "model.num_attention_heads": 4,
        "model.hidden_dropout_prob": 0.0,
        "train.warmup_steps": 0,
        "train.lr_scheduler": "constant",
        "train.progress_bar": "false",
        "deepspeed.precision": "fp32",
    }
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]


def launch(args: list[str], nproc: int, timeout: int = 600, launcher: str = "deepspeed", env: dict | None = None,
           expect_failure: bool = False) -> subprocess.CompletedProcess:
    """Run `python -m lucatrain ARGS` under a real launcher with `nproc` CPU processes (gloo)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    if launcher == "python":
        cmd = [sys.executable, "-m", "lucatrain", *args]
    elif launcher == "deepspeed":
        cmd = [shutil.which("deepspeed") or "deepspeed", "--num_gpus", str(nproc), "--master_port", str(_free_port()), "--module", "lucatrain", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port", str(_free_port()), "-m", "lucatrain", *args]
    try:
        result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    finally:
        remove_shm_buffers(cmd[cmd.index("--master_port") + 1] if "--master_port" in cmd else None)
    if expect_failure:
        assert result.returncode != 0, "the run was expected to die"
        return result
    if result.returncode != 0:
        pytest.fail(f"{' '.join(cmd)} exited {result.returncode}\n--- stdout\n{result.stdout[-4000:]}\n--- stderr\n{result.stderr[-6000:]}")
    return result


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_history(run: Path) -> list[dict]:
    import json

    return [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]


def remove_shm_buffers(port) -> None:
    """DeepSpeed's CPU all-reduce buffers of a run on `port` (a SIGKILLed run cannot remove its own)."""
    if port is not None:
        for path in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"):
            path.unlink(missing_ok=True)
