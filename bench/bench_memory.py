"""Activation memory of one training step with and without gradient checkpointing.

One step = forward of the MLM loss (lucatrain's PretrainTask with the two masked-LM tasks over LucaGPLM) + backward + AdamW step,
at sequence length 3074 (LucaVirus) on a small-hidden model (hidden 128, 4 layers, 4 heads,
batch 2). The batch is real: the longest genes of the shipped rRNA FASTA, collated and masked by
lucatrain's Collator (no padding, so both runs see exactly the same tokens).

"Activation memory" = the peak, during the measured step, of memory allocated *by that step*:
weights, gradients, AdamW state and the batch exist before it (a warm-up step allocates gradients
and optimizer state; gradients are zeroed in place, not freed), so what the step adds on top is
saved activations plus temporaries.

How it is measured, and why this way. Each configuration runs in a fresh subprocess, so nothing
one configuration allocated or cached can hide in the other's figures. Inside it:

  CUDA  torch.cuda.max_memory_allocated() - memory_allocated() before the step (the allocator's own
        exact count).
  CPU   torch keeps no allocator statistics on CPU, so two independent measurements are taken:
        1. tensor bytes (primary): a TorchDispatchMode sees every op, forward, backward and the
           checkpoint recomputation, adds the byte size of each new output storage and subtracts
           it when a weakref callback reports the storage freed. The peak of that running sum is
           exactly the peak of tensor memory the step allocated, independent of malloc caching,
           fragmentation or thread count. It misses only scratch memory a kernel allocates
           internally without returning it as a tensor (small per-thread buffers).
        2. process RSS (cross-check): the peak resident set size of the step (Linux VmHWM, reset
           through /proc/self/clear_refs just before the step) minus the RSS before it. glibc's
           malloc would keep freed blocks and hand them out again without the RSS moving, so the
           worker runs with MALLOC_MMAP_THRESHOLD_ fixed at 64 KiB: every tensor-sized block is
           mmap'ed and returned to the OS when freed, and the RSS follows live memory. This is what
           the OS actually had to provide, allocator overhead included.
        torch.profiler(profile_memory=True) was not used: it reports per-op allocation totals, and
        turning those into a peak needs its private memory-timeline internals.

Target: checkpointing cuts activation memory by at least half (reduction factor >= 2).

    python bench/bench_memory.py
    python bench/bench_memory.py --seq-len 1026 --hidden 256 --layers 8 --batch 4
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import weakref
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402  (puts the repo on sys.path too)
import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils._pytree import tree_flatten  # noqa: E402

TARGET = 2.0  # activation memory without checkpointing / with checkpointing
MIB = 2**20


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq-len", type=int, default=3074, help="tokens per sequence incl. CLS/SEP")
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--no-optimizer", action="store_true", help="measure forward+backward only (no AdamW step)")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--out-dir", default=None, help="where <name>.json goes (default bench/results)")
    p.add_argument("--worker", choices=["off", "on"], help=argparse.SUPPRESS)  # internal: one measurement
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------- measuring tools


class LiveTensorBytes(TorchDispatchMode):
    """Running sum of the bytes of storages created while active, and its peak.

    A storage is counted once (views and in-place results share it) and uncounted by a weakref
    callback when torch frees it. Storages that existed before the mode (weights, grads, the
    batch) are never counted, so `peak` is what the region allocated on top of them.
    """

    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0
        self.storages = 0
        self._tracked: dict[int, tuple[weakref.ref, int]] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for item in tree_flatten(out)[0]:
            if isinstance(item, torch.Tensor):
                self._track(item)
        return out

    def _track(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        nbytes, key = storage.nbytes(), storage.data_ptr()
        if nbytes == 0 or key in self._tracked:
            return
        self._tracked[key] = (weakref.ref(storage, lambda _ref, key=key: self._free(key)), nbytes)
        self.live += nbytes
        self.storages += 1
        self.peak = max(self.peak, self.live)

    def _free(self, key: int) -> None:
        _, nbytes = self._tracked.pop(key, (None, 0))
        self.live -= nbytes


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


# ---------------------------------------------------------------------------------- the worker


def long_gene_batch(args) -> dict:
    """The `batch` longest rRNA genes, collated + masked by lucatrain's Collator to seq_len tokens."""
    from lucatrain.data.collate import Collator, MaskingConfig
    from lucatrain.data.sources import Record, iter_records

    records = [r for r in iter_records(_common.RRNA_FASTA) if isinstance(r, Record)]
    records.sort(key=lambda r: len(r.seq), reverse=True)
    chosen = records[: args.batch]
    rows = {"seq": [r.seq for r in chosen], "obj_type": [r.obj_type for r in chosen],
            "sample_id": list(range(len(chosen))), "labels": ["{}"] * len(chosen)}  # fmt: skip
    return Collator(args.seq_len, masking=MaskingConfig(), seed=0)(rows, 0)


