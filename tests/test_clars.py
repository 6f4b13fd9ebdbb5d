"""CLARS (docs/algorithms.md section 6, CLARS paper eq. 4-5, Alg. 1) against an independent float64 reference."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from largebatch.optim import LARS, param_groups
from largebatch.optim.clars import CLARS

LR, WD, MU, ETA = 0.5, 1e-2, 0.9, 0.02


class Net(nn.Module):
    """conv -> tanh -> linear -> layernorm -> linear: no sample coupling."""

    def __init__(self, bn=False):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3) if bn else nn.Identity()
        self.fc1 = nn.Linear(3 * 16, 8)
        self.ln = nn.LayerNorm(8)
        self.fc2 = nn.Linear(8, 4)

    def forward(self, x):
        h = torch.tanh(self.bn(self.conv(x))).flatten(1)
        return self.fc2(torch.tanh(self.ln(self.fc1(h))))


def batches(n, B, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(B, 2, 4, 4, generator=g), torch.randint(0, 4, (B,), generator=g)) for _ in range(n)]


def lr_at(t):
    return LR * (1 + t) / 4  # changes every step: the optimizer must read group["lr"] each time


def reference_clars(model, data, subset=None):
    """docs/algorithms.md section 6 in float64 with plain Python: per-sample gradients by a loop of
    single-sample backward passes; ndim <= 1 tensors excluded (trust 1, no weight decay)."""
    m = copy.deepcopy(model).double()
    params = dict(m.named_parameters())
    b = {k: torch.zeros_like(p) for k, p in params.items()}
    for t, (x, y) in enumerate(data):
        per = []
        for i in range(x.shape[0]):
            loss = F.cross_entropy(m(x[i:i + 1].double()), y[i:i + 1])
            per.append(dict(zip(params, torch.autograd.grad(loss, list(params.values())))))
        J = per if subset is None else per[:subset]
        with torch.no_grad():
            for k, w in params.items():
                g = sum(p[k] for p in per) / len(per)
                adapt = w.ndim > 1
                wd = WD if adapt else 0.0
                d = g + wd * w
                trust = 1.0
                if adapt:
                    n_k = sum(float(p[k].norm()) for p in J) / len(J)
                    wn = float(w.norm())
                    if wn > 0 and n_k + wd * wn > 0:
                        trust = ETA * wn / (n_k + wd * wn)
                gamma = lr_at(t) * trust
                b[k] = MU * b[k] - gamma * d
                w += MU * b[k] - gamma * d
    return {k: v.detach() for k, v in params.items()}


def run_clars(model, data, path, subset=None, micro=1):
    opt = CLARS(param_groups(model, weight_decay=WD), lr=LR, momentum=MU, eta=ETA, model=model,
                persample_subset=subset, loss_scale=1.0 / micro, path=path)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: (1 + t) / 4)
    for x, y in data:
        opt.zero_grad()
        for xs, ys in zip(x.chunk(micro), y.chunk(micro)):
            (F.cross_entropy(model(xs), ys) / micro).backward()
        opt.step()
        sched.step()
    return opt


@pytest.mark.parametrize("path,subset", [("per_tensor", None), ("foreach", None), ("foreach", 3), ("compiled", None),
                                         ("native", None)])
def test_matches_float64_reference(path, subset, kernel_sized):
    torch.manual_seed(0)
    model = Net()
    data = batches(12, 6)
    ref = reference_clars(model, data, subset)
    run_clars(model, data, path, subset)
    for k, p in model.named_parameters():
        torch.testing.assert_close(p.detach().double(), ref[k], rtol=2e-4, atol=2e-6, msg=k)
    assert not torch.equal(ref["fc2.weight"], Net().fc2.weight.double())
    if path == "compiled":  # the fused kernel really ran
        from largebatch.optim import _compiled
        assert CLARS in _compiled._KERNELS and _compiled.available()
    if path == "native":
        from largebatch.optim import _native
        assert _native._LIB is not None and _native.available()


def test_state_holds_velocity_only_and_resume_is_bitwise():
    """n_k is an input of each step, not state: checkpoints hold the velocity alone, and an
    optimizer loaded from a state_dict continues exactly as the original one does."""
    def make(model):
        return CLARS(param_groups(model, weight_decay=WD), lr=LR, momentum=MU, eta=ETA, model=model)

    def steps(model, opt, data):
        for x, y in data:
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()

    torch.manual_seed(0)
    a, b = Net(), Net()
    data = batches(6, 6, seed=2)
    opt_a = make(a)
    steps(a, opt_a, data[:3])
    sd = copy.deepcopy(opt_a.state_dict())
    assert {k for s in sd["state"].values() for k in s} == {"velocity"}
    b.load_state_dict(a.state_dict())
    opt_b = make(b)
    opt_b.load_state_dict(sd)
    steps(a, opt_a, data[3:])
    steps(b, opt_b, data[3:])
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)


def test_accumulation_equals_one_batch():
    torch.manual_seed(0)
    a = Net()
    b = copy.deepcopy(a)
    data = batches(4, 6, seed=1)
    run_clars(a, data, None, micro=1)
    run_clars(b, data, None, micro=2)  # loss_scale = 1/2, counts and norm sums accumulate
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-7)


def test_trust_never_above_lars_and_equals_formula():
    torch.manual_seed(0)
    model = Net(bn=True)  # BatchNorm in train mode: per-sample terms are contributions
    twin = copy.deepcopy(model)
    clars = CLARS(param_groups(model, weight_decay=WD), lr=LR, eta=ETA, model=model)
    lars = LARS(param_groups(twin, weight_decay=WD), lr=LR, eta=ETA)
    clars.track_stats = lars.track_stats = True
    for x, y in batches(3, 8, seed=2):
        for m, o in ((model, clars), (twin, lars)):
            o.zero_grad()
            F.cross_entropy(m(x), y).backward()
        w_norms = [p.detach().norm() for p in model.parameters()]
        clars.step()
        lars.step()
        sc, sl = clars.layer_stats(), lars.layer_stats()
        adapt = sc["adapt"]
        assert adapt.sum() == 3 and torch.equal(adapt, sl["adapt"])
        tc, tl = sc["trust"][adapt], sl["trust"][adapt]
        assert torch.all(tc <= tl * (1 + 1e-6)), (tc, tl)
        assert torch.all(tc < tl * 0.99)  # strictly smaller: samples disagree
        # trust = eta ||w|| / (n_k + wd ||w||) with n_k from the tracker
        nk = dict(zip(map(id, clars.last_persample.params), clars.last_persample.mean_norm()))
        wn = dict(zip(map(id, model.parameters()), w_norms))
        want = torch.stack([ETA * wn[id(p)] / (nk[id(p)].float() + WD * wn[id(p)])
                            for p, a in zip(sc["params"], adapt) if a])
        torch.testing.assert_close(tc, want, rtol=1e-5, atol=0)
        # the CLARS paper Fig. 2 factor is available from the same statistics, M_k >= 1
        assert torch.all(clars.last_persample.variance_factor() >= 1 - 1e-6)
        for p, q in zip(model.parameters(), twin.parameters()):  # keep the twins identical
            q.data.copy_(p.data)


def test_only_adapted_tensors_are_tracked_and_closure():
    model = Net()
    opt = CLARS(param_groups(model), lr=0.1, model=model)
    assert opt.persample.names == ["conv.weight", "fc1.weight", "fc2.weight"]
    x, y = batches(1, 4)[0]

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    before = model.fc2.weight.detach().clone()
    loss = opt.step(closure)
    assert math.isfinite(loss.item()) and not torch.equal(before, model.fc2.weight)
    assert opt.last_persample.local_count == [4, 4, 4]


def test_clear_errors():
    model = Net()
    x, y = batches(1, 4)[0]
    opt = CLARS(param_groups(model), lr=0.1)
    F.cross_entropy(model(x), y).backward()
    with pytest.raises(RuntimeError, match="attach"):
        opt.step()
    opt.attach(model)
    with pytest.raises(RuntimeError, match="without per-sample statistics.*conv.weight"):
        opt.step()  # gradients exist but were computed before attaching
    F.cross_entropy(model(x), y).backward()
    opt.step()
    with pytest.raises(RuntimeError, match="without per-sample statistics"):
        opt.step()  # statistics are consumed by each step
    opt.detach()
    with pytest.raises(RuntimeError, match="attach"):
        opt.step()
    with pytest.raises(ValueError, match="need model"):
        CLARS(param_groups(model), lr=0.1, persample_subset=4)
    with pytest.raises(ValueError, match="persample_subset"):
        CLARS(param_groups(model), lr=0.1, model=model, persample_subset=0)
    with pytest.raises(ValueError, match="eta"):
        CLARS(param_groups(model), lr=0.1, eta=-1.0)
    with pytest.raises(ValueError, match="adapted"):
        CLARS(model.parameters(), lr=0.1, adapt=False, model=model)


def test_defaults_follow_spec():
    opt = CLARS(Net().parameters(), lr=1.0)
    d = opt.defaults
    assert (d["eta"], d["momentum"], d["weight_decay"], d["eps"]) == (0.01, 0.9, 0.0, 0.0)


def _ddp_worker(rank, world, port, result_dir, data, init, zero=False):
    """CLARS under DDP on ``world`` forked Gloo ranks; ``zero``: inside ZeroRedundancyOptimizer."""
    import os

    import torch.distributed as dist
    from torch.distributed.optim import ZeroRedundancyOptimizer

    from forked import init_gloo

    init_gloo(rank, world, port)
    try:
        model = Net()
        model.load_state_dict(init)
        ddp = nn.parallel.DistributedDataParallel(model)
        kw = dict(lr=LR, momentum=MU, eta=ETA, model=ddp)
        opt = (ZeroRedundancyOptimizer(param_groups(model, weight_decay=WD), optimizer_class=CLARS, **kw) if zero
               else CLARS(param_groups(model, weight_decay=WD), **kw))
        for x, y in data:
            opt.zero_grad()
            xs, ys = x.chunk(world)[rank], y.chunk(world)[rank]
            F.cross_entropy(ddp(xs), ys).backward()
            opt.step()
        out = {"w": model.state_dict()}
        if zero:
            out["partial"] = sum(len(g["params"]) for g in opt.optim.param_groups) < len(list(model.parameters()))
        else:
            out["count"] = opt.last_persample.count.tolist()
        torch.save(out, os.path.join(result_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _ddp_beside_one_process(tmp_path, *extra):
    """Two forked DDP ranks (``_ddp_worker``, results in ``tmp_path``) and one process over the
    same 3 batches from the same initial weights; returns the one-process model."""
    import torch.multiprocessing as mp

    from forked import free_port

    model = Net()
    init = copy.deepcopy(model.state_dict())
    data = batches(3, 8, seed=3)
    mp.start_processes(_ddp_worker, args=(2, free_port(), str(tmp_path), data, init, *extra), nprocs=2, join=True,
                       start_method="fork")
    single = CLARS(param_groups(model, weight_decay=WD), lr=LR, momentum=MU, eta=ETA, model=model)
    for x, y in data:
        single.zero_grad()
        F.cross_entropy(model(x), y).backward()
        single.step()
    return model


def test_zero_redundancy_optimizer_equals_single_process(tmp_path):
    """Under ZeroRedundancyOptimizer each rank's CLARS holds a part of the model: every rank still
    all-reduces the statistics of the same tensors (before: of its own partition, so the ranks'
    collectives had different sizes), and the result is one process's."""
    model = _ddp_beside_one_process(tmp_path, True)
    for r in range(2):
        got = torch.load(tmp_path / f"rank{r}.pt")
        assert got["partial"]
        for k, v in model.state_dict().items():
            torch.testing.assert_close(got["w"][k], v, rtol=1e-5, atol=1e-7, msg=k)


