"""What a store must satisfy before its numbers are used: the checks of ``fsar cache verify`` and
the cheaper ones every ``FeatureBank`` load runs on the rows it loads.

A damaged store must never become a number. Three kinds of damage are looked for:
- a chunk file that is gone (Zarr reads it back as the fill value: zeros, "pending", class 0),
  found by asking the backend which chunks of the rows exist (fsar writes every chunk, so a
  written row always has its chunk file);
- a chunk that cannot be decoded (checksum, truncation): the backend raises ``StoreReadError``
  naming the array and chunk;
- values that cannot be right: non-finite or all-zero frames of done videos, frame counts
  outside 1..T_cap, class ids or splits outside their ranges.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from fsar.cache.backends import StoreReadError, verify_hint
from fsar.cache.layout import (
    SPLITS,
    STATUS_DONE,
    STATUS_FAILED,
    STATUS_PENDING,
    array_specs,
)
from fsar.errors import FsarError

if TYPE_CHECKING:
    from fsar.cache.store import FeatureStore

STATUS_VALUES = (STATUS_PENDING, STATUS_DONE, STATUS_FAILED)
# Bytes (as float32) of rows per step of the non-finite check: bounds its temporaries by bytes,
# so that long dense rows (T_cap x D) do not take gigabytes.
FINITE_BYTES = 64 * 2**20


class DamagedStoreError(FsarError, ValueError):
    """Rows that were asked for are missing or hold values that cannot be right."""


def name_some(ids: Sequence[str], limit: int = 5) -> str:
    more = f" and {len(ids) - limit} more" if len(ids) > limit else ""
    return ", ".join(repr(v) for v in ids[:limit]) + more


def _ranges(ranges: list[tuple[int, int]]) -> str:
    shown = ", ".join(f"{a}..{b - 1}" for a, b in ranges[:4])
    return shown + (f" and {len(ranges) - 4} more" if len(ranges) > 4 else "")


# ------------------------------------------------------------------------ checks of a load
def require_whole(store: FeatureStore, name: str) -> None:
    """Raise StoreReadError when a chunk of a whole array written at creation is missing."""
    missing = store._arrays.missing_chunks(name)
    if missing:
        raise StoreReadError(
            f"{store.path}: {name} has missing chunk(s) (rows {_ranges(missing)}; deleted?); "
            f"the store is damaged: {verify_hint(store.path)}"
        )


def checked_status(store: FeatureStore) -> np.ndarray:
    """videos/status, refusing missing chunks and values other than 0, 1, 2 (uint8 [N])."""
    missing = store._arrays.missing_chunks("videos/status")
    if missing:
        raise StoreReadError(
            f"{store.path}: videos/status has missing chunk(s) (videos {_ranges(missing)}; "
            "deleted?), so whether those videos are extracted is unknown: rerun the same "
            f"`fsar extract` command to redo them; {verify_hint(store.path)}"
        )
    status = store._arrays.read("videos/status")
    bad = ~np.isin(status, STATUS_VALUES)
    if bad.any():
        ids = [store.video_ids[i] for i in np.flatnonzero(bad)]
        raise DamagedStoreError(
            f"{store.path}: videos/status holds values other than 0/1/2 for {name_some(ids)}; "
            f"the store is damaged: {verify_hint(store.path)}"
        )
    return status.astype(np.uint8)


def require_rows(store: FeatureStore, names: Sequence[str], rows: np.ndarray, what: str) -> None:
    """Every chunk holding ``rows`` of each array in ``names`` exists on disk."""
    for name in names:
        missing = store._arrays.missing_chunks(name, rows)
        if missing:
            hit = [i for i in rows if any(a <= i < b for a, b in missing)]
            ids = [store.video_ids[i] for i in hit]
            raise DamagedStoreError(
                f"{store.path}: {name} chunk(s) of {len(ids)} done {what} video(s) are missing "
                f"(videos {_ranges(missing)}; deleted?): {name_some(ids)}; refusing to load "
                f"them: rerun the same `fsar extract` command to re-encode them; "
                f"{verify_hint(store.path)}"
            )


def require_finite(store: FeatureStore, name: str, values, rows: np.ndarray, what: str) -> None:
    """``values`` (numpy or torch, [n, ...], row i = store row rows[i]) are all finite."""
    bad: list[int] = []
    row_elements = int(np.prod(values.shape[1:]))
    step = max(1, FINITE_BYTES // (4 * max(1, row_elements)))
    for begin in range(0, len(values), step):
        part = values[begin : begin + step]
        finite = _isfinite(part).reshape(len(part), -1).all(1)
        bad += [begin + int(i) for i in np.flatnonzero(~np.asarray(_to_numpy(finite)))]
    if bad:
        ids = [store.video_ids[rows[i]] for i in bad]
        raise DamagedStoreError(
            f"{store.path}: {name} holds non-finite values in {len(ids)} done {what} video(s): "
            f"{name_some(ids)}; refusing to load them: {verify_hint(store.path)}"
        )


def _isfinite(values):
    if isinstance(values, np.ndarray):
        return np.isfinite(values)
    import torch

    if values.device.type == "cpu" and values.dtype != torch.bfloat16:
        # numpy's check of a CPU tensor's memory: about 3.5x torch.isfinite for float16 on CPU
        return np.isfinite(values.numpy())
    return torch.isfinite(values)


def _to_numpy(values) -> np.ndarray:
    return values if isinstance(values, np.ndarray) else values.cpu().numpy()


def require_frame_counts(store: FeatureStore, n_frames: np.ndarray, rows: np.ndarray, what: str):
    bad = np.flatnonzero((n_frames < 1) | (n_frames > store.layout.t_cap))
    if bad.size:
        ids = [store.video_ids[rows[i]] for i in bad]
        raise DamagedStoreError(
            f"{store.path}: videos/n_frames lies outside 1..T_cap={store.layout.t_cap} for "
            f"{len(ids)} done {what} video(s): {name_some(ids)}; {verify_hint(store.path)}"
        )


def blocks_missing_chunks(store: FeatureStore) -> list[tuple[int, int]]:
    """Blocks holding done videos whose data chunk files are gone (to be re-encoded)."""
    lay, arrays = store.layout, store._arrays
    done = np.flatnonzero(store.status == STATUS_DONE)
    names = ["videos/n_frames", "videos/frame_index", *(f"features/{v}" for v in lay.views)]
    names += [f"layers/{v}/{k}" for v in lay.views for k in lay.layer_dims]
    damaged = {block for name in names for block in arrays.missing_chunks(name, done)}
    return sorted(damaged)


# ------------------------------------------------------------------------ fsar cache verify
def verify_store(store: FeatureStore, spans: list[tuple[int, int]]) -> list[str]:
    """Problems found by reading every array of ``store`` (empty list = complete and sound).

    spans: chunk-aligned row ranges read per step (bounded memory on large stores).
    """
    lay, arrays = store.layout, store._arrays
    problems = []
    for spec in array_specs(lay):
        if not arrays.has(spec.name):
            problems.append(f"array {spec.name} is missing")
        elif (arrays.shape(spec.name), arrays.dtype(spec.name)) != (spec.shape, spec.dtype):
            problems.append(
                f"array {spec.name} is {arrays.dtype(spec.name)} "
                f"{arrays.shape(spec.name)}; expected {spec.dtype} {spec.shape}"
            )
    if problems:
        return problems
    problems += _identity_problems(store)
    status, status_problems = _read_status(store)
    problems += status_problems
    done = status == STATUS_DONE
    per_video = ["videos/n_frames", "videos/frame_index"]
    per_video += [f"features/{v}" for v in lay.views]
    per_video += [f"layers/{v}/{k}" for v in lay.views for k in lay.layer_dims]
    for name in per_video:
        missing = arrays.missing_chunks(name, np.flatnonzero(done))
        if missing:
            problems.append(f"{name}: chunk(s) of done videos missing (videos {_ranges(missing)})")
    bad: dict[str, list[str]] = {}
    for start, stop in spans:
        try:
            _merge(bad, _check_rows(store, status, start, stop))
            continue
        except Exception:  # noqa: BLE001 - a damaged chunk in this span: find it block by block
            pass
        for b_start, b_stop in store.blocks():
            if not start <= b_start < stop:
                continue
            try:
                _merge(bad, _check_rows(store, status, b_start, b_stop))
            except Exception as exc:  # noqa: BLE001 - a damaged chunk is a finding
                reason = exc.__cause__ if exc.__cause__ is not None else exc
                problems.append(f"videos {b_start}..{b_stop - 1}: unreadable chunk ({reason!r})")
    problems += [f"{len(ids)} {what}: {name_some(ids)}" for what, ids in bad.items()]
    n_pending = int(np.sum(status == STATUS_PENDING))
    if n_pending:
        problems.append(
            f"{n_pending} videos still pending (extraction unfinished): "
            f"{name_some([lay.video_ids[i] for i in np.flatnonzero(status == 0)])}"
        )
    problems += _class_text_problems(store)
    return problems


def _identity_problems(store: FeatureStore) -> list[str]:
    """videos/id, class_id, split and classes/name: present, readable and in range."""
    lay, arrays, problems = store.layout, store._arrays, []
    for name in ("videos/id", "videos/class_id", "videos/split", "classes/name"):
        missing = arrays.missing_chunks(name)
        if missing:
            problems.append(f"{name}: chunk(s) missing (rows {_ranges(missing)})")
    ids = np.asarray(lay.video_ids, dtype=object)
    empty = [str(i) for i in np.flatnonzero(ids == "")]
    if empty:
        problems.append(f"{len(empty)} videos without an id (rows {', '.join(empty[:5])})")
    if len(set(lay.video_ids)) != len(lay.video_ids):
        problems.append("videos/id holds duplicate ids")
    class_ids = np.asarray(lay.class_ids)
    out = (class_ids < 0) | (class_ids >= lay.n_classes)
    if out.any():
        problems.append(
            f"{int(out.sum())} videos with class_id outside 0..{lay.n_classes - 1}: "
            f"{name_some(list(ids[out]))}"
        )
    splits = np.asarray(lay.splits, dtype=object)
    unknown = ~np.isin(splits, SPLITS)
    if unknown.any():
        problems.append(
            f"{int(unknown.sum())} videos with a split other than {SPLITS}: "
            f"{name_some(list(ids[unknown]))}"
        )
    if "" in lay.class_names or len(set(lay.class_names)) != lay.n_classes:
        problems.append("classes/name holds empty or duplicate class names")
    return problems


def _read_status(store: FeatureStore) -> tuple[np.ndarray, list[str]]:
    """Status read block by block; a missing or unreadable chunk is a problem (read as pending)."""
    arrays, problems = store._arrays, []
    status = np.zeros(store.layout.n_videos, dtype=np.uint8)
    missing = arrays.missing_chunks("videos/status")
    if missing:
        problems.append(f"videos/status: chunk(s) missing (videos {_ranges(missing)})")
    for start, stop in store.blocks():
        try:
            status[start:stop] = arrays.read("videos/status", slice(start, stop))
        except StoreReadError as exc:
            problems.append(f"videos {start}..{stop - 1}: unreadable chunk ({exc.__cause__!r})")
    bad = ~np.isin(status, STATUS_VALUES)
    if bad.any():
        problems.append(
            f"{int(bad.sum())} videos with status outside 0/1/2: "
            f"{name_some([store.video_ids[i] for i in np.flatnonzero(bad)])}"
        )
        status[bad] = STATUS_PENDING
    return status, problems


def _class_text_problems(store: FeatureStore) -> list[str]:
    if not store.has_text:
        return ["class text embeddings (classes/text) were never written"]
    problems = []
    for name in ("text", "text_per_prompt"):
        if store._arrays.missing_chunks(f"classes/{name}"):
            problems.append(f"classes/{name}: chunk missing")
            continue
        try:
            x = store._arrays.read(f"classes/{name}")
        except StoreReadError as exc:
            problems.append(f"classes/{name}: unreadable chunk ({exc.__cause__!r})")
            continue
        if not np.isfinite(x).all():
            problems.append(f"classes/{name} holds non-finite values")
        if np.any((x == 0).all(axis=-1)):
            problems.append(f"classes/{name} holds all-zero class embeddings")
    return problems


def _merge(into: dict[str, list[str]], found: dict[str, list[str]]) -> None:
    for what, ids in found.items():
        into.setdefault(what, []).extend(ids)


def _check_rows(store: FeatureStore, status: np.ndarray, start: int, stop: int) -> dict:
    """Ids of videos start..stop-1 failing each check: {check description: [ids]}."""
    bad: dict[str, list[str]] = {}
    lay, arrays, rows = store.layout, store._arrays, slice(start, stop)
    done = status[rows] == STATUS_DONE
    nf = arrays.read("videos/n_frames", rows)
    fi = arrays.read("videos/frame_index", rows)
    err = arrays.read("videos/error", rows)
    ids = np.asarray(lay.video_ids[start:stop], dtype=object)
    valid = np.arange(lay.t_cap)[None, :] < nf[:, None]  # [B, T]
    _flag(bad, "done videos with n_frames outside 1..T_cap",
          ids[done & ((nf < 1) | (nf > lay.t_cap))])  # fmt: skip
    _flag(bad, "done videos whose frame_index disagrees with n_frames",
          ids[done & np.any(valid != (fi >= 0), axis=1)])  # fmt: skip
    _flag(bad, "failed videos without an error message",
          ids[(status[rows] == STATUS_FAILED) & (err == "")])  # fmt: skip
    names = [f"features/{v}" for v in lay.views]
    names += [f"layers/{v}/{k}" for v in lay.views for k in lay.layer_dims]
    for name in names:
        x = arrays.read(name, rows).astype(np.float32)  # [B, T, D]
        nonfinite = ~np.isfinite(x).all(axis=2) & valid
        zero = (x == 0).all(axis=2) & valid
        _flag(bad, f"done videos with non-finite {name}", ids[done & nonfinite.any(1)])
        _flag(bad, f"done videos with all-zero frames in {name}", ids[done & zero.any(1)])
    return bad


def _flag(bad: dict[str, list[str]], what: str, ids: np.ndarray) -> None:
    if len(ids):
        bad.setdefault(what, []).extend(str(v) for v in ids)
