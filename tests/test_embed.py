import numpy as np
import pytest
import torch

from conftest import DATA
from lucatrain.embed import embed_file, embed_records, pool
from lucatrain.models.lucagplm import LucaGPLM, LucaGPLMConfig


@pytest.fixture
def model_dir(tmp_path):
    torch.manual_seed(0)
    model = LucaGPLM(LucaGPLMConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, token_dropout=False))
    model.save_pretrained(tmp_path / "model")
    return tmp_path / "model"


def test_pooling_by_hand():
    hidden = torch.arange(2 * 4 * 1, dtype=torch.float32).reshape(2, 4, 1)  # rows: [0,1,2,3], [4,5,6,7]
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])  # second: CLS r SEP PAD
    assert pool(hidden, mask, "cls").flatten().tolist() == [0.0, 4.0]
    assert pool(hidden, mask, "mean").flatten().tolist() == [1.5, 5.0]
    with pytest.raises(ValueError, match="pooling must be one of"):
        pool(hidden, mask, "max")


def test_file_embeddings_in_file_order_and_batch_independent(model_dir):
    ids, vectors = embed_file(model_dir, DATA / "swissprot_sample.dat", pooling="mean", batch_size=7, max_length=130)
    assert len(ids) == 100 and vectors.shape == (100, 32) and np.isfinite(vectors).all()
    model = LucaGPLM.from_pretrained(model_dir)
    # One record embedded alone equals its row from the batched run (padding does not leak).
    from lucatrain.data.sources import iter_records

    third = [r for r in iter_records(DATA / "swissprot_sample.dat")][2]
    alone = embed_records(model, [third.seq], [third.obj_type], pooling="mean", max_length=130)
    assert ids[2] == third.obj_id
    np.testing.assert_allclose(alone[0], vectors[2], atol=1e-5)
    cls_ids, cls_vectors = embed_file(model_dir, DATA / "swissprot_sample.dat", pooling="cls", max_length=130)
    assert cls_ids == ids and not np.allclose(cls_vectors, vectors)


def test_bad_record_is_named(model_dir, tmp_path):
    bad = tmp_path / "bad.fasta"
    bad.write_text(">ok\nACGT\n>bad\nAC7T\n")
    with pytest.raises(ValueError, match=r"bad.fasta:3"):
        embed_file(model_dir, bad, fasta_obj_type="gene")
