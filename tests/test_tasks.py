"""The LucaOne task set: label parsing and checking, label files, head shapes, losses, metrics."""

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from lucatrain.config import ConfigError, load_config
from lucatrain.data.collate import Collator
from lucatrain.families.lucaone.labels import LabelStats, encode_labels, min_max_scaled, read_label_file
from lucatrain.data.prepared import prepare
from lucatrain.data.sources import RecordError
from lucatrain.families.lucaone import LUCAONE_RECIPE, TASKS, build_task, metrics_from_sums, select_tasks
from lucatrain.families.lucaone.plan import plan_tasks

HEADER = "obj_id,obj_type,obj_seq,obj_label\n"


def write_csv(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(HEADER + "".join(rows), encoding="utf-8")
    return path


def write_labels(directory, name, labels):
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"{name}.txt").write_text("label\n" + "\n".join(labels) + "\n", encoding="utf-8")


def csv_quote(text):
    return '"' + text.replace('"', '""') + '"'


# ------------------------------------------------------------------ label parsing and checking


def test_labels_from_csv_in_json_and_python_literal_form(tmp_path):
    json_label = {"seq_level": {"prot_taxonomy": 2, "prot_keyword": [0, 3]}, "span_level": {"prot_site": [[0, 2, 1]]}}
    python_label = "{'seq_level': {'prot_taxonomy': 2, 'prot_keyword': [0, 3]}, 'span_level': {'prot_site': [[0, 2, 1]]}}"
    path = write_csv(tmp_path / "d" / "train.csv", [
        f"p1,prot,MKVLAT,{csv_quote(json.dumps(json_label))}\n",
        f"p2,prot,MKVLAT,{csv_quote(python_label)}\n",
        "g1,gene,ACGTAC,{'seq_level': {'gene_taxonomy': 4}}\n".replace("{'seq_level': {'gene_taxonomy': 4}}", csv_quote("{'seq_level': {'gene_taxonomy': 4}}")),
        "g2,gene,ACGTAC,\n",
    ])  # fmt: skip
    data = prepare([path], tmp_path / "prepared", recipe=LUCAONE_RECIPE)
    rows = data.rows(range(4))
    assert json.loads(rows["labels"][0]) == json.loads(rows["labels"][1]) == json_label
    assert json.loads(rows["labels"][3]) == {}
    assert data.meta["labels"] == {
        "gene_taxonomy": {"records": 1, "lists": 0, "max_index": 4},
        "prot_keyword": {"records": 2, "lists": 2, "max_index": 3},
        "prot_site": {"records": 2, "lists": 0, "max_index": 1},
        "prot_taxonomy": {"records": 2, "lists": 0, "max_index": 2},
    }


@pytest.mark.parametrize(
    "label,message",
    [
        ('{"span_level": {"prot_site": [[2, 9, 0]]}}', r"prot_site\[0\] = \[2, 9, 0\]: need 0 <= start <= end < 6"),
        ('{"span_level": {"prot_site": [[3, 1, 0]]}}', r"need 0 <= start <= end"),
        ('{"span_level": {"prot_site": [[0, 1]]}}', r"must be \[start, end, label_index\] \(3 ints\)"),
        ('{"seq_level": {"gene_taxonomy": 1}}', r"seq_level.gene_taxonomy is a gene task but the record is prot"),
        ('{"seq_level": {"prot_taxonomy": "Metazoa"}}', r"must be a label index \(int >= 0\) or a list of them"),
        ('{"seq_level": {"prot_keyword": [1, -2]}}', r"prot_keyword must be a label index .* got \[1, -2\]"),
        ('{"structure_level": {"prot_structure": [[0, 0, 0]]}}', r"one \[x, y, z\] \(or null\) per residue: 6 expected, got 1"),
        ('{"seq_level": [1, 2]}', r"obj_label\['seq_level'\] must be an object"),
    ],
)
def test_malformed_labels_stop_prepare_naming_file_and_line(tmp_path, label, message):
    path = write_csv(tmp_path / "train.csv", ["p0,prot,MKVLAT,\n", f"p1,prot,MKVLAT,{csv_quote(label)}\n"])
    with pytest.raises(RecordError, match=message) as err:
        prepare([path], tmp_path / "prepared", recipe=LUCAONE_RECIPE)
    assert f"{path}:3" in str(err.value)


