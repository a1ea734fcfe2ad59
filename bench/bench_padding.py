"""Padding efficiency: fixed micro-batches of 8 vs the token budget, on real length distributions.

efficiency = real tokens / tokens computed = sum of sequence lengths / sum over micro-batches of
B x L_max, where a length is what the collator produces ([CLS] + residues + [SEP], truncated to
max_length) and L_max is the longest in the micro-batch (the collator pads to it).

Data: the shipped rRNA genes FASTA (3,018 genes) + Swiss-Prot sample (100 proteins), prepared with
lucatrain.data.prepared.prepare into a temp dir; max_length 1026 (the target), and also 3074 (LucaVirus)
because at 1026 about 95% of these rRNA genes are truncated to the same length, which makes even
fixed batches pad little; at 3074 the lengths spread (p10 1289, p90 1773, max 3074).

The epoch plans come from lucatrain.data.batching exactly as Trainer builds them: the same BatchSpec
fields (micro_batches_per_step = world x accumulation, sort_pool_size = bucket_size x world x
accumulation x batch_size), `plan_epoch`, then `rank_micro_batches` for every rank.

  fixed   BatchSpec(max_tokens=0, batch_size=8): 8 records per micro-batch, padded to the longest
  budget  BatchSpec(max_tokens = 8 x max_length, 8208 at 1026): length-sorted pools, B x L_max <= budget

Topologies: world 1 x accumulation 1 and world 2 x accumulation 2. Averaged over `--epochs`
epochs. The figures from the plan are cross-checked against real Collator output for world 1.

    python bench/bench_padding.py
    python bench/bench_padding.py --max-lengths 1026 --budget-factor 16 --epochs 5
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402  (puts the repo on sys.path too)
import numpy as np  # noqa: E402

from lucatrain.config import DataConfig  # noqa: E402
from lucatrain.data.batching import BatchSpec, padded_lengths, plan_epoch, rank_micro_batches  # noqa: E402
from lucatrain.data.collate import Collator  # noqa: E402
from lucatrain.data.prepared import prepare  # noqa: E402

TARGET = 0.90


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--max-lengths", default="1026,3074", help="comma-separated data.max_length values")
    p.add_argument("--batch-size", type=int, default=8, help="records per micro-batch in fixed mode")
    p.add_argument("--budget-factor", type=int, default=8, help="token budget = this x max_length (8 x 1026 = 8208)")
    p.add_argument("--bucket-size", type=int, default=DataConfig().bucket_size, help="data.bucket_size (trainer default)")
    p.add_argument("--topologies", default="1x1,2x2", help="comma-separated WORLDxACCUMULATION")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--seed", type=int, default=1221, help="train.seed (trainer default)")
    p.add_argument("--no-collate-check", action="store_true", help="skip the cross-check against Collator output")
    p.add_argument("--out-dir", default=None, help="where <name>.json goes (default bench/results)")
    return p.parse_args(argv)


def trainer_spec(world: int, accumulation: int, batch_size: int, max_tokens: int, max_length: int, bucket_size: int) -> BatchSpec:
    """The BatchSpec Trainer.__init__ builds for these settings (kept field for field)."""
    return BatchSpec(
        micro_batches_per_step=world * accumulation,
        batch_size=batch_size,
        max_tokens=max_tokens,
        max_length=max_length,
        sort_pool_size=bucket_size * world * accumulation * max(1, batch_size),
    )


def measure(data, spec: BatchSpec, world: int, accumulation: int, epochs: int, seed: int) -> dict:
    tokens = padded_lengths(data.lengths, spec.max_length)
    real = computed = micro = samples = steps = 0
    largest = 0
    imbalance = []  # per step: busiest rank's computed tokens / mean over ranks
    micro_batches_w1 = []  # world-1 micro-batches of epoch 0, for the collator cross-check
    for epoch in range(epochs):
        for batch in plan_epoch(data.lengths, spec, seed, epoch, data.fingerprint):
            steps += 1
            per_rank = []
            for rank in range(world):
                mine = rank_micro_batches(batch, data.lengths, world, rank, accumulation)
                assert len(mine) == accumulation
                rank_computed = 0
                for mb in mine:
                    t = tokens[mb]
                    real += int(t.sum())
                    rank_computed += len(mb) * int(t.max())
                    largest = max(largest, len(mb) * int(t.max()))
                    micro += 1
                    samples += len(mb)
                    if epoch == 0 and world == 1:
                        micro_batches_w1.append(mb)
                computed += rank_computed
                per_rank.append(rank_computed)
            imbalance.append(max(per_rank) / (sum(per_rank) / world))
    return {
        "efficiency": real / computed,
        "real_tokens": real,
        "computed_tokens": computed,
        "steps_per_epoch": steps / epochs,
        "micro_batches": micro,
        "mean_micro_batch_size": samples / micro,
        "mean_computed_tokens_per_micro_batch": computed / micro,
        "largest_micro_batch_tokens": largest,
        "samples_used_share": samples / (epochs * len(data)),
        "rank_imbalance": float(np.mean(imbalance)),
        "_w1_epoch0": micro_batches_w1,
    }


def collate_check(data, micro_batches: list[np.ndarray], max_length: int) -> float:
    """Efficiency measured on the collator's real tensors: attention_mask.sum() / numel()."""
    collate = Collator(max_length)
    real = computed = 0
    for mb in micro_batches:
        mask = collate(data.rows(mb), 0)["attention_mask"]
        real += int(mask.sum())
        computed += mask.numel()
    return real / computed


