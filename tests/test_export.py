"""`lucatrain export`: a checkpoint -> transformers-loadable encoder (+ task heads), offline."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import ALL_TASKS, REPO, SMALL_HEADS, all_tasks_dataset, read_history, tiny_overrides
from lucatrain.cli import main as cli_main
from lucatrain.config import load_config
from lucatrain.embed import embed_records
from lucatrain.models.lucagplm import LucaGPLM
from lucatrain.trainer import Trainer


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A 6-step, 1-process run with every task, whose checkpoint and last/ export the tests read."""
    tmp_path = tmp_path_factory.mktemp("export")
    train = all_tasks_dataset(tmp_path / "data")
    cfg = load_config("demo_tiny", tiny_overrides(tmp_path, **{
        "data.train_files": f"[{train}]", "tasks.names": "[" + ", ".join(ALL_TASKS) + "]",
        "tasks.classifier_sizes": SMALL_HEADS, "train.batch_size": 4, "train.max_steps": 6,
        "deepspeed.config": "zero1", "train.learning_rate": 3e-3,
        "data.dev_files": f"[{train}]", "train.eval_steps": 2, "train.best_metric": "prot_keyword/micro_f1",
    }))  # fmt: skip
    Trainer(cfg).train()  # in-process: no engine shutdown, later in-process tests reuse the process group
    return tmp_path / "run", train.parents[1] / "label"


def test_best_export_follows_the_configured_metric(trained_run):
    run, _ = trained_run
    evals = [h for h in read_history(run) if "eval/prot_keyword/micro_f1" in h]
    assert [h["step"] for h in evals] == [2, 4, 6]
    best = json.loads((run / "best" / "trainer_state.json").read_text())
    values = [h["eval/prot_keyword/micro_f1"] for h in evals]
    assert best["prot_keyword/micro_f1"] == max(values)  # higher is better for an F1
    assert best["step"] == evals[values.index(max(values))]["step"]
    for metric in ("prot_site/acc", "prot_keyword/macro_f1", "prot_structure/mae", "gene_type/acc"):
        assert f"eval/{metric}" in evals[-1], metric


def test_export_of_a_checkpoint_equals_the_trainers_last_export(trained_run, tmp_path):
    run, labels = trained_run
    assert cli_main(["export", str(run), "--out", str(tmp_path / "exp"), "--heads"]) == 0
    for name in ("model.safetensors", "heads.safetensors"):
        offline, live = load_file(tmp_path / "exp" / name), load_file(run / "last" / name)
        assert set(offline) == set(live)
        for key in live:
            torch.testing.assert_close(offline[key], live[key], rtol=0, atol=0)
    heads = json.loads((tmp_path / "exp" / "heads.json").read_text())
    assert list(heads) == ALL_TASKS[2:]
    keywords = (labels / "prot_keyword.txt").read_text().splitlines()[1:]
    assert heads["prot_keyword"]["labels"] == keywords and heads["prot_keyword"]["num_outputs"] == len(keywords)
    assert heads["prot_structure"]["num_outputs"] == 3 and heads["prot_site"]["weight"] == 0.2
    head_weights = load_file(tmp_path / "exp" / "heads.safetensors")
    assert head_weights["prot_keyword.classifier.weight"].shape == (len(keywords), 16)

    # Without --heads: the encoder only.
    assert cli_main(["export", str(run / "checkpoints" / "step-000006"), "--out", str(tmp_path / "enc")]) == 0
    assert not (tmp_path / "enc" / "heads.safetensors").exists()


def test_export_loads_in_transformers_without_lucatrain(trained_run, tmp_path):
    run, _ = trained_run
    export = run / "last"
    ids = [[2, 5, 6, 7, 8, 3], [2, 11, 12, 13, 3, 0]]
    types = [[0] * 6, [1] * 6]
    script = f"""
import sys, json, torch
sys.path = [p for p in sys.path if p not in ("", {str(REPO)!r})]  # lucatrain must not be needed
from transformers import AutoModel
model = AutoModel.from_pretrained({str(export)!r}, trust_remote_code=True).eval()
ids, types = torch.tensor({ids}), torch.tensor({types})
with torch.no_grad():
    hidden = model(input_ids=ids, token_type_ids=types, attention_mask=(ids != 0).long()).last_hidden_state
print(json.dumps({{"hidden": hidden.tolist(), "lucatrain": any(m.startswith("lucatrain") for m in sys.modules),
                  "tied": model.lucagplm.lm_head.weight is model.lucagplm.embed_tokens.weight}}))
"""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["lucatrain"] is False and out["tied"] is True
    model = LucaGPLM.from_pretrained(export).eval()
    ids_t, types_t = torch.tensor(ids), torch.tensor(types)
    with torch.no_grad():
        expected = model(ids_t, types_t, (ids_t != 0).long())
    torch.testing.assert_close(torch.tensor(out["hidden"]), expected, atol=1e-6, rtol=0)


def test_registered_auto_model_and_embeddings(trained_run):
    import lucatrain.models.hf  # noqa: F401  (registers lucaone_gplm with the Auto classes)
    from transformers import AutoModel

    run, _ = trained_run
    model = AutoModel.from_pretrained(run / "last").eval()
    assert type(model).__name__ == "LucaGPLMModel"
    model_plain = LucaGPLM.from_pretrained(run / "last")
    vectors = embed_records(model_plain, ["ACGTTGCA"], [0], pooling="cls", max_length=66)
    # A->1 (id 5), C->3 (7), G->4 (8), T->2 (6), wrapped in [CLS] (2) ... [SEP] (3)
    tokens = torch.tensor([[2, 5, 7, 8, 6, 6, 8, 7, 5, 3]])
    with torch.no_grad():
        cls = model(input_ids=tokens, token_type_ids=torch.zeros_like(tokens)).last_hidden_state[0, 0]
    torch.testing.assert_close(torch.as_tensor(vectors[0]), cls, atol=1e-6, rtol=0)