def test_unknown_label_entries_are_counted_not_trained(tmp_path):
    path = write_csv(tmp_path / "train.csv", [f"p1,prot,MKV,{csv_quote(json.dumps({'seq_level': {'prot_keywords': [1]}}))}\n"])
    stats = LabelStats(prepare([path], tmp_path / "prepared", recipe=LUCAONE_RECIPE).meta["labels"])
    assert stats.unknown_keys() == ["seq_level.prot_keywords"]


def test_label_file_reading(tmp_path):
    write_labels(tmp_path, "prot_site", ["ACT_SITE", "BINDING", "SITE"])
    assert read_label_file(tmp_path / "prot_site.txt") == ["ACT_SITE", "BINDING", "SITE"]
    (tmp_path / "bad.txt").write_text("ACT_SITE\nBINDING\n")
    with pytest.raises(ValueError, match=r"bad.txt:1: the first line must be the header 'label'"):
        read_label_file(tmp_path / "bad.txt")
    (tmp_path / "dup.txt").write_text("label\nA\nB\nA\n")
    with pytest.raises(ValueError, match=r"dup.txt:4: label 'A' repeats line 2"):
        read_label_file(tmp_path / "dup.txt")
    with pytest.raises(ValueError, match="does not exist"):
        read_label_file(tmp_path / "absent.txt")


# ------------------------------------------------------------------ selection and plan


def test_selection_by_level_and_exact_name():
    assert select_tasks(["seq_level"], []) == ["gene_taxonomy", "prot_taxonomy", "prot_keyword"]
    assert select_tasks(["all"], ["prot_keyword", "gene_mask"]) == ["gene_mask", "prot_keyword"]  # table order
    with pytest.raises(ValueError, match="unknown task 'prot_mas'; valid tasks are"):
        select_tasks(["all"], ["prot_mas"])  # exact names: no substring match
    with pytest.raises(ValueError, match=r"unknown task level type 'pair_level'; valid ones are \['token_level'"):
        select_tasks(["pair_level"], [])
    cfg = load_config(None, ["tasks.level_types=token_level,span_level", "tasks.names=[]"])
    assert cfg.tasks.selected() == ["gene_mask", "prot_mask", "gene_type", "prot_homo", "prot_site", "prot_domain"]
    with pytest.raises(ConfigError, match="task 'gene_taxonomy' is seq_level, which is not among"):
        load_config(None, ["tasks.level_types=[span_level]", "tasks.names=[gene_taxonomy]"])
    with pytest.raises(ConfigError, match="tasks.classifier_sizes`: unknown task 'keyword'"):
        load_config(None, ["tasks.classifier_sizes={keyword: 8}"])


def test_plan_sizes_heads_from_label_files_and_drops_unlabelled_tasks(tmp_path):
    labels = tmp_path / "label"
    write_labels(labels, "prot_site", ["a", "b", "c"])
    write_labels(labels, "prot_keyword", [f"k{i}" for i in range(5)])
    stats = LabelStats({"prot_site": {"records": 4, "max_index": 2}, "prot_keyword": {"records": 4, "max_index": 4}})
    plan = plan_tasks(["prot_mask", "prot_homo", "prot_site", "prot_keyword"], str(labels), [], stats)
    assert plan.names == ["prot_mask", "prot_site", "prot_keyword"]
    assert plan.num_labels == {"prot_site": 3, "prot_keyword": 5}
    assert "prot_homo" in plan.dropped and plan.obj_types == [1]

    task = build_task(TinyEncoder(), plan.names, num_labels=plan.num_labels, classifier_sizes={"prot_site": 7})
    assert task.heads["prot_site"].hidden_layer.weight.shape == (7, TinyEncoder.H)
    assert task.heads["prot_site"].classifier.weight.shape == (3, 7)
    assert task.heads["prot_keyword"].classifier.weight.shape == (5, 2048)  # LucaOne's default size
    assert task.weights == {"prot_mask": 1.0, "prot_site": 0.2, "prot_keyword": 1.0}

    too_big = LabelStats({"prot_site": {"records": 1, "max_index": 3}})
    with pytest.raises(ValueError, match=r"the dev data uses label index 3 for prot_site, but .*prot_site.txt holds 3"):
        plan_tasks(["prot_site"], str(labels), [], stats, too_big)
    with pytest.raises(ValueError, match=r"need label files .* set `tasks.label_dir`"):
        plan_tasks(["prot_site"], "", [str(tmp_path / "nowhere" / "train.csv")], stats)


