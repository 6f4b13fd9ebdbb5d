"""Per-sample gradient norms vs brute force.

Reference 1 (every model, BatchNorm in train mode included): sample i's additive
contribution to the gradient is the gradient w.r.t. a private copy of each layer's
parameters that only sample i's output row uses (one forward/backward per sample).
Reference 2 (models without batch coupling): ``torch.func.vmap(grad)`` of each sample's
own loss. Convolutions: every route of ``rules.conv_weight_sqnorms`` against
autograd one sample at a time, in float64 (to 1e-10) and float32.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from largebatch.persample import PerSampleGradNorms, UnsupportedLayerError, gradient_variance
from largebatch.persample import rules
from largebatch.persample.rules import rule_for

torch.set_num_threads(1)


# ------------------------------------------------------------------------ references
def contributions(model, x, y, reduction="mean"):
    """{param_name: Tensor[B, *shape]}: c_i in units of f_i (each sample's own loss)."""
    B = y.shape[0]
    out = {}
    for i in range(B):
        m = copy.deepcopy(model)
        leaves, handles, busy = {}, [], []
        for mname, mod in m.named_modules():
            own = dict(mod.named_parameters(recurse=False))
            if not own:
                continue

            def hook(mod, inp, o, mname=mname, own=own, i=i):
                if busy:
                    return None
                lv = {n: p.detach().clone().requires_grad_() for n, p in own.items()}
                for n, t in lv.items():
                    leaves[f"{mname}.{n}" if mname else n] = t
                busy.append(1)
                oi = functional_call(mod, lv, inp)
                busy.pop()
                mask = torch.zeros(o.shape[0], dtype=torch.bool)
                mask[i] = True
                return torch.where(mask.view(-1, *[1] * (o.dim() - 1)), oi, o)

            handles.append(mod.register_forward_hook(hook))
        inputs = x if isinstance(x, tuple) else (x,)
        loss = F.cross_entropy(m(*inputs), y, reduction=reduction)
        names = list(leaves)
        gs = torch.autograd.grad(loss, [leaves[n] for n in names])
        scale = B if reduction == "mean" else 1
        for n, g in zip(names, gs):
            out.setdefault(n, []).append(g * scale)
    return {n: torch.stack(v) for n, v in out.items()}


def vmap_grads(model, x, y):
    params = {n: p.detach() for n, p in model.named_parameters()}
    buffers = dict(model.named_buffers())

    def f(p, xi, yi):
        o = functional_call(model, (p, buffers), (xi.unsqueeze(0),))
        return F.cross_entropy(o, yi.unsqueeze(0))

    return vmap(grad(f), in_dims=(None, 0, 0))(params, x, y)


def norms(c):
    return {n: v.flatten(1).norm(dim=1) for n, v in c.items()}


def tracked(model, x, y, reduction="mean", **kw):
    tr = PerSampleGradNorms(model, loss_reduction=reduction, **kw)
    inputs = x if isinstance(x, tuple) else (x,)
    F.cross_entropy(model(*inputs), y, reduction=reduction).backward()
    st = tr.collect()
    tr.remove()
    return st


def check(st, ref_norms, rtol=2e-4, atol=1e-6):
    got_n = dict(zip(st.names, st.sum_norm))
    got_s = dict(zip(st.names, st.sum_sq))
    cnt = dict(zip(st.names, st.count))
    assert set(got_n) == set(ref_norms)
    for n, r in ref_norms.items():
        assert cnt[n].item() == r.shape[0], n
        got_dtype = r.dtype if r.dtype == torch.float64 else torch.float32
        torch.testing.assert_close(got_n[n].to(got_dtype), r.sum(), rtol=rtol, atol=atol, msg=n)
        torch.testing.assert_close(got_s[n].to(got_dtype), r.pow(2).sum(), rtol=rtol, atol=atol, msg=n)


# ------------------------------------------------------------------------ models
class Head(nn.Module):
    """layer -> tanh -> flatten -> Linear to 3 classes."""

    def __init__(self, layer, x):
        super().__init__()
        with torch.no_grad():
            flat = layer(x).flatten(1).shape[1]
        self.layer, self.fc = layer, nn.Linear(flat, 3)

    def forward(self, x):
        return self.fc(torch.tanh(self.layer(x)).flatten(1))


def _h(layer, x):
    return Head(layer, x), x


def case(name, B):
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    if name == "linear2d":
        return _h(nn.Linear(5, 4), r(B, 5))
    if name == "linear3d_gram":  # T=3 small: Gram
        return _h(nn.Linear(6, 7), r(B, 3, 6))
    if name == "linear3d_mat":  # T=9 large vs in*out: materialize
        return _h(nn.Linear(2, 3), r(B, 9, 2))
    if name == "conv1d":
        return _h(nn.Conv1d(4, 6, 3, stride=2, padding=2, dilation=2, groups=2), r(B, 4, 11))
    if name == "conv1d_gram_groups":  # 3 output positions, 16 channels: Gram, per group
        return _h(nn.Conv1d(16, 8, 3, stride=2, padding=1, groups=2), r(B, 16, 6))
    if name == "conv1d_same":
        return _h(nn.Conv1d(3, 2, 4, padding="same"), r(B, 3, 7))
    if name == "conv1d_same_circular":
        return _h(nn.Conv1d(3, 2, 3, padding="same", padding_mode="circular"), r(B, 3, 7))
    if name == "conv2d_mat":  # big image, few channels: materialize
        return _h(nn.Conv2d(2, 3, 3, padding=1), r(B, 2, 8, 8))
    if name == "conv2d_gram":  # small output map, many channels: Gram
        return _h(nn.Conv2d(16, 16, 3, stride=2, padding=1, bias=False), r(B, 16, 4, 4))
    if name == "conv2d_groups_dil_reflect":
        return _h(nn.Conv2d(4, 6, (3, 2), stride=(1, 2), padding=(2, 1), dilation=(2, 1), groups=2,
                            padding_mode="reflect"), r(B, 4, 5, 6))
    if name == "conv3d":
        return _h(nn.Conv3d(2, 3, 2, stride=1), r(B, 2, 3, 3, 3))
    if name == "bn1d":
        return _h(nn.BatchNorm1d(5), r(B, 5) * 2 + 1)
    if name == "bn1d_3d":
        return _h(nn.BatchNorm1d(3), r(B, 3, 4))
    if name == "bn2d":
        return _h(nn.BatchNorm2d(3), r(B, 3, 3, 3))
    if name == "layernorm":
        return _h(nn.LayerNorm([3, 4]), r(B, 2, 3, 4))
    if name == "groupnorm":
        return _h(nn.GroupNorm(2, 4), r(B, 4, 6))
    if name == "rmsnorm":
        return _h(nn.RMSNorm(5), r(B, 2, 5))
    raise KeyError(name)


LAYERS = ["linear2d", "linear3d_gram", "linear3d_mat", "conv1d", "conv1d_gram_groups", "conv1d_same", "conv1d_same_circular", "conv2d_mat",
          "conv2d_gram", "conv2d_groups_dil_reflect", "conv3d", "bn1d", "bn1d_3d", "bn2d", "layernorm",
          "groupnorm", "rmsnorm"]


def _perturb(model):
    with torch.no_grad():  # non-trivial affine parameters for the normalization layers
        for p in model.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))


