"""The extraction runner: dataset -> decode workers -> batched encoder -> chunk-aligned writes.

Resumable by construction: the store's chunk-aligned blocks are fixed up front, each block is
encoded as one unit (so a block's numbers do not depend on where a run started) and written
data-first, status-last. Under ``torchrun`` every rank takes a disjoint, deterministic share of
the pending blocks of the same store.
"""

from __future__ import annotations

import errno
import os
import queue
import shutil
import signal
import threading
import time
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from fsar.cache import StoreLayout, assign_blocks, create_store, export_hdf5, open_store
from fsar.cache.backends import write_error
from fsar.cache.integrity import blocks_missing_chunks
from fsar.cache.layout import MISSING_PREFIX, STATUS_FAILED
from fsar.cache.lock import StoreLockedError, remove_leftovers, writer_lock
from fsar.cache.store import check_matches
from fsar.config import Config, ConfigError
from fsar.data.datasets import dataset_from_config
from fsar.data.frames import parse_frame_policy
from fsar.data.transforms import parse_views
from fsar.devices import resolve_device
from fsar.errors import FsarError
from fsar.extract.decode import BlockDataset, DecodeDataset, VideoJob, collate_single
from fsar.extract.distributed import (
    DistContext,
    barrier,
    broadcast_from_rank0,
    init_distributed,
)
from fsar.extract.encoders import Encoder, EncoderSpec, build_encoder
from fsar.extract.prompts import encode_class_names, resolve_templates
from fsar.extract.recipe import build_recipe, effective_precision, preprocess_from_config
from fsar.interrupts import Interrupted, StopRequest, stop_on_signals


@dataclass
class ExtractResult:
    store: Path
    videos: int  # videos in the store (every listed video)
    done: int
    failed: int  # videos that could not be decoded (missing files not included)
    encoded_now: int  # videos encoded (now done) by this process in this run
    frames_now: int  # frames encoded by this process in this run
    seconds: float
    failures: list[tuple[str, str]] = field(default_factory=list)  # (video id, reason)
    rank: int = 0
    missing: int = 0  # listed videos without a file under --root
    failed_now: int = 0  # videos this process found undecodable in this run
    missing_now: int = 0  # videos this process found missing in this run
    missing_ids: list[str] = field(default_factory=list)
    counts: dict[str, dict[str, int]] = field(default_factory=dict)  # split -> status -> n


# failures of the environment while writing: reported in one line, resumable after the fix
WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}


@dataclass
class Tally:
    """What one process did in one run."""

    encoded: int = 0
    frames: int = 0
    failed: int = 0
    missing: int = 0


def encoder_spec(config: Config) -> EncoderSpec:
    m = config.model
    return EncoderSpec(m.name, m.pretrained, m.weights, m.checkpoint, m.random_init, m.quick_gelu)


def run_extraction(config: Config, progress: bool = True) -> ExtractResult:
    """Extract (or finish extracting) the store named by ``config.extract.out``."""
    ex = config.extract
    if not ex.out:
        raise ConfigError("extract.out is not set: pass --out STORE (e.g. stores/hmdb51_RN50.zarr)")
    if not config.dataset.root:
        raise ConfigError("dataset.root is not set: pass --root DIR (the local copy of the videos)")
    start_time = time.perf_counter()
    dist = init_distributed()
    out = Path(ex.out)
    work_path = staging_path(out) if ex.backend == "hdf5" else out
    # the lock comes first: a second writer is refused before it loads a model
    with stop_on_signals() as stop, sole_writer(out, work_path, dist):
        try:
            return _extract(config, dist, out, work_path, stop, progress, start_time)
        except OSError as err:  # creating the store, writing class text: the disk, not a bug
            if isinstance(err, FsarError) or err.errno not in WRITE_ERRNOS:
                raise
            raise write_error(out, err, f"writing {out} failed") from err


@contextmanager
def sole_writer(out: Path, work_path: Path, dist: DistContext):
    """Rank 0 holds the store's writer lock for the block (the job's other ranks share it) and
    removes what killed runs left behind; every rank raises StoreLockedError if it is held."""
    with ExitStack() as held:
        refusal = None
        if dist.rank == 0:
            try:
                held.enter_context(writer_lock(out))
            except StoreLockedError as err:
                refusal = str(err)
            else:
                remove_leftovers(out)
                remove_leftovers(work_path)
        refusal = broadcast_from_rank0(dist, refusal)
        if refusal:
            raise StoreLockedError(refusal)
        yield


