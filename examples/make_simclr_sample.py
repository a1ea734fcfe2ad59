"""Builds the SimCLR samples from the CLIBD sample (examples/data/clibd_sample.hdf5):

    examples/data/simclr_sample/train/<genus>/<processid>.jpg   the 127 specimens of all_keys
    examples/data/simclr_sample/val/<genus>/<processid>.jpg     the 44 of val_seen and val_unseen
    examples/data/simclr_multispectral/<genus>/<processid>.npy  24 of train as 4-band uint8 stacks (4, 32, 32)

The images are the CLIBD sample's: SYNTHETIC, drawn from the genus (a hue and a stripe angle) plus
per-specimen noise (examples/make_clibd_sample.py). The multispectral stacks add a fourth band, made
up too: the image's blue channel shifted and inverted, standing in for an ultraviolet exposure.
Nothing about either is a real photograph.

    python examples/make_simclr_sample.py
"""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import h5py
import numpy as np
from PIL import Image

DATA = Path(__file__).resolve().parent / "data"


def specimens(hdf5: h5py.File, group: str):
    g = hdf5[group]
    for i in range(len(g["image_mask"])):
        jpeg = bytes(g["image"][i][: int(g["image_mask"][i])])
        yield g["genus"][i].decode(), g["processid"][i].decode(), jpeg


def main() -> None:
    photos, stacks = DATA / "simclr_sample", DATA / "simclr_multispectral"
    for folder in (photos, stacks):
        shutil.rmtree(folder, ignore_errors=True)
    with h5py.File(DATA / "clibd_sample.hdf5", "r") as hdf5:
        for split, groups in (("train", ["all_keys"]), ("val", ["val_seen", "val_unseen"])):
            for group in groups:
                for genus, processid, jpeg in specimens(hdf5, group):
                    out = photos / split / genus.replace(" ", "_") / f"{processid}.jpg"
                    out.parent.mkdir(parents=True, exist_ok=True)
                    out.write_bytes(jpeg)
        for n, (genus, processid, jpeg) in enumerate(specimens(hdf5, "all_keys")):
            if n % 5:
                continue
            rgb = np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB").resize((32, 32), Image.BILINEAR))
            uv = 255 - np.roll(rgb[:, :, 2], 3, axis=1)
            stack = np.concatenate([rgb.transpose(2, 0, 1), uv[None]]).astype(np.uint8)
            out = stacks / genus.replace(" ", "_") / f"{processid}.npy"
            out.parent.mkdir(parents=True, exist_ok=True)
            np.save(out, stack)


if __name__ == "__main__":
    main()
