"""SimCLR's inputs: image folders, tables of image paths, multispectral stacks -> rows -> pairs of views.

Inputs (`data.train_files`, `data.dev_splits`):
- a folder of images, recursively (.jpg .jpeg .png .bmp .webp, multi-page .tif/.tiff and .npy
  stacks); with class sub-folders (`<class>/<...>/<image>`) the first folder below the input is the
  image's label, as torchvision's ImageFolder;
- a table (CSV/TSV/Parquet) with a `path` column (relative to the table's folder, or absolute) and an
  optional `label` column.

Each image is one sample; its id is its path relative to the input folder (or as the table gives
it), so sample ids, and with them the ledger, do not depend on where the data lies. An image that
does not open, has a shape that is not an image, or another channel count than the rest is a bad
record (`data.bad_records`), named by its path. Every image of a run has the same number of channels
(meta.json `channels`): that is the backbone's `in_chans`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from lucatrain.data import alphabet
from lucatrain.data.images import view_rng
from lucatrain.data.schema import Column, PrepareRecipe, Schema
from lucatrain.data.simclr_views import SimclrAugment, load_image
from lucatrain.data.sources import Record, RecordError
from lucatrain.task import EVAL_EPOCH

SIMCLR_SCHEMA = Schema((
    Column("image_id", "string"), Column("image_path", "string"), Column("label", "string"),
    Column("channels", "int32"), Column("height", "int32"), Column("width", "int32"),
))  # fmt: skip
COLUMNS = ("sample_id", "image_id", "image_path", "label", "channels")
NO_LABEL = -1


class SimclrRecipe(PrepareRecipe):
    name = "simclr"
    schema = SIMCLR_SCHEMA
    formats = ("image", "image_table")

    def __init__(self, inputs: list[str]):
        # The folders the inputs name: an image's id and label are its path below the one that holds it.
        self.roots = sorted({Path(p).resolve() for p in inputs if Path(p).is_dir()}, key=lambda p: -len(p.parts))

    def fingerprint_options(self) -> dict:
        return {"recipe": self.name, "layout": 1}

    def read(self, path, fmt: str, fasta_obj_type: str):
        path = Path(path)
        if fmt == "image_table":
            yield from self._read_table(path)
            return
        relative = self._relative(path)
        label = relative.parts[0] if len(relative.parts) > 1 else ""
        yield self._record(path, relative.as_posix(), label, source=path, line=1, index=0)

    def _relative(self, image: Path) -> Path:
        resolved = image.resolve()
        for root in self.roots:
            if resolved.is_relative_to(root):
                return resolved.relative_to(root)
        return Path(image.name)

    def _read_table(self, table: Path):
        import pyarrow.csv as pacsv
        import pyarrow.parquet as pq

        if table.name.lower().endswith(".parquet"):
            columns = pq.read_table(table).to_pydict()
        else:
            delimiter = "\t" if table.name.lower().endswith(".tsv") else ","
            options = pacsv.ConvertOptions(column_types={"path": "string", "label": "string"}, strings_can_be_null=True)
            columns = pacsv.read_csv(table, parse_options=pacsv.ParseOptions(delimiter=delimiter), convert_options=options).to_pydict()
        labels = columns.get("label")
        for index, given in enumerate(columns["path"]):
            line = index + 2  # the header is line 1
            if not given or not given.strip():
                yield RecordError(table, line, "empty path")
                continue
            image = Path(given.strip())
            image = image if image.is_absolute() else table.parent / image
            label = (labels[index] or "").strip() if labels is not None else ""
            yield self._record(image, given.strip(), label, source=table, line=line, index=index)

    def _record(self, image: Path, image_id: str, label: str, source: Path, line: int, index: int):
        if not image.is_file():
            return RecordError(source, line, f"image {image} not found")
        try:
            channels, height, width = image_shape(image)
        except (OSError, ValueError, SyntaxError) as err:
            return RecordError(source, line, f"image {image} does not open: {err}")
        extra = {"image_path": str(image.resolve()), "label": label, "channels": channels, "height": height, "width": width}
        return Record(image_id, alphabet.GENE, "", "{}", str(source), line, index, extra)

    def start(self) -> None:
        self.channels: tuple[int, str] | None = None  # (count, the first image that had it)
        self.labels: set[str] = set()

    def row(self, record) -> dict:
        extra = record.extra
        if self.channels is None:
            self.channels = (extra["channels"], record.obj_id)
        elif extra["channels"] != self.channels[0]:
            raise ValueError(f"{record.obj_id}: {extra['channels']} channels; the images of one dataset must all have the "
                             f"same number ({self.channels[1]} has {self.channels[0]})")  # fmt: skip
        if extra["label"]:
            self.labels.add(extra["label"])
        return {"image_id": record.obj_id, "image_path": extra["image_path"], "label": extra["label"], "channels": extra["channels"],
                "height": extra["height"], "width": extra["width"]}  # fmt: skip

    def length(self, record) -> int:
        return 1  # one image: "tokens" are images in the throughput logs

    def meta(self) -> dict:
        channels, first = self.channels if self.channels else (0, "")
        return {"channels": channels, "channels_of": first, "labels": sorted(self.labels)}

    def merge_meta(self, parts: list[dict]) -> dict:
        """One channel count for the dataset; a shard's first image stands for its shard in the error."""
        with_images = [part for part in parts if part["channels"]]
        for part in with_images[1:]:
            if part["channels"] != with_images[0]["channels"]:
                raise ValueError(f"{part['channels_of']}: {part['channels']} channels; the images of one dataset must all have "
                                 f"the same number ({with_images[0]['channels_of']} has {with_images[0]['channels']})")  # fmt: skip
        first = with_images[0] if with_images else {"channels": 0, "channels_of": ""}
        return {"channels": first["channels"], "channels_of": first["channels_of"],
                "labels": sorted({label for part in parts for label in part["labels"]})}  # fmt: skip


