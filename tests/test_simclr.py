"""The SimCLR family end to end (views, inputs, training, kNN, export, multispectral), and the generic
pieces it brought: early stopping, callbacks by import path, the optimizer factory and the schedules."""

import colorsys
import json

import numpy as np
import pytest
import torch

from conftest import REPO, kill_step, launch, read_history
from lucatrain.callbacks import StepCallback
from lucatrain.config import ConfigError, load_config
from lucatrain.data.images import view_rng
from lucatrain.data.simclr_views import SimclrAugment, gaussian_blur, load_image, shift_hue
from lucatrain.optim import LARS, lr_multiplier
from lucatrain.task import EVAL_EPOCH
from lucatrain.trainer import Trainer

PHOTOS = REPO / "examples" / "data" / "simclr_sample"
STACKS = REPO / "examples" / "data" / "simclr_multispectral"


def simclr_overrides(tmp_path, **extra) -> list[str]:
    values = {"train.output_dir": tmp_path / "run", "data.cache_dir": tmp_path / "cache", "train.progress_bar": "false",
              "data.train_files": f"[{PHOTOS / 'train'}]",
              "data.dev_splits": f"{{val: [{PHOTOS / 'val'}], bank: [{PHOTOS / 'train'}]}}"}  # fmt: skip
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]


# ---------------------------------------------------------------------------- views


def test_views_depend_on_seed_epoch_sample_and_view_only():
    augment = SimclrAugment(size=24)
    image = torch.rand(3, 40, 50, generator=torch.Generator().manual_seed(0))
    first = augment(image, view_rng(1, 2, 12345, 0))
    assert first.shape == (3, 24, 24)
    assert torch.equal(first, augment(image, view_rng(1, 2, 12345, 0)))
    assert not torch.equal(first, augment(image, view_rng(1, 2, 12345, 1)))  # the other view
    assert not torch.equal(first, augment(image, view_rng(1, 3, 12345, 0)))  # another epoch


def test_colour_augmentations_are_skipped_for_multispectral_stacks_and_the_crops_are_the_same():
    rgb_like = SimclrAugment(size=16, cj_prob=1.0, random_gray_scale=1.0, gaussian_blur=0.0, normalize=False)
    plain = SimclrAugment(size=16, cj_prob=0.0, random_gray_scale=0.0, gaussian_blur=0.0, normalize=False)
    stack = torch.rand(5, 30, 30, generator=torch.Generator().manual_seed(1))
    # 5 bands: jitter and greyscale skipped, the same random numbers drawn, so the same crop and flips.
    assert torch.equal(rgb_like(stack, view_rng(0, 0, 7)), plain(stack, view_rng(0, 0, 7)))
    photo = stack[:3]
    jittered = rgb_like(photo, view_rng(0, 0, 7))
    assert not torch.equal(jittered, plain(photo, view_rng(0, 0, 7)))
    assert torch.equal(jittered[0], jittered[1]) and torch.equal(jittered[1], jittered[2])  # greyscale: 3 equal channels