SETTINGS = [("mean", 4, 1), ("sum", 1, 64 * 2**20), ("mean", 3, 64 * 2**20)]  # chunk=1 byte: 1 sample/chunk


@pytest.mark.filterwarnings("ignore:Using padding='same'")
@pytest.mark.parametrize("name,reduction,B,chunk", [
    (n, *s) for n in LAYERS for s in SETTINGS
    if not (n.startswith("bn") and s[1] == 1)  # train-mode BatchNorm needs > 1 value per channel
])
def test_layer_matches_brute_force(name, reduction, B, chunk):
    torch.manual_seed(0)
    model, x = case(name, B)
    _perturb(model)
    y = torch.arange(B) % 3
    ref = contributions(model, x, y, reduction)
    st = tracked(model, x, y, reduction, max_chunk_bytes=chunk)
    check(st, norms(ref))
    if not isinstance(model.layer, nn.modules.batchnorm._BatchNorm):  # no coupling: true per-sample grads
        vg = vmap_grads(model, x, y)
        for n, c in ref.items():
            torch.testing.assert_close(c, vg[n], rtol=1e-4, atol=1e-6)


F64 = {"rtol": 1e-10, "atol": 1e-12}  # float64: brute force and the rules agree to ~1e-15 relative


@pytest.mark.filterwarnings("ignore:Using padding='same'")
@pytest.mark.parametrize("name", LAYERS)
def test_layer_matches_brute_force_float64(name):
    torch.manual_seed(0)
    model, x = case(name, 3)
    model, x = model.double(), x.double()
    _perturb(model)
    y = torch.arange(3) % 3
    check(tracked(model, x, y), norms(contributions(model, x, y)), **F64)


