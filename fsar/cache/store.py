"""The feature store (SPEC 3): cached frame embeddings of one dataset x encoder x recipe.

``create_store`` makes a new store (or reopens an identical one to resume), ``open_store`` opens
an existing one; both return a ``FeatureStore``. Writers fill chunk-aligned blocks of whole
videos with ``write_block``, which writes every data array first and ``videos/status`` last, so
a video is never marked done before its numbers are on disk. The layout on disk:

videos/id str[N], videos/class_id int32[N], videos/split str[N], videos/n_frames int32[N],
videos/frame_index int32[N, T_cap] (-1 = padding), videos/status uint8[N] (0 pending, 1 done,
2 failed), videos/error str[N], features/<view> float16|float32[N, T_cap, D],
layers/<view>/<name> float16|float32[N, T_cap, D_l] (the layout's feature_dtype),
classes/name str[C], classes/text float32[C, D],
classes/text_per_prompt float32[C, P, D]; group attributes ``fsar_schema_version``, ``recipe``,
``fingerprint``, ``versions``, ``layout`` and ``text_written``.
"""

from __future__ import annotations

import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fsar.cache.backends import (
    BACKENDS,
    ArrayBackend,
    build_backend,
    detect_backend,
    open_backend,
    publish,
    staging_path,
)
from fsar.cache.fingerprint import (
    SCHEMA_VERSION,
    flatten_recipe,
    library_versions,
    normalize_recipe,
    recipe_diff,
    recipe_fingerprint,
)
from fsar.cache.integrity import require_whole, verify_store
from fsar.cache.layout import (
    MISSING_PREFIX,
    SPLITS,
    STATUS_DONE,
    STATUS_FAILED,
    STATUS_PENDING,
    BlockData,
    StoreLayout,
    array_specs,
    block_arrays,
    blocks_needing_work,
    chunk_blocks,
    empty_block,
    is_chunk_aligned,
    layout_differences,
    merge_blocks,
)
from fsar.errors import FsarError, StoreError

MODES = ("r", "r+")  # read only / read and write an existing store
READ_BYTES = 64 * 2**20  # verify and export read about this many bytes (as float32) per step


class StoreMismatchError(FsarError, ValueError):
    """An existing store was built with another recipe or layout than the one requested."""


