"""Contrastive training throughput: lucatrain's CLIBD Trainer.train_step vs a hand-written PyTorch loop.

Both sides train the same three towers (image ViT, DNA BERT, text BERT; same config, same initial
weights, same learnable temperature) on the SAME collated micro-batches, taken from `trainer.steps()`
before any timing starts, with torch's AdamW, the same hyperparameters and gradient clipping. What
differs is what lucatrain adds: the DeepSpeed engine (forward hooks, backward, ZeRO bookkeeping, LR
scheduler), ContrastiveLoss (pair graph, masks, gathering logic, per-pair reports), the logit-scale
clamp callback through `Engine.edit_parameter`, and float() of every report value. The baseline writes
CLIP's loss out directly: per pair, cross entropy of s * a @ b.T against the diagonal, both ways.

Samples/s per side; the ratio is the median of the per-micro-batch ratios (the two sides alternate on
each micro-batch, who goes first alternating too), with the ratio of totals beside it. Target >= 0.95.

    python bench/bench_clibd_throughput.py [--steps 30] [--batch 32]
"""

from __future__ import annotations

import argparse
import copy
import itertools
import math
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from lucatrain.config import load_config  # noqa: E402
from lucatrain.task import to_device  # noqa: E402
from lucatrain.trainer import Trainer  # noqa: E402

TARGET = 0.95
SAMPLE = _common.DATA / "clibd_sample.hdf5"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--ds-config", default="zero2")
    return p.parse_args(argv)


def trainer_for(args, tmp: Path) -> Trainer:
    overrides = [
        f"train.output_dir={tmp / 'run'}", f"data.cache_dir={tmp / 'cache'}", f"data.train_files=[{SAMPLE}]", "data.dev_splits={}",
        "train.best_metric=loss", f"train.batch_size={args.batch}", "train.max_steps=1000", "train.num_train_epochs=1000",
        "train.warmup_steps=0", "train.lr_scheduler=constant", "train.progress_bar=false", f"deepspeed.config={args.ds_config}",
        "clibd.dropout=0.0", "clibd.image.resize=64", "clibd.image.crop=64", "clibd.image.hidden_size=128",
        "clibd.image.num_hidden_layers=4", "clibd.dna.hidden_size=128", "clibd.dna.num_hidden_layers=4",
    ]  # fmt: skip
    return Trainer(load_config("clibd_tiny", overrides))


class Baseline(torch.nn.Module):
    def __init__(self, towers, logit_scale):
        super().__init__()
        self.towers = towers
        self.logit_scale = torch.nn.Parameter(logit_scale.detach().clone())

    def loss(self, batch) -> torch.Tensor:
        z = {m: tower(batch) for m, tower in self.towers.items()}
        scale = self.logit_scale.exp()[0]
        terms = []
        for a, b in itertools.combinations(self.towers, 2):
            logits = scale * z[a] @ z[b].T
            target = torch.arange(len(logits))
            terms.append((F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2)
        return sum(terms) / len(terms)


def make_baseline(trainer: Trainer):
    model = Baseline(copy.deepcopy(trainer.task.towers), trainer.task.logit_scale).train()
    t = trainer.cfg.train
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
                                  lr=t.learning_rate, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_epsilon)  # fmt: skip

    def step(batch):
        loss = model.loss(batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), t.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            model.logit_scale.clamp_(0.0, math.log(100.0))
        return float(loss.detach())

    return model, step


def main(argv=None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = trainer_for(args, Path(tmp))
        model, plain_step = make_baseline(trainer)
        stream = trainer.steps()
        batches = [to_device(next(stream)[3][0], trainer.engine.device) for _ in range(args.warmup + args.steps)]
        with torch.no_grad():
            first_plain = float(model.loss(batches[0]))
        first_luca = trainer.train_step([batches[0]])["loss_total"]
        plain_step(batches[0])
        for mb in batches[1 : args.warmup]:
            trainer.train_step([mb])
            plain_step(mb)
        times = _common.alternate_timing(batches[args.warmup :], {"lucatrain": lambda b: trainer.train_step([b]), "baseline": plain_step})
    samples = args.steps * args.batch
    paired = [b / a for a, b in zip(times["lucatrain"], times["baseline"])]
    result = {
        "batch": args.batch, "steps": args.steps, "ds_config": args.ds_config,
        "first_step_loss": {"lucatrain": first_luca, "baseline": first_plain},
        "lucatrain_samples_per_s": samples / sum(times["lucatrain"]), "baseline_samples_per_s": samples / sum(times["baseline"]),
        "ratio": statistics.median(paired), "ratio_of_totals": sum(times["baseline"]) / sum(times["lucatrain"]),
    }  # fmt: skip
    print(f"first-step loss: lucatrain {first_luca:.6f}, baseline {first_plain:.6f} (same weights, same batch)")
    print(f"samples/s: lucatrain {result['lucatrain_samples_per_s']:.1f}, baseline {result['baseline_samples_per_s']:.1f} "
          f"(ratio of totals {result['ratio_of_totals']:.3f})")  # fmt: skip
    print(_common.ratio_line("clibd_train_throughput", result["ratio"], TARGET)[0])
    _common.write_results("clibd_throughput", result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
