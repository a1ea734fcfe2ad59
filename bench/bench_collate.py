"""Collate throughput: lucatrain.data.collate.Collator vs a per-character pure-Python collator.

"Collate" = tokenize + mask (15% of residues; of those 80% [MASK], 10% random residue of the same
molecule, 10% kept) + pad to the longest sequence -> int64 tensors, for one micro-batch.

  lucatrain  `Collator(max_length, masking=...)(rows, epoch)`: numpy byte lookup tables for
             tokenizing, counter-based (hash) random numbers for masking, numpy padding.
  baseline   written here the straightforward way: a dict lookup per character, Python `random`
             per position for the 15/80/10/10 draws, Python lists padded, then `torch.tensor`.

Input: real records from the shipped data (rRNA genes FASTA, Swiss-Prot sample, LucaOne-format
CSV sample), prepared with lucatrain.data.prepared.prepare, shuffled with a fixed seed and cut into
micro-batches of 16; max_length 1026. The Arrow row gathers are done before timing: both sides
get the same `rows` dicts. Each side runs `--repeats` times over all micro-batches; the best run
counts (noise from other processes only ever adds time). Tokens are real tokens (num_tokens).

For scale, the script also measures how many tokens/s a training step *consumes*
(forward+backward+AdamW of the demo_tiny model on the same micro-batches) and reads the
small-model figure of bench_train_throughput.py from bench/results if present, and says how many
times faster collate is than the model: collate must never be what a run waits on.

    python bench/bench_collate.py
    python bench/bench_collate.py --repeats 10 --batch-size 32
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402  (puts the repo on sys.path too)
import numpy as np  # noqa: E402
import torch  # noqa: E402

from lucatrain.data import alphabet  # noqa: E402
from lucatrain.data.collate import Collator, MaskingConfig  # noqa: E402
from lucatrain.data.prepared import prepare  # noqa: E402

TARGET = 20.0


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--max-length", type=int, default=1026)
    p.add_argument("--batch-size", type=int, default=16, help="records per micro-batch")
    p.add_argument("--repeats", type=int, default=5, help="timed passes per side; the fastest counts")
    p.add_argument("--max-batches", type=int, default=0, help="use only the first N micro-batches (0 = all)")
    p.add_argument("--model-steps", type=int, default=3, help="timed demo_tiny training steps for the consumption rate (0 = skip)")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads for the model step")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", default=None, help="where <name>.json goes (default bench/results)")
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------- the baseline


def _char_tables() -> tuple[dict[str, int], dict[str, int]]:
    """char -> token id, one dict per molecule type (upper and lower case), built from the vocabulary."""
    gene, prot = {}, {}
    for letter in alphabet.GENE_LETTERS:
        digit = {"A": "1", "T": "2", "U": "2", "C": "3", "G": "4"}.get(letter, "5")
        gene[letter] = gene[letter.lower()] = alphabet.TOKEN_TO_ID[digit]
    for letter in alphabet.PROT_LETTERS:
        prot[letter] = prot[letter.lower()] = alphabet.TOKEN_TO_ID[letter]
    return gene, prot


class PurePythonCollator:
    """The same job as lucatrain's Collator, written the way one would without numpy."""

    def __init__(self, max_length: int, mask_prob=0.15, mask_token_prob=0.8, random_token_prob=0.1, seed=0, masking=True):
        self.max_length = max_length
        self.mask_prob, self.mask_token_prob, self.random_token_prob = mask_prob, mask_token_prob, random_token_prob
        self.masking = masking
        self.tables = _char_tables()
        self.random_ids = (alphabet.GENE_RANDOM_IDS.tolist(), alphabet.PROT_RANDOM_IDS.tolist())
        self.rng = random.Random(seed)

    def encode(self, seq: str, obj_type: int) -> list[int]:
        table = self.tables[obj_type]
        ids = [alphabet.CLS_ID]
        for ch in seq[: self.max_length - 2]:  # right truncation
            ids.append(table[ch])  # KeyError = invalid residue, as Collator raises ValueError
        ids.append(alphabet.SEP_ID)
        return ids

    def mask(self, ids: list[int], obj_type: int) -> tuple[list[int], list[int]]:
        rng, choices = self.rng, self.random_ids[obj_type]
        masked, labels = list(ids), [alphabet.IGNORE_INDEX] * len(ids)
        picked = 0
        for i in range(1, len(ids) - 1):  # residues only, never CLS/SEP
            if rng.random() >= self.mask_prob:
                continue
            picked += 1
            labels[i] = ids[i]
            action = rng.random()
            if action < self.mask_token_prob:
                masked[i] = alphabet.MASK_ID
            elif action < self.mask_token_prob + self.random_token_prob:
                masked[i] = rng.choice(choices)
        if picked == 0:  # every sequence contributes at least one target
            i = rng.randint(1, len(ids) - 2)
            labels[i], masked[i] = ids[i], alphabet.MASK_ID
        return masked, labels

    def __call__(self, rows: dict, epoch: int) -> dict[str, torch.Tensor]:
        encoded = [self.encode(s, t) for s, t in zip(rows["seq"], rows["obj_type"])]
        width = max(len(e) for e in encoded)
        input_ids, labels, types, attention = [], [], [], []
        for ids, obj_type in zip(encoded, rows["obj_type"]):
            pad = width - len(ids)
            if self.masking:
                ids, lab = self.mask(ids, obj_type)
                labels.append(lab + [alphabet.IGNORE_INDEX] * pad)
            input_ids.append(ids + [alphabet.PAD_ID] * pad)
            types.append([obj_type] * len(ids) + [0] * pad)
            attention.append([1] * len(ids) + [0] * pad)
        out = {
            "input_ids": torch.tensor(input_ids, dtype=torch.int64),
            "token_type_ids": torch.tensor(types, dtype=torch.int64),
            "attention_mask": torch.tensor(attention, dtype=torch.int64),
            "sample_ids": torch.tensor(rows["sample_id"], dtype=torch.int64),
            "num_tokens": torch.tensor(sum(len(e) for e in encoded)),
        }
        if self.masking:
            out["labels"] = torch.tensor(labels, dtype=torch.int64)
        return out