class FeatureStore:
    """One opened store; use ``create_store`` or ``open_store`` rather than this constructor."""

    def __init__(self, arrays: ArrayBackend) -> None:
        self._arrays = arrays
        attrs = arrays.attrs()
        if "fingerprint" not in attrs or "fsar_schema_version" not in attrs:
            arrays.close()
            raise StoreError(
                f"{arrays.path} is a {arrays.kind} file but not an fsar feature "
                f"store (no 'fingerprint' / 'fsar_schema_version' attribute)"
            )
        if attrs["fsar_schema_version"] != SCHEMA_VERSION:
            arrays.close()
            raise StoreError(
                f"{arrays.path} has store schema version "
                f"{attrs['fsar_schema_version']}; this fsar reads version "
                f"{SCHEMA_VERSION}"
            )
        dims = attrs["layout"]
        whole = ["videos/id", "videos/split", "classes/name"]
        if dims["n_classes"] > 1:  # with one class, 0 (the fill value) is every video's class
            whole.append("videos/class_id")
        for name in whole:
            try:  # read as fill values, a lost chunk would give class 0 / no split silently
                require_whole(self, name)
            except BaseException:
                arrays.close()
                raise
        self.layout = StoreLayout(
            video_ids=tuple(arrays.read("videos/id")),
            class_ids=tuple(int(c) for c in arrays.read("videos/class_id")),
            splits=tuple(arrays.read("videos/split")),
            class_names=tuple(arrays.read("classes/name")),
            t_cap=dims["t_cap"],
            feature_dim=dims["feature_dim"],
            views=tuple(dims["views"]),
            layer_dims=dims["layer_dims"],
            n_prompts=dims["n_prompts"],
            chunk_videos=dims["chunk_videos"],
            feature_dtype=dims.get("feature_dtype", "float16"),  # older stores: float16
        )

    # ---------------------------------------------------------------- identity
    @property
    def path(self) -> Path:
        return self._arrays.path

    @property
    def backend(self) -> str:
        """'zarr' or 'hdf5'."""
        return self._arrays.kind

    @property
    def writable(self) -> bool:
        return self._arrays.writable

    @property
    def attrs(self) -> dict[str, Any]:
        """A fresh copy of the group attributes."""
        return self._arrays.attrs()

    @property
    def recipe(self) -> dict[str, Any]:
        return self.attrs["recipe"]

    @property
    def fingerprint(self) -> str:
        return self.attrs["fingerprint"]

    # ---------------------------------------------------------------- per-video metadata
    @property
    def video_ids(self) -> tuple[str, ...]:
        return self.layout.video_ids

    @property
    def class_ids(self) -> np.ndarray:
        """int32 [N]."""
        return np.asarray(self.layout.class_ids, dtype=np.int32)

    @property
    def splits(self) -> np.ndarray:
        """str [N]."""
        return np.asarray(self.layout.splits, dtype=str)

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.layout.class_names

    @property
    def status(self) -> np.ndarray:
        """uint8 [N], read from disk now. A status chunk that cannot be read counts as pending."""
        try:
            return self._arrays.read("videos/status").astype(np.uint8)
        except Exception:  # noqa: BLE001 - damaged chunk: fall back to block-wise reading
            out = np.zeros(self.layout.n_videos, dtype=np.uint8)
            for start, stop in self.blocks():
                try:
                    out[start:stop] = self._arrays.read("videos/status", slice(start, stop))
                except Exception as err:  # noqa: BLE001
                    warnings.warn(
                        f"{self.path}: status of videos {start}..{stop - 1} is "
                        f"unreadable ({err!r}); treating them as pending",
                        stacklevel=2,
                    )
            return out

    @property
    def errors(self) -> list[str]:
        return [str(e) for e in self._arrays.read("videos/error")]

    @property
    def n_frames(self) -> np.ndarray:
        """int32 [N]."""
        return self._arrays.read("videos/n_frames")

    @property
    def frame_index(self) -> np.ndarray:
        """int32 [N, T_cap], -1 = padding."""
        return self._arrays.read("videos/frame_index")

    @property
    def source_length(self) -> np.ndarray:
        """int32 [N] decoded frames of each source video (0 = not recorded)."""
        values = self._optional("videos/source_length", None)
        return np.zeros(self.layout.n_videos, np.int32) if values is None else values

    @property
    def fps(self) -> np.ndarray:
        """float32 [N] average fps of each source video (0 = not recorded)."""
        values = self._optional("videos/fps", None)
        return np.zeros(self.layout.n_videos, np.float32) if values is None else values

    def split_indices(self, split: str, *, done_only: bool = True) -> np.ndarray:
        """int64 [n] store rows of the videos in ``split`` (only done ones by default)."""
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; valid: {SPLITS}")
        keep = self.splits == split
        if done_only:
            keep &= self.status == STATUS_DONE
        return np.flatnonzero(keep)

    # ---------------------------------------------------------------- blocks
    def blocks(self) -> list[tuple[int, int]]:
        """All chunk-aligned blocks ``[start, stop)`` of one chunk each."""
        return chunk_blocks(self.layout.n_videos, self.layout.chunk_videos)

    def pending_blocks(self, retry_failed: bool = False) -> list[tuple[int, int]]:
        """Blocks with a pending video; failed videos count as finished unless retry_failed."""
        return blocks_needing_work(self.blocks(), self.status, retry_failed)

    def _check_block(self, start: int, stop: int) -> None:
        if not is_chunk_aligned(start, stop, self.layout.n_videos, self.layout.chunk_videos):
            raise ValueError(
                f"block [{start}, {stop}) is not chunk-aligned: start and stop must "
                f"be multiples of chunk_videos={self.layout.chunk_videos} (stop may "
                f"be N={self.layout.n_videos}) with start < stop"
            )

    def _require_writable(self) -> None:
        if not self.writable:
            raise PermissionError(f"{self.path} is open read-only; use open_store(path, 'r+')")

    # ---------------------------------------------------------------- writing
    def write_block(
        self,
        start: int,
        stop: int,
        *,
        features: dict[str, np.ndarray],
        layers: dict[str, dict[str, np.ndarray]],
        frame_index: np.ndarray,
        n_frames: np.ndarray,
        status: np.ndarray,
        errors: list[str],
        source_length: np.ndarray | None = None,
        fps: np.ndarray | None = None,
    ) -> None:
        """Write videos ``start..stop-1`` (B of them); ``status`` is written last.

        features: view -> [B, T_cap, D] (cast to float16 or float32, the feature dtype); layers:
        view -> name -> [B, T_cap, D_l]
        (``{}`` when the store has no layers); frame_index: int [B, T_cap], -1 padding;
        n_frames: int [B]; status: uint8 [B] in {0, 1, 2}; errors: B strings ('' when fine);
        source_length: int [B] decoded source frames, fps: float [B] (optional: kept as is).
        """
        self._require_writable()
        self._check_block(start, stop)
        block = BlockData(
            features, layers, frame_index, n_frames, status, list(errors), source_length, fps
        )
        if not self._arrays.has("videos/fps"):  # a store made before these arrays existed
            block.source_length = block.fps = None
        data = block_arrays(self.layout, stop - start, block)
        try:
            rewrite = np.any(self._arrays.read("videos/status", slice(start, stop)) != 0)
        except Exception:  # noqa: BLE001 - a damaged status chunk is replaced below
            rewrite = True
        if rewrite:  # finished videos: mark them pending until the new data is complete
            self._arrays.write("videos/status", start, np.zeros(stop - start, dtype=np.uint8))
        self._arrays.write_many([(k, start, v) for k, v in data.items() if k != "videos/status"])
        self._arrays.flush()
        self._arrays.write("videos/status", start, data["videos/status"])
        self._arrays.flush()

    def empty_block(self, start: int, stop: int) -> BlockData:
        """Fresh arrays for a block: zero features, frame_index -1, status pending."""
        self._check_block(start, stop)
        return empty_block(self.layout, stop - start)

    def read_block(self, start: int, stop: int) -> BlockData:
        """The stored arrays of a chunk-aligned block, in the form ``write_block`` takes."""
        self._check_block(start, stop)
        rows, lay = slice(start, stop), self.layout
        read = self._arrays.read
        return BlockData(
            features={v: read(f"features/{v}", rows) for v in lay.views},
            layers={
                v: {k: read(f"layers/{v}/{k}", rows) for k in lay.layer_dims}
                for v in (lay.views if lay.layer_dims else ())
            },
            frame_index=read("videos/frame_index", rows),
            n_frames=read("videos/n_frames", rows),
            status=read("videos/status", rows),
            errors=[str(e) for e in read("videos/error", rows)],
            source_length=self._optional("videos/source_length", rows),
            fps=self._optional("videos/fps", rows),
        )

    def _optional(self, name: str, rows: Any) -> np.ndarray | None:
        """An array added after schema 1's first stores (None in a store that lacks it)."""
        return self._arrays.read(name, rows) if self._arrays.has(name) else None

    def mark_pending(self, start: int, stop: int) -> None:
        """Set videos ``start..stop-1`` (a chunk-aligned block) back to pending."""
        self._require_writable()
        self._check_block(start, stop)
        self._arrays.write("videos/status", start, np.zeros(stop - start, dtype=np.uint8))
        self._arrays.flush()

    def write_classes(self, text: np.ndarray, text_per_prompt: np.ndarray) -> None:
        """Write class text embeddings: text float32 [C, D], text_per_prompt float32 [C, P, D]."""
        self._require_writable()
        lay = self.layout
        want = {
            "text": (lay.n_classes, lay.feature_dim),
            "text_per_prompt": (lay.n_classes, lay.n_prompts, lay.feature_dim),
        }
        for name, value in (("text", text), ("text_per_prompt", text_per_prompt)):
            if np.shape(value) != want[name]:
                raise ValueError(
                    f"classes/{name} must have shape {want[name]} (C, [P,] D); "
                    f"got {np.shape(value)}"
                )
            self._arrays.write(f"classes/{name}", 0, np.asarray(value, dtype=np.float32))
        self._arrays.flush()
        self._arrays.update_attrs({"text_written": True})
        self._arrays.flush()

    # ---------------------------------------------------------------- reading
    def _read_rows(self, name: str, indices: Any) -> np.ndarray:
        if indices is None:
            return self._arrays.read(name)
        idx = np.asarray(indices)
        if idx.dtype == bool:
            idx = np.flatnonzero(idx)
        idx = idx.astype(np.int64).ravel()
        n = self.layout.n_videos
        if idx.size and (idx.min() < 0 or idx.max() >= n):
            raise IndexError(
                f"video indices must lie in 0..{n - 1}; got min {idx.min()}, max {idx.max()}"
            )
        rows, inverse = np.unique(idx, return_inverse=True)
        if not np.array_equal(rows, idx):
            return self._arrays.read(name, rows)[inverse]
        # sorted and unique (every bank load): no reordering copy; and a split's rows are
        # usually contiguous (extraction lists videos split by split), which the backends read
        # as one slice, about 1.5x faster than an orthogonal index read of the same rows
        if rows.size and rows[-1] - rows[0] + 1 == rows.size:
            return self._arrays.read(name, slice(int(rows[0]), int(rows[-1]) + 1))
        return self._arrays.read(name, rows)

    def read_features(self, view: str = "center", indices: Any = None) -> np.ndarray:
        """[n, T_cap, D] for all videos or the given indices (any order, repeats ok)."""
        if view not in self.layout.views:
            raise KeyError(f"view {view!r} is not in this store; cached views: {self.layout.views}")
        return self._read_rows(f"features/{view}", indices)

    def read_layer(self, view: str, name: str, indices: Any = None) -> np.ndarray:
        """[n, T_cap, D_l] of intermediate layer ``name`` in ``view``."""
        if view not in self.layout.views or name not in self.layout.layer_dims:
            raise KeyError(
                f"no layer {view!r}/{name!r} in this store; views: "
                f"{self.layout.views}, layers: {tuple(self.layout.layer_dims)}"
            )
        return self._read_rows(f"layers/{view}/{name}", indices)

    @property
    def has_text(self) -> bool:
        """True once ``write_classes`` has completed."""
        return bool(self.attrs.get("text_written", False))

    def _class_array(self, name: str) -> np.ndarray:
        if not self.has_text:
            raise RuntimeError(
                f"{self.path}: class text embeddings were never written (extraction unfinished?)"
            )
        return self._arrays.read(f"classes/{name}")

    @property
    def class_text(self) -> np.ndarray:
        """float32 [C, D]: mean over prompt templates of encode_text (not normalised)."""
        return self._class_array("text")

    @property
    def class_text_per_prompt(self) -> np.ndarray:
        """float32 [C, P, D]."""
        return self._class_array("text_per_prompt")

    # ---------------------------------------------------------------- inspection
    def summary(self) -> StoreSummary:
        """Counts by split and status, failures, dims, recipe, fingerprint, size on disk."""
        return _summarize(self)

    def verify(self) -> list[str]:
        """Problems found by reading every array (empty list = store complete and sound)."""
        return verify_store(self, _spans(self.layout))

    def close(self) -> None:
        self._arrays.close()

    def __enter__(self) -> FeatureStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"FeatureStore({str(self.path)!r}, backend={self.backend!r}, "
            f"videos={self.layout.n_videos}, views={self.layout.views})"
        )


