"""GradCache against the plain contrastive step: the largest batch within a fixed memory budget, and
the step time at an equal batch.

The towers are the CLIBD family's (image ViT, DNA BERT, text BERT; sizes below), the batch is real
rows of the shipped sample (examples/data/clibd_sample.hdf5, repeated to reach the batch size) collated
by the family's collator, and the loss is lucatrain's ContrastiveLoss over the three pairs. Both sides
run in this process, on the same towers, with plain PyTorch autograd (no DeepSpeed: what is measured is
the step's own memory, not the engine's buffers).

Memory is the peak of tensor bytes the step allocates on top of weights, gradients and the batch
(`LiveTensorBytes` from bench_memory.py: every new storage counted until torch frees it).

  budget      = the plain step's peak at --budget-batch samples
  plain max   = the largest power-of-two batch whose plain step fits the budget
  cache max   = the largest power-of-two batch whose GradCache step (micro-batches of --chunk) fits it
  targets     : cache max / plain max >= 8;  GradCache step time / plain step time at --budget-batch <= 1.5
                (printed as plain / GradCache speed >= 0.667)

    python bench/bench_grad_cache.py
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402
import torch  # noqa: E402

from bench_memory import LiveTensorBytes  # noqa: E402

SAMPLE = _common.DATA / "clibd_sample.hdf5"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budget-batch", type=int, default=64)
    p.add_argument("--chunk", type=int, default=16)
    p.add_argument("--max-batch", type=int, default=4096)
    p.add_argument("--repeats", type=int, default=3, help="timed steps per side (the median counts)")
    return p.parse_args(argv)


def setup():
    from lucatrain.config import load_config
    from lucatrain.contrastive import ContrastiveLoss, pair_graph
    from lucatrain.data.clibd_hdf5 import ClibdHdf5
    from lucatrain.families.clibd.data import COLUMNS, ClibdCollator, text_vocabulary
    from lucatrain.families.clibd.task import ClibdTask
    from lucatrain.families.clibd.towers import build_towers

    cfg = load_config("clibd_tiny", ["clibd.dropout=0.0", "clibd.image.resize=64", "clibd.image.crop=64",
                                     "clibd.image.hidden_size=128", "clibd.image.num_hidden_layers=4",
                                     "clibd.dna.hidden_size=128", "clibd.dna.num_hidden_layers=4"])  # fmt: skip
    data = ClibdHdf5(SAMPLE)
    group = "no_split_and_seen_train"
    rows = [data.specimen(group, i) for i in range(data.num_specimens(group))]
    words = sorted({w for r in rows for w in " ".join(r["taxonomy"].values()).lower().split()})
    vocab = text_vocabulary(words)
    c = cfg.clibd
    collate = ClibdCollator({group: str(SAMPLE)}, tuple(c.modalities), 0, c.image.resize, c.image.crop, c.dna_k, c.dna_length,
                            vocab, c.text_max_length)  # fmt: skip
    torch.manual_seed(0)
    task = ClibdTask(build_towers(cfg, len(vocab)), ContrastiveLoss(pair_graph(c.modalities)), False, "", [1], ["genus"],
                     "all_keys", "val_seen", "val_unseen")  # fmt: skip
    columns = {name: [] for name in COLUMNS}
    for i, r in enumerate(rows):
        columns["sample_id"].append(i)
        columns["group"].append(group)
        columns["index"].append(i)
        columns["barcode"].append(r["barcode"])
        for rank, name in r["taxonomy"].items():
            columns[rank].append(name)

    def batch_of(n: int) -> dict:
        picked = [i % len(rows) for i in range(n)]
        return collate({k: [v[i] for i in picked] for k, v in columns.items()}, epoch=0)

    return task.train(), batch_of


def plain_step(task, batch) -> float:
    present = {m: torch.ones(len(batch["sample_ids"]), dtype=torch.bool) for m in task.towers}
    share, _ = task.loss(task.embed(batch), present, task.logit_scale)
    share.backward()
    return float(share.detach())


def cached_step(task, batch, chunk: int) -> float:
    from lucatrain.contrastive import grad_cache_step

    n = len(batch["sample_ids"])
    chunks = [{k: v[i : i + chunk] for k, v in batch.items()} for i in range(0, n, chunk)]
    present = {m: torch.ones(n, dtype=torch.bool) for m in task.towers}
    share, _ = grad_cache_step(task.embed, chunks, lambda z, scale: task.loss(z, present, scale), task.logit_scale,
                               lambda surrogate: surrogate.backward())  # fmt: skip
    return float(share)


def peak_bytes(task, step) -> int:
    task.zero_grad(set_to_none=False)
    gc.collect()
    tracker = LiveTensorBytes()
    with tracker:
        step()
    return tracker.peak


def largest_fitting(task, batch_of, budget: int, step, start: int, limit: int) -> tuple[int, dict]:
    fits, peaks, n = 0, {}, start
    while n <= limit:
        peaks[n] = peak_bytes(task, lambda: step(task, batch_of(n)))
        if peaks[n] > budget:
            break
        fits, n = n, n * 2
    return fits, peaks


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def main(argv=None) -> int:
    args = parse_args(argv)
    task, batch_of = setup()
    for p in task.parameters():  # gradients exist before the measured steps: they are not the step's memory
        p.grad = torch.zeros_like(p)
    plain_step(task, batch_of(8))  # warm-up
    budget = peak_bytes(task, lambda: plain_step(task, batch_of(args.budget_batch)))
    plain_max, plain_peaks = largest_fitting(task, batch_of, budget, plain_step, args.chunk, args.max_batch)
    cache_max, cache_peaks = largest_fitting(task, batch_of, budget, lambda t, b: cached_step(t, b, args.chunk), args.chunk, args.max_batch)
    batch = batch_of(args.budget_batch)
    plain_time = median_time(lambda: (task.zero_grad(), plain_step(task, batch)), args.repeats)
    cache_time = median_time(lambda: (task.zero_grad(), cached_step(task, batch, args.chunk)), args.repeats)
    mib = 2**20
    print(f"budget: plain step at batch {args.budget_batch} = {budget / mib:.1f} MiB of tensors")
    print("batch   plain MiB   GradCache MiB (micro-batches of %d)" % args.chunk)
    for n in sorted(set(plain_peaks) | set(cache_peaks)):
        plain = f"{plain_peaks[n] / mib:9.1f}" if n in plain_peaks else " " * 9
        cache = f"{cache_peaks[n] / mib:9.1f}" if n in cache_peaks else ""
        print(f"{n:5d}   {plain}   {cache}")
    print(f"step time at batch {args.budget_batch}: plain {plain_time * 1e3:.0f} ms, GradCache {cache_time * 1e3:.0f} ms")
    results = {
        "budget_batch": args.budget_batch, "chunk": args.chunk, "budget_bytes": budget,
        "plain_max_batch": plain_max, "grad_cache_max_batch": cache_max,
        "plain_peaks": plain_peaks, "grad_cache_peaks": cache_peaks,
        "plain_step_s": plain_time, "grad_cache_step_s": cache_time,
        "batch_ratio": cache_max / max(plain_max, 1), "time_ratio": cache_time / plain_time,
    }  # fmt: skip
    print(_common.ratio_line("grad_cache_batch_in_budget", results["batch_ratio"], 8.0)[0])
    # Time: lower is better, so the line states plain / GradCache speed against 1 / 1.5.
    print(_common.ratio_line("grad_cache_speed_vs_plain", plain_time / cache_time, 1 / 1.5)[0])
    _common.write_results("grad_cache", results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
