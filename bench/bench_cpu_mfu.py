"""Training MFU on CPU: model FLOPs per second / this machine's measured fp32 matmul peak (issue 12, item 5).

    peak        the best of several 2-thread fp32 matmuls of n x n by n x n (n = 1024..4096),
                2 n^3 FLOPs each, measured first in this invocation
    model FLOPs per token = 6 N + 12 L H S   (PaLM appendix B, as bench/gpu_mfu.py: N the non-embedding
                parameters, L layers, H hidden, S the sequence; attention included, recomputation not)
    MFU         model FLOPs per second of training / peak

Work (the issue's): the LucaOne encoder at 4 layers x 256 hidden (`--heads`, default 4: head dimension
64; LucaOne's is 128), max_length 1026, batch
1, gradient accumulation 4, fp32, masked-LM on full-length genes; `--zero` (default zero0, the
single-process config; zero2 is the multi-process one). One process with 2 threads, and 2 processes
over gloo (torchrun) with 1 thread each: MFU of both together against the same 2-thread peak.

Each process times `Trainer.train_step` over `--steps` steps after `--warmup`, the batches collated
beforehand, and splits the time by phase: forward, backward, optimizer step (DeepSpeed's `step` at the
accumulation boundary, with ZeRO's gradient reduction), and the rest (the target-count all-reduce,
moving batches, Python). Baseline in the same invocation: a hand-written PyTorch loop (the same
model, loss and AdamW, no DeepSpeed) on the same batches, one process, with the share of its step
time by operator (torch.profiler): the attention kernel, the linear layers' matmuls, the rest.

Target (issue 12): MFU >= 0.70 on one process.

    python bench/bench_cpu_mfu.py [--steps 6] [--warmup 2] [--zero zero0]
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

LAYERS, HIDDEN, SEQ, BATCH, ACCUMULATION = 4, 256, 1026, 1, 4
HEADS = int(os.environ.get("LUCATRAIN_BENCH_HEADS", "4"))  # set by --heads, read by the worker processes too


def matmul_peak(threads: int) -> float:
    """FLOP/s of the best fp32 square matmul with `threads` threads."""
    import torch

    torch.set_num_threads(threads)
    best = 0.0
    for n in (1024, 2048, 3072, 4096):
        a, b = torch.randn(n, n), torch.randn(n, n)
        out = torch.empty(n, n)
        torch.mm(a, b, out=out)  # warm-up
        repeats = max(2, int(4e10 / (2 * n**3)))
        start = time.perf_counter()
        for _ in range(repeats):
            torch.mm(a, b, out=out)
        best = max(best, 2 * n**3 * repeats / (time.perf_counter() - start))
    return best


def write_genes(path: Path, count: int) -> None:
    import numpy as np

    rng = np.random.default_rng(0)
    letters = np.frombuffer(b"ACGT", dtype=np.uint8)
    with open(path, "w") as out:
        for i in range(count):
            out.write(f">gene{i}\n{letters[rng.integers(0, 4, SEQ - 2)].tobytes().decode()}\n")


def overrides(work: Path, genes: Path, zero: str) -> list[str]:
    return [f"train.output_dir={work / 'run'}", "train.overwrite_output_dir=true", f"data.cache_dir={work / 'cache'}",
            f"data.train_files=[{genes}]", "data.dev_files=[]", f"data.max_length={SEQ}", f"model.hidden_size={HIDDEN}",
            f"model.num_hidden_layers={LAYERS}", f"model.num_attention_heads={HEADS}", "model.hidden_dropout_prob=0.0",
            f"model.max_position_embeddings={SEQ}",
            f"train.batch_size={BATCH}", f"train.gradient_accumulation_steps={ACCUMULATION}", "train.max_steps=1000",
            "train.warmup_steps=0", "train.lr_scheduler=constant", "train.progress_bar=false", f"deepspeed.config={zero}",
            "deepspeed.precision=fp32", "tasks.names=[gene_mask]", "train.eval_steps=0", "train.save_steps=100000"]  # fmt: skip


class PhaseTimer:
    """Adds up the seconds spent in the engine's verbs (patched on the class: the task calls
    `engine(...)`, which an instance attribute cannot intercept). A bench process only."""

    def __init__(self):
        from lucatrain.engine import Engine

        self.seconds = {"forward": 0.0, "backward": 0.0, "optimizer step": 0.0}
        self.enabled = False
        timer = self
        forward, backward, step = Engine.__call__, Engine.backward, Engine.step

        def timed(phase, fn, *args, **kwargs):
            if not timer.enabled:
                return fn(*args, **kwargs)
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                timer.seconds[phase] += time.perf_counter() - start

        def step_at_boundary(engine):
            # Between boundaries DeepSpeed's step only counts the micro-step; at one it reduces and updates.
            phase = "optimizer step" if engine.ds.is_gradient_accumulation_boundary() else "backward"
            return timed(phase, step, engine)

        Engine.__call__ = lambda engine, *a, **k: timed("forward", forward, engine, *a, **k)
        Engine.backward = lambda engine, loss: timed("backward", backward, engine, loss)
        Engine.step = step_at_boundary


def flops_per_token(model) -> int:
    non_embedding = sum(p.numel() for name, p in model.named_parameters() if "embed" not in name)
    return 6 * non_embedding + 12 * LAYERS * HIDDEN * SEQ


def run_trainer(work: Path, genes: Path, zero: str, warmup: int, steps: int) -> dict:
    """This process's share: Trainer.train_step timed by phase (under torchrun, every rank runs this)."""
    import torch

    from lucatrain import dist
    from lucatrain.config import load_config
    from lucatrain.trainer import Trainer

    trainer = Trainer(load_config("demo_tiny", overrides(work, genes, zero)))
    torch.set_num_threads(int(os.environ.get("LUCATRAIN_BENCH_THREADS", "2")))  # after DeepSpeed's start
    timer = PhaseTimer()
    stream = trainer.steps()
    batches = [next(stream)[3] for _ in range(warmup + steps)]
    for micro in batches[:warmup]:
        trainer.train_step(micro)
    dist.barrier()
    timer.enabled = True
    tokens = 0
    start = time.perf_counter()
    for micro in batches[warmup:]:
        trainer.train_step(micro)
        tokens += sum(int(mb["attention_mask"].sum()) for mb in micro)
    seconds = time.perf_counter() - start
    phases = dict(timer.seconds)
    phases["other"] = seconds - sum(phases.values())
    return {"seconds": seconds, "tokens": tokens, "flops_per_token": flops_per_token(trainer.family.model), "phases": phases,
            "rank": dist.rank(), "world_size": dist.world_size()}  # fmt: skip