def _store_attrs(layout: StoreLayout, recipe: dict[str, Any]) -> dict[str, Any]:
    return {
        "fsar_schema_version": SCHEMA_VERSION,
        "recipe": normalize_recipe(recipe),
        "fingerprint": recipe_fingerprint(recipe),
        "versions": library_versions(),
        "layout": layout.dims(),
        "text_written": False,
    }


def _holds_something(path: Path) -> bool:
    return path.is_file() or (path.is_dir() and any(path.iterdir()))


def _reopen(path: Path, layout: StoreLayout, recipe: dict[str, Any], backend: str) -> FeatureStore:
    kind = detect_backend(path)
    if kind != backend:
        raise StoreMismatchError(
            f"{path} is an existing {kind} store but backend={backend!r} "
            f"was requested; use a new --out path or --backend {kind}"
        )
    return check_matches(open_store(path, "r+"), layout, recipe)


def check_matches(store: FeatureStore, layout: StoreLayout, recipe: dict[str, Any]) -> FeatureStore:
    """``store`` itself when it was built with ``recipe`` and ``layout``; else StoreMismatchError
    naming every difference (the store is closed)."""
    path, lines = store.path, []
    if store.fingerprint != recipe_fingerprint(recipe):
        lines += [f"recipe {line}" for line in recipe_diff(store.recipe, recipe)] or [
            f"fingerprint: {store.fingerprint} (store) vs {recipe_fingerprint(recipe)} (requested)"
        ]
    lines += [f"layout {line}" for line in layout_differences(store.layout, layout)]
    if lines:
        store.close()
        detail = "\n  ".join(lines)
        raise StoreMismatchError(
            f"the feature store {path} was built differently from this run:"
            f"\n  {detail}\nWrite to a new --out path, or delete {path} to "
            f"rebuild it; stores are never mixed."
        )
    return store


