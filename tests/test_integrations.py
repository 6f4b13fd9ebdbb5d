"""The optimizers of the table (``cases.TABLE``, each row's ``client`` configuration) inside real clients (docs/integrations.md): ``torch.distributed.checkpoint``
(plain, and FSDP2 on 2 Gloo processes), ``ZeroRedundancyOptimizer`` (2 Gloo processes),
Lightning (fit / checkpoint / resume; 16-bit mixed precision with a ``GradScaler``, with and
without gradient clipping), accelerate (``prepare``, ``save_state`` / ``load_state``, clipping)
and timm (``create_optimizer_v2`` with layer decay through :func:`largebatch.optim.timm_register`).

Every round trip is held to the run it interrupts: the resumed run must equal the
uninterrupted one bitwise. CLARS runs in every client with its per-sample statistics measured
in the client's own backward pass.
"""

from __future__ import annotations

import datetime
import os
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

import largebatch.optim as lbo
from cases import TABLE
from forked import free_port
from largebatch.optim import param_groups, registry

pytestmark = pytest.mark.usefixtures("one_thread")

#: the rows of the table, the per-sample ones (CLARS) last
NAMES = sorted(TABLE, key=lambda n: TABLE[n].persample)
#: constructor keywords besides the param groups (and CLARS's ``model=``)
KW = {n: TABLE[n].client for n in NAMES}
#: the name each is registered under (``largebatch train --optimizer``; timm: ``lb`` + it)
REGISTERED = {n: next(i.name for i in registry.OPTIMIZERS.values() if i.cls is TABLE[n].cls) for n in NAMES}
B = 16  # global batch


def _net(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.ReLU(), nn.Linear(8, 3)).to(dtype)


def _opt(name, net, params=None, **kw):
    """``name`` over ``param_groups(net)`` (biases and LayerNorm: adapt=False); CLARS attached to ``net``."""
    extra = {"model": net} if TABLE[name].persample else {}
    return TABLE[name].cls(param_groups(net, weight_decay=1e-3) if params is None else params,
                           **{**KW[name], **extra, **kw})


def _batch(t, dtype=torch.float32):
    g = torch.Generator().manual_seed(100 + t)
    return torch.randn(B, 6, generator=g).to(dtype), torch.randint(0, 3, (B,), generator=g)


def _train(net, opt, steps, rank=0, world=1, dtype=torch.float32):
    """Steps ``steps`` on batch ``t`` each (this rank's rows of it)."""
    for t in steps:
        x, y = _batch(t, dtype)
        rows = slice(rank * B // world, (rank + 1) * B // world)
        opt.zero_grad()
        F.cross_entropy(net(x[rows]), y[rows]).backward()
        opt.step()


def _weights(net):
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def _assert_bitwise(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), (k, float((a[k].double() - b[k].double()).abs().max()))


def _loader(n=64, batch_size=B):
    g = torch.Generator().manual_seed(1)
    ds = torch.utils.data.TensorDataset(torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g))
    return torch.utils.data.DataLoader(ds, batch_size=batch_size)


def _raise(result):
    """A child's recorded failure, re-raised in the test that reads it."""
    if isinstance(result, str):
        pytest.fail(result, pytrace=False)
    return result


# ----------------------------------------------------------------------------- DCP, one process
@pytest.mark.parametrize("name", NAMES)
def test_dcp_round_trip_continues_like_uninterrupted_run(name, tmp_path):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                         set_model_state_dict, set_optimizer_state_dict)

    ref = _net()
    _train(ref, _opt(name, ref), range(6))

    net = _net()
    opt = _opt(name, net)
    _train(net, opt, range(3))
    osd = get_optimizer_state_dict(net, opt)
    assert osd["state"] and all(isinstance(k, str) for k in osd["state"])  # keyed by parameter name
    dcp.save({"model": get_model_state_dict(net), "optim": osd}, checkpoint_id=str(tmp_path))

    net2 = _net(seed=1)  # other weights, fresh state: everything comes from the checkpoint
    opt2 = _opt(name, net2)
    sd = {"model": get_model_state_dict(net2), "optim": get_optimizer_state_dict(net2, opt2)}
    dcp.load(sd, checkpoint_id=str(tmp_path))
    set_model_state_dict(net2, sd["model"])
    set_optimizer_state_dict(net2, opt2, sd["optim"])
    _train(net2, opt2, range(3, 6))
    _assert_bitwise(_weights(net2), _weights(ref))


# ----------------------------------------------------------------------------- FSDP2 + DCP, 2 ranks
def _fsdp_model(seed):
    from torch.distributed.fsdp import fully_shard

    net = _net(seed)
    for layer in (net[0], net[3]):
        fully_shard(layer)
    fully_shard(net)
    return net


