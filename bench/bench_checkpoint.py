"""Checkpoint save time and size per parameter, ZeRO-1/2/3 on 2 processes.

Each configuration is a real 2-process run under the DeepSpeed launcher,

    deepspeed --num_gpus 2 --master_port <free> --module lucatrain train --config demo_tiny ...

on the shipped LucaOne-format sample (examples/data/lucaone_sample/train/train.csv), with a model
of a few million parameters (hidden 256, 4 layers, 8 heads, max_length 130), `train.max_steps=6`
and `train.save_steps=2`: checkpoints at steps 2 and 4, and the final one at step 6. Configurations:
ZeRO-1, -2 and -3 in fp32, and ZeRO-2 in bf16 (DeepSpeed then keeps bf16 weights beside the fp32
master copy, so the layout differs).

What is read back, from the run's logs/training.log:
  `world_size=2 params=3.21M ...`                      the encoder's parameter count (rounded; the
                                                        exact count is rebuilt here from the config)
  `checkpoint ... committed in 0.123 s, 4567 bytes ...` per checkpoint: wall time of
                                                        Trainer.save_checkpoint on rank 0 (stage,
                                                        DeepSpeed shards of both ranks, RNG, ledger,
                                                        barrier, manifest, rename, `latest`) and the
                                                        committed directory's size
The last checkpoint's files are also summed by kind (DeepSpeed model states, DeepSpeed optimizer
states, the rest) to show where the bytes per parameter come from. For reference: the fp32 weights
alone are 4 bytes per parameter; weights + Adam's two moments in fp32 are 12.

No target: the script reports. Each run takes ~20-40 s on 2 cores.

    python bench/bench_checkpoint.py
    python bench/bench_checkpoint.py --configs zero2:fp32,zero3:bf16 --hidden 512 --layers 6
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402  (puts the repo on sys.path too)

from lucatrain.config import load_config  # noqa: E402

COMMITTED = re.compile(r"checkpoint (\S+) committed in ([0-9.]+) s, (\d+) bytes")
PARAMS = re.compile(r"world_size=(\d+) params=([0-9.]+)M")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default="zero1:fp32,zero2:fp32,zero3:fp32,zero2:bf16",
                   help="comma-separated DS_CONFIG:PRECISION (deepspeed.config, deepspeed.precision)")  # fmt: skip
    p.add_argument("--nproc", type=int, default=2, help="processes (deepspeed --num_gpus)")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--max-length", type=int, default=130)
    p.add_argument("--batch-size", type=int, default=8, help="per process")
    p.add_argument("--steps", type=int, default=6, help="train.max_steps")
    p.add_argument("--save-steps", type=int, default=2, help="train.save_steps (the last step always saves too)")
    p.add_argument("--timeout", type=int, default=600, help="seconds per run")
    p.add_argument("--keep", default=None, help="keep the run directories under this folder")
    p.add_argument("--out-dir", default=None, help="where <name>.json goes (default bench/results)")
    return p.parse_args(argv)


def free_port() -> int:
    # The launcher's default port may be taken by a concurrent run (tests launch their own).
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def overrides(args, run_dir: Path, cache_dir: Path, ds_config: str, precision: str) -> list[str]:
    values = {
        "train.output_dir": run_dir,
        "data.cache_dir": cache_dir,  # shared by the runs: the CSV is prepared once
        "data.train_files": f"[{_common.LUCAONE_TRAIN}]",
        "tasks.names": "[gene_mask, prot_mask]",  # masked-LM only: what the baselines compute
        "data.dev_files": "[]",  # no evaluation: only training steps and checkpoints
        "data.max_length": args.max_length,
        "model.hidden_size": args.hidden,
        "model.num_hidden_layers": args.layers,
        "model.num_attention_heads": args.heads,
        "train.batch_size": args.batch_size,
        "train.max_steps": args.steps,
        "train.save_steps": args.save_steps,
        "train.save_total_limit": 0,  # keep every checkpoint, so each can be inspected afterwards
        "train.warmup_steps": 0,
        "train.lr_scheduler": "constant",
        "train.progress_bar": "false",
        "deepspeed.config": ds_config,
        "deepspeed.precision": precision,
    }
    return [f"{k}={v}" for k, v in values.items()]


def exact_num_params(args, ds_config: str, precision: str) -> int:
    """The encoder's parameter count, as Trainer computes it (the log prints it rounded to 10k)."""
    from lucatrain.models.encoder import build_model

    cfg = load_config("demo_tiny", overrides(args, Path("unused"), Path("unused"), ds_config, precision))
    return build_model(cfg).num_parameters()


def file_kinds(directory: Path) -> dict[str, int]:
    """Bytes of one committed checkpoint by kind of file."""
    kinds = {"ds_model_states": 0, "ds_optim_states": 0, "other": 0}
    for path in directory.rglob("*"):
        if not path.is_file():
            continue
        size = path.stat().st_size
        if path.name.endswith("model_states.pt"):
            kinds["ds_model_states"] += size
        elif path.name.endswith("optim_states.pt"):
            kinds["ds_optim_states"] += size
        else:  # ledger, rng, trainer_state, manifest, DeepSpeed's zero_to_fp32.py
            kinds["other"] += size
    return kinds


