"""CLIBD data: one HDF5 group (or the splits of a BIOSCAN-5M metadata table) per prepared split, and
the collator that reads images lazily.

Prepare stores, per specimen, everything but the image: its id, HDF5 group and row (or its image
file), the barcode and the four ranks (the JPEG stays where it is; copying BIOSCAN-5M's images would
double its size). Each row is checked once (ids, barcode, an image that decodes, taxonomy), so a bad
specimen is refused or skipped under `data.bad_records` before any compute, named by file and group
and index (HDF5) or file and line (tables). The training split's words (of the four ranks) become the
text vocabulary in meta.json.

The collator turns rows into tensors; every random choice (the image view) comes from (seed, epoch,
sample id), and the JPEG is read through a per-process handle, so DataLoader workers, resumes and
GradCache re-forwards all see the same batch.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from lucatrain.data import alphabet
from lucatrain.data.barcode import kmer_tokens
from lucatrain.data.clibd_hdf5 import RANKS, ClibdHdf5
from lucatrain.data.images import decode, eval_view, train_view, view_rng
from lucatrain.data.schema import Column, PrepareRecipe, Schema
from lucatrain.data.sources import Record, RecordError
from lucatrain.task import EVAL_EPOCH

BARCODE_LETTERS = set(alphabet.GENE_LETTERS + "-")  # BIOSCAN barcodes hold IUPAC codes and gaps
TEXT_SPECIALS = ("[PAD]", "[UNK]", "[CLS]")
PAD, UNK, CLS = 0, 1, 2
NOT_CLASSIFIED = "not_classified"
SENTENCEPIECE = "sentencepiece"  # `clibd.text_tokenizer`: a model trained at start-up on the training texts

CLIBD_SCHEMA = Schema((
    Column("specimen_id", "string"), Column("group", "string"), Column("index", "int"),
    Column("barcode", "large_string"), *(Column(rank, "string") for rank in RANKS), Column("image_path", "string"),
    Column("has_image", "bool"),
))  # fmt: skip
COLUMNS = ("sample_id", "group", "index", "barcode", *RANKS, "image_path", "has_image")

# BIOSCAN-5M's `split` values that make up each of CLIBD's groups (its HDF5 writer's grouping).
SPLITS_OF_GROUP = {
    "no_split_and_seen_train": ("pretrain", "train"), "seen_keys": ("train",), "unseen_keys": ("key_unseen",),
    "all_keys": ("key_unseen", "train"), "val_seen": ("val",), "test_seen": ("test",),
}  # fmt: skip


def _one_pixel_jpeg() -> bytes:
    import io

    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (1, 1)).save(out, format="JPEG")
    return out.getvalue()


_ONE_PIXEL = _one_pixel_jpeg()  # stands in for a missing image while the rest of a specimen is checked


def taxonomy_text(ranks: dict) -> str:
    """CLIBD's text of a specimen: "order family genus species"."""
    return " ".join(ranks[rank] for rank in RANKS)


def name_id(name: str) -> int:
    """A stable 63-bit id of a taxon name, the same on every rank and in every split; -1 for an
    unclassified rank (it is nobody's positive, and matches no retrieval key)."""
    if not name or name == NOT_CLASSIFIED:
        return -1
    return int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "big") & 0x7FFF_FFFF_FFFF_FFFF


