"""Training throughput: lucatrain's Trainer.train_step vs a minimal hand-written PyTorch loop.

Both sides train the same LucaGPLM (same config, same initial weights) on the SAME collated
micro-batches, taken from `trainer.steps()` before any timing starts, with torch's AdamW and the same
hyperparameters. What differs is only what lucatrain adds around the model:

  lucatrain  `trainer.train_step([mb])`: per-task target counting + all_reduce of the counts,
             DeepSpeed engine forward (hooks), PretrainTask (per-task loss sums, accuracy report),
             engine.backward / engine.step (DeepSpeed clipping, ZeRO bookkeeping, LR scheduler),
             float() of every report value.
  baseline   forward -> LM head on masked positions -> cross entropy -> backward ->
             clip_grad_norm_ -> AdamW.step -> zero_grad.

Tokens are real tokens (`batch["num_tokens"]`: CLS/SEP included, padding excluded). The two sides
alternate step by step on the same micro-batch (who goes first alternates too), so a slow phase of
the machine hits both. The ratio is lucatrain tokens/s over baseline tokens/s, taken as the median
of the per-micro-batch ratios (robust to a neighbour process stealing a core for a few steps); the
ratio of the totals is reported beside it and agrees with it on a quiet machine.

A short per-phase breakdown of both steps is always printed: it is what tells *why* a ratio
misses its target (DeepSpeed step overhead, report syncs, ...).

    python bench/bench_train_throughput.py                     # zero0 + zero2, ~1 min on 2 quiet cores
    python bench/bench_train_throughput.py --steps 100 --configs zero2 --threads 1
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402  (puts the repo on sys.path too)
import torch
import torch.nn.functional as F

from lucatrain import dist
from lucatrain.config import load_config
from lucatrain.data import alphabet
from lucatrain.models.lucagplm import LucaGPLM, LucaGPLMConfig
from lucatrain.task import to_device
from lucatrain.trainer import Trainer

TARGET = 0.95


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default="zero0,zero2", help="comma-separated deepspeed.config values (shipped names or JSON paths)")
    p.add_argument("--steps", type=int, default=40, help="timed optimizer steps per side and config")
    p.add_argument("--warmup", type=int, default=4, help="untimed steps per side first (allocator, oneDNN, AdamW state)")
    p.add_argument("--profile-steps", type=int, default=6, help="steps of the per-phase breakdown (0 = skip)")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--max-length", type=int, default=258, help="tokens per sequence incl. CLS/SEP")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--train-file", default=str(_common.LUCAONE_TRAIN))
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch intra-op threads, set for both sides")
    p.add_argument("--torch-profile", action="store_true", help="also print torch.profiler's top ops of one lucatrain step")
    p.add_argument("--out-dir", default=None, help="where <name>.json goes (default bench/results)")
    return p.parse_args(argv)


def trainer_overrides(args, ds_config: str, tmp: Path) -> list[str]:
    values = {
        "train.output_dir": tmp / f"run-{Path(ds_config).stem}",
        "data.cache_dir": tmp / "cache",
        "data.train_files": f"[{args.train_file}]",
        "tasks.names": "[gene_mask, prot_mask]",  # masked-LM only: what the baselines compute
        "data.dev_files": "[]",
        "data.max_length": args.max_length,
        "data.num_workers": 0,
        "model.hidden_size": args.hidden,
        "model.num_hidden_layers": args.layers,
        "model.num_attention_heads": args.heads,
        "model.hidden_dropout_prob": 0.0,
        "train.batch_size": args.batch_size,
        "train.gradient_accumulation_steps": 1,
        # Constant LR: the baseline has no scheduler, and the LR value does not change the cost.
        "train.warmup_steps": 0,
        "train.lr_scheduler": "constant",
        "train.progress_bar": "false",
        "logger.tensorboard": "false",
        "logger.level": "WARNING",
        "deepspeed.config": ds_config,
        "deepspeed.precision": "fp32",
    }
    return [f"{k}={v}" for k, v in values.items()]


# ---------------------------------------------------------------------------------- the baseline


def make_baseline(trainer: Trainer, initial: dict[str, torch.Tensor]):
    """A plain LucaGPLM + torch AdamW with the trainer's config, hyperparameters and initial weights."""
    model = LucaGPLM(LucaGPLMConfig(**trainer.family.model.config.to_dict()))
    model.load_state_dict(initial)
    model.train()
    t = trainer.cfg.train
    # The usual BERT split, written out here rather than borrowed from lucatrain: matrices decay,
    # biases and LayerNorm weights do not.
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=t.learning_rate,
        betas=(t.adam_beta1, t.adam_beta2),
        eps=t.adam_epsilon,
    )
    return model, optimizer, t.max_grad_norm


