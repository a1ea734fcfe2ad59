"""The contrastive loss (lucatrain/contrastive.py): every gathering mode that claims the global loss gives
the loss and every gradient (towers and logit_scale) of one process holding the whole batch, over two
real processes (gloo) with equal, unequal and empty per-rank batches; modality masks; multi-positive
targets; the pair graph. The global reference is computed here directly, not with the module."""

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import _free_port, join_group, spawn_ranks
from lucatrain.contrastive import ContrastiveLoss, Gathering, nt_xent, pair_graph

MODALITIES = ("image", "dna", "text")
BATCH = 9
SPLITS = [(4, 5), (2, 7), (0, 9)]  # rows per rank; (0, 9): a rank with no rows still takes part
MODES = {
    "gather_with_grad": Gathering(all_gather=True, gather_with_grad=True, local_loss=False),
    "gather_with_grad_local_loss": Gathering(all_gather=True, gather_with_grad=True, local_loss=True),
    "gather_no_grad": Gathering(all_gather=True, gather_with_grad=False, local_loss=False),
    "local_loss_no_grad": Gathering(all_gather=True, gather_with_grad=False, local_loss=True),
    "no_gather": Gathering(all_gather=False),
}


class Towers(nn.Module):
    """One Linear tower per modality into a shared 4-d space, and CLIP's logit scale (shape (1,))."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.towers = nn.ModuleDict({m: nn.Linear(5 + i, 4, dtype=torch.float64) for i, m in enumerate(MODALITIES)})
        self.logit_scale = nn.Parameter(torch.tensor([math.log(1 / 0.07)], dtype=torch.float64))

    def forward(self, inputs):
        return {m: F.normalize(self.towers[m](x), dim=-1) for m, x in inputs.items()}


def batch_of(n):
    g = torch.Generator().manual_seed(11)
    inputs = {m: torch.randn(n, 5 + i, generator=g, dtype=torch.float64) for i, m in enumerate(MODALITIES)}
    present = {"image": torch.tensor([True, False, True, True, True, False, True, True, True])[:n],
               "dna": torch.ones(n, dtype=torch.bool),
               "text": torch.tensor([True, True, True, False, True, True, True, True, True])[:n]}  # fmt: skip
    labels = torch.tensor([0, 1, 0, 2, 1, -1, 3, 0, 2])[:n]
    return inputs, present, labels


def reference(model, inputs, present, labels=None):
    """The global loss written out: per pair, rows with both modalities, symmetric (multi-positive) CE."""
    z = model(inputs)
    scale = model.logit_scale.exp()[0]
    total = 0.0
    pairs = pair_graph(MODALITIES)
    for a, b in pairs:
        both = present[a] & present[b]
        logits = scale * z[a][both] @ z[b][both].T
        if labels is None:
            target = torch.eye(int(both.sum()), dtype=torch.float64)
        else:
            lab = labels[both]
            target = ((lab[:, None] == lab[None, :]) & (lab[:, None] >= 0)).double()
            target = torch.maximum(target, torch.eye(len(lab), dtype=torch.float64))
            target = target / target.sum(1, keepdim=True)
        rows = -(target * logits.log_softmax(1)).sum(1).mean()
        cols = -(target * logits.T.log_softmax(1)).sum(1).mean()
        total = total + (rows + cols) / 2
    return total / len(pairs)


class SimclrEncoder(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(5)
        self.layer = nn.Linear(5, 4, dtype=torch.float64)

    def forward(self, x):
        return F.normalize(self.layer(x), dim=-1)


def _nt_xent_reference(a, b, temperature):
    """NT-Xent of one process holding the whole batch, written out: 2N views, self-similarity masked."""
    z = torch.cat([a, b])
    n = len(a)
    similarity = (z @ z.T / temperature).masked_fill(torch.eye(2 * n, dtype=torch.bool), float("-inf"))
    target = torch.cat([torch.arange(n) + n, torch.arange(n)])
    return F.cross_entropy(similarity, target)


def _nt_xent_with_a_plain_gather(a, b, temperature):
    """The bug class the issue names: other ranks' views gathered without gradient, this rank's own rows
    in place (a GatherLayer whose backward returns only the local gradient, unsummed)."""
    local = torch.cat([a, b])
    sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(2)]
    torch.distributed.all_gather(sizes, torch.tensor([len(local)]))
    longest = int(max(s.item() for s in sizes))
    padded = torch.zeros(longest, local.shape[1], dtype=local.dtype)
    padded[: len(local)] = local.detach()
    boxes = [torch.empty_like(padded) for _ in range(2)]
    torch.distributed.all_gather(boxes, padded)
    rank = torch.distributed.get_rank()
    parts = [box[: int(size.item())] for box, size in zip(boxes, sizes)]
    parts[rank] = local
    everyone = torch.cat(parts)
    start = sum(int(size.item()) for size in sizes[:rank])
    rows = len(a)
    logits = local @ everyone.T / temperature
    own = torch.arange(2 * rows) + start
    mask = torch.zeros_like(logits, dtype=torch.bool)
    mask[torch.arange(2 * rows), own] = True
    logits = logits.masked_fill(mask, float("-inf"))
    partner = torch.cat([own[rows:], own[:rows]])
    return F.cross_entropy(logits, partner, reduction="sum") / len(everyone)


def grads(model):
    return {name: p.grad.detach().clone() for name, p in model.named_parameters()}


def _worker(rank, port, out_dir):
    join_group(rank, port)
    torch.distributed.init_process_group("gloo")
    try:
        results = {}
        for split in SPLITS:
            start, stop = sum(split[:rank]), sum(split[: rank + 1])
            inputs, present, labels = batch_of(sum(split))
            mine = {m: x[start:stop] for m, x in inputs.items()}
            my_present = {m: p[start:stop] for m, p in present.items()}
            for mode_name, mode in MODES.items():
                for multi in (False, True):
                    model = Towers()
                    loss_fn = ContrastiveLoss(pair_graph(MODALITIES), mode)
                    share, report = loss_fn(model(mine), my_present, model.logit_scale, labels[start:stop] if multi else None)
                    share.backward()
                    summed = share.detach().clone()
                    torch.distributed.all_reduce(summed)
                    g = grads(model)
                    for value in g.values():
                        torch.distributed.all_reduce(value)  # what Engine.backward's contract sums
                    results[(split, mode_name, multi)] = {"loss": summed, "grads": g, "report": report}
            for variant in ("nt_xent", "gather_without_gradient_sum"):
                encoder = SimclrEncoder()
                views = [inputs["image"][start:stop], inputs["image"][start:stop].flip(-1)]
                if variant == "nt_xent":
                    share, _ = nt_xent(*(encoder(v) for v in views), 0.5)
                else:
                    share = _nt_xent_with_a_plain_gather(*(encoder(v) for v in views), 0.5)
                share.backward()
                summed = share.detach().clone()
                torch.distributed.all_reduce(summed)
                g = grads(encoder)
                for value in g.values():
                    torch.distributed.all_reduce(value)
                results[(split, variant)] = {"loss": summed, "grads": g}
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("contrastive")
    port = _free_port()
    spawn_ranks(_worker, (port, str(out)), port, timeout=180)
    return [torch.load(out / f"rank{r}.pt") for r in range(2)]


def _global(split, multi):
    inputs, present, labels = batch_of(sum(split))
    model = Towers()
    loss = reference(model, inputs, present, labels if multi else None)
    loss.backward()
    return loss.detach(), grads(model)


@pytest.mark.multiprocess
def test_nt_xent_gives_the_global_loss_and_gradients_at_any_split_and_a_plain_gather_does_not(two_ranks):
    """SimCLR's loss: 2 ranks with (4, 5), (2, 7) and (0, 9) samples give the loss and the gradient of one
    process holding all 9 (2N - 2 = 16 negatives per view); gathering the other ranks' views without
    summing their gradients back gets the loss right and the gradient wrong."""
    for split in SPLITS:
        inputs, _, _ = batch_of(sum(split))
        encoder = SimclrEncoder()
        want_loss = _nt_xent_reference(encoder(inputs["image"]), encoder(inputs["image"].flip(-1)), 0.5)
        want_loss.backward()
        want = grads(encoder)
        for rank, found in enumerate(two_ranks):
            got = found[(split, "nt_xent")]
            torch.testing.assert_close(got["loss"], want_loss.detach(), rtol=0, atol=1e-10, msg=f"{split} rank {rank}")
            for name in want:
                torch.testing.assert_close(got["grads"][name], want[name], rtol=0, atol=1e-10, msg=f"{split} {name}")
            wrong = found[(split, "gather_without_gradient_sum")]
            torch.testing.assert_close(wrong["loss"], want_loss.detach(), rtol=0, atol=1e-10)
            if min(split) > 0:  # with every row on one rank there is nothing to miss
                assert (wrong["grads"]["layer.weight"] - want["layer.weight"]).abs().max() > 1e-3, split


def test_nt_xent_in_one_process_is_the_written_out_loss():
    a, b = (F.normalize(torch.randn(6, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(s)), dim=-1) for s in (1, 2))
    share, value = nt_xent(a, b, 0.1)
    assert share.item() == pytest.approx(_nt_xent_reference(a, b, 0.1).item(), abs=1e-12) and value == pytest.approx(share.item())
    # The positive pairs matter: swapping b's rows changes the loss.
    assert nt_xent(a, b.flip(0), 0.1)[1] != pytest.approx(value)


@pytest.mark.multiprocess
@pytest.mark.parametrize("mode", ["gather_with_grad", "gather_with_grad_local_loss", "gather_no_grad"])
@pytest.mark.parametrize("multi", [False, True], ids=["one_positive", "multi_positive"])
def test_exact_modes_give_the_global_loss_and_gradients(two_ranks, mode, multi):
    assert MODES[mode].exact
    for split in SPLITS:
        want_loss, want = _global(split, multi)
        assert set(want) == {f"towers.{m}.{p}" for m in MODALITIES for p in ("weight", "bias")} | {"logit_scale"}
        for rank, found in enumerate(two_ranks):
            got = found[(split, mode, multi)]
            torch.testing.assert_close(got["loss"], want_loss, rtol=0, atol=1e-10, msg=f"{split} rank {rank}")
            for name in want:
                torch.testing.assert_close(got["grads"][name], want[name], rtol=0, atol=1e-10, msg=f"{split} {name}")
            # The report holds the global per-pair values on every rank.
            assert got["report"]["image_dna/count"].item() == sum(batch_of(sum(split))[1]["image"]).item()


@pytest.mark.multiprocess
def test_local_loss_without_gather_with_grad_has_the_global_value_but_not_its_gradient(two_ranks):
    """open_clip's local_loss without gather_with_grad: each rank scores its rows against constants, so a
    sample's terms as another rank's negative never reach it. Documented as such, not called exact."""
    assert not MODES["local_loss_no_grad"].exact
    split = (4, 5)
    want_loss, want = _global(split, False)
    got = two_ranks[0][(split, "local_loss_no_grad", False)]
    torch.testing.assert_close(got["loss"], want_loss, rtol=0, atol=1e-10)  # the forward is the global loss
    torch.testing.assert_close(got["grads"]["logit_scale"], want["logit_scale"], rtol=0, atol=1e-10)  # in every row term
    assert (got["grads"]["towers.image.weight"] - want["towers.image.weight"]).abs().max() > 1e-3


@pytest.mark.multiprocess
def test_without_all_gather_each_rank_uses_its_own_negatives(two_ranks):
    """all_gather=False: the mean of the ranks' local losses, fewer negatives than the global batch."""
    split = (4, 5)
    inputs, present, _ = batch_of(9)
    model = Towers()
    local = [reference(model, {m: x[a:b] for m, x in inputs.items()}, {m: p[a:b] for m, p in present.items()})
             for a, b in ((0, 4), (4, 9))]  # fmt: skip
    got = two_ranks[0][(split, "no_gather", False)]
    torch.testing.assert_close(got["loss"], (local[0] + local[1]).detach() / 2, rtol=0, atol=1e-10)
    assert abs(float(got["loss"]) - float(_global(split, False)[0])) > 1e-3