def create_store(
    path: Path, layout: StoreLayout, recipe: dict[str, Any], *, backend: str = "zarr"
) -> FeatureStore:
    """Create a store for ``layout`` built with ``recipe``, or reopen an identical one to resume.

    A new store is built in a hidden sibling path and renamed into place in one step, so a
    killed creation leaves nothing half-made at ``path`` and concurrent ranks agree on one store.
    An existing store opens for writing only if its fingerprint and layout equal the requested
    ones; otherwise StoreMismatchError names every difference.
    """
    path = Path(path)
    if backend not in BACKENDS:
        raise ValueError(f"unknown store backend {backend!r}; valid: {BACKENDS}")
    attrs = _store_attrs(layout, recipe)
    if _holds_something(path):
        return _reopen(path, layout, recipe, backend)
    staged = staging_path(path)
    try:
        arrays = build_backend(backend, staged, array_specs(layout), attrs)
        arrays.write("videos/id", 0, np.array(layout.video_ids, dtype=object))
        arrays.write("videos/class_id", 0, np.asarray(layout.class_ids, dtype=np.int32))
        arrays.write("videos/split", 0, np.array(layout.splits, dtype=object))
        arrays.write("classes/name", 0, np.array(layout.class_names, dtype=object))
        # every status chunk exists from the start, so a missing one is damage, not "pending"
        arrays.write("videos/status", 0, np.zeros(layout.n_videos, dtype=np.uint8))
        arrays.close()
        publish(staged, path)
    except FileExistsError:  # another process published first
        _remove(staged)
        return _reopen(path, layout, recipe, backend)
    except BaseException:
        _remove(staged)
        raise
    return open_store(path, "r+")


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def open_store(path: Path, mode: str = "r") -> FeatureStore:
    """Open an existing store: a Zarr directory or an HDF5 file (detected), mode 'r' or 'r+'."""
    if mode not in MODES:
        raise ValueError(f"unknown store mode {mode!r}; valid: {MODES}")
    return FeatureStore(open_backend(Path(path), writable=mode == "r+"))