class ClibdRecipe(PrepareRecipe):
    """One group of CLIBD-layout HDF5 files, or of BIOSCAN-5M metadata tables with an image folder, -> rows
    (module docstring)."""

    name = "clibd"
    schema = CLIBD_SCHEMA
    formats = ("clibd_hdf5", "bioscan_table")

    def __init__(self, group: str, image_dir: str = "", allow_missing_images: bool = False):
        self.group = group
        self.image_dir = image_dir
        self.allow_missing_images = allow_missing_images

    def fingerprint_options(self) -> dict:
        # "layout" changes whenever the columns do, so a cached dataset of older columns is never reused.
        return {"recipe": self.name, "layout": 4, "group": self.group, **({"image_dir": self.image_dir} if self.image_dir else {}),
                **({"allow_missing_images": True} if self.allow_missing_images else {})}  # fmt: skip

    def read(self, path, fmt: str, fasta_obj_type: str):
        if fmt == "bioscan_table":
            yield from self._read_table(Path(path))
            return
        data = ClibdHdf5(path)
        for index in range(data.num_specimens(self.group)):
            row = data.specimen(self.group, index)
            has_image = bool(row["image"])
            if not has_image and self.allow_missing_images:
                row = {**row, "image": _ONE_PIXEL}  # checked as if it had one: only the image may be missing
            problem = data.check(self.group, index, row)
            if problem is not None:
                yield problem
                continue
            extra = {"group": self.group, "image_path": "", "has_image": has_image, **row["taxonomy"]}
            yield Record(data.specimen_id(row), alphabet.GENE, row["barcode"].upper(), "{}", str(path), index + 1, index, extra)

    def _read_table(self, path: Path):
        """The rows of a BIOSCAN-5M metadata table whose `split` belongs to this group; images from
        `clibd.image_dir`: `<split>/<chunk>/<processid>.jpg` (the dataset's layout) when the table has a
        `chunk` column, else `image_file`, else `<processid>.jpg`."""
        import pyarrow.csv as pacsv
        import pyarrow.parquet as pq

        if not self.image_dir:
            raise RecordError(path, None, "a BIOSCAN-5M metadata table needs `clibd.image_dir`, the folder of its images")
        if path.name.lower().endswith(".parquet"):
            table = pq.read_table(path)
        else:
            delimiter = "\t" if path.name.lower().endswith(".tsv") else ","
            table = pacsv.read_csv(path, parse_options=pacsv.ParseOptions(delimiter=delimiter),
                                   convert_options=pacsv.ConvertOptions(strings_can_be_null=True,
                                                                        column_types={c: "string" for c in ("processid", "sampleid", "chunk")}))  # fmt: skip
        columns = table.to_pydict()
        wanted = set(SPLITS_OF_GROUP.get(self.group, (self.group,)))
        root = Path(self.image_dir)
        for index, split in enumerate(columns["split"]):
            if split not in wanted:
                continue
            line = index + 2  # the header is line 1
            processid = (columns["processid"][index] or "").strip()
            barcode = (columns["dna_barcode"][index] or "").strip()
            ranks = {rank: (columns[rank][index] or "").strip() or NOT_CLASSIFIED if rank in columns else NOT_CLASSIFIED for rank in RANKS}
            if "chunk" in columns and columns["chunk"][index]:
                image = root / split / str(columns["chunk"][index]) / f"{processid}.jpg"
            elif "image_file" in columns and columns["image_file"][index]:
                image = root / columns["image_file"][index]
            else:
                image = root / f"{processid}.jpg"
            problem = None
            if not processid:
                problem = "no processid"
            elif not barcode:
                problem = f"{processid}: empty dna_barcode"
            elif not image.is_file():
                problem = f"{processid}: image {image} not found"
            else:
                problem = _undecodable(image)
            if problem:
                yield RecordError(path, line, problem)
                continue
            extra = {"group": self.group, "image_path": str(image), "has_image": True, **ranks}
            yield Record(processid, alphabet.GENE, barcode.upper(), "{}", str(path), line, index, extra)

    def start(self) -> None:
        self.words: set[str] = set()
        self.texts: set[str] = set()

    def row(self, record) -> dict:
        bad = sorted(set(record.seq) - BARCODE_LETTERS)
        if bad:
            raise ValueError(f"group {record.extra['group']!r} index {record.index} ({record.obj_id}): barcode letters {bad} "
                             "are not nucleotide codes")  # fmt: skip
        ranks = {rank: record.extra[rank] for rank in RANKS}
        text = taxonomy_text(ranks).lower()
        self.words.update(text.split())
        self.texts.add(text)
        return {"specimen_id": record.obj_id, "group": record.extra["group"], "index": record.index, "barcode": record.seq, **ranks,
                "image_path": record.extra["image_path"], "has_image": record.extra["has_image"]}  # fmt: skip

    def length(self, record) -> int:
        return len(record.seq)

    def meta(self) -> dict:
        # The distinct texts are few (taxa repeat): a SentencePiece model can be trained on them at start-up.
        return {"text_words": sorted(self.words), "texts": sorted(self.texts)}

    def merge_meta(self, parts: list[dict]) -> dict:
        return {key: sorted({value for part in parts for value in part[key]}) for key in ("text_words", "texts")}


