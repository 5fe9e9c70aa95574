"""Distilling a Switch model into a FLOP-matched dense one, and starting a run from a trained one (paper §4).

    loss = (1 − λ) · CE(student, labels) + λ · CE(student, teacher probabilities)      (λ = 0.25, §4.2)

With a temperature τ both distributions are softened, p_teacher = softmax(z_t / τ), and the soft term is scaled by
τ² so that its gradient keeps its size (Hinton et al. 2015); τ = 1 is the paper's recipe.

- `dense_student(teacher)`: the dense `SwitchLM` with the teacher's config but ``switch_every = 0`` (every expert is
  as wide as the dense FFN, so the FLOPs per token match), every non-expert parameter (embeddings, attention,
  norms, dense FFNs) copied from the teacher. Each Switch FFN becomes a dense FFN initialised ``"fresh"`` (the
  paper does not say otherwise), from one expert (``"expert0"``) or from the mean of the experts (``"mean"``).
- `load_run_model(run_dir)`: the trained model of a run directory (its config.json and checkpoint.pt).
- `init_from_run(model, run_dir)`: copy a trained run's weights into ``model`` (fine-tuning: a fresh optimizer).

Training with a teacher goes through the ordinary trainer: ``TrainConfig.distill_from`` (CLI ``--distill-from
RUN``), ``distill_weight``, ``distill_temperature``, ``init_from`` and ``init_ffn``.
Shape legend: B batch, T sequence length, V vocabulary.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from .checkpoint import load_checkpoint
from .model import ModelConfig, SwitchLM

INIT_FFN = ("fresh", "expert0", "mean")


def distillation_loss(student_BTV: Tensor, teacher_BTV: Tensor, labels_BT: Tensor, weight: float = 0.25,
                      temperature: float = 1.0) -> tuple[Tensor, Tensor, Tensor]:
    """(loss, hard CE, soft CE): (1 − λ)·CE(student, labels) + λ·τ²·CE(softmax(z_s/τ), softmax(z_t/τ)).

    student_BTV, teacher_BTV: logits [B, T, V] (the teacher's without gradient); labels_BT long [B, T].
    The soft term is the cross-entropy against the teacher's probabilities (KL divergence plus the teacher's
    entropy, a constant), so at λ = 1 and τ = 1 a student equal to the teacher has loss = teacher entropy."""
    hard = F.cross_entropy(student_BTV.flatten(0, 1), labels_BT.flatten())
    if weight == 0:
        return hard, hard, hard.new_zeros(())
    p_teacher = torch.softmax(teacher_BTV.detach().float() / temperature, dim=-1)
    log_p_student = torch.log_softmax(student_BTV.float() / temperature, dim=-1)
    soft = -(p_teacher * log_p_student).sum(-1).mean() * temperature ** 2
    return (1 - weight) * hard + weight * soft, hard, soft


def _check_init_ffn(init_ffn: str) -> str:
    if init_ffn not in INIT_FFN:
        raise ValueError(f"init_ffn must be one of {', '.join(map(repr, INIT_FFN))}; got {init_ffn!r}")
    return init_ffn


def student_config(teacher_cfg: ModelConfig) -> ModelConfig:
    """The FLOP-matched dense config of a Switch teacher: the same model with switch_every = 0."""
    return ModelConfig.from_dict({**teacher_cfg.to_dict(), "switch_every": 0})


@torch.no_grad()
def copy_weights(student: SwitchLM, teacher: SwitchLM, init_ffn: str = "fresh") -> list[str]:
    """Copy the teacher's parameters into the student wherever the student has the same name and shape; a Switch
    FFN of the teacher where the student has a dense one is copied per ``init_ffn``. Returns the names copied.

    ValueError when a non-FFN parameter of the student is missing in the teacher or has another shape (the
    models are not FLOP-matched twins)."""
    _check_init_ffn(init_ffn)
    t_params = dict(teacher.named_parameters())
    copied = []
    for name, p in student.named_parameters():
        if name in t_params and t_params[name].shape == p.shape:
            p.copy_(t_params[name])
            copied.append(name)
            continue
        block, _, rest = name.partition(".ffn.")
        if not rest:  # not an FFN parameter: the architectures differ
            found = tuple(t_params[name].shape) if name in t_params else "missing"
            raise ValueError(f"cannot initialise {name} {tuple(p.shape)} from the teacher ({found}): the models "
                             f"must have the same sizes outside their FFNs")
        if rest.startswith(("experts.", "router.")):  # a Switch FFN of the student: only a same-shape twin
            raise ValueError(f"cannot initialise {name} {tuple(p.shape)} from the teacher: its Switch FFNs "
                             f"differ (number of experts or sizes)")
        if init_ffn == "fresh":
            continue
        # Dense FeedForward weight w_in.weight [F, D] <- expert weight experts.w_in [E, D, F] (transposed).
        leaf = rest.split(".")[0]  # w_in / w_out / w_gate
        stack = t_params.get(f"{block}.ffn.experts.{leaf}")
        if stack is None or rest.endswith("bias"):
            raise ValueError(f"cannot initialise {name} from the teacher's experts (no {block}.ffn.experts.{leaf})")
        source = stack[0] if init_ffn == "expert0" else stack.mean(0)
        p.copy_(source.T)
        copied.append(name)
    return copied


def dense_student(teacher: SwitchLM, init_ffn: str = "fresh", seed: int = 0) -> SwitchLM:
    """A dense SwitchLM FLOP-matched to ``teacher``, non-expert weights copied (see the module docstring)."""
    if not isinstance(teacher, SwitchLM):
        raise TypeError(f"teacher must be a SwitchLM, got {type(teacher).__name__}")
    torch.manual_seed(seed)
    student = SwitchLM(student_config(teacher.cfg)).to(next(teacher.parameters()).device)
    copy_weights(student, teacher, init_ffn)
    return student


def load_run_model(run_dir: str | os.PathLike, device: torch.device | str = "cpu") -> SwitchLM:
    """The model of a finished or interrupted run: SwitchLM(config.json's model) with checkpoint.pt's weights.

    FileNotFoundError / ValueError naming the file when the run directory, its checkpoint or its config is
    missing, unreadable or inconsistent."""
    ckpt, cfg, ckpt_path = _read_run(run_dir)
    model = SwitchLM(cfg)
    try:
        model.load_state_dict(ckpt["model"])
    except (KeyError, RuntimeError) as e:
        raise ValueError(f"{ckpt_path}: the weights do not fit its config ({str(e).splitlines()[0]})") from None
    return model.to(device)


def _read_run(run_dir: str | os.PathLike, mmap: bool = False) -> tuple[dict, ModelConfig, Path]:
    """(checkpoint dict, its model config, the checkpoint's path) of a run directory, checked as
    `load_run_model` documents. mmap: tensors are mapped from the file, not read (for the config alone)."""
    run = Path(run_dir)
    ckpt_path = run / "checkpoint.pt"
    if not run.is_dir():
        raise FileNotFoundError(f"no run directory at {run}")
    if not ckpt_path.is_file():
        sharded = sorted(run.glob("checkpoint.rank*.pt"))
        hint = " (it holds an expert-parallel run: per-rank checkpoints)" if sharded else ""
        raise FileNotFoundError(f"no checkpoint at {ckpt_path}{hint}")
    try:
        ckpt = load_checkpoint(ckpt_path, mmap=mmap)
    except Exception as e:  # noqa: BLE001 (truncated file, not a zip, pickle error, ...)
        raise ValueError(f"{ckpt_path} is not a readable checkpoint ({type(e).__name__})") from None
    try:
        cfg_dict = ckpt["config"]["model"]
        cfg = ModelConfig.from_dict(cfg_dict)
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{ckpt_path} holds no valid model config ({e})") from None
    config_json = run / "config.json"
    if config_json.is_file():
        try:
            on_disk = json.loads(config_json.read_text())["model"]
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{config_json} is not a run config ({e})") from None
        if on_disk != cfg_dict:
            raise ValueError(f"{config_json} and {ckpt_path} describe different models")
    return ckpt, cfg, ckpt_path


def init_from_run(model: SwitchLM, run_dir: str | os.PathLike, init_ffn: str = "fresh") -> list[str]:
    """Copy a trained run's weights into ``model`` (see `copy_weights`); returns the names copied.

    The same architecture copies everything (fine-tuning, §4.1); a dense model from a Switch run copies the
    non-expert weights and initialises its FFNs per ``init_ffn`` (a distillation student, §4.2)."""
    return copy_weights(model, load_run_model(run_dir), init_ffn)


def load_teacher(run_dir: str | os.PathLike, student_cfg: ModelConfig,
                 device: torch.device | str = "cpu") -> SwitchLM:
    """The teacher of a distillation run: a run's model, frozen (no gradients) and in eval mode.

    ValueError when it cannot teach this student: another vocabulary, or a shorter context than seq_len."""
    teacher = load_run_model(run_dir, device)
    t, s = teacher.cfg, student_cfg
    if t.vocab_size != s.vocab_size or t.seq_len < s.seq_len:
        raise ValueError(f"the teacher in {run_dir} (vocab_size {t.vocab_size}, seq_len {t.seq_len}) cannot "
                         f"teach a student with vocab_size {s.vocab_size}, seq_len {s.seq_len}")
    return teacher.eval().requires_grad_(False)


def run_model_config(run_dir: str | os.PathLike) -> ModelConfig:
    """The model config of a run directory (checkpoint.pt's, checked as `load_run_model` does), read without
    reading the weights (the file is memory-mapped) or building the model."""
    return _read_run(run_dir, mmap=True)[1]


def check_config(cfg) -> None:
    """Validate TrainConfig's distillation fields (distill_from, distill_weight, distill_temperature,
    init_from, init_ffn); ValueError naming the field."""
    for name in ("distill_from", "init_from"):
        value = getattr(cfg, name)
        if value is not None and (not isinstance(value, str) or not value):
            raise ValueError(f"{name} must be a run directory (a path string) or None, got {value!r}")
    w, t = cfg.distill_weight, cfg.distill_temperature
    if isinstance(w, bool) or not isinstance(w, (int, float)) or not 0 <= w <= 1:
        raise ValueError(f"distill_weight must be a number in [0, 1], got {w!r}")
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 < t < float("inf"):
        raise ValueError(f"distill_temperature must be a finite number > 0, got {t!r}")
    _check_init_ffn(cfg.init_ffn)
    if cfg.distill_from is not None and cfg.expert_parallel:
        raise ValueError("distill_from is not supported with expert_parallel")


def teacher_logits(teacher: SwitchLM, x_BT: Tensor) -> Tensor:
    """The teacher's logits [B, T, V] for a batch, without gradient (eval mode: no dropout, eval capacity)."""
    with torch.no_grad():
        return teacher(x_BT)[0]