# ---------------------------------------------------------------------------------- data + timing


def load_micro_batches(args, tmp: Path) -> tuple[list[dict], dict]:
    files = [_common.RRNA_FASTA, _common.SWISSPROT_DAT, _common.LUCAONE_TRAIN]
    data = prepare([str(f) for f in files], tmp / "prepared")
    order = np.random.default_rng(args.seed).permutation(len(data))
    n = len(order) // args.batch_size
    if args.max_batches:
        n = min(n, args.max_batches)
    batches = [data.rows(order[i * args.batch_size : (i + 1) * args.batch_size]) for i in range(n)]
    info = {"records": len(data), "obj_type_counts": data.meta["obj_type_counts"], "micro_batches": n}
    return batches, info


def best_pass(collate, batches: list[dict], repeats: int) -> tuple[float, int, list[dict]]:
    """Fastest of `repeats` passes over all micro-batches; returns (seconds, tokens, outputs)."""
    best, outputs = float("inf"), []
    for _ in range(repeats):
        start = time.perf_counter()
        outs = [collate(rows, 0) for rows in batches]
        best = min(best, time.perf_counter() - start)
        outputs = outs
    return best, sum(int(o["num_tokens"]) for o in outputs), outputs


def check_same_job(batches: list[dict], max_length: int) -> dict:
    """Evidence that the baseline does the same job: identical unmasked ids, shapes and masks,
    and mask statistics of both masked outputs near 15% / 80 / 10 / 10."""
    plain = PurePythonCollator(max_length, masking=False)
    luca = Collator(max_length)
    for rows in batches[:20]:
        a, b = plain(rows, 0), luca(rows, 0)
        for key in ("input_ids", "token_type_ids", "attention_mask", "num_tokens"):
            if not torch.equal(a[key], b[key]):
                raise AssertionError(f"baseline and Collator differ on {key}")
    stats = {}
    for name, collate in (("lucatrain", Collator(max_length, masking=MaskingConfig())), ("baseline", PurePythonCollator(max_length))):
        sel = masked = residues = 0
        for rows in batches[:20]:
            out = collate(rows, 0)
            s = out["labels"] != alphabet.IGNORE_INDEX
            sel += int(s.sum())
            masked += int((s & (out["input_ids"] == alphabet.MASK_ID)).sum())
            residues += int(out["attention_mask"].sum()) - 2 * len(rows["seq"])
        stats[name] = {"selected_share": sel / residues, "mask_share_of_selected": masked / sel}
    return stats


def collator_breakdown(batches: list[dict], max_length: int, seed: int, repeats: int) -> dict:
    """Where Collator's time goes, in microseconds per micro-batch, through its public surface only
    (so it keeps working whatever the implementation inside): tokenize + pad + tensors is
    `Collator(masking=None)`, masking is the rest of a masked Collator call."""
    plain = Collator(max_length)
    masked = Collator(max_length, masking=MaskingConfig(), seed=seed)
    unmasked_s, _, _ = best_pass(plain, batches, repeats)
    total_s, _, _ = best_pass(masked, batches, repeats)
    per_mb = 1e6 / len(batches)
    return {
        "tokenize_pad_tensors": unmasked_s * per_mb,
        "masking": (total_s - unmasked_s) * per_mb,
        "collator_total": total_s * per_mb,
    }


def model_consumption(batches: list[dict], args) -> dict:
    """Tokens/s one demo_tiny training step consumes on these micro-batches (fwd + bwd + AdamW)."""
    from lucatrain.config import load_config
    from lucatrain.families.lucaone import build_task
    from lucatrain.models.encoder import build_model

    torch.set_num_threads(args.threads)
    cfg = load_config("demo_tiny", [f"data.max_length={args.max_length}", f"model.max_position_embeddings={args.max_length}",
                                    "deepspeed.precision=fp32"])  # fmt: skip
    torch.manual_seed(0)
    model = build_model(cfg)
    task = build_task(model, ["gene_mask", "prot_mask"], cfg.tasks.weights)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    collate = Collator(args.max_length, masking=MaskingConfig())
    mbs = [collate(rows, 0) for rows in batches[: args.model_steps + 1]]

    def step(mb):
        totals = {k: float(v) for k, v in task.count_targets(mb).items()}
        loss, _ = task(mb, totals)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step(mbs[0])  # warm-up
    start = time.perf_counter()
    for mb in mbs[1:]:
        step(mb)
    seconds = time.perf_counter() - start
    tokens = sum(int(mb["num_tokens"]) for mb in mbs[1:])
    m = cfg.model
    return {
        "model": f"demo_tiny: hidden {m.hidden_size}, {m.num_hidden_layers} layers, {m.num_attention_heads} heads",
        "steps": len(mbs) - 1,
        "threads": torch.get_num_threads(),
        "tokens_per_s": tokens / seconds,
    }