@dataclass
class ClibdCollator:
    """rows -> tensors for the towers of a run (a picklable object: DataLoader workers get a copy)."""

    files: dict[str, str]
    """HDF5 group -> the file it is read from (one per prepared split)."""
    modalities: tuple[str, ...]
    seed: int
    resize: int
    crop: int
    dna_k: int
    dna_length: int
    text_vocab: dict[str, int]
    text_max_length: int
    dna_tokens: str = "kmer"
    """'kmer' (the BERT tower) or 'nucleotide' (LucaOne's alphabet, for the lucagplm tower)."""
    text_tokenizer: str = ""
    """A local Hugging Face tokenizer directory, 'sentencepiece' (the model in `text_spm`), or empty:
    `text_vocab`'s words."""
    text_spm: bytes = b""
    """The serialized SentencePiece model, with text_tokenizer 'sentencepiece'."""
    _open: dict = field(default_factory=dict, repr=False)
    _tokenizer: object = field(default=None, repr=False)

    def __getstate__(self):  # file handles and the tokenizer are opened again in each process
        return {k: v for k, v in self.__dict__.items() if k not in ("_open", "_tokenizer")} | {"_open": {}, "_tokenizer": None}

    def _file(self, group: str) -> ClibdHdf5:
        if group not in self._open:
            if group not in self.files:
                raise KeyError(f"no HDF5 file is known for group {group!r} (known: {sorted(self.files)})")
            self._open[group] = ClibdHdf5(self.files[group])
        return self._open[group]

    def images(self, rows: dict, epoch: int) -> torch.Tensor:
        """(B, 3, crop, crop) views; a specimen without an image gets zeros (its `image_present` is False)."""
        views = []
        for sample_id, group, index, path, has_image in zip(rows["sample_id"], rows["group"], rows["index"], rows["image_path"],
                                                            rows["has_image"]):  # fmt: skip
            if not has_image:
                views.append(torch.zeros(3, self.crop, self.crop))
                continue
            image = decode(Path(path).read_bytes() if path else self._file(group).specimen(group, index)["image"])
            if epoch == EVAL_EPOCH:
                views.append(eval_view(image, self.resize, self.crop))
            else:
                views.append(train_view(image, view_rng(self.seed, epoch, sample_id), self.resize, self.crop))
        return torch.stack(views)

    def text_ids(self, rows: dict) -> tuple[np.ndarray, np.ndarray]:
        batch = len(rows["sample_id"])
        if self.text_tokenizer == SENTENCEPIECE:
            if self._tokenizer is None:
                import sentencepiece

                self._tokenizer = sentencepiece.SentencePieceProcessor(model_proto=self.text_spm)
            ids = np.full((batch, self.text_max_length), PAD, dtype=np.int64)
            for i in range(batch):
                text = taxonomy_text({rank: rows[rank][i] for rank in RANKS}).lower()
                tokens = ([CLS] + self._tokenizer.encode(text))[: self.text_max_length]
                ids[i, : len(tokens)] = tokens
            return ids, (ids != PAD).astype(np.int64)
        if self.text_tokenizer:
            if self._tokenizer is None:
                from transformers import AutoTokenizer

                self._tokenizer = AutoTokenizer.from_pretrained(self.text_tokenizer)
            texts = [taxonomy_text({rank: rows[rank][i] for rank in RANKS}) for i in range(batch)]
            encoded = self._tokenizer(texts, padding="max_length", max_length=self.text_max_length, truncation=True, return_tensors="np")
            return encoded["input_ids"].astype(np.int64), encoded["attention_mask"].astype(np.int64)
        ids = np.full((batch, self.text_max_length), PAD, dtype=np.int64)
        for i in range(batch):
            words = taxonomy_text({rank: rows[rank][i] for rank in RANKS}).lower().split()
            tokens = [CLS] + [self.text_vocab.get(word, UNK) for word in words]
            tokens = tokens[: self.text_max_length]
            ids[i, : len(tokens)] = tokens
        return ids, (ids != PAD).astype(np.int64)

    def dna(self, barcodes: list[str]) -> dict[str, torch.Tensor]:
        if self.dna_tokens == "kmer":
            ids, mask = kmer_tokens(barcodes, self.dna_k, self.dna_length)
            return {"dna_input_ids": torch.from_numpy(ids), "dna_attention_mask": torch.from_numpy(mask)}
        from lucatrain.data.collate import Collator

        # LucaOne's tokens: one per nucleotide ([CLS] ... [SEP]); alignment gaps are not nucleotides.
        seqs = [b.replace("-", "") or "N" for b in barcodes]
        rows = {"seq": seqs, "obj_type": [alphabet.GENE] * len(seqs), "sample_id": list(range(len(seqs)))}
        tokens = Collator(self.dna_length + 2, masking=None)(rows, 0)
        return {"dna_input_ids": tokens["input_ids"], "dna_token_type_ids": tokens["token_type_ids"],
                "dna_attention_mask": tokens["attention_mask"]}  # fmt: skip

    def __call__(self, rows: dict, epoch: int) -> dict[str, torch.Tensor]:
        out = {"sample_ids": torch.as_tensor(np.asarray(rows["sample_id"], dtype=np.int64))}
        if "image" in self.modalities:
            out["image"] = self.images(rows, epoch)
            out["image_present"] = torch.as_tensor(np.asarray(rows["has_image"], dtype=bool))
        if "dna" in self.modalities:
            out.update(self.dna(rows["barcode"]))
        if "text" in self.modalities:
            ids, mask = self.text_ids(rows)
            out["text_input_ids"], out["text_attention_mask"] = torch.from_numpy(ids), torch.from_numpy(mask)
        # Taxon ids per rank: retrieval accuracy compares them; `clibd.multi_positive` picks one as the loss's positives.
        out["taxon_ids"] = torch.tensor([[name_id(rows[rank][i]) for rank in RANKS] for i in range(len(rows["sample_id"]))],
                                        dtype=torch.int64).reshape(-1, len(RANKS))  # fmt: skip
        return out


