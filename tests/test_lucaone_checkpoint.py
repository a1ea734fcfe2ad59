"""Initialising LucaGPLM from a checkpoint in LucaOne/LucaVirus's own `checkpoint-step<N>/` layout.

The checkpoints here are written by the test itself: names and shapes come from the documented
format (LUCAONE_FORMAT.md), never from our model's state_dict(), and the expected hidden states
come from a reference forward pass computed directly from the raw checkpoint tensors.
"""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from lucatrain.models.lucagplm import LucaGPLM, LucaGPLMConfig
from lucatrain.models.lucaone_checkpoint import (
    LoadReport,
    is_lucaone_checkpoint,
    infer_head_tasks,
    load_lucaone_checkpoint,
    load_lucaone_heads,
    lucaone_config_to_kwargs,
    model_from_lucaone_checkpoint,
    read_lucaone_state_dict,
)

H, HEADS, V = 32, 4, 39
HEAD_DIM, F_DIM = H // HEADS, 4 * H
PAD, CLS, SEP, MASK = 0, 2, 3, 4
# LucaOne's pretraining task heads, as its code stores them: flat ModuleLists where head i belongs
# to the i-th label task of that run (here gene_taxonomy with 10 labels, prot_keyword with 7).
HEAD_KEYS = {
    "hidden_layer_list.0.weight": (16, H), "hidden_layer_list.0.bias": (16,),
    "classifier_list.0.weight": (10, 16), "classifier_list.0.bias": (10,),
    "hidden_layer_list.1.weight": (8, H), "hidden_layer_list.1.bias": (8,),
    "classifier_list.1.weight": (7, 8), "classifier_list.1.bias": (7,),
}  # fmt: skip
HEAD_TASKS = ["gene_taxonomy", "prot_keyword"]


def lucaone_config(layers=3, **extra) -> dict:
    """A config.json as LucaOne's training code writes it (its key names, incl. keys we ignore)."""
    config = {
        "model_type": "lucaone_gplm", "architectures": ["LucaGPLM"], "transformers_version": "4.29.0",
        "alphabet": "gene_prot", "vocab_size": V, "hidden_size": H, "num_hidden_layers": layers,
        "num_attention_heads": HEADS, "max_position_embeddings": 4096, "type_vocab_size": 2,
        "no_position_embeddings": True, "no_token_type_embeddings": False, "token_dropout": True,
        "use_embed_layer_norm": False, "use_last_layer_norm": True, "embed_scale": 1.0,
        "pad_token_id": 0, "unk_token_id": 1, "bos_token_id": 2, "eos_token_id": 3, "sep_token_id": 3,
        "mask_token_id": 4, "ignore_index": -100, "hidden_act": "gelu", "hidden_dropout_prob": 0.1,
        "attention_probs_dropout_prob": 0.1, "classifier_dropout_prob": 0.1, "initializer_range": 0.02,
    }  # fmt: skip
    config.update(extra)
    return config


