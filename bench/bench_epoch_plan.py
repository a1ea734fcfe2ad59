"""The epoch plan and start-up at 10 M records (synthetic lengths; issue 12, item 3).

A prepared dataset of N records is written directly (Arrow + meta.json, the layout `lucatrain
prepare` writes), with residue lengths drawn from a log-normal (median 300, 20..3,000, like a mix
of genes and proteins) and a short sequence per record. Then, for N = 1 M and 10 M:

    open        load_prepared: memory-map, numpy views of sample_id and length
    plan fixed  plan_epoch with a global batch of 32 (4 processes x 8)
    plan tokens plan_epoch with a token budget of 16,384 per micro-batch, 4 x 2 micro-batches a step
    exclude     the resume path after a change of batch definition: half the epoch's ids consumed,
                excluded by id (PreparedDataset.rows_without) before the rest is planned (Trainer.epoch_plan)
    start-up    `python -m lucatrain train` on the dataset (tiny model, 1 process) from Popen to
                the end of the first optimizer step (LUCATRAIN_FAULT=step:1 kills it there)

Targets (issue 12: "under a few seconds" at 10 M): each plan <= 3 s, and what 10 M records add to
start-up over 1 M <= 3 s (the rest of start-up, imports and the DeepSpeed engine, does not depend on
the data). Printed as RATIO lines of seconds / 3 s.

    python bench/bench_epoch_plan.py [--sizes 1000000,10000000]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

from lucatrain.data.batching import BatchSpec, plan_epoch  # noqa: E402
from lucatrain.data.prepared import DATA_FILE, META_FILE, PREPARED_VERSION, load_prepared  # noqa: E402
from lucatrain.data.schema import SEQUENCE_SCHEMA  # noqa: E402

CHUNK = 1_000_000
SEQ = "ACGTTGCAAGCTTCGA" * 4  # 64 nt


def write_synthetic(directory: Path, n: int, seed: int = 0) -> None:
    directory.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    schema = SEQUENCE_SCHEMA.arrow()
    with pa.OSFile(str(directory / DATA_FILE), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
        for start in range(0, n, CHUNK):
            rows = np.arange(start, min(n, start + CHUNK))
            lengths = np.clip(rng.lognormal(np.log(300), 0.8, rows.size), 20, 3000).astype(np.int32)
            ids = (rows.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)) & np.uint64(0x7FFF_FFFF_FFFF_FFFF)
            columns = {
                "sample_id": pa.array(ids.astype(np.int64)),
                "obj_id": pa.array([f"r{i}" for i in rows.tolist()], pa.string()),
                "obj_type": pa.array(np.zeros(rows.size, np.int8)),
                "seq": pa.array([SEQ] * rows.size, pa.large_string()),
                "labels": pa.array(["{}"] * rows.size, pa.string()),
                "length": pa.array(lengths),
            }
            for offset in range(0, rows.size, 10_000):  # the record batches prepare writes
                writer.write_batch(pa.record_batch([columns[f.name].slice(offset, 10_000) for f in schema], schema=schema))
    fingerprint = hashlib.sha256(f"synthetic {n} {seed}".encode()).hexdigest()
    meta = {"version": PREPARED_VERSION, "fingerprint": fingerprint, "num_records": n,
            "num_rejected": 0, "files": [], "obj_type_counts": {"gene": n, "prot": 0}, "total_residues": 64 * n,
            "duplicate_obj_ids": {"policy": "keep", "records": 0, "ids": 0, "examples": []},
            "prot_like_nucleotides": {"records": 0, "examples": []}, "recipe": "lucaone", "recipe_options": {},
            "schema": SEQUENCE_SCHEMA.to_json(), "labels": {}, "skipped_files": [], "options": {}, "created": "synthetic"}  # fmt: skip
    (directory / META_FILE).write_text(json.dumps(meta))


def timed(fn):
    start = time.perf_counter()
    value = fn()
    return time.perf_counter() - start, value


def startup_seconds(dataset: Path, work: Path) -> float:
    """Popen -> end of the first optimizer step of a tiny training run on `dataset`."""
    args = ["train", "--config", "demo_tiny", f"data.train_files=[{dataset}]", "data.dev_files=[]", f"train.output_dir={work}",
            "train.overwrite_output_dir=true", "train.progress_bar=false", "train.max_steps=5", "train.save_steps=5", "train.warmup_steps=0",
            "tasks.names=[gene_mask]", "model.hidden_size=32", "model.num_hidden_layers=2", "model.num_attention_heads=4",
            "data.max_length=66", f"data.cache_dir={work / 'cache'}"]  # fmt: skip
    env = {**os.environ, "LUCATRAIN_FAULT": "step:1", "PYTHONUNBUFFERED": "1"}
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "lucatrain", *args], env=env, capture_output=True, text=True, timeout=900)
    seconds = time.perf_counter() - start
    if result.returncode != -9:
        raise SystemExit(f"the run should have been killed after its first step; it exited {result.returncode}:\n{result.stderr[-3000:]}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1000000,10000000")
    parser.add_argument("--work-dir", type=Path, default=None)
    parser.add_argument("--out-dir", type=Path, default=None)
    args = parser.parse_args()
    load_before = _common.warn_if_busy()
    sizes = [int(s) for s in args.sizes.split(",")]
    fixed = BatchSpec(micro_batches_per_step=4, batch_size=8)
    tokens = BatchSpec(micro_batches_per_step=8, max_tokens=16_384, max_length=3074)
    results, rows = {}, []
    with tempfile.TemporaryDirectory(prefix="lucatrain-plan-bench-", dir=args.work_dir) as tmp:
        for n in sizes:
            directory = Path(tmp) / f"data-{n}"
            write_synthetic(directory, n)
            t_open, data = timed(lambda: load_prepared(directory))
            lengths, ids = data.lengths, data.sample_ids
            t_fixed, plan = timed(lambda: plan_epoch(lengths, fixed, 0, 0, data.fingerprint))
            t_tokens, token_plan = timed(lambda: plan_epoch(lengths, tokens, 0, 0, data.fingerprint))
            consumed = np.concatenate(plan[: len(plan) // 2])

            def exclude_and_plan():  # what Trainer.epoch_plan does with the consumed ids
                rows_left = data.rows_without(np.arange(n), ids[consumed])
                return plan_epoch(lengths[rows_left], fixed, 0, 0, data.fingerprint)

            t_exclude, rest = timed(exclude_and_plan)
            assert sum(map(len, rest)) + consumed.size <= n
            t_start = startup_seconds(directory, Path(tmp) / f"run-{n}")
            results[n] = {"open_s": t_open, "plan_fixed_s": t_fixed, "plan_tokens_s": t_tokens, "exclude_half_s": t_exclude,
                          "startup_s": t_start, "fixed_batches": len(plan), "token_batches": len(token_plan)}  # fmt: skip
            rows.append([f"{n:,}", t_open, t_fixed, t_tokens, t_exclude, t_start])
            del data, plan, token_plan, rest
    _common.print_table(["records", "open s", "plan fixed s", "plan tokens s", "exclude half + plan s", "start-up to step 1 s"], rows)
    small, large = results[sizes[0]], results[sizes[-1]]
    checks = [("plan_fixed_10M_s", large["plan_fixed_s"]), ("plan_tokens_10M_s", large["plan_tokens_s"]),
              ("exclude_half_and_plan_10M_s", large["exclude_half_s"]),
              ("startup_added_by_10M_s", large["startup_s"] - small["startup_s"])]  # fmt: skip
    ok = True
    for name, seconds in checks:
        line, passed = _common.ratio_line(f"{name}_over_3s", seconds / 3.0, 1.0, higher_is_better=False)
        print(line)
        ok = ok and passed
    print(f"start-up at {sizes[-1]:,} / at {sizes[0]:,}: {large['startup_s'] / small['startup_s']:.3f}")
    _common.write_results("epoch_plan", {"results": {str(k): v for k, v in results.items()}, "target_met": ok,
                                          "other_load_before": load_before, "other_load_after": _common.other_load()}, args.out_dir)  # fmt: skip


if __name__ == "__main__":
    main()
