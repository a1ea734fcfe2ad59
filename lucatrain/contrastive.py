"""Symmetric InfoNCE (CLIP) over a graph of modality pairs, exact at any world size.

    loss_fn = ContrastiveLoss(pair_graph(["image", "dna", "text"]), Gathering(all_gather=True, gather_with_grad=True))
    share, report = loss_fn(embeddings, present, logit_scale)      # on every rank, every micro-batch

`embeddings[m]` is this rank's (B_local, D) batch of L2-normalised embeddings of modality `m`;
`present[m]` (B_local,) bool says which samples have that modality (rows of absent samples are
ignored, whatever they hold). For a pair (a, b) only the samples with both take part: their logits
are `exp(logit_scale) * a @ b.T` in fp32, and the pair's loss is the mean of the cross entropy of
each row against its own column (a -> b) and of each column against its own row (b -> a), over
those samples. The loss is the mean over the pairs. With `labels` (multi-positive), samples that
share a label (species, BIN) are all positives of one another, the target row normalised to sum 1.

What every rank returns is its **share**: the shares of all ranks sum, in value and in gradient
(every parameter and `logit_scale`), to the loss of the whole global batch as one process would
compute it, which is the contract of `Engine.backward` (it sums gradients over ranks). Batches may
differ in size between ranks (sizes are exchanged, each rank's rows sit at its prefix-sum offset).

Gathering, with open_clip's meaning of the three switches:

    all_gather  gather_with_grad  local_loss   negatives   share of rank r                 exact
    False       -                 -            local only  its local loss / world size     no: fewer negatives (the mean of the ranks' local losses)
    True        True              False        global      global loss / world size        yes
    True        True              True         global      its rows' terms of the global    yes (open_clip's cheapest exact mode:
                                                           loss                            a B_local x N block per rank)
    True        False             False        global      global loss, gradient through   yes (other ranks' rows enter without
                                                           its own rows only               gradient; each rank's own rows carry it)
    True        False             True         global      its rows' terms                 value yes; gradient no: a sample's
                                                                                           terms as another rank's negative
                                                                                           never reach it
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lucatrain import dist
from lucatrain.callbacks import StepCallback

LOGIT_SCALE_INIT = math.log(1 / 0.07)  # CLIP's temperature 0.07
LOGIT_SCALE_MAX = math.log(100.0)  # CLIP clamps exp(logit_scale) to 100


@dataclass(frozen=True)
class Gathering:
    """How embeddings of other ranks take part (module docstring)."""

    all_gather: bool = True
    gather_with_grad: bool = True
    local_loss: bool = False

    @property
    def exact(self) -> bool:
        """Whether loss and gradients equal those of the whole global batch in one process."""
        return self.all_gather and (self.gather_with_grad or not self.local_loss)


def pair_graph(modalities, bind_to: str | None = None, exclude=()) -> list[tuple[str, str]]:
    """The modality pairs a loss aligns: every pair (in the given order), or with `bind_to` only the
    pairs with that anchor; `exclude` drops pairs in either order (e.g. [("image", "text")])."""
    modalities = list(modalities)
    if len(set(modalities)) != len(modalities):
        raise ValueError(f"modalities must be distinct, got {modalities}")
    if bind_to is not None and bind_to not in modalities:
        raise ValueError(f"bind_to {bind_to!r} is not one of the modalities {modalities}")
    dropped = {frozenset(pair) for pair in exclude}
    for pair in dropped:
        unknown = sorted(set(pair) - set(modalities))
        if unknown or len(pair) != 2:
            raise ValueError(f"exclude: {sorted(pair)} is not a pair of the modalities {modalities}")
    pairs = []
    for a, b in itertools.combinations(modalities, 2):
        if bind_to is not None and bind_to not in (a, b):
            continue
        if frozenset((a, b)) in dropped:
            continue
        pairs.append((bind_to, b if a == bind_to else a) if bind_to is not None else (a, b))
    if not pairs:
        raise ValueError(f"no modality pairs left to align (modalities {modalities}, bind_to {bind_to}, exclude {list(exclude)})")
    return pairs


class ContrastiveLoss:
    """`share, report = loss(embeddings, present, logit_scale, labels=None)` (module docstring).

    report: per pair `<a>_<b>/loss`, the pair's loss over the global batch (the same on every rank),
    and `<a>_<b>/count`, the samples that had both modalities, both detached.
    """

    def __init__(self, pairs: list[tuple[str, str]], gathering: Gathering = Gathering()):
        if not pairs:
            raise ValueError("ContrastiveLoss needs at least one modality pair")
        self.pairs = [tuple(pair) for pair in pairs]
        self.gathering = gathering

    def __call__(self, embeddings: dict[str, torch.Tensor], present: dict[str, torch.Tensor], logit_scale: torch.Tensor,
                 labels: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:  # fmt: skip
        g = self.gathering
        gather = g.all_gather and dist.is_initialized() and dist.world_size() > 1
        world = dist.world_size() if gather else 1
        modalities = sorted({m for pair in self.pairs for m in pair})
        local_rows = embeddings[modalities[0]].shape[0]
        if gather:
            sizes = dist.all_gather_sizes(local_rows, embeddings[modalities[0]].device)
            start = sum(sizes[: dist.rank()])
            everyone = {m: self._gather(_wide(embeddings[m]), start) for m in modalities}
            everyone_present = {m: dist.all_gather_with_grad(present[m].to(torch.int64)).bool() for m in modalities}
            every_label = dist.all_gather_with_grad(labels) if labels is not None else None
        else:
            start = 0
            everyone = {m: _wide(embeddings[m]) for m in modalities}
            everyone_present = {m: present[m].bool() for m in modalities}
            every_label = labels
        mine = torch.zeros(everyone_present[modalities[0]].shape[0], dtype=torch.bool, device=logit_scale.device)
        mine[start : start + local_rows] = True

        scale = _wide(logit_scale).exp().reshape(())
        if gather and not g.gather_with_grad and not g.local_loss:
            # Each rank computes the whole loss but its gradient only reaches its own rows, so summed over
            # ranks the embeddings get the full gradient; logit_scale is in every rank's whole loss, so its
            # gradient is taken 1/world per rank (the value stays exp(logit_scale)).
            scale = scale / world + (scale - scale / world).detach()

        # A graph-connected zero: every tower and logit_scale get a gradient (0) even when no pair has a sample.
        share = (sum(e.sum() for e in everyone.values()) + scale) * 0.0
        report: dict[str, torch.Tensor] = {}
        for a, b in self.pairs:
            both = everyone_present[a] & everyone_present[b]
            count = int(both.sum())
            name = f"{a}_{b}"
            report[f"{name}/count"] = torch.tensor(float(count))
            if count == 0:
                report[f"{name}/loss"] = torch.tensor(0.0)
                continue
            ea, eb = everyone[a][both], everyone[b][both]
            labels_both = every_label[both] if every_label is not None else None
            if g.local_loss and gather:
                rows = torch.nonzero(mine[both]).flatten()  # this rank's samples among those with both modalities
                pair_sum = _cross_entropy(scale * ea[rows] @ eb.T, rows, labels_both).sum() + \
                    _cross_entropy(scale * eb[rows] @ ea.T, rows, labels_both).sum()  # fmt: skip
                pair_share = pair_sum / (2 * count)
                value = dist.all_reduce_dict({"v": float(pair_share.detach())}, pair_share.device)["v"]
            else:
                logits = scale * ea @ eb.T
                every_row = torch.arange(count, device=ea.device)
                pair_loss = (_cross_entropy(logits, every_row, labels_both).mean() + _cross_entropy(logits.T, every_row, labels_both).mean()) / 2
                value = float(pair_loss.detach())
                if not gather:
                    pair_share = pair_loss / dist.world_size()  # local negatives: the mean of the ranks' losses
                elif g.gather_with_grad:
                    pair_share = pair_loss / world
                else:  # value: 1/world of the loss; gradient: the whole loss through this rank's own rows
                    pair_share = pair_loss - (pair_loss - pair_loss / world).detach()
            share = share + pair_share / len(self.pairs)
            report[f"{name}/loss"] = torch.tensor(value)
        return share, report

    def _gather(self, local: torch.Tensor, start: int) -> torch.Tensor:
        if self.gathering.gather_with_grad:
            return dist.all_gather_with_grad(local)
        # open_clip without gather_with_grad: the other ranks' rows as constants, this rank's rows as its own
        # (differentiable) tensor, in rank order.
        gathered = dist.all_gather_with_grad(local.detach())
        return torch.cat([gathered[:start], local, gathered[start + local.shape[0]:]])


def _wide(tensor: torch.Tensor) -> torch.Tensor:
    """fp16/bf16 -> fp32 (logits and softmax in low precision lose the small differences InfoNCE learns from)."""
    return tensor.float() if tensor.dtype in (torch.float16, torch.bfloat16) else tensor


def _cross_entropy(logits: torch.Tensor, rows: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
    """Per-row cross entropy of `logits` (R, C), row i's positive being column `rows[i]`; with `labels`
    (C,), every column that shares row i's label (>= 0) is a positive too, the target row summing to 1.
    One positive needs no (R, C) target matrix: the logits and their softmax are all the memory."""
    if labels is None:
        return F.cross_entropy(logits, rows, reduction="none")
    own = labels[rows]
    same = (own[:, None] == labels[None, :]) & (own[:, None] >= 0)
    same[torch.arange(len(rows), device=logits.device), rows] = True
    targets = same.to(logits.dtype)
    return _soft_cross_entropy(logits, targets / targets.sum(dim=1, keepdim=True))


def _soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-row cross entropy against a target distribution (one-hot targets: the usual cross entropy)."""
    return -(targets * F.log_softmax(logits, dim=1)).sum(dim=1)


