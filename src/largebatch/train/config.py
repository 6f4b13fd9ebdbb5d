"""Training configuration: one dataclass, filled from defaults, then a YAML/TOML file, then flags.

``resolve(file, overrides)`` is the single entry point; ``TrainConfig.validate()`` rejects a bad
value before any data or model is touched, with a ``ValueError`` that names the field and the
accepted range.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field, fields
from typing import Any

DATASETS = ("digits", "fashion-mnist", "fashion-mnist-val", "mnist", "cifar10", "cifar100", "tinyimagenet",
            "imagenet")
MODELS = ("mlp", "resnet20", "resnet32", "resnet44", "resnet56", "resnet18", "resnet34", "resnet50")
INITS = ("default", "xavier_uniform", "xavier_normal", "kaiming_uniform", "kaiming_normal")
SCHEDULES = ("auto", "none", "cosine", "poly")
SCALING = ("none", "linear", "sqrt", "auto")
OPTIMIZER_PATHS = ("auto", "per_tensor", "foreach", "compiled", "native")
PRECISIONS = ("fp32", "bf16", "fp16")
ACTIVATIONS = ("relu", "tanh", "gelu", "silu", "leaky_relu", "identity")
STEMS = ("cifar", "imagenet", "imagenet-nopool")
NORMALIZATIONS = ("data", "cifar10")
METRIC_FORMATS = ("csv", "jsonl")
FSDP_PARAM_DTYPES = ("fp32", "bf16")
NOISE_SCALE_METHODS = ("auto", "two_batch", "per_sample")

# Fields that may differ between a run and its --resume continuation (``epochs`` too, when the
# schedule does not depend on it: rundir.check_resume_config).
RESUME_MUTABLE = ("resume", "overwrite", "stop_after_epochs", "progress", "out_dir", "data_dir", "download", "device")
# Fields that describe one invocation, not the run: not written to config.yaml, so that
# ``--config RUN/config.yaml --resume`` does not stop again or overwrite.
INVOCATION_FIELDS = ("resume", "overwrite", "stop_after_epochs")


@dataclass
class TrainConfig:
    """Everything one training run needs. Field help texts are the CLI help texts."""

    # data
    dataset: str = field(default="digits", metadata={"help": f"one of {', '.join(DATASETS)}"})
    data_dir: str | None = field(default=None, metadata={"help": "dataset root (default: per dataset, see docs/training.md)"})
    download: bool = field(default=False, metadata={"help": "download the dataset with torchvision if absent"})
    augment: bool | None = field(default=None, metadata={"help": "random crop (pad 4) + flip (default: on for cifar/tinyimagenet, off otherwise)"})
    # model
    model: str = field(default="mlp", metadata={"help": f"one of {', '.join(MODELS)}"})
    stem: str = field(default="cifar", metadata={"help": "ResNet-18/34/50 stem: cifar (3x3 conv, no max-pool), imagenet "
                                                      "(7x7 stride-2 conv + max-pool) or imagenet-nopool (7x7 stride-1 "
                                                      "conv, no max-pool: LALC App. B)"})
    normalize: str = field(default="data", metadata={"help": "input normalization: data (per-channel mean/std of the "
                                                             "training images) or cifar10 (LALC App. B: mean (0.4914, "
                                                             "0.4822, 0.4465), std (0.2023, 0.1994, 0.2010))"})
    init: str = field(default="default", metadata={"help": f"weight init: {', '.join(INITS)}"})
    mlp_depth: int = field(default=3, metadata={"help": "MLP hidden layers"})
    mlp_width: int = field(default=256, metadata={"help": "MLP hidden width"})
    mlp_batchnorm: bool = field(default=True, metadata={"help": "BatchNorm after each hidden Linear"})
    activation: str = field(default="relu", metadata={"help": f"MLP activation: {', '.join(ACTIVATIONS)}"})
    sync_bn: bool = field(default=False, metadata={"help": "convert BatchNorm to SyncBatchNorm under DDP"})
    # data parallelism (torchrun)
    fsdp: bool = field(default=False, metadata={"help": "shard parameters, gradients and optimizer state with FSDP2 "
                                                "instead of DDP; checkpoints become torch.distributed.checkpoint "
                                                "folders that resume on any number of processes"})
    fsdp_param_dtype: str = field(default="fp32", metadata={"help": "FSDP2 mixed precision: fp32, or bf16 (bfloat16 "
                                                             "parameters in forward/backward, float32 gradient "
                                                             "reduction, float32 weights and optimizer state)"})
    # optimizer
    optimizer: str = field(default="lars", metadata={"help": "a registered optimizer: `largebatch optimizers` lists them"})
    optimizer_path: str = field(default="auto", metadata={"help": "largebatch optimizers' execution path: auto (fastest "
                                                            "for the device), per_tensor, foreach, compiled or native"})
    lr: float = field(default=0.1, metadata={"help": "base learning rate (before the scaling rule)"})
    lr_scaling: str = field(default="none", metadata={"help": "none, linear (lr*B/B0), sqrt (lr*sqrt(B/B0)) or auto "
                                                       "(the optimizer's rule, see `largebatch optimizers`)"})
    base_batch_size: int = field(default=256, metadata={"help": "B0 of the scaling rule"})
    momentum: float = field(default=0.9, metadata={"help": "momentum (sgd, lars, tvlars, lalc, clars)"})
    nesterov: bool = field(default=False, metadata={"help": "Nesterov momentum (sgd, lars, lalc)"})
    weight_decay: float = field(default=5e-4, metadata={"help": "coupled L2 on weights (not on biases/BN)"})
    eta: float | None = field(default=None, metadata={"help": "trust coefficient (default: the optimizer's)"})
    trust_clip: bool = field(default=False, metadata={"help": "LARS: clip trust ratio at 1 (LARC)"})
    betas: tuple[float, float] = field(default=(0.9, 0.999), metadata={"help": "LAMB betas, e.g. 0.9,0.999"})
    eps: float | None = field(default=None, metadata={"help": "denominator epsilon (default: the optimizer's)"})
    max_trust: float | None = field(default=None, metadata={"help": "LAMB: clip trust ratio to [0, max_trust]"})
    tvlars_lam: float = field(default=1e-4, metadata={"help": "TVLARS decay coefficient lambda (eq. 8)"})
    tvlars_alpha: float = field(default=1.0, metadata={"help": "TVLARS alpha (eq. 8)"})
    tvlars_delay_epochs: float = field(default=0.0, metadata={"help": "TVLARS delay d_e in epochs (converted to steps)"})
    tvlars_gamma_min: float = field(default=0.0, metadata={"help": "TVLARS lower bound gamma_min"})
    clars_subset: int | None = field(default=None, metadata={"help": "CLARS: per-sample norms from the first N samples per process and step (default: all)"})
    # schedule
    schedule: str = field(default="auto", metadata={"help": "auto (the optimizer's: none for tvlars, whose phi(t) is "
                                                     "the schedule; cosine otherwise), none, cosine (warm-up + "
                                                     "cosine) or poly (warm-up + polynomial)"})
    warmup_epochs: float = field(default=0.0, metadata={"help": "linear warm-up length in epochs"})
    min_lr_ratio: float = field(default=0.0, metadata={"help": "final LR / peak LR (cosine min, poly end)"})
    poly_power: float = field(default=2.0, metadata={"help": "polynomial decay power"})
    # batch / epochs
    epochs: int = field(default=10, metadata={"help": "training epochs"})
    batch_size: int = field(default=512, metadata={"help": "global batch size (micro x accumulation x world size)"})
    micro_batch_size: int | None = field(default=None, metadata={"help": "per-process micro-batch (default: no accumulation)"})
    drop_last: bool = field(default=True, metadata={"help": "drop the last incomplete global batch of each epoch"})
    eval_batch_size: int = field(default=1024, metadata={"help": "evaluation batch size per process"})
    # run
    precision: str = field(default="fp32", metadata={"help": "fp32, bf16 (autocast) or fp16 (autocast + GradScaler, CUDA)"})
    seed: int = field(default=0, metadata={"help": "random seed (model init, data order, augmentation)"})
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda or cuda:N"})
    out_dir: str = field(default="runs/run", metadata={"help": "run directory (config, metrics, checkpoint)"})
    stats_every: int = field(default=10, metadata={"help": "record per-layer LWN/LGN/LNR/trust/LR every k steps (0: off)"})
    noise_scale: bool = field(default=False, metadata={"help": "record the gradient noise scale B_simple per step "
                                                       "(steps, metrics and noise_scale tables; docs/batch-size.md)"})
    noise_scale_method: str = field(default="auto", metadata={"help": "two_batch (micro-batches or ranks), per_sample "
                                                              "(exact per-sample norms) or auto (two_batch where "
                                                              "there are two batch sizes)"})
    noise_scale_ema: float = field(default=0.99, metadata={"help": "EMA decay of the noise scale's numerator and "
                                                           "denominator, in [0, 1)"})
    metrics_format: str = field(default="csv", metadata={"help": "csv or jsonl"})
    checkpoint: bool = field(default=True, metadata={"help": "write an atomic checkpoint every epoch"})
    resume: bool = field(default=False, metadata={"help": "continue from OUT_DIR/checkpoint.pt"})
    overwrite: bool = field(default=False, metadata={"help": "replace the run already in OUT_DIR (its files are deleted)"})
    stop_after_epochs: int | None = field(default=None, metadata={"help": "stop this invocation after N epochs, resume later (default: none, run to the end)"})
    progress: bool = field(default=True, metadata={"help": "tqdm progress bar (quiet anyway when not a terminal)"})

    # ------------------------------------------------------------------ validation
    def validate(self) -> "TrainConfig":
        def choice(name: str, allowed: tuple[str, ...]) -> None:
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}: {getattr(self, name)!r} is not one of {', '.join(allowed)}")

        def positive_int(name: str, optional: bool = False) -> None:
            v = getattr(self, name)
            if optional and v is None:
                return
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name}: must be an integer >= 1, got {v!r}")

        def number(name: str, lo: float, hi: float = math.inf, optional: bool = False,
                   lo_open: bool = False) -> None:
            v = getattr(self, name)
            if optional and v is None:
                return
            ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
            ok = ok and (v > lo if lo_open else v >= lo) and v <= hi
            if not ok:
                rng = (f"> {lo:g}" if lo_open else f">= {lo:g}") if hi == math.inf else \
                    f"in {'(' if lo_open else '['}{lo:g}, {hi:g}]"
                raise ValueError(f"{name}: must be a finite number {rng}, got {v!r}")

        from largebatch.optim import registry

        for f in fields(self):  # booleans: a quoted "false" in a file is a string, and truthy
            v = getattr(self, f.name)
            if str(f.type).startswith("bool") and not (isinstance(v, bool) or (v is None and "None" in str(f.type))):
                raise ValueError(f"{f.name}: must be true or false (unquoted in config files), got {v!r}")
        for f in fields(TrainConfig):  # paths and names: a YAML number or list is not one
            v = getattr(self, f.name)
            if str(f.type).startswith("str") and not (isinstance(v, str) or (v is None and "None" in str(f.type))):
                raise ValueError(f"{f.name}: must be a string, got {v!r}" + (" (quote it in a config file)"
                                                                             if isinstance(v, (int, float)) else ""))
        for name in ("out_dir",):
            if not getattr(self, name).strip():
                raise ValueError(f"{name}: must not be empty")
        for name, allowed in (("dataset", DATASETS), ("model", MODELS), ("init", INITS),
                              ("optimizer", tuple(registry.OPTIMIZERS)), ("schedule", SCHEDULES),
                              ("lr_scaling", SCALING), ("precision", PRECISIONS), ("activation", ACTIVATIONS),
                              ("stem", STEMS), ("normalize", NORMALIZATIONS), ("metrics_format", METRIC_FORMATS),
                              ("optimizer_path", OPTIMIZER_PATHS), ("fsdp_param_dtype", FSDP_PARAM_DTYPES),
                              ("noise_scale_method", NOISE_SCALE_METHODS)):
            choice(name, allowed)
        for name in ("epochs", "batch_size", "base_batch_size", "eval_batch_size", "mlp_width"):
            positive_int(name)
        for name in ("micro_batch_size", "stop_after_epochs"):
            positive_int(name, optional=True)
        if not isinstance(self.mlp_depth, int) or isinstance(self.mlp_depth, bool) or self.mlp_depth < 0:
            raise ValueError(f"mlp_depth: must be an integer >= 0, got {self.mlp_depth!r}")
        if not isinstance(self.stats_every, int) or isinstance(self.stats_every, bool) or self.stats_every < 0:
            raise ValueError(f"stats_every: must be an integer >= 0 (0 turns diagnostics off), got {self.stats_every!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or not 0 <= self.seed < 2**63:
            raise ValueError(f"seed: must be an integer in [0, 2**63), got {self.seed!r}")
        number("lr", 0.0)
        number("warmup_epochs", 0.0)
        number("min_lr_ratio", 0.0, 1.0)
        number("poly_power", 0.0, lo_open=True)
        v = self.noise_scale_ema
        if not (isinstance(v, (int, float)) and not isinstance(v, bool) and 0.0 <= v < 1.0):
            raise ValueError(f"noise_scale_ema: must be a number in [0, 1), got {v!r}")
        if isinstance(self.betas, list):
            self.betas = tuple(self.betas)
        info = registry.get(self.optimizer)
        self._check_optimizer_fields(info, registry)
        self.betas = (float(self.betas[0]), float(self.betas[1]))
        if self.schedule == "auto":  # TVLARS: phi(t) replaces warm-up and decay, so no schedule
            self.schedule = info.schedule
        if self.lr_scaling == "auto":
            self.lr_scaling = info.lr_scaling
        if self.warmup_epochs >= self.epochs and self.schedule != "none":
            raise ValueError(f"warmup_epochs: must be < epochs ({self.epochs}), got {self.warmup_epochs!r}")
        if self.warmup_epochs > 0 and self.schedule == "none":
            raise ValueError("warmup_epochs: needs schedule cosine or poly (schedule is 'none')")
        if self.micro_batch_size is not None and self.micro_batch_size > self.batch_size:
            raise ValueError(f"micro_batch_size: must be <= batch_size ({self.batch_size}), got {self.micro_batch_size}")
        if self.dataset == "imagenet" and self.augment is not None:
            raise ValueError("augment: imagenet always uses the papers' transforms (RandomResizedCrop(224) + flip for "
                             "training, Resize(256) + CenterCrop(224) for evaluation); leave augment unset")
        if self.resume and self.overwrite:
            raise ValueError("overwrite: cannot be combined with resume (continue the run, or replace it)")
        if self.resume and not self.checkpoint:
            raise ValueError("resume: needs checkpoint: true (a resumed run must keep writing checkpoints); "
                             "drop --no-checkpoint")
        if self.precision == "fp16" and not str(self.device).startswith("cuda"):
            raise ValueError("precision: fp16 needs device cuda (GradScaler); use bf16 on CPU")
        if self.fsdp_param_dtype != "fp32" and not self.fsdp:
            raise ValueError("fsdp_param_dtype: applies to FSDP2 only; add --fsdp (or use --precision bf16 for "
                             "autocast under DDP)")
        if self.fsdp and self.precision == "fp16":
            raise ValueError("precision: fp16 (GradScaler) is not supported with --fsdp; use bf16, or "
                             "--fsdp-param-dtype bf16")
        if not (self.device in ("auto", "cpu", "cuda") or str(self.device).startswith("cuda:")):
            raise ValueError(f"device: must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        return self

    def _check_optimizer_fields(self, info, registry) -> None:
        """The optimizer's hyper-parameters, by its own validation (the registry constructs it
        on a dummy parameter): the class, config files and flags accept the same values.
        A field the chosen optimizer does not take is checked by the first optimizer that does."""
        values = self.to_dict()
        if self.optimizer_path != "auto" and not info.layerwise:
            raise ValueError(f"optimizer_path: {self.optimizer} is not a largebatch optimizer; leave it at auto")
        info.check(values)
        for fld, value in values.items():
            if value is None or fld in info.args:
                continue
            other = next((o for o in registry.OPTIMIZERS.values() if fld in o.args), None)
            if other is not None:
                other.check({"lr": 1.0, fld: value})

    def check_world_size(self, world_size: int) -> tuple[int, int]:
        """Return (micro_batch, accumulation) for ``world_size`` processes, or raise ValueError."""
        if self.batch_size % world_size:
            raise ValueError(f"batch_size: {self.batch_size} is not divisible by the world size {world_size}")
        per_rank = self.batch_size // world_size
        micro = per_rank if self.micro_batch_size is None else self.micro_batch_size
        if micro > per_rank:
            raise ValueError(f"micro_batch_size: {micro} exceeds the per-process batch {per_rank} "
                             f"(batch_size {self.batch_size} / world size {world_size})")
        if per_rank % micro:
            raise ValueError(f"micro_batch_size: {micro} must divide the per-process batch {per_rank} "
                             f"(batch_size {self.batch_size} / world size {world_size})")
        return micro, per_rank // micro

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        return d


FIELD_NAMES = tuple(f.name for f in fields(TrainConfig))


@dataclass
class PretrainConfig(TrainConfig):
    """``TrainConfig`` plus Barlow Twins' fields; defaults follow the reference recipe (LARS-style
    LR 0.2 x B/256, weight decay 1.5e-6) and the TVLARS papers (``tvlars_lam`` 1e-5)."""

    lr: float = field(default=0.2, metadata={"help": "base learning rate (before the scaling rule)"})
    lr_scaling: str = field(default="linear", metadata={"help": "none, linear (lr*B/B0; the reference: 0.2 x B/256), "
                                                         "sqrt or auto (the optimizer's rule)"})
    weight_decay: float = field(default=1.5e-6, metadata={"help": "coupled L2 on weights (the reference: 1.5e-6)"})
    tvlars_lam: float = field(default=1e-5, metadata={"help": "TVLARS decay coefficient lambda (the papers' SSL: 1e-5)"})
    out_dir: str = field(default="runs/pretrain", metadata={"help": "run directory (config, metrics, checkpoint)"})
    projector: str = field(default="2048-2048-4096", metadata={"help": "projector layer widths, dash-separated"})
    lambd: float = field(default=0.0051, metadata={"help": "weight of the off-diagonal terms of the loss"})
    knn_every: int = field(default=1, metadata={"help": "kNN monitor every N epochs and after the last (0: off)"})
    knn_k: int = field(default=200, metadata={"help": "neighbours of the kNN monitor"})
    knn_temperature: float = field(default=0.1, metadata={"help": "temperature of the kNN monitor's vote"})

    def validate(self) -> "PretrainConfig":
        super().validate()
        from largebatch.ssl import parse_projector

        parse_projector(self.projector)
        if not (isinstance(self.lambd, (int, float)) and not isinstance(self.lambd, bool)
                and math.isfinite(self.lambd) and self.lambd >= 0):
            raise ValueError(f"lambd: must be a finite number >= 0, got {self.lambd!r}")
        for name, lo in (("knn_every", 0), ("knn_k", 1)):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < lo:
                raise ValueError(f"{name}: must be an integer >= {lo}, got {v!r}")
        if not (isinstance(self.knn_temperature, (int, float)) and math.isfinite(self.knn_temperature)
                and self.knn_temperature > 0):
            raise ValueError(f"knn_temperature: must be a finite number > 0, got {self.knn_temperature!r}")
        return self


def load_file(path: str) -> dict[str, Any]:
    """Read a YAML (.yaml/.yml), TOML (.toml) or JSON (.json) config file into a flat dict.

    Keys may use dashes or underscores; a ``[train]`` table / ``train:`` mapping is also accepted.
    A file that cannot be read or parsed is a ``ValueError`` naming it (and the line, when known).
    """
    ext = os.path.splitext(path)[1].lower()
    if ext not in (".yaml", ".yml", ".toml", ".json"):
        raise ValueError(f"config: unknown file type {ext!r} for {path} (use .yaml, .yml, .toml or .json)")
    try:
        with open(path, "rb") as f:
            text = f.read().decode("utf-8")
    except OSError as e:
        raise ValueError(f"config: cannot read {path}: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise ValueError(f"config: {path} is not UTF-8 text") from None
    try:
        data = _parse(text, ext)
    except Exception as e:  # each parser has its own error class; all mean "fix the file"
        raise ValueError(f"config: {path} is not valid {ext.lstrip('.').upper().replace('YML', 'YAML')}: "
                         f"{_parse_problem(e)}") from None
    if data is None:
        data = {}
    from .safefile import check_size

    check_size(data, 10_000, f"config: {path}")  # YAML anchors can stand for 10^9 values in 500 bytes
    if not isinstance(data, dict):
        raise ValueError(f"config: {path} must contain a mapping of field: value")
    if set(data) == {"train"} and isinstance(data["train"], dict):
        data = data["train"]
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def _parse(text: str, ext: str) -> Any:
    if ext in (".yaml", ".yml"):
        import yaml

        return yaml.safe_load(text)
    if ext == ".toml":
        try:
            import tomllib
        except ModuleNotFoundError:  # Python < 3.11
            import tomli as tomllib  # type: ignore[no-redef]
        return tomllib.loads(text)
    return json.loads(text)


def _parse_problem(e: Exception) -> str:
    """One line: what the parser says, with the line number when it gives one."""
    mark = getattr(e, "problem_mark", None)  # yaml.MarkedYAMLError
    if mark is not None:
        return f"{getattr(e, 'problem', None) or e} at line {mark.line + 1}, column {mark.column + 1}"
    if isinstance(e, json.JSONDecodeError):
        return f"{e.msg} at line {e.lineno}, column {e.colno}"
    return str(e).splitlines()[0] if str(e) else type(e).__name__


def _coerce(name: str, value: Any, cls: type = None) -> Any:
    """Convert file values to the field's type: YAML gives lists for tuples, ints for floats, and
    strings for numbers like ``1e-3`` (YAML 1.1 needs a dot: ``1.0e-3``), which are accepted."""
    f = {f.name: f for f in fields(cls or TrainConfig)}[name]
    t = str(f.type)
    if value is None:
        return None
    if t.startswith("float") and isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            raise ValueError(f"{name}: must be a number, got {value!r}") from None
    if t.startswith("float") and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if t.startswith("tuple"):
        parts = value.split(",") if isinstance(value, str) else value
        try:
            if isinstance(parts, (list, tuple)) and len(parts) == 2 and not any(isinstance(x, bool) for x in parts):
                return tuple(float(x) for x in parts)
        except (TypeError, ValueError):
            pass
        raise ValueError(f"{name}: must be two numbers like 0.9,0.999 (or a list [0.9, 0.999]), got {value!r}")
    return value


def resolve(file: str | None = None, overrides: dict[str, Any] | None = None, cls: type = None):
    """Defaults <- file <- overrides, then validate. Unknown keys raise ValueError naming them.
    ``cls`` is the configuration class (``TrainConfig`` or a subclass, e.g. pre-training's)."""
    cls = cls or TrainConfig
    names = tuple(f.name for f in fields(cls))
    values: dict[str, Any] = {}
    for source, d in (("config file", load_file(file) if file else {}), ("override", overrides or {})):
        for k, v in d.items():
            if k not in names:
                raise ValueError(f"{k}: unknown config field in {source} (known: {', '.join(names)})")
            values[k] = _coerce(k, v, cls)
    return cls(**values).validate()


def save(cfg: TrainConfig, path: str) -> None:
    """Write the resolved config as YAML (atomically), without the per-invocation fields."""
    import yaml

    from .safefile import atomic_write

    d = {k: v for k, v in cfg.to_dict().items() if k not in INVOCATION_FIELDS}
    atomic_write(path, lambda f: yaml.safe_dump(d, f, sort_keys=False))  # a failed write leaves no .tmp