# ------------------------------------------------------------------ encoding


def test_span_labels_shift_for_cls_and_clip_under_truncation():
    texts = [json.dumps({"span_level": {"prot_site": [[1, 2, 4], [5, 8, 1]]}}), "{}"]
    n = np.array([10, 3])
    right = encode_labels(texts, ["prot_site"], {}, n, np.zeros(2, dtype=int), 12)["prot_site_labels"]
    assert right[0].tolist() == [-100, -100, 4, 4, -100, -100, 1, 1, 1, 1, -100, -100]
    assert (right[1] == -100).all()
    # keep residues 0..5 only (max_length 8): the second span is clipped to residue 5
    clipped = encode_labels(texts, ["prot_site"], {}, np.array([6, 3]), np.zeros(2, dtype=int), 8)["prot_site_labels"]
    assert clipped[0].tolist() == [-100, -100, 4, 4, -100, -100, 1, -100]
    # truncation="left" dropped residues 0..3: residue r sits at token r - 4 + 1
    left = encode_labels(texts, ["prot_site"], {}, np.array([6, 3]), np.array([4, 0]), 8)["prot_site_labels"]
    assert left[0].tolist() == [-100, -100, 1, 1, 1, 1, -100, -100]  # the first span was cut away


def test_keyword_labels_mark_every_unlisted_label_negative():
    texts = [json.dumps({"seq_level": {"prot_keyword": [1, 3]}}), "{}", json.dumps({"seq_level": {"prot_keyword": []}})]
    out = encode_labels(texts, ["prot_keyword"], {"prot_keyword": 5}, np.array([3, 3, 3]), np.zeros(3, dtype=int), 5)
    assert out["prot_keyword_labels"].tolist() == [[0, 1, 0, 1, 0], [-100] * 5, [0] * 5]


def test_structure_labels_are_min_max_scaled_per_protein():
    coords = [[0.0, 10.0, 5.0], None, [4.0, 30.0, 5.0], -1, [2.0, 20.0, 5.0]]
    scaled = min_max_scaled(coords)
    np.testing.assert_allclose(scaled[[0, 2, 4]], [[0, 0, 1], [1, 1, 1], [0.5, 0.5, 1]])  # a flat axis -> 1.0
    assert np.isnan(scaled[[1, 3]]).all()
    text = json.dumps({"structure_level": {"prot_structure": coords}})
    out = encode_labels([text], ["prot_structure"], {}, np.array([5]), np.zeros(1, dtype=int), 7)["prot_structure_labels"]
    assert out.shape == (1, 7, 3) and np.isnan(out[0, [0, 2, 4, 6]]).all()  # [CLS], missing residues, [SEP]
    np.testing.assert_allclose(out[0, 5], [0.5, 0.5, 1.0])


def test_collator_adds_task_labels_beside_masked_lm(tmp_path):
    from lucatrain.data.collate import MaskingConfig

    label = {"seq_level": {"prot_taxonomy": 1}, "span_level": {"prot_domain": [[0, 1, 2]]}}
    rows = {"sample_id": [7, 8], "obj_type": [1, 0], "seq": ["MKVL", "ACG"], "labels": [json.dumps(label), "{}"]}
    def labels(rows, n_residues, cuts, width):
        return encode_labels(rows["labels"], ("prot_domain", "prot_taxonomy"), {}, n_residues, cuts, width)

    batch = Collator(16, masking=MaskingConfig(), labels=labels)(rows, epoch=0)
    assert batch["prot_taxonomy_labels"].tolist() == [1, -100]
    assert batch["prot_domain_labels"].tolist() == [[-100, 2, 2, -100, -100, -100], [-100] * 6]
    assert batch["labels"].shape == batch["input_ids"].shape == (2, 6)