def lucaone_state_dict(layers=3, seed=0, heads=True) -> dict[str, torch.Tensor]:
    """Random tensors under LucaOne's documented names and shapes (wide values, so every term matters)."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, mean=0.0, std=0.3):
        return mean + std * torch.randn(*shape, generator=g)

    sd = {"embed_tokens.weight": rnd(V, H), "embed_type.weight": rnd(2, H)}
    sd["embed_tokens.weight"][PAD] = 0.0  # padding_idx 0
    for i in range(layers):
        p = f"layers.{i}."
        sd[p + "pre_layer_norm.weight"], sd[p + "pre_layer_norm.bias"] = rnd(H, mean=1.0), rnd(H)
        for proj in ("q", "k", "v", "out"):
            sd[p + f"self_attn.{proj}_proj.weight"] = rnd(H, H)
            sd[p + f"self_attn.{proj}_proj.bias"] = rnd(H)
        sd[p + "self_attn.rot_emb.inv_freq"] = 1.0 / 10000 ** (torch.arange(0, HEAD_DIM, 2).float() / HEAD_DIM)
        sd[p + "post_layer_norm.weight"], sd[p + "post_layer_norm.bias"] = rnd(H, mean=1.0), rnd(H)
        sd[p + "fc1.weight"], sd[p + "fc1.bias"] = rnd(F_DIM, H), rnd(F_DIM)
        sd[p + "fc2.weight"], sd[p + "fc2.bias"] = rnd(H, F_DIM), rnd(H)
    sd["last_layer_norm.weight"], sd["last_layer_norm.bias"] = rnd(H, mean=1.0), rnd(H)
    sd["lm_head.weight"] = sd["embed_tokens.weight"]  # tied
    sd["lm_head.bias"] = rnd(V)
    sd["lm_head.dense.weight"], sd["lm_head.dense.bias"] = rnd(H, H), rnd(H)
    sd["lm_head.layer_norm.weight"], sd["lm_head.layer_norm.bias"] = rnd(H, mean=1.0), rnd(H)
    if heads:
        sd.update({k: rnd(*shape) for k, shape in HEAD_KEYS.items()})
    return sd


def write_checkpoint(directory, state_dict, config) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    torch.save(state_dict, directory / "pytorch.pth")


@pytest.fixture
def ckpt(tmp_path):
    """(directory, raw state dict) of a 3-layer checkpoint with task heads."""
    sd = lucaone_state_dict(layers=3)
    directory = tmp_path / "checkpoint-step5600000"
    write_checkpoint(directory, sd, lucaone_config(layers=3))
    return directory, sd


# ------------------------------------------------------------------ reference forward (the 5 documented steps)


def ln(x, w, b):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + 1e-5) * w + b


def gelu_erf(x):
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def rot_half(x):
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def reference_hidden(sd, layers, ids, types):
    """Hidden states after last_layer_norm, straight from the raw tensors."""
    b, l = ids.shape
    real = ids != PAD
    x = sd["embed_tokens.weight"][ids] + sd["embed_type.weight"][types]  # embed_scale 1.0
    # token_dropout: [MASK] embeddings zeroed, rescaled by (1 - 0.15*0.8) / (1 - observed mask ratio)
    is_mask = ids == MASK
    x = torch.where(is_mask[..., None], torch.zeros_like(x), x)
    observed = is_mask.sum(-1).float() / real.sum(-1).float()
    x = x * ((1 - 0.12) / (1 - observed))[:, None, None]
    x = x * real[..., None].float()

    inv = 1.0 / 10000 ** (torch.arange(0, HEAD_DIM, 2).float() / HEAD_DIM)
    freqs = torch.arange(l).float()[:, None] * inv[None, :]
    emb = torch.cat([freqs, freqs], dim=-1)
    cos, sin = emb.cos(), emb.sin()  # (L, D)

    for i in range(layers):
        p = f"layers.{i}."

        def lin(t, name):
            return t @ sd[p + name + ".weight"].T + sd[p + name + ".bias"]

        h = ln(x, sd[p + "pre_layer_norm.weight"], sd[p + "pre_layer_norm.bias"])
        q, k, v = (lin(h, f"self_attn.{n}_proj").view(b, l, HEADS, HEAD_DIM).transpose(1, 2) for n in "qkv")
        q, k = q * cos + rot_half(q) * sin, k * cos + rot_half(k) * sin
        scores = (q @ k.transpose(-1, -2)) * HEAD_DIM**-0.5  # (B, nH, L, L)
        scores = scores.masked_fill(~real[:, None, None, :], float("-inf"))
        weights = torch.exp(scores - scores.amax(-1, keepdim=True))
        weights = weights / weights.sum(-1, keepdim=True)
        attn = (weights @ v).transpose(1, 2).reshape(b, l, H)
        x = x + lin(attn, "self_attn.out_proj")
        h = ln(x, sd[p + "post_layer_norm.weight"], sd[p + "post_layer_norm.bias"])
        x = x + lin(gelu_erf(lin(h, "fc1")), "fc2")
    return ln(x, sd["last_layer_norm.weight"], sd["last_layer_norm.bias"])


def reference_logits(sd, hidden):
    h = gelu_erf(hidden @ sd["lm_head.dense.weight"].T + sd["lm_head.dense.bias"])
    h = ln(h, sd["lm_head.layer_norm.weight"], sd["lm_head.layer_norm.bias"])
    return h @ sd["embed_tokens.weight"].T + sd["lm_head.bias"]


def batch():
    """A gene (type 0) and a shorter protein (type 1, padded), both with [MASK] tokens."""
    ids = torch.tensor([
        [CLS, 5, 6, MASK, 7, 8, 5, 6, 7, MASK, SEP],
        [CLS, 10, 11, MASK, 12, 13, SEP, PAD, PAD, PAD, PAD],
    ])  # fmt: skip
    types = torch.tensor([[0] * 11, [1] * 11])
    return ids, types


def hidden_of(model, ids, types):
    with torch.no_grad():
        return model.eval()(ids, token_type_ids=types)


# ------------------------------------------------------------------ tests


def test_is_lucaone_checkpoint(ckpt, tmp_path):
    directory, _ = ckpt
    assert is_lucaone_checkpoint(directory)
    assert is_lucaone_checkpoint(str(directory))
    assert not is_lucaone_checkpoint(tmp_path / "nowhere")
    exported = tmp_path / "export"
    LucaGPLM(LucaGPLMConfig(hidden_size=H, num_hidden_layers=1, num_attention_heads=HEADS)).save_pretrained(exported)
    assert not is_lucaone_checkpoint(exported)  # our own format: config.json + model.safetensors
    (directory / "pytorch.pth").unlink()
    assert not is_lucaone_checkpoint(directory)


def test_hidden_states_and_logits_match_reference(ckpt):
    directory, sd = ckpt
    model, report = model_from_lucaone_checkpoint(directory)
    assert isinstance(report, LoadReport)
    assert model.config.num_hidden_layers == 3 and model.config.hidden_size == H
    assert report.missing == [] and report.unused_layers == []
    ids, types = batch()
    hidden = hidden_of(model, ids, types)
    expected = reference_hidden(sd, 3, ids, types)
    torch.testing.assert_close(hidden, expected, atol=1e-5, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(model.mlm_logits(hidden), reference_logits(sd, expected), atol=1e-4, rtol=0)
    # the two molecule types really take different paths
    assert not torch.allclose(hidden_of(model, ids, torch.zeros_like(types)), hidden)


def test_report_loaded_tied_and_heads(ckpt):
    directory, sd = ckpt
    model, report = model_from_lucaone_checkpoint(directory)
    assert model.lm_head.weight is model.embed_tokens.weight
    torch.testing.assert_close(model.embed_tokens.weight.detach(), sd["embed_tokens.weight"])
    encoder_keys = {k for k in sd if k not in HEAD_KEYS}
    assert set(report.loaded) == encoder_keys - {"lm_head.weight"}  # the tied weight loaded once
    assert set(report.skipped_heads) == set(HEAD_KEYS)
    summary = report.summary()
    for key in HEAD_KEYS:
        assert key in summary
    assert "tied" in summary
    assert str(directory / "pytorch.pth") in summary


def test_module_prefix_is_stripped(ckpt, tmp_path):
    _, sd = ckpt
    ddp = tmp_path / "ddp" / "checkpoint-step10"
    write_checkpoint(ddp, {f"module.{k}": v for k, v in sd.items()}, lucaone_config(layers=3))
    assert set(read_lucaone_state_dict(ddp)) == set(sd)
    model, report = model_from_lucaone_checkpoint(ddp)
    assert set(report.skipped_heads) == set(HEAD_KEYS) and report.missing == []
    assert "module." in report.summary()
    ids, types = batch()
    torch.testing.assert_close(hidden_of(model, ids, types), reference_hidden(sd, 3, ids, types), atol=1e-5, rtol=0)


def test_missing_encoder_keys_are_reported(tmp_path):
    sd = lucaone_state_dict(layers=2)
    gone = ["last_layer_norm.bias", "layers.1.fc2.weight"]
    for key in gone:
        del sd[key]
    write_checkpoint(tmp_path / "c", sd, lucaone_config(layers=2))
    model = LucaGPLM(LucaGPLMConfig(hidden_size=H, num_hidden_layers=2, num_attention_heads=HEADS))
    before = model.layers[1].fc2.weight.detach().clone()
    report = load_lucaone_checkpoint(tmp_path / "c", model)
    assert report.missing == sorted(gone)
    torch.testing.assert_close(model.layers[1].fc2.weight.detach(), before)  # left at its initial value
    torch.testing.assert_close(model.layers[1].fc1.weight.detach(), sd["layers.1.fc1.weight"])
    for key in gone:
        assert key in report.summary()


def test_first_n_layers_initialises_from_the_first_layers(ckpt):
    directory, sd = ckpt
    model, report = model_from_lucaone_checkpoint(directory, num_hidden_layers=2, first_n_layers=True)
    assert len(model.layers) == 2
    assert report.unused_layer_indices == [2]
    assert report.unused_layers and all(k.startswith("layers.2.") for k in report.unused_layers)
    assert set(report.unused_layers) == {k for k in sd if k.startswith("layers.2.")}
    assert "layers.2.fc1.weight" in report.summary()
    ids, types = batch()
    torch.testing.assert_close(hidden_of(model, ids, types), reference_hidden(sd, 2, ids, types), atol=1e-5, rtol=0)


def test_more_layers_without_flag_is_an_error(ckpt):
    directory, _ = ckpt
    model = LucaGPLM(LucaGPLMConfig(hidden_size=H, num_hidden_layers=2, num_attention_heads=HEADS))
    with pytest.raises(ValueError, match=r"3 transformer layers.*has 2.*first_n_layers=True"):
        load_lucaone_checkpoint(directory, model)
    with pytest.raises(ValueError, match="first_n_layers"):
        model_from_lucaone_checkpoint(directory, num_hidden_layers=2)


@pytest.mark.parametrize("flag", [False, True])
def test_fewer_layers_is_an_error(tmp_path, flag):
    write_checkpoint(tmp_path / "c", lucaone_state_dict(layers=1), lucaone_config(layers=1))
    model = LucaGPLM(LucaGPLMConfig(hidden_size=H, num_hidden_layers=2, num_attention_heads=HEADS))
    with pytest.raises(ValueError, match=r"has 1 transformer layers, the model has 2"):
        load_lucaone_checkpoint(tmp_path / "c", model, first_n_layers=flag)


def test_width_mismatch_names_hidden_size(ckpt):
    directory, _ = ckpt
    wide = LucaGPLM(LucaGPLMConfig(hidden_size=2 * H, num_hidden_layers=3, num_attention_heads=HEADS))
    with pytest.raises(ValueError, match=rf"hidden_size={H}.*hidden_size={2 * H}"):
        load_lucaone_checkpoint(directory, wide, first_n_layers=True)
    heads = LucaGPLM(LucaGPLMConfig(hidden_size=H, num_hidden_layers=3, num_attention_heads=2))
    with pytest.raises(ValueError, match=rf"hidden_size={H}, num_attention_heads={HEADS}.*num_attention_heads=2"):
        load_lucaone_checkpoint(directory, heads)


def test_other_shape_mismatch_names_key_and_shapes(ckpt):
    directory, _ = ckpt
    model = LucaGPLM(LucaGPLMConfig(hidden_size=H, num_hidden_layers=2, num_attention_heads=HEADS, intermediate_size=64))
    with pytest.raises(ValueError, match=r"layers\.0\.fc1\.weight: checkpoint \(128, 32\) vs model \(64, 32\)"):
        load_lucaone_checkpoint(directory, model, first_n_layers=True)  # the flag forgives depth only


def run_heads(num_labels, sizes=None):
    """This run's task heads for gene_taxonomy and prot_keyword (a PretrainTask's `heads`)."""
    from lucatrain.families.lucaone import build_task

    sizes = sizes or {"gene_taxonomy": 16, "prot_keyword": 8}
    encoder = LucaGPLM(LucaGPLMConfig(hidden_size=H, num_hidden_layers=1, num_attention_heads=HEADS))
    return build_task(encoder, ["gene_mask", *num_labels], num_labels=num_labels, classifier_sizes=sizes).heads


def test_task_heads_load_when_task_and_shapes_match(ckpt):
    directory, sd = ckpt
    _, report = model_from_lucaone_checkpoint(directory)
    assert set(report.skipped_heads) == set(HEAD_KEYS)  # the encoder alone takes none of them
    heads = run_heads({"gene_taxonomy": 10, "prot_keyword": 7})
    load_lucaone_heads(report, heads, HEAD_TASKS)
    assert report.loaded_heads == {"gene_taxonomy": 0, "prot_keyword": 1} and report.skipped_heads == {}
    torch.testing.assert_close(heads["gene_taxonomy"].classifier.weight.detach(), sd["classifier_list.0.weight"])
    torch.testing.assert_close(heads["prot_keyword"].hidden_layer.bias.detach(), sd["hidden_layer_list.1.bias"])
    assert "gene_taxonomy (checkpoint head 0)" in report.summary()


def test_task_head_with_another_label_count_is_skipped_with_the_shapes(ckpt):
    directory, sd = ckpt
    _, report = model_from_lucaone_checkpoint(directory)
    heads = run_heads({"gene_taxonomy": 5, "prot_keyword": 7})
    before = heads["gene_taxonomy"].classifier.weight.detach().clone()
    load_lucaone_heads(report, heads, HEAD_TASKS)
    assert report.loaded_heads == {"prot_keyword": 1}
    assert set(report.skipped_heads) == {k for k in HEAD_KEYS if ".0." in k}
    reason = report.skipped_heads["classifier_list.0.weight"]
    assert "gene_taxonomy" in reason and "(10, 16) in the checkpoint vs (5, 16) here" in reason
    torch.testing.assert_close(heads["gene_taxonomy"].classifier.weight.detach(), before)  # untouched


def test_task_heads_of_untrained_or_unknown_tasks_are_reported(ckpt):
    directory, _ = ckpt
    _, report = model_from_lucaone_checkpoint(directory)
    heads = run_heads({"prot_keyword": 7})
    load_lucaone_heads(report, heads, None)  # 2 heads: which tasks they are cannot be inferred
    assert report.loaded_heads == {}
    assert all("model.lucaone_head_tasks" in r for r in report.skipped_heads.values())
    load_lucaone_heads(report, heads, HEAD_TASKS)
    assert report.loaded_heads == {"prot_keyword": 1}
    assert "this run does not train gene_taxonomy" in report.skipped_heads["hidden_layer_list.0.weight"]
    with pytest.raises(ValueError, match="names 3 tasks but .* holds 2 task heads"):
        load_lucaone_heads(report, heads, ["gene_type", *HEAD_TASKS])


def test_lucavirus_head_order_is_inferred():
    assert infer_head_tasks(7) == ["gene_type", "prot_homo", "prot_site", "prot_domain", "gene_taxonomy",
                                   "prot_taxonomy", "prot_keyword"]  # fmt: skip
    assert infer_head_tasks(8)[-1] == "prot_structure"
    assert infer_head_tasks(3) is None


def test_lucaone_config_to_kwargs_and_overrides(ckpt):
    directory, _ = ckpt
    kwargs = lucaone_config_to_kwargs(lucaone_config(layers=3))
    assert kwargs["hidden_size"] == H and kwargs["num_hidden_layers"] == 3 and kwargs["num_attention_heads"] == HEADS
    assert kwargs["no_position_embeddings"] is True and kwargs["use_last_layer_norm"] is True
    assert kwargs["hidden_dropout_prob"] == 0.1  # the file's value is kept by default
    for ignored in ("model_type", "architectures", "hidden_act", "initializer_range", "transformers_version"):
        assert ignored not in kwargs
    assert "intermediate_size" not in kwargs  # absent -> LucaGPLMConfig uses 4H
    assert lucaone_config_to_kwargs(lucaone_config(intermediate_size=96))["intermediate_size"] == 96
    with pytest.raises(ValueError, match="num_attention_heads"):
        lucaone_config_to_kwargs({"hidden_size": H, "num_hidden_layers": 2})
    model, _ = model_from_lucaone_checkpoint(directory, hidden_dropout_prob=0.0, gradient_checkpointing=True)
    assert model.config.hidden_dropout_prob == 0.0 and model.config.gradient_checkpointing
    assert model.config.intermediate_size == F_DIM
    with pytest.raises(ValueError, match="unknown config override"):
        model_from_lucaone_checkpoint(directory, hiden_size=8)


class NotATensor:
    def __init__(self):
        self.payload = "arbitrary object"


def test_pickled_object_is_refused(tmp_path):
    directory = tmp_path / "evil"
    write_checkpoint(directory, {"embed_tokens.weight": torch.zeros(V, H), "extra": NotATensor()}, lucaone_config())
    model = LucaGPLM(LucaGPLMConfig(hidden_size=H, num_hidden_layers=1, num_attention_heads=HEADS))
    with pytest.raises(ValueError, match="weights_only") as err:
        load_lucaone_checkpoint(directory, model)
    assert str(directory / "pytorch.pth") in str(err.value)
    # weights_only allows plain values, but a state dict must hold tensors only
    write_checkpoint(directory, {"embed_tokens.weight": torch.zeros(V, H), "step": 7}, lucaone_config())
    with pytest.raises(ValueError, match="'step' is a int") as err:
        load_lucaone_checkpoint(directory, model)
    assert str(directory / "pytorch.pth") in str(err.value)


def test_missing_files_name_the_path(ckpt):
    directory, _ = ckpt
    (directory / "pytorch.pth").unlink()
    with pytest.raises(FileNotFoundError) as err:
        model_from_lucaone_checkpoint(directory)
    assert str(directory / "pytorch.pth") in str(err.value)
    model = LucaGPLM(LucaGPLMConfig(hidden_size=H, num_hidden_layers=3, num_attention_heads=HEADS))
    with pytest.raises(FileNotFoundError) as err:
        load_lucaone_checkpoint(directory, model)
    assert str(directory / "pytorch.pth") in str(err.value)
    (directory / "config.json").unlink()
    with pytest.raises(FileNotFoundError) as err:
        load_lucaone_checkpoint(directory, model)
    assert str(directory / "config.json") in str(err.value)


def test_half_precision_checkpoint_loads(tmp_path):
    sd = lucaone_state_dict(layers=1, heads=False)
    write_checkpoint(tmp_path / "c", {k: v.to(torch.bfloat16) for k, v in sd.items()}, lucaone_config(layers=1))
    model, report = model_from_lucaone_checkpoint(tmp_path / "c")
    assert model.embed_tokens.weight.dtype == torch.float32
    torch.testing.assert_close(model.layers[0].fc1.weight.detach(), sd["layers.0.fc1.weight"].to(torch.bfloat16).float())
    assert report.skipped_heads == {} and report.missing == []


def test_learned_positions_follow_the_config(tmp_path):
    sd = lucaone_state_dict(layers=1, heads=False)
    sd["embed_pos.weight"] = torch.randn(4096, H)
    write_checkpoint(tmp_path / "c", sd, lucaone_config(layers=1, no_position_embeddings=False))
    model, report = model_from_lucaone_checkpoint(tmp_path / "c")  # sized and shaped by config.json
    assert "embed_pos.weight" in report.loaded and report.skipped_heads == {}
    rotary_only = LucaGPLM(LucaGPLMConfig(hidden_size=H, num_hidden_layers=1, num_attention_heads=HEADS))
    report = load_lucaone_checkpoint(tmp_path / "c", rotary_only)
    assert "no_position_embeddings" in report.skipped_heads["embed_pos.weight"]
    assert any("no_position_embeddings" in m and "differ" in m for m in report.messages)


# ------------------------------------------------------------------ export and embeddings without a run


def test_export_straight_from_a_lucaone_checkpoint(ckpt, tmp_path, capsys):
    from lucatrain.cli import main as cli_main

    directory, _ = ckpt
    out = tmp_path / "export"
    assert cli_main(["export", str(directory), "--out", str(out)]) == 0
    assert "the encoder of a LucaOne checkpoint" in capsys.readouterr().out
    exported = LucaGPLM.from_pretrained(out).eval()
    direct, _ = model_from_lucaone_checkpoint(directory)
    ids = torch.tensor([[1, 5, 6, 7, 8, 2]])
    types, mask = torch.zeros_like(ids), torch.ones_like(ids)
    with torch.no_grad():
        assert torch.equal(exported(ids, types, mask), direct.eval()(ids, types, mask))
    assert (out / "modeling_lucagplm.py").is_file()  # transformers-loadable as a run's export
    # Heads need their label names, which only a run has: refused with the way to get them.
    assert cli_main(["export", str(directory), "--out", str(tmp_path / "heads"), "--heads"]) == 2
    assert "export the encoder without --heads" in capsys.readouterr().err


def test_embeddings_straight_from_a_lucaone_checkpoint(ckpt, tmp_path):
    from lucatrain.embed import embed_file, embed_records
    from lucatrain.data.sources import iter_records

    directory, _ = ckpt
    fasta = Path(__file__).resolve().parents[1] / "examples" / "data" / "rrna_genes.fasta"
    ids, vectors = embed_file(directory, fasta, max_length=64)
    records = list(iter_records(fasta))
    model, _ = model_from_lucaone_checkpoint(directory)
    expected = embed_records(model, [r.seq for r in records], [r.obj_type for r in records], max_length=64)
    assert ids == [r.obj_id for r in records] and np.array_equal(vectors, expected)


def test_embeddings_of_a_run_directory_name_its_exports(tmp_path):
    from lucatrain.embed import embed_file

    (tmp_path / "run" / "best").mkdir(parents=True)
    (tmp_path / "run" / "best" / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"run is a run directory; use its export .*run/best"):
        embed_file(tmp_path / "run", tmp_path / "x.fasta")