def _extract(config, dist, out, work_path, stop: StopRequest, progress, start_time):
    ex = config.extract
    device = resolve_device(ex.device)
    if device.type == "cuda" and dist.world_size > 1:
        device = torch.device("cuda", dist.local_rank)

    dataset = dataset_from_config(config.dataset)
    policy = parse_frame_policy(
        ex.frames, seq_len=ex.seq_len, t_cap=ex.t_cap, min_frames=ex.min_frames
    )
    views = parse_views(ex.views)
    templates = resolve_templates(ex.prompts)
    encoder = build_encoder(encoder_spec(config), device=device, layers=ex.layers)
    preprocess = preprocess_from_config(config, encoder.image_size)
    layer_dims = probe_layer_dims(encoder, preprocess.crop)
    recipe = build_recipe(config, encoder, policy, views, preprocess, templates, layer_dims)
    layout = StoreLayout(
        video_ids=tuple(item.video_id for item in dataset.items),
        class_ids=tuple(item.class_id for item in dataset.items),
        splits=tuple(item.split for item in dataset.items),
        class_names=tuple(dataset.class_names),
        t_cap=policy.t_cap,
        feature_dim=encoder.embed_dim,
        views=views,
        layer_dims=layer_dims,
        n_prompts=len(templates),
        chunk_videos=ex.chunk_videos,
        feature_dtype=ex.feature_dtype,
    )

    stop.check()
    if ex.backend == "hdf5" and out.exists():  # exported by an earlier (perhaps killed) run
        return _already_exported(out, work_path, layout, recipe, dist, start_time)
    if dist.rank == 0:  # one process creates (or checks) the store, the others then open it
        store = create_store(work_path, layout, recipe, backend="zarr")
    barrier(dist)
    if dist.rank != 0:
        store = create_store(work_path, layout, recipe, backend="zarr")

    if dist.rank == 0 and not store.has_text:
        text = encode_class_names(encoder.model, encoder.tokenizer, dataset.class_names, templates)
        store.write_classes(text.mean(dim=1).numpy(), text.numpy())
    stop.check()

    if dist.rank == 0:  # a deleted data chunk of done videos: encode its block again
        for start, stop_row in blocks_missing_chunks(store):
            store.mark_pending(start, stop_row)
    barrier(dist)
    paths = {item.video_id: item.path for item in dataset.items}
    pending = blocks_to_do(store, paths, ex.retry_failed)
    # Every rank must split the same pending list: no rank writes before all have read it.
    barrier(dist)
    my_blocks = assign_blocks(pending, dist.rank, dist.world_size)
    status = np.asarray(store.status)
    block_jobs = [
        (
            block,
            [
                VideoJob(i, store.video_ids[i], _path_or_none(paths[store.video_ids[i]]))
                for i in range(block[0], block[1])
                if status[i] != 1
            ],
        )
        for block in my_blocks
    ]
    decode = DecodeDataset(
        [job for _, jobs in block_jobs for job in jobs],
        policy,
        views,
        preprocess,
        ex.seed,
        ex.decode_backend,
        ex.frame_listing,
    )
    precision = effective_precision(config, device)
    tally = encode_blocks(
        store, encoder, decode, block_jobs, views, ex, precision, progress and dist.rank == 0, stop
    )
    barrier(dist)

    final = store
    if dist.rank == 0 and ex.backend == "hdf5":
        export_hdf5(store, out, check=stop.check)
        shutil.rmtree(work_path)
        final = open_store(out)
    elif dist.rank == 0:
        final = open_store(out)
    barrier(dist)
    return _result(final, out, tally, time.perf_counter() - start_time, dist.rank)


def blocks_to_do(store, paths: dict, retry_failed: bool) -> list[tuple[int, int]]:
    """Blocks with pending videos (or failed ones when retry_failed), and blocks with a video
    recorded missing whose file has since appeared under --root."""
    todo = set(store.pending_blocks(retry_failed=retry_failed))
    status, errors = np.asarray(store.status), store.errors
    found_now = [
        i
        for i in np.flatnonzero(status == STATUS_FAILED)
        if errors[i].startswith(MISSING_PREFIX) and paths[store.video_ids[i]] is not None
    ]
    chunk = store.layout.chunk_videos
    for i in found_now:
        start = int(i) // chunk * chunk
        todo.add((start, min(start + chunk, store.layout.n_videos)))
    return sorted(todo)


def _already_exported(out, work_path, layout, recipe, dist, start_time) -> ExtractResult:
    """An HDF5 store is published whole: if it exists and matches this run, the work is done
    (a run killed after publishing may have left its Zarr staging store: removed here)."""
    final = check_matches(open_store(out), layout, recipe)
    if dist.rank == 0 and work_path.exists():
        shutil.rmtree(work_path)
    return _result(final, out, Tally(), time.perf_counter() - start_time, dist.rank)


