"""Contrastive-training plumbing over two real processes (gloo): gathering embeddings with their
gradient, and editing a parameter after each optimizer step under every ZeRO stage.

Each test spawns its ranks once and passes results back through files; the parent asserts.
"""

import json
import math
import os
import traceback
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import _free_port, join_group, spawn_ranks
from lucatrain import dist
from lucatrain.contrastive import LogitScaleClamp

pytestmark = pytest.mark.multiprocess

WORLD = 2
LN100 = math.log(100.0)
SPLITS = [(4, 4), (3, 5), (0, 8)]  # rows per rank; (0, 8): a rank with no rows still takes part


def _spawn(worker, args, port, timeout=120):
    spawn_ranks(worker, args, port, WORLD, timeout)


def _join_group(rank: int, port: int) -> None:
    join_group(rank, port, WORLD)


# --- all_gather_with_grad: symmetric InfoNCE with global negatives ---------------------------------


class ClipToy(nn.Module):
    """Two "modalities" mapped by their own Linear into one embedding space, and CLIP's logit scale."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.enc_a = nn.Linear(6, 4, dtype=torch.float64)
        self.enc_b = nn.Linear(5, 4, dtype=torch.float64)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07), dtype=torch.float64))

    def embed(self, xa, xb):
        return F.normalize(self.enc_a(xa), dim=-1), F.normalize(self.enc_b(xb), dim=-1)


def _clip_batch(batch: int):
    g = torch.Generator().manual_seed(0)
    return torch.randn(batch, 6, generator=g, dtype=torch.float64), torch.randn(batch, 5, generator=g, dtype=torch.float64)


def _grads(model):
    return {name: p.grad.detach().clone() for name, p in model.named_parameters()}


def _clip_rank_loss(model, xa, xb, start, stop, batch, gather):
    """This rank's share of the global loss: its rows against all gathered columns, over the global B."""
    za, zb = model.embed(xa[start:stop], xb[start:stop])
    za_all, zb_all = gather(za), gather(zb)
    scale = model.logit_scale.exp()
    targets = torch.arange(start, stop)
    a_to_b = F.cross_entropy(scale * za @ zb_all.T, targets, reduction="sum")
    b_to_a = F.cross_entropy(scale * zb @ za_all.T, targets, reduction="sum")
    return (a_to_b + b_to_a) / (2 * batch), za_all


def _gather_without_grad_of_others(tensor):
    """The common shortcut: gather without autograd and put our own rows back (misses cross terms)."""
    sizes = dist.all_gather_sizes(tensor.shape[0])
    full = dist.all_gather_with_grad(tensor.detach())
    start = sum(sizes[: dist.rank()])
    return torch.cat([full[:start], tensor, full[start + tensor.shape[0] :]])