def worker(args) -> dict:
    from lucatrain.models.lucagplm import LucaGPLM, LucaGPLMConfig
    from lucatrain.families.lucaone import build_task

    checkpointing = args.worker == "on"
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    config = LucaGPLMConfig(
        hidden_size=args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        max_position_embeddings=max(4096, args.seq_len),
        gradient_checkpointing=checkpointing,
    )
    model = LucaGPLM(config).to(device).train()
    task = build_task(model, ["gene_mask", "prot_mask"], {})
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    batch = {k: v.to(device) for k, v in long_gene_batch(args).items()}
    totals = {k: float(v) for k, v in task.count_targets(batch).items()}

    def step():
        loss, _ = task(batch, totals)
        loss.backward()
        if not args.no_optimizer:
            optimizer.step()
        optimizer.zero_grad(set_to_none=False)  # keep the gradient buffers: they are not activations
        return float(loss)

    step()  # warm-up: gradients, AdamW state, thread pools, oneDNN caches
    out = {
        "checkpointing": checkpointing,
        "device": str(device),
        "batch_shape": list(batch["input_ids"].shape),
        "padding_tokens": int((batch["attention_mask"] == 0).sum()),
        "parameters": model.num_parameters(),
    }
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        out["cuda_activation_bytes"] = torch.cuda.max_memory_allocated() - before
    else:
        before_kib = _status_kib("VmRSS")
        out["rss_before_step_bytes"] = before_kib * 1024
        if reset_peak_rss():
            step()
            out["rss_activation_bytes"] = (_status_kib("VmHWM") - before_kib) * 1024
    gc.collect()
    tracker = LiveTensorBytes()
    with tracker:
        out["loss"] = step()
    out["tensor_activation_bytes"] = tracker.peak
    out["tensor_storages_allocated"] = tracker.storages
    return out


def run_worker(args, checkpointing: bool) -> dict:
    """One measurement in a fresh interpreter, with malloc set so RSS follows live memory."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "131072"}
    argv = [sys.executable, str(Path(__file__).resolve()), "--worker", "on" if checkpointing else "off",
            "--seq-len", str(args.seq_len), "--hidden", str(args.hidden), "--layers", str(args.layers),
            "--heads", str(args.heads), "--batch", str(args.batch), "--threads", str(args.threads)]  # fmt: skip
    if args.no_optimizer:
        argv.append("--no-optimizer")
    proc = subprocess.run(argv, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"worker failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return 0

    plain, ckpt = run_worker(args, False), run_worker(args, True)
    methods = [k for k in ("tensor_activation_bytes", "rss_activation_bytes", "cuda_activation_bytes") if k in plain and k in ckpt]
    labels = {"tensor_activation_bytes": "tensor bytes (dispatch tracker)", "rss_activation_bytes": "process RSS (VmHWM)",
              "cuda_activation_bytes": "torch.cuda.max_memory_allocated"}  # fmt: skip
    rows, reductions = [], {}
    for key in methods:
        reductions[key] = plain[key] / ckpt[key]
        rows.append([labels[key], f"{plain[key] / MIB:.1f}", f"{ckpt[key] / MIB:.1f}", ckpt[key] / plain[key], reductions[key]])

    what = "forward+backward" + ("" if args.no_optimizer else "+AdamW")
    print(f"\none {what} step, batch {plain['batch_shape']} (real rRNA genes, {plain['padding_tokens']} padding), "
          f"hidden {args.hidden}, {args.layers} layers, {args.heads} heads, {plain['parameters'] / 1e6:.2f}M params, "
          f"{plain['device']}, {args.threads} threads; same loss both ways: {plain['loss']:.5f} / {ckpt['loss']:.5f}")  # fmt: skip
    _common.print_table(["measured by", "no ckpt MiB", "ckpt MiB", "ckpt / no ckpt", "reduction x"], rows)

    primary = "cuda_activation_bytes" if "cuda_activation_bytes" in methods else "tensor_activation_bytes"
    verdicts = []
    for key in methods:
        suffix = "" if key == primary else "_" + key.split("_")[0]
        name = f"memory_reduction_checkpointing{suffix}"
        line, ok = _common.ratio_line(name, reductions[key], TARGET)
        verdicts.append({"name": name, "value": reductions[key], "target": TARGET, "pass": ok, "primary": key == primary})
        print(line)
    path = _common.write_results(
        "memory",
        {"settings": {k: v for k, v in vars(args).items() if k not in ("out_dir", "worker")}, "primary_method": primary,
         "without_checkpointing": plain, "with_checkpointing": ckpt, "ratios": verdicts},
        args.out_dir,
    )  # fmt: skip
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
