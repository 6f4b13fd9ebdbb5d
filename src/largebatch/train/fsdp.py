"""FSDP2 in the harness (``--fsdp``): sharding the model, gradient sync, sharded checkpoints.

**Sharding** (:func:`shard_model`): ``fully_shard`` on every *unit* (:func:`units`: each residual
block, and each layer with parameters outside blocks), then on the root, over a 1-D device mesh
of all processes. Parameters, gradients and optimizer state are ``Shard(0)`` DTensors; the
largebatch optimizers take their norms of the full tensors in one collective per step
(``optim/_sharded.py``). Gradients are averaged over ranks by FSDP's reduce-scatter, as DDP's
all-reduce averages them, so the loop's loss (``sum / rows of this rank``) gives the same
global-batch gradient. ``--fsdp-param-dtype bf16`` is FSDP2's ``MixedPrecisionPolicy``:
bfloat16 parameters in forward and backward, float32 gradient reduction, float32 sharded
weights and optimizer state; normalization layers are units of their own that keep float32
parameters (BatchNorm's float32 running statistics need them; autocast does the same).

BatchNorm buffers are not sharded and FSDP does not synchronize them (DDP broadcasts rank 0's
at every forward): :func:`broadcast_buffers` gives every rank rank 0's at the end of each epoch,
before evaluation and the checkpoint, so the evaluated model and the checkpoint are one model.

**Checkpoints** (:func:`save`, :func:`load`): a ``torch.distributed.checkpoint`` folder in
which every rank writes its shards, plus ``meta.pt`` (rank 0: epoch, step, history, config,
RNG, scheduler, the optimizer's param groups). Tensors are stored under torch's flat names,
``model.<fqn>`` and ``optim.state.<fqn>.<key>``, by their global shapes, so a checkpoint
written by N processes loads on M (DCP reshards; M = 1 loads full tensors into the plain
model) and on the same N loads every shard bitwise. Loading needs no optimizer step: the
optimizer's state is rebuilt from the checkpoint's metadata (shape and dtype of each saved
tensor; one shaped like its parameter is sharded like it).
"""

from __future__ import annotations

import contextlib
import os
import warnings
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torchvision.models import resnet as tvr

from . import distributed as dist_mod

META = "meta.pt"
#: normalization layers: float32 parameters under ``--fsdp-param-dtype bf16`` (as autocast runs them)
NORMS: tuple[type, ...] = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)
#: modules sharded as one unit (all their parameters gathered together)
BLOCKS: tuple[type, ...] = (tvr.BasicBlock, tvr.Bottleneck)


def units(model: nn.Module) -> list[nn.Module]:
    """The submodules :func:`shard_model` shards one by one: every block of :data:`BLOCKS`, and
    every module with parameters of its own that is not inside a block; containers (modules
    without parameters of their own) are searched."""
    out: list[nn.Module] = []

    def visit(m: nn.Module) -> None:
        for c in m.children():
            if next(c.parameters(), None) is None:
                continue
            if isinstance(c, BLOCKS) or next(c.parameters(recurse=False), None) is not None:
                out.append(c)
            else:
                visit(c)

    visit(model)
    return out


def shard_model(model: nn.Module, info: dist_mod.DistInfo, param_dtype: str = "fp32",
                methods: tuple[str, ...] = ()) -> nn.Module:
    """``fully_shard`` :func:`units` and the root over all ranks (in place; returns ``model``);
    ``methods``: the root's methods other than ``forward`` that run it (Barlow Twins' ``embed``).
    One process: the model is left as it is (nothing to shard; checkpoints are still DCP folders)."""
    if not info.enabled:
        return model
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    mesh = init_device_mesh(info.device.type, (info.world_size,))
    kw: dict[str, Any] = {"mesh": mesh}
    if param_dtype == "bf16":
        kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        for m in model.modules():  # normalization layers compute with float32 parameters (and statistics)
            if isinstance(m, NORMS) and next(m.parameters(), None) is not None:
                fully_shard(m, mesh=mesh, mp_policy=MixedPrecisionPolicy(reduce_dtype=torch.float32))
    for u in units(model):
        if not is_sharded(u):
            fully_shard(u, **kw)
    fully_shard(model, **kw)
    for name in methods:
        register_fsdp_forward_method(model, name)
    return model


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def grad_sync(model: nn.Module, sync: bool):
    """A context in which backward reduces gradients over ranks only if ``sync`` (the last
    micro-batch of a step): DDP's ``no_sync``, FSDP2's ``set_requires_gradient_sync``."""
    if sync:
        return contextlib.nullcontext()
    if isinstance(model, nn.parallel.DistributedDataParallel):
        return model.no_sync()
    if is_sharded(model):
        return _fsdp_no_sync(model)
    return contextlib.nullcontext()


@contextlib.contextmanager
def _fsdp_no_sync(model):
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


@torch.no_grad()
def broadcast_buffers(model: nn.Module, info: dist_mod.DistInfo) -> None:
    """Every rank gets rank 0's buffers (BatchNorm running statistics)."""
    if info.enabled:
        for b in model.buffers():
            dist.broadcast(b, src=0)