def train_sentencepiece(texts: list[str], vocab_size: int) -> bytes:
    """A SentencePiece unigram model of `texts` (the training split's distinct taxonomy texts), with
    [PAD] 0, [UNK] 1 and [CLS] 2 as the word vocabulary has them; its vocabulary is at most
    `vocab_size` (fewer when the texts hold fewer pieces)."""
    import io

    import sentencepiece

    if not texts:
        raise ValueError("`clibd.text_tokenizer=sentencepiece`: the training split has no taxonomy text to learn from")
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_writer=model, vocab_size=vocab_size, hard_vocab_limit=False,
        model_type="unigram", pad_id=PAD, unk_id=UNK, bos_id=CLS, eos_id=-1, pad_piece="[PAD]", unk_piece="[UNK]",
        bos_piece="[CLS]", character_coverage=1.0, num_threads=1, minloglevel=2,
    )  # fmt: skip
    return model.getvalue()


def sentencepiece_vocabulary(model: bytes) -> dict[str, int]:
    import sentencepiece

    processor = sentencepiece.SentencePieceProcessor(model_proto=model)
    return {processor.id_to_piece(i): i for i in range(processor.get_piece_size())}


def text_vocabulary(words: list[str]) -> dict[str, int]:
    """[PAD] 0, [UNK] 1, [CLS] 2, then the training split's words in sorted order."""
    vocab = {token: i for i, token in enumerate(TEXT_SPECIALS)}
    for word in words:
        vocab.setdefault(word, len(vocab))
    return vocab


def hdf5_files_of(data) -> dict[str, str]:
    """{group: HDF5 path} of a prepared CLIBD split (empty for a split read from metadata tables)."""
    files = [f for f in data.meta["files"] if f["format"] == "clibd_hdf5"]
    if len(files) > 1:
        raise ValueError(f"{data.path}: a CLIBD split is read from one HDF5 file, this one from {len(files)}")
    return {data.meta["recipe_options"]["group"]: files[0]["path"]} if files else {}


def _undecodable(image: Path) -> str | None:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(image) as opened:
            opened.verify()
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        return f"image {image} does not decode: {err}"
    return None
