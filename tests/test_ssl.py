"""Barlow Twins building blocks (largebatch.ssl): loss, augmentations, model, embedding caching, kNN,
linear evaluation. The 2-process tests are in test_ssl_distributed.py."""

import math

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from torch import nn

from largebatch.ssl import (VIEW1, VIEW2, BarlowTwins, GlobalBatchNorm, Projector, ViewAugment,
                            augment_view, barlow_twins_loss, barlow_twins_views, blur_kernel_size,
                            build_backbone, cached_backward, convert_global_batchnorm, extract_features,
                            feature_backbone, knn_accuracy, knn_predict, parse_projector, train_linear)
from largebatch.ssl import augment as A
from largebatch.train.data import normalize

pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------- loss
def reference_loss(z1, z2, lambd, eps=1e-5):
    """The formula of docs/algorithms.md section 11 in plain Python floats, loop by loop."""
    z1, z2 = np.asarray(z1, dtype=np.float64), np.asarray(z2, dtype=np.float64)
    n, d = z1.shape

    def standardize(z):
        out = np.empty_like(z)
        for j in range(d):
            col = [float(v) for v in z[:, j]]
            m = sum(col) / n
            var = sum((v - m) ** 2 for v in col) / n          # biased
            out[:, j] = [(v - m) / math.sqrt(var + eps) for v in col]
        return out

    a, b = standardize(z1), standardize(z2)
    loss = 0.0
    for i in range(d):
        for j in range(d):
            c = sum(a[k, i] * b[k, j] for k in range(n)) / n
            loss += (1 - c) ** 2 if i == j else lambd * c ** 2
    return loss


@pytest.mark.parametrize("lambd", [0.0, 0.0051, 1.0])
@pytest.mark.parametrize("n,d", [(2, 1), (7, 3), (64, 16)])
def test_loss_matches_independent_formula(lambd, n, d):
    g = torch.Generator().manual_seed(n * 100 + d)
    z1 = torch.randn(n, d, generator=g, dtype=torch.float64) * 3 + 1
    z2 = 0.5 * z1 + torch.randn(n, d, generator=g, dtype=torch.float64)
    got = barlow_twins_loss(z1, z2, lambd).item()
    assert got == pytest.approx(reference_loss(z1, z2, lambd), rel=1e-12, abs=1e-12)
    # float32 input gives the same value to float32 precision
    assert barlow_twins_loss(z1.float(), z2.float(), lambd).item() == pytest.approx(got, rel=1e-4, abs=1e-5)


def test_loss_of_identical_decorrelated_views_is_zero_and_gradient_is_exact():
    # columns +-1 patterns orthogonal over the batch: C = I up to eps, so the loss ~ 0
    z = torch.tensor([[1, 1, 1], [1, -1, -1], [-1, 1, -1], [-1, -1, 1]], dtype=torch.float64)
    assert barlow_twins_loss(z, z, 0.5, eps=0.0).item() == pytest.approx(0.0, abs=1e-24)
    assert barlow_twins_loss(z, z.flip(0), 0.5, eps=0.0).item() > 1.0
    z1 = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    z2 = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: barlow_twins_loss(a, b, 0.3), (z1, z2))


def test_loss_invariant_to_per_dimension_affine_maps():
    g = torch.Generator().manual_seed(1)
    z1 = torch.randn(32, 8, generator=g, dtype=torch.float64)
    z2 = z1 + 0.7 * torch.randn(32, 8, generator=g, dtype=torch.float64)
    scale = torch.rand(8, generator=g, dtype=torch.float64) * 4 + 0.25
    shift = torch.randn(8, generator=g, dtype=torch.float64) * 10
    base0 = barlow_twins_loss(z1, z2, 0.01, eps=0.0)
    assert barlow_twins_loss(z1 * scale + shift, z2, 0.01, eps=0.0).item() == pytest.approx(base0.item(), rel=1e-12)
    assert barlow_twins_loss(z1, z2 * scale - shift, 0.01, eps=0.0).item() == pytest.approx(base0.item(), rel=1e-12)
    base = barlow_twins_loss(z1, z2, 0.01)          # eps = 1e-5 against variances ~1: invariant to ~1e-5
    assert barlow_twins_loss(z1 * scale + shift, z2 * scale.flip(0), 0.01).item() == pytest.approx(base.item(), rel=1e-4)
    flipped = scale.clone()
    flipped[0] = -flipped[0]                        # a negative scale flips a correlation: not invariant
    assert barlow_twins_loss(z1 * flipped, z2, 0.01).item() > base.item() + 1.0


