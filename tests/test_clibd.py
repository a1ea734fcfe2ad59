"""The CLIBD family end to end: CLIBD's HDF5 layout in, contrastive training through the generic loop,
retrieval evaluation, export, bad specimens, and exact resume over two real processes."""

import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, kill_step, launch, read_history
from lucatrain.config import ConfigError, load_config
from lucatrain.data.clibd_hdf5 import ClibdHdf5, write_clibd_hdf5
from lucatrain.families.clibd import load_clibd
from lucatrain.task import EVAL_EPOCH
from lucatrain.trainer import Trainer

SAMPLE = REPO / "examples" / "data" / "clibd_sample.hdf5"


def clibd_overrides(tmp_path, sample=SAMPLE, **extra) -> list[str]:
    values = {
        "train.output_dir": tmp_path / "run", "data.cache_dir": tmp_path / "cache",
        "data.train_files": f"[{sample}]",
        "data.dev_splits": f"{{val_seen: [{sample}], val_unseen: [{sample}], all_keys: [{sample}]}}",
        "train.progress_bar": "false", "train.loss_logging_steps": 2, "train.warmup_steps": 1,
        "clibd.output_dim": 16, "clibd.dropout": 0.0,
        "clibd.image.hidden_size": 32, "clibd.image.num_attention_heads": 4, "clibd.image.num_hidden_layers": 1,
        "clibd.image.resize": 40, "clibd.image.crop": 32, "clibd.image.patch_size": 16,
        "clibd.dna.hidden_size": 32, "clibd.dna.num_attention_heads": 4, "clibd.dna.num_hidden_layers": 1,
        "clibd.text.hidden_size": 32, "clibd.text.num_attention_heads": 4, "clibd.text.num_hidden_layers": 1,
    }  # fmt: skip
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]


@pytest.fixture(scope="module")
def contrastive_run(tmp_path_factory):
    """40 steps of the shipped tiny recipe (the demo's tower sizes, so that they learn a clear signal):
    (trainer, val_seen metrics before training, the run's tmp dir). The fine-tuning tests start from its export."""
    tmp_path = tmp_path_factory.mktemp("contrastive")
    sizes = [o for o in clibd_overrides(tmp_path) if not o.startswith(("clibd.image.", "clibd.dna.", "clibd.text.", "clibd.output_dim"))]
    cfg = load_config("clibd_tiny", [*sizes, "train.max_steps=40", "train.eval_steps=40"])
    trainer = Trainer(cfg)
    untrained = trainer.evaluate()["val_seen"]
    trainer.train()
    return trainer, untrained, tmp_path


def test_trains_evaluates_by_retrieval_and_exports(contrastive_run):
    trainer, untrained, tmp_path = contrastive_run
    history = read_history(tmp_path / "run")
    losses = [h["loss"] for h in history if "lr" in h]
    assert losses[-1] < 0.8 * losses[0], losses  # the contrastive loss falls
    assert {"image_dna/loss", "dna_text/loss", "image_text/loss", "logit_scale"} <= set(next(h for h in history if "lr" in h))
    final = next(h for h in reversed(history) if "eval/val_seen/image_to_dna/genus/top1_micro" in h)
    # Cross-modal retrieval is learnt: image -> DNA and text -> DNA find the query's genus far more often
    # than before training (14 genera among the keys; by chance about 1 time in 10).
    names = [f"{pair}/genus/top{k}_micro" for pair in ("image_to_dna", "dna_to_image", "text_to_dna") for k in (1, 5)]
    before = sum(untrained[name] for name in names) / len(names)
    after = sum(final[f"eval/val_seen/{name}"] for name in names) / len(names)
    print(f"cross-modal genus retrieval, mean of top-1/top-5: {before:.3f} untrained -> {after:.3f}")
    assert after >= before + 0.1, (before, after)
    assert final["eval/val_seen/dna_to_dna/genus/top5_micro"] >= final["eval/val_seen/dna_to_dna/genus/top1_micro"]
    assert "eval/all_keys/hm/image_to_dna/genus/top1_micro" in final
    # The export gives the trained model's embeddings.
    task, collator = load_clibd(tmp_path / "run" / "last")
    collator.files = trainer.collator.files
    split = trainer.dev_splits["val_seen"]
    batch = collator(split.data.rows(split.rows[:5], split.columns), EVAL_EPOCH)
    with torch.no_grad():
        exported = task.embed(batch)
        trainer.task.eval()
        trained = trainer.task.embed(batch)
    for modality in ("image", "dna", "text"):
        torch.testing.assert_close(exported[modality], trained[modality], rtol=0, atol=1e-6)
    assert (tmp_path / "run" / "best" / "model.safetensors").is_file()
    # The embedding API on raw inputs (JPEG bytes, barcode strings, taxonomy) gives the same vectors.
    from transformers import AutoModel

    from lucatrain.families.clibd import embed

    hdf5 = ClibdHdf5(SAMPLE)
    specimens = [hdf5.specimen("val_seen", int(i)) for i in split.data.rows(split.rows[:5], ["index"])["index"]]
    raw = embed(tmp_path / "run" / "last", images=[s["image"] for s in specimens], barcodes=[s["barcode"] for s in specimens],
                taxonomy=[s["taxonomy"] for s in specimens])  # fmt: skip
    for modality in ("image", "dna", "text"):
        np.testing.assert_allclose(raw[modality], trained[modality].numpy(), rtol=0, atol=1e-6)
    # Every tower's encoder is a transformers directory too.
    bert = AutoModel.from_pretrained(tmp_path / "run" / "last" / "dna_encoder")
    torch.testing.assert_close(bert.embeddings.word_embeddings.weight, trainer.task.towers["dna"].encoder.embeddings.word_embeddings.weight)


