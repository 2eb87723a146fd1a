"""The one place where a configured device name becomes a torch device."""

from __future__ import annotations

import torch


def resolve_device(name: str) -> torch.device:
    """'auto' picks the first GPU when there is one, else the CPU; other names pass through."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)
