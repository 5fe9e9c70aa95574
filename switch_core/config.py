"""The training config: `TrainConfig` (optimisation and bookkeeping; `model` holds the architecture), the size
presets, flat overrides, and the checks a resumed run's config must pass. Every bad value raises ValueError naming
its field, before anything runs."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields, replace

from . import distill, finetune
from .checkpoint import CheckpointError
from .model import ModelConfig

# Fields a resumed run may change; any other difference from the checkpoint's config is refused. (A new `steps`
# re-times the cosine schedule from the resumed step on, so the run is no longer identical to an uninterrupted one.)
RESUMABLE_FIELDS = ("steps", "eval_interval", "eval_batches", "checkpoint_interval", "device", "sample_chars",
                    "data_root")
MAX_SEED = 2**63 - 1  # torch generators take 64-bit seeds; seed + 1 and seed + rank must fit too
# Upper bounds that keep a typo from running for ever (each sampled character and each eval batch is a forward).
MAX_SAMPLE_CHARS, MAX_EVAL_BATCHES = 1_000_000, 100_000

# Presets are plain config overrides (ModelConfig and TrainConfig field names, flat).
PRESETS: dict[str, dict] = {
    # CI: a few seconds.
    "tiny": dict(n_layer=2, n_head=2, d_model=32, d_ff=64, seq_len=32, n_experts=4, batch_size=8, steps=20,
                 warmup_steps=5, eval_interval=10, eval_batches=2, sample_chars=64),
    # The training chapter's live run: about 1.5 minutes per run (dense or Switch) on a 2-core CPU.
    "cpu": dict(n_layer=4, n_head=4, d_model=128, d_ff=512, seq_len=128, n_experts=8, batch_size=32, steps=400,
                warmup_steps=40, lr=2e-3, min_lr=2e-4, eval_interval=100, eval_batches=10),
    # Full size for one H200 in bf16: minutes.
    "gpu": dict(n_layer=8, n_head=8, d_model=512, d_ff=2048, seq_len=256, n_experts=16, dropout=0.2,
                batch_size=64, steps=5000, warmup_steps=200, lr=6e-4, min_lr=6e-5, eval_interval=250,
                eval_batches=20, checkpoint_interval=1000),
}


@dataclass
class TrainConfig:
    """Optimisation and bookkeeping; `model` holds the architecture. Bad values raise ValueError naming the field."""

    model: ModelConfig = field(default_factory=ModelConfig)
    steps: int = 400  # optimizer updates
    batch_size: int = 32
    lr: float = 2e-3  # peak learning rate, after linear warmup
    min_lr: float = 2e-4  # end of the cosine decay
    warmup_steps: int = 40
    weight_decay: float = 0.1  # on matrices and embeddings, not on norms and biases
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0  # max global grad norm; 0 = off
    balance_coef: float = 0.01  # alpha, paper §2.2
    z_coef: float = 0.001  # c_z, ST-MoE
    eval_interval: int = 100
    eval_batches: int = 10
    checkpoint_interval: int = 100  # also at the end of every call
    seed: int = 1337
    device: str = "auto"  # "auto" = cuda if available, else cpu
    sample_chars: int = 500
    data_root: str | None = None  # default: $SWITCH_CORE_DATA, else ~/.cache/switch_core
    expert_parallel: bool = False  # experts split over the ranks of a torchrun launch; batch_size is per rank
    compile: bool = False  # torch.compile the model's training and evaluation forward ("auto" layers: padded)
    # Distillation and fine-tuning (paper §4; switch_core.distill). Off by default: runs without them unchanged.
    distill_from: str | None = None  # teacher run dir: loss (1 - w)·CE(labels) + w·CE(teacher probabilities)
    distill_weight: float = 0.25  # w, the teacher's share (§4.2)
    distill_temperature: float = 1.0
    init_from: str | None = None  # start from this run's weights, fresh optimizer (dense from Switch: non-expert)
    init_ffn: str = "fresh"  # a dense model's FFNs when init_from is a Switch run: "fresh", "expert0", "mean"
    data_slice: str | None = None  # "speaker:NAME" / "without:NAME" ("#1": the largest speaker); switch_core.finetune

    def __post_init__(self):
        if isinstance(self.model, dict):
            self.model = ModelConfig.from_dict(self.model)
        for name, minimum in (("steps", 1), ("batch_size", 1), ("warmup_steps", 0), ("eval_interval", 1),
                              ("eval_batches", 1), ("checkpoint_interval", 1), ("seed", 0), ("sample_chars", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
        for name, maximum in (("seed", MAX_SEED), ("sample_chars", MAX_SAMPLE_CHARS),
                              ("eval_batches", MAX_EVAL_BATCHES)):
            if getattr(self, name) > maximum:
                raise ValueError(f"{name} must be <= {maximum:_}, got {getattr(self, name):_}")
        for name in ("lr", "min_lr", "weight_decay", "grad_clip", "balance_coef", "z_coef"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < math.inf:
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if self.lr <= 0 or self.min_lr > self.lr:
            raise ValueError(f"lr must be > 0 and min_lr <= lr, got lr={self.lr}, min_lr={self.min_lr}")
        for name in ("beta1", "beta2"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
                raise ValueError(f"{name} must be in [0, 1), got {value!r}")
        if not isinstance(self.device, str) or not (self.device in ("auto", "cpu", "cuda", "mps")
                                                    or self.device.startswith("cuda:")):
            raise ValueError(f"device must be 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps', got {self.device!r}")
        if self.data_root is not None and not isinstance(self.data_root, str):
            raise ValueError(f"data_root must be a path string or None, got {self.data_root!r}")
        if not isinstance(self.compile, bool):
            raise ValueError(f"compile must be True or False, got {self.compile!r}")
        if self.compile and self.expert_parallel:
            raise ValueError("compile is not supported with expert_parallel (the all-to-all is not traced)")
        distill.check_config(self)
        if self.data_slice is not None:
            finetune.parse_slice(self.data_slice)

    def to_dict(self) -> dict:
        return asdict(self)


def _field_names(cls) -> list[str]:
    return [f.name for f in fields(cls) if f.name != "model"]


def make_config(preset: str | None = None, **overrides) -> TrainConfig:
    """TrainConfig from defaults, then PRESETS[preset], then `overrides` (flat ModelConfig/TrainConfig names)."""
    if preset is not None and preset not in PRESETS:
        raise ValueError(f"preset must be one of {', '.join(PRESETS)}; got {preset!r}")
    return apply_overrides(TrainConfig(), {**(PRESETS[preset] if preset else {}), **overrides})


def apply_overrides(cfg: TrainConfig, overrides: dict) -> TrainConfig:
    """A copy of cfg with flat field overrides routed to the model or the training config (validated)."""
    model_keys, train_keys = set(_field_names(ModelConfig)), set(_field_names(TrainConfig))
    unknown = sorted(set(overrides) - model_keys - train_keys)
    if unknown:
        raise ValueError(f"unknown config field(s): {', '.join(unknown)}")
    model = replace(cfg.model, **{k: v for k, v in overrides.items() if k in model_keys})
    return replace(cfg, model=model, **{k: v for k, v in overrides.items() if k in train_keys})


def check_resumable(cfg: TrainConfig, saved: TrainConfig, names: tuple[str, str] = ("checkpoint", "given"),
                    prefix: str = "cannot resume with a different config") -> None:
    """Refuse a resume whose config differs from the checkpoint's outside RESUMABLE_FIELDS."""
    flat = lambda c: {**c.to_dict()["model"], **{k: v for k, v in c.to_dict().items() if k != "model"}}  # noqa
    new, old = flat(cfg), flat(saved)
    bad = [f"{k} ({names[0]} {old[k]!r}, {names[1]} {new[k]!r})" for k in new
           if new[k] != old[k] and k not in RESUMABLE_FIELDS]
    if bad:
        raise ValueError(f"{prefix}: " + "; ".join(bad))


def saved_config(ckpt: dict, path) -> TrainConfig:
    """The TrainConfig a checkpoint was saved with; CheckpointError naming the file when it is not valid."""
    try:
        return TrainConfig(**ckpt["config"])
    except (TypeError, ValueError, KeyError) as e:
        raise CheckpointError(f"{path} is not a usable checkpoint (its config is invalid: {e})") from None