def train_bench_figure() -> dict | None:
    """lucatrain's training tokens/s from bench_train_throughput.py's last result, if there is one."""
    path = _common.RESULTS_DIR / "train_throughput.json"
    try:
        doc = json.loads(path.read_text())
        best = max(doc["results"], key=lambda r: r["lucatrain_tokens_per_s"])
        s = doc["settings"]
        return {
            "source": str(path.relative_to(_common.REPO)),
            "model": f"hidden {s['hidden']}, {s['layers']} layers, {s['heads']} heads, max_length {s['max_length']}, {best['ds_config']}",
            "tokens_per_s": best["lucatrain_tokens_per_s"],
        }
    except (OSError, KeyError, ValueError):
        return None


def main(argv=None) -> int:
    args = parse_args(argv)
    load_before = _common.warn_if_busy()
    with tempfile.TemporaryDirectory(prefix="bench-collate-") as tmp:
        batches, data_info = load_micro_batches(args, Path(tmp))
    same_job = check_same_job(batches, args.max_length)

    luca_s, luca_tokens, _ = best_pass(Collator(args.max_length, masking=MaskingConfig(), seed=args.seed), batches, args.repeats)
    base_s, base_tokens, _ = best_pass(PurePythonCollator(args.max_length, seed=args.seed), batches, args.repeats)
    assert luca_tokens == base_tokens, (luca_tokens, base_tokens)
    luca_rate, base_rate = luca_tokens / luca_s, base_tokens / base_s
    speedup = luca_rate / base_rate

    breakdown = collator_breakdown(batches, args.max_length, args.seed, args.repeats)

    consumers = []
    if args.model_steps:
        consumers.append({"what": "measured here", **model_consumption(batches, args)})
    from_bench = train_bench_figure()
    if from_bench:
        consumers.append({"what": "bench_train_throughput", **from_bench})

    print(f"\n{data_info['micro_batches']} micro-batches of {args.batch_size} real records "
          f"({data_info['obj_type_counts']}), max_length {args.max_length}, {luca_tokens:,} tokens per pass; "
          f"best of {args.repeats} passes")  # fmt: skip
    _common.print_table(
        ["collator", "seconds/pass", "tokens/s", "us/micro-batch", "selected", "[MASK] of selected"],
        [
            ["lucatrain Collator", luca_s, luca_rate, 1e6 * luca_s / len(batches),
             same_job["lucatrain"]["selected_share"], same_job["lucatrain"]["mask_share_of_selected"]],
            ["pure Python", base_s, base_rate, 1e6 * base_s / len(batches),
             same_job["baseline"]["selected_share"], same_job["baseline"]["mask_share_of_selected"]],
        ],
    )  # fmt: skip
    total = breakdown["collator_total"]
    print("\nCollator breakdown, us per micro-batch (share):  "
          + "  ".join(f"{k}={v:.0f} ({v / total:.0%})" for k, v in breakdown.items() if k != "collator_total")
          + f"  total={total:.0f}")  # fmt: skip

    if consumers:
        print("\nwhat training consumes (one process):")
        _common.print_table(
            ["model", "source", "train tokens/s", "collate / model"],
            [[c["model"], c["what"], c["tokens_per_s"], f"{luca_rate / c['tokens_per_s']:.0f}x"] for c in consumers],
        )
        for c in consumers:
            c["collate_times_faster"] = luca_rate / c["tokens_per_s"]
        print(f"collate produces tokens {min(c['collate_times_faster'] for c in consumers):.0f}x or more faster than these models consume them")

    line, ok = _common.ratio_line("collate_speedup", speedup, TARGET)
    print(line)
    path = _common.write_results(
        "collate",
        {
            "settings": {k: v for k, v in vars(args).items() if k != "out_dir"},
            "other_processes_cpus_busy": {"before": load_before, "after": _common.other_load()},
            "data": data_info,
            "tokens_per_pass": luca_tokens,
            "lucatrain": {"seconds_per_pass": luca_s, "tokens_per_s": luca_rate},
            "baseline": {"seconds_per_pass": base_s, "tokens_per_s": base_rate},
            "mask_statistics": same_job,
            "collator_breakdown_us_per_micro_batch": breakdown,
            "model_consumption": consumers,
            "ratios": [{"name": "collate_speedup", "value": speedup, "target": TARGET, "pass": ok}],
        },
        args.out_dir,
    )
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