def test_in_one_process_every_mode_is_the_global_loss():
    inputs, present, labels = batch_of(BATCH)
    want_loss, want = _global((BATCH,), True)
    for mode in MODES.values():
        model = Towers()
        share, _ = ContrastiveLoss(pair_graph(MODALITIES), mode)(model(inputs), present, model.logit_scale, labels)
        share.backward()
        torch.testing.assert_close(share.detach(), want_loss, rtol=0, atol=1e-12)
        for name, value in grads(model).items():
            torch.testing.assert_close(value, want[name], rtol=0, atol=1e-12)


def test_a_sample_without_an_image_trains_its_other_pairs_as_if_the_image_rows_were_absent():
    """Masks: samples 1 and 5 have no image. The image pairs equal those of the batch without them (their
    image rows hold garbage that must not matter); the dna-text pair still uses all samples with both."""
    inputs, present, _ = batch_of(BATCH)
    loss_fn = ContrastiveLoss([("image", "dna"), ("image", "text"), ("dna", "text")])
    model = Towers()
    z = model(inputs)
    garbage = dict(z, image=torch.where(present["image"][:, None], z["image"], torch.full_like(z["image"], 7.0)))
    _, report = loss_fn(garbage, present, model.logit_scale)
    keep = present["image"]
    _, without = loss_fn({m: v[keep] for m, v in z.items()}, {m: p[keep] for m, p in present.items()}, model.logit_scale)
    for pair in ("image_dna", "image_text"):
        assert report[f"{pair}/loss"] == pytest.approx(float(without[f"{pair}/loss"]), abs=1e-12)
        assert report[f"{pair}/count"] == without[f"{pair}/count"]
    assert report["dna_text/count"] == int((present["dna"] & present["text"]).sum()) == 8


