"""Two real processes over gloo through the `deepspeed` launcher (and torchrun)."""

import json

import pytest
import torch

from conftest import launch, tiny_overrides
from lucatrain.models.lucagplm import LucaGPLM

pytestmark = pytest.mark.multiprocess


@pytest.mark.parametrize(
    "zero,precision,max_tokens",
    [("zero2", "fp32", 0), ("zero3", "bf16", 264)],  # 264 = token budget of 4 x 66-token sequences
)
def test_two_process_deepspeed_launcher(tmp_path, zero, precision, max_tokens):
    args = ["train", "--config", "demo_tiny", *tiny_overrides(
        tmp_path,
        **{
            "deepspeed.config": zero,
            "deepspeed.precision": precision,
            "data.max_tokens": max_tokens,
            "train.batch_size": 4,
            "train.max_steps": 30,
            "train.num_train_epochs": 5,
            "train.learning_rate": 3e-3,
            "train.loss_logging_steps": 5,
            "train.save_steps": 15,
        },
    )]
    launch(args, nproc=2)
    run = tmp_path / "run"
    history = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
    # Genes are in every window (the dev split has 308 genes, 4 proteins), so their loss is comparable.
    losses = [h["gene_mask/loss"] for h in history if "gene_mask/loss" in h]
    assert len(losses) == 6
    assert losses[-1] < 0.85 * losses[0], losses
    # One optimizer step = 2 ranks x 4 samples.
    assert sum(1 for h in history if "samples_per_s" in h) == 6
    # DeepSpeed wrote a shard per rank for both checkpoints.
    for step in (15, 30):
        shards = sorted(p.name for p in (run / "checkpoints" / f"step-{step:06d}" / "ds").glob("*optim_states.pt"))
        assert len(shards) == 2, shards
    # The gathered export loads as a plain model and runs.
    model = LucaGPLM.from_pretrained(run / "last")
    ids = torch.tensor([[2, 5, 6, 7, 8, 3]])
    hidden = model(ids, torch.zeros_like(ids))
    assert hidden.shape == (1, 6, 32) and torch.isfinite(hidden).all()
    initial = LucaGPLM(model.config)  # same seed as training would not matter: weights must differ
    assert not torch.allclose(model.embed_tokens.weight, initial.embed_tokens.weight)


def test_two_process_torchrun_matches_world_size_semantics(tmp_path):
    """torchrun works too, and a 2 x 4 run logs 8 samples per optimizer step."""
    args = ["train", "--config", "demo_tiny", *tiny_overrides(
        tmp_path, **{"deepspeed.config": "zero1", "train.batch_size": 4, "train.max_steps": 4, "train.loss_logging_steps": 4}
    )]
    launch(args, nproc=2, launcher="torchrun")
    history = [json.loads(line) for line in (tmp_path / "run" / "history.jsonl").read_text().splitlines()]
    assert history[0]["step"] == 4
    log = (tmp_path / "run" / "logs" / "training.log").read_text()
    assert "world_size=2" in log
    assert "done: 4 steps, 32 samples" in log
