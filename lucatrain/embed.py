"""Per-sequence embeddings from a trained encoder, for downstream use.

    from lucatrain.embed import embed_file
    ids, vectors = embed_file("runs/demo/best", "proteins.fasta", pooling="mean")   # (N, H) float32
    ids, vectors = embed_file("lucaone/checkpoint-step36000000", "proteins.fasta")  # a LucaOne checkpoint

Records are read with the same readers as training (FASTA, LucaOne CSV, Swiss-Prot, Parquet,
JSONL), tokenized and padded by the same Collator (no masking), and run through the encoder in
batches sorted by length so little padding is computed; results come back in file order.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from lucatrain.data.collate import Collator
from lucatrain.data.sources import RecordError, iter_records
from lucatrain.models.encoder import load_encoder
from lucatrain.models.lucagplm import LucaGPLM

POOLINGS = ("cls", "mean")


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """(B, L, H) hidden states -> (B, H): the [CLS] vector, or the mean over residues (no CLS/SEP/PAD)."""
    if pooling == "cls":
        return hidden[:, 0]
    if pooling != "mean":
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    lengths = attention_mask.sum(dim=1)  # (B,) tokens including CLS and SEP
    positions = torch.arange(hidden.shape[1], device=hidden.device)[None, :]
    residues = (positions >= 1) & (positions < (lengths - 1)[:, None])  # (B, L)
    weights = residues.to(hidden.dtype).unsqueeze(-1)
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)


@torch.no_grad()
def embed_records(
    model: LucaGPLM,
    seqs: list[str],
    obj_types: list[int],
    *,
    pooling: str = "cls",
    batch_size: int = 16,
    max_length: int = 1026,
    truncation: str = "right",
    device: str | torch.device | None = None,
) -> np.ndarray:
    """(N, H) float32 embeddings of `seqs`, in the given order."""
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = model.to(device).eval()
    collator = Collator(max_length, truncation, masking=None)
    order = np.argsort([len(s) for s in seqs], kind="stable")  # similar lengths share a batch
    out = np.zeros((len(seqs), model.config.hidden_size), dtype=np.float32)
    for start in range(0, len(order), batch_size):
        chosen = order[start : start + batch_size]
        rows = {"seq": [seqs[i] for i in chosen], "obj_type": [obj_types[i] for i in chosen], "sample_id": chosen.tolist()}
        batch = {k: v.to(device) for k, v in collator(rows, epoch=0).items()}
        hidden = model(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"])
        out[chosen] = pool(hidden, batch["attention_mask"], pooling).float().cpu().numpy()
    return out


def embed_file(
    model_dir: str | Path, path: str | Path, *, fmt: str = "auto", fasta_obj_type: str = "auto", **kwargs
) -> tuple[list[str], np.ndarray]:
    """(record ids, (N, H) embeddings) for every record of `path`; a bad record raises naming its line.

    model_dir: a lucatrain export (a run's best/ or last/) or a LucaOne/LucaVirus checkpoint-step<N>/."""
    model, _ = load_encoder(model_dir)
    ids, seqs, types = [], [], []
    for record in iter_records(path, fmt=fmt, fasta_obj_type=fasta_obj_type):
        if isinstance(record, RecordError):
            raise record
        ids.append(record.obj_id)
        seqs.append(record.seq)
        types.append(record.obj_type)
    if not seqs:
        raise ValueError(f"{path}: no records to embed")
    return ids, embed_records(model, seqs, types, **kwargs)
