"""The LucaOne/LucaVirus encoder (LucaGPLM), written from the documented checkpoint format.

Parameter names and shapes are exactly those of LucaOne checkpoints (LUCAONE_FORMAT.md), so a LucaOne
state dict loads with no renaming. The forward pass follows the five documented steps:
embeddings (+ token dropout) -> pre-LN transformer layers with rotary attention -> last
LayerNorm; `mlm_logits` is step 5 and is kept separate so a caller can run the vocabulary
projection on the masked positions only.

This module imports neither `torch.distributed` nor `deepspeed`; parallel wrapping and
ZeRO-3 gathering are the trainer's business (`save_pretrained` accepts a gathered state dict).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import PretrainedConfig

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
TIED_KEY = "lm_head.weight"  # the same Parameter as embed_tokens.weight; stored once, re-tied on load
ROPE_BASE = 10000.0
LAYER_NORM_EPS = 1e-5
MASK_RATIO_TRAIN = 0.15 * 0.8  # the share of residues that the collator turns into [MASK]


class LucaGPLMConfig(PretrainedConfig):
    """LucaOne's config.json keys and defaults (defaults = the released LucaOne model), plus
    `gradient_checkpointing`. An explicit `__init__` (rather than transformers 5 dataclass
    fields) keeps the class working under transformers 4.x too; unknown keys found in a
    LucaOne config.json (e.g. `hidden_act`) are kept as attributes by the base class."""

    model_type = "lucaone_gplm"

    def __init__(
        self,
        vocab_size: int = 39,
        hidden_size: int = 2560,
        num_hidden_layers: int = 20,
        num_attention_heads: int = 40,
        intermediate_size: int | None = None,  # None -> 4 * hidden_size (LucaOne hard-codes 4H)
        max_position_embeddings: int = 4096,
        type_vocab_size: int = 2,
        no_position_embeddings: bool = True,  # True: rotary only; False: also a learned `embed_pos`
        no_token_type_embeddings: bool = False,
        token_dropout: bool = True,
        use_embed_layer_norm: bool = False,
        use_last_layer_norm: bool = True,
        embed_scale: float = 1.0,
        pad_token_id: int = 0,
        unk_token_id: int = 1,
        bos_token_id: int = 2,
        eos_token_id: int = 3,
        sep_token_id: int = 3,
        mask_token_id: int = 4,
        ignore_index: int = -100,
        alphabet: str = "gene_prot",
        hidden_dropout_prob: float = 0.0,
        attention_probs_dropout_prob: float = 0.0,
        classifier_dropout_prob: float = 0.0,
        gradient_checkpointing: bool = False,
        **kwargs,
    ):
        kwargs.pop("model_type", None)  # a class attribute; LucaOne's own class saved "" here
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.intermediate_size = 4 * hidden_size if intermediate_size is None else intermediate_size
        self.max_position_embeddings = max_position_embeddings
        self.type_vocab_size = type_vocab_size
        self.no_position_embeddings = no_position_embeddings
        self.no_token_type_embeddings = no_token_type_embeddings
        self.token_dropout = token_dropout
        self.use_embed_layer_norm = use_embed_layer_norm
        self.use_last_layer_norm = use_last_layer_norm
        self.embed_scale = embed_scale
        self.pad_token_id = pad_token_id
        self.unk_token_id = unk_token_id
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        self.sep_token_id = sep_token_id
        self.mask_token_id = mask_token_id
        self.ignore_index = ignore_index
        self.alphabet = alphabet
        self.hidden_dropout_prob = hidden_dropout_prob
        self.attention_probs_dropout_prob = attention_probs_dropout_prob
        self.classifier_dropout_prob = classifier_dropout_prob
        self.gradient_checkpointing = gradient_checkpointing
        kwargs.setdefault("tie_word_embeddings", True)  # lm_head.weight is embed_tokens.weight (LucaOne)
        super().__init__(**kwargs)
        if hidden_size % num_attention_heads or (hidden_size // num_attention_heads) % 2:
            raise ValueError(
                f"`hidden_size` ({hidden_size}) must be divisible by `num_attention_heads` "
                f"({num_attention_heads}) with an even head dimension (rotary embeddings)."
            )


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """LucaOne's `x * cos + rotate_half(x) * sin`, with rotate_half(x) = [-x2, x1], in fewer operations.

    rotate_half(x) * sin = roll(x, D/2) * [-sin1, sin2]: the sign moves from x to sin, which is exact
    in floating point, so the result is bitwise the same; one roll replaces a negation and a
    concatenation of every q and k (3 % of a CPU training step at 4 layers x 256, bench_cpu_mfu.py).
    """
    return x * cos + torch.roll(x, x.shape[-1] // 2, dims=-1) * signed_sin


class RotaryEmbedding(nn.Module):
    """Holds LucaOne's `rot_emb.inv_freq` buffer (persistent, so state dicts match)."""

    def __init__(self, head_dim: int):
        super().__init__()
        self.head_dim = head_dim
        self.register_buffer("inv_freq", self.fresh_inv_freq(torch.device("cpu")), persistent=True)

    def fresh_inv_freq(self, device: torch.device) -> torch.Tensor:
        d = self.head_dim
        return 1.0 / ROPE_BASE ** (torch.arange(0, d, 2, dtype=torch.float32, device=device) / d)

    def cos_sin(self, seq_len: int, device: torch.device, dtype: torch.dtype):
        """(cos, signed sin) of every position, (L, D) each: LucaOne's cos and sin of [freqs, freqs],
        the first half of sin negated for `apply_rotary`."""
        # Recomputed in fp32 instead of reading the buffer: mixed-precision engines cast buffers to
        # bf16, and a bf16 inv_freq puts the angle at position 3000 off by radians.
        t = torch.arange(seq_len, dtype=torch.float32, device=device)
        freqs = torch.outer(t, self.fresh_inv_freq(device))  # (L, D/2)
        cos, sin = freqs.cos(), freqs.sin()
        return torch.cat((cos, cos), dim=-1).to(dtype), torch.cat((-sin, sin), dim=-1).to(dtype)