def _fsdp_worker(rank, world, port, root):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                         set_state_dict)

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
    full = StateDictOptions(full_state_dict=True)  # on every rank
    out = {}
    for name in NAMES:
        try:
            net = _fsdp_model(0)
            opt = _opt(name, net)
            _train(net, opt, range(3), rank, world)
            msd, osd = get_state_dict(net, opt)
            ckpt = os.path.join(root, name)
            dcp.save({"model": msd, "optim": osd}, checkpoint_id=ckpt)
            _train(net, opt, range(3, 6), rank, world)
            uninterrupted = get_model_state_dict(net, options=full)

            net2 = _fsdp_model(1)
            opt2 = _opt(name, net2)
            msd2, osd2 = get_state_dict(net2, opt2)
            sd = {"model": msd2, "optim": osd2}
            dcp.load(sd, checkpoint_id=ckpt)
            set_state_dict(net2, opt2, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
            _train(net2, opt2, range(3, 6), rank, world)
            out[name] = {"uninterrupted": uninterrupted, "resumed": get_model_state_dict(net2, options=full)}
        except Exception:
            out[name] = f"rank {rank}: {traceback.format_exc(limit=4)}"
            break  # the ranks' collectives may be out of step now
    dist.destroy_process_group()
    torch.save(out, os.path.join(root, f"rank{rank}.pt"))


@pytest.fixture(scope="module")
def fsdp_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("dcp-fsdp")
    mp.start_processes(_fsdp_worker, args=(2, free_port(), str(root)), nprocs=2, join=True, start_method="fork")
    return [torch.load(root / f"rank{r}.pt", weights_only=False) for r in (0, 1)]


@pytest.mark.parametrize("name", NAMES)
def test_fsdp2_dcp_resume_equals_uninterrupted_run(fsdp_runs, name):
    for rank, out in enumerate(fsdp_runs):
        if name not in out:
            pytest.fail(f"rank {rank} stopped before {name}: " + "; ".join(v for v in out.values() if isinstance(v, str)),
                        pytrace=False)
        r = _raise(out[name])
        _assert_bitwise(r["resumed"], r["uninterrupted"])
    _assert_bitwise(fsdp_runs[1][name]["resumed"], fsdp_runs[0][name]["resumed"])


# ----------------------------------------------------------------------------- ZeRO, 2 ranks
def _zero_worker(rank, world, port, root):
    from torch.distributed.optim import ZeroRedundancyOptimizer
    from torch.nn.parallel import DistributedDataParallel as DDP

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
    out = {}
    for name in NAMES:  # CLARS last: a failure may leave the ranks' collectives out of step
        try:
            res = {}
            for zero in (False, True):
                net = _net(0, torch.float64)
                ddp = DDP(net)
                if zero:
                    kw = {**KW[name], **({"model": net} if TABLE[name].persample else {})}
                    opt = ZeroRedundancyOptimizer(param_groups(net, weight_decay=1e-3), TABLE[name].cls, **kw)
                else:
                    opt = _opt(name, net)
                _train(ddp, opt, range(4), rank, world, torch.float64)
                res[zero] = _weights(net)
            out[name] = res
        except Exception:
            out[name] = f"rank {rank}: {traceback.format_exc(limit=4)}"
            break
    dist.destroy_process_group()
    torch.save(out, os.path.join(root, f"rank{rank}.pt"))


@pytest.fixture(scope="module")
def zero_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("zero")
    mp.start_processes(_zero_worker, args=(2, free_port(), str(root)), nprocs=2, join=True, start_method="fork")
    return [torch.load(root / f"rank{r}.pt", weights_only=False) for r in (0, 1)]


@pytest.mark.parametrize("name", NAMES)
def test_zero_redundancy_optimizer_equals_one_process(zero_runs, name):
    # one process, the whole batch, float64: the same updates up to the rounding of the
    # gradient all-reduce (mean of two halves vs mean of the whole batch)
    net = _net(0, torch.float64)
    _train(net, _opt(name, net), range(4), dtype=torch.float64)
    single = _weights(net)
    for rank, out in enumerate(zero_runs):
        if name not in out:
            pytest.fail(f"rank {rank} stopped before {name}: " + "; ".join(v for v in out.values() if isinstance(v, str)),
                        pytrace=False)
        r = _raise(out[name])
        _assert_bitwise(r[True], r[False])  # sharding the optimizer changes nothing: same DDP run
        for k in single:
            assert torch.allclose(r[True][k], single[k], rtol=1e-10, atol=1e-12), k


# ----------------------------------------------------------------------------- Lightning
def _lightning_module(name, clip_amp=False):
    import lightning as L

    class Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = _net()

        def training_step(self, batch, i):
            x, y = batch
            return F.cross_entropy(self.net(x), y)

        def configure_optimizers(self):
            opt = _opt(name, self.net)
            if clip_amp:  # docs/integrations.md, "Lightning": clipping under 16-bit AMP
                opt._step_supports_amp_scaling = False
            return opt

        def on_before_backward(self, loss):
            if clip_amp and TABLE[name].persample:  # the scale the per-sample hooks will see (docs/integrations.md)
                self.optimizers().optimizer.persample.loss_scale = self.trainer.precision_plugin.scaler.get_scale()

    return Module()


def _trainer(epochs, **kw):
    import lightning as L

    return L.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, **kw)


