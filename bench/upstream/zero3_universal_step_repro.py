"""ZeRO-3 universal-checkpoint load aliases Adam's `step` tensor across sub-groups (DeepSpeed 0.19.8).

Plain torch + DeepSpeed, CPU only (gloo), no launcher: each phase is a fresh set of processes made
with torch.multiprocessing.

  1. reference: 2 ranks, ZeRO-3 fp32, torch AdamW with two param groups (decay / no decay),
     trains 8 steps and saves a checkpoint after step 4.
  2. the step-4 checkpoint is converted with deepspeed.checkpoint.ds_to_universal.
  3. resume: 1 rank loads it with {"checkpoint": {"load_universal": true}} and trains steps 5..8
     on the same global batches (same data, same global batch size 8).
  4. the same resume, with each sub-group's `step` cloned after load_checkpoint (workaround).

Expected: resumed losses equal the reference up to float rounding (~1e-7 relative).
Observed with DeepSpeed 0.19.8 / torch 2.13: after the universal load every sub-group's optimizer
state holds the *same* `step` tensor object (runtime/zero/stage3.py,
load_hp_checkpoint_state_from_checkpoint_dir_stage3: `state_step = ...['state'][0]['step']` is
stored into `self.optimizer.state[fp32_param]['step']` for every sub-group). ZeRO-3 calls
optimizer.step() once per sub-group (`_optimizer_step`), and torch's Adam(W) increments
`state['step']` in place, so with 2 sub-groups the shared counter advances by 2 per step
(5 -> 6 at the first step after resuming from step 4: wrong bias correction) and the loss drifts
(~1e-3 relative after 4 steps). Cloning the step tensors after the load removes the drift.

Run:  python bench/upstream/zero3_universal_step_repro.py        (about 30-60 s on 2 CPU cores; first DeepSpeed use on a
      machine may JIT-build its CPU comm op first, ~1 min)
"""

import argparse
import json
import os
import shutil
import socket
import sys
import tempfile

import torch
import torch.multiprocessing as mp

STEPS, SAVE_AT, GLOBAL_BATCH, DIM = 8, 4, 8, 64
RESUMES = ("resume", "wd_only", "workaround")


def batch(step):
    """The global batch of `step`: the same tensors whatever the world size."""
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(GLOBAL_BATCH, DIM, generator=g)
    y = torch.randn(GLOBAL_BATCH, DIM, generator=g)
    return x, y


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = torch.nn.Linear(DIM, 4 * DIM)
        self.norm = torch.nn.LayerNorm(4 * DIM)
        self.fc2 = torch.nn.Linear(4 * DIM, DIM)

    def forward(self, x, y):
        return torch.nn.functional.mse_loss(self.fc2(torch.relu(self.norm(self.fc1(x)))), y)


def ds_config(world, load_universal):
    cfg = {
        "train_micro_batch_size_per_gpu": GLOBAL_BATCH // world,
        "gradient_accumulation_steps": 1,
        "train_batch_size": GLOBAL_BATCH,
        "gradient_clipping": 0.0,
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
        "steps_per_print": 10**9,
    }
    if load_universal:
        cfg["checkpoint"] = {"load_universal": True}
    return cfg


