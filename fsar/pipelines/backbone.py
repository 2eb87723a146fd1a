"""A trainable open_clip visual encoder in front of a few-shot head (SPEC 6, finetune-e2e).

``VideoModel`` maps uint8 clips to head outputs: pixels are scaled on the device (as ``fsar
extract`` does in its workers), every frame goes through ``visual`` (CLIP ``encode_image``, not
normalised, the features a store caches), and the head sees them exactly as it sees cached
features. Blocks are ViT transformer blocks or ResNet stages, the units ``block<k>`` /
``stage<k>`` of the layer taps.
"""

from __future__ import annotations

import functools

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from fsar.config import ConfigError
from fsar.data.transforms import Preprocess, model_input
from fsar.extract.layers import LayerTaps
from fsar.heads import FewShotHead, HeadOutput


def encoder_blocks(visual: nn.Module) -> list[nn.Module]:
    """The encoder's blocks in forward order (ViT resblocks, or ResNet layer1..layer4)."""
    if hasattr(visual, "transformer") and hasattr(visual.transformer, "resblocks"):
        return list(visual.transformer.resblocks)
    stages = [getattr(visual, name) for name in ("layer1", "layer2", "layer3", "layer4")]
    if all(isinstance(stage, nn.Module) for stage in stages):
        return stages
    raise TypeError(f"no block structure known for {type(visual).__name__}")


def freeze_first_blocks(visual: nn.Module, count: int) -> list[str]:
    """Freeze the stem (everything before the first block) and the first ``count`` blocks.

    Frozen parameters get ``requires_grad=False``; frozen BatchNorm layers stop updating their
    running statistics (``keep_frozen_norms_in_eval`` must be called after every ``train()``).
    Returns the names of the frozen parameters.
    """
    blocks = encoder_blocks(visual)
    if count > len(blocks):
        raise ConfigError(
            f"finetune.freeze_blocks={count} but the encoder has {len(blocks)} blocks: "
            f"use 0..{len(blocks)}"
        )
    if count == 0:
        return []
    kept = {id(p) for block in blocks[count:] for p in block.parameters()}
    after = _parameters_after_blocks(visual, blocks)
    frozen = []
    for name, parameter in visual.named_parameters():
        if id(parameter) not in kept and id(parameter) not in after:
            parameter.requires_grad_(False)
            frozen.append(name)
    return frozen


def _parameters_after_blocks(visual: nn.Module, blocks: list[nn.Module]) -> set[int]:
    """ids of the parameters of the modules after the last block (ln_post, proj, attnpool)."""
    names = ("ln_post", "proj", "attnpool")
    after = set()
    for name in names:
        value = getattr(visual, name, None)
        if isinstance(value, nn.Parameter):
            after.add(id(value))
        elif isinstance(value, nn.Module):
            after |= {id(p) for p in value.parameters()}
    return after


def keep_frozen_norms_in_eval(visual: nn.Module) -> None:
    for module in visual.modules():
        is_norm = isinstance(module, nn.modules.batchnorm._BatchNorm)
        if is_norm and not any(p.requires_grad for p in module.parameters()):
            module.eval()


def enable_grad_checkpointing(visual: nn.Module) -> None:
    """Recompute each block's activations in the backward pass.

    ViTs use open_clip's own switch; open_clip's ResNet has none, so each stage's forward is
    wrapped here (instance attribute: the state-dict keys do not change).
    """
    if hasattr(visual, "transformer") and hasattr(visual.transformer, "resblocks"):
        visual.set_grad_checkpointing(True)
        return
    for stage in encoder_blocks(visual):
        stage.forward = functools.partial(_checkpointed, type(stage).forward.__get__(stage))


def _checkpointed(forward, x: torch.Tensor) -> torch.Tensor:
    if torch.is_grad_enabled() and x.requires_grad:
        return checkpoint(forward, x, use_reentrant=False)
    return forward(x)


class VideoModel(nn.Module):
    """visual encoder + head: clips in (uint8, or float32 in [0, 1]), ``HeadOutput`` out."""

    def __init__(
        self,
        visual: nn.Module,
        head: FewShotHead,
        prep: Preprocess,
        shallow_layer: str | None = None,
    ):
        super().__init__()
        self.visual = visual
        self.head = head
        self.prep = prep  # the pixel recipe: its mean/std normalise the clips
        self.shallow_layer = shallow_layer
        self.taps = LayerTaps(visual, [shallow_layer] if shallow_layer else [])

    def train(self, mode: bool = True) -> VideoModel:
        super().train(mode)
        keep_frozen_norms_in_eval(self.visual)
        return self

    def encode(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """uint8 [..., T, 3, H, W] -> features float [..., T, D] (+ the shallow layer's)."""
        lead = pixels.shape[:-3]
        images = model_input(pixels.flatten(0, -4), self.prep)
        features = self.visual(images).float()
        shallow = None
        if self.shallow_layer:
            shallow = self.taps.pop()[self.shallow_layer].reshape(*lead, -1)
        return features.reshape(*lead, -1), shallow

    def forward(
        self,
        support: torch.Tensor,
        support_labels: torch.Tensor,
        query: torch.Tensor,
        class_text: torch.Tensor,
        **extras: torch.Tensor,
    ) -> HeadOutput:
        """support uint8 [B, S, T, 3, H, W], query uint8 [B, Q, T, 3, H, W], class_text [B, N, D].

        Support and query frames go through the encoder in one pass (one BatchNorm batch)."""
        n_support = support.shape[1]
        features, shallow = self.encode(torch.cat([support, query], dim=1))
        if shallow is not None and self.training:
            extras = {
                **extras,
                "support_shallow": shallow[:, :n_support],
                "query_shallow": shallow[:, n_support:],
            }
        return self.head(
            features[:, :n_support], support_labels, features[:, n_support:], class_text, **extras
        )
