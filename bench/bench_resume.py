"""Resume cost: process start to the first resumed optimizer step, by samples already consumed.

lucatrain resumes from the progress ledger: the checkpoint says which sample ids were consumed and
where the epoch's order stands (the cursor), and the trainer starts the data stream *at* the cursor.
Nothing before it is read or collated. A replay-style resume (LucaOne, HF Trainer's
`ignore_data_skip=False`) instead rebuilds the loader from the start and reads + collates every
micro-batch it skips. This script measures both, at 0, 10k, 100k and 1M samples consumed.

Data: >= 1,000,000 real short records, windows of 48-64 nt cut out of the shipped rRNA genes
(`examples/data/rrna_genes.fasta`) at strides 3/4/5 (phase shifted by one nt on a second pass),
each with its own obj_id, written to a FASTA and run through `lucatrain prepare` once. Both are
cached under bench/out/resume/ (ignored by git) and reused by later runs.

Checkpoints at C samples consumed, without training C samples: one real run (tiny model, 1 process,
`python -m lucatrain train`, 1 step) gives a real committed checkpoint. For each C, a copy of it gets
a ledger that says C samples were consumed, built with `Ledger` exactly as the trainer records
steps: `start_epoch(0, <the order key Trainer.epoch_order computes>)`, then `record_step` for each
global batch of `plan_epoch(...)` up to C. The state gets global_step = C / global batch,
and `write_manifest` makes the copy a valid checkpoint. The 0 case is such a copy with an empty
ledger, so every case loads the same model/optimizer state and differs only in the ledger.

What is timed: `python -m lucatrain train ... train.trained_checkpoint=<copy>` with
LUCATRAIN_FAULT=step:<step+1>, from Popen to its exit. The fault SIGKILLs the process right after
the first resumed optimizer step, so the wall time is exactly "process start -> first step done":
imports, dataset open, model + DeepSpeed engine, checkpoint load, ledger load, the epoch plan from
the cursor, the first micro-batch and one step. Cases run interleaved (0, 10k, 100k, 1M, 0, ...)
`--repeats` times so a busy neighbour hits every case alike; the median counts.

Replay: in this process, the same plan and DataLoader the trainer builds (`plan_epoch`,
`rank_micro_batches`, `make_loader` + `Collator` with the run's masking), iterated from the start:
every skipped micro-batch is read and collated, then discarded. Replay process-start-to-first-step
= the 0 case (a fresh start that loads the checkpoint) + that discard time.

Before any timing, one resumed run goes to completion from the 10k checkpoint and its saved ledger
is checked: the first resumed step trained exactly global batch C / B of the epoch's plan.

Target: the 1,000,000 case takes at most 1.2x the 0 case (ledger resume).

    python bench/bench_resume.py
    python bench/bench_resume.py --repeats 5 --consumed 0,100000,1000000 --replay-limit 100000
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402  (puts the repo on sys.path too)
import numpy as np  # noqa: E402

from lucatrain import checkpoint  # noqa: E402
from lucatrain.config import load_config  # noqa: E402
from lucatrain.data.batching import BatchSpec, padded_lengths, plan_epoch, rank_micro_batches  # noqa: E402
from lucatrain.data.collate import Collator, MaskingConfig  # noqa: E402
from lucatrain.data.prepared import is_prepared, load_prepared  # noqa: E402
from lucatrain.progress import STORE, Ledger  # noqa: E402
from lucatrain.state import read_state, write_state  # noqa: E402

# What the LucaOne family adds to the epoch's order key for the masked-LM tasks this bench trains.
ORDER_KEY_OF_FAMILY = {"obj_types": [0, 1]}
from lucatrain.trainer import MicroBatches, Trainer, make_loader  # noqa: E402

TARGET = 1.2  # time to first step at 1M consumed / at 0 consumed, at most
WINDOW_VERSION = 1  # bump when the window recipe changes, so the cache is rebuilt
STRIDES = (3, 4, 5)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--records", type=int, default=1_100_000, help="windows in the prepared dataset (a --consumed beyond one epoch adds whole epochs)")
    p.add_argument("--consumed", default="0,10000,100000,1000000", help="comma-separated samples consumed at resume")
    p.add_argument("--repeats", type=int, default=3, help="timed resumes per case (median)")
    p.add_argument("--replay-limit", type=int, default=1_000_000,
                   help="iterate at most this many skipped samples for replay; larger cases are extrapolated linearly")  # fmt: skip
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--hidden", type=int, default=32)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--max-length", type=int, default=66, help="tokens per sequence incl. CLS/SEP (windows are <= 64 nt)")
    p.add_argument("--ds-config", default="zero2", help="deepspeed.config of the runs")
    p.add_argument("--cache-dir", default=str(_common.BENCH_DIR / "out" / "resume"), help="windows FASTA + prepared dataset")
    p.add_argument("--keep", action="store_true", help="keep the run directories (printed) instead of a temp dir")
    p.add_argument("--out-dir", default=None, help="where <name>.json goes (default bench/results)")
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------- data


def write_windows(fasta_out: Path, records: int) -> dict:
    """Cut `records` windows of 48-64 nt out of the rRNA genes; each gets a distinct obj_id.

    Pass r starts every gene at offset r and steps 3, 4, 5, 3, ... nt; the window length cycles
    through 48..64 with the step count. One pass gives ~1.09M windows, so 1.1M needs a second.
    """
    from Bio.SeqIO.FastaIO import SimpleFastaParser

    with open(_common.RRNA_FASTA, encoding="utf-8") as handle:
        genes = [(title.split()[0], seq) for title, seq in SimpleFastaParser(handle)]
    n, passes = 0, 0
    tmp = fasta_out.with_suffix(".tmp")
    with open(tmp, "w", encoding="utf-8") as out:
        while n < records:
            made_this_pass = 0
            for gi, (gene_id, seq) in enumerate(genes):
                start, k = passes, gi
                while n < records:
                    length = 48 + (k * 7 + gi) % 17
                    if start + length > len(seq):
                        break
                    out.write(f">{gene_id}_p{passes}_{start}_{length}\n{seq[start : start + length]}\n")
                    n += 1
                    made_this_pass += 1
                    start += STRIDES[k % len(STRIDES)]
                    k += 1
                if n >= records:
                    break
            passes += 1
            if made_this_pass == 0:
                raise SystemExit(f"the rRNA genes cannot give {records} windows")
    os.replace(tmp, fasta_out)  # only a complete FASTA counts as cached
    return {"genes": len(genes), "gene_residues": sum(len(s) for _, s in genes), "passes": passes}


def prepared_windows(cache_dir: Path, records: int) -> tuple[Path, dict]:
    """The prepared dataset of `records` windows, built once (FASTA + `lucatrain prepare`) and cached."""
    root = cache_dir / f"windows-v{WINDOW_VERSION}-{records}"
    fasta, prepared = root / "windows.fasta", root / "prepared"
    info_path = root / "info.json"
    if is_prepared(prepared) and info_path.is_file():
        return prepared, {**json.loads(info_path.read_text()), "cached": True}
    root.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    info = write_windows(fasta, records)
    info["write_fasta_s"] = time.perf_counter() - started
    if prepared.exists():
        shutil.rmtree(prepared)
    started = time.perf_counter()
    cmd = [sys.executable, "-m", "lucatrain", "prepare", str(fasta), "--out", str(prepared), "--fasta-obj-type", "gene"]
    subprocess.run(cmd, check=True, cwd=_common.REPO)
    info["prepare_s"] = time.perf_counter() - started
    info["fasta_bytes"] = fasta.stat().st_size
    info_path.write_text(json.dumps(info, indent=1))
    return prepared, {**info, "cached": False}


# ---------------------------------------------------------------------------------- runs


def overrides(args, prepared: Path, run_dir: Path, **extra) -> list[str]:
    """The run's config, the same for the base run, every resume and this script's own plan."""
    values = {
        "train.output_dir": run_dir,
        "data.train_files": f"[{prepared}]",
        "tasks.names": "[gene_mask, prot_mask]",  # masked-LM only: what the baselines compute
        "data.dev_files": "[]",
        "data.max_length": args.max_length,
        "model.hidden_size": args.hidden,
        "model.num_hidden_layers": args.layers,
        "model.num_attention_heads": args.heads,
        "model.hidden_dropout_prob": 0.0,
        "train.batch_size": args.batch_size,
        "train.gradient_accumulation_steps": 1,
        "train.warmup_steps": 0,
        # constant: the schedule does not depend on max_steps, which differs per case
        "train.lr_scheduler": "constant",
        "train.num_train_epochs": 10_000,  # a resume after 1 B samples is in epoch 909 of 1.1 M records
        "train.progress_bar": "false",
        "deepspeed.config": args.ds_config,
        "deepspeed.precision": "fp32",
        **extra,
    }
    return [f"{k}={v}" for k, v in values.items()]


def train_cmd(args, prepared: Path, run_dir: Path, **extra) -> list[str]:
    return [sys.executable, "-m", "lucatrain", "train", "--config", "demo_tiny", *overrides(args, prepared, run_dir, **extra)]


def run_logged(cmd: list[str], run_dir: Path, env: dict | None = None) -> tuple[float, int]:
    """Run `cmd` from Popen to exit; (wall seconds, return code). Output goes to files beside the run
    directory (a new run refuses a directory that already holds files), not pipes."""
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(_log_of(run_dir, "stdout"), "w") as out, open(_log_of(run_dir, "stderr"), "w") as err:
        started = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=_common.REPO, env={**os.environ, **(env or {})}, stdout=out, stderr=err)
        code = proc.wait()
        return time.perf_counter() - started, code


def _log_of(run_dir: Path, stream: str) -> Path:
    return run_dir.with_name(f"{run_dir.name}.{stream}.txt")


def fail(run_dir: Path, what: str) -> None:
    log = _log_of(run_dir, "stderr")
    tail = log.read_text()[-3000:] if log.exists() else ""
    raise SystemExit(f"{what}\n--- stderr of {run_dir}\n{tail}")


def base_checkpoint(args, prepared: Path, work: Path) -> Path:
    """A real committed checkpoint: one optimizer step of the tiny model, saved at the end."""
    run = work / "base"
    seconds, code = run_logged(train_cmd(args, prepared, run, **{"train.max_steps": 1}), run)
    if code != 0:
        fail(run, f"the base training run exited {code}")
    print(f"base run (1 step, saves a checkpoint): {seconds:.1f} s")
    return checkpoint.find_resume_checkpoint(run / "checkpoints", "latest")


def trainer_spec(cfg, world: int = 1) -> BatchSpec:
    """The BatchSpec Trainer.__init__ builds (kept field for field)."""
    accumulation = cfg.train.gradient_accumulation_steps
    return BatchSpec(
        micro_batches_per_step=world * accumulation,
        batch_size=cfg.train.batch_size,
        max_tokens=cfg.data.max_tokens,
        max_length=cfg.data.max_length,
        sort_pool_size=cfg.data.bucket_size * world * accumulation * max(1, cfg.train.batch_size),
    )


def checkpoint_at(base: Path, dest_root: Path, consumed: int, data, cfg, plan: list[np.ndarray]) -> tuple[Path, int]:
    """A copy of `base` whose ledger says `consumed` samples were trained on: whole epochs, then the
    first samples of the next epoch's order.

    Within epoch 0 the ledger is built step by step as the trainer records it. Beyond one epoch (10 M,
    100 M, 1 B samples on a 1.1 M-record dataset) each finished epoch is one step of synthetic ids,
    written to the run's segment store as a checkpoint at the epoch's end writes it (about 8 GB at
    1 B): a resume reads none of them, which is what is measured.
    """
    spec = trainer_spec(cfg)
    global_batch = len(plan[0])
    per_epoch = len(plan) * global_batch
    epochs_done, rest = divmod(consumed, per_epoch)
    if rest % global_batch:
        raise SystemExit(f"--consumed {consumed} leaves {rest} samples in epoch {epochs_done}, not a multiple of the global batch {global_batch}")
    step = epochs_done * len(plan) + rest // global_batch
    dest = dest_root / checkpoint.checkpoint_name(step)
    shutil.copytree(base, dest, ignore=shutil.ignore_patterns("state", checkpoint.MANIFEST))
    # The key Trainer.epoch_order computes for a fresh epoch; a different one would make the
    # resume take the "order changed" path (exclude consumed ids by id) instead.
    key = {"seed": cfg.train.seed, "fingerprint": data.fingerprint, **spec.order_key(), **ORDER_KEY_OF_FAMILY, "prefix": 0}
    ledger = Ledger()
    store = dest_root / STORE
    rng = np.random.default_rng(consumed)
    for epoch in range(epochs_done):
        ledger.start_epoch(epoch, key, data.fingerprint)
        ledger.record_step((epoch + 1) * len(plan), epoch, 0, per_epoch, rng.integers(0, 2**62, per_epoch, dtype=np.int64), tokens=0)
        ledger.state_dict(store)
    epoch_plan = plan if epochs_done == 0 else plan_epoch(data.lengths, spec, cfg.train.seed, epochs_done, data.fingerprint)
    ledger.start_epoch(epochs_done, key, data.fingerprint)
    tokens = padded_lengths(data.lengths, cfg.data.max_length)
    for i, batch in enumerate(epoch_plan[: rest // global_batch]):
        start = i * global_batch
        ledger.record_step(epochs_done * len(plan) + i + 1, epochs_done, start, start + len(batch), data.sample_ids[batch],
                           int(tokens[batch].sum()))  # fmt: skip
    state = read_state(base / "state")
    state["trainer"].update(global_step=step, train_data=str(data.path), fingerprint=data.fingerprint)
    state["ledger"] = ledger.state_dict(store) if epochs_done else ledger.state_dict()
    write_state(dest / "state", state)
    checkpoint.write_manifest(dest, step, ledger.summary())
    assert checkpoint.read_valid_manifest(dest) is not None
    return dest, step


def timed_resume(args, prepared: Path, ckpt: Path, step: int, run_dir: Path) -> float:
    """Seconds from Popen to the SIGKILL that LUCATRAIN_FAULT fires right after the first resumed step."""
    cmd = train_cmd(args, prepared, run_dir, **{"train.trained_checkpoint": ckpt, "train.max_steps": step + 5})
    seconds, code = run_logged(cmd, run_dir, env={"LUCATRAIN_FAULT": f"step:{step + 1}"})
    if code != -signal.SIGKILL:
        fail(run_dir, f"resume from {ckpt} exited {code}, expected the SIGKILL after step {step + 1}")
    log = (run_dir / "logs" / "training.log").read_text()
    if f"resumed from {ckpt}: step {step}," not in log:
        fail(run_dir, f"no 'resumed from {ckpt}: step {step}' in {run_dir}/logs/training.log")
    return seconds


def verify_first_step(args, prepared: Path, ckpt: Path, step: int, run_dir: Path, data, plan, cfg) -> dict:
    """Resume to completion for one step and check the ledger it saves: the step after the
    checkpoint trained the next global batch of its epoch's order (plan_epoch of that epoch)."""
    cmd = train_cmd(args, prepared, run_dir, **{"train.trained_checkpoint": ckpt, "train.max_steps": step + 1})
    _, code = run_logged(cmd, run_dir)
    if code != 0:
        fail(run_dir, f"verification resume exited {code}")
    saved = run_dir / "checkpoints" / (run_dir / "checkpoints" / "latest").read_text().strip()
    ledger = Ledger.from_checkpoint(saved)
    global_step, epoch, start, end, _ = ledger.all_steps()[-1]
    want_epoch, in_epoch = divmod(step, len(plan))
    epoch_plan = plan if want_epoch == 0 else plan_epoch(data.lengths, trainer_spec(cfg), cfg.train.seed, want_epoch, data.fingerprint)
    batch = len(plan[0])
    want = data.sample_ids[epoch_plan[in_epoch]]
    ok = (global_step, epoch, start, end) == (step + 1, want_epoch, in_epoch * batch, (in_epoch + 1) * batch) and np.array_equal(
        ledger.step_ids(step + 1), want
    )
    return {"checkpoint_step": step, "resumed_step": [global_step, epoch, start, end], "ids_match_plan": bool(ok)}