@pytest.mark.parametrize("name", NAMES)
def test_lightning_fit_checkpoint_resume_bitwise(name, tmp_path):
    full = _lightning_module(name)
    _trainer(4).fit(full, _loader())

    first = _lightning_module(name)
    trainer = _trainer(2)
    trainer.fit(first, _loader())
    trainer.save_checkpoint(tmp_path / "half.ckpt")
    resumed = _lightning_module(name)
    _trainer(4).fit(resumed, _loader(), ckpt_path=tmp_path / "half.ckpt")
    _assert_bitwise(_weights(resumed.net), _weights(full.net))
    with pytest.raises(AssertionError):  # ... and the check can fail: half the run is not the run
        _assert_bitwise(_weights(first.net), _weights(full.net))


def _manual_amp(name, clip):
    """The loop Lightning's 16-mixed precision plugin runs, written out: float16 autocast,
    ``GradScaler`` and, with ``clip``, ``scaler.unscale_`` + ``clip_grad_norm_`` (the in-step
    unscaling turned off). CLARS: the loss scale the per-sample hooks see is the scaler's."""
    net = _net()
    opt = _opt(name, net)
    scaler = torch.amp.GradScaler("cpu")
    if clip:
        opt._step_supports_amp_scaling = False
    elif TABLE[name].persample:
        opt.unscale_persample = True  # in-step unscaling: n_k unscaled with the gradients
    for _ in range(2):
        for x, y in _loader():
            opt.zero_grad()
            if TABLE[name].persample and clip:
                opt.persample.loss_scale = scaler.get_scale()
            with torch.autocast("cpu", dtype=torch.float16):
                loss = F.cross_entropy(net(x), y)
            scaler.scale(loss).backward()
            if clip:
                scaler.unscale_(opt)
                # over the optimizer's parameters, in its groups' order: what Lightning clips
                nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], clip)
            scaler.step(opt)
            scaler.update()
    return net, scaler


@pytest.mark.parametrize("clip", [None, 0.5], ids=["no-clip", "clip"])
@pytest.mark.parametrize("name", NAMES)
def test_lightning_16_mixed(name, clip):
    """``precision="16-mixed"`` (on CPU: the plugin with a CPU ``GradScaler``, as Lightning
    builds it on CUDA) equals the written-out loop bitwise, with and without clipping."""
    from lightning.pytorch.plugins.precision import MixedPrecision

    scaler = torch.amp.GradScaler("cpu")
    module = _lightning_module(name, clip_amp=clip is not None)
    _trainer(2, plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler), ],
             gradient_clip_val=clip).fit(module, _loader())
    ref, ref_scaler = _manual_amp(name, clip)
    assert scaler.get_scale() == ref_scaler.get_scale() > 1  # the loss really was scaled
    _assert_bitwise(_weights(module.net), _weights(ref))


# ----------------------------------------------------------------------------- accelerate
def _accelerate_run(name, epochs, save=None, load=None):
    from accelerate import Accelerator

    acc = Accelerator(cpu=True)
    net = _net()
    opt = _opt(name, net)
    net, opt, loader = acc.prepare(net, opt, _loader())
    if load is not None:
        acc.load_state(load)
    for _ in range(epochs):
        for x, y in loader:
            opt.zero_grad()
            acc.backward(F.cross_entropy(net(x), y))
            acc.clip_grad_norm_(net.parameters(), 0.5)
            opt.step()
    if save is not None:
        acc.save_state(save)
    return _weights(acc.unwrap_model(net))


@pytest.mark.parametrize("name", NAMES)
def test_accelerate_prepare_save_load_state(name, tmp_path):
    full = _accelerate_run(name, 4)
    half = _accelerate_run(name, 2, save=str(tmp_path / "state"))
    assert any(f.startswith("optimizer") for f in os.listdir(tmp_path / "state"))
    resumed = _accelerate_run(name, 2, load=str(tmp_path / "state"))
    _assert_bitwise(resumed, full)
    with pytest.raises(AssertionError):
        _assert_bitwise(half, full)


