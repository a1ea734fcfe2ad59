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


def test_clibd_qlora_bf16_zero2_trains_on_one_gpu(tmp_path):
    """clibd.qlora on CUDA (bitsandbytes' GPU kernels, no qlora_on_cpu): 6 steps in bf16 at ZeRO-2, the
    4-bit base frozen, a finite loss, and an export whose DNA embeddings match the trained model's."""
    import numpy as np
    import torch

    pytest.importorskip("bitsandbytes")
    from test_clibd import clibd_overrides

    from lucatrain.config import load_config
    from lucatrain.families.clibd import load_clibd
    from lucatrain.task import EVAL_EPOCH
    from lucatrain.trainer import Trainer

    assert torch.cuda.is_available()
    cfg = load_config("clibd_tiny", clibd_overrides(tmp_path, **{
        "train.max_steps": 6, "train.eval_steps": 0, "data.dev_splits": "{}", "train.best_metric": "loss",
        "clibd.lora_towers": "[dna, text]", "clibd.qlora": "true", "deepspeed.config": "zero2", "deepspeed.precision": "bf16"}))  # fmt: skip
    trainer = Trainer(cfg)
    packed = {n: p.detach().clone() for n, p in trainer.task.named_parameters() if p.dtype == torch.uint8}
    assert packed and all(p.device.type == "cuda" for p in trainer.task.parameters())
    trainer.train()
    assert all(torch.equal(packed[n], p) for n, p in trainer.task.named_parameters() if n in packed)
    losses = [h["loss"] for h in read_history(tmp_path / "run") if "lr" in h]
    assert losses and all(np.isfinite(losses))
    task, collator = load_clibd(tmp_path / "run" / "last")
    collator.files = trainer.collator.files
    batch = collator(trainer.train_data.rows(np.arange(6), trainer.columns), EVAL_EPOCH)
    trainer.task.eval()
    with torch.no_grad():
        trained = trainer.task.towers["dna"]({k: v.cuda() for k, v in batch.items()}).float().cpu()
        torch.testing.assert_close(task.towers["dna"](batch), trained, rtol=0, atol=2e-2)
