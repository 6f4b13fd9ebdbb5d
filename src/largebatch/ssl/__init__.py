"""Self-supervised pre-training with Barlow Twins (Zbontar et al. 2021; docs/algorithms.md section 11, docs/ssl.md).

Building blocks of ``largebatch pretrain`` / ``linear-eval``:

- ``loss``: :func:`barlow_twins_loss`, on the global batch under ``torch.distributed``;
- ``distributed``: global batch statistics, :class:`GlobalBatchNorm` (a SyncBatchNorm that also
  runs on CPU/Gloo), :func:`average_gradients`;
- ``augment``: the reference's two asymmetric views, batched on the device (:func:`barlow_twins_views`);
- ``model``: :class:`Projector`, :class:`BarlowTwins`, harness classifiers as backbones;
- ``accumulate``: exact large batches by embedding caching (:func:`cached_backward`);
- ``knn``: feature extraction and the weighted kNN monitor;
- ``linear``: linear evaluation on cached features (:func:`train_linear`).
"""

from .accumulate import cached_backward
from .augment import VIEW1, VIEW2, ViewAugment, augment_view, barlow_twins_views, blur_kernel_size
from .distributed import GlobalBatchNorm, average_gradients, convert_global_batchnorm
from .knn import extract_features, knn_accuracy, knn_predict
from .linear import LinearEvalResult, train_linear
from .loss import barlow_twins_loss
from .model import BarlowTwins, Projector, build_backbone, feature_backbone, parse_projector

__all__ = ["barlow_twins_loss", "BarlowTwins", "Projector", "parse_projector", "feature_backbone",
           "build_backbone", "ViewAugment", "VIEW1", "VIEW2", "barlow_twins_views", "augment_view",
           "blur_kernel_size", "cached_backward", "GlobalBatchNorm", "convert_global_batchnorm",
           "average_gradients", "extract_features", "knn_predict", "knn_accuracy", "train_linear",
           "LinearEvalResult"]
