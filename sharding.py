"""`--fsdp`: teacher and student sharded per transformer block with FSDP2, and their full states.

Each block of the architecture table (`architectures.transformer_blocks`) becomes one FSDP2 unit
(`torch.distributed.fsdp.fully_shard`): its parameters are split across the ranks and gathered only
while the block runs. The root unit is the model's `DiitoRuns` wrapper, not the Hugging Face model:
the distiller calls the backbone, the blocks (the restart above an intervention) and the LM head
directly, never the model's own `forward`, so only the wrapper's forward covers every run of a step.
The root unit holds what is left (embeddings, final norm, LM head, tied weights together).

The student's states are saved in the formats of a DDP run: one full state dict, gathered on rank 0
(`get_model_state_dict` / `get_optimizer_state_dict`, full_state_dict and cpu_offload), read back with
`torch.load(weights_only=True)` and set with `set_model_state_dict` / `set_optimizer_state_dict`.
`torch.distributed.checkpoint` is not used: its `.metadata` file is a pickle, unpickled in full on load.

Only rank 0 reads the weights (`load_on_rank0`): the other ranks build teacher and student empty, on
the meta device, and `shard` fills every rank's shards from rank 0's full weights, one tensor at a
time. A host thus holds one full copy of each model (rank 0's), not one per rank.

The functions taking a model work on a plain model too (then they are `state_dict()` and friends), so
the distiller calls them whether or not it shards.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard
from torch.distributed.tensor import DTensor

from architectures import transformer_blocks
from training_config import TrainingConfig
from utils import UserError, first_line

# Full (unsharded) states on rank 0 only, moved to CPU tensor by tensor as they are gathered.
T = TypeVar("T")

_GATHER = StateDictOptions(full_state_dict=True, cpu_offload=True)
# Rank 0 holds the full state; every rank receives it tensor by tensor and keeps its shards.
_BROADCAST = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
# Every rank holds the full saved state (`checkpointing.read_resume_state`) and keeps its own shards.
_SCATTER = StateDictOptions(full_state_dict=True)


def load_on_rank0(load: Callable[[bool], T], fsdp: bool, is_master: bool) -> T:
    """`load(weights)`, which returns a model (or a tuple holding one): under --fsdp rank 0 alone reads the
    weights (`load(True)`) and, once it succeeded, the other ranks build theirs empty (`load(False)`);
    rank 0's refusal (a `UserError`), or any failure there, ends every rank with its message. The other
    ranks wait for rank 0's load within --ddp_timeout. Without --fsdp: `load(True)`."""
    if not fsdp:
        return load(True)
    result, refusal, failure = None, [None], None
    if is_master:
        try:
            result = load(True)
        except UserError as e:
            refusal = [str(e)]
        except Exception as e:  # not a user's mistake: rank 0 shows its traceback, the others one line
            failure, refusal = e, [f"rank 0 failed while loading the models: {type(e).__name__}: {first_line(e)}"]
    dist.broadcast_object_list(refusal, src=0)  # rank 0's own message string, never a user's file
    if failure is not None:
        raise failure
    if refusal[0] is not None:
        raise UserError(refusal[0])
    return result if is_master else load(False)


def shard(runs: nn.Module, *, bf16: bool, frozen: bool, device: torch.device, cpu_offload: bool = False) -> nn.Module:
    """Shard `runs` (a `DiitoRuns`) in place: one FSDP2 unit per block of `runs.model`, then `runs` as the root.

    Every rank's shards take rank 0's weights; the other ranks' models may be empty (`load_on_rank0`).
    bf16: blocks compute in bfloat16 (gradients reduced in float32; the sharded weights and the
    optimizer stay float32). frozen: a model that never runs backward (the teacher): its root unit is
    resharded after each forward, since no backward would do it. device: where this rank computes.
    cpu_offload: the sharded parameters live in CPU memory and are copied to the device for each
    block's all-gather.
    """
    full = runs.state_dict() if dist.get_rank() == 0 else {}
    _take_rank0_layout(runs.model)
    empty = any(p.device.type == "meta" for p in runs.parameters())
    # to_empty below empties the buffers too: an empty model keeps its computed ones aside.
    buffers = {name: b.detach().clone() for name, b in runs.named_buffers(remove_duplicate=False)} if empty else {}
    mp_policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else None
    kwargs: dict[str, Any] = {
        "mp_policy": mp_policy or MixedPrecisionPolicy(),
        "offload_policy": CPUOffloadPolicy(pin_memory=torch.cuda.is_available()) if cpu_offload else OffloadPolicy(),
    }
    for block in transformer_blocks(runs.model):
        fully_shard(block, **kwargs)
    fully_shard(runs, **kwargs)
    if empty:  # storage for the shards, then the buffers back
        runs.to_empty(device="cpu" if cpu_offload else device)
        _replace_buffers(runs, lambda name, _: buffers[name].to(device))
    set_model_state_dict(runs, full, options=_BROADCAST)
    if frozen:
        runs.register_forward_hook(lambda module, args, output: module.reshard())
    return runs


