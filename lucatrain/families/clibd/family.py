"""The CLIBD family (`model.model_type=clibd`): contrastive pretraining of image, DNA-barcode and
taxonomy-text towers on CLIBD's HDF5 layout, evaluated by retrieval as CLIBD reports it.

The training files are read from `clibd.train_group` (no_split_and_seen_train); a dev split named in
`data.dev_splits` is read from the group of its name (val_seen, val_unseen, all_keys, ...), so one
file serves every split. See `data.py` (rows, images, tokens), `towers.py`, `task.py` (loss and
retrieval) and lucatrain/contrastive.py (the exact loss and its gathering modes).
"""

from __future__ import annotations

import base64
import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from lucatrain import dist
from lucatrain.config import ConfigError, dev_inputs
from lucatrain.contrastive import ContrastiveLoss, Gathering, LogitScaleClamp, pair_graph
from lucatrain.families import register_family
from lucatrain.families.base import Family
from lucatrain.families.clibd.config import ClibdConfig
from lucatrain.families.clibd.data import (
    COLUMNS,
    SENTENCEPIECE,
    ClibdCollator,
    ClibdRecipe,
    hdf5_files_of,
    sentencepiece_vocabulary,
    text_vocabulary,
    train_sentencepiece,
)
from lucatrain.families.clibd.task import ClibdTask
from lucatrain.families.clibd.towers import LucaTower, build_towers
from lucatrain.models.lora import apply_lora, merge_lora_state_dict, quantize_linears

WEIGHTS, INFO, TOKENIZER = "model.safetensors", "clibd.json", "text_tokenizer"


def build_task(cfg, text_vocab: dict[str, int], with_lora: bool = True, lucagplm_config: dict | None = None) -> ClibdTask:
    """The Task of `cfg.clibd`; `with_lora` False builds the plain towers an export's merged weights fit;
    `lucagplm_config`: the DNA tower's LucaGPLM as an export recorded it."""
    c = cfg.clibd
    pairs = pair_graph(c.modalities, c.bind_to or None, [tuple(p) for p in c.exclude_pairs])
    loss = ContrastiveLoss(pairs, Gathering(c.all_gather, c.gather_with_grad, c.local_loss))
    towers = build_towers(cfg, len(text_vocab), lucagplm_config, text_vocab.get("[PAD]", 0))
    if with_lora:
        for name in c.lora_towers:
            if c.qlora:  # the frozen base in 4-bit first; peft then wraps the 4-bit layers
                quantize_linears(towers[name].encoder, torch.bfloat16 if cfg.deepspeed.precision == "bf16" else torch.float32)
            apply_lora(towers[name].encoder, cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout, c.lora_target_modules)
    return ClibdTask(towers, loss, c.fix_temperature, c.multi_positive, c.ks, c.levels,
                     c.key_split, c.seen_split, c.unseen_split, c.retrieval, c.grad_cache)  # fmt: skip


def check_qlora(cfg) -> None:
    """QLoRA's requirements, before anything is built: bitsandbytes, a GPU (or `clibd.qlora_on_cpu`), ZeRO <= 2."""
    from lucatrain.engine import resolve_ds_config_path

    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ConfigError("`clibd.qlora`: needs bitsandbytes (`pip install bitsandbytes`), which is not installed") from None
    if not torch.cuda.is_available() and not cfg.clibd.qlora_on_cpu:
        raise ConfigError("`clibd.qlora`: QLoRA's 4-bit kernels are for CUDA GPUs and this machine has none; use "
                          "`clibd.lora_towers` without qlora (full-precision base weights), or `clibd.qlora_on_cpu=true` "
                          "for bitsandbytes' slow CPU reference kernels (tests, trying a config)")  # fmt: skip
    stage = json.loads(resolve_ds_config_path(cfg.deepspeed.config).read_text()).get("zero_optimization", {}).get("stage", 0)
    if stage == 3:
        raise ConfigError(f"`clibd.qlora` with `deepspeed.config={cfg.deepspeed.config}` (ZeRO-3): ZeRO-3 partitions every "
                          "parameter and cannot cut packed 4-bit weights; use ZeRO-0, 1 or 2 (the 4-bit base is small)")  # fmt: skip