# ---------------------------------------------------------------------------------- in-process parts


def bookkeeping_breakdown(ckpt: Path, data, cfg) -> dict:
    """The data-side resume work of Trainer, timed in this process on the real code.

    A Trainer shell (no engine) with the attributes epoch_order reads, so Trainer.epoch_order itself
    runs: the plan, the cursor search. Then what Trainer.steps() does before its first micro-batch:
    rank_micro_batches for every remaining global batch. These are the parts that can grow with C.
    """
    t0 = time.perf_counter()
    ledger = Ledger.from_checkpoint(ckpt)
    t1 = time.perf_counter()
    shell = Trainer.__new__(Trainer)
    shell.cfg, shell.train_data, shell.spec, shell.ledger = cfg, data, trainer_spec(cfg), ledger
    shell.family = type("FamilyShell", (), {"order_key": staticmethod(lambda: dict(ORDER_KEY_OF_FAMILY))})()
    shell.train_rows = np.arange(len(data))  # the masked-LM tasks train on every record
    shell._last_plan = None
    shell.logger = logging.getLogger("lucatrain")
    batches, position, _ = shell.epoch_order(ledger.epoch)
    t2 = time.perf_counter()
    micro_batches = MicroBatches(data, batches, None, ledger.epoch)  # what steps() builds; splits happen per fetch
    t3 = time.perf_counter()
    assert position == ledger.cursor and len(micro_batches) == len(batches)
    return {
        "ledger_load_s": t1 - t0,
        "epoch_order_s": t2 - t1,
        "split_remaining_s": t3 - t2,
        "remaining_steps": len(batches),
        "ledger_files_bytes": sum(f.stat().st_size for f in (ckpt / "state").iterdir()),
    }


