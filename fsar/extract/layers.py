"""Intermediate visual features through forward hooks, with one place that names the layers.

Names: ``block<k>`` is the CLS token after transformer block k of a ViT (0-based, like timm's
indices), ``stage<k>`` the globally average-pooled output of ResNet stage k (1..4, open_clip's
``layer<k>``). ``available_layers`` lists the valid names for a model, and errors quote it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from fsar.config import ConfigError


def available_layers(visual: nn.Module) -> list[str]:
    if hasattr(visual, "transformer") and hasattr(visual.transformer, "resblocks"):
        return [f"block{k}" for k in range(len(visual.transformer.resblocks))]
    stages = [name for name in ("layer1", "layer2", "layer3", "layer4") if hasattr(visual, name)]
    if stages:
        return [f"stage{name[-1]}" for name in stages]
    return []


def _module_for(visual: nn.Module, name: str) -> nn.Module:
    if name.startswith("block"):
        return visual.transformer.resblocks[int(name[5:])]
    return getattr(visual, f"layer{name[5:]}")


def _pool(name: str, output: torch.Tensor) -> torch.Tensor:
    """One vector per image: [B, D_l]."""
    if isinstance(output, tuple):
        output = output[0]
    if name.startswith("stage"):
        return output.float().mean(dim=(2, 3))  # [B, C, H, W] -> [B, C]
    return output[:, 0].float()  # batch-first tokens [B, L, C]: CLS token


class LayerTaps:
    """Forward hooks on the given layers; ``pop()`` returns {name: [B, D_l]} of the last pass."""

    def __init__(self, visual: nn.Module, names: Sequence[str] = ()):
        valid = available_layers(visual)
        unknown = [n for n in names if n not in valid]
        if unknown:
            raise ConfigError(
                f"unknown layer(s) {unknown} for this model; valid: {', '.join(valid)}"
            )
        self.names = tuple(names)
        self._captured: dict[str, torch.Tensor] = {}
        self._handles = [
            _module_for(visual, name).register_forward_hook(self._hook(name)) for name in self.names
        ]

    def _hook(self, name: str):
        def store(_module, _inputs, output):
            self._captured[name] = _pool(name, output)

        return store

    def remove(self) -> None:
        """Detach the hooks (the model then runs as if never tapped)."""
        for handle in self._handles:
            handle.remove()
        self._handles, self._captured = [], {}

    def pop(self) -> dict[str, torch.Tensor]:
        captured, self._captured = self._captured, {}
        missing = [n for n in self.names if n not in captured]
        if missing:
            raise RuntimeError(f"layer hooks did not fire for {missing}")
        return captured
