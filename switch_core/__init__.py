"""switch_core: the Switch Transformer (Fedus, Zoph, Shazeer 2021), annotated.

Modules, one idea each: ``router`` (eq. 1), ``capacity`` (eq. 3 and token dropping), ``experts`` (stacked FFNs and
three backends), ``losses`` (load balancing eq. 4, router z-loss), ``layer`` (the Switch layer, Fig. 2).
"""
from .capacity import DROP_POLICIES, Dispatch, dispatch, expert_capacity
from .experts import ACTIVATIONS, BACKENDS, Experts
from .layer import FeedForward, SwitchFeedForward, SwitchStats
from .losses import balance_loss, z_loss
from .router import Router, Routing, route

__all__ = [
    "ACTIVATIONS", "BACKENDS", "DROP_POLICIES", "Dispatch", "Experts", "FeedForward", "Router", "Routing",
    "SwitchFeedForward", "SwitchStats", "balance_loss", "dispatch", "expert_capacity", "route", "z_loss",
]
__version__ = "0.1.0"