def main(argv=None) -> int:
    args = parse_args(argv)
    topologies = [tuple(int(x) for x in t.split("x")) for t in args.topologies.split(",") if t]
    max_lengths = [int(x) for x in args.max_lengths.split(",") if x]
    results, verdicts, data_info = [], [], {}
    with tempfile.TemporaryDirectory(prefix="bench-padding-") as tmp:
        data = prepare([str(_common.RRNA_FASTA), str(_common.SWISSPROT_DAT)], Path(tmp) / "prepared")
        data_info = {"records": len(data), "obj_type_counts": data.meta["obj_type_counts"], "per_max_length": {}}
        for max_length in max_lengths:
            max_tokens = args.budget_factor * max_length
            lengths = padded_lengths(data.lengths, max_length)
            data_info["per_max_length"][max_length] = {
                "token_percentiles": {str(q): float(np.percentile(lengths, q)) for q in (0, 10, 50, 90, 100)},
                "truncated_share": float((data.lengths + 2 > max_length).mean()),
            }
            rows = []
            for world, accumulation in topologies:
                for mode, budget in (("fixed", 0), ("token budget", max_tokens)):
                    spec = trainer_spec(world, accumulation, args.batch_size, budget, max_length, args.bucket_size)
                    r = measure(data, spec, world, accumulation, args.epochs, args.seed)
                    w1 = r.pop("_w1_epoch0")
                    if world == 1 and not args.no_collate_check:
                        r["collator_efficiency_epoch0"] = collate_check(data, w1, max_length)
                    r.update(mode=mode, max_length=max_length, world=world, accumulation=accumulation, max_tokens=budget)
                    results.append(r)
                    rows.append([mode, f"{world}x{accumulation}", budget or f"B={args.batch_size}", r["efficiency"],
                                 r.get("collator_efficiency_epoch0", "-"), f"{r['steps_per_epoch']:.1f}", r["mean_micro_batch_size"],
                                 r["mean_computed_tokens_per_micro_batch"], r["largest_micro_batch_tokens"],
                                 r["samples_used_share"], r["rank_imbalance"]])  # fmt: skip
            info = data_info["per_max_length"][max_length]
            print(f"\nmax_length {max_length}: {len(data)} records {data.meta['obj_type_counts']}, tokens per record "
                  "(CLS/SEP included, truncated) p0/p10/p50/p90/p100 = "
                  + "/".join(f"{v:.0f}" for v in info["token_percentiles"].values())
                  + f", {info['truncated_share']:.0%} truncated; {args.epochs} epochs")  # fmt: skip
            _common.print_table(
                ["mode", "WxA", "per micro-batch", "efficiency", "collator check", "steps/epoch", "mean B",
                 "mean B x Lmax", "max B x Lmax", "samples used", "rank imbalance"],
                rows,
            )  # fmt: skip

    print()
    for r in results:
        if r["mode"] == "token budget":
            name = f"padding_efficiency_token_budget_L{r['max_length']}_w{r['world']}a{r['accumulation']}"
            line, ok = _common.ratio_line(name, r["efficiency"], TARGET)
            verdicts.append({"name": name, "value": r["efficiency"], "target": TARGET, "pass": ok})
            print(line)
    path = _common.write_results(
        "padding",
        {"settings": {k: v for k, v in vars(args).items() if k != "out_dir"}, "data": data_info,
         "results": results, "ratios": verdicts},
        args.out_dir,
    )  # fmt: skip
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
