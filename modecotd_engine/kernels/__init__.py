"""Ops of the engine: the gated multi-LoRA-expert linear layer and its backends."""

from .ops import BACKENDS, BackendUnavailableError, check_mixture_args, lora_mixture, lora_single_expert
from .reference import MODES, lora_mixture_loop, lora_mixture_torch
from .router import routed_lora_mixture

__all__ = [
    "MODES",
    "BACKENDS",
    "BackendUnavailableError",
    "check_mixture_args",
    "lora_mixture",
    "lora_single_expert",
    "lora_mixture_loop",
    "lora_mixture_torch",
    "routed_lora_mixture",
]