def worker(rank, world, port, mode, ckpt_dir, out_file):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    torch.manual_seed(0)
    model = Net()
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
                                  lr=1e-2, betas=(0.9, 0.98))
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer,
                                           config=ds_config(world, load_universal=mode in RESUMES))
    result = {"losses": {}}
    start = 0
    if mode in RESUMES:
        engine.load_checkpoint(ckpt_dir, tag="universal")
        states = [engine.optimizer.optimizer.state[f] for f in engine.optimizer.fp32_partitioned_groups_flat]
        result["steps_after_load"] = [float(s["step"]) for s in states]
        result["step_tensor_shared"] = states[0]["step"] is states[1]["step"]
        result["weight_decay_after_load"] = [g["weight_decay"] for g in engine.optimizer.param_groups]
        if mode == "workaround":  # the fix for this report: one step tensor per sub-group
            for s in states:
                s["step"] = s["step"].clone()
        if mode in ("wd_only", "workaround"):
            # a second, separate issue of the same function: every param group gets group 0's
            # hyperparameters (here weight_decay 0.01 for the no-decay group); put them back
            for group, wd in zip(engine.optimizer.param_groups, (0.01, 0.0)):
                group["weight_decay"] = wd
        start = engine.global_steps
    for step in range(start, STEPS):
        x, y = batch(step)
        per_rank = GLOBAL_BATCH // world
        x, y = x[rank * per_rank:(rank + 1) * per_rank], y[rank * per_rank:(rank + 1) * per_rank]
        loss = engine(x, y)
        engine.backward(loss)
        engine.step()
        # mean loss over the global batch
        total = loss.detach().clone() / world
        torch.distributed.all_reduce(total)
        result["losses"][step + 1] = float(total)
        if mode in RESUMES and step == start:
            flats = engine.optimizer.fp32_partitioned_groups_flat
            result["steps_after_first_step"] = [float(engine.optimizer.optimizer.state[f]["step"]) for f in flats]
        if mode == "reference" and step + 1 == SAVE_AT:
            engine.save_checkpoint(ckpt_dir, tag=f"step{SAVE_AT}")
    if rank == 0:
        with open(out_file, "w") as handle:
            json.dump(result, handle)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def run(world, mode, ckpt_dir, work):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = os.path.join(work, f"{mode}.json")
    mp.spawn(worker, args=(world, port, mode, ckpt_dir, out), nprocs=world, join=True)
    for name in os.listdir("/dev/shm"):  # DeepSpeed's CPU all-reduce buffers are never unlinked
        if name.startswith("deepspeed_allreduce_buffer_") and f"_{port}_" in name:
            os.unlink(os.path.join("/dev/shm", name))
    with open(out) as handle:
        return json.load(handle)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--keep", action="store_true", help="keep the temporary checkpoint directory")
    args = parser.parse_args()
    import deepspeed
    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    # Build DeepSpeed's CPU comm op once here, so the spawned ranks only load it from the cache.
    builder = deepspeed.get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is not None and deepspeed.ops.__compatible_ops__.get(builder.NAME, False):
        builder.load(verbose=False)

    work = tempfile.mkdtemp(prefix="z3-universal-step-")
    ckpt = os.path.join(work, "ckpt")
    try:
        ref = run(2, "reference", ckpt, work)
        ref1 = run(1, "reference1", ckpt, work)
        ds_to_universal(argparse.Namespace(input_folder=os.path.join(ckpt, f"step{SAVE_AT}"),
                                           output_folder=os.path.join(ckpt, "universal"), num_extract_workers=1,
                                           num_merge_workers=1, keep_temp_folder=False, strict=True,
                                           inject_missing_state=True))
        resumed = run(1, "resume", ckpt, work)
        wd_only = run(1, "wd_only", ckpt, work)
        fixed = run(1, "workaround", ckpt, work)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    print(f"\nDeepSpeed {deepspeed.__version__}, torch {torch.__version__}")
    print(f"after universal load: step = {resumed['steps_after_load']}, same tensor object in both sub-groups: "
          f"{resumed['step_tensor_shared']}")
    print(f"weight_decay per param group after universal load: {resumed['weight_decay_after_load']} (configured [0.01, 0.0])")
    print(f"after the first resumed step: step = {resumed['steps_after_first_step']} (expected "
          f"{[float(SAVE_AT + 1)] * 2}); with the workaround: {fixed['steps_after_first_step']}")
    cols = [("ref 1 rank", ref1), ("resumed, as is", resumed), ("+ wd restored", wd_only), ("+ step cloned", fixed)]
    print("loss per step; rel = relative difference to the uninterrupted 2-rank reference")
    print(f"{'step':>4} {'ref 2 ranks':>12}" + "".join(f" {name:>16} {'rel':>9}" for name, _ in cols))
    worst = {name: 0.0 for name, _ in cols}
    for step in range(SAVE_AT + 1, STEPS + 1):
        a = ref["losses"][str(step)]
        line = f"{step:>4} {a:>12.8f}"
        for name, res in cols:
            b = res["losses"][str(step)]
            worst[name] = max(worst[name], abs(b - a) / a)
            line += f" {b:>16.8f} {(b - a) / a:>+9.2e}"
        print(line)
    print("largest |rel| over the resumed steps:", {k: f"{v:.2e}" for k, v in worst.items()})
    bug = resumed["step_tensor_shared"] or worst["+ wd restored"] > 1e-5
    print("BUG REPRODUCED: shared step tensor / loss drift after universal load" if bug else "not reproduced")
    return 1 if bug else 0


if __name__ == "__main__":
    sys.exit(main())
