"""FeatureBank: one split of a store, loaded once into tensors on one device (SPEC 3).

Sampling a batch of episodes from a bank is index arithmetic and one gather; nothing is read
from disk after loading. Only videos marked done are loaded: failed or pending ones are counted
in ``skipped`` and never sampled. Loading checks what it loads (``fsar.cache.integrity``): a
missing or unreadable chunk, a status outside 0/1/2, a frame count outside 1..T_cap or a
non-finite value in a loaded row refuses the whole load with one line naming the store, the
array and the videos, instead of becoming a wrong accuracy.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from fsar.cache.integrity import (
    checked_status,
    require_finite,
    require_frame_counts,
    require_rows,
    require_whole,
)
from fsar.cache.layout import STATUS_DONE
from fsar.cache.store import FeatureStore
from fsar.errors import FsarError


class BankError(FsarError, ValueError):
    """The store cannot provide what was asked (a split, a view, a layer)."""


@dataclass
class FeatureBank:
    """Cached features of one split.

    features: view -> float16 [V_n, T_cap, D] (float16 halves GPU memory; gathers cast up)
    layers: view -> layer name -> float16 [V_n, T_cap, D_l]
    n_frames: long [V_n] valid cached frames per video
    class_ids: long [V_n] dataset class index of each video
    class_text: float32 [C, D] text embedding of every dataset class (indexed by class id)
    """

    split: str
    video_ids: tuple[str, ...]
    store_rows: np.ndarray  # int64 [V_n] rows in the store
    features: dict[str, torch.Tensor]
    layers: dict[str, dict[str, torch.Tensor]]
    n_frames: torch.Tensor
    class_ids: torch.Tensor
    class_text: torch.Tensor
    class_names: tuple[str, ...]
    fingerprint: str
    skipped: int  # videos of the split not loaded (failed or pending)
    # source frame number of each cached frame (-1 padding), the source's decoded length and
    # fps: what release frame rules on a dense store need (fsar.pipelines.frame_plan)
    frame_index: np.ndarray | None = None  # int32 [V_n, T_cap]
    source_length: np.ndarray | None = None  # int32 [V_n] (0 = not recorded)
    fps: np.ndarray | None = None  # float32 [V_n] (0 = not recorded)
    frame_policy: str = ""  # the store's extract.frames, e.g. 'dense:512'

    @property
    def device(self) -> torch.device:
        return self.n_frames.device

    @property
    def views(self) -> tuple[str, ...]:
        return tuple(self.features)

    @property
    def feature_dim(self) -> int:
        return int(next(iter(self.features.values())).shape[-1])

    @property
    def layer_dims(self) -> dict[str, int]:
        first = next(iter(self.layers.values()), {})
        return {name: int(value.shape[-1]) for name, value in first.items()}

    def __len__(self) -> int:
        return len(self.video_ids)

    def videos_per_class(self) -> dict[int, int]:
        """Class id -> number of loaded videos (classes with none are absent)."""
        ids, counts = torch.unique(self.class_ids.cpu(), return_counts=True)
        return {int(i): int(c) for i, c in zip(ids, counts, strict=True)}

    def gather(
        self, videos: torch.Tensor, positions: torch.Tensor, view: str = "center"
    ) -> torch.Tensor:
        """Frames of videos: videos long [...], positions long [..., T] -> float32 [..., T, D]."""
        return _gather(self.features[view], videos, positions)

    def gather_layer(
        self, name: str, videos: torch.Tensor, positions: torch.Tensor, view: str = "center"
    ) -> torch.Tensor:
        """Like ``gather`` for an intermediate layer cached in the store."""
        return _gather(self.layers[view][name], videos, positions)


def _gather(table: torch.Tensor, videos: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    rows = table[videos.unsqueeze(-1).expand_as(positions), positions]  # [..., T, D]
    return rows.float()


def load_bank(
    store: FeatureStore,
    split: str,
    device: torch.device | str = "cpu",
    views: Sequence[str] = ("center",),
    layers: Sequence[str] = (),
) -> FeatureBank:
    """Load the done videos of ``split`` with the given views and cached layers."""
    available = tuple(store.layout.views)
    missing_views = [view for view in views if view not in available]
    if missing_views:
        raise BankError(
            f"{store.path} has no cached view(s) {missing_views}; cached: {list(available)}. "
            "Use protocol.train_views with cached views, or extract with --views including them."
        )
    missing_layers = [name for name in layers if name not in store.layout.layer_dims]
    if missing_layers:
        raise BankError(
            f"{store.path} has no cached layer(s) {missing_layers}; cached: "
            f"{list(store.layout.layer_dims)}. Extract with --layers {','.join(missing_layers)}."
        )
    in_split = np.flatnonzero(store.splits == split)
    if in_split.size == 0:
        present = sorted(set(store.splits.tolist()))
        raise BankError(
            f"{store.path} holds no {split!r} videos (splits present: {present}); extract the "
            f"store with dataset.splits including {split}, or pick another split"
        )
    status = checked_status(store)
    rows = np.flatnonzero((store.splits == split) & (status == STATUS_DONE))
    if rows.size == 0:
        raise BankError(
            f"none of the {in_split.size} {split!r} videos in {store.path} is extracted: "
            "finish the extraction (rerun the same fsar extract command) first"
        )
    device = torch.device(device)
    what = repr(split)
    feature_names = [f"features/{view}" for view in views]
    layer_names = [f"layers/{view}/{name}" for view in views for name in layers]
    require_rows(store, ["videos/n_frames", *feature_names, *layer_names], rows, what)
    n_frames = store._arrays.read("videos/n_frames", rows)
    require_frame_counts(store, n_frames, rows, what)

    def load(values: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(values)).to(device)

    def checked(name: str, values: np.ndarray) -> torch.Tensor:
        tensor = load(values)
        require_finite(store, name, tensor, rows, what)  # on the device: fast on a GPU
        return tensor

    require_whole(store, "classes/text")
    class_text = store.class_text.astype(np.float32)
    if not np.isfinite(class_text).all():
        raise BankError(
            f"{store.path}: classes/text holds non-finite values; run `fsar cache verify "
            f"{store.path}` to list every problem"
        )
    return FeatureBank(
        split=split,
        video_ids=tuple(store.video_ids[i] for i in rows),
        store_rows=rows,
        features={
            view: checked(f"features/{view}", store.read_features(view, rows)) for view in views
        },
        layers={
            view: {
                name: checked(f"layers/{view}/{name}", store.read_layer(view, name, rows))
                for name in layers
            }
            for view in views
        }
        if layers
        else {},
        n_frames=load(n_frames.astype(np.int64)),
        class_ids=load(store.class_ids[rows].astype(np.int64)),
        class_text=load(class_text),
        class_names=tuple(store.class_names),
        fingerprint=store.fingerprint,
        skipped=int(in_split.size - rows.size),
        frame_index=np.asarray(store.frame_index[rows]),
        source_length=np.asarray(store.source_length[rows]),
        fps=np.asarray(store.fps[rows]),
        frame_policy=str(store.recipe.get("frames", "")),
    )