def run_config(args, spec: str, work: Path, cache_dir: Path) -> dict:
    ds_config, precision = spec.split(":")
    run_dir = work / spec.replace(":", "-")
    launcher = shutil.which("deepspeed") or "deepspeed"
    cmd = [launcher, "--num_gpus", str(args.nproc), "--master_port", str(free_port()), "--module", "lucatrain",
           "train", "--config", "demo_tiny", *overrides(args, run_dir, cache_dir, ds_config, precision)]  # fmt: skip
    started = time.perf_counter()
    proc = subprocess.run(cmd, cwd=_common.REPO, env={**os.environ, "PYTHONUNBUFFERED": "1"},
                          capture_output=True, text=True, timeout=args.timeout)  # fmt: skip
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} exited {proc.returncode}\n--- stderr\n{proc.stderr[-5000:]}")
    log = (run_dir / "logs" / "training.log").read_text()
    found = PARAMS.search(log)
    if found is None:
        raise SystemExit(f"no 'world_size=.. params=..M' line in {run_dir}/logs/training.log")
    world, params_logged = int(found.group(1)), float(found.group(2)) * 1e6
    saves = [{"path": m.group(1), "seconds": float(m.group(2)), "bytes": int(m.group(3))} for m in COMMITTED.finditer(log)]
    expected = len({*range(args.save_steps, args.steps, args.save_steps), args.steps}) if args.save_steps else 1
    if len(saves) != expected:
        raise SystemExit(f"{run_dir}: {len(saves)} 'committed in' lines, expected {expected}; is the timing log line there?")
    params = exact_num_params(args, ds_config, precision)
    if abs(params - params_logged) > 0.006e6:
        raise SystemExit(f"parameter count {params} disagrees with the log's params={params_logged / 1e6:.2f}M")
    last = Path(saves[-1]["path"])
    kinds = file_kinds(last)
    seconds = [s["seconds"] for s in saves]
    size = statistics.median(s["bytes"] for s in saves)
    return {
        "config": spec,
        "ds_config": ds_config,
        "precision": precision,
        "world_size": world,
        "params": params,
        "params_logged": params_logged,
        "run_wall_s": wall,
        "saves": saves,
        "save_s_median": statistics.median(seconds),
        "save_s_min": min(seconds),
        "save_s_max": max(seconds),
        "bytes_median": size,
        "bytes_per_param": size / params,
        "write_mb_per_s": size / statistics.median(seconds) / 1e6,
        "last_checkpoint_bytes_by_kind": kinds,
        "bytes_per_param_by_kind": {k: v / params for k, v in kinds.items()},
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    load_before = _common.warn_if_busy()
    specs = [s for s in args.configs.split(",") if s]
    for spec in specs:
        if spec.count(":") != 1:
            sys.exit(f"--configs entry {spec!r} must be DS_CONFIG:PRECISION, e.g. zero2:bf16")
    results = []
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench-checkpoint-"))
    try:
        cache_dir = work / "cache"
        for spec in specs:
            r = run_config(args, spec, work, cache_dir)
            results.append(r)
            print(f"{spec}: {len(r['saves'])} checkpoints, save s = {', '.join(f'{s:.3f}' for s in (x['seconds'] for x in r['saves']))}; "
                  f"run {r['run_wall_s']:.0f} s")  # fmt: skip
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    load_after = _common.other_load()

    params = results[0]["params"] if results else 0
    print(f"\n{args.nproc} processes, hidden {args.hidden}, {args.layers} layers, {args.heads} heads, max_length {args.max_length}: "
          f"{params:,} parameters ({params * 4:,} bytes of fp32 weights = 4.0 bytes/param)")  # fmt: skip
    _common.print_table(
        ["config", "save s (median)", "save s (min-max)", "MB/s", "checkpoint bytes", "bytes/param", "ds model states B/p",
         "ds optimizer B/p", "other B/p", "fp32 weights B/p"],
        [[r["config"], r["save_s_median"], f"{r['save_s_min']:.3f}-{r['save_s_max']:.3f}", r["write_mb_per_s"], f"{int(r['bytes_median']):,}",
          r["bytes_per_param"], r["bytes_per_param_by_kind"]["ds_model_states"], r["bytes_per_param_by_kind"]["ds_optim_states"],
          r["bytes_per_param_by_kind"]["other"], 4.0] for r in results],
    )  # fmt: skip
    if max(load_before, load_after) > 0.3:
        print(f"NOTE: other processes kept {max(load_before, load_after):.1f} CPUs busy around this run; save times are noisy")
    path = _common.write_results(
        "checkpoint",
        {
            "settings": {k: v for k, v in vars(args).items() if k != "out_dir"},
            "other_processes_cpus_busy": {"before": load_before, "after": load_after},
            "fp32_weights_bytes_per_param": 4.0,
            "results": results,
        },
        args.out_dir,
    )
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
