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

Reading a folder someone else wrote runs nothing and trusts nothing: DCP's ``.metadata`` (a
pickle, which DCP itself loads with ``pickle.load``) is read by a restricted unpickler that makes
only DCP's metadata classes, and every entry must be a tensor stored in a shard file
``__<rank>_<n>.distcp`` of the folder; ``meta.pt`` is read with ``weights_only=True`` and records
each shard file's size and SHA-256, checked before loading (:func:`read_meta`), so a truncated,
deleted or corrupt shard makes the folder unreadable and ``--resume`` falls back to
``checkpoint-prev/``. Declared shapes must be those of the run's model (an optimizer state at
most its parameter's size) before anything is allocated.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import re
import warnings
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torchvision.models import resnet as tvr

from . import distributed as dist_mod
from . import safefile

META = "meta.pt"
SHARD = re.compile(r"__\d+_\d+\.distcp")
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
    """Rank 0: ``meta.pt`` of the DCP folder ``path`` (what :func:`save` returned), with the size and
    SHA-256 of every shard file (every rank's write is complete when :func:`save` returns)."""
    files = {n: [os.path.getsize(os.path.join(path, n)), _sha256(os.path.join(path, n))]
             for n in sorted(os.listdir(path)) if SHARD.fullmatch(n)}
    torch.save({**meta, "files": files}, os.path.join(path, META))


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def read_meta(path: str) -> dict[str, Any]:
    """``meta.pt`` of a complete, undamaged DCP checkpoint folder (``ValueError`` naming what is
    wrong otherwise): its ``.metadata`` lists only tensors in shard files of the folder, and every
    shard file is there, with the size (and checksum, when recorded) it was written with."""
    if not os.path.exists(os.path.join(path, ".metadata")):
        raise ValueError("no .metadata: an incomplete torch.distributed.checkpoint folder")
    md = read_metadata(path)
    meta = safefile.load_tensors(os.path.join(path, META))
    if not isinstance(meta, dict):
        raise ValueError(f"{META} is not a largebatch checkpoint's")
    need: dict[str, int] = {}
    stored: dict[str, int] = {}  # bytes in the shards per tensor
    for index, info in md.storage_data.items():
        name = getattr(info, "relative_path", None)
        if not isinstance(name, str) or not SHARD.fullmatch(name) or not isinstance(info.offset, int) \
                or not isinstance(info.length, int) or info.offset < 0 or info.length < 0:
            raise ValueError(f".metadata names a shard {name!r} outside the folder's __<rank>_<n>.distcp files")
        need[name] = max(need.get(name, 0), info.offset + info.length)
        stored[getattr(index, "fqn", None)] = stored.get(getattr(index, "fqn", None), 0) + info.length
    for key, t in md.state_dict_metadata.items():  # a declared shape the shards cannot hold is a lie
        numel = math.prod(t.size)
        if sum(math.prod(c.sizes) for c in t.chunks) != numel \
                or stored.get(key, 0) < numel * torch.empty((), dtype=t.properties.dtype).element_size():
            raise ValueError(f".metadata declares {key} of shape {tuple(t.size)}, which its shards do not hold")
    recorded = meta.get("files")
    for name in sorted(set(need) | set(recorded or {})):
        f = os.path.join(path, name)
        if not os.path.isfile(f) or os.path.islink(f):
            raise ValueError(f"shard {name} is missing")
        size = os.path.getsize(f)
        if size < need.get(name, 0):
            raise ValueError(f"shard {name} is truncated ({size} bytes, its entries need {need[name]})")
        if recorded and name in recorded and size != recorded[name][0]:
            word = "truncated" if size < recorded[name][0] else "changed"
            raise ValueError(f"shard {name} is {word} ({size} bytes, written with {recorded[name][0]})")
        if recorded and name in recorded and _sha256(f) != recorded[name][1]:
            raise ValueError(f"shard {name} is damaged (its SHA-256 differs from the one recorded when it was written)")
    return meta


def _metadata_classes() -> dict:
    import pathlib

    import torch.distributed.checkpoint.metadata as m
    from torch.distributed.checkpoint.filesystem import _StorageInfo

    dtypes = {("torch", k): v for k, v in vars(torch).items() if isinstance(v, torch.dtype)}
    return {**dtypes, **safefile.by_name(
        m.Metadata, m.TensorStorageMetadata, m.TensorProperties, m.ChunkStorageMetadata, m.MetadataIndex,
        m.StorageMeta, m._MEM_FORMAT_ENCODING, _StorageInfo, torch.Size, torch.serialization._get_layout,
        pathlib.PosixPath, pathlib.PurePosixPath, pathlib.WindowsPath, pathlib.PureWindowsPath)}