def test_hue_shift_matches_an_hsv_round_trip_and_blur_keeps_a_constant_image():
    rgb = torch.rand(3, 4, 5, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    shifted = shift_hue(rgb, 0.17)
    for y in range(4):
        for x in range(5):
            h, s, v = colorsys.rgb_to_hsv(*rgb[:, y, x].tolist())
            expected = colorsys.hsv_to_rgb((h + 0.17) % 1.0, s, v)
            np.testing.assert_allclose(shifted[:, y, x].numpy(), expected, atol=1e-9)
    flat = torch.full((4, 9, 9), 0.3)
    torch.testing.assert_close(gaussian_blur(flat, 1.5, 5), flat)
    spot = torch.zeros(1, 9, 9)
    spot[0, 4, 4] = 1.0
    blurred = gaussian_blur(spot, 1.0, 5)
    assert blurred.sum().item() == pytest.approx(1.0, abs=1e-6) and blurred[0, 4, 4] < 0.2


def test_a_multipage_tiff_is_a_stack_of_bands(tmp_path):
    import tifffile

    bands = (np.arange(5 * 8 * 9) % 251).astype(np.uint8).reshape(5, 8, 9)
    tifffile.imwrite(tmp_path / "stack.tif", bands)
    np.testing.assert_allclose(load_image(tmp_path / "stack.tif").numpy(), bands / 255.0, rtol=1e-6)


def test_image_arrays_load_channels_first_whatever_their_layout(tmp_path):
    chw = np.arange(4 * 6 * 7, dtype=np.uint16).reshape(4, 6, 7)
    np.save(tmp_path / "chw.npy", chw)
    np.save(tmp_path / "hwc.npy", np.moveaxis(chw, 0, -1))
    for name in ("chw.npy", "hwc.npy"):
        loaded = load_image(tmp_path / name)
        assert loaded.shape == (4, 6, 7)
        np.testing.assert_allclose(loaded.numpy(), chw / 65535.0, rtol=1e-6)
    np.save(tmp_path / "nan.npy", np.full((2, 4, 4), np.nan, dtype=np.float32))
    with pytest.raises(ValueError, match=r"nan\.npy: the image holds NaN"):
        load_image(tmp_path / "nan.npy")
    with pytest.raises(ValueError, match=r"chw\.npy: 4 channels, the dataset's images have 3"):
        load_image(tmp_path / "chw.npy", expected_channels=3)


# ---------------------------------------------------------------------------- inputs


def test_folders_tables_and_bad_images(tmp_path):
    import shutil

    from lucatrain.trainer import load_data
    from lucatrain.families.simclr.data import SimclrRecipe

    root = tmp_path / "photos"
    shutil.copytree(PHOTOS / "val", root)
    cfg = load_config("simclr_tiny", simclr_overrides(tmp_path))
    data = load_data([root], cfg, SimclrRecipe([str(root)]))
    rows = data.rows(np.arange(len(data)), ["image_id", "label", "channels"])
    assert len(data) == 44 and set(rows["channels"]) == {3}
    assert all(image_id.startswith(label + "/") for image_id, label in zip(rows["image_id"], rows["label"]))
    # A table of paths (relative to the table) with labels: the same images, ids as the table gives them.
    table = root / "images.csv"
    table.write_text("path,label\n" + "".join(f"{i},{i.split('/')[0]}\n" for i in sorted(rows["image_id"])))
    from_table = load_data([table], cfg, SimclrRecipe([str(table)]))
    assert sorted(from_table.rows(np.arange(44), ["image_id"])["image_id"]) == sorted(rows["image_id"])
    # An image that does not open is named, before any training.
    broken = root / "Bacillus" / "broken.jpg"
    broken.write_bytes(b"\xff\xd8 not a jpeg")
    table.unlink()
    with pytest.raises(Exception, match=r"broken\.jpg does not open"):
        load_data([root], cfg, SimclrRecipe([str(root)]))
    skipping = load_config("simclr_tiny", simclr_overrides(tmp_path, **{"data.bad_records": "skip"}))
    kept = load_data([root], skipping, SimclrRecipe([str(root)]))
    assert len(kept) == 44 and kept.meta["num_rejected"] == 1
    broken.unlink()
    # Mixed channel counts in one dataset are refused, naming both images.
    np.save(root / "Bacillus" / "four.npy", np.zeros((4, 16, 16), dtype=np.uint8))
    with pytest.raises(Exception, match=r"Bacillus/four\.npy: 4 channels; the images of one dataset must all have the same number"):
        load_data([root], cfg, SimclrRecipe([str(root)]))


def test_config_refuses_a_download_and_a_missing_bank():
    with pytest.raises(ConfigError, match="`simclr.weights=DEFAULT` means downloading pretrained weights"):
        load_config("simclr_tiny", ["simclr.weights=DEFAULT"])
    with pytest.raises(ConfigError, match=r"`simclr.knn_bank` \('bank'\) must be one of the dev splits \['val'\]"):
        load_config("simclr_tiny", [f"data.dev_splits={{val: [{PHOTOS / 'val'}]}}"])
    with pytest.raises(ConfigError, match="`train.nesterov` needs `train.optimizer=sgd`"):
        load_config("simclr_tiny", ["train.nesterov=true"])


# ---------------------------------------------------------------------------- training


def test_trains_learns_knn_and_exports_the_backbone(tmp_path):
    from lucatrain.families.simclr import embed, load_backbone

    cfg = load_config("simclr_tiny", simclr_overrides(tmp_path, **{"train.eval_steps": 60, "simclr.linear_probe": "true"}))
    trainer = Trainer(cfg)
    untrained = trainer.evaluate()["val"]
    trainer.train()
    history = read_history(tmp_path / "run")
    losses = [h["loss"] for h in history if "lr" in h]
    final = next(h for h in reversed(history) if "eval/val/knn_top1" in h)
    print(f"SimCLR tiny: train loss {losses[0]:.3f} -> {losses[-1]:.3f}; val kNN genus top-1 {untrained['knn_top1']:.3f} -> "
          f"{final['eval/val/knn_top1']:.3f}; val loss {untrained['loss']:.3f} -> {final['eval/val/loss']:.3f}")  # fmt: skip
    assert losses[-1] < losses[0] and final["eval/val/loss"] < untrained["loss"] - 0.1
    assert final["eval/val/knn_top1"] > untrained["knn_top1"]
    assert 1 / 14 < final["eval/val/probe_top1"] <= 1.0  # 14 genera in the bank
    print(f"linear probe val top-1: {untrained['probe_top1']:.3f} untrained -> {final['eval/val/probe_top1']:.3f}")
    # The export is the backbone: as a transformers directory, and through load_backbone / embed.
    from transformers import AutoModel

    assert (tmp_path / "run" / "best" / "simclr.json").is_file()
    AutoModel.from_pretrained(tmp_path / "run" / "last" / "backbone")
    backbone, augment = load_backbone(tmp_path / "run" / "last")
    split = trainer.dev_splits["val"]
    rows = split.data.rows(split.rows[:4], split.columns)
    batch = trainer.collator(rows, EVAL_EPOCH)
    trainer.task.eval()
    with torch.no_grad():
        trained = torch.nn.functional.normalize(trainer.task.backbone(batch["plain"]), dim=-1)
        torch.testing.assert_close(torch.from_numpy(embed(tmp_path / "run" / "last", rows["image_path"])), trained, rtol=0, atol=1e-5)


def test_backbones_start_from_local_weights(tmp_path):
    from lucatrain.families.simclr.model import Backbone

    source = Backbone("resnet_tiny", 4, 32)
    source.model.save_pretrained(tmp_path / "resnet")
    loaded = Backbone("resnet_tiny", 4, 32, weights=str(tmp_path / "resnet"))
    assert all(torch.equal(a, b) for a, b in zip(source.state_dict().values(), loaded.state_dict().values()))
    pixels = torch.rand(2, 4, 32, 32)
    torch.testing.assert_close(loaded.eval()(pixels), source.eval()(pixels))


def test_a_timm_backbone_takes_the_data_channels_and_a_local_weights_file(tmp_path):
    """simclr.backbone_library=timm; runs where timm imports (it needs a torchvision built for this torch)."""
    timm = pytest.importorskip("timm")
    from safetensors.torch import save_file

    from lucatrain.families.simclr.model import Backbone

    source = timm.create_model("resnet18", num_classes=5, in_chans=4).eval()
    save_file(source.state_dict(), str(tmp_path / "resnet18.safetensors"))
    backbone = Backbone("resnet18", 4, 32, weights=str(tmp_path / "resnet18.safetensors"), library="timm").eval()
    pixels = torch.rand(2, 4, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(backbone(pixels), source.forward_head(source.forward_features(pixels), pre_logits=True))
    assert backbone.num_features == 512


def test_a_multispectral_stack_trains_with_its_own_channel_count(tmp_path):
    cfg = load_config("simclr_tiny", simclr_overrides(tmp_path, **{
        "data.train_files": f"[{STACKS}]", "data.dev_splits": f"{{val: [{STACKS}]}}", "simclr.knn_bank": "''",
        "train.max_steps": 4, "train.batch_size": 8, "train.eval_steps": 0, "train.best_metric": "loss", "train.warmup_steps": 1}))  # fmt: skip
    trainer = Trainer(cfg)
    assert trainer.family.channels == 4
    embedding = trainer.task.backbone.model.embeddings.patch_embeddings.projection
    assert embedding.in_channels == 4
    trainer.train()
    assert [h["step"] for h in read_history(tmp_path / "run") if "lr" in h]


class CountingCallback(StepCallback):
    """A callback loaded by import path (`train.callbacks: [test_simclr:CountingCallback]`): records its events."""

    name = "counting"
    steps = 0
    events: list = []

    def on_start(self, trainer) -> None:
        CountingCallback.events.append(("start", trainer.global_step))

    def after_step(self, engine) -> None:
        CountingCallback.steps += 1

    def after_evaluate(self, results) -> bool:
        CountingCallback.events.append(("evaluate", sorted(results)))
        return False

    def after_save(self, path) -> None:
        CountingCallback.events.append(("save", path.name))

    def on_end(self, trainer) -> None:
        CountingCallback.events.append(("end", trainer.global_step))

    def metrics(self, trainer, results):
        return {"val": {"steps_seen": float(CountingCallback.steps)}}


def test_early_stopping_stops_keeps_its_counters_across_a_resume_and_custom_callbacks_run(tmp_path):
    # min_delta 10: no evaluation ever improves enough, so the run stops after `patience` evaluations.
    base = {"train.max_steps": 12, "train.eval_steps": 2, "train.save_steps": 2, "train.warmup_steps": 1, "simclr.knn_bank": "''",
            "data.dev_splits": f"{{val: [{PHOTOS / 'val'}]}}", "train.best_metric": "val/loss", "train.early_stopping.monitor": "val/loss",
            "train.early_stopping.min_delta": 10.0, "train.early_stopping.patience": 3, "train.batch_size": 16,
            "train.callbacks": "[test_simclr:CountingCallback]"}  # fmt: skip
    CountingCallback.steps, CountingCallback.events = 0, []
    Trainer(load_config("simclr_tiny", simclr_overrides(tmp_path / "a", **base))).train()
    # Evaluations at 2 (the first value: best), 4, 6, 8 (three without improvement): stops at step 8.
    assert (tmp_path / "a" / "run" / "checkpoints" / "latest").read_text() == "step-000008"
    assert CountingCallback.steps == 8
    saves = [("save", f"step-{n:06d}") for n in (2, 4, 6, 8)]
    assert CountingCallback.events == [("start", 0), *[e for pair in zip([("evaluate", ["val"])] * 4, saves) for e in pair], ("end", 8)]
    assert [h["eval/val/steps_seen"] for h in read_history(tmp_path / "a" / "run") if "eval/val/steps_seen" in h] == [2, 4, 6, 8]
    state = json.loads((tmp_path / "a" / "run" / "checkpoints" / "step-000004" / "state" / "state.json").read_text())
    assert state["callbacks"]["early_stopping"]["waited"] == 1
    # Resumed from step 4 (one evaluation without improvement so far): it stops at step 8 again.
    Trainer(load_config("simclr_tiny", simclr_overrides(tmp_path / "a", **{**base, "train.trained_checkpoint": "4"}))).train()
    assert (tmp_path / "a" / "run" / "checkpoints" / "latest").read_text() == "step-000008"
    with pytest.raises(ValueError, match="`train.early_stopping.monitor=val/accuracy` is not a dev metric"):
        Trainer(load_config("simclr_tiny", simclr_overrides(tmp_path / "b", **{**base, "train.early_stopping.monitor": "val/accuracy"})))
    with pytest.raises(ValueError, match=r"`train.callbacks`: cannot load 'nowhere:Nothing'"):
        Trainer(load_config("simclr_tiny", simclr_overrides(tmp_path / "c", **{**base, "train.callbacks": "[nowhere:Nothing]"})))


# ---------------------------------------------------------------------------- optimizers and schedules


@pytest.mark.parametrize("optimizer", ["sgd", "adam", "lars"])
def test_every_optimizer_trains(tmp_path, optimizer):
    cfg = load_config("simclr_tiny", simclr_overrides(tmp_path, **{
        "train.optimizer": optimizer, "train.max_steps": 3, "train.eval_steps": 0, "train.best_metric": "val/loss",
        "train.warmup_steps": 0, "train.learning_rate": 0.05 if optimizer != "adam" else 1e-3, "deepspeed.config": "zero0"}))  # fmt: skip
    trainer = Trainer(cfg)
    kind = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "lars": LARS}[optimizer]
    assert isinstance(trainer.engine.ds.optimizer, kind) or isinstance(getattr(trainer.engine.ds.optimizer, "optimizer", None), kind)
    before = {k: v.clone() for k, v in trainer.task.state_dict().items()}
    trainer.train()
    assert any(not torch.equal(before[k], v) for k, v in trainer.task.state_dict().items())
    if optimizer == "lars":
        with pytest.raises(ValueError, match="`train.optimizer=lars` needs ZeRO-0 in fp32"):
            Trainer(load_config("simclr_tiny", simclr_overrides(tmp_path / "z2", **{"train.optimizer": "lars", "deepspeed.config": "zero2"})))


def test_lars_step_is_the_trust_ratio_times_the_decayed_gradient():
    w = torch.nn.Parameter(torch.tensor([[3.0, 4.0]]))  # ||w|| = 5
    b = torch.nn.Parameter(torch.tensor([1.0]))
    w.grad, b.grad = torch.tensor([[0.0, 1.0]]), torch.tensor([2.0])
    opt = LARS([{"params": [w], "weight_decay": 0.5, "lars": True}, {"params": [b], "weight_decay": 0.0, "lars": False}],
               lr=0.1, momentum=0.9, trust_coefficient=0.01)  # fmt: skip
    opt.step()
    d = torch.tensor([[1.5, 3.0]])  # g + 0.5 w
    expected = torch.tensor([[3.0, 4.0]]) - 0.1 * (0.01 * 5.0 / torch.linalg.vector_norm(d)) * d
    torch.testing.assert_close(w.detach(), expected)
    torch.testing.assert_close(b.detach(), torch.tensor([1.0 - 0.1 * 2.0]))  # plain SGD, no adaptation


def test_one_cycle_and_cosine_are_torchs():
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=2.0)
    one_cycle = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2.0, total_steps=50, pct_start=0.3, anneal_strategy="cos",
                                                    cycle_momentum=False)  # fmt: skip
    for step in range(50):
        assert opt.param_groups[0]["lr"] == pytest.approx(2.0 * lr_multiplier(step, "one_cycle", 0, 50, 2.0, 0.0), rel=1e-9)
        opt.step()
        one_cycle.step()
    opt = torch.optim.SGD([param], lr=2.0)
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=30, eta_min=0.1)
    for step in range(31):
        assert opt.param_groups[0]["lr"] == pytest.approx(2.0 * lr_multiplier(step, "cosine", 0, 30, 2.0, 0.1), rel=1e-9)
        opt.step()
        cosine.step()
    assert lr_multiplier(45, "cosine", 0, 30, 2.0, 0.1) == pytest.approx(0.05)  # past T_max: stays at eta_min


