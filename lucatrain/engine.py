"""DeepSpeed, in one place: process group, engine construction, backward/step, save/load, export.

This is the only module that imports `deepspeed`. The same code serves one CPU process, several
CPU processes over gloo and N GPUs over NCCL; DeepSpeed's accelerator abstraction picks the device
and the communication backend.

Batch sizes, accumulation and clipping in the DeepSpeed JSON are "auto": they are filled from the
training config here, so the two never disagree silently.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import warnings
from pathlib import Path

import torch

from lucatrain import dist
from lucatrain.faults import fault_at
from lucatrain.optim import LARS, lr_multiplier, param_groups

# DeepSpeed still calls collectives that torch deprecated; the warning repeats every step.
warnings.filterwarnings("ignore", message=r"`torch.distributed.(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated")

DS_CONFIG_DIR = Path(__file__).resolve().parents[1] / "ds_configs"
PARAM_GROUP_NAMES = "lucatrain_param_group_names"  # client-state key: `Engine.param_group_names()`
SHIPPED_DS_CONFIGS = ("zero0", "zero1", "zero2", "zero3", "zero3_offload")


def resolve_ds_config_path(name_or_path: str) -> Path:
    """A shipped config name (`zero2`) or a path to a DeepSpeed JSON file."""
    candidates = [Path(name_or_path), DS_CONFIG_DIR / f"{name_or_path}.json", DS_CONFIG_DIR / name_or_path]
    for path in candidates:
        if path.is_file():
            return path
    raise FileNotFoundError(f"DeepSpeed config {name_or_path!r} not found (looked in {DS_CONFIG_DIR})")


def init_distributed() -> None:
    """Join the process group set up by the launcher (deepspeed, torchrun), or make a 1-process one.

    Plain `python -m lucatrain train` has no launcher environment; DeepSpeed still needs a process
    group, so we describe a world of one on a free local port.
    """
    import deepspeed

    if dist.is_initialized():
        return
    init = {}
    if "RANK" not in os.environ:
        # A world of one rendezvouses through a file, not a port: no race with other processes
        # picking "free" ports at the same moment.
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "0")
        store = tempfile.NamedTemporaryFile(prefix="lucatrain-rendezvous-", delete=False)
        store.close()
        os.unlink(store.name)  # the file store creates it; a stale one would hold old state
        init = {"init_method": f"file://{store.name}", "rank": 0, "world_size": 1}
    accelerator = deepspeed.get_accelerator()
    if accelerator.device_name() == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    with _no_cpu_shm_comm_op():
        deepspeed.init_distributed(dist_backend=accelerator.communication_backend_name(), verbose=False, **init)


@contextlib.contextmanager
def _no_cpu_shm_comm_op():
    """Start DeepSpeed's communication backend without its CPU shared-memory comm op.

    On CPU, DeepSpeed's TorchBackend JIT-compiles that op (about 70 s with a C++ compiler, and a
    compiler must be on PATH) and maps a 69 MB /dev/shm buffer per rank that it never removes. The op
    serves one call only, `inference_all_reduce` (tensor-parallel inference kernels), which falls back
    to the process group's all_reduce without it; training's collectives always go through
    torch.distributed (gloo). So lucatrain marks the op incompatible while the backend starts, which is
    DeepSpeed's own path for a machine that cannot build it. No compiler runs at training time, no
    build lock can be left behind by a killed start, and nothing is left in /dev/shm.
    """
    import deepspeed

    builder = deepspeed.get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is None:  # an accelerator without the op (CUDA): nothing to avoid
        yield
        return
    compatible = deepspeed.ops.__compatible_ops__
    before = compatible.get(builder.NAME, False)
    compatible[builder.NAME] = False
    try:
        yield
    finally:
        compatible[builder.NAME] = before


def device() -> torch.device:
    import deepspeed

    return torch.device(deepspeed.get_accelerator().current_device_name())


def peak_memory_bytes() -> int:
    """Peak accelerator memory of this process; on CPU the peak resident set size."""
    if torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated())
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def build_ds_config(cfg, world_size: int) -> dict:
    """The DeepSpeed JSON with every "auto" filled from the training config."""
    path = resolve_ds_config_path(cfg.deepspeed.config)
    try:
        ds = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON: {err}") from None
    train = cfg.train
    ds["train_micro_batch_size_per_gpu"] = train.batch_size
    ds["gradient_accumulation_steps"] = train.gradient_accumulation_steps
    ds["train_batch_size"] = train.batch_size * train.gradient_accumulation_steps * world_size
    ds["gradient_clipping"] = train.max_grad_norm
    precision = cfg.deepspeed.precision
    # check_grad_overflow: ZeRO-1/2 then drop a bf16 step whose gradients are not finite (train.nonfinite=skip).
    ds["bf16"] = {"enabled": precision == "bf16", "check_grad_overflow": train.nonfinite == "skip"}
    ds["fp16"] = {**ds.get("fp16", {}), "enabled": precision == "fp16"}
    ds.setdefault("steps_per_print", 10**9)  # lucatrain does its own logging
    ds.setdefault("wall_clock_breakdown", False)
    ds.setdefault("zero_optimization", {"stage": 0})
    zero = ds["zero_optimization"]
    if zero.get("stage", 0) in (1, 2) and "contiguous_gradients" not in zero:
        # Left to us: the contiguous gradient buffer serves the partitioned reduction; one process has
        # nothing to partition and would only pay the copy of every gradient into it (about 2.5 % of a
        # CLIBD step on CPU, bench/bench_clibd_throughput.py).
        zero["contiguous_gradients"] = world_size > 1
    if _offloads_optimizer(ds) and device().type != "cuda":
        # DeepSpeedCPUAdam would need another JIT-built op; torch's AdamW is as good on a CPU host.
        ds["zero_force_ds_cpu_optimizer"] = False
    for key, value in ds.items():
        if value == "auto":
            raise ValueError(f"{path}: key {key!r} is 'auto' but lucatrain has no value for it")
    stage = ds["zero_optimization"].get("stage", 0)
    if train.nonfinite == "skip" and not (precision == "fp16" or (precision == "bf16" and stage in (1, 2))):
        raise ValueError(
            f"`train.nonfinite=skip` needs DeepSpeed to drop a non-finite step, which it does with deepspeed.precision=bf16 at "
            f"ZeRO stage 1 or 2, or with fp16; this run has {precision} at stage {stage} ({path.name}). Use one of those, "
            "or train.nonfinite=stop"
        )
    return ds


def _make_optimizer(module: torch.nn.Module, cfg, ds_config: dict) -> torch.optim.Optimizer:
    """`train.optimizer` over two groups: weights with `train.weight_decay`, 1-d parameters without."""
    train = cfg.train
    groups = param_groups(module, train.weight_decay)
    kwargs = dict(lr=train.learning_rate, betas=(train.adam_beta1, train.adam_beta2), eps=train.adam_epsilon)
    offload = _offloads_optimizer(ds_config)
    if train.optimizer != "adamw" and offload:
        raise ValueError(f"`train.optimizer={train.optimizer}` with an offloaded optimizer ({cfg.deepspeed.config}): offload runs "
                         "DeepSpeed's CPU Adam; use train.optimizer=adamw, or a config without offload")  # fmt: skip
    if train.optimizer == "adam":
        return torch.optim.Adam(groups, **kwargs)
    if train.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=train.learning_rate, momentum=train.momentum, nesterov=train.nesterov)
    if train.optimizer == "lars":
        stage = ds_config.get("zero_optimization", {}).get("stage", 0)
        if stage != 0 or ds_config["bf16"]["enabled"] or ds_config["fp16"]["enabled"]:
            raise ValueError(f"`train.optimizer=lars` needs ZeRO-0 in fp32 (this run: ZeRO-{stage}, {cfg.deepspeed.precision}): "
                             "ZeRO and DeepSpeed's mixed-precision optimizers flatten the parameters into one tensor "
                             "per group, and LARS's trust ratio is per layer")  # fmt: skip
        decay, no_decay = groups
        return LARS([{**decay, "lars": True}, {**no_decay, "lars": False}], lr=train.learning_rate, momentum=train.momentum,
                    trust_coefficient=train.lars_trust_coefficient)  # fmt: skip
    if offload and ds_config.get("zero_force_ds_cpu_optimizer", True):
        from deepspeed.ops.adam import DeepSpeedCPUAdam  # what DeepSpeed requires with offload on GPUs

        return DeepSpeedCPUAdam(groups, adamw_mode=True, **kwargs)
    return torch.optim.AdamW(groups, **kwargs)


def _offloads_optimizer(ds_config: dict) -> bool:
    offload = ds_config.get("zero_optimization", {}).get("offload_optimizer", {})
    return offload.get("device", "none") not in ("none", None)


class Engine:
    """A DeepSpeed engine around a Task module, with the few verbs the trainer needs."""

    def __init__(self, module: torch.nn.Module, cfg, load_universal: bool = False, after_step=(), schedule_steps: int | None = None):
        """load_universal: the checkpoint to resume from is a universal one (another world size).

        schedule_steps: the step at which the LR schedule ends (default `train.schedule_steps`, else
        `train.max_steps`; the trainer passes `Trainer.schedule_length()`).

        after_step: callables `hook(engine)`, run on every rank after each optimizer update (see
        `step`), e.g. clamping CLIP's logit scale with `edit_parameter`.
        """
        import deepspeed

        self.cfg = cfg
        self.world_size = dist.world_size()
        self.ds_config = build_ds_config(cfg, self.world_size)
        if load_universal:
            self.ds_config["checkpoint"] = {"load_universal": True}
        optimizer = _make_optimizer(module, cfg, self.ds_config)
        train = cfg.train

        def schedule(optim):
            return torch.optim.lr_scheduler.LambdaLR(
                optim,
                lambda step: lr_multiplier(
                    step, train.lr_scheduler, train.warmup_steps, schedule_steps or train.schedule_steps or train.max_steps,
                    train.learning_rate, train.lr2, train.one_cycle_pct_start, train.one_cycle_div_factor,
                    train.one_cycle_final_div_factor,
                ),
            )

        self.ds, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=module, optimizer=optimizer, lr_scheduler=schedule, config=self.ds_config
        )
        self.zero_stage = self.ds.zero_optimization_stage()
        # Per-group hyperparameters as configured; a load must not change them (see `load`).
        self._group_settings = [
            {k: g[k] for k in ("weight_decay", "betas", "eps", "momentum", "nesterov", "trust_coefficient") if k in g}
            for g in self.ds.optimizer.param_groups
        ]
        if self.world_size == 1 and self.zero_stage == 0:
            # With one rank the gradient all-reduce is an identity that still flattens and copies
            # every gradient (~1% of a small model's step, bench/README.md).
            self.ds.enable_backward_allreduce = False
        self.device = self.ds.device
        self.after_step = tuple(after_step)

    @property
    def module(self) -> torch.nn.Module:
        return self.ds.module

    def __call__(self, *args, **kwargs):
        return self.ds(*args, **kwargs)

    def train(self) -> None:
        self.ds.train()

    def eval(self) -> None:
        self.ds.eval()

    def backward(self, loss: torch.Tensor) -> None:
        """Backward of a loss already normalised by the whole step's target count (see lucatrain/task.py).

        DeepSpeed would divide by the accumulation steps (we switch that off) and averages
        gradients over ranks (we undo that by scaling with the world size), so the gradient is the
        exact gradient of the per-target mean over the global batch.
        """
        if fault_at("nan", self.ds.global_steps + 1):  # test hook: this step's loss goes non-finite
            loss = loss * float("nan")
        self.ds.backward(loss * self.world_size, scale_wrt_gas=False)

    def step(self) -> None:
        """Call after every micro-batch; DeepSpeed updates at the accumulation boundary.

        The `after_step` hooks run only after that update, not after every micro-batch: the
        boundary is read before `ds.step()`, which advances DeepSpeed's micro-step counter. A step
        that fp16's loss scaler skips (overflow) is still a boundary, so hooks run then too; a hook
        should be idempotent (a clamp is). Hooks run on every rank, so they may be collective.
        """
        boundary = self.ds.is_gradient_accumulation_boundary()
        self.ds.step()
        if boundary:
            for hook in self.after_step:
                hook(self)

    def edit_parameter(self, param: torch.nn.Parameter, fn) -> None:
        """Replace `param`'s value by `fn(value)`, `value` its full fp32 value (collective).

        `param.data.copy_(...)` is not enough: DeepSpeed may keep the value twice. The optimizer
        updates an fp32 master copy (ZeRO 1-3, and bf16/fp16 at any stage) and then overwrites the
        working parameter the forward uses (low precision, and under ZeRO-3 partitioned) from it,
        so an edit of the working copy alone is undone by the next step, and an edit of the master
        alone is not seen until then. This writes both:

        * ZeRO-1/2, and DeepSpeed's bf16 optimizer: each rank owns a slice of the fp32 master
          (`safe_set_full_fp32_param` writes that slice); `param.data` is whole on every rank.
        * ZeRO-3: the fp32 master and the working parameter are both partitioned; this rank's
          master partition is written (`safe_set_local_fp32_param`; the full-value setter of
          DeepSpeed 0.19 fails on the last rank when the size does not divide by the world size),
          and the working copy is gathered, edited on rank 0 and re-partitioned on exit.
        * ZeRO-0 bf16/fp16 (DeepSpeed's unfused mixed-precision wrapper): fp32 masters are kept
          per parameter; that copy and `param.data` are written.
        * ZeRO-0 fp32, and frozen parameters: `param.data` is the only copy.

        `fn` gets a fresh fp32 tensor of the parameter's full shape and returns the new value
        (same shape; it may edit its argument in place and return it). Rank 0's result is
        broadcast, so every rank ends with the same value even if `fn` is not deterministic.
        Every rank must call this for the same parameters in the same order.
        """
        import deepspeed
        import deepspeed.comm as ds_comm
        from deepspeed.utils import safe_get_full_fp32_param, safe_set_full_fp32_param, safe_set_local_fp32_param

        zero3 = hasattr(param, "ds_id")
        shape = param.ds_shape if zero3 else param.shape
        with torch.no_grad():
            master = safe_get_full_fp32_param(param)  # collective under ZeRO; None: no separate fp32 copy
            unfused_master = None
            if master is None and param.requires_grad and not zero3:
                unfused_master = self._unfused_fp32_master(param)
                master = unfused_master
            if master is not None:
                value = master.detach().float().clone()
            elif zero3:  # frozen ZeRO-3 parameter: gather the working copy
                with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
                    value = param.data.float().clone()
            else:
                value = param.data.float().clone()

            new = fn(value)
            if not isinstance(new, torch.Tensor) or tuple(new.shape) != tuple(shape):
                got = tuple(new.shape) if isinstance(new, torch.Tensor) else type(new).__name__
                raise ValueError(f"edit_parameter: fn must return a tensor of shape {tuple(shape)}, got {got}")
            new = new.detach().to(device=value.device, dtype=torch.float32).contiguous()
            dist.broadcast_(new, src=0)

            if zero3:
                if master is not None:
                    group = param.ds_process_group
                    part = param.ds_tensor.ds_numel  # this rank's partition, padded to equal sizes
                    flat = torch.zeros(part * ds_comm.get_world_size(group=group), dtype=torch.float32, device=new.device)
                    flat[: new.numel()] = new.flatten()
                    mine = ds_comm.get_rank(group=group)
                    safe_set_local_fp32_param(param, flat[part * mine : part * (mine + 1)])
                with deepspeed.zero.GatheredParameters([param], modifier_rank=0):  # rank 0 of the param's group
                    if ds_comm.get_rank(group=param.ds_process_group) == 0:
                        param.data.copy_(new.to(param.dtype))
                return
            if unfused_master is not None:
                unfused_master.copy_(new)
            elif master is not None:
                safe_set_full_fp32_param(param, new)
            param.data.copy_(new.to(device=param.device, dtype=param.dtype))

    def _unfused_fp32_master(self, param: torch.nn.Parameter) -> torch.Tensor | None:
        """The fp32 master of a trainable parameter that has no ZeRO/bf16-optimizer mapping.

        None where `param.data` is itself the master (ZeRO-0 fp32: the client optimizer is used
        as is). ZeRO-0 bf16/fp16 wraps it in DeepSpeed's FP16_UnfusedOptimizer, which keeps one
        fp32 copy per parameter (`fp32_groups`, parallel to `fp16_groups`). Anything else that
        might hide a master copy is refused rather than edited on one side only.
        """
        from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer

        optimizer = self.ds.optimizer
        if isinstance(optimizer, FP16_UnfusedOptimizer):
            for lp_group, fp32_group in zip(optimizer.fp16_groups, optimizer.fp32_groups):
                for lp, fp32 in zip(lp_group, fp32_group):
                    if lp is param:
                        return fp32
            raise ValueError("edit_parameter: the parameter is not one this engine's optimizer trains")
        if self.zero_stage == 0 and optimizer is getattr(self.ds, "basic_optimizer", optimizer) and param.dtype == torch.float32:
            return None
        raise ValueError(
            f"edit_parameter: cannot reach the fp32 master copy of a parameter under ZeRO-{self.zero_stage} with "
            f"precision {self.cfg.deepspeed.precision} (DeepSpeed optimizer {type(optimizer).__name__}); editing only "
            "the working copy would be undone by the next step"
        )

    @property
    def skipped_steps(self) -> int:
        """Optimizer steps DeepSpeed did not apply (fp16 loss-scale overflow, non-finite bf16 gradients)."""
        return int(self.ds.skipped_steps)

    def advance_schedule(self) -> None:
        """Step the learning-rate schedule for an update DeepSpeed skipped (it does not), so the rate
        stays a function of the optimizer step count, in an interrupted run and a resumed one alike."""
        if self.ds.lr_scheduler is not None:
            self.ds.lr_scheduler.step()

    def grad_norm(self) -> float | None:
        norm = self.ds.get_global_grad_norm()
        return None if norm is None else float(norm)

    def lr(self) -> float:
        return float(self.ds.get_lr()[0])

    @property
    def global_steps(self) -> int:
        return int(self.ds.global_steps)

    def param_group_names(self) -> list[list[str]] | None:
        """The parameter names of each group of DeepSpeed's unfused mixed-precision optimizer (ZeRO-0 in
        bf16/fp16), in the group's order; None under any other optimizer. Saved with every checkpoint:
        that optimizer stores its fp32 masters per group without names, and an offline export
        (`export.checkpoint_state_dict`) needs them to tell which master is which weight."""
        groups = getattr(self.ds.optimizer, "fp16_groups", None)
        if groups is None or self.zero_stage != 0:
            return None
        names = {id(p): n for n, p in self.module.named_parameters()}
        return [[names[id(p)] for p in group] for group in groups]

    def save(self, directory: str | Path, tag: str, client_state: dict) -> None:
        """Model + optimizer + scheduler shards of every rank (collective)."""
        from deepspeed.checkpoint.constants import UNIVERSAL_CHECKPOINT_INFO, UNIVERSAL_CHECKPOINT_VERSION_KEY, UNIVERSAL_CHECKPOINT_VERSION_VALUE

        # Marks the checkpoint convertible to DeepSpeed's universal format (resume at another world size).
        client_state = {**client_state, UNIVERSAL_CHECKPOINT_INFO: {UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE},
                        PARAM_GROUP_NAMES: self.param_group_names()}  # fmt: skip
        self.ds.save_checkpoint(str(directory), tag=tag, client_state=client_state, save_latest=False)

    def load(self, directory: str | Path, tag: str) -> dict:
        """Restore a `save` (collective); returns the client_state."""
        path, client_state = self.ds.load_checkpoint(str(directory), tag=tag, load_module_strict=True)
        if path is None:
            raise FileNotFoundError(f"no DeepSpeed checkpoint {tag!r} under {directory}")
        self._unshare_optimizer_steps()
        # DeepSpeed 0.19's ZeRO-3 universal load gives every parameter group the first group's
        # weight_decay, so biases and LayerNorms would start decaying; put the configured values back.
        # The same holds for a resume that changed betas, eps or weight decay on purpose: this run's
        # config wins, and a change is logged.
        changed = set()
        for group, settings in zip(self.ds.optimizer.param_groups, self._group_settings):
            changed.update(k for k, v in settings.items() if k in group and group[k] != v and k != "weight_decay")
            group.update(settings)
        self._follow_configured_schedule(changed)
        return client_state or {}

    def _unshare_optimizer_steps(self) -> None:
        """Give every optimizer state its own `step` tensor after a load.

        DeepSpeed 0.19's ZeRO-3 universal load (`load_hp_checkpoint_state_from_checkpoint_dir_stage3`
        in runtime/zero/stage3.py) stores one and the same `step` tensor in the state of every
        sub-group. ZeRO-3 calls the optimizer once per sub-group and torch's Adam(W) increments
        `step` in place, so with two groups (decay, no decay) the shared counter advanced by 2 per
        optimizer step: bias correction ran ahead (step 8 at the first step after a resume from step
        6) and the loss drifted (+0.24% after 6 steps on the test model). A same-world-size load
        goes through torch's `load_state_dict`, which already copies each state, so this is a no-op there.
        """
        base = getattr(self.ds.optimizer, "optimizer", None)  # the client optimizer inside ZeRO's wrapper
        states = getattr(base, "state", None)
        if not states:
            return
        seen = set()
        for state in states.values():
            step = state.get("step") if isinstance(state, dict) else None
            if not isinstance(step, torch.Tensor):
                continue
            if id(step) in seen:
                state["step"] = step.detach().clone()
            seen.add(id(state["step"]))

    def _follow_configured_schedule(self, changed_settings: set) -> None:
        """After a load: the learning rate follows this run's schedule from the restored step.

        The LR scheduler's state comes back from the checkpoint with the old peak (`base_lrs`), so a
        resume that lowers `train.learning_rate` (the usual reason to resume after a spike) would train
        on at the old rate. The schedule function itself is this run's (LambdaLR saves none), so
        resetting the peak and re-evaluating at the restored step gives exactly the configured
        schedule; with an unchanged config it reproduces the saved rate bit for bit.
        """
        from lucatrain.monitor import get_logger

        scheduler, train = self.scheduler, self.cfg.train
        old_peaks = sorted(set(scheduler.base_lrs))
        scheduler.base_lrs = [train.learning_rate for _ in scheduler.base_lrs]
        rates = []
        for group, base, schedule in zip(scheduler.optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
            group["initial_lr"] = base
            group["lr"] = base * schedule(scheduler.last_epoch)
            rates.append(group["lr"])
        scheduler._last_lr = rates
        if old_peaks != [train.learning_rate]:
            get_logger().warning("resume: learning rate peak %s -> %s (train.learning_rate); the %s schedule continues at "
                                 "step %d with lr %.4g", old_peaks, train.learning_rate, train.lr_scheduler,
                                 scheduler.last_epoch, rates[0])  # fmt: skip
        if changed_settings:
            get_logger().warning("resume: optimizer settings %s now come from this run's config", sorted(changed_settings))

    def full_state_dict(self, submodule: torch.nn.Module) -> dict[str, torch.Tensor]:
        """fp32 state dict of `submodule`, assembled from shards (collective: call on every rank).

        Uses the optimizer's fp32 master weights when DeepSpeed keeps them (bf16/fp16, ZeRO), so an
        export from a bf16 run is not rounded to bf16. A parameter without a master (ZeRO-0 fp32, or
        one that is not trained: a frozen encoder, LoRA's base weights) is read as it is, gathered
        first under ZeRO-3, where each rank holds only a slice of it; a 4-bit QLoRA base weight is
        dequantized.
        """
        import deepspeed
        from deepspeed.utils import safe_get_full_fp32_param

        from lucatrain.models.lora import dequantized

        state = {}
        for name, param in submodule.named_parameters(remove_duplicate=False):
            full = safe_get_full_fp32_param(param) if param.requires_grad else None
            if full is None and not param.requires_grad:
                full = dequantized(param)  # a QLoRA base weight: packed 4-bit, stands for a float matrix
            if full is None and param.requires_grad and not hasattr(param, "ds_id"):
                full = self._unfused_fp32_master(param)  # ZeRO-0 bf16/fp16 keep their masters elsewhere
            if full is None and hasattr(param, "ds_id"):  # ZeRO-3 partitioned, no master: gather it whole
                with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
                    full = param.detach().float().cpu().clone()
            elif full is None:  # ZeRO-0 fp32: the parameter is the master weight
                full = param.detach()
            state[name] = full.detach().float().cpu().clone()
        for name, buffer in submodule.named_buffers():
            state[name] = buffer.detach().float().cpu().clone()
        return state


def convert_to_universal(checkpoint_dir: Path, tag: str, output_dir: Path) -> None:
    """DeepSpeed's universal checkpoint conversion, in-process (call on one rank, then barrier).

    A ZeRO checkpoint holds optimizer shards cut for the world size that wrote it; the universal
    form stores every parameter's fp32 weights and Adam moments whole, so any world size can load it.
    """
    import argparse

    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    args = argparse.Namespace(
        input_folder=str(checkpoint_dir / tag),
        output_folder=str(output_dir / tag),
        num_extract_workers=1,
        num_merge_workers=1,
        keep_temp_folder=False,
        strict=True,
        inject_missing_state=True,
    )
    ds_to_universal(args)
    # load_checkpoint reads the model-states file (module, scheduler, client state) from the tag directory.
    for states in (checkpoint_dir / tag).glob("*model_states.pt"):
        target = output_dir / tag / states.name
        if not target.exists():
            import shutil

            shutil.copy2(states, target)


def shutdown() -> None:
    """End a run cleanly: barrier, then leave the group.

    Leaving the group explicitly avoids an abort at interpreter exit seen once in CI.
    """
    if not dist.is_initialized():
        return
    dist.barrier()
    release_process_group()


def release_process_group() -> None:
    """Leave the process group and make DeepSpeed forget the groups it derived from it.

    DeepSpeed caches groups made from the world group (`deepspeed.utils.groups._WORLD_GROUP` and
    friends) at module level; after the world group is destroyed they point at nothing, and a second
    run in the same process (a notebook, the test suite) fails in `deepspeed.initialize`. Resetting
    them to their import-time values lets the next run build them afresh.
    """
    import torch.distributed as torch_dist
    from deepspeed.utils import groups

    if dist.is_initialized():
        torch_dist.destroy_process_group()
    groups._WORLD_GROUP = None
    groups._ZERO_PARAM_INTRA_PARALLEL_GROUP = None
    groups._DATA_PARALLEL_GROUP = None
    groups._MODEL_PARALLEL_GROUP = None
    groups._TENSOR_MODEL_PARALLEL_GROUP = None
    for cache in (groups._EXPERT_PARALLEL_GROUP, groups._EXPERT_PARALLEL_GROUP_RANKS, groups._EXPERT_DATA_PARALLEL_GROUP,
                  groups._EXPERT_DATA_PARALLEL_GROUP_RANKS, groups._ALL_TO_ALL_GROUP):  # fmt: skip
        cache.clear()
