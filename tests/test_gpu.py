"""GPU smoke test: skipped on machines without CUDA (the `gpu` marker, see conftest.py)."""

import pytest

from conftest import launch, read_history, tiny_overrides

pytestmark = pytest.mark.gpu


def test_zero3_bf16_trains_on_one_gpu(tmp_path):
    """ZeRO-3 in bf16 on one CUDA device over NCCL: 10 steps, finite falling loss, a committed checkpoint."""
    import torch

    assert torch.cuda.is_available()
    args = ["train", "--config", "demo_tiny", *tiny_overrides(tmp_path, **{
        "deepspeed.config": "zero3", "deepspeed.precision": "bf16", "train.max_steps": 10, "train.batch_size": 8,
        "train.learning_rate": 3e-3, "train.loss_logging_steps": 5})]  # fmt: skip
    launch(args, nproc=1)
    losses = [h["loss"] for h in read_history(tmp_path / "run") if "lr" in h]
    assert len(losses) == 2 and all(loss == loss for loss in losses) and losses[-1] < losses[0]
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text() == "step-000010"
    log = (tmp_path / "run" / "logs" / "training.log").read_text()
    assert "zero_stage=3 precision=bf16" in log
