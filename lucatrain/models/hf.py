"""The encoder as a transformers `PreTrainedModel`, for downstream use of an export.

    import lucatrain.models.hf  # registers model_type "lucaone_gplm" with the Auto classes
    model = transformers.AutoModel.from_pretrained("runs/demo/last")
    hidden = model(input_ids=ids, token_type_ids=types, attention_mask=mask).last_hidden_state

An export also carries this code as `modeling_lucagplm.py` (see `lucatrain.export`), so
`AutoModel.from_pretrained(path, trust_remote_code=True)` works where lucatrain is not installed.

The wrapper holds the plain `LucaGPLM` under `lucagplm`; transformers maps the export's unprefixed
weight names (`embed_tokens.weight`, ...) onto it through `base_model_prefix`, and re-ties the
LM head to the token embedding (stored once) through `_tied_weights_keys`.
"""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModel, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutput

from lucatrain.models.lucagplm import LucaGPLM, LucaGPLMConfig


class LucaGPLMModel(PreTrainedModel):
    config_class = LucaGPLMConfig
    base_model_prefix = "lucagplm"
    _tied_weights_keys = {"lucagplm.lm_head.weight": "lucagplm.embed_tokens.weight"}

    def __init__(self, config: LucaGPLMConfig):
        super().__init__(config)
        self.lucagplm = LucaGPLM(config)
        self.post_init()

    def _init_weights(self, module) -> None:
        """LucaGPLM initialises its own weights; from_pretrained then overwrites every one of them."""

    def get_input_embeddings(self):
        return self.lucagplm.embed_tokens

    def forward(self, input_ids, token_type_ids=None, attention_mask=None, **unused) -> BaseModelOutput:
        """last_hidden_state (B, L, H): [CLS] at position 0, residues 1..n, [SEP] after them."""
        if token_type_ids is None:
            raise ValueError("token_type_ids is required: 0 for gene (nucleotide) tokens, 1 for protein tokens")
        return BaseModelOutput(last_hidden_state=self.lucagplm(input_ids, token_type_ids, attention_mask))

    def mlm_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lucagplm.mlm_logits(hidden)


AutoConfig.register(LucaGPLMConfig.model_type, LucaGPLMConfig, exist_ok=True)
AutoModel.register(LucaGPLMConfig, LucaGPLMModel, exist_ok=True)
