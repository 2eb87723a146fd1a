"""What a feature store holds and how its videos are cut into blocks: pure planning, no I/O.

A store is chunked along the video axis N only: every chunk holds ``chunk_videos`` whole videos
and spans the full T_cap and D axes. A *block* is a half-open range ``[start, stop)`` of videos
whose ends lie on chunk boundaries (or at N), so two writers that own disjoint blocks never touch
the same chunk file. Extraction ranks are given disjoint sets of blocks by ``assign_blocks``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

SPLITS = ("train", "val", "test")  # valid values of videos/split
FEATURE_DTYPES = ("float16", "float32")  # dtypes of features/* and layers/*
STATUS_PENDING, STATUS_DONE, STATUS_FAILED = 0, 1, 2  # values of videos/status
# A listed video whose file is not in the local copy is failed with an error starting with this
# prefix (written by fsar.extract.decode), so counts can tell "missing" from "failed to decode"
# without a fourth status value that older readers would not know.
MISSING_PREFIX = "missing:"


@dataclass(frozen=True)
class StoreLayout:
    """Shape of one store: which videos and classes it holds and the size of every array.

    video_ids, class_ids, splits: one entry per video (length N), in store order.
    class_names: the C class names exactly as prompted; class_ids index into it.
    t_cap: frames cached per video at most (T_cap); feature_dim: D of ``features/<view>``.
    views: cached views, ``center`` first by convention and always present.
    layer_dims: intermediate layer name -> D_l (empty when no layers are cached).
    n_prompts: P prompt templates in ``classes/text_per_prompt``.
    chunk_videos: whole videos per chunk along N (16 x T_cap x D float16 = 256 KiB at T=8, D=1024).
    feature_dtype: numpy dtype of ``features/*`` and ``layers/*`` (FEATURE_DTYPES).
    """

    video_ids: tuple[str, ...]
    class_ids: tuple[int, ...]
    splits: tuple[str, ...]
    class_names: tuple[str, ...]
    t_cap: int
    feature_dim: int
    views: tuple[str, ...] = ("center",)
    layer_dims: dict[str, int] = field(default_factory=dict)
    n_prompts: int = 1
    chunk_videos: int = 16
    feature_dtype: str = "float16"  # of features/* and layers/*: float16 or float32

    def __post_init__(self) -> None:
        for name in ("video_ids", "class_ids", "splits", "class_names", "views"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        object.__setattr__(self, "class_ids", tuple(int(c) for c in self.class_ids))
        object.__setattr__(self, "layer_dims", {str(k): int(v) for k, v in self.layer_dims.items()})
        _check_layout(self)

    @property
    def n_videos(self) -> int:
        return len(self.video_ids)

    @property
    def n_classes(self) -> int:
        return len(self.class_names)

    def dims(self) -> dict[str, Any]:
        """The scalar part of the layout (everything but the per-video and per-class lists)."""
        return {
            "n_videos": self.n_videos,
            "n_classes": self.n_classes,
            "t_cap": self.t_cap,
            "feature_dim": self.feature_dim,
            "views": list(self.views),
            "layer_dims": dict(self.layer_dims),
            "n_prompts": self.n_prompts,
            "chunk_videos": self.chunk_videos,
            "feature_dtype": self.feature_dtype,
        }


def _check_layout(layout: StoreLayout) -> None:
    n = len(layout.video_ids)
    if n == 0:
        raise ValueError("StoreLayout needs at least one video; got video_ids=()")
    for name in ("class_ids", "splits"):
        if len(getattr(layout, name)) != n:
            raise ValueError(
                f"StoreLayout.{name} has {len(getattr(layout, name))} entries, "
                f"video_ids has {n}; they must match"
            )
    if len(set(layout.video_ids)) != n:
        dup = next(v for i, v in enumerate(layout.video_ids) if v in layout.video_ids[:i])
        raise ValueError(f"StoreLayout.video_ids must be unique; {dup!r} appears twice")
    if len(set(layout.class_names)) != len(layout.class_names) or not layout.class_names:
        raise ValueError(
            f"StoreLayout.class_names must be non-empty and unique; "
            f"got {len(layout.class_names)} names, "
            f"{len(set(layout.class_names))} distinct"
        )
    bad_class = [c for c in layout.class_ids if not 0 <= c < len(layout.class_names)]
    if bad_class:
        raise ValueError(
            f"StoreLayout.class_ids must lie in 0..{len(layout.class_names) - 1}; "
            f"got {bad_class[0]}"
        )
    if layout.feature_dtype not in FEATURE_DTYPES:
        raise ValueError(
            f"StoreLayout.feature_dtype must be one of {FEATURE_DTYPES}; "
            f"got {layout.feature_dtype!r}"
        )
    bad_split = sorted(set(layout.splits) - set(SPLITS))
    if bad_split:
        raise ValueError(f"StoreLayout.splits: unknown split {bad_split[0]!r}; valid: {SPLITS}")
    for name in ("t_cap", "feature_dim", "n_prompts", "chunk_videos"):
        if int(getattr(layout, name)) < 1:
            raise ValueError(f"StoreLayout.{name} must be >= 1; got {getattr(layout, name)}")
    if "center" not in layout.views or len(set(layout.views)) != len(layout.views):
        raise ValueError(
            f"StoreLayout.views must be unique and contain 'center'; got {layout.views}"
        )
    for name in (*layout.views, *layout.layer_dims):
        if not name or "/" in name:
            raise ValueError(f"view and layer names must be non-empty without '/'; got {name!r}")
    bad_dims = {k: v for k, v in layout.layer_dims.items() if v < 1}
    if bad_dims:
        raise ValueError(f"StoreLayout.layer_dims must be >= 1; got {bad_dims}")


def layout_differences(stored: StoreLayout, requested: StoreLayout) -> list[str]:
    """Readable lines naming each field where two layouts differ (empty when equal)."""
    lines = []
    for name in ("video_ids", "class_ids", "splits", "class_names"):
        old, new = getattr(stored, name), getattr(requested, name)
        if old == new:
            continue
        if len(old) != len(new):
            lines.append(f"{name}: {len(old)} entries (store) vs {len(new)} (requested)")
            continue
        i = next(i for i, (a, b) in enumerate(zip(old, new, strict=True)) if a != b)
        lines.append(
            f"{name}: first difference at index {i}: {old[i]!r} (store) vs {new[i]!r} (requested)"
        )
    old_dims, new_dims = stored.dims(), requested.dims()
    for key in old_dims:
        if old_dims[key] != new_dims[key]:
            lines.append(f"{key}: {old_dims[key]!r} (store) vs {new_dims[key]!r} (requested)")
    return lines


def chunk_blocks(n_videos: int, chunk_videos: int) -> list[tuple[int, int]]:
    """Cut videos 0..n_videos-1 into chunk-aligned blocks ``[start, stop)`` of one chunk each.

    Every block holds ``chunk_videos`` videos except possibly the last, which ends at n_videos.
    """
    if n_videos < 0 or chunk_videos < 1:
        raise ValueError(
            f"need n_videos >= 0 and chunk_videos >= 1; "
            f"got n_videos={n_videos}, chunk_videos={chunk_videos}"
        )
    return [(s, min(s + chunk_videos, n_videos)) for s in range(0, n_videos, chunk_videos)]


def is_chunk_aligned(start: int, stop: int, n_videos: int, chunk_videos: int) -> bool:
    """True when ``[start, stop)`` is non-empty, inside 0..n_videos and on chunk boundaries."""
    if not 0 <= start < stop <= n_videos:
        return False
    return start % chunk_videos == 0 and (stop % chunk_videos == 0 or stop == n_videos)


def assign_blocks(
    blocks: list[tuple[int, int]], rank: int, world_size: int
) -> list[tuple[int, int]]:
    """The blocks that ``rank`` of ``world_size`` writes: a contiguous run of the given list.

    Over all ranks the runs are disjoint and cover ``blocks``; rank r gets
    ``blocks[r*B//W : (r+1)*B//W]``, so block counts differ by at most one between ranks and
    the result depends only on (blocks, rank, world_size). Pass the pending blocks to balance
    a resumed run.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(
            f"need world_size >= 1 and 0 <= rank < world_size; "
            f"got rank={rank}, world_size={world_size}"
        )
    n = len(blocks)
    return list(blocks[rank * n // world_size : (rank + 1) * n // world_size])


def merge_blocks(blocks: list[tuple[int, int]], max_videos: int) -> list[tuple[int, int]]:
    """Join runs of adjacent blocks into spans of at most max_videos (always >= one block).

    Used to read or copy many chunks per call; the spans stay chunk-aligned.
    """
    spans: list[tuple[int, int]] = []
    for start, stop in blocks:
        if spans and spans[-1][1] == start and stop - spans[-1][0] <= max_videos:
            spans[-1] = (spans[-1][0], stop)
        else:
            spans.append((start, stop))
    return spans


def blocks_needing_work(
    blocks: list[tuple[int, int]], status: np.ndarray, retry_failed: bool = False
) -> list[tuple[int, int]]:
    """The blocks holding at least one pending video (or failed one when retry_failed).

    status: uint8 [N], values STATUS_PENDING / STATUS_DONE / STATUS_FAILED.
    """
    todo = status == STATUS_PENDING
    if retry_failed:
        todo |= status == STATUS_FAILED
    return [(s, e) for s, e in blocks if bool(todo[s:e].any())]


@dataclass(frozen=True)
class ArraySpec:
    """One array of a store, as a backend creates it."""

    name: str  # path inside the store, e.g. "features/center"
    dtype: str  # numpy dtype name, or "str" for variable-length UTF-8 strings
    shape: tuple[int, ...]
    chunks: tuple[int, ...]
    fill: Any  # value read back where nothing was written yet


def array_specs(layout: StoreLayout) -> list[ArraySpec]:
    """Every array of a store with this layout (SPEC 3 table).

    Arrays written block by block are chunked by ``chunk_videos`` whole videos along N.
    """
    n, t, d, c, p = (
        layout.n_videos,
        layout.t_cap,
        layout.feature_dim,
        layout.n_classes,
        layout.n_prompts,
    )
    k = min(layout.chunk_videos, n)
    specs = [  # id, class_id and split are written once at creation: one chunk opens fastest
        ArraySpec("videos/id", "str", (n,), (n,), ""),
        ArraySpec("videos/class_id", "int32", (n,), (n,), 0),
        ArraySpec("videos/split", "str", (n,), (n,), ""),
        ArraySpec("videos/n_frames", "int32", (n,), (k,), 0),
        ArraySpec("videos/frame_index", "int32", (n, t), (k, t), -1),
        ArraySpec("videos/status", "uint8", (n,), (k,), STATUS_PENDING),
        ArraySpec("videos/error", "str", (n,), (k,), ""),
        # decoded length and average fps of the source video: CLIP-FSAR's Kinetics-100 clip
        # depends on both, so a dense store can replay the release's indices
        ArraySpec("videos/source_length", "int32", (n,), (k,), 0),
        ArraySpec("videos/fps", "float32", (n,), (k,), 0.0),
        ArraySpec("classes/name", "str", (c,), (c,), ""),
        ArraySpec("classes/text", "float32", (c, d), (c, d), 0.0),
        ArraySpec("classes/text_per_prompt", "float32", (c, p, d), (c, p, d), 0.0),
    ]
    for view in layout.views:
        f = layout.feature_dtype
        specs.append(ArraySpec(f"features/{view}", f, (n, t, d), (k, t, d), 0.0))
        for name, dim in layout.layer_dims.items():
            specs.append(ArraySpec(f"layers/{view}/{name}", f, (n, t, dim), (k, t, dim), 0.0))
    return specs


@dataclass
class BlockData:
    """The arrays of one block of B videos, in the shapes ``FeatureStore.write_block`` takes."""

    features: dict[str, np.ndarray]  # view -> [B, T_cap, D] (layout.feature_dtype)
    layers: dict[str, dict[str, np.ndarray]]  # view -> layer -> [B, T_cap, D_l]; or {}
    frame_index: np.ndarray  # int32 [B, T_cap], -1 = padding
    n_frames: np.ndarray  # int32 [B]
    status: np.ndarray  # uint8 [B]
    errors: list[str]  # B messages, "" unless failed
    source_length: np.ndarray | None = None  # int32 [B] decoded source frames (0 = unknown)
    fps: np.ndarray | None = None  # float32 [B] average fps of the source (0 = unknown)


def empty_block(layout: StoreLayout, b: int) -> BlockData:
    """A block of b pending videos: zero features, frame_index -1, no errors."""
    t, f = layout.t_cap, np.dtype(layout.feature_dtype)
    return BlockData(
        features={v: np.zeros((b, t, layout.feature_dim), f) for v in layout.views},
        layers={
            v: {k: np.zeros((b, t, d), f) for k, d in layout.layer_dims.items()}
            for v in (layout.views if layout.layer_dims else ())
        },
        frame_index=np.full((b, t), -1, np.int32),
        n_frames=np.zeros(b, np.int32),
        status=np.zeros(b, np.uint8),
        errors=[""] * b,
        source_length=np.zeros(b, np.int32),
        fps=np.zeros(b, np.float32),
    )


def _shaped(value: np.ndarray, shape: tuple[int, ...], dtype: type, what: str) -> np.ndarray:
    arr = np.asarray(value)
    if arr.shape != shape:
        raise ValueError(f"{what} must have shape {shape}; got {arr.shape}")
    return arr.astype(dtype, copy=False)


def block_arrays(layout: StoreLayout, b: int, block: BlockData) -> dict[str, np.ndarray]:
    """Check a block of b videos against the layout; return store path -> array (store dtype).

    Raises ValueError naming the first bad input: missing or extra views/layers, wrong shapes,
    status outside {0, 1, 2}, or a done video whose n_frames / frame_index are inconsistent.
    """
    t, lay, f = layout.t_cap, layout, np.dtype(layout.feature_dtype)
    if set(block.features) != set(lay.views):
        raise ValueError(f"features must hold the views {lay.views}; got {tuple(block.features)}")
    want_layers = set(lay.views) if lay.layer_dims else set()
    if set(block.layers) != want_layers:
        raise ValueError(
            f"layers must hold the views {tuple(sorted(want_layers))}; got {tuple(block.layers)}"
        )
    out: dict[str, np.ndarray] = {}
    for view in lay.views:
        out[f"features/{view}"] = _shaped(
            block.features[view], (b, t, lay.feature_dim), f, f"features[{view!r}]"
        )
        if lay.layer_dims and set(block.layers[view]) != set(lay.layer_dims):
            raise ValueError(
                f"layers[{view!r}] must hold {tuple(lay.layer_dims)}; "
                f"got {tuple(block.layers[view])}"
            )
        for name, dim in lay.layer_dims.items():
            out[f"layers/{view}/{name}"] = _shaped(
                block.layers[view][name], (b, t, dim), f, f"layers[{view!r}][{name!r}]"
            )
    fi = _shaped(block.frame_index, (b, t), np.int32, "frame_index")
    nf = _shaped(block.n_frames, (b,), np.int32, "n_frames")
    st = _shaped(block.status, (b,), np.uint8, "status")
    if not np.isin(st, (STATUS_PENDING, STATUS_DONE, STATUS_FAILED)).all():
        raise ValueError(
            f"status values must be 0 pending, 1 done or 2 failed; got {sorted(set(st.tolist()))}"
        )
    done = st == STATUS_DONE
    if np.any(done & ((nf < 1) | (nf > t))):
        raise ValueError(f"done videos need 1 <= n_frames <= T_cap={t}; got {nf[done].tolist()}")
    valid = np.arange(t)[None, :] < nf[:, None]
    if np.any(done[:, None] & (valid != (fi >= 0))):
        raise ValueError(
            "frame_index of a done video must be >= 0 for its first n_frames "
            "entries and -1 after them"
        )
    if len(block.errors) != b:
        raise ValueError(f"errors must hold {b} strings (one per video); got {len(block.errors)}")
    out["videos/frame_index"], out["videos/n_frames"] = fi, nf
    if block.source_length is not None:
        out["videos/source_length"] = _shaped(block.source_length, (b,), np.int32, "source_length")
    if block.fps is not None:
        out["videos/fps"] = _shaped(block.fps, (b,), np.float32, "fps")
    out["videos/error"] = np.array([str(e) for e in block.errors], dtype=object)
    out["videos/status"] = st  # stays last: write_block writes it after everything else
    return out