def _result(final, out: Path, tally: Tally, seconds: float, rank: int) -> ExtractResult:
    summary = final.summary()
    return ExtractResult(
        store=out,
        videos=summary.n_videos,
        done=sum(c["done"] for c in summary.counts.values()),
        failed=len(summary.failures),
        missing=len(summary.missing),
        encoded_now=tally.encoded,
        frames_now=tally.frames,
        failed_now=tally.failed,
        missing_now=tally.missing,
        seconds=seconds,
        failures=list(summary.failures),
        missing_ids=list(summary.missing),
        counts=summary.counts,
        rank=rank,
    )


def staging_path(out: Path) -> Path:
    """HDF5 cannot take parallel or crash-safe writes: extract into Zarr beside it, then export."""
    return out.with_name(out.name + ".staging.zarr")


def _path_or_none(path) -> str | None:
    return None if path is None else str(path)


@torch.no_grad()
def probe_layer_dims(encoder: Encoder, crop: int) -> dict[str, int]:
    if not encoder.taps.names:
        return {}
    probe = torch.zeros(1, 3, crop, crop, device=encoder.device)
    encoder.model.encode_image(probe)
    return {name: int(value.shape[-1]) for name, value in encoder.taps.pop().items()}


def encode_blocks(
    store, encoder, decode, block_jobs, views, ex, precision: str, show: bool, stop: StopRequest
) -> Tally:
    """Decode blocks in workers, encode each block in the main process, write it in a thread.

    Three stages overlap: workers decode later blocks while the main process encodes this one
    and a writer thread stores the previous one (writes are fsync-bound, not CPU-bound). A stop
    request (SIGINT / SIGTERM) ends the loop after the current block: the blocks handed to the
    writer are written before ``Interrupted`` leaves, so a rerun resumes after them.
    """
    blocks = BlockDataset(decode, [len(jobs) for _, jobs in block_jobs])
    loader = DataLoader(
        blocks,
        batch_size=1,
        collate_fn=collate_single,
        num_workers=ex.workers,
        prefetch_factor=2 if ex.workers else None,
        worker_init_fn=_leave_signals_to_the_main_process,
    )
    bar = tqdm(total=len(decode), unit="video", disable=not show, desc="extract", smoothing=0.1)
    started = time.perf_counter()
    tally = Tally()
    try:
        with cpu_threads_beside_workers(encoder.device, ex.workers), BlockWriter(store) as writer:
            for (block, _), decoded in zip(block_jobs, loader, strict=True):
                rows, count, good = encode_block(
                    store, encoder, block, decoded, views, ex.batch_frames, precision
                )
                writer.put(block, rows)
                tally.frames += count
                tally.encoded += good
                missing = sum(v.error.startswith(MISSING_PREFIX) for v in decoded.videos)
                tally.missing += missing
                tally.failed += len(decoded.videos) - good - missing
                bar.update(len(decoded.videos))
                elapsed = max(time.perf_counter() - started, 1e-9)
                bar.set_postfix(
                    videos_s=f"{tally.encoded / elapsed:.1f}",
                    frames_s=f"{tally.frames / elapsed:.0f}",
                )
                stop.check(f"{tally.encoded} videos encoded in this run")
    except Interrupted:
        raise
    except Exception:
        stop.check()  # a worker ended by the same signal: report the stop, not the loader error
        raise
    finally:
        bar.close()
    return tally