# ----------------------------------------------------------------------------- checkpoints
def _param_names(model: nn.Module, opt: torch.optim.Optimizer) -> list[str]:
    """The FQN of each optimizer parameter, in ``state_dict`` index order."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [names[id(p)] for g in opt.param_groups for p in g["params"]]


def save(path: str, model: nn.Module, opt: torch.optim.Optimizer, meta: dict[str, Any]) -> dict[str, Any]:
    """Every rank: write the DCP folder ``path`` (model and optimizer tensors, each rank its
    shards). Returns what :func:`write_meta` adds to it (rank 0): ``meta`` plus the optimizer's
    param groups and the list of saved state tensors. ``path`` must not exist."""
    import torch.distributed.checkpoint as dcp

    fqn = _param_names(model, opt)
    flat: dict[str, Any] = {f"model.{k}": v for k, v in model.state_dict().items()}
    osd = opt.state_dict()
    keys, extra = [], {}
    for idx, st in osd["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                flat[f"optim.state.{fqn[idx]}.{k}"] = v
                keys.append((idx, fqn[idx], k))
            else:
                extra.setdefault(idx, {})[k] = v
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        with _single_process_quiet():
            dcp.save(flat, checkpoint_id=path, no_dist=not dist.is_initialized())
    except CheckpointException as e:  # a BaseException: make it an error the run directory reports
        raise RuntimeError(str(e).strip().splitlines()[0] if str(e).strip() else "checkpoint write failed") from None
    return {**meta, "param_groups": osd["param_groups"], "optim_keys": keys, "optim_extra": extra,
            "world_size": dist.get_world_size() if dist.is_initialized() else 1}


def write_meta(path: str, meta: dict[str, Any]) -> None:
    """Rank 0: ``meta.pt`` of the DCP folder ``path`` (what :func:`save` returned)."""
    torch.save(meta, os.path.join(path, META))


def read_meta(path: str) -> dict[str, Any]:
    """``meta.pt`` of a complete DCP checkpoint folder (``ValueError`` if it is not one)."""
    if not os.path.exists(os.path.join(path, ".metadata")):
        raise ValueError("no .metadata: an incomplete torch.distributed.checkpoint folder")
    return torch.load(os.path.join(path, META), map_location="cpu", weights_only=False)


def load(path: str, meta: dict[str, Any], model: nn.Module, opt: torch.optim.Optimizer) -> None:
    """Every rank: load the DCP folder ``path`` into ``model`` and ``opt`` (sharded or not, any
    number of ranks)."""
    import torch.distributed.checkpoint as dcp

    DT = _dtensor()
    fqn = _param_names(model, opt)
    params = {n: p for n, p in model.named_parameters()}
    saved = dcp.FileSystemReader(path).read_metadata().state_dict_metadata
    model_sd = model.state_dict()
    flat: dict[str, Any] = {f"model.{k}": v for k, v in model_sd.items()}
    state: dict[int, dict[str, Any]] = {}
    for idx, name, k in meta["optim_keys"]:
        key = f"optim.state.{name}.{k}"
        if key not in saved:
            raise ValueError(f"checkpoint {path} lacks {key}")
        md, p = saved[key], params[fqn[idx]]
        size, dtype = tuple(md.size), md.properties.dtype
        if DT is not None and isinstance(p, DT) and size and size == tuple(p.shape):
            t = torch.empty_like(p, dtype=dtype)  # sharded like its parameter
        else:
            t = torch.empty(size, dtype=dtype, device=_local(p).device)
        flat[key] = t
        state.setdefault(idx, {})[k] = t
    with _single_process_quiet():
        dcp.load(flat, checkpoint_id=path, no_dist=not dist.is_initialized())
    model.load_state_dict({k: flat[f"model.{k}"] for k in model_sd})
    for idx, st in meta.get("optim_extra", {}).items():
        state.setdefault(idx, {}).update(st)
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def read_model(path: str) -> dict[str, torch.Tensor]:
    """The model's full state (plain CPU tensors) from the DCP folder ``path``, in one process
    (e.g. ``largebatch linear-eval`` of a ``--fsdp`` pre-training run)."""
    import torch.distributed.checkpoint as dcp

    saved = dcp.FileSystemReader(path).read_metadata().state_dict_metadata
    flat = {k: torch.empty(tuple(md.size), dtype=md.properties.dtype) for k, md in saved.items()
            if k.startswith("model.") and hasattr(md, "size")}
    with _single_process_quiet():
        dcp.load(flat, checkpoint_id=path, no_dist=True)
    return {k[len("model."):]: v for k, v in flat.items()}


@contextlib.contextmanager
def _single_process_quiet():
    """DCP warns on every save / load in one process that it assumes one process: that is meant."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def _dtensor():
    from largebatch.optim._sharded import dtensor_type

    return dtensor_type()


def _local(p: torch.Tensor) -> torch.Tensor:
    DT = _dtensor()
    return p.to_local() if DT is not None and isinstance(p, DT) else p


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state with every DTensor gathered to a full tensor (a collective: call on
    every rank)."""
    DT = _dtensor()
    return {k: (v.full_tensor() if DT is not None and isinstance(v, DT) else v).detach().clone()
            for k, v in model.state_dict().items()}
