"""Per-layer statistics of the optimizer step, kept on the device until the end of the epoch.

Every ``stats_every`` steps one row per parameter tensor: weight norm, gradient norm, the trust
ratio and the per-layer LR applied, and whether the tensor is adapted. A
:class:`~largebatch.optim.LayerwiseOptimizer` measures them during its step
(``track_stats``, ``layer_stats()``); for any other optimizer (``torch.optim.SGD``) the norms
are taken before the step, with trust 1 and the group's LR.
"""

from __future__ import annotations

from typing import Any

import torch

from largebatch.optim import LayerwiseOptimizer


class LayerStatsRecorder:
    """One epoch's layer statistics: ``before_step`` / ``after_step`` around each optimizer step,
    ``rows`` once at the end (the only host copy)."""

    def __init__(self, opt: torch.optim.Optimizer, every: int):
        self.opt, self.every = opt, every
        self.layerwise = isinstance(opt, LayerwiseOptimizer)
        self.recorded: list[tuple[int, list[int], torch.Tensor]] = []  # (step, param ids, [5, n] tensor)
        self._step: int | None = None  # the step being recorded
        self._pre = None

    def before_step(self, step: int) -> None:
        self._step = step if self.every > 0 and step % self.every == 0 else None
        if self._step is None:
            return
        if self.layerwise:
            self.opt.track_stats = True
        else:
            self._pre = _pre_step_norms(self.opt)

    def after_step(self) -> None:
        if self._step is None:
            return
        self.recorded.append((self._step, *_collect_stats(self.opt, self._pre)))
        if self.layerwise:
            self.opt.track_stats = False
        self._pre = None

    def rows(self, names: dict[int, str]) -> list[dict[str, Any]]:
        """Table rows (``rundir.STAT_COLUMNS``); ``names`` maps ``id(param)`` to its name."""
        return _stat_rows(self.recorded, names)


def _pre_step_norms(opt) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor, torch.Tensor]:
    """For optimizers other than ``LayerwiseOptimizer`` (torch SGD): norms before the step, trust 1, group LR."""
    params, lrs = [], []
    for g in opt.param_groups:
        for p in g["params"]:
            if p.grad is not None:
                params.append(p)
                lrs.append(g["lr"])
    wn = torch.stack(_full(torch._foreach_norm([p.detach() for p in params]))).float()
    gn = torch.stack(_full(torch._foreach_norm([p.grad for p in params]))).float()
    return params, wn, gn, torch.tensor(lrs, device=wn.device, dtype=torch.float32)


def _full(norms: list[torch.Tensor]) -> list[torch.Tensor]:
    """Norms of DTensor parameters (FSDP2) as plain tensors (the norms of the full tensors)."""
    from largebatch._dtensor import dtensor_type

    DT = dtensor_type()
    return [n.full_tensor() if DT is not None and isinstance(n, DT) else n for n in norms]


def _collect_stats(opt, pre) -> tuple[list[int], torch.Tensor]:
    """(param ids, [5, n] tensor of w_norm, g_norm, trust, lr, adapt) -- still on device."""
    if pre is not None:
        params, wn, gn, lr = pre
        adapt = torch.tensor([bool(next(g for g in opt.param_groups if any(q is p for q in g["params"]))
                                   .get("adapt", True)) for p in params], device=wn.device, dtype=torch.float32)
        return [id(p) for p in params], torch.stack([wn, gn, torch.ones_like(wn), lr, adapt]).clone()
    st = opt.layer_stats()
    ids = [id(p) for p in st["params"]]
    return ids, torch.stack([st["w_norm"], st["g_norm"], st["trust"], st["lr"],
                             st["adapt"].to(st["w_norm"].dtype)]).float().clone()


def _stat_rows(stat_rows, names: dict[int, str]) -> list[dict[str, Any]]:
    if not stat_rows:
        return []
    host = torch.stack([t for _, _, t in stat_rows]).cpu().numpy() if len({t.shape for _, _, t in stat_rows}) == 1 \
        else [t.cpu().numpy() for _, _, t in stat_rows]
    rows = []
    for (step, ids, _), arr in zip(stat_rows, host):
        for j, pid in enumerate(ids):
            wn, gn, tr, lr, ad = (float(v) for v in arr[:, j])
            rows.append({"step": step, "layer": names.get(pid, f"param{j}"), "adapt": int(ad),
                         "w_norm": wn, "g_norm": gn, "lnr": wn / gn if gn > 0 else float("nan"),
                         "trust": tr, "layer_lr": lr})
    return rows