def baseline_loss(model: LucaGPLM, batch: dict) -> torch.Tensor:
    hidden = model(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"])
    selected = batch["labels"] != alphabet.IGNORE_INDEX
    logits = model.mlm_logits(hidden[selected])  # LM head on the masked positions only
    return F.cross_entropy(logits, batch["labels"][selected])


def baseline_step(model, optimizer, max_grad_norm: float, batch: dict) -> None:
    loss = baseline_loss(model, batch)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


# ---------------------------------------------------------------------------------- timing


def run_config(args, ds_config: str, tmp: Path) -> dict:
    trainer = Trainer(load_config("demo_tiny", trainer_overrides(args, ds_config, tmp)))
    torch.set_num_threads(args.threads)  # after DeepSpeed init, in case it changed the setting
    initial = trainer.engine.full_state_dict(trainer.family.model)
    model, optimizer, max_norm = make_baseline(trainer, initial)

    # Every micro-batch both sides will see, collated up front so that neither side times data work.
    needed = args.warmup + args.steps + args.profile_steps
    stream = trainer.steps()
    batches = [next(stream)[3][0] for _ in range(needed)]  # (epoch, rows, position, micro-batches)
    lucatrain_step = lambda mb: trainer.train_step([mb])  # noqa: E731
    plain_step = lambda mb: baseline_step(model, optimizer, max_norm, mb)  # noqa: E731

    # Same weights and batch -> the same first loss: the two sides compute the same thing.
    first = batches[0]
    with torch.no_grad():
        plain_first = float(baseline_loss(model, first))
    report = trainer.train_step([first])
    luca_first = sum(report[f"{n}/loss_sum"] for n in trainer.task.task_names) / sum(
        report[f"{n}/count"] for n in trainer.task.task_names
    )
    plain_step(first)
    for mb in batches[1 : args.warmup]:
        lucatrain_step(mb)
        plain_step(mb)

    # Timed steps alternate one by one (and who goes first alternates too), each side on the same
    # micro-batch. On a shared 2-core machine a neighbour process can slow a step several-fold
    # (torch's threads wait on each other), so the verdict uses the median of the per-batch
    # ratios, which such bursts barely move; the plain totals are reported beside it.
    timed = batches[args.warmup : args.warmup + args.steps]
    times = _common.alternate_timing(timed, {"lucatrain": lucatrain_step, "baseline": plain_step})
    tokens = sum(int(mb["num_tokens"]) for mb in timed)
    paired = [b / a for a, b in zip(times["lucatrain"], times["baseline"])]
    result = {
        "ds_config": ds_config,
        "zero_stage": trainer.engine.zero_stage,
        "steps": len(timed),
        "tokens": tokens,
        "tokens_per_step": tokens / len(timed),
        "lucatrain_s": sum(times["lucatrain"]),
        "baseline_s": sum(times["baseline"]),
        "lucatrain_tokens_per_s": tokens / sum(times["lucatrain"]),
        "baseline_tokens_per_s": tokens / sum(times["baseline"]),
        "lucatrain_median_step_ms": _median_ms(times["lucatrain"]),
        "baseline_median_step_ms": _median_ms(times["baseline"]),
        "ratio": statistics.median(paired),
        "ratio_of_totals": sum(times["baseline"]) / sum(times["lucatrain"]),
        "paired_ratio_quartiles": statistics.quantiles(paired, n=4) if len(paired) > 1 else paired,
        "first_step_loss": {"lucatrain": luca_first, "baseline": plain_first},
    }
    if args.profile_steps:
        extra = batches[args.warmup + args.steps :]
        result["phases_ms"] = profile_phases(trainer, model, optimizer, max_norm, extra)
    if args.torch_profile:
        torch_profile(trainer, batches[-1])
    return result


def _median_ms(samples: list[float]) -> float:
    return 1000 * statistics.median(samples)


def profile_lucatrain(trainer: Trainer, mb: dict) -> dict:
    """One Trainer.train_step, phase by phase (the same calls in the same order, each timed).
    On CPU every op runs synchronously, so wall-clock per phase is the phase's cost."""
    engine, task = trainer.engine, trainer.task
    t0 = time.perf_counter()
    counts = {k: float(v) for k, v in task.count_targets(mb).items()}
    totals = dist.all_reduce_dict(counts, engine.device)
    t1 = time.perf_counter()
    loss, report = engine(to_device(mb, engine.device), totals)
    t2 = time.perf_counter()
    engine.backward(loss)
    t3 = time.perf_counter()
    engine.step()
    t4 = time.perf_counter()
    {k: float(v) for k, v in report.items()}
    t5 = time.perf_counter()
    keys = ("count_targets", "forward", "backward", "engine_step", "report_float", "total")
    return dict(zip(keys, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4, t5 - t0)))


