"""CLIBD's HDF5 layout (lucatrain/data/clibd_hdf5.py): the exact dtypes, lazy per-process handles, bad rows."""

import io
import multiprocessing
import pickle

import h5py
import numpy as np
import pytest
from PIL import Image

from lucatrain.data.clibd_hdf5 import RANKS, ClibdHdf5, write_clibd_hdf5
from lucatrain.data.sources import RecordError


def jpeg(seed: int, size=(24, 16)) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, size=(*size[::-1], 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="JPEG")
    return out.getvalue()


def specimen(i: int, **changes) -> dict:
    row = {"processid": f"BIOUG{i:05d}-A01", "sampleid": f"S{i}", "barcode": "AACATTATATTTTATTTTTGG" * 3,
           "taxonomy": {"order": "Diptera", "family": "Cecidomyiidae", "genus": "not_classified", "species": "not_classified"},
           "image": jpeg(i)}  # fmt: skip
    row.update(changes)
    return row


@pytest.fixture
def clibd_file(tmp_path):
    return write_clibd_hdf5(tmp_path / "BIOSCAN_5M.hdf5", {
        "no_split_and_seen_train": [specimen(i) for i in range(5)],
        "val_seen": [specimen(10), specimen(11, taxonomy={**specimen(0)["taxonomy"], "species": "Aedes vexans"})],
    })  # fmt: skip


def test_the_layout_is_clibds(clibd_file):
    with h5py.File(clibd_file) as f:
        g = f["no_split_and_seen_train"]
        assert g["image"].dtype == np.uint8 and g["image"].ndim == 2  # JPEG bytes, zero-padded
        assert g["image_mask"].dtype == np.int64
        assert [g[k].dtype.kind for k in ("barcode", "processid", "sampleid", "image_file")] == ["S"] * 4
        assert h5py.check_string_dtype(g["species"].dtype) is not None  # variable-length strings
        assert g["image_file"][0] == b"BIOUG00000-A01.1024px.jpg"


def test_specimens_read_back(clibd_file):
    data = ClibdHdf5(clibd_file)
    assert data.groups() == ["no_split_and_seen_train", "val_seen"]
    assert data.num_specimens("no_split_and_seen_train") == 5
    row = data.specimen("val_seen", 1)
    want = specimen(11, taxonomy={**specimen(0)["taxonomy"], "species": "Aedes vexans"})
    assert row == want and data.specimen_id(row) == "BIOUG00011-A01"
    assert data.check("val_seen", 1, row) is None
    with pytest.raises(RecordError, match=r"has no group 'test_unseen'; its groups are \['no_split_and_seen_train', 'val_seen'\]"):
        data.num_specimens("test_unseen")


def _read_in_child(data, queue):
    queue.put(data.specimen("no_split_and_seen_train", 3)["processid"])


def test_each_process_opens_its_own_handle(clibd_file):
    data = ClibdHdf5(clibd_file)
    data.specimen("val_seen", 0)  # the parent's handle is open
    copy = pickle.loads(pickle.dumps(data))
    assert copy._file is None and copy.path == data.path  # a path, not a handle, crosses processes
    for method in ("fork", "spawn"):
        context = multiprocessing.get_context(method)
        queue = context.Queue()
        child = context.Process(target=_read_in_child, args=(data, queue))
        child.start()
        assert queue.get(timeout=60) == "BIOUG00003-A01"
        child.join(timeout=60)
        assert child.exitcode == 0, method


def test_unusable_rows_are_named_with_file_group_and_index(tmp_path):
    path = write_clibd_hdf5(tmp_path / "bad.hdf5", {"val_unseen": [
        specimen(0), specimen(1, barcode="  "), specimen(2, image=b"\xff\xd8not a jpeg at all"),
        specimen(3, image=b""), specimen(4, taxonomy={**specimen(0)["taxonomy"], "genus": ""}),
    ]})  # fmt: skip
    data = ClibdHdf5(path)
    problems = [data.check("val_unseen", i, data.specimen("val_unseen", i)) for i in range(5)]
    assert problems[0] is None
    assert str(problems[1]) == f"{path}: group 'val_unseen' index 1 (BIOUG00001-A01): empty barcode"
    assert "index 2 (BIOUG00002-A01): the image does not decode" in str(problems[2])
    assert "index 3 (BIOUG00003-A01): no image bytes (image_mask is 0)" in str(problems[3])
    assert "index 4 (BIOUG00004-A01): empty taxonomy ['genus'] (CLIBD writes 'not_classified'" in str(problems[4])


def test_a_file_without_clibds_fields_or_not_hdf5_is_refused(tmp_path):
    with h5py.File(tmp_path / "other.h5", "w") as f:
        f.create_group("train").create_dataset("image", data=np.zeros((1, 4), dtype=np.uint8))
    with pytest.raises(RecordError, match=r"group 'train' lacks \['image_mask', 'barcode', 'sampleid', 'order'"):
        ClibdHdf5(tmp_path / "other.h5").num_specimens("train")
    (tmp_path / "text.h5").write_text("not hdf5")
    with pytest.raises(RecordError, match="not a readable HDF5 file"):
        ClibdHdf5(tmp_path / "text.h5").groups()
    with pytest.raises(RecordError, match="no such file"):
        ClibdHdf5(tmp_path / "missing.h5")
    assert RANKS == ("order", "family", "genus", "species")