def test_loss_of_half_precision_embeddings_is_computed_in_float32():
    z1, z2 = torch.randn(64, 32).bfloat16(), torch.randn(64, 32).bfloat16()
    expected = barlow_twins_loss(z1.float(), z2.float())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = barlow_twins_loss(z1, z2)
    assert got.dtype == torch.float32 and torch.equal(got, expected)


def test_loss_rejects_bad_arguments():
    z = torch.randn(4, 3)
    with pytest.raises(ValueError, match="lambd"):
        barlow_twins_loss(z, z, -0.1)
    with pytest.raises(ValueError, match="same shape|one shape"):
        barlow_twins_loss(z, torch.randn(4, 2))
    with pytest.raises(ValueError, match="N x D"):
        barlow_twins_loss(z.view(-1), z.view(-1))


def test_global_batchnorm_is_batchnorm_in_one_process():
    torch.manual_seed(0)
    for bn in (nn.BatchNorm1d(5), nn.BatchNorm2d(5), nn.BatchNorm1d(5, affine=False, momentum=None)):
        bn = bn.double()
        with torch.no_grad():
            if bn.affine:
                bn.weight.uniform_(0.5, 2)
                bn.bias.normal_()
        ref = bn
        glob = convert_global_batchnorm(nn.Sequential(_copy(bn)))[0]
        assert isinstance(glob, GlobalBatchNorm)
        shape = (9, 5) if isinstance(bn, nn.BatchNorm1d) else (4, 5, 3, 2)
        for _ in range(2):
            x = torch.randn(*shape, dtype=torch.float64) * 3 + 1
            xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
            w = torch.randn(*shape, dtype=torch.float64)
            (ref(xa) * w).sum().backward()
            (glob(xb) * w).sum().backward()
            torch.testing.assert_close(xb.grad, xa.grad, rtol=1e-10, atol=1e-12)
        for k, v in ref.state_dict().items():
            torch.testing.assert_close(glob.state_dict()[k], v, rtol=1e-12, atol=1e-12)
        ref.eval()
        glob.eval()
        torch.testing.assert_close(glob(x), ref(x))


def _copy(module):
    import copy

    return copy.deepcopy(module)


