"""switch_core: the Switch Transformer (Fedus, Zoph, Shazeer 2021), annotated.

Modules, one idea each: ``router`` (eq. 1), ``capacity`` (eq. 3 and token dropping), ``experts`` (stacked FFNs and
three backends; the grouped one's matmuls in ``segment_mm``), ``losses`` (load balancing eq. 4, router z-loss),
``layer`` (the Switch layer, Fig. 2), ``model`` (a character language model), ``data`` (Tiny Shakespeare), ``train``
(the training loop; its ``config``, ``runtime`` and command line ``cli``: ``python -m switch_core.train``),
``parallel`` (expert parallelism on torch.distributed; its checkpoint in ``sharded_checkpoint``, its process group
in ``process_group``), ``sizing`` (the paper's Table 9 models: parameters, FLOPs and memory per device, computed),
``distill`` (a Switch teacher distilled into its FLOP-matched dense twin, and fine-tuning from a run, §4).
"""
from .capacity import DROP_POLICIES, Dispatch, dispatch, expert_capacity
from .data import CharData, CharTokenizer, get_batch, load_char_data, load_tiny_shakespeare
from .distill import dense_student, distillation_loss
from .experts import ACTIVATIONS, BACKENDS, Experts
from .layer import FeedForward, SwitchFeedForward, SwitchStats
from .losses import balance_loss, z_loss
from .model import ModelConfig, SwitchLM, flops_per_token, parameter_counts
from .parallel import shard_experts, shard_model_experts
from .router import Router, Routing, route
from .sizing import TABLE9, PaperConfig

# NOTE: switch_core.train is not imported here, so that `python -m switch_core.train` runs it as __main__ cleanly.
__all__ = [
    "ACTIVATIONS", "BACKENDS", "DROP_POLICIES", "TABLE9", "CharData", "CharTokenizer", "Dispatch", "Experts",
    "FeedForward", "ModelConfig", "PaperConfig", "Router", "Routing", "SwitchFeedForward", "SwitchLM", "SwitchStats",
    "balance_loss", "dense_student", "dispatch", "distillation_loss", "expert_capacity", "flops_per_token",
    "get_batch", "load_char_data", "load_tiny_shakespeare", "parameter_counts", "route", "shard_experts",
    "shard_model_experts", "z_loss",
]
__version__ = "0.1.0"
