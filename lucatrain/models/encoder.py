"""The gene/protein encoder a run starts from: fresh from `model.*`, a lucatrain export, or a
LucaOne/LucaVirus checkpoint (shared by the families that train `LucaGPLM`)."""

from __future__ import annotations

from pathlib import Path

from lucatrain.models.lucagplm import LucaGPLM, LucaGPLMConfig
from lucatrain.models.lucaone_checkpoint import LoadReport, is_lucaone_checkpoint, model_from_lucaone_checkpoint


# Sizes (and token_dropout) belong to the weights; these are how this run trains them, so this run's
# values apply whatever the encoder was loaded from (a LucaOne checkpoint, an export, a checkpoint).
TRAINING_CHOICES = ("hidden_dropout_prob", "attention_probs_dropout_prob", "gradient_checkpointing")
ARCHITECTURE = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "max_position_embeddings",
                "token_dropout")  # fmt: skip


def training_choices(cfg) -> dict:
    return {name: getattr(cfg.model, name) for name in TRAINING_CHOICES}


def encoder_of_checkpoint(checkpoint_dir: Path, cfg) -> LucaGPLM:
    """The encoder a lucatrain checkpoint holds, built from its recorded config (its weights come with
    the resume): the recipe's `model.*` sizes do not apply to a run that resumes."""
    import json

    from lucatrain.checkpoint import EXPORT_INFO

    info = json.loads((Path(checkpoint_dir) / EXPORT_INFO).read_text())
    return LucaGPLM(LucaGPLMConfig(**{**info["encoder_config"], **training_choices(cfg)}))


def load_encoder(directory) -> tuple[LucaGPLM, LoadReport | None]:
    """The trained encoder in `directory`, for inference: a lucatrain export (config.json +
    model.safetensors, e.g. a run's best/ or last/) or a LucaOne/LucaVirus `checkpoint-step<N>/`
    (config.json + pytorch.pth; the LoadReport says what was loaded). A run directory is refused
    naming its exports."""
    directory = Path(directory)
    if is_lucaone_checkpoint(directory):
        return model_from_lucaone_checkpoint(directory)
    if not (directory / "config.json").is_file():
        exports = [name for name in ("best", "last") if (directory / name / "config.json").is_file()]
        if exports:
            raise FileNotFoundError(f"{directory} is a run directory; use its export {' or '.join(str(directory / e) for e in exports)}")
        raise FileNotFoundError(f"{directory} holds no encoder: expected a lucatrain export (config.json + model.safetensors) or a "
                                "LucaOne checkpoint directory (config.json + pytorch.pth)")  # fmt: skip
    return LucaGPLM.from_pretrained(directory), None


def record_encoder(cfg, config: LucaGPLMConfig, logger, source: str) -> None:
    """Make `cfg.model` say what the encoder really is (config.yaml is written from it), and log every
    recipe value that the encoder's own (from `source`) replaced."""
    m = cfg.model
    real = {name: getattr(config, name) for name in ARCHITECTURE}
    given = {name: getattr(m, name) for name in ARCHITECTURE}
    if not given["intermediate_size"]:
        given["intermediate_size"] = 4 * given["hidden_size"]  # 0 means 4 x hidden_size
    differ = [f"model.{k}={given[k]!r} -> {real[k]!r}" for k in ARCHITECTURE if given[k] != real[k]]
    from lucatrain import dist

    if differ and dist.is_main():
        logger.warning("the encoder comes from %s; these recipe values do not apply: %s", source, ", ".join(differ))
    for name, value in real.items():
        setattr(m, name, value)


def build_model(cfg, resuming: bool = False) -> LucaGPLM:
    """A fresh encoder from the config, or the weights exported at `model.model_dirpath`."""
    return build_model_with_report(cfg, resuming)[0]


def build_model_with_report(cfg, resuming: bool = False) -> tuple[LucaGPLM, LoadReport | None]:
    """`build_model`, plus the LoadReport when the weights came from a LucaOne checkpoint (its task
    heads wait there for `load_lucaone_heads`). `resuming`: a checkpoint will replace the weights, and
    `model.model_dirpath` names the run to resume (LucaVirus), not weights to start from."""
    m = cfg.model
    if m.model_dirpath and not resuming and (Path(m.model_dirpath) / "checkpoints").is_dir():
        raise ValueError(
            f"`model.model_dirpath={m.model_dirpath}` is a lucatrain run directory: start from its export "
            f"({Path(m.model_dirpath) / 'best'} or {Path(m.model_dirpath) / 'last'}), or resume it with "
            "`train.trained_checkpoint=latest`"
        )
    if m.model_dirpath and not resuming:
        if is_lucaone_checkpoint(m.model_dirpath):
            model, report = model_from_lucaone_checkpoint(
                m.model_dirpath,
                first_n_layers=m.init_first_n_layers,
                gradient_checkpointing=m.gradient_checkpointing,
                hidden_dropout_prob=m.hidden_dropout_prob,
                attention_probs_dropout_prob=m.attention_probs_dropout_prob,
                **({"num_hidden_layers": m.num_hidden_layers} if m.init_first_n_layers else {}),
            )
            return model, report
        return LucaGPLM.from_pretrained(m.model_dirpath, **training_choices(cfg)), None
    config = LucaGPLMConfig(
        hidden_size=m.hidden_size,
        num_hidden_layers=m.num_hidden_layers,
        num_attention_heads=m.num_attention_heads,
        intermediate_size=m.intermediate_size or 4 * m.hidden_size,
        max_position_embeddings=m.max_position_embeddings,
        hidden_dropout_prob=m.hidden_dropout_prob,
        attention_probs_dropout_prob=m.attention_probs_dropout_prob,
        token_dropout=m.token_dropout,
        gradient_checkpointing=m.gradient_checkpointing,
    )
    return LucaGPLM(config), None