# ----------------------------------------------------------------------------- augmentations
def _images(n, c, h, w, seed=0):
    return torch.randint(0, 256, (n, c, h, w), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("shape", [(5, 1, 8, 8), (4, 1, 28, 28), (6, 3, 32, 32), (3, 3, 12, 20)])
def test_views_shapes_dtypes_determinism_and_difference(shape):
    x = _images(*shape)
    c = shape[1]
    mean, std = torch.full((c,), 0.4), torch.full((c,), 0.2)
    v1, v2 = barlow_twins_views(x, mean, std, torch.Generator().manual_seed(7))
    assert v1.shape == v2.shape == shape and v1.dtype == v2.dtype == torch.float32
    assert torch.isfinite(v1).all() and torch.isfinite(v2).all()
    lo, hi = (0 - 0.4) / 0.2, (1 - 0.4) / 0.2        # normalized values of [0, 1]
    assert v1.min() >= lo - 1e-5 and v1.max() <= hi + 1e-5
    w1, w2 = barlow_twins_views(x, mean, std, torch.Generator().manual_seed(7))
    assert torch.equal(v1, w1) and torch.equal(v2, w2)
    u1, _ = barlow_twins_views(x, mean, std, torch.Generator().manual_seed(8))
    assert not torch.equal(u1, v1)
    assert not torch.equal(v1, v2)
    assert ((v1 - v2).flatten(1).abs().amax(1) > 1e-3).all()      # every image's two views differ
    d1, _ = barlow_twins_views(x, mean, std, torch.Generator().manual_seed(7), dtype=torch.float64)
    assert d1.dtype == torch.float64
    torch.testing.assert_close(d1.float(), v1, rtol=0, atol=1e-4)


def test_identity_and_flip_only_pipelines():
    x = _images(4, 3, 10, 14)
    off = dict(scale=(1.0, 1.0), ratio=(14 / 10, 14 / 10), jitter_p=0.0, grayscale_p=0.0, blur_p=0.0, solarize_p=0.0)
    mean, std = torch.tensor([0.1, 0.2, 0.3]), torch.tensor([0.5, 0.6, 0.7])
    v, _ = barlow_twins_views(x, mean, std, torch.Generator().manual_seed(0),
                              views=(ViewAugment(flip_p=0.0, **off), ViewAugment(**off)))
    torch.testing.assert_close(v, normalize(x, mean, std), rtol=0, atol=1e-5)
    flipped = augment_view(x, ViewAugment(flip_p=1.0, **off), torch.Generator().manual_seed(0))
    torch.testing.assert_close(flipped, x.flip(-1).float() / 255, rtol=0, atol=1e-6)


def test_resized_crop_matches_torchvision():
    g = torch.Generator().manual_seed(3)
    x = torch.rand(16, 3, 17, 23, generator=g)
    boxes = A.random_resized_crop_boxes(16, 17, 23, generator=g)
    flip = torch.rand(16, generator=g) < 0.5
    out = A.resized_crop(x, boxes, flip)
    for i in range(16):
        for antialias in (False, True):      # crops are never larger than the output: antialiasing is a no-op
            ref = TF.resized_crop(x[i], *boxes[i].tolist(), [17, 23], antialias=antialias)
            ref = ref.flip(-1) if flip[i] else ref
            torch.testing.assert_close(out[i], ref, rtol=0, atol=1e-5)


def test_crop_boxes_follow_scale_and_ratio():
    h, w = 32, 32
    boxes = A.random_resized_crop_boxes(4000, h, w, (0.08, 1.0), (3 / 4, 4 / 3), torch.Generator().manual_seed(0))
    top, left, ch, cw = boxes.T
    assert (top >= 0).all() and (left >= 0).all() and (top + ch <= h).all() and (left + cw <= w).all()
    assert (ch >= 1).all() and (cw >= 1).all()
    frac = (ch * cw).double() / (h * w)
    assert frac.min() >= 0.08 * 0.5 and frac.max() <= 1.0       # rounding to whole pixels
    assert frac.mean().item() == pytest.approx(0.54, abs=0.05)   # U(0.08, 1), less the large skewed boxes that do not fit
    ratio = cw.double() / ch
    assert ratio.min() >= 0.6 and ratio.max() <= 1.7
    assert len(set(top.tolist())) > 20 and len(set(left.tolist())) > 20
    full = A.random_resized_crop_boxes(5, 12, 20, (1.0, 1.0), (20 / 12, 20 / 12))
    assert full.tolist() == [[0, 0, 12, 20]] * 5
    fallback = A.random_resized_crop_boxes(3, 10, 40, (1.0, 1.0), (1.0, 1.0))   # never fits: central 10x10
    assert fallback.tolist() == [[0, 15, 10, 10]] * 3


@pytest.mark.parametrize("channels", [1, 3])
def test_colour_ops_match_torchvision_per_image(channels):
    g = torch.Generator().manual_seed(channels)
    x = torch.rand(8, channels, 9, 11, generator=g)
    f = torch.tensor([0.0, 0.3, 0.6, 0.9, 1.0, 1.2, 1.4, 2.0])
    shift = torch.linspace(-0.5, 0.5, 8)
    cases = [(A.adjust_brightness, TF.adjust_brightness, f), (A.adjust_contrast, TF.adjust_contrast, f),
             (A.adjust_saturation, TF.adjust_saturation, f), (A.adjust_hue, TF.adjust_hue, shift)]
    for ours, ref, factors in cases:
        expected = torch.stack([ref(x[i], float(factors[i])) for i in range(8)])
        torch.testing.assert_close(ours(x, factors), expected, rtol=0, atol=2e-6)
    # the whole jitter: each image's own order of the four, where applied
    p = A.sample_params(64, 9, 11, VIEW1, g)
    x = torch.rand(64, channels, 9, 11, generator=g)
    fns = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
    expected = []
    for i in range(64):
        y = x[i]
        if p.jitter[i]:
            for k in p.order[i].tolist():
                y = fns[k](y, float(p.factors[i, k]))
        expected.append(y)
    assert 0 < p.jitter.sum() < 64 and len({tuple(o) for o in p.order.tolist()}) > 6
    torch.testing.assert_close(A.color_jitter(x, p.factors, p.order, p.jitter), torch.stack(expected), rtol=0, atol=2e-6)


def test_grayscale_blur_solarize():
    g = torch.Generator().manual_seed(5)
    x = torch.rand(6, 3, 9, 10, generator=g)
    on = torch.tensor([True, False, True, True, False, True])
    gray = A.grayscale(x, on)
    for i in range(6):
        expected = TF.rgb_to_grayscale(x[i], 3) if on[i] else x[i]
        torch.testing.assert_close(gray[i], expected, rtol=0, atol=1e-6)
    one = torch.rand(6, 1, 9, 10, generator=g)
    assert torch.equal(A.grayscale(one, on), one)
    sigma = torch.tensor([0.1, 0.5, 1.0, 1.5, 2.0, 0.7])
    blurred = A.gaussian_blur(x, sigma, 5, on)
    for i in range(6):
        expected = TF.gaussian_blur(x[i], [5, 5], [float(sigma[i])] * 2) if on[i] else x[i]
        torch.testing.assert_close(blurred[i], expected, rtol=0, atol=1e-6)
    assert torch.equal(blurred[~on], x[~on])
    with pytest.raises(ValueError, match="blur_kernel"):
        A.gaussian_blur(x, sigma, 19, on)
    u8 = torch.arange(256, dtype=torch.uint8).view(1, 1, 16, 16)
    sol = A.solarize(u8.float() / 255, torch.tensor([True]))
    expected = torch.where(u8 >= 128, 255 - u8, u8).float() / 255      # PIL.ImageOps.solarize
    torch.testing.assert_close(sol, expected, rtol=0, atol=1e-7)
    assert torch.equal(A.solarize(x, ~torch.ones(6, dtype=torch.bool)), x)


def test_views_are_asymmetric_as_the_reference():
    n = 4000
    p1 = A.sample_params(n, 32, 32, VIEW1, torch.Generator().manual_seed(0))
    p2 = A.sample_params(n, 32, 32, VIEW2, torch.Generator().manual_seed(0))
    assert p1.blur.all() and not p1.solarize.any()
    assert p2.blur.float().mean().item() == pytest.approx(0.1, abs=0.02)
    assert p2.solarize.float().mean().item() == pytest.approx(0.2, abs=0.02)
    for p in (p1, p2):
        assert p.jitter.float().mean().item() == pytest.approx(0.8, abs=0.02)
        assert p.gray.float().mean().item() == pytest.approx(0.2, abs=0.02)
        assert p.flip.float().mean().item() == pytest.approx(0.5, abs=0.03)
        b, c, s, h = p.factors.T
        assert 0.6 <= b.min() and b.max() <= 1.4 and 0.6 <= c.min() and c.max() <= 1.4
        assert 0.8 <= s.min() and s.max() <= 1.2 and -0.1 <= h.min() and h.max() <= 0.1
        assert 0.1 <= p.sigma.min() and p.sigma.max() <= 2.0
        assert (p.order.sort(1).values == torch.arange(4)).all()


def test_blur_kernel_rule_and_validation():
    assert [blur_kernel_size(s, s) for s in (8, 28, 32, 64, 96, 224)] == [3, 3, 3, 7, 9, 23]
    for bad in (dict(flip_p=1.5), dict(jitter_p=-0.1), dict(hue=0.7), dict(brightness=-1), dict(scale=(0.5, 0.2)),
                dict(scale=(0.0, 1.0)), dict(ratio=(0, 1)), dict(blur_sigma=(0, 1)), dict(blur_kernel=4)):
        with pytest.raises(ValueError, match=f"augment: invalid {next(iter(bad))}="):
            ViewAugment(**bad)
    x = _images(2, 3, 8, 8)
    with pytest.raises(ValueError, match="uint8"):
        augment_view(x.float())
    with pytest.raises(ValueError, match="1 or 3 channels"):
        augment_view(_images(2, 2, 8, 8))
    with pytest.raises(ValueError, match="one per channel"):
        barlow_twins_views(x, torch.zeros(1), torch.ones(1))


# ----------------------------------------------------------------------------- model
def test_projector_layout_and_parsing():
    p = Projector(16, (32, 24, 8))
    kinds = [type(m).__name__ for m in p]
    assert kinds == ["Linear", "BatchNorm1d", "ReLU", "Linear", "BatchNorm1d", "ReLU", "Linear"]
    assert [(m.in_features, m.out_features) for m in p if isinstance(m, nn.Linear)] == [(16, 32), (32, 24), (24, 8)]
    assert all(m.bias is None for m in p if isinstance(m, nn.Linear))
    assert p.out_dim == 8 and p(torch.randn(5, 16)).shape == (5, 8)
    q = Projector(16, "32-8", batchnorm=False)
    assert [type(m).__name__ for m in q] == ["Linear", "ReLU", "Linear"] and q[0].bias is not None
    assert [type(m).__name__ for m in Projector(4, [6])] == ["Linear"]
    assert parse_projector("2048-2048-4096") == (2048, 2048, 4096)
    assert len(Projector(3)) == 7 and Projector(3).out_dim == 4096     # the default 2048-2048-4096


@pytest.mark.parametrize("dims", [(), (0,), (16, -2), (8.0,), (True,), "2048-x", "", "12--3"])
def test_projector_rejects_bad_sizes(dims):
    with pytest.raises(ValueError, match="projector"):
        Projector(8, dims)


def test_barlow_twins_model_and_backbones():
    with pytest.raises(ValueError, match="lambd"):
        BarlowTwins(nn.Identity(), 4, (8,), lambd=-1e-3)
    with pytest.raises(ValueError, match="projector"):
        BarlowTwins(nn.Identity(), 0, (8,))
    torch.manual_seed(0)
    for name, shape, kw, dim in [("mlp", (1, 8, 8), dict(mlp_depth=2, mlp_width=24), 24),
                                 ("resnet20", (3, 16, 16), {}, 64),
                                 ("resnet18", (1, 16, 16), dict(stem="cifar"), 512)]:
        backbone, feature_dim = build_backbone(name, shape, **kw)
        assert feature_dim == dim
        assert backbone(torch.randn(3, *shape)).shape == (3, dim)
    from largebatch.models import build_model

    resnet = build_model("resnet18", 10, (3, 32, 32), stem="imagenet")
    same, d = feature_backbone(resnet)
    assert same is resnet and isinstance(resnet.fc, nn.Identity) and d == 512
    with pytest.raises(ValueError, match="classification head"):
        feature_backbone(nn.Sequential(nn.Flatten(), nn.ReLU()))
    backbone, f = build_backbone("mlp", (1, 8, 8), mlp_depth=1, mlp_width=12)
    model = BarlowTwins(backbone, f, (16, 10), lambd=0.02)
    v1, v2 = torch.randn(6, 1, 8, 8), torch.randn(6, 1, 8, 8)
    assert model.embed(v1).shape == (6, 10)
    loss = model(v1, v2)
    expected = barlow_twins_loss(model.embed(v1), model.embed(v2), 0.02)
    torch.testing.assert_close(loss, expected)


# ----------------------------------------------------------------------------- embedding caching
def _tiny_model(batchnorm, dropout=0.0):
    torch.manual_seed(3)
    layers = [nn.Flatten(), nn.Linear(12, 10), nn.Tanh()]
    if batchnorm:
        layers.insert(2, nn.BatchNorm1d(10))
    if dropout:
        layers.append(nn.Dropout(dropout))
    return BarlowTwins(nn.Sequential(*layers), 10, (9, 7), lambd=0.05, projector_batchnorm=batchnorm).double()


def _grads(model):
    return {k: p.grad.clone() for k, p in model.named_parameters()}


@pytest.mark.parametrize("micro", [1, 3, 4, 10, 25])
def test_embedding_caching_equals_one_big_batch_without_batchnorm(micro):
    g = torch.Generator().manual_seed(0)
    v1, v2 = torch.randn(10, 3, 4, generator=g, dtype=torch.float64), torch.randn(10, 3, 4, generator=g, dtype=torch.float64)
    big = _tiny_model(False)
    loss_big = big(v1, v2)
    loss_big.backward()
    cached = _tiny_model(False)
    loss = cached_backward(cached, v1, v2, micro)
    assert not loss.requires_grad
    assert loss.item() == pytest.approx(loss_big.item(), rel=1e-13)
    for k, gr in _grads(big).items():
        torch.testing.assert_close(cached.get_parameter(k).grad, gr, rtol=1e-12, atol=1e-13)
    if 1 < micro < 10:     # why caching: plain accumulation of micro-batch losses is another gradient
        naive = _tiny_model(False)
        for a, b in zip(v1.split(micro), v2.split(micro)):
            if len(a) > 1:
                naive(a, b).backward()
        diff = max((naive.get_parameter(k).grad - gr).abs().max().item() for k, gr in _grads(big).items())
        assert diff > 1e-3


def test_embedding_caching_with_batchnorm_and_dropout_is_ghost_batchnorm():
    """With BatchNorm each micro-batch is normalized alone: the step equals a graph of per-micro-batch
    forwards (same dropout masks), and running statistics are updated once per micro-batch."""
    g = torch.Generator().manual_seed(1)
    v1, v2 = torch.randn(12, 3, 4, generator=g, dtype=torch.float64), torch.randn(12, 3, 4, generator=g, dtype=torch.float64)
    ref = _tiny_model(True, dropout=0.3)
    torch.manual_seed(11)
    z = [(ref.embed(a), ref.embed(b)) for a, b in zip(v1.split(5), v2.split(5))]
    loss_ref = ref.loss(torch.cat([a for a, _ in z]), torch.cat([b for _, b in z]))
    loss_ref.backward()
    rng_after_ref = torch.get_rng_state()

    cached = _tiny_model(True, dropout=0.3)
    torch.manual_seed(11)
    loss = cached_backward(cached, v1, v2, 5)
    assert torch.equal(torch.get_rng_state(), rng_after_ref)
    assert loss.item() == pytest.approx(loss_ref.item(), rel=1e-12)
    for k, gr in _grads(ref).items():
        torch.testing.assert_close(cached.get_parameter(k).grad, gr, rtol=1e-11, atol=1e-13)
    for (k, b), b_ref in zip(cached.named_buffers(), ref.buffers()):
        torch.testing.assert_close(b, b_ref, rtol=1e-12, atol=1e-14, msg=k)
    assert cached.backbone[2].num_batches_tracked.item() == 6     # 3 micro-batches x 2 views, not 12
    # and this differs from one big batch (statistics over 12 samples): documented, not hidden
    big = _tiny_model(True)
    big(v1, v2).backward()
    nodrop = _tiny_model(True)
    cached_backward(nodrop, v1, v2, 5)
    assert (nodrop.projector[0].weight.grad - big.projector[0].weight.grad).abs().max() > 1e-4


def test_cached_backward_rejects_bad_micro_batch():
    model = _tiny_model(False)
    v = torch.randn(4, 3, 4, dtype=torch.float64)
    for bad in (0, -2, 1.5):
        with pytest.raises(ValueError, match="micro_batch_size"):
            cached_backward(model, v, v, bad)
    with pytest.raises(ValueError, match="views"):
        cached_backward(model, v, v[:3], 2)


# ----------------------------------------------------------------------------- kNN and linear evaluation
def _clusters(n_per_class, num_classes, dim, seed, spread=0.3):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(num_classes, dim, generator=g) * 3
    y = torch.arange(num_classes).repeat_interleave(n_per_class)
    x = centers[y] + spread * torch.randn(len(y), dim, generator=g)
    return x, y


def test_knn_separable_toy_set_is_perfect_with_the_defaults():
    xtr, ytr = _clusters(100, 4, 16, 0)        # 400 training samples, k = 200 spans several classes
    xte, yte = _clusters(30, 4, 16, 0)
    xte = xte + 0.1 * torch.randn_like(xte)
    assert knn_accuracy(xtr, ytr, xte, yte, 4) == 1.0
    assert knn_accuracy(xtr, ytr, xte, (yte + 1) % 4, 4) == 0.0


def test_knn_vote_is_similarity_weighted_and_chunking_is_exact():
    # 150 far samples of class 0 against 10 close ones of class 1: the count says 0, the weights say 1
    q = torch.tensor([[1.0, 0.0]])
    close = torch.tensor([[1.0, 0.05]]).repeat(10, 1)
    far = torch.tensor([[0.3, 1.0]]).repeat(150, 1)
    feats, labels = torch.cat([far, close]), torch.cat([torch.zeros(150), torch.ones(10)]).long()
    assert knn_predict(feats, labels, q, 2, k=160).item() == 1
    assert knn_predict(feats, labels, q, 2, k=160, temperature=100.0).item() == 0   # ~unweighted majority

    g = torch.Generator().manual_seed(4)
    tr, ytr = torch.randn(300, 8, generator=g), torch.randint(0, 5, (300,), generator=g)
    te = torch.randn(70, 8, generator=g)
    a = torch.nn.functional.normalize(tr, dim=1).double().numpy()
    b = torch.nn.functional.normalize(te, dim=1).double().numpy()
    sim = b @ a.T
    expected = []
    for row in sim:
        idx = np.argsort(-row)[:20]
        votes = np.zeros(5)
        np.add.at(votes, ytr.numpy()[idx], np.exp(row[idx] / 0.1))
        expected.append(votes.argmax())
    for chunk in (7, 1024):
        assert knn_predict(tr, ytr, te, 5, k=20, chunk_size=chunk).tolist() == expected
    with pytest.raises(ValueError, match="k must"):
        knn_predict(tr, ytr, te, 5, k=0)
    with pytest.raises(ValueError, match="temperature"):
        knn_predict(tr, ytr, te, 5, temperature=0.0)


def test_extract_features_eval_mode_no_grad_and_batching():
    backbone, f = build_backbone("mlp", (1, 8, 8), mlp_depth=1, mlp_width=6)
    backbone.train()
    for _ in range(3):
        backbone(torch.randn(16, 1, 8, 8) + 2)           # running statistics differ from batch statistics
    x = _images(10, 1, 8, 8)
    mean, std = torch.tensor([0.3]), torch.tensor([0.2])
    feats = extract_features(backbone, x, mean, std, batch_size=3)
    assert backbone.training and feats.shape == (10, f) and feats.dtype == torch.float32 and not feats.requires_grad
    backbone.eval()
    with torch.no_grad():
        expected = backbone(normalize(x, mean, std))
    backbone.train()
    torch.testing.assert_close(feats, expected)
    torch.testing.assert_close(extract_features(backbone, x, mean, std, batch_size=512), expected)
    with pytest.raises(ValueError, match="uint8"):
        extract_features(backbone, x.float(), mean, std)


def test_linear_eval_learns_separable_features_deterministically():
    xtr, ytr = _clusters(60, 5, 20, 1, spread=1.0)
    xte, yte = _clusters(20, 5, 20, 1, spread=1.0)
    xtr, xte = xtr * 50 + 7, xte * 50 + 7               # raw feature scale is irrelevant once standardized
    res = train_linear(xtr, ytr, xte, yte, 5, epochs=8, batch_size=64, seed=3)
    assert res.top1 == 1.0 and len(res.history) == 8
    assert res.history[-1]["train_loss"] < res.history[0]["train_loss"]
    lrs = [h["lr"] for h in res.history]
    assert lrs == sorted(lrs, reverse=True) and lrs[-1] < 1e-3       # cosine to 0 from lr = 0.1
    again = train_linear(xtr, ytr, xte, yte, 5, epochs=8, batch_size=64, seed=3)
    assert again.history == res.history and torch.equal(again.classifier.weight, res.classifier.weight)
    other = train_linear(xtr, ytr, xte, yte, 5, epochs=8, batch_size=64, seed=4)
    assert other.history != res.history
    # chance level on shuffled labels: the accuracy comes from the features, not from leakage
    shuffled = yte[torch.randperm(len(yte), generator=torch.Generator().manual_seed(0))]
    assert train_linear(xtr, ytr, xte, shuffled, 5, epochs=4, seed=3).top1 < 0.5
    with pytest.raises(ValueError, match="epochs"):
        train_linear(xtr, ytr, xte, yte, 5, epochs=0)
    with pytest.raises(ValueError, match="N x F"):
        train_linear(xtr, ytr, xte[:, :3], yte, 5)