def test_step_traces_with_fullgraph():
    """``torch.compile(opt.step, fullgraph=True)`` traces CLARS's step in one graph (dynamo
    cannot trace ``dtype.to_real()``, which the compute dtype used to call); ``backend="eager"``:
    the trace is what is tested, not inductor."""
    torch.manual_seed(0)
    model = Net()
    opt = CLARS(param_groups(model, weight_decay=WD), lr=LR, momentum=MU, eta=ETA, model=model, path="foreach")
    ref = copy.deepcopy((model, opt))
    step = torch.compile(opt.step, fullgraph=True, backend="eager")
    for x, y in batches(2, 6):
        for m, o, s in ((model, opt, step), (*ref, ref[1].step)):
            o.zero_grad()
            F.cross_entropy(m(x), y).backward()
            s()
    for a, b in zip(model.parameters(), ref[0].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_two_process_ddp_equals_single_process(tmp_path):
    model = _ddp_beside_one_process(tmp_path)
    for r in range(2):
        got = torch.load(tmp_path / f"rank{r}.pt")
        assert got["count"] == [8.0, 8.0, 8.0]  # per-sample counts summed over ranks
        for k, v in model.state_dict().items():
            torch.testing.assert_close(got["w"][k], v, rtol=1e-5, atol=1e-7, msg=k)


@pytest.mark.parametrize("flow", ["grad_scaler", "manual"])
def test_skipped_step_drops_its_persample_statistics(flow):
    """A step skipped for inf gradients (``GradScaler`` then never calls ``step()``) must not
    leave its per-sample statistics to the next step: ``zero_grad()`` drops them with the
    gradients, so the next step uses that batch's samples only (it counted 2 batches before)."""
    torch.manual_seed(0)
    a = Net()
    b = copy.deepcopy(a)
    data = batches(3, 8, seed=4)
    # loss_scale includes the scaler's scale below (the tracker's contract): unscale_persample=False
    opt = CLARS(param_groups(a, weight_decay=WD), lr=LR, momentum=MU, eta=ETA, model=a, unscale_persample=False)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10) if flow == "grad_scaler" else None
    counts = []
    for t, (x, y) in enumerate(data):
        opt.zero_grad()
        loss = F.cross_entropy(a(x), y)
        if scaler is not None:
            opt.persample.loss_scale = scaler.get_scale()
            scaler.scale(loss).backward()
        else:
            loss.backward()
        if t == 1:
            a.fc1.weight.grad[0, 0] = float("inf")   # overflow in this batch only
        if scaler is not None:
            scaler.step(opt)                         # skipped at t == 1: step() is not called
            scaler.update()
        elif t != 1:                                 # a scaler-like loop skips the step itself
            opt.step()
        counts.append(opt.last_persample.count.tolist())
    assert counts[2] == [8.0, 8.0, 8.0]
    fresh = CLARS(param_groups(b, weight_decay=WD), lr=LR, momentum=MU, eta=ETA, model=b)
    for x, y in (data[0], data[2]):                  # the same run without the skipped batch
        fresh.zero_grad()
        F.cross_entropy(b(x), y).backward()
        fresh.step()
    for (k, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-6, atol=1e-7, msg=k)