def image_shape(path: Path) -> tuple[int, int, int]:
    """(channels, height, width) of an image file, checked to open (photographs: Pillow's verify;
    stacks: read whole, as training will)."""
    suffix = path.suffix.lower()
    if suffix in (".npy", ".tif", ".tiff"):
        tensor = load_image(path)
        return tuple(int(n) for n in tensor.shape)
    from PIL import Image

    with Image.open(path) as opened:
        width, height = opened.size
        channels = 1 if opened.mode in ("1", "L", "I;16", "I") else 3
        opened.verify()
    return channels, height, width


@dataclass
class SimclrCollator:
    """rows -> {"view_a", "view_b"} (training), plus {"plain", "label_ids"} for evaluation batches."""

    augment: SimclrAugment
    seed: int
    channels: int
    labels: dict[str, int] = field(default_factory=dict)

    def __call__(self, rows: dict, epoch: int) -> dict[str, torch.Tensor]:
        ids = np.asarray(rows["sample_id"], dtype=np.int64)
        views = {"view_a": [], "view_b": []}
        plain = []
        for sample_id, path in zip(ids, rows["image_path"]):
            image = load_image(path, self.channels)
            for view, name in enumerate(views):
                views[name].append(self.augment(image, view_rng(self.seed, epoch, sample_id, view)))
            if epoch == EVAL_EPOCH:
                plain.append(self.augment.eval_view(image))
        out = {"sample_ids": torch.from_numpy(ids), **{name: torch.stack(v) for name, v in views.items()}}
        if epoch == EVAL_EPOCH:
            out["plain"] = torch.stack(plain)
            out["label_ids"] = torch.tensor([self.labels.get(label, NO_LABEL) if label else NO_LABEL for label in rows["label"]],
                                            dtype=torch.int64)  # fmt: skip
        return out
