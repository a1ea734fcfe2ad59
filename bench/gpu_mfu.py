"""bf16 training MFU of the LucaVirus size through lucatrain's Trainer, on one CUDA device.

    model FLOPs per token = 6 N + 12 L H S      (PaLM, appendix B: N the non-embedding parameters,
                                                 L layers, H hidden size, S sequence length; the
                                                 second term is attention; activation recomputation
                                                 is not counted: it is model FLOPs, not hardware FLOPs)
    MFU = model FLOPs per second / the GPU's dense bf16 peak

Configurations: ZeRO-2 and ZeRO-3, each without and with activation checkpointing, at 12 layers x
2560 hidden, 20 heads, sequence 3074 (LucaVirus), on synthetic full-length genes (random A/C/G/T,
3,072 nucleotides + [CLS] + [SEP]: no padding), masked-LM. Each runs in its own process (a fresh
CUDA context and DeepSpeed engine): `--warmup` steps, then `--steps` timed ones.

It refuses to run without CUDA (it never falls back to the CPU), and a peak it does not know must be
given (--peak-tflops). Prints one table and writes JSON (--out).

    python bench/gpu_mfu.py --out mfu.json
    python bench/gpu_mfu.py --tiny --allow-cpu        # the same code path at a toy size on CPU (a dry run)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Dense bf16 peaks (TFLOP/s, without sparsity) from the vendors' data sheets.
PEAKS = {"H200": 989.4, "H100 SXM": 989.4, "H100 80GB HBM3": 989.4, "H100 PCIe": 756.0, "H100 NVL": 835.0, "A100": 312.0,
         "L40S": 362.1, "GH200": 989.4}  # fmt: skip
CONFIGS = [("zero2", False), ("zero2", True), ("zero3", False), ("zero3", True)]


def peak_of(name: str) -> float | None:
    for key, value in PEAKS.items():
        if key.lower() in name.lower():
            return value
    return None


def write_genes(path: Path, count: int, length: int) -> None:
    import numpy as np

    rng = np.random.default_rng(0)
    letters = np.frombuffer(b"ACGT", dtype=np.uint8)
    with open(path, "w") as out:
        for i in range(count):
            out.write(f">gene{i}\n{letters[rng.integers(0, 4, length)].tobytes().decode()}\n")


def run_one(args) -> dict:
    """One configuration, in this process: Trainer.train_step timed after warm-up."""
    import torch

    from lucatrain.config import load_config
    from lucatrain.trainer import Trainer

    if not torch.cuda.is_available() and not args.allow_cpu:
        raise SystemExit("gpu_mfu: no CUDA device; this benchmark does not fall back to the CPU")
    work = Path(args.work)
    genes = work / "genes.fasta"
    if not genes.exists():
        write_genes(genes, args.batch * (args.warmup + args.steps + 2), args.seq_len - 2)
    overrides = [
        f"train.output_dir={work / ('run-' + args.zero + ('-ckpt' if args.checkpointing else ''))}", "train.overwrite_output_dir=true",
        f"data.cache_dir={work / 'cache'}", f"data.train_files=[{genes}]", "data.dev_files=[]", f"data.max_length={args.seq_len}",
        f"model.hidden_size={args.hidden}", f"model.num_hidden_layers={args.layers}", f"model.num_attention_heads={args.heads}",
        f"model.gradient_checkpointing={str(args.checkpointing).lower()}", "model.hidden_dropout_prob=0.0",
        f"train.batch_size={args.batch}", "train.max_steps=1000", "train.warmup_steps=0", "train.lr_scheduler=constant",
        "train.progress_bar=false", f"deepspeed.config={args.zero}", f"deepspeed.precision={'bf16' if not args.allow_cpu else 'fp32'}",
        "tasks.names=[gene_mask]", "train.eval_steps=0",
    ]  # fmt: skip
    trainer = Trainer(load_config("demo_tiny", overrides))
    stream = trainer.steps()
    batches = [next(stream)[3] for _ in range(args.warmup + args.steps)]
    for micro in batches[: args.warmup]:
        trainer.train_step(micro)
    synchronize = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    synchronize()
    started = time.perf_counter()
    tokens = 0
    for micro in batches[args.warmup :]:
        trainer.train_step(micro)
        tokens += sum(int(mb["attention_mask"].sum()) for mb in micro)
    synchronize()
    seconds = time.perf_counter() - started
    model = trainer.family.model
    non_embedding = sum(p.numel() for name, p in model.named_parameters() if "embed" not in name)
    flops_per_token = 6 * non_embedding + 12 * args.layers * args.hidden * args.seq_len
    achieved = flops_per_token * tokens / seconds
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu (dry run)"
    return {"zero": args.zero, "activation_checkpointing": args.checkpointing, "tokens_per_s": tokens / seconds,
            "step_s": seconds / args.steps, "model_tflops": achieved / 1e12, "non_embedding_params": non_embedding,
            "flops_per_token": flops_per_token, "device": device,
            "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0}  # fmt: skip


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--hidden", type=int, default=2560)
    p.add_argument("--heads", type=int, default=20)
    p.add_argument("--seq-len", type=int, default=3074)
    p.add_argument("--batch", type=int, default=4, help="sequences per micro-batch (one optimizer step each)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--peak-tflops", type=float, default=None, help="the GPU's dense bf16 peak, when it is not in the table")
    p.add_argument("--tiny", action="store_true", help="a toy size (2 layers x 64, sequence 130) for a dry run")
    p.add_argument("--allow-cpu", action="store_true", help="dry run on CPU in fp32 (figures meaningless)")
    p.add_argument("--out", default=None, help="JSON results file")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # "zero2:0": run one configuration (subprocess)
    p.add_argument("--work", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.tiny:
        args.layers, args.hidden, args.heads, args.seq_len, args.batch, args.warmup, args.steps = 2, 64, 4, 130, 2, 1, 2
    if args.one:
        args.zero, checkpointing = args.one.split(":")
        args.checkpointing = checkpointing == "1"
        print("RESULT " + json.dumps(run_one(args)), flush=True)
        return 0

    import torch

    if not torch.cuda.is_available() and not args.allow_cpu:
        print("gpu_mfu: no CUDA device; this benchmark does not fall back to the CPU", file=sys.stderr)
        return 2
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    peak = args.peak_tflops or peak_of(name) or (1.0 if args.allow_cpu else None)
    if peak is None:
        print(f"gpu_mfu: the dense bf16 peak of {name!r} is not in the table {sorted(PEAKS)}; give --peak-tflops", file=sys.stderr)
        return 2
    work = Path(args.work or tempfile.mkdtemp(prefix="gpu-mfu-"))
    forwarded = [f"--layers={args.layers}", f"--hidden={args.hidden}", f"--heads={args.heads}", f"--seq-len={args.seq_len}",
                 f"--batch={args.batch}", f"--warmup={args.warmup}", f"--steps={args.steps}", f"--work={work}"]  # fmt: skip
    if args.allow_cpu:
        forwarded.append("--allow-cpu")
    results = []
    for zero, checkpointing in CONFIGS:
        cmd = [sys.executable, __file__, *forwarded, f"--one={zero}:{int(checkpointing)}"]
        done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
        if done.returncode != 0 or not lines:
            print(f"gpu_mfu: {zero}, activation checkpointing {checkpointing}: failed (exit {done.returncode})\n{done.stderr[-3000:]}",
                  file=sys.stderr)  # fmt: skip
            return 1
        result = json.loads(lines[-1][len("RESULT ") :])
        result["mfu"] = result["model_tflops"] / peak
        results.append(result)
    print(f"{name}, dense bf16 peak {peak:g} TFLOP/s; {args.layers} layers x {args.hidden}, {args.heads} heads, sequence "
          f"{args.seq_len}, micro-batch {args.batch}; {results[0]['non_embedding_params'] / 1e6:.0f} M non-embedding parameters")  # fmt: skip
    print(f"{'ZeRO':>5} {'act. ckpt':>9} {'tokens/s':>10} {'step s':>8} {'TFLOP/s':>8} {'MFU':>6} {'peak GiB':>9}")
    for r in results:
        print(f"{r['zero']:>5} {str(r['activation_checkpointing']):>9} {r['tokens_per_s']:>10,.0f} {r['step_s']:>8.3f} "
              f"{r['model_tflops']:>8.1f} {r['mfu']:>6.1%} {r['peak_memory_gib']:>9.1f}")  # fmt: skip
    target = next(r for r in results if r["zero"] == "zero2" and not r["activation_checkpointing"])["mfu"]
    print(f"RATIO gpu_mfu_zero2_no_checkpointing={target:.3f} target=>=0.5 {'PASS' if target >= 0.5 else 'FAIL'}")
    if args.out:
        Path(args.out).write_text(json.dumps({"device": name, "peak_tflops": peak, "results": results}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