def test_schedule_steps_sets_t_max(tmp_path):
    cfg = load_config("simclr_tiny", simclr_overrides(tmp_path, **{
        "train.max_steps": 6, "train.schedule_steps": 3, "train.warmup_steps": 0, "train.eval_steps": 0, "train.best_metric": "val/loss",
        "train.loss_logging_steps": 1, "train.learning_rate": 1e-3, "train.lr2": 1e-5}))  # fmt: skip
    Trainer(cfg).train()
    lrs = [h["lr"] for h in read_history(tmp_path / "run") if "lr" in h]
    assert lrs[2:] == pytest.approx([1e-5] * 4) and lrs[0] > lrs[1] > lrs[2]


# ---------------------------------------------------------------------------- processes


@pytest.mark.multiprocess
def test_two_processes_train_the_one_process_model_and_a_sigkill_resumes_bitwise(tmp_path):
    """ViT (layer norm only): 1 process x 8 and 2 processes x 4 give the same losses; a 2-process run
    killed at a random step and resumed ends with bitwise the weights of the unbroken run."""
    from safetensors.torch import load_file

    common = ["train", "--config", "simclr_tiny", "train.max_steps=8", "train.save_steps=2", "train.eval_steps=0",
              "train.loss_logging_steps=1", "train.warmup_steps=1", "simclr.knn_bank=''", "train.best_metric=val/loss",
              f"data.dev_splits={{val: [{PHOTOS / 'val'}]}}", "train.progress_bar=false"]  # fmt: skip

    def run(name, nproc, batch, *extra, **kw):
        args = [*common, f"train.output_dir={tmp_path / name / 'run'}", f"data.cache_dir={tmp_path / 'cache'}", f"train.batch_size={batch}", *extra]
        return launch(args, nproc=nproc, **kw)

    run("one", 1, 8, launcher="python")
    run("two", 2, 4)
    one = [h["loss"] for h in read_history(tmp_path / "one" / "run") if "lr" in h]
    two = [h["loss"] for h in read_history(tmp_path / "two" / "run") if "lr" in h]
    np.testing.assert_allclose(two, one, rtol=1e-5)
    step = kill_step(3, 7)
    run("killed", 2, 4, env={"LUCATRAIN_FAULT": f"step:{step}"}, expect_failure=True)
    run("killed", 2, 4, "train.trained_checkpoint=latest")
    assert "resumed from" in (tmp_path / "killed" / "run" / "logs" / "training.log").read_text()
    a, b = (load_file(str(tmp_path / name / "run" / "last" / "model.safetensors")) for name in ("two", "killed"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), step


# ---------------------------------------------------------------------------- the Phenoscape config


PHENOSCAPE = """\
data_dir: {data}
out_dir: {out}
backbone: vit_tiny
weights: null
input_size: 32
lr: 0.002
batch_size: 16
max_epochs: 3
temperature: 0.2
seed: 7
accelerator: cpu
devices: 1
strategy: ddp
num_workers: 0
pin_memory: true
persistent_workers: false
deterministic: true
log_every_n_steps: 2
precision: 32
accumulate_grad_batches: 2
lr_scheduler: cosine
T_max: 2
eta_min: 1.0e-5
early_stopping: {{monitor: val_loss, patience: 4, min_delta: 0.001}}
transforms: {{input_size: 32, cj_prob: 0.7, cj_strength: 0.4, min_scale: 0.2, random_gray_scale: 0.1, gaussian_blur: 0.3,
             kernel_size: 0.2, sigmas: [0.2, 1.5]}}
"""


def test_a_phenoscape_config_maps_onto_every_section_and_trains(tmp_path):
    from lucatrain.cli import main
    from lucatrain.families.simclr.phenoscape import phenoscape_overrides

    config = tmp_path / "phenoscape.yaml"
    config.write_text(PHENOSCAPE.format(data=PHOTOS, out=tmp_path / "run"))
    overrides, notes = phenoscape_overrides(config)
    cfg = load_config("simclr", [*overrides, f"data.cache_dir={tmp_path / 'cache'}", "train.progress_bar=false"])
    t, s = cfg.train, cfg.simclr
    assert (t.learning_rate, t.batch_size, t.num_train_epochs, t.max_steps, t.seed) == (0.002, 16, 3, 0, 7)
    assert (t.gradient_accumulation_steps, t.loss_logging_steps, t.lr_scheduler, t.schedule_epochs, t.lr2) == (2, 2, "cosine", 2, 1e-5)
    assert (t.early_stopping.monitor, t.early_stopping.patience, t.early_stopping.min_delta) == ("val/loss", 4, 0.001)
    assert (s.backbone, s.weights, s.temperature, s.transforms.min_scale, s.transforms.sigmas) == ("vit_tiny", "", 0.2, 0.2, [0.2, 1.5])
    assert (cfg.deepspeed.config, cfg.deepspeed.precision, cfg.data.num_workers) == ("zero0", "fp32", 0)
    assert cfg.data.train_files == [str(PHOTOS / "train")] and set(cfg.data.dev_splits) == {"val", "bank"}
    assert any("pin_memory" in n for n in notes) and any("deterministic" in n for n in notes)
    # Through the command line; T_max = 2 epochs: the cosine ends after 2 of the 3 epochs.
    assert main(["train", "--phenoscape", str(config), f"data.cache_dir={tmp_path / 'cache'}", "train.progress_bar=false",
                 "train.eval_steps=0"]) == 0  # fmt: skip
    lrs = [h["lr"] for h in read_history(tmp_path / "run") if "lr" in h]
    per_epoch = 127 // 32  # 2 x 16 per step
    assert lrs[2 * per_epoch - 1 :] == pytest.approx([1e-5] * (len(lrs) - 2 * per_epoch + 1)) and lrs[0] > 1e-5
    # Refused, naming the key: an unknown key, a download, a Lightning checkpoint.
    for text, message in (("momentum_typo: 1\n", "`momentum_typo`: not a Phenoscape SimCLR key"),
                          ("weights: DEFAULT\n", "`weights`: DEFAULT means downloading"),
                          (f"resume: {tmp_path / 'elsewhere' / 'last.ckpt'}\n", "a Lightning .ckpt cannot be resumed here")):  # fmt: skip
        bad = tmp_path / "bad.yaml"
        bad.write_text(text)
        with pytest.raises(ConfigError, match=message):
            phenoscape_overrides(bad)
    # --resume <out_dir>/last.ckpt: that run's newest checkpoint.
    resume = tmp_path / "resume.yaml"
    resume.write_text(f"resume: {tmp_path / 'run' / 'last.ckpt'}\n")
    assert phenoscape_overrides(resume)[0] == [f"train.output_dir={tmp_path / 'run'}", "train.trained_checkpoint=latest"]


def test_view_pairs_reach_tensorboard_and_plot_draws_the_curves(tmp_path):
    from PIL import Image
    from tensorboard.backend.event_processing.event_accumulator import IMAGES, EventAccumulator

    from lucatrain.cli import main

    cfg = load_config("simclr_tiny", simclr_overrides(tmp_path, **{"train.max_steps": 4, "train.eval_steps": 2, "simclr.log_views_steps": 2,
                                                                    "train.warmup_steps": 1}))  # fmt: skip
    Trainer(cfg).train()
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"), size_guidance={IMAGES: 0})
    events.Reload()
    logged = events.Images("views")
    assert [e.step for e in logged] == [0, 2, 4]
    assert (logged[0].width, logged[0].height) == (2 * 32, 4 * 32)  # 4 images, view a | view b
    assert logged[1].encoded_image_string != logged[2].encoded_image_string  # another epoch, other views
    assert main(["plot", str(tmp_path / "run")]) == 0
    pngs = sorted(p.name for p in (tmp_path / "run" / "plots").glob("*.png"))
    assert pngs == ["knn_top1.png", "loss.png", "lr.png"]
    assert Image.open(tmp_path / "run" / "plots" / "loss.png").size == (600, 350)
    assert main(["plot", str(tmp_path / "nowhere")]) == 2


def test_run_script_maps_its_variables_and_trains(tmp_path):
    import os
    import subprocess

    env = {**os.environ, "TINY": "1", "LAUNCHER": "python", "max_epochs": "1", "out_dir": str(tmp_path / "run"), "lr": "0.002",
           "EXTRA_ARGS": f"data.cache_dir={tmp_path / 'cache'} train.progress_bar=false train.warmup_steps=1"}  # fmt: skip
    env.pop("CUDA_VISIBLE_DEVICES", None)
    result = subprocess.run(["bash", "run_scripts/run_simclr.sh"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    config = (tmp_path / "run" / "config.yaml").read_text()
    assert "model_type: simclr" in config and "num_train_epochs: 1" in config and "learning_rate: 0.002" in config
    assert (tmp_path / "run" / "last" / "backbone" / "config.json").is_file()