def dna_tokens_of(c) -> str:
    return "nucleotide" if c.dna_tower == "lucagplm" else "kmer"


@register_family
class ClibdFamily(Family):
    name = "clibd"
    config_sections = {"clibd": ClibdConfig}

    @classmethod
    def check_config(cls, cfg) -> None:
        c = cfg.clibd
        splits = set(dev_inputs(cfg))
        if "dev" in splits:
            raise ConfigError("`data.dev_files`: a CLIBD dev split is read from the HDF5 group of its name; list the splits in "
                              "`data.dev_splits` (e.g. {val_seen: [f.hdf5], val_unseen: [f.hdf5], all_keys: [f.hdf5]})")  # fmt: skip
        if splits and c.key_split not in splits:
            raise ConfigError(f"`clibd.key_split` ({c.key_split!r}) must be one of the dev splits {sorted(splits)}: retrieval "
                              "scores the query splits against it")  # fmt: skip
        if cfg.lora.enabled:
            raise ConfigError("`lora.enabled` switches LoRA on the LucaGPLM encoder; for CLIBD towers list them in "
                              "`clibd.lora_towers` (rank, alpha and dropout still come from `lora.*`)")  # fmt: skip
        if c.qlora:
            check_qlora(cfg)

    # ------------------------------------------------------------------ data

    def prepare_recipe(self, split: str | None = None) -> ClibdRecipe:
        c = self.cfg.clibd
        return ClibdRecipe(c.train_group if split is None else split, c.image_dir, c.allow_missing_images)

    def setup(self, train_data, dev_data: dict) -> None:
        c = self.cfg.clibd
        self.text_spm = b""
        if c.text_tokenizer == SENTENCEPIECE:
            # Trained on rank 0 and broadcast: every rank tokenizes with the very same model.
            model = train_sentencepiece(train_data.meta.get("texts", []), c.text_vocab_size) if dist.is_main() else None
            self.text_spm = dist.broadcast_object(model)
            self.text_vocab = sentencepiece_vocabulary(self.text_spm)
        elif c.text_tokenizer:
            from transformers import AutoTokenizer

            try:
                self.text_vocab = AutoTokenizer.from_pretrained(c.text_tokenizer).get_vocab()
            except (OSError, ValueError) as err:
                raise ValueError(f"`clibd.text_tokenizer={c.text_tokenizer}`: not a Hugging Face tokenizer directory ({err})") from None
        else:
            self.text_vocab = text_vocabulary(train_data.meta.get("text_words", []))
        self.files = {group: path for data in [train_data, *dev_data.values()] for group, path in hdf5_files_of(data).items()}

    def columns(self) -> tuple[str, ...]:
        return COLUMNS

    def collator(self) -> ClibdCollator:
        c = self.cfg.clibd
        return ClibdCollator(self.files, tuple(c.modalities), self.cfg.train.seed, c.image.resize, c.image.crop, c.dna_k,
                             c.dna_length, self.text_vocab, c.text_max_length, dna_tokens_of(c), c.text_tokenizer,
                             self.text_spm)  # fmt: skip

    # ------------------------------------------------------------------ model

    def build_task(self, resume_from: Path | None = None) -> ClibdTask:
        # A resumed LucaGPLM tower is built as the checkpoint recorded it (its weights come with the resume),
        # not reloaded from `clibd.dna_lucagplm`, which may have moved or changed since.
        recorded = None
        if resume_from is not None:
            from lucatrain.checkpoint import EXPORT_INFO

            recorded = json.loads((Path(resume_from) / EXPORT_INFO).read_text()).get("lucagplm_config")
        self.task = build_task(self.cfg, self.text_vocab, lucagplm_config=recorded)
        return self.task

    def describe(self) -> str:
        sizes = {m: sum(p.numel() for p in tower.parameters()) / 1e6 for m, tower in self.task.towers.items()}
        trained = sum(p.numel() for p in self.task.parameters() if p.requires_grad) / 1e6
        return "towers " + ", ".join(f"{m}={n:.2f}M" for m, n in sizes.items()) + f" (trained {trained:.2f}M)"

    def callbacks(self, task) -> list:
        return [] if self.cfg.clibd.fix_temperature else [LogitScaleClamp("logit_scale")]

    # ------------------------------------------------------------------ resume and export

    def resume_state(self) -> dict:
        c = self.cfg.clibd
        return {"modalities": list(c.modalities), "output_dim": c.output_dim, "dna_k": c.dna_k, "dna_length": c.dna_length,
                "text_vocab_size": len(self.text_vocab), "image": dataclasses.asdict(c.image), "dna": dataclasses.asdict(c.dna),
                "text": dataclasses.asdict(c.text), "dna_tower": c.dna_tower, "lora_towers": list(c.lora_towers),
                "lora_target_modules": list(c.lora_target_modules) if c.lora_towers else [], "qlora": c.qlora}  # fmt: skip

    def export_info(self, task) -> dict:
        lora = {"r": self.cfg.lora.r, "alpha": self.cfg.lora.alpha} if self.cfg.clibd.lora_towers else None
        dna = task.towers["dna"] if "dna" in task.towers else None
        lucagplm = dna.encoder.config.to_dict() if isinstance(dna, LucaTower) else None
        return {"clibd": dataclasses.asdict(self.cfg.clibd), "text_vocab": self.text_vocab, "seed": self.cfg.train.seed, "lora": lora,
                "lucagplm_config": lucagplm, "text_spm": base64.b64encode(self.text_spm).decode() if self.text_spm else ""}  # fmt: skip

    @classmethod
    def export(cls, directory: Path, state: dict, info: dict, with_heads: bool = True) -> None:
        """model.safetensors (every tower, projections and logit_scale, fp32) and clibd.json (the
        `clibd` settings and the text vocabulary): `load_clibd(directory)` rebuilds the Task."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        if info.get("lora"):  # adapters folded into the weights: the export is a plain model
            state = merge_lora_state_dict(state, info["lora"]["r"], info["lora"]["alpha"])
        save_file({k: v.detach().float().cpu().contiguous() for k, v in state.items()}, str(directory / WEIGHTS), metadata={"format": "pt"})
        tokenizer = info["clibd"].get("text_tokenizer")
        if tokenizer and tokenizer != SENTENCEPIECE and Path(tokenizer).is_dir():  # the export carries its tokenizer: it needs nothing outside itself
            shutil.copytree(tokenizer, directory / TOKENIZER, dirs_exist_ok=True)
            info = {**info, "clibd": {**info["clibd"], "text_tokenizer": TOKENIZER}}
        (directory / INFO).write_text(json.dumps(info, indent=1) + "\n", encoding="utf-8")
        # Each tower's encoder also as a transformers directory (config.json + weights), e.g. to start
        # another run's tower from it (`clibd.<tower>.pretrained`) or to use it outside lucatrain.
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()  # its shard-writing bar would break into the run's log at every save
        task, _ = _task_from(info, state, directory)  # the weights in memory, not read back from disk
        for name, tower in task.towers.items():
            if hasattr(tower.encoder, "save_pretrained"):
                tower.encoder.save_pretrained(directory / f"{name}_encoder")
            else:  # a timm encoder: timm's local layout (config.json + model.safetensors)
                save_timm_encoder(tower.encoder, info["clibd"]["image"], directory / f"{name}_encoder")


def save_timm_encoder(encoder, image: dict, directory: Path) -> None:
    """A timm encoder as timm reads a local model: config.json (architecture, num_classes 0, the
    create_model arguments) and model.safetensors. Load it with `timm.create_model(architecture,
    pretrained=True, pretrained_cfg_overlay={"file": ".../model.safetensors"}, num_classes=0)`."""
    directory.mkdir(parents=True, exist_ok=True)
    config = {"architecture": image["timm_model"], "num_classes": 0, "num_features": encoder.num_features,
              "model_args": image["timm_kwargs"], "pretrained_cfg": dict(getattr(encoder, "pretrained_cfg", {}) or {})}  # fmt: skip
    (directory / "config.json").write_text(json.dumps(config, indent=1, default=str) + "\n", encoding="utf-8")
    save_file({k: v.detach().float().cpu().contiguous() for k, v in encoder.state_dict().items()}, str(directory / WEIGHTS),
              metadata={"format": "pt"})  # fmt: skip


def load_clibd(directory) -> tuple[ClibdTask, ClibdCollator]:
    """The trained Task (eval mode, CPU) and an inference collator from an export (best/, last/)."""
    directory = Path(directory)
    for name in (WEIGHTS, INFO):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"{directory / name} not found (expected a CLIBD export: best/ or last/ of a run)")
    info = json.loads((directory / INFO).read_text(encoding="utf-8"))
    return _task_from(info, load_file(str(directory / WEIGHTS)), directory)


def _task_from(info: dict, state: dict, directory: Path) -> tuple[ClibdTask, ClibdCollator]:
    """The Task an export's `info` describes, holding `state` (merged weights), and its collator."""
    from lucatrain.config import load_config

    cfg = load_config(None, ["model.model_type=clibd"])
    cfg.clibd = _clibd_config(info["clibd"])
    if cfg.clibd.image.arch == "timm":  # timm's architecture is its name: the export's weights are all it needs
        cfg.clibd.image.pretrained = ""
    if cfg.clibd.text_tokenizer and cfg.clibd.text_tokenizer != SENTENCEPIECE:
        cfg.clibd.text_tokenizer = str(directory / cfg.clibd.text_tokenizer)  # the export's own copy
    task = build_task(cfg, info["text_vocab"], with_lora=False, lucagplm_config=info.get("lucagplm_config"))
    expected = task.state_dict()
    missing = sorted(set(expected) - set(state))
    if missing:
        raise ValueError(f"{directory / WEIGHTS} lacks {missing[:5]}{' ...' if len(missing) > 5 else ''} of the model {INFO} describes")
    # The export may also hold buffers the model rebuilds itself (BERT's position ids): only its own keys are read.
    task.load_state_dict({key: state[key] for key in expected})
    return task.eval(), inference_collator(info, cfg.clibd)