def test_batchnorm_contributions_sum_to_batch_gradient_and_eval_mode():
    torch.manual_seed(0)
    model, x = case("bn2d", 5)
    _perturb(model)
    y = torch.arange(5) % 3
    ref = contributions(model, x, y, "mean")
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    for n, p in model.named_parameters():  # mean loss: batch grad = mean of contributions
        torch.testing.assert_close(ref[n].mean(0), p.grad, rtol=1e-4, atol=1e-6)
    # eval mode uses running statistics: per-sample grads are then true per-sample grads
    model.eval()
    with torch.no_grad():
        model.layer.running_mean.normal_()
        model.layer.running_var.uniform_(0.5, 2)
    check(tracked(model, x, y), norms(vmap_grads(model, x, y)))


class Embed(nn.Module):
    def __init__(self, **kw):
        super().__init__()
        self.emb = nn.Embedding(6, 4, **kw)
        self.fc = nn.Linear(4 * 5, 3)

    def forward(self, idx):
        return self.fc(torch.tanh(self.emb(idx)).flatten(1))


@pytest.mark.parametrize("kw", [{}, {"padding_idx": 2}, {"scale_grad_by_freq": True}])
def test_embedding_repeated_rows(kw):
    torch.manual_seed(0)
    model = Embed(**kw)
    idx = torch.tensor([[0, 2, 2, 5, 0], [1, 1, 1, 2, 3], [4, 3, 2, 1, 0]])
    y = torch.tensor([0, 1, 2])
    ref = contributions(model, idx, y, "sum")
    check(tracked(model, idx, y, "sum"), norms(ref))
    if not kw.get("scale_grad_by_freq"):  # batch-wide counts couple samples
        vg = vmap_grads(model, idx, y)
        torch.testing.assert_close(ref["emb.weight"], vg["emb.weight"])