def read_metadata(path: str):
    """DCP's ``.metadata`` of the folder ``path``, unpickled with only DCP's metadata classes (no
    ``BytesStorageMetadata``: DCP loads those entries with ``weights_only=False``; ours are all
    tensors)."""
    from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata

    with open(os.path.join(path, ".metadata"), "rb") as f:
        md = safefile.restricted_unpickle(f, _metadata_classes())
    if not isinstance(md, Metadata) or not isinstance(md.state_dict_metadata, dict) \
            or not isinstance(md.storage_data, dict):
        raise ValueError(".metadata is not a torch.distributed.checkpoint index")
    for k, v in md.state_dict_metadata.items():
        if not isinstance(v, TensorStorageMetadata) or not all(isinstance(d, int) and d >= 0 for d in v.size):
            raise ValueError(f".metadata entry {k!r} is not a tensor")
    return md


def _reader(path: str):
    """A ``FileSystemReader`` of ``path`` whose metadata is read by :func:`read_metadata`."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import StorageMeta

    class SafeReader(dcp.FileSystemReader):
        def read_metadata(self, *args, **kwargs):
            if kwargs.get("rank") is not None:
                raise ValueError("rank-local metadata is not written by largebatch")
            md = read_metadata(str(self.path))
            if getattr(md, "storage_meta", None) is None:
                md.storage_meta = StorageMeta()
            md.storage_meta.load_id = self.load_id
            return md

    return SafeReader(path)


def saved_shapes(path: str) -> dict[str, tuple[int, ...]]:
    """The shape of every model tensor in the DCP folder ``path``, by its name in the model."""
    return {k[len("model."):]: tuple(v.size) for k, v in read_metadata(path).state_dict_metadata.items()
            if k.startswith("model.")}


def _check_shapes(path: str, saved, want: dict[str, tuple[int, ...]]) -> None:
    for key, shape in want.items():
        if key not in saved:
            raise ValueError(f"checkpoint {path} lacks {key}")
        if tuple(saved[key].size) != tuple(shape):
            raise ValueError(f"checkpoint {path}: {key} has shape {tuple(saved[key].size)}, this run's model "
                             f"{tuple(shape)}")


def load(path: str, meta: dict[str, Any], model: nn.Module, opt: torch.optim.Optimizer) -> None:
    """Every rank: load the DCP folder ``path`` into ``model`` and ``opt`` (sharded or not, any
    number of ranks). Shapes are checked before anything is allocated: the model's must match,
    an optimizer state tensor may be at most as large as its parameter."""
    import torch.distributed.checkpoint as dcp

    DT = _dtensor()
    fqn = _param_names(model, opt)
    params = {n: p for n, p in model.named_parameters()}
    saved = read_metadata(path).state_dict_metadata
    model_sd = model.state_dict()
    flat: dict[str, Any] = {f"model.{k}": v for k, v in model_sd.items()}
    _check_shapes(path, saved, {k: tuple(v.shape) for k, v in flat.items()})
    state: dict[int, dict[str, Any]] = {}
    for idx, name, k in meta["optim_keys"]:
        key = f"optim.state.{name}.{k}"
        if not (isinstance(idx, int) and 0 <= idx < len(fqn)) or fqn[idx] != name:
            raise ValueError(f"checkpoint {path}: optimizer state {key} is not this run's parameter {idx}")
        if key not in saved:
            raise ValueError(f"checkpoint {path} lacks {key}")
        md, p = saved[key], params[fqn[idx]]
        size, dtype = tuple(md.size), md.properties.dtype
        if math.prod(size) > max(p.numel(), 1):
            raise ValueError(f"checkpoint {path}: {key} has shape {size}, larger than its parameter {tuple(p.shape)}")
        if DT is not None and isinstance(p, DT) and size and size == tuple(p.shape):
            t = torch.empty_like(p, dtype=dtype)  # sharded like its parameter
        else:
            t = torch.empty(size, dtype=dtype, device=_local(p).device)
        flat[key] = t
        state.setdefault(idx, {})[k] = t
    with _single_process_quiet():
        dcp.load(flat, storage_reader=_reader(path), no_dist=not dist.is_initialized())
    model.load_state_dict({k: flat[f"model.{k}"] for k in model_sd})
    for idx, st in meta.get("optim_extra", {}).items():
        state.setdefault(idx, {}).update(st)
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def read_model(path: str, like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The model tensors ``like`` names (plain CPU tensors of their shapes and dtypes) from the
    DCP folder ``path``, in one process (e.g. ``largebatch linear-eval`` of a ``--fsdp``
    pre-training run); a shape that differs is a ``ValueError``."""
    import torch.distributed.checkpoint as dcp

    saved = read_metadata(path).state_dict_metadata
    _check_shapes(path, saved, {f"model.{k}": tuple(v.shape) for k, v in like.items()})
    flat = {f"model.{k}": torch.empty(tuple(v.shape), dtype=saved[f"model.{k}"].properties.dtype)
            for k, v in like.items()}
    with _single_process_quiet():
        dcp.load(flat, storage_reader=_reader(path), no_dist=True)
    return {k[len("model."):]: v for k, v in flat.items()}


@contextlib.contextmanager
def _single_process_quiet():
    """DCP warns on every save / load in one process that it assumes one process: that is meant."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def _dtensor():
    from largebatch._dtensor import dtensor_type

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
