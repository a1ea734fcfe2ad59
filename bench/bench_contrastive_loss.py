"""Memory and time of the contrastive loss on 2 processes: open_clip's `local_loss` + `gather_with_grad`
(each rank scores its B rows against all N = 2B columns) against the global N x N loss on every rank.

Both modes give the same loss and gradients (tests/test_contrastive.py); what differs is the work per
rank. Each rank embeds nothing: its B x D rows of three "modalities" are random leaf tensors, so the
figures are the loss's own (the gather, three pairs of logits, softmax, backward). Memory is the peak of
tensor bytes allocated during forward + backward (`LiveTensorBytes`, bench_memory.py), per rank; time
is the median of the forward + backward over --repeats runs. Both ranks run over gloo on this host.

    python bench/bench_contrastive_loss.py [--rows 2048] [--dim 768]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402
import torch  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

MODES = {"global": (True, True, False), "local_loss": (True, True, True)}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=2048, help="rows per rank (B); N = 2B")
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--repeats", type=int, default=3)
    return p.parse_args(argv)


def _worker(rank: int, port: int, args, out_dir: str) -> None:
    from bench_memory import LiveTensorBytes

    from lucatrain.contrastive import ContrastiveLoss, Gathering, pair_graph

    os.environ.update(RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo")
    try:
        g = torch.Generator().manual_seed(rank)
        modalities = ("image", "dna", "text")
        present = {m: torch.ones(args.rows, dtype=torch.bool) for m in modalities}
        results = {}
        for name, switches in MODES.items():
            loss_fn = ContrastiveLoss(pair_graph(modalities), Gathering(*switches))

            def step():
                rows = {m: torch.nn.functional.normalize(torch.randn(args.rows, args.dim, generator=g), dim=-1).requires_grad_() for m in modalities}
                scale = torch.tensor([2.659], requires_grad=True)
                share, _ = loss_fn(rows, present, scale)
                share.backward()
                return float(share.detach())

            step()  # warm-up
            tracker = LiveTensorBytes()
            with tracker:
                step()
            times = []
            for _ in range(args.repeats):
                torch.distributed.barrier()
                start = time.perf_counter()
                step()
                times.append(time.perf_counter() - start)
            results[name] = {"peak_bytes": tracker.peak, "seconds": sorted(times)[len(times) // 2]}
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results))
    finally:
        torch.distributed.destroy_process_group()


def main(argv=None) -> int:
    args = parse_args(argv)
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as out:
        mp.spawn(_worker, args=(port, args, out), nprocs=2, join=True)
        ranks = [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(2)]
    mib = 2**20
    print(f"B = {args.rows} rows per rank, N = {2 * args.rows}, D = {args.dim}, 3 pairs, 2 processes (gloo)")
    print("mode         peak MiB (rank 0, rank 1)     step ms (rank 0)")
    for name in MODES:
        peaks = [r[name]["peak_bytes"] / mib for r in ranks]
        print(f"{name:11s}  {peaks[0]:8.1f} {peaks[1]:8.1f}               {ranks[0][name]['seconds'] * 1e3:8.1f}")
    memory_ratio = ranks[0]["global"]["peak_bytes"] / ranks[0]["local_loss"]["peak_bytes"]
    time_ratio = ranks[0]["global"]["seconds"] / ranks[0]["local_loss"]["seconds"]
    print(f"global / local_loss: memory {memory_ratio:.2f}x, time {time_ratio:.2f}x")
    _common.write_results("contrastive_loss", {"rows_per_rank": args.rows, "dim": args.dim, "ranks": ranks,
                                               "memory_ratio": memory_ratio, "time_ratio": time_ratio})  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