def nt_xent(view_a: torch.Tensor, view_b: torch.Tensor, temperature: float, gather: bool = True) -> tuple[torch.Tensor, float]:
    """SimCLR's NT-Xent over the global batch: (this rank's share, the global loss's value).

    `view_a`, `view_b`: (B_r, D) L2-normalised embeddings of two views of this rank's B_r samples.
    Every rank's views are gathered with their gradient (batches may differ in size), so the global
    batch of N samples holds 2N views: each view's positive is the other view of its sample, its
    negatives the other 2N - 2 views, its logits cosine / temperature in fp32. The loss is the mean of
    the 2N cross entropies; a rank's share is its own views' terms / 2N, so the shares sum, in value and
    in every gradient, to the loss one process holding the whole batch computes. (Gathering without
    summing the gradient that other ranks' losses send back to a rank's views, as a plain all_gather
    or a GatherLayer that returns only its own slice does, gives gradients that depend on the world size.)
    `gather` False: this rank's views alone (its own loss, no collective).
    """
    rows = view_a.shape[0]
    local = torch.cat([_wide(view_a), _wide(view_b)])  # (2B_r, D): this rank's a views, then its b views
    gathering = gather and dist.is_initialized() and dist.world_size() > 1
    if gathering:
        start = sum(dist.all_gather_sizes(2 * rows, local.device)[: dist.rank()])
        everyone = dist.all_gather_with_grad(local)
    else:
        start, everyone = 0, local
    views = everyone.shape[0]  # 2N
    logits = local @ everyone.T / temperature
    own = torch.arange(2 * rows, device=local.device) + start
    itself = torch.zeros_like(logits, dtype=torch.bool)
    itself[torch.arange(2 * rows, device=local.device), own] = True
    logits = logits.masked_fill(itself, float("-inf"))  # a view is not its own negative
    partner = torch.cat([own[rows:], own[:rows]])  # a_i <-> b_i, both inside this rank's block
    share = F.cross_entropy(logits, partner, reduction="sum") / max(views, 1)
    value = dist.all_reduce_dict({"loss": float(share.detach())}, local.device)["loss"] if gathering else float(share.detach())
    return share, value


