"""The book's experiments: named lists of configs × seeds, each at a CPU size and a GPU size.

Run one with ``python -m switch_core.sweep NAME`` (see `switch_core.sweep`). A config is a dict of flat
`make_config` overrides (ModelConfig and TrainConfig field names); a variant's overrides go on top of the size's.

The CPU sizes were chosen where the effect under study can show on a 2-core machine (the whole CPU suite takes
about three and a half hours there, README lists each sweep's time); the GPU sizes are scaled up for one H200 (a
few minutes each).

- ``experts``: dense vs Switch with 2-32 experts at equal FLOPs per token, and dense models with 2x and 4x the
  FFN width (more FLOPs): paper Figs. 4, 5, 6 and 12. A model whose FFN binds (d_ff = 2 d_model, a Switch layer
  in every block) trained at a constant learning rate after warmup (the paper's schedules do not anneal to
  zero either), so that "steps to reach the dense model's loss" compares like with like.
- ``capacity``: capacity factor 0.5, 1.0, 1.25, 2.0 and dropless with 8 experts (Table 1).
- ``balance``: the load-balancing coefficient α from 1e-1 to 1e-5, and 0 (no loss), with 8 experts (§2.2).
- ``stability``: initialisation scale 0.1 vs 1.0 and a bfloat16 vs float32 router, 5 seeds (Tables 2 and 3).
- ``stability-lr``: the same model at learning rates 3x and 10x higher with no warmup, looking for the regime
  where scale 1.0 becomes unstable (Table 3).
- ``distill``: Table 6's ladder in miniature: an 8-expert Switch teacher, its FLOP-matched dense baseline, and
  dense students distilled from the teacher (soft targets alone; + the teacher's non-expert weights; + the
  0.25/0.75 soft/hard mixture), the "init only, no distillation" control (§4.2), and the mixture with the
  students' FFNs initialised from the mean of the experts or the first expert. A value ``run_of(label)``
  is the run directory of another label with the same seed, and the sweep runs that label first.
- ``distill-teachers``: Table 7 in miniature: Switch teachers with 2 to 32 experts (the ``distill`` sweep's
  size and seeds), each distilled by the paper's recipe into the same dense student, each one's "init only"
  control, and the dense baseline.
- ``finetune``: pre-train without the largest speaker's speeches, fine-tune on them with dropout 0.1 and expert
  dropout 0 or 0.4 (§4.1), and the same speaker trained from scratch.
"""
from __future__ import annotations

from dataclasses import dataclass, field

RUN_PREFIX = "run:"


def run_of(label: str) -> str:
    """A config value standing for the run directory of ``label`` with the same seed (e.g. a teacher's);
    the sweep finishes that run before starting the ones that name it."""
    return RUN_PREFIX + label


@dataclass(frozen=True)
class Experiment:
    """name, a one-line title, the base config per device ("cpu", "cuda"), label -> overrides, seeds.

    A variant's overrides are a dict, or a function of the base config returning one (e.g. "twice the base
    d_ff"). keep_load: also keep the per-expert load every ``load_every`` steps (load.csv)."""

    name: str
    title: str
    cpu: dict
    cuda: dict
    variants: dict
    seeds: tuple = (1, 2, 3)
    keep_load: bool = False
    load_every: int = 25
    notes: str = field(default="", compare=False)

    def size(self, device: str) -> dict:
        """The base config overrides for "cpu" or "cuda"."""
        if device not in ("cpu", "cuda"):
            raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
        return dict(self.cpu if device == "cpu" else self.cuda)

    def overrides(self, device: str) -> dict[str, dict]:
        """label -> the variant's overrides at the size for ``device``, in run order."""
        base = self.size(device)
        return {k: dict(v(base) if callable(v) else v) for k, v in self.variants.items()}


# Shared bases. FFN-bound: d_ff = 2 d_model, a Switch FFN in every block, constant lr after warmup.
_CPU = dict(n_layer=2, n_head=2, d_model=64, d_ff=128, seq_len=64, batch_size=64, steps=3000, warmup_steps=100,
            lr=3e-3, min_lr=3e-3, eval_interval=100, eval_batches=20, switch_every=1, n_experts=8,
            checkpoint_interval=500)
_GPU = dict(n_layer=4, n_head=4, d_model=256, d_ff=512, seq_len=128, batch_size=64, steps=1500, warmup_steps=100,
            lr=2e-3, min_lr=2e-3, eval_interval=100, eval_batches=20, switch_every=1, n_experts=8,
            checkpoint_interval=500)
_SHORT_CPU = {**_CPU, "steps": 1500}
_SHORT_GPU = {**_GPU, "steps": 1000}
# Distillation: teacher and students alike, shorter (each student also runs the teacher forward) and lighter
# evaluations, so that the 18 runs fit in about half an hour on a shared 2-core CPU.
_DISTILL_CPU = {**_CPU, "steps": 1000, "eval_batches": 10}
_DISTILL_GPU = {**_GPU, "steps": 1000}
# Fine-tuning: pre-train without the largest speaker's speeches (the distill teacher's size and steps), then
# fine-tune on that speaker alone (about 36k characters of training text): short, a lower constant lr.
_FINETUNE_CPU = {**_CPU, "steps": 300, "warmup_steps": 20, "lr": 1e-3, "min_lr": 1e-3, "eval_interval": 25,
                 "eval_batches": 10}
_FINETUNE_GPU = {**_GPU, "steps": 300, "warmup_steps": 20, "lr": 5e-4, "min_lr": 5e-4, "eval_interval": 25}
# Table 7's teachers: experts per Switch layer.
TABLE7_EXPERTS = (2, 4, 8, 16, 32)
_PRETRAIN = dict(steps=1000, warmup_steps=100, lr=3e-3, min_lr=3e-3, eval_interval=100)

