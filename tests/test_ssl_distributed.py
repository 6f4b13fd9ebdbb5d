"""Two processes on CPU (Gloo) equal one process on the same global batch (docs/algorithms.md section 11):
the loss and its gradients, a DDP + LARS step with BatchNorm synchronized over the ranks
(GlobalBatchNorm: torch.nn.SyncBatchNorm refuses CPU tensors), and embedding caching."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel as DDP

from forked import free_port, init_gloo
from largebatch.optim import LARS, param_groups
from largebatch.ssl import (BarlowTwins, GlobalBatchNorm, average_gradients, barlow_twins_loss, barlow_twins_views,
                            build_backbone, cached_backward, convert_global_batchnorm)

pytestmark = pytest.mark.usefixtures("one_thread")

SPLIT = [7, 9]          # uneven shards: the global count is all-reduced, not assumed
N = sum(SPLIT)


def _embeddings():
    g = torch.Generator().manual_seed(0)
    z1 = torch.randn(N, 6, generator=g, dtype=torch.float64)
    return z1, 0.6 * z1 + torch.randn(N, 6, generator=g, dtype=torch.float64)


def _views():
    x = torch.randint(0, 256, (N, 1, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    v1, v2 = barlow_twins_views(x, torch.tensor([0.4]), torch.tensor([0.3]), torch.Generator().manual_seed(2),
                                dtype=torch.float64)
    return v1, v2


def _bn_model():
    torch.manual_seed(0)
    backbone, f = build_backbone("mlp", (1, 8, 8), mlp_depth=2, mlp_width=12)   # BatchNorm1d in the backbone
    return BarlowTwins(backbone, f, (16, 10), lambd=0.02).double()                # and in the projector


def _plain_model():
    torch.manual_seed(0)
    backbone, f = build_backbone("mlp", (1, 8, 8), mlp_depth=1, mlp_width=12, mlp_batchnorm=False)
    return BarlowTwins(backbone, f, (16, 10), lambd=0.02, projector_batchnorm=False).double()


def _optimizer(model):
    return LARS(param_groups(model, weight_decay=1e-3), lr=0.5, momentum=0.9, eta=0.02)


def _grads(model):
    return {k: p.grad.clone() for k, p in model.named_parameters()}


def _worker(rank, world, port, out):
    init_gloo(rank, world, port)
    lo, hi = sum(SPLIT[:rank]), sum(SPLIT[:rank + 1])
    res = {}
    # 1. the loss alone
    z1, z2 = (z[lo:hi].clone().requires_grad_() for z in _embeddings())
    loss = barlow_twins_loss(z1, z2, 0.1)
    loss.backward()
    res["loss"], res["z1_grad"], res["z2_grad"] = loss.detach(), z1.grad, z2.grad
    # 2. DDP + GlobalBatchNorm + LARS, one step
    v1, v2 = (v[lo:hi] for v in _views())
    model = convert_global_batchnorm(_bn_model())
    res["n_global_bn"] = sum(isinstance(m, GlobalBatchNorm) for m in model.modules())
    ddp = DDP(model)
    opt = _optimizer(model)
    step_loss = ddp(v1, v2)
    step_loss.backward()
    opt.step()
    res["step_loss"], res["step_grads"] = step_loss.detach(), _grads(model)
    res["state"] = {k: v.clone() for k, v in model.state_dict().items()}
    # 3. embedding caching in micro-batches of 3 on each rank, gradients averaged without DDP
    plain = _plain_model()
    res["cached_loss"] = cached_backward(plain, v1, v2, 3)
    average_gradients(plain.parameters())
    res["cached_grads"] = _grads(plain)
    torch.save(res, os.path.join(out, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("ssl_ddp")
    mp.start_processes(_worker, args=(2, free_port(), str(out)), nprocs=2, join=True, start_method="fork")
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


def test_loss_and_gradients_are_those_of_the_global_batch(ranks):
    z1, z2 = (z.clone().requires_grad_() for z in _embeddings())
    loss = barlow_twins_loss(z1, z2, 0.1)
    loss.backward()
    for r, res in enumerate(ranks):
        torch.testing.assert_close(res["loss"], loss.detach(), rtol=1e-13, atol=0)      # same value on every rank
        lo, hi = sum(SPLIT[:r]), sum(SPLIT[:r + 1])
        # the torch.distributed.nn / SyncBatchNorm convention: world_size x this rank's share
        torch.testing.assert_close(res["z1_grad"], 2 * z1.grad[lo:hi], rtol=1e-11, atol=1e-14)
        torch.testing.assert_close(res["z2_grad"], 2 * z2.grad[lo:hi], rtol=1e-11, atol=1e-14)
    local = barlow_twins_loss(z1[:SPLIT[0]], z2[:SPLIT[0]], 0.1)       # a per-rank loss would differ
    assert abs(local.item() - loss.item()) > 1e-3


def test_ddp_step_with_global_batchnorm_equals_one_process(ranks):
    v1, v2 = _views()
    model = _bn_model()            # plain BatchNorm: one process
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = _optimizer(model)
    loss = model(v1, v2)
    loss.backward()
    opt.step()
    grads, state = _grads(model), model.state_dict()
    for res in ranks:
        assert res["n_global_bn"] == 3   # 2 in the backbone, 1 in the projector
        torch.testing.assert_close(res["step_loss"], loss.detach(), rtol=1e-12, atol=0)
        for k, g in grads.items():
            torch.testing.assert_close(res["step_grads"][k], g, rtol=1e-9, atol=1e-12, msg=k)
        for k, v in state.items():          # weights after the LARS step and BatchNorm running statistics
            torch.testing.assert_close(res["state"][k], v, rtol=1e-9, atol=1e-12, msg=k)
    moved = [k for k, v in state.items() if v.is_floating_point() and (v - before[k]).abs().max() > 1e-4]
    assert any("running_var" in k for k in moved) and any(k.endswith("weight") for k in moved)


def test_cached_two_process_step_equals_one_big_batch(ranks):
    v1, v2 = _views()
    model = _plain_model()
    loss = model(v1, v2)
    loss.backward()
    for res in ranks:
        torch.testing.assert_close(res["cached_loss"], loss.detach(), rtol=1e-12, atol=0)
        for k, g in _grads(model).items():
            torch.testing.assert_close(res["cached_grads"][k], g, rtol=1e-10, atol=1e-13, msg=k)
