"""Rank, world size and collectives, safe to call with or without an initialised process group.

Models, tasks and data import this instead of `torch.distributed`, so they run unchanged in a
single plain process (tests, notebooks) and under any launcher.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as torch_dist


def is_initialized() -> bool:
    return torch_dist.is_available() and torch_dist.is_initialized()


def rank() -> int:
    return torch_dist.get_rank() if is_initialized() else 0


def world_size() -> int:
    return torch_dist.get_world_size() if is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if is_initialized():
        torch_dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over ranks, in place, and return it. A no-op in a single process."""
    if is_initialized() and world_size() > 1:
        torch_dist.all_reduce(tensor, op=torch_dist.ReduceOp.SUM)
    return tensor


def all_reduce_dict(values: dict, device: torch.device | str = "cpu") -> dict:
    """Sum a flat dict of numbers and 1-D arrays over ranks, in one collective.

    All ranks must pass the same keys with the same shapes. Numbers come back as floats, arrays
    as float64 numpy arrays.
    """
    if not values:
        return {}
    keys = sorted(values)
    parts = [np.atleast_1d(np.asarray(values[k], dtype=np.float64)) for k in keys]
    packed = torch.from_numpy(np.concatenate(parts)).to(device)
    all_reduce_sum(packed)
    flat = packed.cpu().numpy()
    out, offset = {}, 0
    for key, part in zip(keys, parts):
        chunk = flat[offset : offset + part.size]
        offset += part.size
        out[key] = float(chunk[0]) if np.ndim(values[key]) == 0 else chunk.copy()
    return out


def broadcast_object(obj, src: int = 0):
    """Send a picklable object from `src` to all ranks."""
    if not (is_initialized() and world_size() > 1):
        return obj
    box = [obj]
    torch_dist.broadcast_object_list(box, src=src)
    return box[0]



def broadcast_(tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
    """Overwrite `tensor` in place with rank `src`'s, and return it. A no-op in a single process."""
    if is_initialized() and world_size() > 1:
        torch_dist.broadcast(tensor, src=src)
    return tensor


def _collective_device(like: torch.Tensor | None = None) -> torch.device:
    """Where a small bookkeeping tensor must live for the group's backend (NCCL: the current GPU)."""
    if like is not None:
        return like.device
    if "nccl" in str(torch_dist.get_backend()) and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _all_gather_ints(values: list[int], device: torch.device) -> list[list[int]]:
    """Every rank's list of `len(values)` ints (the same length on every rank), in rank order."""
    mine = torch.tensor(values, dtype=torch.long, device=device)
    boxes = [torch.empty_like(mine) for _ in range(world_size())]
    torch_dist.all_gather(boxes, mine)
    return [box.tolist() for box in boxes]


def all_gather_sizes(n: int, device: torch.device | str | None = None) -> list[int]:
    """Every rank's `n`, in rank order (collective). `[n]` in a single process.

    Typical use: each rank's batch size, before gathering rows whose count differs between ranks
    (a ragged last batch, token-budget batching).
    """
    if not (is_initialized() and world_size() > 1):
        return [int(n)]
    device = torch.device(device) if device is not None else _collective_device()
    return [row[0] for row in _all_gather_ints([int(n)], device)]


class _AllGatherWithGrad(torch.autograd.Function):
    """Forward: concatenate every rank's rows. Backward: sum the gradient over ranks, keep our rows."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        shapes = _all_gather_ints(list(tensor.shape), tensor.device)
        if any(shape[1:] != list(tensor.shape[1:]) for shape in shapes):
            raise ValueError(f"all_gather_with_grad: shapes differ beyond dim 0 between ranks: {shapes}")
        sizes = [shape[0] for shape in shapes]
        longest = max(sizes)
        me = rank()
        ctx.start, ctx.stop = sum(sizes[:me]), sum(sizes[: me + 1])
        if longest == 0:
            return tensor.new_zeros(tensor.shape)
        # gloo's all_gather needs one size on every rank: pad to the longest, trim after.
        padded = tensor.new_zeros((longest, *tensor.shape[1:]))
        padded[: tensor.shape[0]] = tensor
        boxes = [torch.empty_like(padded) for _ in sizes]
        torch_dist.all_gather(boxes, padded)
        return torch.cat([box[:size] for box, size in zip(boxes, sizes)])

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()  # all_reduce is in place; autograd's buffer is not ours
        torch_dist.all_reduce(grad, op=torch_dist.ReduceOp.SUM)
        return grad[ctx.start : ctx.stop]


def all_gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Every rank's `tensor` concatenated along dim 0 in rank order, differentiable (collective).

    For contrastive (CLIP-style) losses with global negatives: each rank scores its own rows
    against the gathered rows of all ranks. Dim-0 sizes may differ between ranks (they are
    exchanged first and the rows padded for the gather, which gloo needs equal-sized); the other
    dims (and their number) must agree. With no process group or a world of one the tensor comes back unchanged.

    The gradient convention: each rank's loss is its share of the global loss (its rows' terms
    divided by the *global* batch size), so the global loss is the sum over ranks. Rank r's rows
    appear in every rank's loss, so d(global loss)/d(rows of r) is the sum over ranks of each
    rank's gradient w.r.t. the gathered tensor, restricted to r's slice: the backward
    all-reduces (SUM) the incoming gradient and returns this rank's slice. Every rank's parameter
    gradient is then exactly that of the global loss through its own rows, and summing parameter
    gradients over ranks (what `Engine.backward` arranges) gives the full-batch gradient.

    The backward is a collective too: every rank must backpropagate through the result (a rank
    with no rows still gathers and backpropagates, with a zero-row tensor).
    """
    if tensor.dim() == 0:
        raise ValueError("all_gather_with_grad: needs a tensor with a dim 0 (rows) to concatenate, got a scalar")
    if not (is_initialized() and world_size() > 1):
        return tensor
    return _AllGatherWithGrad.apply(tensor)
