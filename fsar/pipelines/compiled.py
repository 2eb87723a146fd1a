"""``train.compile``: the head's step under ``torch.compile``.

``CompiledHead`` wraps a head and is called like it. Every check that reads tensor values runs
eagerly in ``head.episode`` (labels, class ids, shot counts: each would break the graph); then
``head.compute``, pure tensor maths, runs compiled as one graph (``fullgraph=True``: a graph
break is an error, not a silent slow path), its backward compiled with it by AOTAutograd.

Compilation happens at the first call of each mode (training with gradients, evaluation
without), for the shapes of that call: the training micro-batch and the evaluation batch have
fixed shapes, so a run compiles at most two graphs, once. A call whose inputs differ from those
its mode was compiled for (the smaller last batch of an evaluation) runs ``compute`` eagerly
instead of compiling again.

Dropout draws its masks from torch's generator as in eager mode (inductor's
``fallback_random``), so compiled and eager runs follow the same random stream and agree to
float rounding.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from fsar.heads import FewShotHead, HeadOutput

__all__ = ["BACKEND", "CompiledHead", "step_head"]

# torch.compile backend. "inductor" generates C++ (CPU) or Triton (GPU) kernels and needs a C++
# compiler on CPU; "aot_eager" captures the same graphs and their backward without generating
# code (the tests use it).
BACKEND: str | Callable[..., Any] = "inductor"


def _signature(value: Any) -> Any:
    """What a compiled graph is specialised on: tensor shapes, dtypes and devices."""
    if isinstance(value, Tensor):
        return (tuple(value.shape), value.dtype, value.device)
    if isinstance(value, (tuple, list)):
        return tuple(_signature(v) for v in value)
    if isinstance(value, dict):
        return tuple((key, _signature(v)) for key, v in sorted(value.items()))
    return value


class CompiledHead(nn.Module):
    """`head` with `compute` compiled; same calling convention and results as the head."""

    def __init__(self, head: FewShotHead, backend: str | Callable[..., Any] | None = None):
        super().__init__()
        self.head = head
        backend = BACKEND if backend is None else backend
        options = {"fallback_random": True} if backend == "inductor" else None
        self._compute = torch.compile(
            head.compute, backend=backend, fullgraph=True, dynamic=False, options=options
        )
        self._compiled_for: dict[tuple[bool, bool], Any] = {}

    def forward(
        self,
        support: Tensor,
        support_labels: Tensor,
        query: Tensor,
        class_text: Tensor,
        query_labels: Tensor | None = None,
        **head_specific: Tensor,
    ) -> HeadOutput:
        episode = self.head.episode(
            support, support_labels, query, class_text, query_labels, **head_specific
        )
        inputs = (support, support_labels, query, class_text, query_labels, head_specific)
        signature = _signature(inputs), episode.max_shot
        mode = (self.head.training, torch.is_grad_enabled())
        compiled_for = self._compiled_for.setdefault(mode, signature)
        compute = self._compute if compiled_for == signature else self.head.compute
        return compute(episode, **head_specific)


def step_head(head: FewShotHead, compile: bool) -> nn.Module:
    """What the training loop and its validation call: `head` itself, or `CompiledHead(head)`."""
    return CompiledHead(head) if compile else head
