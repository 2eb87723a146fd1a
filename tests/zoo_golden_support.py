"""Shared by tests/test_zoo_golden.py and the per-method adapters in tests/zoo_adapters/."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class GoldenEpisode:
    """One golden file's inputs as fsar heads take them (a batch of B = 1 episode).

    The float inputs require grad, so `grad_input.<name>` can be compared.
    """

    settings: dict
    support: torch.Tensor  # [1, S, T, D]
    query: torch.Tensor  # [1, Q, T, D]
    support_labels: torch.Tensor  # [1, S] long
    query_labels: torch.Tensor  # [1, Q] long
    support_class_ids: torch.Tensor  # [1, S] long, dataset class ids 0..C-1
    query_class_ids: torch.Tensor  # [1, Q] long
    class_text_table: torch.Tensor | None  # [C, D] (sten, cpm2c, clipmei), else None
    class_text: torch.Tensor  # [1, N, D]: the table row of each episode label (zeros if no table)
    num_classes: int  # C
    leaves: dict[str, torch.Tensor]  # golden input name -> the leaf tensor (grad_input checks)

    def inputs(self) -> dict[str, torch.Tensor]:
        return self.leaves


def tensor(a: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    t = torch.from_numpy(np.asarray(a))
    return t.to(dtype) if t.is_floating_point() else t.long()


def golden_episode(settings: dict, arrays: dict[str, np.ndarray], dtype) -> GoldenEpisode:
    def leaf(name: str) -> torch.Tensor:
        return tensor(arrays[name], dtype).requires_grad_(True)

    support = leaf("input.support_features")
    query = leaf("input.query_features")
    support_labels = tensor(arrays["input.support_labels"], dtype)
    query_labels = tensor(arrays["input.query_labels"], dtype)
    support_ids = tensor(arrays["input.support_class_ids"], dtype)
    query_ids = tensor(arrays["input.query_class_ids"], dtype)
    table = leaf("input.class_text_features") if "input.class_text_features" in arrays else None
    n_way = int(support_labels.max()) + 1
    label_to_class = torch.full((n_way,), -1, dtype=torch.long)
    label_to_class[support_labels] = support_ids
    # C (text-table heads) or NUM_CLASS (per-frame classifiers); else the largest id + 1
    largest = int(max(support_ids.max(), query_ids.max())) + 1
    num_classes = int(settings.get("C", settings.get("NUM_CLASS", largest)))
    if table is not None:
        class_text = table[label_to_class][None]
    else:
        class_text = torch.zeros(1, n_way, support.shape[-1], dtype=dtype)
    return GoldenEpisode(
        settings,
        support[None],
        query[None],
        support_labels[None],
        query_labels[None],
        support_ids[None],
        query_ids[None],
        table,
        class_text,
        num_classes,
        {
            "support_features": support,
            "query_features": query,
            **({"class_text_features": table} if table is not None else {}),
        },
    )