class Mixed(nn.Module):
    """conv + BN + linear + layernorm + embedding, two inputs."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc1 = nn.Linear(4 * 4, 8)
        self.ln = nn.LayerNorm(8)
        self.emb = nn.Embedding(7, 8)
        self.fc2 = nn.Linear(8, 3)

    def forward(self, img, tok):
        h = F.relu(self.bn(self.conv(img)), inplace=True)
        h = F.avg_pool2d(h, 2).flatten(1)
        h = self.ln(self.fc1(h)) + self.emb(tok).mean(1)
        return self.fc2(torch.tanh(h))


def mixed_batch(B, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, 3, 4, 4, generator=g), torch.randint(0, 7, (B, 3), generator=g)), \
        torch.randint(0, 3, (B,), generator=g)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_mixed_model(reduction):
    torch.manual_seed(0)
    model = Mixed()
    x, y = mixed_batch(5)
    ref = contributions(model, x, y, reduction)
    check(tracked(model, x, y, reduction), norms(ref))
    model.eval()  # no coupling: also the true per-sample gradients, batch 1 included
    for B in (1, 4):
        x, y = mixed_batch(B, seed=B)
        params = {n: p.detach() for n, p in model.named_parameters()}
        buffers = dict(model.named_buffers())

        def f(p, img, tok, yi):
            o = functional_call(model, (p, buffers), (img[None], tok[None]))
            return F.cross_entropy(o, yi[None])

        vg = vmap(grad(f), in_dims=(None, 0, 0, 0))(params, *x, y)
        check(tracked(model, x, y, reduction), norms(vg))


def test_accumulation_subset_and_variance_factor():
    torch.manual_seed(0)
    model = Mixed()
    (x1, y1), (x2, y2) = mixed_batch(4, 1), mixed_batch(3, 2)
    r1, r2 = contributions(model, x1, y1), contributions(model, x2, y2)
    both = {n: torch.cat([r1[n], r2[n]]) for n in r1}
    tr = PerSampleGradNorms(model, loss_reduction="mean", loss_scale=0.5)
    model.zero_grad()
    for x, y in ((x1, y1), (x2, y2)):
        (F.cross_entropy(model(*x), y) * 0.5).backward()
    st = tr.collect()
    check(st, norms(both))
    assert st.local_count == [7] * len(st.names)
    # M_k with the batch gradient from .grad: equal micro-batch scales are needed for the
    # mean; here the sizes differ, so compare with the explicit mean of the contributions
    mean_grads = [both[n].mean(0) for n in st.names]
    m = st.variance_factor([g * st.grad_weight[i].item() for i, g in enumerate(mean_grads)])
    ref_m = torch.stack([both[n].flatten(1).pow(2).sum(1).mean() / both[n].mean(0).pow(2).sum() for n in st.names])
    torch.testing.assert_close(m.float(), ref_m, rtol=1e-4, atol=0)
    # accumulators were reset by collect; subset = first 5 samples of the step (4 + 1)
    tr.persample_subset = 5
    model.zero_grad()
    for x, y in ((x1, y1), (x2, y2)):
        (F.cross_entropy(model(*x), y) * 0.5).backward()
    st = tr.collect()
    check(st, norms({n: v[:5] for n, v in both.items()}))
    tr.remove()


def test_variance_factor_from_grad_and_helper():
    torch.manual_seed(0)
    model = Mixed()
    (x1, y1), (x2, y2) = mixed_batch(4, 1), mixed_batch(4, 2)
    r = {n: torch.cat([a, b]) for (n, a), b in zip(contributions(model, x1, y1).items(),
                                                   contributions(model, x2, y2).values())}
    # conv.bias feeds BatchNorm: its batch gradient is 0 up to rounding, M_k is ill-conditioned
    r.pop("conv.bias")
    ref = {n: (v.flatten(1).pow(2).sum(1).mean() / v.mean(0).pow(2).sum()).item() for n, v in r.items()}
    params = [p for n, p in model.named_parameters() if n != "conv.bias"]
    tr = PerSampleGradNorms(model, loss_scale=0.5, params=params)
    model.zero_grad()
    for x, y in ((x1, y1), (x2, y2)):
        (F.cross_entropy(model(*x), y) / 2).backward()
    m = dict(zip(tr.names, tr.collect().variance_factor().tolist()))
    assert m == pytest.approx(ref, rel=1e-4)
    assert all(v >= 1 - 1e-6 for v in m.values())  # mean of squares >= square of mean
    tr.remove()
    loss_sum = lambda o, t: F.cross_entropy(o, t, reduction="sum")  # noqa: E731
    g_before = [p.grad.clone() for p in model.parameters()]
    got = gradient_variance(model, [(x1, y1), (x2, y2)], loss_sum, params=params)
    assert got == pytest.approx(ref, rel=1e-4)
    assert all(torch.equal(a, p.grad) for a, p in zip(g_before, model.parameters()))


def test_params_filter_no_grad_forward_and_remove():
    model = Mixed()
    x, y = mixed_batch(3)
    tr = PerSampleGradNorms(model, params=[model.conv.weight, model.fc2.weight])
    assert tr.names == ["conv.weight", "fc2.weight"]
    with torch.no_grad():
        model(*x)  # ignored
    model(*x)  # forward without backward: dropped, no error on the next forward
    F.cross_entropy(model(*x), y).backward()
    assert tr.collect().local_count == [3, 3]
    tr.remove()
    F.cross_entropy(model(*x), y).backward()
    assert tr.collect().local_count == [0, 0]


def test_ddp_sums_all_reduced_in_one_collective(monkeypatch):
    model = Mixed()
    x, y = mixed_batch(3)
    tr = PerSampleGradNorms(model)
    F.cross_entropy(model(*x), y).backward()
    local = tr.collect(reset=False, sync=False)
    calls = []
    dist = torch.distributed
    monkeypatch.setattr(dist, "is_available", lambda: True)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(dist, "all_reduce", lambda t, group=None: (calls.append(t.shape), t.mul_(2)))
    st = tr.collect()
    assert len(calls) == 1  # one collective for sums, squares, counts and weights
    torch.testing.assert_close(st.sum_norm, 2 * local.sum_norm)
    torch.testing.assert_close(st.count, 2 * local.count)
    torch.testing.assert_close(st.grad_weight, local.grad_weight)  # DDP averages gradients
    torch.testing.assert_close(st.mean_norm(), local.mean_norm())
    assert st.local_count == [3] * len(st.names)


def test_errors():
    class Custom(nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.ones(3))

        def forward(self, x):
            return x * self.scale

    model = nn.Sequential(nn.Linear(3, 3), Custom())
    with pytest.raises(UnsupportedLayerError, match=r"'1' \(Custom\).*scale"):
        PerSampleGradNorms(model)
    tr = PerSampleGradNorms(model, unsupported="skip")
    assert tr.skipped == ["1.scale"] and tr.names == ["0.weight", "0.bias"]
    tr.remove()
    with pytest.raises(UnsupportedLayerError, match="ConvTranspose2d"):
        PerSampleGradNorms(nn.Sequential(nn.ConvTranspose2d(2, 2, 3)))
    with pytest.raises(UnsupportedLayerError, match="SyncBatchNorm"):
        PerSampleGradNorms(nn.Sequential(nn.SyncBatchNorm(2)))
    assert rule_for(nn.MultiheadAttention(4, 2)) is None
    lin = nn.Linear(3, 3)
    reuse = nn.Sequential(lin, nn.Tanh(), lin)
    tr = PerSampleGradNorms(reuse)
    with pytest.raises(RuntimeError, match="ran twice"):
        reuse(torch.randn(2, 3))
    tr.remove()
    tied = nn.Sequential(nn.Embedding(4, 4), nn.Linear(4, 4, bias=False))
    tied[1].weight = tied[0].weight
    with pytest.raises(ValueError, match="weight tying"):
        PerSampleGradNorms(tied)
    for kw, field in [({"loss_reduction": "avg"}, "loss_reduction"), ({"persample_subset": 0}, "persample_subset"),
                      ({"loss_scale": 0.0}, "loss_scale"), ({"unsupported": "x"}, "unsupported"),
                      ({"max_chunk_bytes": 0}, "max_chunk_bytes"), ({"params": [torch.zeros(1)]}, "params")]:
        with pytest.raises(ValueError, match=field):
            PerSampleGradNorms(nn.Linear(2, 2), **kw)
    tr = PerSampleGradNorms(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="batch dimension"):
        tr_model = tr._entries[0].module
        tr_model(torch.randn(2, requires_grad=True)).sum().backward()


# ------------------------------------------------------------------------ convolution routes
def conv_brute(m, x, d):
    """||grad_W||^2 of each sample: autograd through the layer's own convolution, one sample at a time."""
    out = []
    for i in range(x.shape[0]):
        w = m.weight.detach().clone().requires_grad_()
        (gw,) = torch.autograd.grad(m._conv_forward(x[i:i + 1], w, None), w, d[i:i + 1])
        out.append(gw.pow(2).sum())
    return torch.stack(out)