# ------------------------------------------------------------------ losses


class TinyEncoder(nn.Module):
    """Stands in for LucaGPLM: hidden states are a fixed function of the token ids (a lookup table)."""

    H = 4

    def __init__(self):
        super().__init__()
        self.config = type("Config", (), {"hidden_size": self.H})()
        self.table = nn.Embedding(40, self.H)
        self.lm = nn.Linear(self.H, 39)

    def forward(self, input_ids, token_type_ids=None, attention_mask=None):
        return self.table(input_ids)

    def mlm_logits(self, hidden):
        return self.lm(hidden)


def zero_heads(task):
    """All head weights 0: every output is 0, so losses have closed forms."""
    with torch.no_grad():
        for p in task.heads.parameters():
            p.zero_()


def batch_of(**labels):
    ids = torch.tensor([[2, 10, 11, 12, 3], [2, 5, 6, 3, 0], [2, 13, 14, 15, 3]])
    types = torch.tensor([[1] * 5, [0] * 5, [1] * 5])
    return {"input_ids": ids, "token_type_ids": types, "attention_mask": (ids != 0).long(),
            "labels": torch.full_like(ids, -100), **labels}  # fmt: skip


def test_losses_with_zero_heads_have_closed_forms():
    """Zero heads give logits 0: CE = ln K per target, BCE = ln 2 per (record, label), L1 = |y|."""
    names = ["prot_site", "gene_taxonomy", "prot_keyword", "prot_structure"]
    num_labels = {"prot_site": 3, "gene_taxonomy": 6, "prot_keyword": 4}
    task = build_task(TinyEncoder(), names, num_labels=num_labels, classifier_sizes=dict.fromkeys(names, 2))
    zero_heads(task)
    structure = torch.full((3, 5, 3), float("nan"))
    structure[0, 1:4] = torch.tensor([[0.0, 0.5, 1.0], [1.0, 1.0, 1.0], [0.5, 0.0, 0.25]])
    batch = batch_of(
        prot_site_labels=torch.tensor([[-100, 0, 2, -100, -100], [-100] * 5, [-100, 1, -100, -100, -100]]),
        gene_taxonomy_labels=torch.tensor([-100, 5, -100]),
        prot_keyword_labels=torch.tensor([[0.0, 1, 0, 0], [-100.0] * 4, [1.0, 1, 0, 1]]),
        prot_structure_labels=structure,
    )
    counts = task.count_targets(batch)
    assert counts == {"prot_site": 3, "gene_taxonomy": 1, "prot_keyword": 8, "prot_structure": 9}
    loss, report = task(batch, counts)
    sums = {k: v.numpy() if v.ndim else float(v) for k, v in report.items()}
    metrics = metrics_from_sums(sums)
    assert metrics["prot_site/loss"] == pytest.approx(math.log(3))
    assert metrics["gene_taxonomy/loss"] == pytest.approx(math.log(6))
    assert metrics["prot_keyword/loss"] == pytest.approx(math.log(2))  # over all 8 (record, label) pairs
    assert metrics["prot_structure/mae"] == pytest.approx((0 + 0.5 + 1 + 1 + 1 + 1 + 0.5 + 0 + 0.25) / 9)
    expected = 0.2 * math.log(3) + 0.2 * math.log(6) + 1.0 * math.log(2) + 1.0 * 5.25 / 9
    assert float(loss.detach()) == pytest.approx(expected)


