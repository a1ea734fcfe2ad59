"""Build examples/data/clibd_sample.hdf5: a small multimodal sample in CLIBD's HDF5 layout.

    python examples/make_clibd_sample.py            # rewrites examples/data/clibd_sample.hdf5

What it holds, and what is real:
- DNA: real rRNA genes (examples/data/rrna_genes.fasta, NCBI's Combined16SrRNA via Debian's
  ncbi-rrna-data), the first 660 nt of each, standing in for COI barcodes.
- Taxonomy: the genus and species of each record's organism name (first word; first two words).
  Order and family are not in the FASTA headers: they are `not_classified`, as CLIBD writes an
  unknown rank.
- Images: **synthetic**. No real specimen photographs can be had offline here, so each image is drawn
  from its genus (a hue and a stripe angle per genus) plus per-specimen noise, shift and brightness:
  a stand-in that lets the image tower learn something genus-specific. Nothing about it is real.
- Splits, as in BIOSCAN-5M: genera with at least 6 named records; 9 of them are "seen" (training
  `no_split_and_seen_train` = `seen_keys`, plus 2 held-out specimens each in `val_seen`), the others
  "unseen" (half in `val_unseen`, half in `unseen_keys`); `all_keys` = seen_keys + unseen_keys.
"""

from __future__ import annotations

import colorsys
import hashlib
import io
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lucatrain.data.clibd_hdf5 import write_clibd_hdf5  # noqa: E402
from lucatrain.data.sources import Record, iter_records  # noqa: E402

FASTA = REPO / "examples" / "data" / "rrna_genes.fasta"
OUT = REPO / "examples" / "data" / "clibd_sample.hdf5"
UNNAMED = ("uncultured", "unidentified", "bacterium", "marine", "candidatus", "human", "rumen", "environmental", "alpha")
MIN_RECORDS, SEEN_GENERA, SIZE = 6, 9, 64


def organism(header_line: str) -> str:
    return header_line.split(" [R=")[0].split(" ", 1)[1] if " " in header_line else ""


def named_records():
    """(genus, species, id, sequence) of the FASTA records whose organism has a genus and species name."""
    headers = {}
    with open(FASTA, encoding="utf-8") as f:
        for line in f:
            if line.startswith(">"):
                headers[line[1:].split()[0]] = line[1:].strip()
    for record in iter_records(FASTA):
        if not isinstance(record, Record):
            continue
        words = organism(headers[record.obj_id]).split()
        if len(words) < 2 or words[0].lower() in UNNAMED or not words[0][0].isupper() or words[1] in ("sp.", "sp"):
            continue
        yield words[0], f"{words[0]} {words[1]}", record.obj_id, record.seq[:660]


def genus_image(genus: str, rng: np.random.Generator) -> bytes:
    digest = hashlib.blake2b(genus.encode(), digest_size=4).digest()
    hue, angle = digest[0] / 255, np.deg2rad(digest[1] / 255 * 180)
    colour = np.array(colorsys.hsv_to_rgb(hue, 0.8, 0.9)) * 255
    y, x = np.mgrid[0:SIZE, 0:SIZE]
    shift = rng.uniform(0, 2 * np.pi)
    stripes = 0.5 + 0.5 * np.sin((x * np.cos(angle) + y * np.sin(angle)) / 4 + shift)
    pixels = stripes[..., None] * colour * rng.uniform(0.7, 1.0) + rng.normal(0, 20, size=(SIZE, SIZE, 3))
    out = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(out, format="JPEG", quality=90)
    return out.getvalue()


def main() -> None:
    rng = np.random.default_rng(2024)
    by_genus = defaultdict(list)
    for genus, species, obj_id, seq in named_records():
        by_genus[genus].append((species, obj_id, seq))
    genera = sorted(g for g, items in by_genus.items() if len(items) >= MIN_RECORDS)
    order = rng.permutation(len(genera))
    seen = [genera[i] for i in order[:SEEN_GENERA]]
    groups = {name: [] for name in ("no_split_and_seen_train", "val_seen", "val_unseen", "seen_keys", "unseen_keys")}

    for genus in genera:
        items = [by_genus[genus][i] for i in rng.permutation(len(by_genus[genus]))]
        rows = [{"processid": "LUCA" + hashlib.blake2b(obj_id.encode(), digest_size=5).hexdigest().upper(), "sampleid": obj_id, "barcode": seq,
                 "taxonomy": {"order": "not_classified", "family": "not_classified", "genus": genus, "species": species},
                 "image": genus_image(genus, rng)} for species, obj_id, seq in items]  # fmt: skip
        if genus in seen:
            groups["val_seen"] += rows[:2]
            groups["no_split_and_seen_train"] += rows[2:]
            groups["seen_keys"] += rows[2:]
        else:
            half = len(rows) // 2
            groups["val_unseen"] += rows[:half]
            groups["unseen_keys"] += rows[half:]
    groups["all_keys"] = groups["seen_keys"] + groups["unseen_keys"]
    write_clibd_hdf5(OUT, groups)
    print(f"{OUT}: {len(genera)} genera ({len(seen)} seen), " + ", ".join(f"{k} {len(v)}" for k, v in groups.items()))


if __name__ == "__main__":
    main()
