"""LucaGPLM: LucaOne state-dict layout, the documented forward pass, checkpointing, save/load."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

import lucatrain.models.lucagplm as lucagplm
from lucatrain.data.alphabet import CLS_ID, MASK_ID, PAD_ID, SEP_ID
from lucatrain.models.lucagplm import LucaGPLM, LucaGPLMConfig

H, LAYERS, HEADS = 32, 2, 4
HEAD_DIM = H // HEADS


def tiny_config(**overrides) -> LucaGPLMConfig:
    kwargs = dict(hidden_size=H, num_hidden_layers=LAYERS, num_attention_heads=HEADS)
    return LucaGPLMConfig(**{**kwargs, **overrides})


def tiny_model(seed=0, scramble=True, **overrides) -> LucaGPLM:
    """A tiny model; `scramble` replaces every weight with a wide random value so that attention,
    LayerNorm affine terms and biases all matter in the comparisons (init is near-trivial)."""
    torch.manual_seed(seed)
    model = LucaGPLM(tiny_config(**overrides))
    if scramble:
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0.0, 0.3)
    return model.eval()


def batch():
    """Two gene/protein sequences with padding, [MASK] ids and both token types."""
    ids = torch.tensor([
        [CLS_ID, 5, 6, MASK_ID, 7, 8, 5, 6, 7, MASK_ID, SEP_ID],
        [CLS_ID, 10, 11, MASK_ID, 12, 13, SEP_ID, PAD_ID, PAD_ID, PAD_ID, PAD_ID],
    ])  # fmt: skip
    types = torch.tensor([[0] * 11, [1] * 11])
    return ids, types


# ---------------------------------------------------------------- state dict (LucaOne's table)


def expected_shapes(h=H, layers=LAYERS, heads=HEADS, v=39):
    """Written from the documented LucaOne table, not from the model."""
    f, d = 4 * h, h // heads
    shapes = {"embed_tokens.weight": (v, h), "embed_type.weight": (2, h)}
    for i in range(layers):
        p = f"layers.{i}."
        shapes.update({p + "pre_layer_norm.weight": (h,), p + "pre_layer_norm.bias": (h,)})
        for proj in ("q", "k", "v", "out"):
            shapes.update({p + f"self_attn.{proj}_proj.weight": (h, h), p + f"self_attn.{proj}_proj.bias": (h,)})
        shapes[p + "self_attn.rot_emb.inv_freq"] = (d // 2,)
        shapes.update({p + "post_layer_norm.weight": (h,), p + "post_layer_norm.bias": (h,)})
        shapes.update({p + "fc1.weight": (f, h), p + "fc1.bias": (f,), p + "fc2.weight": (h, f), p + "fc2.bias": (h,)})
    shapes.update({
        "last_layer_norm.weight": (h,), "last_layer_norm.bias": (h,),
        "lm_head.weight": (v, h), "lm_head.bias": (v,),
        "lm_head.dense.weight": (h, h), "lm_head.dense.bias": (h,),
        "lm_head.layer_norm.weight": (h,), "lm_head.layer_norm.bias": (h,),
    })  # fmt: skip
    return shapes


def test_state_dict_matches_lucaone_table():
    model = tiny_model(scramble=False)
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert got == expected_shapes()
    assert model.lm_head.weight is model.embed_tokens.weight
    # Unique parameters: every entry except the buffers and the tied lm_head.weight.
    exp = expected_shapes()
    n = sum(math.prod(s) for k, s in exp.items() if k != "lm_head.weight" and not k.endswith("inv_freq"))
    assert model.num_parameters() == n


def test_inv_freq_values():
    model = tiny_model(scramble=False)
    expected = torch.tensor([1.0 / 10000 ** (j / HEAD_DIM) for j in range(0, HEAD_DIM, 2)])
    for i in range(LAYERS):
        torch.testing.assert_close(model.state_dict()[f"layers.{i}.self_attn.rot_emb.inv_freq"], expected)


def test_optional_modules_follow_config():
    model = LucaGPLM(tiny_config(no_token_type_embeddings=True, use_embed_layer_norm=True,
                                 no_position_embeddings=False, use_last_layer_norm=False))  # fmt: skip
    keys = set(model.state_dict())
    assert "embed_type.weight" not in keys and not any(k.startswith("last_layer_norm") for k in keys)
    assert {"embed_layer_norm.weight", "embed_pos.weight"} <= keys
    ids, types = batch()
    assert model(ids, types).shape == (2, 11, H)


def test_init_is_deterministic_and_bert_like():
    a, b = tiny_model(seed=3, scramble=False), tiny_model(seed=3, scramble=False)
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(va, vb), k
    assert torch.all(a.embed_tokens.weight[PAD_ID] == 0)
    assert torch.all(a.layers[0].pre_layer_norm.weight == 1) and torch.all(a.layers[0].fc1.bias == 0)
    assert torch.all(a.lm_head.bias == 0)
    assert 0.015 < a.layers[0].fc1.weight.std().item() < 0.025


# ---------------------------------------------------------------- forward vs the documented steps


def gelu_erf(x):
    return x * 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0)))


def reference_forward(sd, ids, types, token_dropout, embed_scale):
    """The five documented steps with plain tensor ops, reading weights from the state dict."""
    b, l = ids.shape
    pad = ids.eq(PAD_ID)
    x = embed_scale * sd["embed_tokens.weight"][ids] + embed_scale * sd["embed_type.weight"][types]
    if token_dropout:
        is_mask = ids.eq(MASK_ID)
        x = x.masked_fill(is_mask[..., None], 0.0)
        ratio = is_mask.sum(-1).float() / (~pad).sum(-1).float()
        x = x * (1 - 0.15 * 0.8) / (1 - ratio)[:, None, None]
    x = x * (~pad)[..., None].float()

    inv_freq = 1.0 / 10000 ** (torch.arange(0, HEAD_DIM, 2).float() / HEAD_DIM)
    freqs = torch.arange(l).float()[:, None] * inv_freq[None, :]
    emb = torch.cat([freqs, freqs], dim=-1)
    cos, sin = emb.cos(), emb.sin()

    def rot(t):
        t1, t2 = t[..., : HEAD_DIM // 2], t[..., HEAD_DIM // 2 :]
        return torch.cat([-t2, t1], dim=-1)

    def lin(t, name):
        return t @ sd[name + ".weight"].T + sd[name + ".bias"]

    def ln(t, name):
        return F.layer_norm(t, (H,), sd[name + ".weight"], sd[name + ".bias"], eps=1e-5)

    def heads(t):
        return t.view(b, l, HEADS, HEAD_DIM).permute(0, 2, 1, 3)

    for i in range(LAYERS):
        p = f"layers.{i}."
        h = ln(x, p + "pre_layer_norm")
        q, k, v = (heads(lin(h, p + f"self_attn.{n}_proj")) for n in "qkv")
        q, k = q * cos + rot(q) * sin, k * cos + rot(k) * sin
        scores = (q @ k.transpose(-1, -2)) * HEAD_DIM**-0.5
        scores = scores.masked_fill(pad[:, None, None, :], float("-inf"))
        attn = torch.softmax(scores, dim=-1) @ v
        x = x + lin(attn.permute(0, 2, 1, 3).reshape(b, l, H), p + "self_attn.out_proj")
        x = x + lin(gelu_erf(lin(ln(x, p + "post_layer_norm"), p + "fc1")), p + "fc2")
    return ln(x, "last_layer_norm")


def reference_logits(sd, hidden):
    x = F.layer_norm(gelu_erf(hidden @ sd["lm_head.dense.weight"].T + sd["lm_head.dense.bias"]), (H,),
                     sd["lm_head.layer_norm.weight"], sd["lm_head.layer_norm.bias"], eps=1e-5)  # fmt: skip
    return x @ sd["embed_tokens.weight"].T + sd["lm_head.bias"]


@pytest.mark.parametrize("token_dropout,embed_scale", [(True, 1.0), (False, 0.5)])
def test_forward_matches_documented_reference(token_dropout, embed_scale):
    model = tiny_model(token_dropout=token_dropout, embed_scale=embed_scale)
    ids, types = batch()
    sd = model.state_dict()
    with torch.no_grad():
        hidden = model(ids, token_type_ids=types)
        ref = reference_forward(sd, ids, types, token_dropout, embed_scale)
        torch.testing.assert_close(hidden, ref, atol=1e-5, rtol=0)
        torch.testing.assert_close(model.mlm_logits(hidden), reference_logits(sd, ref), atol=1e-4, rtol=0)
        # An explicit attention_mask gives the same result as the one derived from pad ids.
        torch.testing.assert_close(model(ids, types, attention_mask=ids.ne(PAD_ID).long()), hidden, atol=0, rtol=0)


def test_token_dropout_changes_output_only_when_on():
    ids, types = batch()
    on, off = tiny_model(token_dropout=True), tiny_model(token_dropout=False)
    with torch.no_grad():
        assert not torch.allclose(on(ids, types), off(ids, types))


def test_padding_invariance():
    model = tiny_model()
    short = torch.tensor([[CLS_ID, 10, 11, MASK_ID, 12, 13, SEP_ID]])
    long = torch.tensor([[CLS_ID] + [14, 15, 16, MASK_ID] * 3 + [SEP_ID]])
    both = torch.full((2, long.shape[1]), PAD_ID)
    both[0, : short.shape[1]], both[1] = short[0], long[0]
    with torch.no_grad():
        alone = model(short, torch.ones_like(short))
        batched = model(both, torch.ones_like(both))
    torch.testing.assert_close(batched[0, : short.shape[1]], alone[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(batched[1:], model(long, torch.ones_like(long)), atol=1e-5, rtol=0)


# ---------------------------------------------------------------- activation checkpointing


def loss_and_grads(model, ids, types):
    torch.manual_seed(123)  # same dropout masks in both runs
    hidden = model(ids, types)
    masked = ids.eq(MASK_ID)
    logits = model.mlm_logits(hidden[masked])  # (n_masked, V)
    loss = F.cross_entropy(logits, torch.arange(logits.shape[0]) + 5) + hidden.pow(2).mean()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_gradient_checkpointing_same_loss_and_grads(monkeypatch):
    plain = tiny_model(hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1).train()
    ckpt = tiny_model(hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1, gradient_checkpointing=True)
    ckpt.load_state_dict(plain.state_dict())
    ckpt.train()
    calls = []
    real_checkpoint = lucagplm.checkpoint
    monkeypatch.setattr(lucagplm, "checkpoint", lambda *a, **kw: calls.append(kw) or real_checkpoint(*a, **kw))

    ids, types = batch()
    loss_a, grads_a = loss_and_grads(plain, ids, types)
    loss_b, grads_b = loss_and_grads(ckpt, ids, types)
    assert len(calls) == LAYERS and all(kw["use_reentrant"] is False for kw in calls)
    torch.testing.assert_close(loss_b, loss_a, atol=1e-6, rtol=0)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], atol=1e-6, rtol=0, msg=name)
    assert ckpt.num_parameters() == plain.num_parameters()


# ---------------------------------------------------------------- save / load


def test_save_load_round_trip(tmp_path):
    model = tiny_model()
    model.save_pretrained(tmp_path)
    from safetensors.torch import load_file

    stored = load_file(str(tmp_path / "model.safetensors"))
    assert "lm_head.weight" not in stored and "embed_tokens.weight" in stored

    loaded = LucaGPLM.from_pretrained(tmp_path).eval()
    assert loaded.lm_head.weight is loaded.embed_tokens.weight
    ids, types = batch()
    with torch.no_grad():
        assert torch.equal(loaded(ids, types), model(ids, types))
        assert torch.equal(loaded.mlm_logits(loaded(ids, types)), model.mlm_logits(model(ids, types)))
    assert LucaGPLM.from_pretrained(tmp_path, gradient_checkpointing=True).config.gradient_checkpointing
    with pytest.raises(ValueError, match="no_such_key"):
        LucaGPLM.from_pretrained(tmp_path, no_such_key=1)


def test_save_with_explicit_state_dict(tmp_path):
    """The ZeRO-3 path: a caller passes the gathered full state dict of another copy."""
    target, other = tiny_model(seed=0), tiny_model(seed=1)
    other.save_pretrained(tmp_path, state_dict=target.state_dict())
    ids, types = batch()
    with torch.no_grad():
        assert torch.equal(LucaGPLM.from_pretrained(tmp_path).eval()(ids, types), target(ids, types))


def test_config_json_round_trip(tmp_path):
    config = tiny_config(token_dropout=False, gradient_checkpointing=True)
    config.to_json_file(tmp_path / "config.json")
    raw = json.loads((tmp_path / "config.json").read_text())
    assert raw["model_type"] == "lucaone_gplm"
    assert raw["hidden_size"] == H and raw["intermediate_size"] == 4 * H and raw["mask_token_id"] == MASK_ID
    back = LucaGPLMConfig.from_json_file(tmp_path / "config.json")
    assert back.model_type == "lucaone_gplm"
    for key in ("hidden_size", "num_hidden_layers", "token_dropout", "gradient_checkpointing", "alphabet",
                "no_position_embeddings", "pad_token_id", "sep_token_id", "ignore_index"):  # fmt: skip
        assert getattr(back, key) == getattr(config, key), key


def test_lucaone_style_config_keys_load():
    """The keys of a released LucaOne config.json (extra ones such as hidden_act are kept)."""
    raw = {"model_type": "lucaone_gplm", "vocab_size": 39, "hidden_size": 64, "num_hidden_layers": 2,
           "num_attention_heads": 4, "max_position_embeddings": 4096, "type_vocab_size": 2,
           "no_position_embeddings": True, "no_token_type_embeddings": False, "token_dropout": True,
           "use_embed_layer_norm": False, "use_last_layer_norm": True, "embed_scale": 1.0,
           "pad_token_id": 0, "unk_token_id": 1, "bos_token_id": 2, "eos_token_id": 3, "sep_token_id": 3,
           "mask_token_id": 4, "ignore_index": -100, "alphabet": "gene_prot", "hidden_act": "gelu",
           "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1, "classifier_dropout_prob": 0.1}  # fmt: skip
    config = LucaGPLMConfig(**raw)
    assert config.intermediate_size == 256 and config.hidden_act == "gelu"
    assert config.model_type == "lucaone_gplm" and not config.gradient_checkpointing
    with pytest.raises(ValueError, match="num_attention_heads"):
        LucaGPLMConfig(hidden_size=30, num_attention_heads=4)


def test_missing_or_corrupt_weights_name_the_file(tmp_path):
    tiny_model().save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"\x00\x01 definitely not safetensors")
    with pytest.raises(ValueError, match="model.safetensors"):
        LucaGPLM.from_pretrained(tmp_path)
    weights.unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        LucaGPLM.from_pretrained(tmp_path)
    (tmp_path / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json"):
        LucaGPLM.from_pretrained(tmp_path)


def test_missing_unexpected_and_misshaped_keys_are_named(tmp_path):
    model = tiny_model()
    sd = dict(model.state_dict())
    del sd["layers.1.fc2.bias"]
    sd["classifier.weight"] = torch.zeros(3, H)
    sd["lm_head.bias"] = torch.zeros(40)
    model.save_pretrained(tmp_path, state_dict=sd)
    with pytest.raises(ValueError) as info:
        LucaGPLM.from_pretrained(tmp_path)
    msg = str(info.value)
    assert "layers.1.fc2.bias" in msg and "classifier.weight" in msg and "lm_head.bias" in msg
    assert "model.safetensors" in msg