def test_losses_match_an_independent_computation_and_skip_absent_labels():
    torch.manual_seed(0)
    names = ["prot_domain", "prot_taxonomy", "prot_keyword"]
    num_labels = {"prot_domain": 3, "prot_taxonomy": 4, "prot_keyword": 3}
    task = build_task(TinyEncoder(), names, num_labels=num_labels, classifier_sizes=dict.fromkeys(names, 5))
    batch = batch_of(
        prot_domain_labels=torch.tensor([[-100, 2, 2, 0, -100], [-100] * 5, [-100] * 5]),
        prot_taxonomy_labels=torch.tensor([3, -100, 1]),
        prot_keyword_labels=torch.tensor([[-100.0] * 3, [-100.0] * 3, [0.0, 1, 1]]),
    )
    loss, report = task(batch, task.count_targets(batch))

    def head(name, x):  # numpy: dropout(0) -> W1 x + b1 -> erf-GELU -> W2 h + b2
        h = task.heads[name]
        w1, b1 = h.hidden_layer.weight.detach().numpy(), h.hidden_layer.bias.detach().numpy()
        w2, b2 = h.classifier.weight.detach().numpy(), h.classifier.bias.detach().numpy()
        z = x @ w1.T + b1
        gelu = 0.5 * z * (1 + np.vectorize(math.erf)(z / math.sqrt(2)))
        return gelu @ w2.T + b2

    def ce(logits, target):
        return float(np.log(np.exp(logits).sum()) - logits[target])

    hidden = task.model.table.weight.detach().numpy()[batch["input_ids"].numpy()]  # (3, 5, H)
    domain = np.mean([ce(head("prot_domain", hidden[0, t]), c) for t, c in ((1, 2), (2, 2), (3, 0))])
    taxonomy = np.mean([ce(head("prot_taxonomy", hidden[r, 0]), c) for r, c in ((0, 3), (2, 1))])
    z = head("prot_keyword", hidden[2, 0])
    y = np.array([0.0, 1, 1])
    keyword = np.mean(np.log1p(np.exp(-np.abs(z))) + np.maximum(z, 0) - z * y)
    assert float(loss) == pytest.approx(0.2 * domain + 0.2 * taxonomy + keyword, rel=1e-5)

    # A record without a task's label contributes nothing: changing its hidden states moves no loss.
    with torch.no_grad():
        task.model.table.weight[5:7] += 3.0  # the gene row's residues (ids 5, 6) carry none of these tasks
    again, _ = task(batch, task.count_targets(batch))
    assert float(again) == pytest.approx(float(loss), rel=1e-6)


def test_keyword_bce_gradient_pushes_unlisted_labels_down():
    task = build_task(TinyEncoder(), ["prot_keyword"], num_labels={"prot_keyword": 4}, classifier_sizes={"prot_keyword": 2})
    zero_heads(task)
    batch = batch_of(prot_keyword_labels=torch.tensor([[0.0, 1, 0, 0], [-100.0] * 4, [-100.0] * 4]))
    loss, _ = task(batch, task.count_targets(batch))
    loss.backward()
    bias_grad = task.heads["prot_keyword"].classifier.bias.grad
    # d/dz BCE at z=0 is sigmoid(0) - y = +0.5 for a negative, -0.5 for the positive; mean over 4 labels.
    torch.testing.assert_close(bias_grad, torch.tensor([0.125, -0.125, 0.125, 0.125]))


def test_every_head_gets_a_gradient_even_without_its_labels():
    """A micro-batch with no label of any task still gives every parameter a (zero) gradient: under
    data parallelism or ZeRO, every rank must produce the same set of gradients each step."""
    names = ["gene_mask", "prot_mask", "prot_site", "gene_taxonomy", "prot_keyword", "prot_structure"]
    task = build_task(TinyEncoder(), names, num_labels={"prot_site": 3, "gene_taxonomy": 2, "prot_keyword": 4},
                      classifier_sizes=dict.fromkeys(names, 2))  # fmt: skip
    batch = batch_of(
        prot_site_labels=torch.full((3, 5), -100), gene_taxonomy_labels=torch.full((3,), -100),
        prot_keyword_labels=torch.full((3, 4), -100.0), prot_structure_labels=torch.full((3, 5, 3), float("nan")),
    )  # fmt: skip
    loss, report = task(batch, task.count_targets(batch))
    loss.backward()
    for name, p in task.named_parameters():
        assert p.grad is not None, name
    assert float(report["prot_keyword/count"]) == 0 and report["prot_keyword/tp"].shape == (4,)


