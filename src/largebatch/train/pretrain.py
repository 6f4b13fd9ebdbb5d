"""``largebatch pretrain``: Barlow Twins pre-training on the harness (docs/algorithms.md section 11; TVLARS
TVLARS paper Table 1, self-supervised half).

The run is the classification harness's loop (``loop.py``: steps, layer diagnostics, atomic
checkpoints and exact ``--resume``, the non-finite stop, DDP, progress bar) with a different
:class:`~largebatch.train.loop.Task`:

- **model**: the configured backbone (``--model``, its classification head removed) and the
  projector ``--projector`` (the papers' ``2048-2048-4096``), loss weight ``--lambd``;
- **one step**: two views of this step's images (``largebatch.ssl.augment``, on the device, the
  random choices drawn for the *global* batch so N processes see the views one process would),
  then the gradient of the loss on the global batch. With ``--micro-batch-size`` smaller than
  the per-process batch the step uses embedding caching (``largebatch.ssl.accumulate``), exact
  for a backbone without BatchNorm; plain accumulation would change the loss, which is not a mean
  over samples;
- **data parallelism**: every BatchNorm becomes a global-batch BatchNorm (the reference uses
  SyncBatchNorm), the loss's statistics and cross-correlation are all-reduced, and parameter
  gradients are averaged once per step (no DDP wrapper; with ``--fsdp``, FSDP2's reduce-scatter
  averages them, after every micro-batch's backward when embedding caching is on);
- **metrics**: ``train_loss`` (mean over the epoch's steps) and ``knn_acc``, the weighted kNN
  monitor (cosine similarity, ``--knn-k`` 200, temperature 0.1) of the backbone's test features
  against its training features, every ``--knn-every`` epochs and after the last (NaN between).

Optimizers come from the registry with biases and normalization parameters excluded
(``param_groups``), as in the reference. Deviation (docs/algorithms.md is silent): the reference gives biases
and BatchNorm parameters a separate, smaller LR (0.0048 vs 0.2 x B/256); here every group has the
run's LR. CLARS is refused: its per-sample gradient norms need a loss that is a sum over samples.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from largebatch import ssl
from largebatch.optim import registry

from . import data as data_mod
from . import distributed as dist_mod
from .config import PretrainConfig, TrainConfig  # noqa: F401  (PretrainConfig: re-exported)
from .loop import Task, _Setup
from ..models import init_weights

PRETRAIN_COLUMNS = ["epoch", "step", "lr", "train_loss", "knn_acc", "epoch_seconds", "images_per_s"]


class BarlowTwinsTask(Task):
    """Barlow Twins as a :class:`~largebatch.train.loop.Task` (see the module docstring)."""

    name = "pretrain"
    metric_columns = PRETRAIN_COLUMNS
    sums_size = 2  # sum of (step loss x images), images
    fsdp_methods = ("embed",)  # embedding caching runs the model through embed()

    def check(self, cfg: TrainConfig) -> None:
        if registry.get(cfg.optimizer).persample:
            raise ValueError(f"optimizer: {cfg.optimizer} needs per-sample gradients of a loss that is a sum over "
                             f"samples; the Barlow Twins loss couples the whole batch. Choose another optimizer")
        if cfg.augment is not None:
            raise ValueError("augment: pre-training always uses the Barlow Twins augmentations; drop --augment")
        if cfg.precision == "fp16":
            raise ValueError("precision: fp16 (GradScaler) is not supported by pre-training; use bf16 or fp32")

    def build_model(self, cfg: PretrainConfig, ds: data_mod.ArrayDataset) -> nn.Module:
        backbone, dim = ssl.build_backbone(cfg.model, ds.shape, stem=cfg.stem, mlp_depth=cfg.mlp_depth,
                                           mlp_width=cfg.mlp_width, activation=cfg.activation,
                                           mlp_batchnorm=cfg.mlp_batchnorm)
        init_weights(backbone, cfg.init)
        return ssl.BarlowTwins(backbone, dim, cfg.projector, cfg.lambd)

    def prepare(self, model: nn.Module, cfg: TrainConfig, info: dist_mod.DistInfo) -> nn.Module:
        return ssl.convert_global_batchnorm(model) if info.enabled else model

    def wrap(self, model: nn.Module, info: dist_mod.DistInfo) -> nn.Module:
        return model  # gradients are averaged in step_gradients, once per step

    def step_gradients(self, setup: _Setup, idx: torch.Tensor, gen: torch.Generator,
                       sums: torch.Tensor) -> torch.Tensor:
        ds, info = setup.ds, setup.info
        v1, v2 = global_batch_views(ds.train_x[idx], ds.mean, ds.std, gen, info.rank, info.world_size)
        with setup.autocast:
            loss = ssl.cached_backward(setup.model, v1, v2, setup.micro)
        if not setup.cfg.fsdp:  # FSDP2 reduce-scatters (averages) the gradients itself
            ssl.average_gradients(setup.model.parameters())
        sums[0] += loss.double() * idx.numel()
        sums[1] += idx.numel()
        return loss

    def metrics(self, setup: _Setup, sums: list[float], epoch: int) -> dict[str, float]:
        cfg, ds = setup.cfg, setup.ds
        row = {"train_loss": sums[0] / sums[1], "knn_acc": float("nan")}
        if cfg.knn_every and ((epoch + 1) % cfg.knn_every == 0 or epoch + 1 == cfg.epochs):
            backbone = setup.core.backbone
            with setup.autocast:
                bank = ssl.extract_features(backbone, ds.train_x, ds.mean, ds.std, cfg.eval_batch_size)
                test = ssl.extract_features(backbone, ds.test_x, ds.mean, ds.std, cfg.eval_batch_size)
            row["knn_acc"] = ssl.knn_accuracy(bank, ds.train_y, test, ds.test_y, ds.num_classes,
                                              cfg.knn_k, cfg.knn_temperature)
        return row

    def summary(self, row: dict) -> str:
        knn = "" if math.isnan(row["knn_acc"]) else f" | kNN acc {row['knn_acc']:.4f}"
        return f"loss {row['train_loss']:.4f}{knn}"


def global_batch_views(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, gen: torch.Generator,
                       rank: int = 0, world_size: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """The two normalized views of this rank's images ``x``, rows ``rank::world_size`` of the
    global batch (``distributed.shard``): ``ssl.barlow_twins_views`` with the choices drawn for
    the whole global batch, so N processes produce the views one process would."""
    return ssl.barlow_twins_views(x, mean, std, gen, rank=rank, world_size=world_size)


def pretrain(cfg: PretrainConfig, dataset: data_mod.ArrayDataset | None = None, *, log=None):
    """Run (or resume) Barlow Twins pre-training; returns the loop's ``RunResult`` (``.model`` is
    the ``BarlowTwins`` module, ``.model.backbone`` the pre-trained backbone)."""
    from .loop import train

    return train(cfg, dataset, log=log, task=BarlowTwinsTask())