def finetune_overrides(tmp_path, export, **extra) -> list[str]:
    values = {
        "train.output_dir": tmp_path / "finetune", "data.cache_dir": tmp_path / "cache", "model.model_dirpath": export,
        "data.train_files": f"[{SAMPLE}]",
        "data.dev_splits": f"{{val_seen: [{SAMPLE}], val_unseen: [{SAMPLE}], unseen_keys: [{SAMPLE}]}}",
        "train.progress_bar": "false", "train.loss_logging_steps": 5,
    }  # fmt: skip
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]


def test_fine_tuning_stage_learns_a_classifier_in_its_own_run(contrastive_run, tmp_path):
    from lucatrain.families.clibd import load_classifier

    _, _, contrastive_dir = contrastive_run
    export = contrastive_dir / "run" / "last"
    before = {p: p.stat().st_mtime_ns for p in (contrastive_dir / "run").rglob("*") if p.is_file()}
    cfg = load_config("clibd_finetune_tiny", finetune_overrides(tmp_path, export, **{"train.eval_steps": 90}))
    trainer = Trainer(cfg)
    assert len(trainer.family.classes) == 9  # the seen genera of seen_keys
    untrained = trainer.evaluate()
    trainer.train()
    history = read_history(tmp_path / "finetune")
    losses = [h["loss"] for h in history if "lr" in h]
    assert losses[-1] < 0.6 * losses[0], losses
    final = next(h for h in reversed(history) if "eval/val_seen/genus/top1_micro" in h)
    seen_before, seen_after = untrained["val_seen"]["classifier/genus/top1_micro"], final["eval/val_seen/classifier/genus/top1_micro"]
    print(f"fine-tuned genus classifier, val_seen top-1: {seen_before:.3f} untrained -> {seen_after:.3f} (9 genera)")
    assert seen_after >= seen_before + 0.2 and seen_after >= 0.4, (seen_before, seen_after)
    # The classifier alone cannot name an unseen genus; the retrieval of unseen keys can.
    assert final["eval/val_unseen/classifier/genus/top1_micro"] == 0.0
    assert final["eval/val_unseen/genus/top1_micro"] > 0.1
    assert 0.0 <= final["eval/unseen_keys/threshold"] <= 1.0 and final["eval/unseen_keys/hm/genus/top1_micro"] > 0.1
    # Its own run directory; the contrastive run is left as it was.
    assert (tmp_path / "finetune" / "best" / "classifier.json").is_file()
    assert {p: p.stat().st_mtime_ns for p in (contrastive_dir / "run").rglob("*") if p.is_file()} == before
    # The export gives the trained classifier's logits.
    classifier, classes = load_classifier(tmp_path / "finetune" / "last")
    assert classes == sorted(trainer.family.classes)
    split = trainer.dev_splits["val_seen"]
    batch = trainer.collator(split.data.rows(split.rows[:6], split.columns), EVAL_EPOCH)
    with torch.no_grad():
        trainer.task.eval()
        torch.testing.assert_close(classifier.logits(batch), trainer.task.logits(batch), rtol=0, atol=1e-5)


