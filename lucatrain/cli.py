"""`lucatrain <verb>`: the one entry point (also `python -m lucatrain`).

    lucatrain prepare INPUT... --out DIR     files -> prepared, memory-mapped dataset
    lucatrain train --config RECIPE [section.key=value ...]
    lucatrain demo [section.key=value ...]  tiny real pretraining on the shipped sample data
    lucatrain demo clibd [section.key=value ...]   tiny CLIBD-style contrastive pretraining (image + DNA + text)
    lucatrain demo simclr [section.key=value ...]  tiny SimCLR pretraining on the shipped sample images
    lucatrain train --phenoscape CONFIG.yaml [...] a Phenoscape SimCLR config, mapped onto the simclr recipe
    lucatrain plot RUN_DIR                         PNG curves (loss, lr, metrics) in RUN_DIR/plots
    lucatrain audit RUN_DIR [--compare RUN_DIR2]   what the progress ledger says was trained on
    lucatrain export RUN_OR_CHECKPOINT --out DIR [--heads]   transformers-loadable encoder (+ task heads)

Launch several processes with any launcher, e.g.
    deepspeed --num_gpus 2 $(command -v lucatrain) train --config lucavirus_v1.0 ...
    torchrun --nproc_per_node 2 -m lucatrain train --config ...
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from lucatrain.config import ConfigError, load_config, shipped_recipes
from lucatrain.errors import TrainingInterrupted

REPO_DIR = Path(__file__).resolve().parents[1]
EXAMPLES_DIR = REPO_DIR / "examples" / "data"
DEMO_TRAIN = EXAMPLES_DIR / "lucaone_sample" / "train" / "train.csv"
DEMO_DEV = EXAMPLES_DIR / "lucaone_sample" / "dev" / "dev.csv"
CLIBD_SAMPLE = EXAMPLES_DIR / "clibd_sample.hdf5"


def _demo_defaults(family: str) -> tuple[str, list[str]]:
    """(recipe, overrides) of a demo; the shipped files by absolute path, so any working directory works."""
    if family == "simclr":
        photos = EXAMPLES_DIR / "simclr_sample"
        return "simclr_tiny", ["train.output_dir=runs/demo_simclr", f"data.train_files=[{photos / 'train'}]",
                               f"data.dev_splits={{val: [{photos / 'val'}], bank: [{photos / 'train'}]}}"]  # fmt: skip
    if family == "clibd":
        splits = ", ".join(f"{name}: [{CLIBD_SAMPLE}]" for name in ("val_seen", "val_unseen", "all_keys"))
        return "clibd_tiny", ["train.output_dir=runs/demo_clibd", f"data.train_files=[{CLIBD_SAMPLE}]", f"data.dev_splits={{{splits}}}"]
    return "demo_tiny", [f"data.train_files=[{DEMO_TRAIN}]", f"data.dev_files=[{DEMO_DEV}]"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lucatrain", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # The deepspeed launcher appends --local_rank=N; LOCAL_RANK in the environment says the same.
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    verbs = parser.add_subparsers(dest="verb", required=True)

    prep = verbs.add_parser("prepare", help="turn input files into a prepared dataset")
    prep.add_argument("inputs", nargs="+", help="files or directories (CSV, FASTA, Swiss-Prot, Parquet, JSONL)")
    prep.add_argument("--out", required=True, help="output directory of the prepared dataset")
    prep.add_argument("--format", default="auto", help="auto, lucaone_csv, seq_label_csv, fasta, fastq, swissprot, parquet, jsonl")
    prep.add_argument("--fasta-obj-type", default="auto", choices=("auto", "gene", "prot"))
    prep.add_argument("--bad-records", default="fail", choices=("fail", "skip"))
    prep.add_argument("--duplicates", default="keep", choices=("keep", "drop", "fail"), help="records sharing an obj_id")
    prep.add_argument("--workers", type=int, default=0, help="processes in parallel (0: one for inputs under 16 MB, else one per CPU)")
    prep.add_argument("--shard-mb", type=float, default=32, help="input megabytes per shard, the unit of parallel and resumable work")
    prep.add_argument("--config", default=None, help="a recipe: its model family's record checks apply (model.model_type)")
    prep.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                      help="config override, e.g. --set model.model_type=seq_finetune --set finetune.label_file=label.txt")

    aud = verbs.add_parser("audit", help="report from a run's progress ledger: consumption, duplicates, unseen ids")
    aud.add_argument("run_dir", help="a run directory (its latest complete checkpoint is read) or a checkpoint directory")
    aud.add_argument("--compare", default=None, help="another run: did both consume the same ids in the same order?")

    exp = verbs.add_parser("export", help="write a checkpoint's encoder (and task heads) for downstream use")
    exp.add_argument("source", help="a run directory (its latest complete checkpoint), a checkpoint directory, or a LucaOne checkpoint-step<N>/")
    exp.add_argument("--out", required=True, help="output directory (config.json, model.safetensors, ...)")
    exp.add_argument("--heads", action="store_true", help="also write heads.safetensors and heads.json")

    plot = verbs.add_parser("plot", help="PNG curves of a run's history (RUN_DIR/plots/)")
    plot.add_argument("run_dir", help="a run directory (holding history.jsonl)")

    for name, help_text in (("train", "pretrain"), ("demo", "tiny real pretraining on the shipped sample")):
        sub = verbs.add_parser(name, help=help_text)
        sub.add_argument("--config", default="demo_tiny" if name == "demo" else None,
                         help=f"YAML recipe path or shipped name {shipped_recipes()}")
        sub.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
        if name == "train":
            sub.add_argument("--phenoscape", default=None, metavar="CONFIG.yaml",
                             help="a Phenoscape SimCLR config: its keys become overrides of the simclr recipe")  # fmt: skip
        sub.add_argument("overrides", nargs="*", help="section.key=value (CLI > YAML > defaults)")
    return parser


def _prepare(args) -> int:
    from lucatrain.data.prepared import prepare
    from lucatrain.families import get_family
    from lucatrain.monitor import get_logger, setup_logging

    setup_logging(None)  # console only: resuming, warnings about the data
    # The family (and its settings, e.g. a fine-tuning label file) decide how records are checked.
    cfg = load_config(args.config, [*args.set, f"data.train_files=[{', '.join(args.inputs)}]"])
    recipe = get_family(cfg.model.model_type)(cfg, get_logger()).prepare_recipe()
    data = prepare(args.inputs, args.out, fmt=args.format, fasta_obj_type=args.fasta_obj_type, bad_records=args.bad_records,
                   duplicates=args.duplicates, recipe=recipe, workers=args.workers, shard_bytes=int(args.shard_mb * 2**20))  # fmt: skip
    print(f"prepared {data.num_records} records into {data.path} (fingerprint {data.fingerprint[:16]})")
    return 0


def _checkpoint_of(run_or_checkpoint: str) -> Path:
    """A committed checkpoint directory, or the latest committed one of a run directory."""
    from lucatrain.checkpoint import find_resume_checkpoint, read_valid_manifest

    path = Path(run_or_checkpoint)
    if read_valid_manifest(path) is not None:
        return path
    if (path / "checkpoints").is_dir() or not (path / "latest").exists():
        return find_resume_checkpoint(path / "checkpoints", "latest")
    return find_resume_checkpoint(path, "latest")  # RUN/checkpoints itself


def _ledger_of(run_or_checkpoint: str):
    """(checkpoint, its ledger with every id read): the newest sound checkpoint; one whose ledger
    segments do not match their checksums is passed over, saying why, for the one before it."""
    from lucatrain.checkpoint import committed, read_valid_manifest
    from lucatrain.progress import Ledger

    path = _checkpoint_of(run_or_checkpoint)
    candidates = [path] + [p for p in reversed(committed(path.parent)) if p.name < path.name and read_valid_manifest(p, verify=True)]
    for candidate in candidates:
        ledger = Ledger.from_checkpoint(candidate)
        try:
            for epoch in ledger.epochs():
                ledger.consumed_ids(epoch)
            return candidate, ledger
        except ValueError as err:
            print(f"lucatrain audit: {err}; auditing the checkpoint before {candidate.name}", file=sys.stderr)
    raise ValueError(f"no checkpoint of {run_or_checkpoint} has a readable progress ledger")


def _export(args) -> int:
    from lucatrain.export import export_checkpoint, export_lucaone_checkpoint
    from lucatrain.models.lucaone_checkpoint import is_lucaone_checkpoint

    out_dir = Path(args.out)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ValueError(f"--out {out_dir} is not empty; choose a new directory or remove it (an export never mixes with other files)")
    if is_lucaone_checkpoint(args.source):  # LucaOne's own checkpoint-step<N>/: no training run needed
        if args.heads:
            raise ValueError(f"{args.source} is a LucaOne checkpoint: its task heads need their label files to be named, which "
                             "a run provides (start one with model.model_dirpath and train.max_steps=1); export the encoder "
                             "without --heads")  # fmt: skip
        out = export_lucaone_checkpoint(args.source, out_dir)
        print(f"exported {args.source} -> {out} (the encoder of a LucaOne checkpoint)")
        return 0
    path = _checkpoint_of(args.source)
    out = export_checkpoint(path, args.out, with_heads=args.heads)
    print(f"exported {path} -> {out}" + (" (with task heads)" if args.heads else ""))
    return 0


def _audit(args) -> int:
    import numpy as np

    from lucatrain.data.prepared import is_prepared, load_prepared
    from lucatrain.progress import audit

    from lucatrain.checkpoint import read_checkpoint_state

    path, ledger = _ledger_of(args.run_dir)
    state = read_checkpoint_state(path)["trainer"]
    all_ids = None
    if is_prepared(state.get("train_data", "")):
        all_ids = load_prepared(state["train_data"]).sample_ids
    report = audit(ledger, all_ids)
    print(f"checkpoint {path}: step {state['global_step']}, {ledger.samples_seen} samples, {ledger.tokens_seen} tokens")
    duplicated = False
    for epoch, entry in report.items():
        line = f"epoch {epoch}: consumed {entry['consumed']}, unique {entry['unique']}, duplicates {entry['num_duplicates']}"
        if "never_seen" in entry:
            line += f", never seen {entry['never_seen']} of {len(all_ids)}"
        print(line)
        if entry["num_duplicates"]:
            duplicated = True
            print(f"  duplicated ids (first {len(entry['duplicates'])}): {entry['duplicates']}")
    if args.compare:
        other_path, other = _ledger_of(args.compare)
        epochs = sorted(set(ledger.epochs()) | set(other.epochs()))
        for epoch in epochs:
            mine, theirs = ledger.consumed_ids(epoch), other.consumed_ids(epoch)
            n = min(len(mine), len(theirs))
            diverge = np.flatnonzero(mine[:n] != theirs[:n])
            if len(diverge):
                print(f"epoch {epoch}: runs diverge at position {int(diverge[0])} ({len(mine)} vs {len(theirs)} consumed)")
            else:
                print(f"epoch {epoch}: same ids in the same order for the first {n} ({len(mine)} vs {len(theirs)} consumed)")
    return 1 if duplicated else 0


def _train(args, demo: bool) -> int:
    overrides = list(args.overrides)
    config = args.config
    if demo:
        family = overrides.pop(0) if overrides and "=" not in overrides[0] else "lucaone"
        if family not in ("lucaone", "clibd", "simclr"):
            raise ConfigError(f"`lucatrain demo {family}`: the demos are lucaone (the default), clibd and simclr")
        recipe, defaults = _demo_defaults(family)
        config = recipe if config == "demo_tiny" else config
        given = {o.split("=", 1)[0] for o in overrides}
        if "train.overwrite_output_dir" not in given and "train.trained_checkpoint" not in given:
            overrides.append("train.overwrite_output_dir=true")  # the demo's run directory is its own scratch space
        overrides = [d for d in defaults if d.split("=", 1)[0] not in given] + overrides
    if getattr(args, "phenoscape", None):
        from lucatrain.families.simclr.phenoscape import phenoscape_overrides

        mapped, notes = phenoscape_overrides(args.phenoscape)
        config = config or "simclr"
        overrides = mapped + overrides  # the command line still wins
        for note in notes:
            print(f"lucatrain: {note}", file=sys.stderr)
    cfg = load_config(config, overrides)
    if not cfg.data.train_files:
        raise ConfigError("`data.train_files` is empty: give input files or a prepared dataset directory")
    from lucatrain.trainer import run_training

    run_training(cfg)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.verb == "prepare":
            code = _prepare(args)
        elif args.verb == "audit":
            code = _audit(args)
        elif args.verb == "export":
            code = _export(args)
        elif args.verb == "plot":
            from lucatrain.plot import plot_run

            for path in plot_run(args.run_dir):
                print(path)
            code = 0
        else:
            code = _train(args, demo=args.verb == "demo")
    except (ConfigError, FileNotFoundError, ValueError) as err:
        # User errors: one clear line, no traceback (LUCATRAIN_DEBUG=1 shows it), non-zero exit.
        if os.environ.get("LUCATRAIN_DEBUG"):
            raise
        print(f"lucatrain {args.verb}: error: {err}", file=sys.stderr)
        return 2
    except TrainingInterrupted as err:
        print(f"lucatrain {args.verb}: {err}", file=sys.stderr)
        return 128 + int(err.signal)  # what a shell reports for a process ended by that signal
    return code


if __name__ == "__main__":
    sys.exit(main())