class SelfAttention(nn.Module):
    def __init__(self, config: LucaGPLMConfig):
        super().__init__()
        h = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = h // self.num_heads
        self.dropout = config.attention_probs_dropout_prob
        self.q_proj, self.k_proj = nn.Linear(h, h), nn.Linear(h, h)
        self.v_proj, self.out_proj = nn.Linear(h, h), nn.Linear(h, h)
        self.rot_emb = RotaryEmbedding(self.head_dim)

    def forward(self, x, key_mask, cos, signed_sin):
        b, l, h = x.shape
        q, k, v = (p(x).view(b, l, self.num_heads, self.head_dim).transpose(1, 2)  # (B, nH, L, D)
                   for p in (self.q_proj, self.k_proj, self.v_proj))  # fmt: skip
        q, k = apply_rotary(q, cos, signed_sin), apply_rotary(k, cos, signed_sin)
        # key_mask (B, 1, 1, L): True = real key. Scale defaults to head_dim ** -0.5.
        dropout = self.dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask, dropout_p=dropout)
        return self.out_proj(out.transpose(1, 2).reshape(b, l, h))  # (B, L, H)


class TransformerLayer(nn.Module):
    def __init__(self, config: LucaGPLMConfig):
        super().__init__()
        h, f = config.hidden_size, config.intermediate_size
        self.dropout = config.hidden_dropout_prob
        self.pre_layer_norm = nn.LayerNorm(h, eps=LAYER_NORM_EPS)
        self.self_attn = SelfAttention(config)
        self.post_layer_norm = nn.LayerNorm(h, eps=LAYER_NORM_EPS)
        self.fc1, self.fc2 = nn.Linear(h, f), nn.Linear(f, h)

    def forward(self, x, key_mask, cos, signed_sin):
        # LucaOne's own layer has no dropout; with the default hidden_dropout_prob 0.0 neither do we.
        attn = self.self_attn(self.pre_layer_norm(x), key_mask, cos, signed_sin)
        x = x + F.dropout(attn, self.dropout, self.training)
        ffn = self.fc2(F.gelu(self.fc1(self.post_layer_norm(x))))  # F.gelu default = exact erf
        return x + F.dropout(ffn, self.dropout, self.training)