# -------------------------------------------------------------------- summary and verification
STATUS_NAMES = {STATUS_PENDING: "pending", STATUS_DONE: "done", STATUS_FAILED: "failed"}


@dataclass(frozen=True)
class StoreSummary:
    """What ``fsar cache info`` shows about a store."""

    path: str
    backend: str
    n_videos: int
    n_classes: int
    counts: dict[str, dict[str, int]]  # split -> {"pending", "done", "failed", "missing": n}
    failures: tuple[tuple[str, str], ...]  # (video id, error) of every video failed to decode
    missing: tuple[str, ...]  # ids of the listed videos not found in the local copy
    frames_cached: int  # sum of n_frames over done videos
    t_cap: int
    feature_dim: int
    views: tuple[str, ...]
    layer_dims: dict[str, int]
    n_prompts: int
    chunk_videos: int
    text_written: bool
    recipe: dict[str, Any]
    fingerprint: str
    schema_version: int
    versions: dict[str, str]
    size_bytes: int


def _summarize(store: FeatureStore) -> StoreSummary:
    status, splits, lay, attrs = store.status, store.splits, store.layout, store.attrs
    errors = store.errors
    missing = np.array([e.startswith(MISSING_PREFIX) for e in errors], dtype=bool)
    missing &= status == STATUS_FAILED
    counts = {
        split: {
            **{
                name: int(np.sum((splits == split) & (status == code) & ~missing))
                for code, name in STATUS_NAMES.items()
            },
            "missing": int(np.sum((splits == split) & missing)),
        }
        for split in SPLITS
        if np.any(splits == split)
    }
    failed = np.flatnonzero((status == STATUS_FAILED) & ~missing)
    return StoreSummary(
        path=str(store.path),
        backend=store.backend,
        n_videos=lay.n_videos,
        n_classes=lay.n_classes,
        counts=counts,
        failures=tuple((lay.video_ids[i], errors[i]) for i in failed),
        missing=tuple(lay.video_ids[i] for i in np.flatnonzero(missing)),
        frames_cached=int(store.n_frames[status == STATUS_DONE].sum()),
        t_cap=lay.t_cap,
        feature_dim=lay.feature_dim,
        views=lay.views,
        layer_dims=dict(lay.layer_dims),
        n_prompts=lay.n_prompts,
        chunk_videos=lay.chunk_videos,
        text_written=bool(attrs.get("text_written", False)),
        recipe=attrs["recipe"],
        fingerprint=attrs["fingerprint"],
        schema_version=attrs["fsar_schema_version"],
        versions=attrs.get("versions", {}),
        size_bytes=store._arrays.size_bytes(),
    )