def profile_baseline(model, optimizer, max_norm, mb: dict) -> dict:
    t0 = time.perf_counter()
    loss = baseline_loss(model, mb)
    t1 = time.perf_counter()
    loss.backward()
    t2 = time.perf_counter()
    torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    t3 = time.perf_counter()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    t4 = time.perf_counter()
    keys = ("forward", "backward", "clip", "optimizer_step", "total")
    return dict(zip(keys, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t4 - t0)))


def profile_phases(trainer, model, optimizer, max_norm, batches: list[dict]) -> dict:
    """Median ms per phase over `batches`, the two sides alternating batch by batch."""
    samples = {"lucatrain": [], "baseline": []}
    for mb in batches:
        samples["lucatrain"].append(profile_lucatrain(trainer, mb))
        samples["baseline"].append(profile_baseline(model, optimizer, max_norm, mb))
    return {side: {k: _median_ms([s[k] for s in runs]) for k in runs[0]} for side, runs in samples.items()}


def torch_profile(trainer: Trainer, mb: dict) -> None:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        trainer.train_step([mb])
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))


# ---------------------------------------------------------------------------------- main


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.steps < 2:
        sys.exit("--steps must be >= 2")
    torch.set_num_threads(args.threads)
    _common.quiet_deepspeed()
    load_before = _common.warn_if_busy()
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-throughput-") as tmp:
        for ds_config in [c for c in args.configs.split(",") if c]:
            results.append(run_config(args, ds_config, Path(tmp)))

    load_after = _common.other_load()
    print()
    print(f"model: hidden {args.hidden}, {args.layers} layers, {args.heads} heads, max_length {args.max_length}, "
          f"batch {args.batch_size}, fp32, {torch.get_num_threads()} threads; {args.steps} timed steps per side")  # fmt: skip
    _common.print_table(
        ["config", "tokens/step", "lucatrain tok/s", "baseline tok/s", "median step ms (luca/base)", "ratio (median)",
         "ratio of totals", "first loss (luca/base)"],
        [
            [
                r["ds_config"],
                r["tokens_per_step"],
                r["lucatrain_tokens_per_s"],
                r["baseline_tokens_per_s"],
                f"{r['lucatrain_median_step_ms']:.1f}/{r['baseline_median_step_ms']:.1f}",
                r["ratio"],
                r["ratio_of_totals"],
                f"{r['first_step_loss']['lucatrain']:.5f}/{r['first_step_loss']['baseline']:.5f}",
            ]
            for r in results
        ],
    )
    if args.profile_steps:
        print(f"\nper-phase median ms over {args.profile_steps} steps:")
        for r in results:
            for side in ("lucatrain", "baseline"):
                phases = "  ".join(f"{k}={v:.1f}" for k, v in r["phases_ms"][side].items())
                print(f"  {r['ds_config']:>6} {side:>9}: {phases}")
    if max(load_before, load_after) > 0.3:
        print(f"NOTE: other processes kept {max(load_before, load_after):.1f} CPUs busy around this run; rerun on a quiet machine")

    verdicts = []
    for r in results:
        name = f"train_throughput_{Path(r['ds_config']).stem}"
        line, ok = _common.ratio_line(name, r["ratio"], TARGET)
        verdicts.append({"name": name, "value": r["ratio"], "target": TARGET, "pass": ok})
        print(line)
    path = _common.write_results(
        "train_throughput",
        {
            "settings": {k: v for k, v in vars(args).items() if k != "out_dir"},
            "other_processes_cpus_busy": {"before": load_before, "after": load_after},
            "results": results,
            "ratios": verdicts,
        },
        args.out_dir,
    )
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