EXPERIMENTS: dict[str, Experiment] = {
    "experts": Experiment(
        "experts", "Experts at equal FLOPs per token: dense vs Switch with 2-32 experts (Figs. 4, 5, 6, 12)",
        cpu=_CPU, cuda=_GPU,
        variants={
            "dense": dict(switch_every=0),
            **{f"switch-{e}": dict(n_experts=e) for e in (2, 4, 8, 16, 32)},
            "dense-2xFFN": lambda base: dict(switch_every=0, d_ff=2 * base["d_ff"]),
            "dense-4xFFN": lambda base: dict(switch_every=0, d_ff=4 * base["d_ff"]),
        }),
    "capacity": Experiment(
        "capacity", "Capacity factor 0.5 to 2.0 and dropless, 8 experts (Table 1)",
        cpu=_SHORT_CPU, cuda=_SHORT_GPU,
        variants={f"cf-{cf}": dict(capacity_factor=cf) for cf in (0.5, 1.0, 1.25, 2.0, None)}),
    "balance": Experiment(
        "balance", "Load-balancing coefficient alpha from 1e-1 to 1e-5 and 0, 8 experts (§2.2)",
        cpu=_SHORT_CPU, cuda=_SHORT_GPU,
        variants={f"alpha-{a:g}": dict(balance_coef=a) for a in (1e-1, 1e-2, 1e-3, 1e-4, 1e-5, 0.0)},
        keep_load=True),
    "stability": Experiment(
        "stability", "Initialisation scale 0.1 vs 1.0 and a bfloat16 vs float32 router, 5 seeds (Tables 2, 3)",
        cpu=dict(_CPU, n_layer=6, batch_size=32, steps=500, warmup_steps=20, lr=1e-2, min_lr=1e-2,
                 eval_interval=50, eval_batches=10),
        cuda=dict(_GPU, n_layer=8, steps=600, warmup_steps=20, lr=1e-2, min_lr=1e-2, eval_interval=50),
        variants={"init-0.1": dict(init_scale=0.1), "init-1.0": dict(init_scale=1.0),
                  "router-bf16": dict(init_scale=0.1, router_dtype="bfloat16")},
        seeds=(1, 2, 3, 4, 5)),
    "stability-lr": Experiment(
        "stability-lr", "The search for an unstable regime: init scale 0.1 vs 1.0 at learning rates 0.03 and 0.1, "
        "no warmup, 3 seeds (Table 3)",
        cpu=dict(_CPU, n_layer=6, batch_size=32, steps=300, warmup_steps=0, eval_interval=50, eval_batches=10,
                 checkpoint_interval=300),
        cuda=dict(_GPU, n_layer=8, steps=600, warmup_steps=0, eval_interval=50),
        variants={f"init-{s}-lr-{lr:g}": dict(init_scale=s, lr=lr, min_lr=lr)
                  for lr in (0.03, 0.1) for s in (0.1, 1.0)},
        seeds=(1, 2, 3)),
    "distill": Experiment(
        "distill", "Distilling an 8-expert Switch teacher into its FLOP-matched dense twin (Table 6)",
        cpu=_DISTILL_CPU, cuda=_DISTILL_GPU,
        variants={
            "teacher": dict(),
            "dense": dict(switch_every=0),
            "distill": dict(switch_every=0, distill_from=run_of("teacher"), distill_weight=1.0),
            "distill+init": dict(switch_every=0, distill_from=run_of("teacher"), distill_weight=1.0,
                                 init_from=run_of("teacher")),
            "distill+init+mix": dict(switch_every=0, distill_from=run_of("teacher"), distill_weight=0.25,
                                     init_from=run_of("teacher")),
            "init-only": dict(switch_every=0, init_from=run_of("teacher")),
            # The paper does not say how the student's FFNs start: the mixture recipe with the FFN of a Switch
            # block initialised from the mean of its experts, or from its first expert, instead of fresh.
            **{f"mix-ffn-{f}": dict(switch_every=0, distill_from=run_of("teacher"), distill_weight=0.25,
                                    init_from=run_of("teacher"), init_ffn=f) for f in ("mean", "expert0")},
        }),
    "distill-teachers": Experiment(
        "distill-teachers", "Teachers with 2-32 experts distilled into the same dense student (Table 7)",
        cpu=_DISTILL_CPU, cuda=_DISTILL_GPU,
        variants={"dense": dict(switch_every=0), **{k: v for e in TABLE7_EXPERTS for k, v in {
            f"teacher-{e}": dict(n_experts=e),
            f"student-{e}": dict(switch_every=0, distill_from=run_of(f"teacher-{e}"), distill_weight=0.25,
                                 init_from=run_of(f"teacher-{e}")),
            f"init-only-{e}": dict(switch_every=0, init_from=run_of(f"teacher-{e}")),
        }.items()}}),
    "finetune": Experiment(
        "finetune", "Fine-tuning on a held-out speaker with expert dropout 0 vs 0.4 (§4.1, Table 4)",
        cpu=_FINETUNE_CPU, cuda=_FINETUNE_GPU,
        variants={
            "pretrain": dict(_PRETRAIN, data_slice="without:#1"),
            "ft-edrop-0": dict(data_slice="speaker:#1", init_from=run_of("pretrain"), dropout=0.1,
                               expert_dropout=0.0),
            "ft-edrop-0.4": dict(data_slice="speaker:#1", init_from=run_of("pretrain"), dropout=0.1,
                                 expert_dropout=0.4),
            "scratch": dict(data_slice="speaker:#1", dropout=0.1, expert_dropout=0.4),
        }),
}