def test_logits_are_fp32_under_bf16_embeddings():
    inputs, present, _ = batch_of(BATCH)
    model = Towers()
    z = {m: v.to(torch.bfloat16) for m, v in model(inputs).items()}
    share, _ = ContrastiveLoss(pair_graph(MODALITIES))(z, present, model.logit_scale.float())
    assert share.dtype == torch.float32


def test_pair_graph():
    assert pair_graph(MODALITIES) == [("image", "dna"), ("image", "text"), ("dna", "text")]
    assert pair_graph(MODALITIES, bind_to="dna") == [("dna", "image"), ("dna", "text")]
    assert pair_graph(MODALITIES, exclude=[("text", "image")]) == [("image", "dna"), ("dna", "text")]
    with pytest.raises(ValueError, match="bind_to 'protein' is not one of the modalities"):
        pair_graph(MODALITIES, bind_to="protein")
    with pytest.raises(ValueError, match=r"exclude: \['audio', 'image'\] is not a pair"):
        pair_graph(MODALITIES, exclude=[("image", "audio")])
    with pytest.raises(ValueError, match="no modality pairs left"):
        pair_graph(["image", "dna"], exclude=[("image", "dna")])


class DropoutTowers(Towers):
    """Towers with dropout, so a re-forward must replay the same masks."""

    def __init__(self):
        super().__init__()
        self.dropout = nn.Dropout(0.3)

    def forward(self, inputs):
        return {m: F.normalize(self.dropout(self.towers[m](x)), dim=-1) for m, x in inputs.items()}