def test_f1_metrics():
    sums = {"k/loss_sum": 1.0, "k/count": 8.0, "k/tp": np.array([2.0, 0, 1, 0]), "k/fp": np.array([1.0, 0, 0, 0]),
            "k/fn": np.array([0.0, 1, 1, 0])}  # fmt: skip
    m = metrics_from_sums(sums)
    assert m["k/micro_f1"] == pytest.approx(2 * 3 / (2 * 3 + 1 + 2))
    # label 3 never occurs; labels 0..2: 4/5, 0, 2/3
    assert m["k/macro_f1"] == pytest.approx((4 / 5 + 0 + 2 / 3) / 3)


def test_task_table_matches_lucaone_defaults():
    assert {n: TASKS[n].default_weight for n in TASKS} == {
        "gene_mask": 1.0, "prot_mask": 1.0, "gene_type": 0.2, "prot_homo": 0.2, "prot_site": 0.2, "prot_domain": 0.2,
        "gene_taxonomy": 0.2, "prot_taxonomy": 0.2, "prot_keyword": 1.0, "prot_structure": 1.0,
    }  # fmt: skip


@pytest.mark.parametrize("name", [n for n in TASKS if TASKS[n].output_mode != "mlm"])
def test_each_label_task_zero_head_loss_by_hand(name):
    """Every label task on its own, zero head: ln K (multi-class), ln 2 (keywords), mean |y| (structure);
    rows of the other molecule or without the label add nothing."""
    spec = TASKS[name]
    row = 1 if spec.obj_type == 0 else 2  # batch_of: rows 0 and 2 are proteins, row 1 a gene
    k = 5
    if spec.level == "span_level":
        labels = torch.full((3, 5), -100)
        labels[row, 1:3] = torch.tensor([4, 0])
        by_hand, count = math.log(k), 2
    elif spec.output_mode == "multi_class":
        labels = torch.full((3,), -100)
        labels[row] = 3
        by_hand, count = math.log(k), 1
    elif spec.output_mode == "multi_label":
        labels = torch.full((3, k), -100.0)
        labels[row] = torch.tensor([1.0, 0, 0, 1, 0])
        by_hand, count = math.log(2), k
    else:
        labels = torch.full((3, 5, 3), float("nan"))
        labels[row, 1] = torch.tensor([0.25, 1.0, 0.5])
        by_hand, count = (0.25 + 1.0 + 0.5) / 3, 3
    task = build_task(TinyEncoder(), [name], num_labels={name: k}, classifier_sizes={name: 3})
    zero_heads(task)
    batch = batch_of(**{f"{name}_labels": labels})
    assert task.count_targets(batch) == {name: count}
    loss, report = task(batch, task.count_targets(batch))
    assert float(report[f"{name}/loss_sum"]) / count == pytest.approx(by_hand, rel=1e-6)
    assert float(loss.detach()) == pytest.approx(spec.default_weight * by_hand, rel=1e-6)


def test_resuming_with_other_tasks_is_refused(tmp_path):
    from conftest import tiny_overrides
    from lucatrain.trainer import Trainer

    base = {"train.max_steps": 2, "train.batch_size": 4}
    Trainer(load_config("demo_tiny", tiny_overrides(tmp_path, **base))).train()
    more = tiny_overrides(tmp_path, **{**base, "tasks.names": "[gene_mask, prot_mask, gene_taxonomy]",
                                       "train.trained_checkpoint": "latest", "train.max_steps": 4})  # fmt: skip
    with pytest.raises(ValueError, match=r"was trained with tasks \['gene_mask', 'prot_mask'\].*this run has"):
        Trainer(load_config("demo_tiny", more))