def _leave_signals_to_the_main_process(_worker: int) -> None:
    """Ctrl-C reaches every process of the terminal and a scheduler's SIGTERM every process of
    the job. The main process decides when to stop: workers ignore SIGINT and leave quietly on
    SIGTERM (a worker killed by a signal makes torch raise from a signal handler, anywhere)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))


@contextmanager
def cpu_threads_beside_workers(device: torch.device, workers: int):
    """On CPU, leave the decode workers their cores: idle OpenMP threads of the main process
    spin and take CPU time from the workers (measured: 394 -> 439 frames/s on 2 cores)."""
    before = torch.get_num_threads()
    if device.type == "cpu" and workers > 0:
        torch.set_num_threads(max(1, min(before, (os.cpu_count() or 1) - workers)))
    try:
        yield
    finally:
        torch.set_num_threads(before)


class BlockWriter:
    """Writes finished blocks in order on one background thread (at most two waiting).

    Each block is still written data-first, status-last, so a kill at any moment leaves every
    block either done or pending, exactly as with synchronous writes. A failed write is raised
    in the main thread at the next ``put`` or on exit.
    """

    def __init__(self, store, depth: int = 2):
        self.store = store
        self.pending: queue.Queue = queue.Queue(maxsize=depth)
        self.error: BaseException | None = None
        self.failed_block: tuple[int, int] = (0, 0)
        self.thread = threading.Thread(target=self._run, name="fsar-block-writer", daemon=True)

    def __enter__(self) -> BlockWriter:
        self.thread.start()
        return self

    def put(self, block: tuple[int, int], rows) -> None:
        self._raise_if_failed()
        self.pending.put((block, rows))
        self._raise_if_failed()

    def __exit__(self, exc_type, exc, tb) -> None:
        self.pending.put(None)
        self.thread.join()
        if exc_type is None:
            self._raise_if_failed()

    def _raise_if_failed(self) -> None:
        if self.error is None:
            return
        start, stop = self.failed_block
        what = f"writing videos {start}..{stop - 1} of {self.store.path} failed"
        if isinstance(self.error, FsarError):  # already says what to do
            raise self.error
        if isinstance(self.error, OSError):  # disk full, permissions: the user's to fix
            raise write_error(self.store.path, self.error, what) from self.error
        raise RuntimeError(what) from self.error

    def _run(self) -> None:
        while (item := self.pending.get()) is not None:
            if self.error is not None:
                continue  # drain: the main thread stops at its next put
            (start, stop), rows = item
            try:
                self.store.write_block(
                    start,
                    stop,
                    features=rows.features,
                    layers=rows.layers,
                    frame_index=rows.frame_index,
                    n_frames=rows.n_frames,
                    status=rows.status,
                    errors=rows.errors,
                    source_length=rows.source_length,
                    fps=rows.fps,
                )
            except BaseException as error:  # handed to the main thread
                self.error, self.failed_block = error, (start, stop)


def encode_block(store, encoder, block, decoded, views, batch_frames: int, precision="fp32"):
    """Encode all views of the decoded videos of one block into the block's rows.

    Rows of the block not in ``decoded`` (already done) are read back and rewritten unchanged,
    so a done video is never re-encoded. Returns (rows, frames encoded, videos encoded).
    """
    start, stop = block
    already_done = bool((np.asarray(store.status[start:stop]) == 1).any())
    # A block with no done row may hold a torn write from a killed run: never read it back.
    rows = store.read_block(start, stop) if already_done else store.empty_block(start, stop)
    good = [video for video in decoded.videos if not video.error]
    for video in decoded.videos:
        if rows.source_length is not None:  # recorded for failed videos too (e.g. too short)
            rows.source_length[video.store_index - start] = video.source_length
            rows.fps[video.store_index - start] = video.fps
        if video.error:
            row = video.store_index - start
            rows.status[row], rows.errors[row] = 2, video.error
            rows.n_frames[row], rows.frame_index[row] = 0, -1
    if not good:
        return rows, 0, 0
    embeddings, taps = encode_images(
        encoder, decoded.pixels, batch_frames, precision, store.layout.feature_dtype
    )
    offset = 0
    for video in good:
        row = video.store_index - start
        count = len(video.frame_index)
        for view in views:
            rows.features[view][row] = 0
            rows.features[view][row, :count] = embeddings[offset : offset + count]
            for name, values in taps.items():
                rows.layers[view][name][row] = 0
                rows.layers[view][name][row, :count] = values[offset : offset + count]
            offset += count
        rows.frame_index[row] = -1
        rows.frame_index[row, :count] = video.frame_index
        rows.n_frames[row] = count
        rows.status[row], rows.errors[row] = 1, ""
    return rows, len(decoded.pixels), len(good)


AUTOCAST_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


@torch.no_grad()
def encode_images(
    encoder: Encoder,
    pixels: torch.Tensor,
    batch: int,
    precision: str = "fp32",
    feature_dtype: str = "float16",
):
    """``encode_image`` in batches, in float32 or under fp16 / bf16 autocast on GPU;
    ``feature_dtype`` numpy [N, D] plus {layer: [N, D_l]}."""
    device = encoder.device
    autocast = (
        torch.autocast("cuda", dtype=AUTOCAST_DTYPES[precision])
        if device.type == "cuda" and precision in AUTOCAST_DTYPES
        else nullcontext()
    )
    outputs, taps = [], {name: [] for name in encoder.taps.names}
    for begin in range(0, len(pixels), batch):
        chunk = pixels[begin : begin + batch].to(device, non_blocking=True)
        with autocast:
            outputs.append(encoder.model.encode_image(chunk).float().cpu())
        if taps:
            for name, value in encoder.taps.pop().items():
                taps[name].append(value.float().cpu())
    dtype = np.dtype(feature_dtype)
    embeddings = torch.cat(outputs).numpy().astype(dtype)
    return embeddings, {name: torch.cat(v).numpy().astype(dtype) for name, v in taps.items()}


__all__ = ["ExtractResult", "run_extraction", "staging_path", "DistContext"]