CONV_CASES = {  # name: (layer, input spatial shape)
    "2d_big_map_grouped": (lambda: nn.Conv2d(3, 4, 3, padding=1), (16, 16)),  # cost model: grouped
    "2d_small_map_gram": (lambda: nn.Conv2d(48, 48, 3, padding=1), (4, 4)),  # cost model: gram
    "2d_stride2_odd": (lambda: nn.Conv2d(6, 8, 3, stride=2, padding=1), (9, 10)),
    "2d_1x1_stride2": (lambda: nn.Conv2d(8, 12, 1, stride=2), (7, 7)),
    "2d_1x1": (lambda: nn.Conv2d(5, 7, 1), (3, 4)),
    "2d_groups_dilation": (lambda: nn.Conv2d(6, 9, (3, 2), stride=(2, 1), padding=(2, 0), dilation=(2, 3),
                                             groups=3), (11, 9)),
    "2d_stride3_unread_rows": (lambda: nn.Conv2d(2, 3, 2, stride=3), (8, 8)),
    "2d_depthwise": (lambda: nn.Conv2d(6, 6, 3, padding=1, groups=6), (5, 5)),
    "2d_same_reflect": (lambda: nn.Conv2d(4, 4, 4, padding="same", padding_mode="reflect"), (6, 5)),
    "2d_circular": (lambda: nn.Conv2d(3, 5, 3, padding=2, padding_mode="circular"), (5, 5)),
    "2d_one_output": (lambda: nn.Conv2d(3, 4, 3), (3, 3)),
    "1d_groups_dilation": (lambda: nn.Conv1d(4, 6, 5, stride=2, padding=3, dilation=2, groups=2), (17,)),
    "1d_same": (lambda: nn.Conv1d(3, 2, 4, padding="same"), (7,)),
    "3d": (lambda: nn.Conv3d(2, 4, (2, 3, 1), stride=(1, 2, 2), padding=(1, 0, 1), dilation=(2, 1, 1)), (4, 5, 6)),
    "3d_1x1x1_stride2_groups": (lambda: nn.Conv3d(4, 6, 1, stride=2, groups=2), (3, 3, 3)),
}