def test_unknown_best_metric_fails_at_start(tmp_path):
    from conftest import tiny_overrides
    from lucatrain.trainer import Trainer

    cfg = load_config("demo_tiny", tiny_overrides(tmp_path, **{"train.best_metric": "prot_keyword/acc"}))
    with pytest.raises(ValueError, match=r"best_metric=prot_keyword/acc` is not a dev metric .*'gene_mask/acc'"):
        Trainer(cfg)


def test_output_modes_and_loss_types_are_config(tmp_path):
    with pytest.raises(ConfigError, match=r"output_modes.prot_site`: 'multi_label' is not possible; choose from \['multi_class'\]"):
        load_config(None, ["tasks.output_modes={prot_site: multi_label}"])
    with pytest.raises(ConfigError, match=r"loss_types.prot_structure`: 'bce' does not fit a regression task; choose from \['l1', 'l2'"):
        load_config(None, ["tasks.loss_types={prot_structure: bce}"])

    # prot_taxonomy as multi-label: an index becomes a one-item list; the head and BCE follow.
    texts = [json.dumps({"seq_level": {"prot_taxonomy": 2}}), json.dumps({"seq_level": {"prot_taxonomy": [0, 3]}})]
    out = encode_labels(texts, ["prot_taxonomy"], {"prot_taxonomy": 4}, np.array([3, 3]), np.zeros(2, dtype=int), 5,
                        {"prot_taxonomy": "multi_label"})  # fmt: skip
    assert out["prot_taxonomy_labels"].tolist() == [[0, 0, 1, 0], [1, 0, 0, 1]]
    task = build_task(TinyEncoder(), ["prot_taxonomy"], num_labels={"prot_taxonomy": 4},
                      classifier_sizes={"prot_taxonomy": 2}, output_modes={"prot_taxonomy": "multi_label"})  # fmt: skip
    zero_heads(task)
    batch = batch_of(prot_taxonomy_labels=torch.tensor([[0.0, 0, 1, 0], [-100.0] * 4, [1.0, 0, 0, 1]]))
    loss, report = task(batch, task.count_targets(batch))
    assert float(loss.detach()) == pytest.approx(0.2 * math.log(2)) and "prot_taxonomy/tp" in report

    # A list label for a task left multi-class stops the run at start, saying what to set.
    labels = tmp_path / "label"
    write_labels(labels, "prot_taxonomy", ["a", "b", "c", "d"])
    stats = LabelStats({"prot_taxonomy": {"records": 5, "lists": 2, "max_index": 3}})
    with pytest.raises(ValueError, match=r"2 training records give a list .*tasks.output_modes.prot_taxonomy=multi_label"):
        plan_tasks(["prot_taxonomy"], str(labels), [], stats)
    assert plan_tasks(["prot_taxonomy"], str(labels), [], stats, output_modes={"prot_taxonomy": "multi_label"}).output_modes == {
        "prot_taxonomy": "multi_label"}  # fmt: skip


@pytest.mark.parametrize("loss_type,by_hand", [("l1", 2 / 3), ("l2", (0.25 + 1 + 0.25) / 3), ("smooth_l1", (0.125 + 0.5 + 0.125) / 3)])
def test_structure_loss_types_by_hand(loss_type, by_hand):
    task = build_task(TinyEncoder(), ["prot_structure"], classifier_sizes={"prot_structure": 2},
                      loss_types={"prot_structure": loss_type})  # fmt: skip
    zero_heads(task)  # predictions 0: errors are the targets themselves
    labels = torch.full((3, 5, 3), float("nan"))
    labels[0, 2] = torch.tensor([0.5, 1.0, 0.0]) - torch.tensor([0.0, 0.0, 0.5])  # |errors| 0.5, 1.0, 0.5
    batch = batch_of(prot_structure_labels=labels)
    loss, report = task(batch, task.count_targets(batch))
    assert float(loss.detach()) == pytest.approx(by_hand)
    assert metrics_from_sums({k: float(v) for k, v in report.items()})["prot_structure/mae"] == pytest.approx(2 / 3)