def test_fine_tuning_resumes_exactly(contrastive_run, tmp_path):
    _, _, contrastive_dir = contrastive_run
    export = contrastive_dir / "run" / "last"
    common = {"train.lr_scheduler": "constant", "train.warmup_steps": 1, "train.eval_steps": 0, "train.save_steps": 3, "clibd_finetune.unseen_keys": "",
              "data.dev_splits": f"{{val_seen: [{SAMPLE}]}}", "train.best_metric": "classifier/genus/top1_micro"}  # fmt: skip
    Trainer(load_config("clibd_finetune_tiny", finetune_overrides(tmp_path / "a", export, **common, **{"train.max_steps": 6}))).train()
    Trainer(load_config("clibd_finetune_tiny", finetune_overrides(tmp_path / "b", export, **common, **{"train.max_steps": 3}))).train()
    resumed = {**common, "train.max_steps": 6, "train.trained_checkpoint": "3"}
    Trainer(load_config("clibd_finetune_tiny", finetune_overrides(tmp_path / "b", export, **resumed))).train()
    a, b = (load_file(str(tmp_path / run / "finetune" / "last" / "model.safetensors")) for run in ("a", "b"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_fine_tuning_threshold_and_accuracy_match_a_direct_computation():
    """CLIBD's combination, computed here query by query with plain numpy (no faiss, no vectorising)."""
    from lucatrain.families.clibd.finetune import ClibdFinetuneConfig, score

    rng = np.random.default_rng(0)
    classes, dim = 5, 8
    class_taxa = np.array([[-1, 10 + c // 2, 100 + c, 1000 + c] for c in range(classes)])  # order unclassified
    keys_taxa = np.array([[-1, 20 + j // 3, 200 + j // 2, 2000 + j] for j in range(7)])
    keys = {"dna": rng.normal(size=(7, dim)).astype(np.float32), "taxon_ids": keys_taxa, "image_present": np.ones(7, dtype=np.int64)}

    def split(n, seen):
        truth = class_taxa[rng.integers(0, classes, n)] if seen else keys_taxa[rng.integers(0, 7, n)]
        return {"logits": rng.normal(scale=2.0, size=(n, classes)).astype(np.float32), "image": rng.normal(size=(n, dim)).astype(np.float32),
                "taxon_ids": truth, "image_present": (rng.random(n) > 0.1).astype(np.int64)}  # fmt: skip

    gathered = {"val_seen": split(40, True), "val_unseen": split(30, False), "unseen_keys": keys}
    cfg = ClibdFinetuneConfig(level="species", ks=[1, 3])
    got = score(gathered, class_taxa, cfg)

    def guesses(out, threshold):
        """Per query with an image: (truth, [final taxa of guesses 1..3], [classifier taxa 1..3])."""
        rows = []
        for i in np.flatnonzero(out["image_present"]):
            logits = out["logits"][i].astype(np.float64)
            probs = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
            order = np.argsort(-probs, kind="stable")[:3]
            q = out["image"][i] / np.linalg.norm(out["image"][i])
            k = keys["dna"] / np.linalg.norm(keys["dna"], axis=1, keepdims=True)
            near = np.argsort(-(k @ q), kind="stable")[:3]
            final = [class_taxa[order[j]] if probs[order[j]] > threshold else keys_taxa[near[j]] for j in range(3)]
            rows.append((out["taxon_ids"][i], final, [class_taxa[c] for c in order]))
        return rows

    def top1(rows):
        return np.mean([row[1][0][3] == row[0][3] for row in rows])

    def hm(a, b):
        return 0.0 if min(a, b) <= 0 else 2 / (1 / a + 1 / b)

    best, best_score = None, -1.0
    for threshold in np.linspace(0, 1, 1001):
        value = hm(top1(guesses(gathered["val_seen"], threshold)), top1(guesses(gathered["val_unseen"], threshold)))
        if value > best_score:
            best, best_score = threshold, value
    assert got["unseen_keys"]["threshold"] == pytest.approx(best)
    for name in ("val_seen", "val_unseen"):
        rows = guesses(gathered[name], best)
        for level, col in (("family", 1), ("genus", 2), ("species", 3)):
            for k in (1, 3):
                hits = np.array([any(g[col] == truth[col] for g in final[:k]) for truth, final, _ in rows])
                labels = np.array([truth[col] for truth, _, _ in rows])
                macro = np.mean([hits[labels == label].mean() for label in np.unique(labels)])
                plain = np.mean([any(g[col] == truth[col] for g in mine[:k]) for truth, _, mine in rows])
                assert got[name][f"{level}/top{k}_micro"] == pytest.approx(hits.mean())
                assert got[name][f"{level}/top{k}_macro"] == pytest.approx(macro)
                assert got[name][f"classifier/{level}/top{k}_micro"] == pytest.approx(plain)
        assert "order/top1_micro" not in got[name]  # unclassified everywhere: not scored
    species = [got[s]["species/top1_micro"] for s in ("val_seen", "val_unseen")]
    assert got["unseen_keys"]["hm/species/top1_micro"] == pytest.approx(hm(*species)) and min(species) > 0


def test_fine_tuning_config_is_checked(tmp_path):
    with pytest.raises(ConfigError, match="`model.model_dirpath`: the CLIBD export to fine-tune"):
        load_config("clibd_finetune_tiny", ["model.model_dirpath="])
    with pytest.raises(ConfigError, match=r"`clibd_finetune.unseen_keys` \('unseen_keys'\) must be one of the dev splits"):
        load_config("clibd_finetune_tiny", [f"data.dev_splits={{val_seen: [{SAMPLE}]}}"])
    with pytest.raises(ConfigError, match="`clibd_finetune.level` must be one of"):
        load_config("clibd_finetune_tiny", ["clibd_finetune.level=kingdom"])
    cfg = load_config("clibd_finetune_tiny", finetune_overrides(tmp_path, tmp_path / "nothing"))
    with pytest.raises(ValueError, match=r"`model.model_dirpath=.*nothing`: model.safetensors not found"):
        Trainer(cfg)


def _specimens(path, corrupt_index=None):
    data = ClibdHdf5(SAMPLE)
    groups = {}
    for group in ("no_split_and_seen_train", "val_seen", "val_unseen", "all_keys"):
        rows = [data.specimen(group, i) for i in range(min(12, data.num_specimens(group)))]
        groups[group] = rows
    if corrupt_index is not None:
        groups["no_split_and_seen_train"][corrupt_index]["image"] = b"\xff\xd8 not a jpeg"
    return write_clibd_hdf5(path, groups)


def test_a_specimen_whose_image_does_not_decode_is_named_before_training(tmp_path):
    bad = _specimens(tmp_path / "bad.hdf5", corrupt_index=3)
    cfg = load_config("clibd_tiny", clibd_overrides(tmp_path, sample=bad, **{"train.max_steps": 2, "train.batch_size": 4}))
    with pytest.raises(ValueError, match=r"bad\.hdf5: group 'no_split_and_seen_train' index 3 \(LUCA\w+\): the image does not decode"):
        Trainer(cfg)
    assert not (tmp_path / "run" / "config.yaml").exists()
    skipping = load_config("clibd_tiny", clibd_overrides(tmp_path / "skip", sample=bad, **{"train.max_steps": 2, "data.bad_records": "skip"}))
    with pytest.raises(ValueError, match=r"no step to train: the 11 trainable samples of .* make no complete global batch of 1 x 16"):
        Trainer(skipping)  # batch 16 > 11 samples
    trainer = Trainer(load_config("clibd_tiny", [*clibd_overrides(tmp_path / "skip", sample=bad, **{"train.max_steps": 2, "data.bad_records": "skip"}), "train.batch_size=4"]))
    assert len(trainer.train_data) == 11 and trainer.train_data.meta["num_rejected"] == 1


def test_config_of_the_family_is_checked(tmp_path):
    with pytest.raises(ConfigError, match="`clibd.use_horovod`: not supported, DeepSpeed is the backend"):
        load_config("clibd_tiny", ["clibd.use_horovod=true"])
    with pytest.raises(ConfigError, match=r"`clibd.key_split` \('all_keys'\) must be one of the dev splits \['val_seen'\]"):
        load_config("clibd_tiny", [f"data.dev_splits={{val_seen: [{SAMPLE}]}}"])
    with pytest.raises(ConfigError, match="a CLIBD dev split is read from the HDF5 group of its name"):
        load_config("clibd_tiny", [f"data.dev_files=[{SAMPLE}]"])
    with pytest.raises(ConfigError, match=r"`clibd.retrieval`: 'image_to_audio' is not <query>_to_<key>"):
        load_config("clibd_tiny", ["clibd.retrieval=[image_to_audio]"])


@pytest.mark.multiprocess
def test_two_processes_equal_one_and_a_sigkill_resumes_bitwise(tmp_path):
    """The global batch is the same whether one process holds it or two share it (the loss gathers every
    rank's rows), also through GradCache; a run killed at a random step and resumed ends with
    bitwise-equal weights, and resumed by one process it continues the same global batches."""
    small = _specimens(tmp_path / "small.hdf5")
    common = {"train.max_steps": 8, "train.save_steps": 2, "train.eval_steps": 4, "deepspeed.config": "zero2"}
    one = tmp_path / "one"
    launch(["train", "--config", "clibd_tiny", *clibd_overrides(one, sample=small, **common, **{"train.batch_size": 8})],
           nproc=1, launcher="python")  # fmt: skip
    two = tmp_path / "two"
    launch(["train", "--config", "clibd_tiny", *clibd_overrides(two, sample=small, **common, **{"train.batch_size": 4})], nproc=2)
    losses = lambda run: [h["loss"] for h in read_history(run / "run") if "lr" in h]  # noqa: E731
    np.testing.assert_allclose(losses(two), losses(one), rtol=1e-5)
    # GradCache across ranks: 2 processes x 2 micro-batches of 2, one contrastive batch of 8 per step.
    cached = tmp_path / "cached"
    launch(["train", "--config", "clibd_tiny", *clibd_overrides(cached, sample=small, **common, **{
        "train.batch_size": 2, "train.gradient_accumulation_steps": 2, "clibd.grad_cache": "true"})], nproc=2)  # fmt: skip
    np.testing.assert_allclose(losses(cached), losses(one), rtol=1e-5)
    at = kill_step(3, 7)
    killed = tmp_path / "killed"
    args = ["train", "--config", "clibd_tiny", *clibd_overrides(killed, sample=small, **common, **{"train.batch_size": 4})]
    launch(args, nproc=2, env={"LUCATRAIN_FAULT": f"step:{at}"}, expect_failure=True)
    # The same checkpoint resumed by one process holding the whole global batch (a world-size change).
    shrunk = tmp_path / "shrunk"
    shutil.copytree(killed, shrunk)
    launch(["train", "--config", "clibd_tiny", *clibd_overrides(shrunk, sample=small, **common, **{"train.batch_size": 8}),
            "train.trained_checkpoint=latest"], nproc=1, launcher="python")  # fmt: skip
    assert "world size 2 -> 1" in (shrunk / "run" / "logs" / "training.log").read_text()
    np.testing.assert_allclose(losses(shrunk)[-1], losses(two)[-1], rtol=1e-5)
    launch([*args, "train.trained_checkpoint=latest"], nproc=2)
    assert "resumed from" in (killed / "run" / "logs" / "training.log").read_text()
    want, got = load_file(two / "run" / "last" / "model.safetensors"), load_file(killed / "run" / "last" / "model.safetensors")
    for key in want:
        np.testing.assert_array_equal(got[key].numpy(), want[key].numpy(), err_msg=f"{key} (killed at step {at})")
    assert losses(killed)[-1] == losses(two)[-1]


def test_run_script_and_demo_verb_run_the_tiny_recipe(tmp_path):
    import os
    import subprocess

    # Both stages: the contrastive run, then CLIBD's fine-tuning stage from its best/ into its own directory.
    env = {**os.environ, "TINY": "1", "STAGE": "both", "LAUNCHER": "python", "nproc_per_node": "1", "max_steps": "3",
           "fine_tuning_epochs": "1", "model_output_name": "x", "RUNS_DIR": str(tmp_path / "runs"),
           "EXTRA_ARGS": f"data.cache_dir={tmp_path / 'cache'} train.warmup_steps=1 train.eval_steps=0 train.progress_bar=false"}  # fmt: skip
    env.pop("CUDA_VISIBLE_DEVICES", None)
    result = subprocess.run(["bash", "run_scripts/run_clibd.sh"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    config = (tmp_path / "runs" / "x" / "config.yaml").read_text()
    assert "model_type: clibd" in config and "batch_size: 16" in config and "gather_with_grad: true" in config
    fine_tuned = (tmp_path / "runs" / "x" / "supervise_fine_tune" / "config.yaml").read_text()
    assert "model_type: clibd_finetune" in fine_tuned and f"model_dirpath: {tmp_path / 'runs' / 'x' / 'best'}" in fine_tuned
    assert (tmp_path / "runs" / "x" / "supervise_fine_tune" / "last" / "classifier.json").is_file()
    from lucatrain.cli import main

    demo = ["demo", "clibd", f"train.output_dir={tmp_path / 'demo'}", f"data.cache_dir={tmp_path / 'cache'}", "train.max_steps=2",
            "train.warmup_steps=1", "train.eval_steps=0", "train.progress_bar=false"]  # fmt: skip
    assert main(demo) == 0
    assert (tmp_path / "demo" / "last" / "clibd.json").is_file()
    assert main(["demo", "audio"]) == 2  # not a demo: one clear line


def test_grad_cache_step_equals_one_large_plain_step(tmp_path):
    """GradCache over 4 micro-batches of 4 is the plain step over one micro-batch of 16 (the same global
    batch as one contrastive batch): the same losses and, after 4 optimizer steps, the same weights."""
    small = _specimens(tmp_path / "small.hdf5")
    common = {"train.max_steps": 4, "train.eval_steps": 0, "train.loss_logging_steps": 1, "data.dev_splits": "{}", "train.best_metric": "loss"}
    plain = load_config("clibd_tiny", clibd_overrides(tmp_path / "plain", sample=small, **common, **{"train.batch_size": 8}))
    cached = load_config("clibd_tiny", clibd_overrides(tmp_path / "cached", sample=small, **common, **{
        "train.batch_size": 2, "train.gradient_accumulation_steps": 4, "clibd.grad_cache": "true"}))  # fmt: skip
    Trainer(plain).train()
    Trainer(cached).train()
    losses = lambda run: [h["loss"] for h in read_history(run / "run") if "lr" in h]  # noqa: E731
    np.testing.assert_allclose(losses(tmp_path / "cached"), losses(tmp_path / "plain"), rtol=1e-5)
    want = load_file(tmp_path / "plain" / "run" / "last" / "model.safetensors")
    got = load_file(tmp_path / "cached" / "run" / "last" / "model.safetensors")
    for key in want:
        np.testing.assert_allclose(got[key].numpy(), want[key].numpy(), rtol=0, atol=2e-5, err_msg=key)
    # Not vacuous: the plain step over the same 4 micro-batches of 2 sees fewer negatives and trains otherwise.
    accumulated = load_config("clibd_tiny", clibd_overrides(tmp_path / "acc", sample=small, **common, **{
        "train.batch_size": 2, "train.gradient_accumulation_steps": 4}))  # fmt: skip
    Trainer(accumulated).train()
    assert abs(losses(tmp_path / "acc")[0] - losses(tmp_path / "plain")[0]) > 1e-2


def test_lora_on_chosen_towers_trains_adapters_only_and_exports_merged_weights(tmp_path):
    """clibd.lora_towers: those encoders' base weights stay as initialised, their adapters and every
    projection train; the export folds the adapters in and reproduces the trained embeddings."""
    cfg = load_config("clibd_tiny", clibd_overrides(tmp_path, **{"train.max_steps": 4, "train.eval_steps": 0, "data.dev_splits": "{}",
                                                                  "train.best_metric": "loss", "clibd.lora_towers": "[dna, text]",
                                                                  "lora.r": 4, "lora.alpha": 8}))  # fmt: skip
    trainer = Trainer(cfg)
    before = {k: v.detach().clone() for k, v in trainer.task.state_dict().items()}
    trainable = {n for n, p in trainer.task.named_parameters() if p.requires_grad}
    assert any("towers.dna.encoder" in n and "lora_A" in n for n in trainable)
    assert not any(n.startswith(("towers.dna.encoder", "towers.text.encoder")) and "lora_" not in n for n in trainable)
    assert "towers.dna.proj.weight" in trainable and any(n.startswith("towers.image.encoder") for n in trainable)
    trainer.train()
    after = trainer.task.state_dict()
    base = [k for k in before if k.startswith("towers.dna.encoder") and ".base_layer.weight" in k]
    assert base and all(torch.equal(before[k], after[k]) for k in base)
    assert any(not torch.equal(before[k], after[k]) for k in before if "lora_B" in k)
    task, collator = load_clibd(tmp_path / "run" / "last")
    collator.files = trainer.collator.files
    rows = trainer.train_data.rows(np.arange(6), trainer.columns)
    batch = collator(rows, EVAL_EPOCH)
    trainer.task.eval()
    with torch.no_grad():
        for modality in ("dna", "text"):
            torch.testing.assert_close(task.embed(batch)[modality], trainer.task.embed(batch)[modality], rtol=0, atol=1e-5)
    with pytest.raises(ConfigError, match="for CLIBD towers list them in `clibd.lora_towers`"):
        load_config("clibd_tiny", ["lora.enabled=true"])


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_qlora_trains_adapters_on_a_4bit_base_resumes_and_exports_the_dequantized_model(tmp_path, precision):
    """clibd.qlora: the LoRA towers' encoders hold NF4 weights (bitsandbytes), frozen; the adapters
    train; a resume continues bitwise; the export is dequant(base) + adapters in plain float."""
    pytest.importorskip("bitsandbytes")
    import bitsandbytes as bnb

    overrides = {"train.eval_steps": 0, "data.dev_splits": "{}", "train.best_metric": "loss", "train.save_steps": 2,
                 "train.lr_scheduler": "constant", "clibd.lora_towers": "[dna, text]", "clibd.qlora": "true",
                 "clibd.qlora_on_cpu": "true", "lora.r": 4, "lora.alpha": 8, "deepspeed.precision": precision}  # fmt: skip
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="QLoRA's 4-bit kernels are for CUDA GPUs and this machine has none"):
            load_config("clibd_tiny", clibd_overrides(tmp_path, **{**overrides, "clibd.qlora_on_cpu": "false"}))
    with pytest.raises(ConfigError, match=r"ZeRO-3 partitions every parameter and cannot cut packed 4-bit weights"):
        load_config("clibd_tiny", clibd_overrides(tmp_path, **{**overrides, "deepspeed.config": "zero3"}))
    with pytest.raises(ConfigError, match="name them in `clibd.lora_towers`"):
        load_config("clibd_tiny", ["clibd.qlora=true"])

    whole = Trainer(load_config("clibd_tiny", clibd_overrides(tmp_path / "whole", **{**overrides, "train.max_steps": 4})))
    quantized = [m for m in whole.task.towers["dna"].encoder.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(quantized) == 6  # one layer: query, key, value, attention output, intermediate, output
    assert not [m for m in whole.task.towers["image"].encoder.modules() if isinstance(m, bnb.nn.Linear4bit)]
    trainable = {n for n, p in whole.task.named_parameters() if p.requires_grad}
    assert not any(n.startswith(("towers.dna.encoder", "towers.text.encoder")) and "lora_" not in n
                   and "LayerNorm" not in n and "embeddings" not in n and "bias" not in n for n in trainable)  # fmt: skip
    packed = {n: p.detach().clone() for n, p in whole.task.named_parameters() if p.dtype == torch.uint8}
    assert packed
    whole.train()
    assert all(torch.equal(packed[n], p) for n, p in whole.task.named_parameters() if n in packed)  # the 4-bit base is frozen
    # Killed after step 2 and resumed: the same weights at step 4, bitwise.
    Trainer(load_config("clibd_tiny", clibd_overrides(tmp_path / "part", **{**overrides, "train.max_steps": 2}))).train()
    Trainer(load_config("clibd_tiny", clibd_overrides(tmp_path / "part", **{**overrides, "train.max_steps": 4,
                                                                            "train.trained_checkpoint": "2"}))).train()  # fmt: skip
    a, b = (load_file(str(tmp_path / run / "run" / "last" / "model.safetensors")) for run in ("whole", "part"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # The export is a plain float model whose embeddings are the trained (4-bit) model's.
    assert all(v.dtype == torch.float32 for v in a.values())
    task, collator = load_clibd(tmp_path / "whole" / "run" / "last")
    collator.files = whole.collator.files
    batch = collator(whole.train_data.rows(np.arange(6), whole.columns), EVAL_EPOCH)
    whole.task.eval()
    with torch.no_grad():
        for modality in ("dna", "text"):
            trained = whole.task.embed(batch)[modality].float()
            tolerance = 1e-5 if precision == "fp32" else 2e-2  # bf16: the trained model computes in bf16
            torch.testing.assert_close(task.embed(batch)[modality], trained, rtol=0, atol=tolerance)


def test_a_timm_image_tower_starts_from_a_local_file_and_exports_a_timm_model(tmp_path):
    """clibd.image.arch=timm: the weights come from a local file (its classifier dropped), the tower's
    features are timm's pooled pre-logits, and the export holds a timm-loadable image_encoder/.
    Runs where timm imports (it needs a torchvision built for the installed torch)."""
    import json
    import logging

    timm = pytest.importorskip("timm")
    from safetensors.torch import save_file

    from lucatrain.families.clibd.data import text_vocabulary
    from lucatrain.families.clibd.family import ClibdFamily, build_task

    torch.manual_seed(0)
    source = timm.create_model("vit_tiny_patch16_224", num_classes=7, img_size=32).eval()
    save_file(source.state_dict(), str(tmp_path / "vit.safetensors"))
    overrides = {"clibd.image.arch": "timm", "clibd.image.timm_model": "vit_tiny_patch16_224", "clibd.image.timm_kwargs": "{img_size: 32}",
                 "clibd.image.pretrained": tmp_path / "vit.safetensors", "clibd.modalities": "[image, dna]", "clibd.image.crop": 32,
                 "clibd.retrieval": "[image_to_dna]"}  # fmt: skip
    cfg = load_config("clibd_tiny", clibd_overrides(tmp_path, **overrides))
    vocab = text_vocabulary([])
    task = build_task(cfg, vocab).eval()
    encoder = task.towers["image"].encoder
    expected = {k: v for k, v in source.state_dict().items() if not k.startswith("head.")}
    assert encoder.state_dict().keys() == expected.keys() and all(torch.equal(encoder.state_dict()[k], v) for k, v in expected.items())
    pixels = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        features = task.towers["image"].features({"image": pixels})
        torch.testing.assert_close(features, source.forward_head(source.forward_features(pixels), pre_logits=True))
        trained = task.towers["image"]({"image": pixels})
    family = ClibdFamily(cfg, logging.getLogger("test"))
    family.text_vocab, family.text_spm = vocab, b""
    ClibdFamily.export(tmp_path / "export", task.state_dict(), family.export_info(task))
    loaded, _ = load_clibd(tmp_path / "export")
    config = json.loads((tmp_path / "export" / "image_encoder" / "config.json").read_text())
    again = timm.create_model(config["architecture"], pretrained=True, num_classes=0, **config["model_args"],
                              pretrained_cfg_overlay={"file": str(tmp_path / "export" / "image_encoder" / "model.safetensors")}).eval()  # fmt: skip
    with torch.no_grad():
        torch.testing.assert_close(loaded.towers["image"]({"image": pixels}), trained, rtol=0, atol=1e-6)
        torch.testing.assert_close(again(pixels), features, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match=r"`clibd.image.pretrained=.*missing.safetensors`: no such weights file"):
        build_task(load_config("clibd_tiny", clibd_overrides(tmp_path, **{**overrides, "clibd.image.pretrained": tmp_path / "missing.safetensors"})), vocab)


def test_a_lucaone_encoder_as_the_dna_tower(tmp_path):
    """clibd.dna_tower=lucagplm: the DNA tower is LucaOne's encoder over single nucleotides, starting from
    an export's weights; it trains, exports and embeds like the other towers."""
    from lucatrain.families.clibd import embed
    from lucatrain.models.lucagplm import LucaGPLM, LucaGPLMConfig

    torch.manual_seed(7)
    pretrained = LucaGPLM(LucaGPLMConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=1024))
    pretrained.save_pretrained(tmp_path / "lucaone_export")
    cfg = load_config("clibd_tiny", clibd_overrides(tmp_path, **{"train.max_steps": 3, "train.eval_steps": 0, "data.dev_splits": "{}",
                                                                  "train.best_metric": "loss", "clibd.dna_tower": "lucagplm",
                                                                  "clibd.dna_lucagplm": tmp_path / "lucaone_export"}))  # fmt: skip
    trainer = Trainer(cfg)
    tower = trainer.task.towers["dna"]
    assert torch.equal(tower.encoder.embed_tokens.weight, pretrained.embed_tokens.weight)  # started from the export
    trainer.train()
    assert not torch.equal(tower.encoder.embed_tokens.weight, pretrained.embed_tokens.weight)
    hdf5 = ClibdHdf5(SAMPLE)
    barcodes = [hdf5.specimen("no_split_and_seen_train", i)["barcode"] for i in range(4)]
    vectors = embed(tmp_path / "run" / "last", barcodes=barcodes)["dna"]
    batch = trainer.collator.dna(barcodes)
    tower.eval()
    with torch.no_grad():
        np.testing.assert_allclose(vectors, tower(batch).numpy(), rtol=0, atol=1e-6)
    assert vectors.shape == (4, 16) and (tmp_path / "run" / "last" / "dna_encoder" / "model.safetensors").is_file()


def test_a_local_hugging_face_tokenizer_for_the_text_tower(tmp_path):
    """clibd.text_tokenizer: a tokenizer directory (here a WordPiece vocabulary written offline) tokenizes
    the taxonomy text; the export carries a copy, so embeddings come back without the original."""
    from transformers import BertTokenizerFast

    from lucatrain.families.clibd import embed

    hdf5 = ClibdHdf5(SAMPLE)
    words = sorted({w for i in range(hdf5.num_specimens("all_keys")) for w in
                    " ".join(hdf5.specimen("all_keys", i)["taxonomy"].values()).lower().split()})  # fmt: skip
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    BertTokenizerFast(vocab_file=str(vocab)).save_pretrained(tmp_path / "tokenizer")
    cfg = load_config("clibd_tiny", clibd_overrides(tmp_path, **{"train.max_steps": 2, "train.eval_steps": 0, "data.dev_splits": "{}",
                                                                  "train.best_metric": "loss", "clibd.text_tokenizer": tmp_path / "tokenizer"}))  # fmt: skip
    trainer = Trainer(cfg)
    trainer.train()
    rows = trainer.train_data.rows(np.arange(3), trainer.columns)
    batch = trainer.collator(rows, EVAL_EPOCH)
    assert batch["text_input_ids"][0, 0].item() == 2 and 3 in batch["text_input_ids"][0].tolist()  # [CLS] ... [SEP]
    shutil.rmtree(tmp_path / "tokenizer")
    taxonomy = [{rank: rows[rank][i] for rank in ("order", "family", "genus", "species")} for i in range(3)]
    vectors = embed(tmp_path / "run" / "last", taxonomy=taxonomy)["text"]
    trainer.task.eval()
    with torch.no_grad():
        np.testing.assert_allclose(vectors, trainer.task.towers["text"](batch).numpy(), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="`clibd.text_tokenizer=.*`: not a Hugging Face tokenizer directory"):
        Trainer(load_config("clibd_tiny", clibd_overrides(tmp_path / "bad", **{"clibd.text_tokenizer": tmp_path / "nowhere",
                                                                                "data.dev_splits": "{}", "train.best_metric": "loss"})))


def test_bioscan5m_metadata_table_with_an_image_folder(tmp_path):
    """BIOSCAN-5M's metadata layout (CSV with processid, sampleid, the ranks, dna_barcode, split, chunk)
    and its image folder (<split>/<chunk>/<processid>.jpg) train like the HDF5 layout; CLIBD's groups are
    unions of splits; a missing image is named with the table's line."""
    hdf5 = ClibdHdf5(SAMPLE)
    lines = ["processid,sampleid,phylum,class,order,family,subfamily,genus,species,dna_bin,dna_barcode,split,chunk"]
    for group, split in (("no_split_and_seen_train", "train"), ("val_seen", "val"), ("val_unseen", "val_unseen"),
                         ("unseen_keys", "key_unseen")):  # fmt: skip
        for i in range(8):
            s = hdf5.specimen(group, i)
            folder = tmp_path / "images" / split / "1"
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{s['processid']}.jpg").write_bytes(s["image"])
            t = s["taxonomy"]
            lines.append(f"{s['processid']},{s['sampleid']},Arthropoda,Insecta,,,,{t['genus']},{t['species']},BOLD:X,{s['barcode']},{split},1")
    table = tmp_path / "BIOSCAN_5M_Insect_Dataset_metadata.csv"
    table.write_text("\n".join(lines) + "\n")
    from lucatrain.data.sources import detect_format

    assert detect_format(table) == "bioscan_table"
    splits = f"{{val_seen: [{table}], val_unseen: [{table}], all_keys: [{table}]}}"
    cfg = load_config("clibd_tiny", clibd_overrides(tmp_path, sample=table, **{"data.dev_splits": splits, "clibd.image_dir": tmp_path / "images",
                                                                                "train.max_steps": 2, "train.eval_steps": 2, "train.batch_size": 4}))  # fmt: skip
    trainer = Trainer(cfg)
    assert len(trainer.train_data) == 8 and len(trainer.dev_data["all_keys"]) == 16  # all_keys = train + key_unseen
    assert trainer.train_data.rows([0], ["order"])["order"] == ["not_classified"]  # an empty rank
    trainer.train()
    assert "eval/val_seen/image_to_dna/genus/top1_micro" in read_history(tmp_path / "run")[-1]
    missing = sorted((tmp_path / "images" / "val" / "1").iterdir())[0]
    missing.unlink()
    cfg = load_config("clibd_tiny", clibd_overrides(tmp_path / "again", sample=table, **{"data.dev_splits": splits,
                                                                                          "clibd.image_dir": tmp_path / "images"}))  # fmt: skip
    with pytest.raises(ValueError, match=rf"BIOSCAN_5M_Insect_Dataset_metadata\.csv:1\d: {missing.stem}: image .* not found"):
        Trainer(cfg)


def test_a_sentencepiece_tokenizer_trained_on_the_training_texts(tmp_path):
    """clibd.text_tokenizer=sentencepiece: a unigram model learnt at start-up from the training split's
    taxonomy texts ([PAD] 0, [UNK] 1, [CLS] 2); the export carries it, and embeddings come back."""
    from lucatrain.families.clibd import embed

    cfg = load_config("clibd_tiny", clibd_overrides(tmp_path, **{"train.max_steps": 2, "train.eval_steps": 0, "data.dev_splits": "{}",
                                                                  "train.best_metric": "loss", "clibd.text_tokenizer": "sentencepiece",
                                                                  "clibd.text_vocab_size": 60}))  # fmt: skip
    trainer = Trainer(cfg)
    vocab = trainer.family.text_vocab
    assert [vocab["[PAD]"], vocab["[UNK]"], vocab["[CLS]"]] == [0, 1, 2] and 10 < len(vocab) <= 60
    rows = trainer.train_data.rows(np.arange(3), trainer.columns)
    batch = trainer.collator(rows, EVAL_EPOCH)
    ids = batch["text_input_ids"]
    assert (ids[:, 0] == 2).all() and (ids[:, 1:] > 0).sum() > 6 and (ids != 1).all()  # [CLS], pieces, no [UNK]
    trainer.train()
    taxonomy = [{rank: rows[rank][i] for rank in ("order", "family", "genus", "species")} for i in range(3)]
    vectors = embed(tmp_path / "run" / "last", taxonomy=taxonomy)["text"]
    trainer.task.eval()
    with torch.no_grad():
        np.testing.assert_allclose(vectors, trainer.task.towers["text"](batch).numpy(), rtol=0, atol=1e-6)


def test_specimens_without_an_image_train_their_other_pairs(tmp_path):
    """clibd.allow_missing_images: a specimen with no image bytes keeps its DNA-text pair (its image rows
    are masked out of the loss and of image retrieval); without the switch it is a bad record."""
    data = ClibdHdf5(SAMPLE)
    groups = {g: [data.specimen(g, i) for i in range(12)] for g in ("no_split_and_seen_train", "val_seen", "val_unseen", "all_keys")}
    for group in ("no_split_and_seen_train", "all_keys"):
        for i in (1, 4, 7):
            groups[group][i]["image"] = b""
    path = write_clibd_hdf5(tmp_path / "gaps.hdf5", groups)
    with pytest.raises(ValueError, match=r"group 'no_split_and_seen_train' index 1 .*no image bytes"):
        Trainer(load_config("clibd_tiny", clibd_overrides(tmp_path / "strict", sample=path)))
    cfg = load_config("clibd_tiny", clibd_overrides(tmp_path, sample=path, **{"clibd.allow_missing_images": "true", "train.max_steps": 3,
                                                                              "train.eval_steps": 3, "train.batch_size": 12}))  # fmt: skip
    trainer = Trainer(cfg)
    assert trainer.train_data.rows(range(12), ["has_image"])["has_image"] == [i not in (1, 4, 7) for i in range(12)]
    batch = trainer.collator(trainer.train_data.rows(range(12), trainer.columns), 0)
    assert batch["image_present"].tolist() == [i not in (1, 4, 7) for i in range(12)] and float(batch["image"][1].abs().sum()) == 0
    _, report = trainer.task(batch, {"micro_batches": 1.0})
    # 9 samples in the image pairs, all 12 in the DNA-text pair.
    loss_fn = trainer.task.loss
    z = trainer.task.embed(batch)
    _, counts = loss_fn(z, trainer.task.present(batch, 12), trainer.task.logit_scale)
    assert (counts["image_dna/count"], counts["image_text/count"], counts["dna_text/count"]) == (9, 9, 12)
    trainer.train()
    final = read_history(tmp_path / "run")[-1]
    assert np.isfinite(final["eval/val_seen/image_to_dna/genus/top1_micro"])
