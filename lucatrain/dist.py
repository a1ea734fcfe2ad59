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

