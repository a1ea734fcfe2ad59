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
    config.addinivalue_line("markers", "gpu: needs a CUDA device; skipped without one")


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def isolated_process_state():
    """Each test starts with the environment and process group it found, whatever it did itself.

    In-process training sets RANK, WORLD_SIZE, MASTER_PORT=0 ... and creates a process group; left
    behind, they would make later tests join a world that no longer exists.
    """
    import torch.distributed as torch_dist

    saved = dict(os.environ)
    had_group = torch_dist.is_available() and torch_dist.is_initialized()
    yield
    if not had_group and torch_dist.is_available() and torch_dist.is_initialized():
        from lucatrain.engine import release_process_group

        release_process_group()
    os.environ.clear()
    os.environ.update(saved)


# Random kill points are drawn from one generator per session, seeded from LUCATRAIN_TEST_SEED (or the
# clock) and printed, so a failure at one kill point can be rerun exactly.
KILL_SEED = int(os.environ.get("LUCATRAIN_TEST_SEED", str(int.from_bytes(os.urandom(4), "big"))))
_KILL_RNG = None


def kill_step(low: int, high: int) -> int:
    """A random step in [low, high] from the seeded session generator (seed in the output)."""
    import random

    global _KILL_RNG
    if _KILL_RNG is None:
        _KILL_RNG = random.Random(KILL_SEED)
    step = _KILL_RNG.randint(low, high)
    print(f"kill step {step} (LUCATRAIN_TEST_SEED={KILL_SEED})")
    return step


def pytest_report_header(config):
    return f"random kill points: LUCATRAIN_TEST_SEED={KILL_SEED}"


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
        "tasks.names": "[gene_mask, prot_mask]",  # the label tasks have tests of their own
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
    port = cmd[cmd.index("--master_port") + 1] if "--master_port" in cmd else None
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    result.shm_left = shm_buffers(port)  # what the run left in /dev/shm (a test may assert it is nothing)
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


def state_array_file(state_dir: Path, *keys: str) -> Path:
    """The .npy file that holds the array at `keys` of a checkpoint's state (lucatrain.state)."""
    import json

    node = json.loads((state_dir / "state.json").read_text())
    for key in keys:
        node = node[key]
    return state_dir / node["__array__"]


def read_history(run: Path) -> list[dict]:
    import json

    return [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]


def shm_buffers(port) -> list[str]:
    """DeepSpeed's CPU all-reduce buffers of a run on `port` in /dev/shm: lucatrain starts DeepSpeed
    without the op that makes them (engine._no_cpu_shm_comm_op), so there should be none."""
    return sorted(p.name for p in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*")) if port else []


def all_tasks_dataset(directory: Path, genes: int = 12, proteins: int = 12) -> Path:
    """A LucaOne-layout dataset (<dir>/train/train.csv, <dir>/label/) where every task has labels.

    Real records from the shipped sample, genes and proteins alternating. The sample has no gene_type,
    prot_homo or prot_structure labels, so those are added: one span per record and a helix of
    CA-like coordinates per protein (test labels on real sequences; their values do not matter here).
    """
    import csv
    import json
    import math

    rows = list(csv.DictReader(open(LUCAONE_TRAIN, encoding="utf-8")))
    gene_rows = [r for r in rows if r["obj_type"] == "gene" and "gene_taxonomy" in r["obj_label"]][:genes]
    prot_rows = [r for r in rows if r["obj_type"] == "prot" and ("prot_site" in r["obj_label"] or "prot_domain" in r["obj_label"])][:proteins]
    for k, row in enumerate(gene_rows):
        label = json.loads(row["obj_label"])
        label.setdefault("span_level", {})["gene_type"] = [[0, min(40, len(row["obj_seq"]) - 1), k % 3]]
        row["obj_label"] = json.dumps(label)
    for k, row in enumerate(prot_rows):
        label = json.loads(row["obj_label"])
        label.setdefault("span_level", {})["prot_homo"] = [[2, min(30, len(row["obj_seq"]) - 1), k % 4]]
        helix = [[round(2.3 * math.cos(i * 1.75), 3), round(2.3 * math.sin(i * 1.75), 3), round(1.5 * i, 3)]
                 for i in range(len(row["obj_seq"]))]  # fmt: skip
        label["structure_level"] = {"prot_structure": helix}
        row["obj_label"] = json.dumps(label)
    mixed = [r for pair in zip(gene_rows, prot_rows) for r in pair]
    train = directory / "train" / "train.csv"
    train.parent.mkdir(parents=True, exist_ok=True)
    with open(train, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=["obj_id", "obj_type", "obj_seq", "obj_label"])
        writer.writeheader()
        writer.writerows(mixed)
    shutil.copytree(LUCAONE_TRAIN.parents[1] / "label", directory / "label")
    (directory / "label" / "gene_type.txt").write_text("label\nCDS\nrRNA\ntRNA\n", encoding="utf-8")
    (directory / "label" / "prot_homo.txt").write_text("label\nH0\nH1\nH2\nH3\n", encoding="utf-8")
    return train


ALL_TASKS = ["gene_mask", "prot_mask", "gene_type", "prot_homo", "prot_site", "prot_domain",
             "gene_taxonomy", "prot_taxonomy", "prot_keyword", "prot_structure"]  # fmt: skip
SMALL_HEADS = "{" + ", ".join(f"{t}: 16" for t in ALL_TASKS[2:]) + "}"


def spawn_ranks(worker, args, port: int, world: int = 2, timeout: float = 120) -> None:
    """Run `worker(rank, *args)` on `world` processes (torch.multiprocessing); fail (and kill them) past
    `timeout` seconds. A rank that raises ends the run at once: torch stops the other ranks (which may
    wait in a collective the failed rank will never join) and re-raises here with its traceback."""
    import time

    import torch.multiprocessing as mp

    context = mp.spawn(worker, args=args, nprocs=world, join=False)
    deadline = time.monotonic() + timeout
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                if process.is_alive():
                    process.kill()
            pytest.fail(f"{worker.__name__} did not finish within {timeout}s (a collective hung?)")


def join_group(rank: int, port: int, world: int = 2) -> None:
    """The environment of rank `rank` of `world` on this host (then `init_process_group("gloo")`)."""
    import torch

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))  # fmt: skip
    torch.set_num_threads(1)  # the ranks share the cores