def run_plain_pytorch(work: Path, genes: Path, warmup: int, steps: int) -> dict:
    """The baseline: the same model, batches and AdamW in a hand-written loop (no DeepSpeed, no Task)."""
    import torch

    from lucatrain.config import load_config
    from lucatrain.trainer import Trainer

    trainer = Trainer(load_config("demo_tiny", overrides(work, genes, "zero0")))
    stream = trainer.steps()
    batches = [next(stream)[3] for _ in range(warmup + steps)]
    module = trainer.engine.module  # the Task module: encoder + masked-LM head and its loss
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-4)
    torch.set_num_threads(2)

    def one_step(micro):
        from lucatrain.task import to_device

        counts = {}
        for mb in micro:
            for key, value in module.count_targets(mb).items():
                counts[key] = counts.get(key, 0.0) + float(value)
        for mb in micro:
            loss, _ = module(to_device(mb, torch.device("cpu")), counts)
            loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for micro in batches[:warmup]:
        one_step(micro)
    tokens = 0
    start = time.perf_counter()
    for micro in batches[warmup:]:
        one_step(micro)
        tokens += sum(int(mb["attention_mask"].sum()) for mb in micro)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "tokens": tokens, "flops_per_token": flops_per_token(trainer.family.model),
            "op_shares": op_shares(lambda: one_step(batches[-1]))}  # fmt: skip