def format_summary(summary: StoreSummary, max_failures: int | None = None) -> str:
    """Readable text of a summary; lists every failure unless max_failures is given."""
    s = summary
    lines = [
        f"store       {s.path} ({s.backend}, {s.size_bytes / 2**20:.1f} MiB)",
        f"videos      {s.n_videos} in {s.n_classes} classes, {s.frames_cached} frames cached",
        f"dims        T_cap={s.t_cap}  D={s.feature_dim}  prompts={s.n_prompts}  "
        f"chunk={s.chunk_videos} videos",
        f"views       {', '.join(s.views)}",
        "layers      " + (", ".join(f"{k} (D={v})" for k, v in s.layer_dims.items()) or "-"),
        f"class text  {'written' if s.text_written else 'MISSING'}",
        f"fingerprint {s.fingerprint}",
        "",
        f"{'split':<8}{'listed':>9}{'found':>9}{'missing':>9}{'done':>9}{'failed':>9}"
        f"{'pending':>9}",
    ]
    for split, c in s.counts.items():
        listed = sum(c.values())
        lines.append(
            f"{split:<8}{listed:>9}{listed - c['missing']:>9}{c['missing']:>9}{c['done']:>9}"
            f"{c['failed']:>9}{c['pending']:>9}"
        )
    lines += ["", "recipe"] + [f"  {k}: {v}" for k, v in sorted(flatten_recipe(s.recipe).items())]
    lines.append("versions    " + ", ".join(f"{k} {v}" for k, v in s.versions.items()))
    if s.failures:
        shown = s.failures if max_failures is None else s.failures[:max_failures]
        lines += ["", f"failed videos ({len(s.failures)})"]
        lines += [f"  {vid}: {err}" for vid, err in shown]
        if len(shown) < len(s.failures):
            lines.append(f"  ... and {len(s.failures) - len(shown)} more")
    if s.missing:
        shown = s.missing if max_failures is None else s.missing[:max_failures]
        lines += ["", f"missing from the local copy ({len(s.missing)}; `fsar splits verify "
                  "--root` lists a split's missing files)"]  # fmt: skip
        lines += [f"  {vid}" for vid in shown]
        if len(shown) < len(s.missing):
            lines.append(f"  ... and {len(s.missing) - len(shown)} more")
    return "\n".join(lines)


def _spans(lay: StoreLayout) -> list[tuple[int, int]]:
    """Chunk-aligned spans of about READ_BYTES (as float32) of the widest per-video array."""
    per_video = 4 * lay.t_cap * max(lay.feature_dim, *lay.layer_dims.values(), 1)
    return merge_blocks(chunk_blocks(lay.n_videos, lay.chunk_videos), READ_BYTES // per_video)