def test_grad_cache_step_equals_the_plain_step(monkeypatch):
    """Loss, every gradient (towers and logit_scale) and the weights after an SGD step equal the plain
    step over the same three micro-batches (each embedded with its graph kept), dropout included."""
    from lucatrain.contrastive import grad_cache_step

    inputs, present, labels = batch_of(BATCH)
    chunks = [{m: x[a:b] for m, x in inputs.items()} for a, b in ((0, 3), (3, 7), (7, 9))]
    loss_fn = ContrastiveLoss(pair_graph(MODALITIES))

    def plain_step():
        model = DropoutTowers()
        torch.manual_seed(5)
        pieces = [model(chunk) for chunk in chunks]
        embedded = {m: torch.cat([p[m] for p in pieces]) for m in MODALITIES}
        loss, _ = loss_fn(embedded, present, model.logit_scale, labels)
        loss.backward()
        return model, loss.detach(), torch.get_rng_state()

    def cached_step():
        model = DropoutTowers()
        torch.manual_seed(5)
        loss, _ = grad_cache_step(model, chunks, lambda z, scale: loss_fn(z, present, scale, labels), model.logit_scale,
                                  lambda surrogate: surrogate.backward())  # fmt: skip
        return model, loss, torch.get_rng_state()

    plain, plain_loss, plain_rng = plain_step()
    cached, cached_loss, cached_rng = cached_step()
    torch.testing.assert_close(cached_loss, plain_loss, rtol=0, atol=1e-12)
    for name, want in grads(plain).items():
        torch.testing.assert_close(grads(cached)[name], want, rtol=0, atol=1e-12, msg=name)
    assert torch.equal(cached_rng, plain_rng)  # later randomness continues as after the plain step
    for model in (plain, cached):
        torch.optim.SGD(model.parameters(), lr=0.5).step()
    for (name, p), q in zip(plain.named_parameters(), cached.parameters()):
        torch.testing.assert_close(q, p, rtol=0, atol=1e-12, msg=name)
    # Not vacuous: without replaying the RNG the dropout masks differ and so do the gradients.
    model = DropoutTowers()
    torch.manual_seed(5)
    monkeypatch.setattr(torch, "set_rng_state", lambda state: None)
    grad_cache_step(model, chunks, lambda z, scale: loss_fn(z, present, scale, labels), model.logit_scale,
                    lambda surrogate: surrogate.backward())  # fmt: skip
    assert (grads(model)["towers.image.weight"] - grads(plain)["towers.image.weight"]).abs().max() > 1e-6