def inference_collator(info: dict, c: ClibdConfig | None = None) -> ClibdCollator:
    """The collator of an export's inputs (no HDF5 files: set `files` to read groups), from its clibd.json."""
    c = c or _clibd_config(info["clibd"])
    return ClibdCollator({}, tuple(c.modalities), info["seed"], c.image.resize, c.image.crop, c.dna_k, c.dna_length,
                         info["text_vocab"], c.text_max_length, dna_tokens_of(c), c.text_tokenizer,
                         base64.b64decode(info.get("text_spm") or ""))  # fmt: skip


def _clibd_config(values: dict) -> ClibdConfig:
    from lucatrain.families.clibd.config import BertTowerConfig, ImageTowerConfig

    values = dict(values)
    values["image"] = ImageTowerConfig(**values["image"])
    values["dna"] = BertTowerConfig(**values["dna"])
    values["text"] = BertTowerConfig(**values["text"])
    return ClibdConfig(**values)


@torch.no_grad()
def embed(directory, images=None, barcodes=None, taxonomy=None) -> dict[str, np.ndarray]:
    """Embeddings of raw inputs by an export's towers, as the trained model gives them (evaluation views):
    images as encoded bytes (JPEG, PNG, ...), barcodes as strings, taxonomy as dicts of the four ranks
    (or "order family genus species" strings). Returns {modality: (N, output_dim) float32}."""
    from lucatrain.data.clibd_hdf5 import RANKS
    from lucatrain.data.images import decode, eval_view

    task, collator = load_clibd(directory)
    batch = {}
    if images is not None:
        batch["image"] = torch.stack([eval_view(decode(image), collator.resize, collator.crop) for image in images])
    if barcodes is not None:
        batch.update(collator.dna(list(barcodes)))
    if taxonomy is not None:
        ranks = [t if isinstance(t, dict) else dict(zip(RANKS, t.split(" ", 3))) for t in taxonomy]
        ids, mask = collator.text_ids({"sample_id": list(range(len(ranks))), **{r: [t[r] for t in ranks] for r in RANKS}})
        batch["text_input_ids"], batch["text_attention_mask"] = torch.from_numpy(ids), torch.from_numpy(mask)
    wanted = {"image": "image", "dna": "dna_input_ids", "text": "text_input_ids"}
    return {m: tower(batch).numpy() for m, tower in task.towers.items() if wanted[m] in batch}