def replay_discard(data, cfg, plan: list[np.ndarray], checkpoints: list[int], limit: int) -> dict[int, dict]:
    """Seconds a replay resume spends reading + collating + discarding the first C samples' micro-batches.

    The loader is built as Trainer.steps() builds it (whole epoch, from position 0); building it is
    part of a fresh start too, so only the iteration is timed. One pass, read at each C on the way.
    """
    masking = MaskingConfig(cfg.tasks.mask_prob, cfg.tasks.mask_token_prob, cfg.tasks.random_token_prob)
    collator = Collator(cfg.data.max_length, cfg.data.truncation, masking, cfg.train.seed)
    accumulation = cfg.train.gradient_accumulation_steps
    first = rank_micro_batches(plan[0], data.lengths, 1, 0, accumulation)[0]
    collator(data.rows(first), 0)  # the numba kernel compiles once per process: not replay's cost
    loader = iter(make_loader(MicroBatches(data, plan, collator, 0, 1, 0, accumulation), cfg.data.num_workers))
    global_batch = len(plan[0])
    out: dict[int, dict] = {}
    targets = sorted(c for c in checkpoints if c > 0)
    done_samples, elapsed = 0, 0.0
    started = time.perf_counter()
    for target in targets:
        goal = min(target, max(limit, global_batch))
        while done_samples < goal:
            for _ in range(accumulation):
                next(loader)
            done_samples += global_batch
        elapsed = time.perf_counter() - started
        measured = done_samples
        out[target] = {
            "discard_s": elapsed * target / measured,  # linear extrapolation when target > limit
            "measured_samples": measured,
            "measured_s": elapsed,
            "extrapolated": measured < target,
            "us_per_micro_batch": elapsed / (measured // global_batch * accumulation) * 1e6,
        }
    out[0] = {"discard_s": 0.0, "measured_samples": 0, "measured_s": 0.0, "extrapolated": False, "us_per_micro_batch": None}
    return out


# ---------------------------------------------------------------------------------- main


def ratio_line_at_most(name: str, value: float, target: float) -> tuple[str, bool]:
    """The RATIO line of _common, for a target that is a maximum (lower is better)."""
    ok = value <= target
    return f"RATIO {name}={value:.3f} target=<={target:g} {'PASS' if ok else 'FAIL'}", ok


def main(argv=None) -> int:
    args = parse_args(argv)
    consumed = sorted({int(x) for x in args.consumed.split(",") if x} | {0})
    load_before = _common.warn_if_busy()

    prepared, data_info = prepared_windows(Path(args.cache_dir), args.records)
    data = load_prepared(prepared)
    print(f"data: {len(data):,} windows of {int(data.lengths.min())}-{int(data.lengths.max())} nt from "
          f"{data_info['genes']:,} rRNA genes, prepared at {prepared}"
          + (" (cached)" if data_info["cached"] else f" in {data_info['prepare_s']:.1f} s"))  # fmt: skip

    work_parent = Path(tempfile.mkdtemp(prefix="bench-resume-")) if not args.keep else Path(args.cache_dir) / "runs"
    if work_parent.exists() and args.keep:
        shutil.rmtree(work_parent)
    work_parent.mkdir(parents=True, exist_ok=True)
    if args.keep:
        print(f"run directories: {work_parent}")
    try:
        cfg = load_config("demo_tiny", overrides(args, prepared, work_parent / "plan"))
        plan = plan_epoch(data.lengths, trainer_spec(cfg), cfg.train.seed, 0, data.fingerprint)
        base = base_checkpoint(args, prepared, work_parent)
        ckpts = {c: checkpoint_at(base, work_parent / f"consumed-{c}", c, data, cfg, plan) for c in consumed}

        smallest = min((c for c in consumed if c > 0), default=0)
        verified = verify_first_step(args, prepared, *ckpts[smallest], work_parent / "verify", data, plan, cfg)
        print(f"verified: resuming at {smallest:,} consumed, the first step trained plan batch "
              f"{verified['checkpoint_step']} (positions {verified['resumed_step'][2]}-{verified['resumed_step'][3]}): "
              f"{'ids match' if verified['ids_match_plan'] else 'IDS DIFFER'}")  # fmt: skip

        times: dict[int, list[float]] = {c: [] for c in consumed}
        for r in range(args.repeats):
            # Interleaved, so a slow moment of the machine hits every case alike, and rotated, so no
            # case always runs first (right after another process left the page cache warm or cold).
            for c in consumed[r % len(consumed):] + consumed[: r % len(consumed)]:
                ckpt, step = ckpts[c]
                times[c].append(timed_resume(args, prepared, ckpt, step, work_parent / f"resume-{c}-r{r}"))
            print(f"repeat {r + 1}/{args.repeats}: " + ", ".join(f"{c:,}: {times[c][-1]:.2f} s" for c in consumed))

        breakdown = {c: bookkeeping_breakdown(ckpts[c][0], data, cfg) for c in consumed}
        replay = replay_discard(data, cfg, plan, consumed, args.replay_limit)
    finally:
        if not args.keep:
            shutil.rmtree(work_parent, ignore_errors=True)
    load_after = _common.other_load()

    median = {c: statistics.median(times[c]) for c in consumed}
    zero = median[0]
    # Trainer.steps() splits every *remaining* global batch into micro-batches before the first step,
    # so the 0 case does more of that than a late resume. Swapping the measured split times gives the
    # ratio at equal remaining work: what the ledger itself (load, cursor, plan) costs.
    for c in consumed:
        b = breakdown[c]
        b["ratio_to_0_same_remaining"] = (median[c] - b["split_remaining_s"] + breakdown[0]["split_remaining_s"]) / zero
    rows, results = [], []
    for c in consumed:
        replay_total = zero + replay[c]["discard_s"]
        results.append({
            "consumed": c, "step": ckpts[c][1], "ledger_resume_s": median[c], "ledger_resume_runs_s": times[c],
            "ledger_ratio_to_0": median[c] / zero, "replay_resume_s": replay_total, "replay_ratio_to_0": replay_total / zero,
            "replay_discard": replay[c], "bookkeeping": breakdown[c],
        })  # fmt: skip
        note = " (extrapolated)" if replay[c]["extrapolated"] else ""
        rows.append([f"{c:,}", median[c], median[c] / zero, f"{replay_total:.2f}{note}", replay_total / zero,
                     replay[c]["discard_s"]])  # fmt: skip

    print(f"\nprocess start -> first resumed optimizer step done (median of {args.repeats}; 1 process, "
          f"hidden {args.hidden}, {args.layers} layers, batch {args.batch_size}, {len(data):,} records)")  # fmt: skip
    _common.print_table(["consumed", "ledger resume s", "ratio to 0", "replay resume s", "ratio to 0", "replay discard s"], rows)
    for c in consumed:
        if replay[c]["extrapolated"]:
            print(f"replay at {c:,}: measured {replay[c]['measured_samples']:,} samples in {replay[c]['measured_s']:.2f} s, "
                  f"extrapolated linearly to {c:,}")  # fmt: skip
    print("\nresume bookkeeping inside the trainer, timed in this process (the parts that depend on C):")
    _common.print_table(
        ["consumed", "state files bytes", "Ledger.from_checkpoint s", "epoch_order s", "rank split of remaining s", "remaining steps",
         "ratio to 0, same remaining"],
        [[f"{c:,}", b["ledger_files_bytes"], b["ledger_load_s"], b["epoch_order_s"], b["split_remaining_s"], b["remaining_steps"],
          b["ratio_to_0_same_remaining"]] for c, b in breakdown.items()],
    )  # fmt: skip
    if max(load_before, load_after) > 0.3:
        print(f"NOTE: other processes kept {max(load_before, load_after):.1f} CPUs busy around this run; rerun on a quiet machine")

    largest = consumed[-1]
    name = f"resume_ledger_{largest}_over_0"
    line, ok = ratio_line_at_most(name, median[largest] / zero, TARGET)
    print(line)
    replay_ratio = results[-1]["replay_ratio_to_0"]
    print(f"for comparison (no target): replay_{largest}_over_0={replay_ratio:.3f}"
          + (" (extrapolated)" if replay[largest]["extrapolated"] else ""))  # fmt: skip
    path = _common.write_results(
        "resume",
        {
            "settings": {k: v for k, v in vars(args).items() if k != "out_dir"},
            "data": {**data_info, "records": len(data), "prepared": str(prepared)},
            "other_processes_cpus_busy": {"before": load_before, "after": load_after},
            "verification": verified,
            "results": results,
            "ratios": [{"name": name, "value": median[largest] / zero, "target": f"<={TARGET}", "pass": ok},
                       {"name": f"replay_{largest}_over_0", "value": replay_ratio, "target": None, "pass": None}],
        },
        args.out_dir,
    )  # fmt: skip
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
