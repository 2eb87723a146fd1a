"""Parts of the CLIP-CPM2C head (`fsar.heads.cpm2c`): multi-scale motion, the class-id inputs of
its classification term, and the release-only checkpoint entries."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["MultiScaleMotion", "conv_frames_last", "release_only_entries"]


def conv_frames_last(conv: nn.Conv1d, x: Tensor) -> Tensor:
    """A stride-1 `conv` along time on frame-last inputs: x [V, T, C_in] -> [V, T', C_out].

    One matrix product over the unfolded (dilated) windows, which is much faster than a
    convolution kernel on short clips on CPU.
    """
    (k,), (dilation,), (pad,) = conv.kernel_size, conv.dilation, conv.padding
    span = dilation * (k - 1) + 1
    windows = F.pad(x, (0, 0, pad, pad)).unfold(1, span, 1)[..., ::dilation]  # [V, T', C_in, k]
    return F.linear(windows.flatten(2), conv.weight.flatten(1), conv.bias)


class MultiScaleMotion(nn.Module):
    """Motion frames of a video: x [V, T, D] -> [V, T-1, D].

    `fused = merge([conv k1 ; conv k3 ; conv k3 dilation 2](x)) * residual_ratio + x` (all along
    time, D channels, with bias; `merge` a 1x1 conv 3D -> D);
    `m[t] = 0.5 * ((fused[t+1] - x[t]) + (fused[t] - x[t+1]))`.
    """

    def __init__(self, dim: int, residual_ratio: float):
        super().__init__()
        self.conv_k1 = nn.Conv1d(dim, dim, kernel_size=1)
        self.conv_k3 = nn.Conv1d(dim, dim, kernel_size=3, padding=1)
        self.conv_dilated = nn.Conv1d(dim, dim, kernel_size=3, padding=2, dilation=2)
        self.merge = nn.Conv1d(3 * dim, dim, kernel_size=1)
        self.residual_ratio = residual_ratio

    def forward(self, x: Tensor) -> Tensor:
        scales = [conv_frames_last(c, x) for c in (self.conv_k1, self.conv_k3, self.conv_dilated)]
        fused = conv_frames_last(self.merge, torch.cat(scales, dim=-1)) * self.residual_ratio + x
        return 0.5 * ((fused[:, 1:] - x[:, :-1]) + (fused[:, :-1] - x[:, 1:]))


# Shapes the release's prompt networks get from the run params it lacks (the golden files' choice).
_PROMPT_PATCH, _PROMPT_HIDDEN, _PROMPT_CONV_HIDDEN, _PROMPT_KERNEL = 2, 4, 2, 3


def release_only_entries(head: nn.Module) -> dict[str, Tensor]:
    """Entries the release builds but never uses on features: the 6-layer temporal transformer
    and its position embedding (only in a commented-out branch) and the pixel prompt networks.
    Accepted and skipped on load; written back as placeholders (zeros, LayerNorm weights ones)."""
    d = head.appearance_token.shape[-1]  # the head's feature width

    def zeros(*shape: int) -> Tensor:
        return torch.zeros(()).expand(shape)  # no memory until to_official copies it

    def ones(*shape: int) -> Tensor:
        return torch.ones(()).expand(shape)

    out = {"frame_position_embeddings.weight": zeros(77, d)}  # CLIP context length 77
    for i in range(6):
        p = f"transformer.resblocks.{i}."
        out |= {
            p + "attn.in_proj_weight": zeros(3 * d, d),
            p + "attn.in_proj_bias": zeros(3 * d),
            p + "attn.out_proj.weight": zeros(d, d),
            p + "attn.out_proj.bias": zeros(d),
            p + "ln_1.weight": ones(d),
            p + "ln_1.bias": zeros(d),
            p + "mlp.c_fc.weight": zeros(4 * d, d),
            p + "mlp.c_fc.bias": zeros(4 * d),
            p + "mlp.c_proj.weight": zeros(d, 4 * d),
            p + "mlp.c_proj.bias": zeros(d),
            p + "ln_2.weight": ones(d),
            p + "ln_2.bias": zeros(d),
        }
    patch, hidden = 3 * _PROMPT_PATCH**2, _PROMPT_HIDDEN
    conv_hidden, k = _PROMPT_CONV_HIDDEN, _PROMPT_KERNEL
    out |= {
        "meta_net.0.weight": zeros(hidden, patch),
        "meta_net.0.bias": zeros(hidden),
        "meta_net.2.weight": zeros(patch, hidden),
        "meta_net.2.bias": zeros(patch),
        "meta_net_2.0.weight": zeros(conv_hidden, 3, k, k),
        "meta_net_2.0.bias": zeros(conv_hidden),
        "meta_net_2.2.weight": zeros(3, conv_hidden, k, k),
        "meta_net_2.2.bias": zeros(3),
    }
    return out