def _gather_worker(rank, port, out_dir):
    _join_group(rank, port)
    torch.distributed.init_process_group("gloo")
    try:
        results = {}
        for split in SPLITS:
            batch = sum(split)
            start, stop = sum(split[:rank]), sum(split[: rank + 1])
            xa, xb = _clip_batch(batch)
            found = {"sizes": dist.all_gather_sizes(stop - start)}
            for name, gather in (("exact", dist.all_gather_with_grad), ("shortcut", _gather_without_grad_of_others)):
                model = ClipToy()
                loss, za_all = _clip_rank_loss(model, xa, xb, start, stop, batch, gather)
                loss.backward()
                found[name] = {
                    "loss": dist.all_reduce_sum(loss.detach().clone()),
                    "grads": {n: dist.all_reduce_sum(g) for n, g in _grads(model).items()},
                    "gathered": za_all.detach().clone(),
                }
            results[split] = found
        torch.save(results, Path(out_dir) / f"gather-rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


def test_all_gather_with_grad_gives_full_batch_infonce(tmp_path):
    port = _free_port()
    _spawn(_gather_worker, (port, str(tmp_path)), port)
    ranks = [torch.load(tmp_path / f"gather-rank{r}.pt") for r in range(WORLD)]
    for split in SPLITS:
        batch = sum(split)
        xa, xb = _clip_batch(batch)
        model = ClipToy()
        za, zb = model.embed(xa, xb)
        logits = model.logit_scale.exp() * za @ zb.T
        targets = torch.arange(batch)
        loss = (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2
        loss.backward()
        want = _grads(model)
        assert set(want) == {"enc_a.weight", "enc_a.bias", "enc_b.weight", "enc_b.bias", "logit_scale"}
        for rank, found in enumerate(ranks):
            got = found[split]
            assert got["sizes"] == list(split)
            # The forward: every rank holds every rank's rows, in rank order.
            torch.testing.assert_close(got["exact"]["gathered"], za.detach(), rtol=0, atol=1e-12)
            torch.testing.assert_close(got["exact"]["loss"], loss.detach(), rtol=0, atol=1e-6, msg=f"{split} rank {rank}")
            for name in want:
                torch.testing.assert_close(got["exact"]["grads"][name], want[name], rtol=0, atol=1e-6,
                                           msg=f"{split} rank {rank} {name}")  # fmt: skip
        if 0 not in split:
            # Not vacuous: without the gradient of the other ranks' terms the encoders' gradients are wrong.
            shortcut = ranks[0][split]["shortcut"]
            torch.testing.assert_close(shortcut["loss"], loss.detach(), rtol=0, atol=1e-6)  # same forward
            assert (shortcut["grads"]["enc_a.weight"] - want["enc_a.weight"]).abs().max() > 1e-3


def test_all_gather_with_grad_in_one_process_is_the_identity():
    x = torch.randn(3, 2, requires_grad=True)
    assert dist.all_gather_with_grad(x) is x  # no group, or a world of one
    assert dist.all_gather_sizes(3) == [3]
    with pytest.raises(ValueError, match="scalar"):
        dist.all_gather_with_grad(torch.tensor(1.0))


# --- after_step hooks and edit_parameter under the DeepSpeed Engine --------------------------------

# zero3-partitioned: the shipped zero3 keeps parameters under 1e5 elements whole on every rank
# ("persistent"); with the threshold at 0 this toy's parameters are really split between the ranks.
CASES = [("zero0", "fp32"), ("zero0", "bf16"), ("zero1", "fp32"), ("zero2", "fp32"), ("zero2", "bf16"),
         ("zero3", "fp32"), ("zero3", "bf16"), ("zero3-partitioned", "fp32"), ("zero3-partitioned", "bf16"),
         ("zero3_offload", "fp32")]  # fmt: skip
BIAS = [0.0, 0.25, 0.5]  # what the second hook writes into proj.bias (3 elements: 2 + 1 and padding)


class ClampToy(nn.Module):
    """CLIP's logit scale plus a Linear, so ZeRO has something to shard. forward returns the loss."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        # Shape (1,), not a 0-dim scalar as in open_clip: DeepSpeed 0.19's initial parameter broadcast
        # over several ranks views each parameter as bytes, which a 0-dim tensor cannot do.
        self.logit_scale = nn.Parameter(torch.tensor([LN100 - 0.001]))
        self.proj = nn.Linear(4, 3)
        self.frozen = nn.Parameter(torch.zeros(3), requires_grad=False)  # no optimizer, no fp32 master

    def forward(self, x, sign):
        return sign * self.logit_scale + 1e-3 * self.proj(x.to(self.proj.weight.dtype)).pow(2).mean()


def _ds_config(zero, precision, accumulation=1, out_dir="."):
    from lucatrain.config import load_config
    from lucatrain.engine import resolve_ds_config_path

    if zero == "zero3-partitioned":
        ds = json.loads(resolve_ds_config_path("zero3").read_text())
        ds["zero_optimization"]["stage3_param_persistence_threshold"] = 0
        # One file per rank: both ranks write it at once, and a rank must never read the other's half-written file.
        zero = Path(out_dir) / f"zero3-partitioned-rank{os.environ.get('RANK', '0')}.json"
        zero.write_text(json.dumps(ds))
    return load_config(None, [
        f"deepspeed.config={zero}", f"deepspeed.precision={precision}", "train.learning_rate=0.1",
        "train.warmup_steps=0", "train.lr_scheduler=constant", "train.batch_size=1", "train.max_grad_norm=0",
        "train.weight_decay=0", "train.adam_beta1=0.9", "train.adam_beta2=0.98",
        f"train.gradient_accumulation_steps={accumulation}",
    ])  # fmt: skip


_clamp = LogitScaleClamp("logit_scale", 0.0, LN100).after_step  # the contrastive families' callback


def _set_bias(engine):
    """A second hook; position by position, so a write into the wrong partition slot shows."""
    engine.edit_parameter(engine.module.proj.bias, lambda value: torch.tensor(BIAS))
    engine.edit_parameter(engine.module.frozen, lambda value: value + torch.tensor(BIAS))


def _read(engine, param):
    """(working copy the forward uses, fp32 master the optimizer updates), read independently of edit_parameter."""
    import deepspeed
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer
    from deepspeed.utils import safe_get_full_fp32_param

    with deepspeed.zero.GatheredParameters([param]):  # a no-op below ZeRO-3
        working = param.data.float().clone()
    if not param.requires_grad:
        return working, None
    master = safe_get_full_fp32_param(param)
    if master is None and isinstance(engine.ds.optimizer, FP16_UnfusedOptimizer):  # ZeRO-0 bf16
        optimizer = engine.ds.optimizer
        pairs = [pair for lps, fp32s in zip(optimizer.fp16_groups, optimizer.fp32_groups) for pair in zip(lps, fp32s)]
        [master] = [fp32 for lp, fp32 in pairs if lp is param]
    if master is None:  # ZeRO-0 fp32: the parameter is the master
        master = param.data
    return working, master.detach().float().clone()


def _clamp_case(zero, precision, out_dir):
    from lucatrain.engine import Engine

    engine = Engine(ClampToy(), _ds_config(zero, precision, out_dir=out_dir), after_step=[_clamp, _set_bias])
    module = engine.module
    found = {"dtype": module.logit_scale.dtype, "optimizer": type(engine.ds.optimizer).__name__,
             "partitioned": getattr(module.proj.weight, "ds_persist", True) is False, "start": _read(engine, module.logit_scale)}  # fmt: skip
    x = torch.randn(1, 4)
    for step, sign in ((1, -1.0), (2, 1.0)):  # up past ln(100), then down
        loss = engine(x, sign)
        engine.backward(loss)
        engine.step()
        found[step] = _read(engine, module.logit_scale)
        found[f"bias{step}"] = _read(engine, module.proj.bias)
        found[f"frozen{step}"] = _read(engine, module.frozen)[0]
    return found


def _boundary_case():
    """Hooks run once per optimizer update, not per micro-batch; a bad fn fails loudly."""
    from lucatrain.engine import Engine

    seen = []
    engine = Engine(ClampToy(), _ds_config("zero2", "fp32", accumulation=2), after_step=[lambda e: seen.append(e.global_steps)])
    x = torch.randn(1, 4)
    for _ in range(4):
        engine.backward(engine(x, 1.0))
        engine.step()
    with pytest.raises(ValueError, match="shape"):
        engine.edit_parameter(engine.module.logit_scale, lambda value: value[None])
    return {"seen": seen}


def _engine_worker(rank, port, out_dir):
    _join_group(rank, port)
    from lucatrain.engine import init_distributed, shutdown

    init_distributed()
    results, path = {}, Path(out_dir) / f"engine-rank{rank}.pt"
    jobs = [((zero, precision), lambda z=zero, p=precision: _clamp_case(z, p, out_dir)) for zero, precision in CASES]
    for key, job in [*jobs, ("boundary", _boundary_case)]:
        try:
            results[key] = job()
        except Exception:
            # The other rank may be stuck in a collective: record, and end the run (see _spawn).
            results[key] = {"error": traceback.format_exc()}
            raise
        finally:
            torch.save(results, path)  # what ran so far, for the parent's per-case report
    shutdown()


@pytest.fixture(scope="module")
def engine_results(tmp_path_factory):
    """Every case on the same two processes (one DeepSpeed start-up); results per rank and case."""
    out = tmp_path_factory.mktemp("engine")
    port = _free_port()
    try:
        _spawn(_engine_worker, (port, str(out)), port, timeout=240)
        failure = None
    except mp.ProcessRaisedException as err:
        failure = str(err)
    results = [torch.load(path) if (path := out / f"engine-rank{r}.pt").exists() else {} for r in range(WORLD)]
    return results, failure


def _case(engine_results, key, rank):
    results, failure = engine_results
    found = results[rank].get(key)
    assert found is not None, f"rank {rank}: {key} did not run; the run ended early:\n{failure}"
    assert "error" not in found, f"rank {rank}, {key}:\n{found['error']}"
    return found


def _expected_after_two_steps(start: float, zero_step_first: bool = False) -> float:
    """Plain AdamW on the scalar: up, clamped to ln(100), then down (the gradient scale does not matter).

    zero_step_first: DeepSpeed's ZeRO-0 bf16/fp16 wrapper (FP16_UnfusedOptimizer) makes the optimizer
    state with one step on zero gradients at start, which shifts Adam's bias correction.
    """
    p = nn.Parameter(torch.tensor([start]))
    opt = torch.optim.AdamW([p], lr=0.1, betas=(0.9, 0.98), eps=1e-8, weight_decay=0.0)
    for grad in ([0.0] if zero_step_first else []) + [-2.0, 2.0]:
        p.grad = torch.tensor([grad])
        opt.step()
        if grad:
            with torch.no_grad():
                p.clamp_(0.0, LN100)
    return float(p.detach())


@pytest.mark.parametrize("zero,precision", CASES)
def test_after_step_clamp_edits_master_and_working_copy(engine_results, zero, precision):
    low = torch.bfloat16 if precision == "bf16" else torch.float32
    ln100 = torch.tensor([LN100])
    for rank in range(WORLD):
        found = _case(engine_results, (zero, precision), rank)
        assert found["dtype"] == low
        assert found["partitioned"] == (zero == "zero3-partitioned")
        unfused = found["optimizer"] == "FP16_UnfusedOptimizer"
        assert unfused == ((zero, precision) == ("zero0", "bf16"))
        # The fp32 master starts from the module's value; the unfused wrapper copies it after the bf16 cast.
        expected = _expected_after_two_steps(found["start"][1].item(), zero_step_first=unfused)
        assert LN100 - 0.006 < expected < LN100 - 0.004  # ~ln(100) - 0.005: Adam's second step
        # Step 1 pushed it to ~ln(100) + 0.099; the hook clamped both copies.
        working, master = found[1]
        torch.testing.assert_close(master, ln100, rtol=0, atol=1e-6, msg=f"rank {rank} master after step 1")
        torch.testing.assert_close(working, ln100.to(low).float(), rtol=0, atol=0, msg=f"rank {rank} working after step 1")
        # Step 2 moved it down from ln(100). Had only the working copy been clamped, the master would
        # have stayed ~0.1 above and been clamped back to ln(100).
        working, master = found[2]
        assert master.item() < LN100 - 0.004, f"rank {rank}: master {master.item()} was not clamped at step 1"
        torch.testing.assert_close(master, torch.tensor([expected]), rtol=0, atol=1e-6, msg=f"rank {rank} master after step 2")
        torch.testing.assert_close(working, master.to(low).float(), rtol=0, atol=0, msg=f"rank {rank} working after step 2")
        # The second hook's write, element by element, in both copies.
        working, master = found["bias1"]
        torch.testing.assert_close(master, torch.tensor(BIAS), rtol=0, atol=0, msg=f"rank {rank} bias master")
        torch.testing.assert_close(working, torch.tensor(BIAS), rtol=0, atol=0, msg=f"rank {rank} bias working")
        # A frozen parameter has only its working copy; the hook adds BIAS at every step.
        torch.testing.assert_close(found["frozen1"], torch.tensor(BIAS), rtol=0, atol=0, msg=f"rank {rank} frozen")
        torch.testing.assert_close(found["frozen2"], 2 * torch.tensor(BIAS), rtol=0, atol=0, msg=f"rank {rank} frozen")


def test_after_step_runs_at_accumulation_boundaries_only(engine_results):
    for rank in range(WORLD):
        assert _case(engine_results, "boundary", rank)["seen"] == [1, 2]  # 4 micro-batches, 2 accumulated per update