def _take_rank0_layout(model: nn.Module) -> None:
    """Give an empty model rank 0's parameter and buffer dtypes and attention implementation (set as it loaded)."""
    layout = [
        {name: t.dtype for name, t in (*model.named_parameters(), *model.named_buffers())},
        getattr(model.config, "_attn_implementation", None),
    ]
    dist.broadcast_object_list(layout, src=0)  # dtypes and a name, made by rank 0
    dtypes, attention = layout
    for name, p in model.named_parameters():
        if p.dtype != dtypes[name]:
            p.data = p.data.to(dtypes[name])
    _replace_buffers(model, lambda name, buffer: buffer.to(dtypes.get(name, buffer.dtype)))
    if attention is not None and getattr(model.config, "_attn_implementation", None) != attention:
        model.config._attn_implementation = attention


def _replace_buffers(model: nn.Module, new: Callable[[str, torch.Tensor], torch.Tensor]) -> None:
    """Set every buffer of `model` to `new(its full name, the buffer)`, in the module that holds it."""
    for prefix, module in model.named_modules():
        for name, buffer in module._buffers.items():
            if buffer is not None:
                module._buffers[name] = new(f"{prefix}.{name}" if prefix else name, buffer)


def is_sharded(model: nn.Module) -> bool:
    return any(isinstance(p, DTensor) for p in model.parameters())


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's full state dict: on rank 0 (CPU tensors) when sharded, {} on the other ranks.

    Every rank must call it when sharded: each parameter is all-gathered.
    """
    if not is_sharded(model):
        return model.state_dict()
    weights = get_model_state_dict(model, options=_GATHER)
    if weights:  # rank 0: tied parameters (embeddings, LM head) are one tensor under each name, as in state_dict()
        names: dict[int, list[str]] = {}
        for name, p in model.named_parameters(remove_duplicate=False):
            names.setdefault(id(p), []).append(name)
        for aliases in names.values():
            kept = next((name for name in aliases if name in weights), None)
            for name in aliases:
                if kept is not None:
                    weights[name] = weights[kept]
        weights = {name: weights[name] for name in model.state_dict() if name in weights}  # state_dict()'s order
    return weights


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """`optimizer.state_dict()`; when `model` is sharded, its full form on rank 0, keyed by parameter
    name (`get_optimizer_state_dict`), {} on the other ranks. Every rank must call it then."""
    if not is_sharded(model):
        return optimizer.state_dict()
    return get_optimizer_state_dict(model, optimizer, options=_GATHER)


def load_full_state(model: nn.Module, optimizer: torch.optim.Optimizer, weights: dict, saved: dict) -> None:
    """Set a sharded model's and optimizer's shards from full states (`full_model_state`, `full_optimizer_state`).

    Every rank passes the same full states: rank 0 reads its file, the others map it into memory
    (`checkpointing.read_resume_state`), so a node holds one copy, in the page cache. As
    `checkpointing.load_optimizer_state` does for a plain run, this run's weight decay and epsilon
    replace the saved ones. A state that does not fit (another student, or saved without --fsdp) is a
    UserError, alike on every rank: each judges the same data.
    """
    if saved.get("state") and not all(isinstance(key, str) for key in saved["state"]):  # states older than "fsdp"
        raise UserError("--resume: the state was saved without --fsdp; resume without --fsdp")
    keep = [(group["weight_decay"], group["eps"]) for group in optimizer.param_groups]
    try:
        set_model_state_dict(model, weights, options=_SCATTER)
        set_optimizer_state_dict(model, optimizer, saved, options=_SCATTER)
    except (KeyError, RuntimeError, ValueError) as e:
        raise UserError(f"--resume: the saved student or optimizer does not fit this run's: {first_line(e)}") from None
    for group, (weight_decay, eps) in zip(optimizer.param_groups, keep, strict=True):
        group["weight_decay"], group["eps"] = weight_decay, eps


def local_grads(model: nn.Module) -> list[torch.Tensor | None]:
    """One gradient per parameter: this rank's shard when sharded (already reduced over the ranks)."""
    return [None if p.grad is None else _local(p.grad) for p in model.parameters()]


def restore_grads(model: nn.Module, grads: list[torch.Tensor | None] | None) -> None:
    """Set the gradients `local_grads` returned (None: none saved), as shards of sharded parameters."""
    if grads is None:
        return
    for p, g in zip(model.parameters(), grads, strict=True):
        if g is None:
            p.grad = None
        elif isinstance(p, DTensor):
            local = g.to(p.to_local().device)
            p.grad = DTensor.from_local(local, p.device_mesh, p.placements, shape=p.shape, stride=p.stride())
        else:
            p.grad = g.to(p.device)


def as_float(value: torch.Tensor) -> float:
    """A scalar, sharded (e.g. `clip_grad_norm_`'s norm of sharded gradients) or not, as a Python float."""
    return float(value.full_tensor() if isinstance(value, DTensor) else value)


def check_flags(config: TrainingConfig, world_size: int) -> None:
    """Refuse --fsdp where it cannot shard (one process) and the flags it does not combine with."""
    if config.fsdp_offload_teacher and not config.fsdp:
        raise UserError("--fsdp_offload_teacher needs --fsdp")
    if not config.fsdp:
        return
    if world_size < 2:
        raise UserError(
            "--fsdp shards the models over several processes: launch with "
            "`torchrun --nproc_per_node N causal_train.py --fsdp ...` (N >= 2), or drop --fsdp"
        )
    if config.fp16:
        raise UserError("--fsdp does not support --fp16 (its loss scaler would skip steps per shard): use --bf16")


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t