def op_shares(run_one_step) -> dict[str, float]:
    """Where a step's time goes by kind of operator (torch.profiler, self CPU time): the attention
    kernel, the matmuls of the linear layers, and the rest (element-wise, norms, copies, optimizer)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run_one_step()
    shares = {"attention": 0.0, "matmul": 0.0, "other": 0.0}
    for event in prof.key_averages():
        kind = "attention" if "scaled_dot_product" in event.key else "matmul" if event.key in ("aten::mm", "aten::addmm", "aten::bmm") else "other"
        shares[kind] += event.self_cpu_time_total
    total = sum(shares.values())
    return {kind: value / total for kind, value in shares.items()}


def worker(args) -> None:
    """A fresh process per measurement (under torchrun: every rank measures, rank 0 writes the JSON).
    In the parent, the threads of an earlier measurement would compete with this one for the cores."""
    if args.plain:
        result = run_plain_pytorch(Path(args.work), Path(args.genes), args.warmup, args.steps)
        Path(args.worker_out).write_text(json.dumps(result))
        return
    result = run_trainer(Path(args.work), Path(args.genes), args.zero, args.warmup, args.steps)
    from lucatrain import dist

    import torch.distributed

    results = [None] * dist.world_size()
    torch.distributed.all_gather_object(results, result)
    if result["rank"] == 0:
        Path(args.worker_out).write_text(json.dumps(results))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--zero", default="zero0", help="DeepSpeed config of the one-process run (two processes: zero2)")
    parser.add_argument("--out-dir", type=Path, default=None)
    parser.add_argument("--worker-out", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--work", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--genes", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--plain", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker_out:
        worker(args)
        return
    os.environ["LUCATRAIN_BENCH_HEADS"] = str(args.heads)  # the worker processes inherit it
    load_before = _common.warn_if_busy()
    peak = matmul_peak(2)
    print(f"fp32 matmul peak, 2 threads: {peak / 1e9:.1f} GFLOP/s")
    rows, results = [], {"peak_flops": peak}
    with tempfile.TemporaryDirectory(prefix="lucatrain-mfu-") as tmp:
        work = Path(tmp)
        genes = work / "genes.fasta"
        write_genes(genes, 2 * BATCH * ACCUMULATION * (args.warmup + args.steps) + 16)
        plain_out = work / "plain.json"
        cmd = [sys.executable, __file__, "--plain", "--worker-out", str(plain_out), "--work", str(work / "plain"), "--genes", str(genes),
               "--steps", str(args.steps), "--warmup", str(args.warmup)]  # fmt: skip
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
        if done.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} exited {done.returncode}:\n{done.stderr[-4000:]}")
        plain = json.loads(plain_out.read_text())
        plain_mfu = plain["flops_per_token"] * plain["tokens"] / plain["seconds"] / peak
        results["plain_pytorch"] = {**plain, "mfu": plain_mfu}
        rows.append(["hand-written PyTorch loop", 1, plain["tokens"] / plain["seconds"], plain_mfu, "", "", "", ""])
        print("hand-written loop, share of step time by operator: " +
              ", ".join(f"{kind} {share:.1%}" for kind, share in plain["op_shares"].items()))  # fmt: skip
        for processes, zero in ((1, args.zero), (2, "zero2")):
            out = work / f"result-{processes}.json"
            env = {**os.environ, "LUCATRAIN_BENCH_THREADS": str(2 // processes), "OMP_NUM_THREADS": str(2 // processes)}
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes), "--master_port", str(_free_port()),
                   __file__, "--worker-out", str(out), "--work", str(work / f"run-{processes}"), "--genes", str(genes), "--zero", zero,
                   "--steps", str(args.steps), "--warmup", str(args.warmup)]  # fmt: skip
            done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
            if done.returncode != 0:
                raise SystemExit(f"{' '.join(cmd)} exited {done.returncode}:\n{done.stderr[-4000:]}")
            ranks = json.loads(out.read_text())
            seconds = max(r["seconds"] for r in ranks)
            tokens = sum(r["tokens"] for r in ranks)
            mfu = ranks[0]["flops_per_token"] * tokens / seconds / peak
            phases = {k: sum(r["phases"][k] for r in ranks) / len(ranks) for k in ranks[0]["phases"]}
            share = {k: v / (seconds) for k, v in phases.items()}
            results[f"processes_{processes}"] = {"zero": zero, "ranks": ranks, "mfu": mfu, "tokens_per_s": tokens / seconds,
                                                 "phase_share": share}  # fmt: skip
            rows.append([f"lucatrain Trainer, {zero}", processes, tokens / seconds, mfu, share["forward"], share["backward"],
                         share["optimizer step"], share["other"]])  # fmt: skip
    _common.print_table(["training", "processes", "tokens/s", "MFU", "forward", "backward", "optimizer step", "other"], rows)
    one = results["processes_1"]["mfu"]
    line, ok = _common.ratio_line("cpu_mfu_1_process", one, 0.70)
    print(line)
    print(f"MFU 2 processes: {results['processes_2']['mfu']:.3f}; lucatrain / hand-written loop (1 process): {one / plain_mfu:.3f}")
    _common.write_results(f"cpu_mfu_heads{args.heads}", {**results, "heads": args.heads, "target_met": ok, "other_load_before": load_before,
                                       "other_load_after": _common.other_load()}, args.out_dir)  # fmt: skip


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


if __name__ == "__main__":
    main()
