"""The gene/protein encoder a run starts from: fresh from `model.*`, a lucatrain export, or a
LucaOne/LucaVirus checkpoint (shared by the families that train `LucaGPLM`)."""

from __future__ import annotations

from lucatrain.models.lucagplm import LucaGPLM, LucaGPLMConfig
from lucatrain.models.lucaone_checkpoint import LoadReport, is_lucaone_checkpoint, model_from_lucaone_checkpoint


def build_model(cfg) -> LucaGPLM:
    """A fresh encoder from the config, or the weights exported at `model.model_dirpath`."""
    return build_model_with_report(cfg)[0]


def build_model_with_report(cfg) -> tuple[LucaGPLM, LoadReport | None]:
    """`build_model`, plus the LoadReport when the weights came from a LucaOne checkpoint (its task
    heads wait there for `load_lucaone_heads`)."""
    m = cfg.model
    if m.model_dirpath and not cfg.train.trained_checkpoint:  # resuming: the checkpoint has the weights
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
        return LucaGPLM.from_pretrained(m.model_dirpath, gradient_checkpointing=m.gradient_checkpointing), None
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