class LMHead(nn.Module):
    """dense -> gelu -> layer_norm -> tied vocabulary projection. Its `weight` attribute is set to
    `embed_tokens.weight` by the owner (so the key `lm_head.weight` exists, as in LucaOne)."""

    def __init__(self, hidden_size: int, vocab_size: int):
        super().__init__()
        self.dense = nn.Linear(hidden_size, hidden_size)
        self.layer_norm = nn.LayerNorm(hidden_size, eps=LAYER_NORM_EPS)
        self.bias = nn.Parameter(torch.zeros(vocab_size))

    def forward(self, x):
        x = self.layer_norm(F.gelu(self.dense(x)))
        return F.linear(x, self.weight) + self.bias  # (..., V)


class LucaGPLM(nn.Module):
    def __init__(self, config: LucaGPLMConfig):
        super().__init__()
        self.config = config
        h = config.hidden_size
        self.embed_tokens = nn.Embedding(config.vocab_size, h, padding_idx=config.pad_token_id)
        if not config.no_position_embeddings:
            # LucaOne's name and shape; LucaOne adds it only when given position_ids, we always
            # add positions 0..L-1 (rotary is applied in every layer either way, as in LucaOne).
            self.embed_pos = nn.Embedding(config.max_position_embeddings, h)
        if not config.no_token_type_embeddings:
            self.embed_type = nn.Embedding(config.type_vocab_size, h)
        if config.use_embed_layer_norm:
            self.embed_layer_norm = nn.LayerNorm(h, eps=LAYER_NORM_EPS)
        self.layers = nn.ModuleList(TransformerLayer(config) for _ in range(config.num_hidden_layers))
        if config.use_last_layer_norm:
            self.last_layer_norm = nn.LayerNorm(h, eps=LAYER_NORM_EPS)
        self.lm_head = LMHead(h, config.vocab_size)
        self.lm_head.weight = self.embed_tokens.weight  # tied: one Parameter, two names
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
            if isinstance(module, nn.Embedding) and module.padding_idx is not None:
                with torch.no_grad():
                    module.weight[module.padding_idx].zero_()
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, LMHead):
            nn.init.zeros_(module.bias)

    def num_parameters(self) -> int:
        """Unique parameters (the tied embedding counted once)."""
        return sum(p.numel() for p in self.parameters())

    def forward(self, input_ids, token_type_ids=None, attention_mask=None) -> torch.Tensor:
        """Token representations after `last_layer_norm`, (B, L, H).

        attention_mask: 1 = real token, 0 = pad (default: input_ids != pad_token_id).
        token_type_ids: 0 = gene, 1 = protein; None adds no type embedding (as LucaOne does).
        """
        cfg = self.config
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be (batch, length), got shape {tuple(input_ids.shape)}")
        b, l = input_ids.shape
        real = input_ids.ne(cfg.pad_token_id) if attention_mask is None else attention_mask.bool()  # (B, L)

        x = cfg.embed_scale * self.embed_tokens(input_ids)  # (B, L, H)
        if token_type_ids is not None and hasattr(self, "embed_type"):
            x = x + cfg.embed_scale * self.embed_type(token_type_ids)
        if hasattr(self, "embed_pos"):
            if l > cfg.max_position_embeddings:
                raise ValueError(f"sequence length {l} > max_position_embeddings {cfg.max_position_embeddings}")
            x = x + cfg.embed_scale * self.embed_pos(torch.arange(l, device=x.device))
        if hasattr(self, "embed_layer_norm"):
            x = self.embed_layer_norm(x)
        if cfg.token_dropout:
            # ESM-style: zero the [MASK] embeddings, then rescale so the expected input norm matches
            # a sequence with the training mask rate. Applied in eval too, as LucaOne does.
            is_mask = input_ids.eq(cfg.mask_token_id)  # (B, L)
            x = x.masked_fill(is_mask.unsqueeze(-1), 0.0)
            observed = (is_mask & real).sum(-1).float() / real.sum(-1).float()  # (B,)
            x = x * ((1 - MASK_RATIO_TRAIN) / (1 - observed)).to(x.dtype)[:, None, None]
        x = x * real.unsqueeze(-1).to(x.dtype)  # padded positions zeroed

        # No mask at all when nothing is padded, so SDPA may pick its fastest kernel.
        key_mask = None if bool(real.all()) else real[:, None, None, :]  # (B, 1, 1, L)
        cos, signed_sin = self.layers[0].self_attn.rot_emb.cos_sin(l, x.device, x.dtype) if self.layers else (None, None)
        for layer in self.layers:
            if cfg.gradient_checkpointing and self.training:
                x = checkpoint(layer, x, key_mask, cos, signed_sin, use_reentrant=False)
            else:
                x = layer(x, key_mask, cos, signed_sin)
        if hasattr(self, "last_layer_norm"):
            x = self.last_layer_norm(x)
        return x

    def mlm_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """LM head on any (..., H) tensor -> (..., V), e.g. only the masked positions."""
        return self.lm_head(hidden)

    def save_pretrained(self, directory, state_dict: dict[str, torch.Tensor] | None = None) -> None:
        """Write config.json and model.safetensors. Pass `state_dict` when the full weights live
        elsewhere (e.g. gathered from ZeRO-3 shards); this method itself knows nothing of ranks."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.config.to_json_file(directory / CONFIG_NAME)
        state_dict = self.state_dict() if state_dict is None else state_dict
        tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items() if k != TIED_KEY}
        save_file(tensors, str(directory / WEIGHTS_NAME), metadata={"format": "pt"})

    @classmethod
    def from_pretrained(cls, directory, **config_overrides) -> LucaGPLM:
        """Load a directory written by `save_pretrained`; `config_overrides` replace config.json
        values (e.g. gradient_checkpointing=True). Every weight must match, by name and shape."""
        directory = Path(directory)
        config_path, weights_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
        for path in (config_path, weights_path):
            if not path.is_file():
                raise FileNotFoundError(f"{path} not found (expected a directory written by save_pretrained)")
        try:
            config_dict = json.loads(config_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"{config_path} is not valid JSON: {err}") from err
        known = set(LucaGPLMConfig().to_dict())
        unknown = sorted(set(config_overrides) - known)
        if unknown:
            raise ValueError(f"unknown config override(s) {unknown}; valid keys: {sorted(known)}")
        model = cls(LucaGPLMConfig(**{**config_dict, **config_overrides}))

        try:
            loaded = load_file(str(weights_path), device="cpu")
        except Exception as err:  # safetensors raises its own error types for truncated/garbage files
            raise ValueError(f"{weights_path} is not a readable safetensors file: {err}") from err
        loaded.pop(TIED_KEY, None)
        expected = {k: v.shape for k, v in model.state_dict().items() if k != TIED_KEY}
        missing = sorted(set(expected) - set(loaded))
        unexpected = sorted(set(loaded) - set(expected))
        wrong = sorted(f"{k}: file {tuple(loaded[k].shape)} vs model {tuple(expected[k])}"
                       for k in set(loaded) & set(expected) if loaded[k].shape != expected[k])  # fmt: skip
        if missing or unexpected or wrong:
            raise ValueError(
                f"{weights_path} does not match the model built from {config_path}: "
                f"missing keys {missing}, unexpected keys {unexpected}, shape mismatches {wrong}"
            )
        model.load_state_dict(loaded, strict=False)  # checked above; only the tied key is absent
        assert model.lm_head.weight is model.embed_tokens.weight
        return model
