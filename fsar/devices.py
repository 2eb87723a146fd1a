"""The one place where a configured device name becomes a torch device (and a precision)."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch


def resolve_device(name: str) -> torch.device:
    """'auto' picks the first GPU when there is one, else the CPU; other names pass through."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def autocast_for(device: torch.device, bf16: bool) -> AbstractContextManager:
    """bf16 autocast on GPU when asked; CPU runs float32."""
    if device.type == "cuda" and bf16:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()