# ----------------------------------------------------------------------------- timm
def test_timm_register_builds_our_optimizers_from_timm_groups():
    from timm.optim import create_optimizer_v2, list_optimizers

    names = lbo.timm_register()
    assert sorted(names) == sorted(f"lb{REGISTERED[n]}" for n in NAMES)   # every row, nothing else
    assert lbo.timm_register() == names and set(names) <= set(list_optimizers())
    assert type(create_optimizer_v2(_net(), "lars", lr=0.1)).__module__.startswith("timm")  # timm's own kept

    net = _net()
    opt = create_optimizer_v2(net, "lblars", lr=0.5, eta=0.02, weight_decay=1e-3)
    assert type(opt) is lbo.LARS
    # timm's split: biases and LayerNorm without decay -> adapt=False, as param_groups(net) gives
    flags = {id(p): (g["adapt"], g["weight_decay"]) for g in opt.param_groups for p in g["params"]}
    ours = {id(p): (g["adapt"], g["weight_decay"]) for g in param_groups(net, weight_decay=1e-3) for p in g["params"]}
    assert flags == ours
    ref_net = _net()
    _train(ref_net, _opt("LARS", ref_net, momentum=0.9), range(3))
    _train(net, opt, range(3))
    _assert_bitwise(_weights(net), _weights(ref_net))


def test_timm_groups_split_groups_without_adapt():
    net = _net()
    w, b = net[0].weight, net[0].bias
    # weight_decay=0: timm makes one group of everything; 1-D tensors are still excluded
    groups = lbo.timm_groups([{"params": [w, b], "weight_decay": 0.0, "lr_scale": 0.5}])
    assert [(g["params"], g["adapt"], g["lr_scale"]) for g in groups] == [([w], True, 0.5), ([b], False, 0.5)]
    # a no-decay group beside a decay group (timm's no_weight_decay() names): adapt=False for all
    groups = lbo.timm_groups([{"params": [net[3].weight], "weight_decay": 0.0}, {"params": [w], "weight_decay": 0.1}])
    assert [g["adapt"] for g in groups] == [False, True]
    assert lbo.timm_groups([{"params": [w], "adapt": False}])[0]["adapt"] is False  # explicit adapt kept
    assert lbo.timm_groups(iter([w, b])) == [{"params": [w], "adapt": True}, {"params": [b], "adapt": False}]
    with pytest.raises(ValueError, match="prefix"):
        lbo.timm_register(prefix="lb_")


def _tiny_vit():
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    return VisionTransformer(img_size=8, patch_size=4, in_chans=3, num_classes=3, embed_dim=16, depth=2,
                             num_heads=2, mlp_ratio=2.0)


@pytest.mark.parametrize("name", NAMES)
def test_timm_create_optimizer_v2_with_layer_decay(name):
    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2

    lbo.timm_register()
    vit = _tiny_vit()
    extra = {"model": vit} if TABLE[name].persample else {}
    kw = {k: v for k, v in KW[name].items() if k != "lr"}
    opt = create_optimizer_v2(vit, f"lb{REGISTERED[name]}", lr=KW[name]["lr"], weight_decay=0.05, layer_decay=0.75,
                              **kw, **extra)
    assert type(opt) is TABLE[name].cls
    scales = sorted({g["lr_scale"] for g in opt.param_groups})
    assert scales == pytest.approx([0.75 ** k for k in range(3, -1, -1)])  # patch embed, 2 blocks, head
    adapt = {n: g["adapt"] for g in opt.param_groups for p in g["params"] for n, q in vit.named_parameters() if p is q}
    assert not adapt["pos_embed"] and not adapt["cls_token"]  # timm's no_weight_decay() names
    assert not adapt["blocks.0.norm1.weight"] and not adapt["head.bias"]
    assert adapt["blocks.0.attn.qkv.weight"] and adapt["patch_embed.proj.weight"] and adapt["head.weight"]
    sched, _ = create_scheduler_v2(opt, sched="cosine", num_epochs=4, warmup_epochs=0)
    sched.step(1)  # timm's scheduler sets lr = (scheduled lr) * lr_scale per group
    base = {g["lr"] / g["lr_scale"] for g in opt.param_groups}
    assert max(base) == pytest.approx(min(base)) and 0 < min(base) < KW[name]["lr"]
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(8, 3, 8, 8, generator=g), torch.randint(0, 3, (8,), generator=g)
    before = [p.detach().clone() for p in vit.parameters()]
    for _ in range(2):
        opt.zero_grad()
        F.cross_entropy(vit(x), y).backward()
        opt.step()
    assert all(torch.isfinite(p).all() for p in vit.parameters())
    assert all(not torch.equal(p, q) for p, q in zip(vit.parameters(), before))