@pytest.mark.filterwarnings("ignore:Using padding='same'")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("route", [None, *rules.CONV_ROUTES])
@pytest.mark.parametrize("B,budget", [(3, 64 * 2**20), (3, 1), (1, 64 * 2**20)])  # 1 byte: one sample per chunk
@pytest.mark.parametrize("name", list(CONV_CASES))
def test_conv_routes_match_brute_force(name, route, dtype, B, budget):
    make, spatial = CONV_CASES[name]
    torch.manual_seed(0)
    m = make().double()
    x = torch.randn(B, m.in_channels, *spatial, dtype=torch.float64)
    d = torch.randn_like(m(x))
    ref = conv_brute(m, x, d)
    got = rules.conv_weight_sqnorms(m.to(dtype), x.to(dtype), d.to(dtype), budget, route=route)
    assert got.dtype == dtype and got.shape == (B,)
    tol = F64 if dtype == torch.float64 else {"rtol": 2e-4, "atol": 1e-6}
    torch.testing.assert_close(got.double(), ref, **tol)


def test_conv_cost_model_choices():
    """The rule picks per layer from shapes only; at CIFAR ResNet-18's shapes: materialize
    (grouped) for the 32x32 and 16x16 stages, Gram for the 8x8 / 4x4 stages and 16->8."""
    for name, want in [("2d_big_map_grouped", "grouped"), ("2d_small_map_gram", "gram")]:
        make, spatial = CONV_CASES[name]
        m = make()
        x = torch.zeros(1, m.in_channels, *spatial)
        assert rules.conv_plan(m, x, m(x))[0].route() == want, name
    resnet = [  # C_in, C_out, kernel, stride, input size -> route
        (3, 64, 3, 1, 32, "grouped"), (64, 64, 3, 1, 32, "grouped"), (64, 128, 3, 2, 32, "grouped"),
        (64, 128, 1, 2, 32, "grouped"), (128, 128, 3, 1, 16, "grouped"), (128, 256, 3, 2, 16, "gram"),
        (128, 256, 1, 2, 16, "gram"), (256, 256, 3, 1, 8, "gram"), (256, 512, 3, 2, 8, "gram"),
        (256, 512, 1, 2, 8, "gram"), (512, 512, 3, 1, 4, "gram")]
    for cin, cout, k, st, hw, want in resnet:
        m = nn.Conv2d(cin, cout, k, st, k // 2, bias=False)
        x = torch.zeros(1, cin, hw, hw, device="meta")
        d = torch.zeros(1, cout, (hw - 1) // st + 1, (hw - 1) // st + 1, device="meta")
        assert rules.conv_plan(m, x, d)[0].route() == want, (cin, cout, k, st, hw)
    with pytest.raises(ValueError, match="route"):
        rules.conv_weight_sqnorms(nn.Conv2d(1, 1, 1), torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 2), route="x")


class SmallResNet(nn.Module):
    """Convolutions at map sizes that take both routes, with BatchNorm, a residual and a
    strided 1x1 shortcut."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1, bias=False)  # 8x8, few channels: grouped
        self.bn = nn.BatchNorm2d(4)
        self.down = nn.Conv2d(4, 64, 3, stride=2, padding=1)  # 8 -> 4
        self.short = nn.Conv2d(4, 64, 1, stride=2, bias=False)
        self.conv = nn.Conv2d(64, 64, 3, padding=1, bias=False)  # 4x4, 64 channels: gram
        self.fc = nn.Linear(64, 3)

    def forward(self, x):
        h = F.relu(self.bn(self.stem(x)))
        h = self.conv(torch.tanh(self.down(h))) + self.short(h)
        return self.fc(torch.tanh(h).mean((2, 3)))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_small_resnet_both_routes_through_tracker(dtype):
    torch.manual_seed(0)
    model = SmallResNet().to(dtype)
    x = torch.randn(4, 3, 8, 8, dtype=dtype)
    y = torch.arange(4) % 3
    routes = {}
    for name in ("stem", "conv"):
        mod = getattr(model, name)
        inp = x if name == "stem" else torch.zeros(1, 64, 4, 4, dtype=dtype)
        routes[name] = rules.conv_plan(mod, inp, mod(inp))[0].route()
    assert routes == {"stem": "grouped", "conv": "gram"}
    ref = norms(contributions(model, x, y))
    check(tracked(model, x, y), ref, **(F64 if dtype == torch.float64 else {}))
    check(tracked(model, x, y, max_chunk_bytes=1), ref, **(F64 if dtype == torch.float64 else {}))