class LogitScaleClamp(StepCallback):
    """After every optimizer step: `logit_scale` (a parameter of the Task, by name) clamped to
    [low, high], in DeepSpeed's fp32 master copy and the working copy alike (`Engine.edit_parameter`),
    so the temperature never leaves CLIP's range (exp(logit_scale) <= 100)."""

    name = "logit_scale_clamp"

    def __init__(self, parameter_name: str = "logit_scale", low: float = 0.0, high: float = LOGIT_SCALE_MAX):
        self.parameter_name, self.low, self.high = parameter_name, low, high

    def after_step(self, engine) -> None:
        param = engine.module.get_parameter(self.parameter_name)
        if param.requires_grad:  # fix_temperature: nothing moves it
            engine.edit_parameter(param, lambda value: value.clamp(self.low, self.high))


# ---------------------------------------------------------------------------------------------
# GradCache: a contrastive step over more samples than fit in memory at once


def grad_cache_step(encode, chunks: list, loss_of, logit_scale: torch.Tensor, backward) -> tuple[torch.Tensor, dict]:
    """One contrastive step over `chunks` (this rank's micro-batches) whose activations need not fit
    in memory together (GradCache, Gao et al. 2021), with the loss and gradients of the plain step.

    encode(chunk) -> {modality: (rows, D) embeddings}; loss_of(embeddings, logit_scale) -> (share,
    report) over all chunks' rows (e.g. a `ContrastiveLoss`, gathering across ranks); backward(tensor)
    backpropagates one chunk (`Engine.backward`, or `tensor.backward()`).

    1. Every chunk is embedded without a graph; torch's RNG state is noted before each chunk.
    2. The loss over all embeddings gives its gradient with respect to each embedding and to
       logit_scale, without touching any parameter.
    3. Each chunk is embedded again from its noted RNG state (the same dropout masks), and the
       surrogate  sum(embedding * its gradient)  is backpropagated: by the chain rule this puts exactly
       the plain step's gradient into the towers, one chunk's activations at a time. logit_scale's
       gradient is added with the first chunk's surrogate.
    Returns the loss share and the report (detached). Only embeddings (rows x D) are kept for the
    whole batch, so the batch can grow far past what the towers' activations allow.
    """
    states, pieces = [], []
    with torch.no_grad():
        for chunk in chunks:
            states.append(_rng_state())
            pieces.append(encode(chunk))
    after = _rng_state()
    modalities = sorted(pieces[0])
    sizes = [next(iter(piece.values())).shape[0] for piece in pieces]
    cached = {m: torch.cat([piece[m] for piece in pieces]).detach().requires_grad_(True) for m in modalities}
    scale = logit_scale.detach().clone().requires_grad_(logit_scale.requires_grad)
    share, report = loss_of(cached, scale)
    wanted = [cached[m] for m in modalities] + ([scale] if scale.requires_grad else [])
    gradients = torch.autograd.grad(share, wanted)
    embedding_grads = {m: g.split(sizes) for m, g in zip(modalities, gradients)}
    for i, chunk in enumerate(chunks):
        _set_rng_state(states[i])
        embedded = encode(chunk)
        surrogate = sum((embedded[m] * embedding_grads[m][i].to(embedded[m].dtype)).sum() for m in modalities)
        if i == 0 and scale.requires_grad:
            surrogate = surrogate + (logit_scale * gradients[-1]).sum()
        backward(surrogate)
    _set_rng_state(after)  # as after the plain step: its draws were the first pass's
    return share.detach(), report


def _rng_state():
    """torch's CPU generator state and, on GPUs, every device's (dropout draws from the device's)."""
    return torch.get_rng_state(), torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None


def _set_rng_state(state) -> None:
    cpu, devices = state
    torch.set_rng_state(cpu)
    if devices is not None:
        torch.cuda.set_rng_state_all(devices)
