"""``fsar finetune``: the full-backbone recipe, encoder and head trained together (SPEC 6).

One optimizer step = ``train.tasks_per_batch`` episodes (one global batch). Under ``torchrun``
each of the W ranks runs tasks_per_batch / W of them, ``finetune.episode_batch`` per forward,
accumulating gradients with DDP's all-reduce on the last micro-batch only; the loss of every
episode is scaled so that W ranks give the gradient one process gets accumulating all of them.
Episodes, frame jitter, crops, flips and dropout masks are all seeded by (train.seed, global task
index), so W ranks train on exactly the episodes one process would, and a killed run resumed
from ``last.pt`` continues exactly.

Checkpoints (rank 0, atomic) are fsar head checkpoints that also hold the encoder (``visual``):
``fsar eval --decode`` scores them on decoded videos, ``fsar extract --checkpoint`` re-encodes a
dataset with the encoder so that ``fsar eval`` scores them on the store.
"""

from __future__ import annotations

import signal
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from fsar.config import Config, ConfigError, config_from_record
from fsar.data.datasets import dataset_from_config
from fsar.data.frames import FramePolicy, parse_frame_policy
from fsar.data.transforms import Preprocess
from fsar.devices import autocast_for, resolve_device
from fsar.errors import FsarError
from fsar.extract.distributed import init_distributed
from fsar.extract.encoders import EncoderSpec, build_encoder, weights_id
from fsar.extract.layers import LayerTaps
from fsar.extract.prompts import encode_class_names, resolve_templates
from fsar.extract.recipe import preprocess_from_config
from fsar.extract.runner import cpu_threads_beside_workers, encoder_spec
from fsar.heads import episode_loss
from fsar.pipelines.backbone import VideoModel, enable_grad_checkpointing, freeze_first_blocks
from fsar.pipelines.build import aux_weights, build_head, class_id_inputs, training_inputs
from fsar.pipelines.checkpoint import encoder_recipe
from fsar.pipelines.clips import (
    TrainEpisodes,
    collate_episodes,
    task_seed,
    video_split,
)
from fsar.pipelines.e2e_eval import evaluate_cached, evaluate_decoded
from fsar.pipelines.frame_plan import resolve_rule
from fsar.pipelines.loop import (
    Ranks,
    TrainingJob,
    TrainResult,
    micro_totals,
    open_run,
    run_record,
    run_steps,
    selection_episodes,
    train_sampler,
)
from fsar.pipelines.run_checkpoints import FINETUNE_COMPARED

REGIME = "e2e"


class FinetuneOutOfMemory(FsarError, RuntimeError):
    """The device ran out of memory; the message lists the settings that lower memory."""


@dataclass
class Setup:
    """Everything built from the config before the loop (shared with ``fsar eval --decode``)."""

    model: VideoModel
    class_text: torch.Tensor  # float32 [C, D] on the device, mean over prompt templates
    prep: Preprocess
    policy: FramePolicy  # test frames (reference_test over the source video)
    spec: EncoderSpec
    encoder_record: dict[str, Any]
    layer_dims: dict[str, int]


def evaluation_policy(config: Config) -> FramePolicy:
    ex = config.extract
    return parse_frame_policy("reference_test", seq_len=ex.seq_len, min_frames=ex.min_frames)


def dense_policy(config: Config) -> FramePolicy:
    """Every source frame: what a release test rule redrawn per episode reads (as a dense
    store caches it); ``extract.frames`` when it is a dense policy."""
    ex = config.extract
    spec = ex.frames if ex.frames.split(":")[0] == "dense" else "dense"
    return parse_frame_policy(spec, seq_len=ex.seq_len, t_cap=ex.t_cap, min_frames=ex.min_frames)


def test_frame_options(config: Config) -> dict[str, Any]:
    """The evaluation-frame keywords of ``evaluate_cached`` / ``evaluate_decoded``."""
    return {
        "test_frames": config.protocol.test_frames,
        "seed": config.eval.seed,
        "dataset": config.dataset.name,
        "dense": dense_policy(config),
    }


def build_video_model(
    config: Config, class_names, device: torch.device, num_train_classes: int | None = None
) -> Setup:
    """The open_clip encoder (weights as ``fsar extract`` loads them) + a fresh head.

    The class text is encoded once with the (frozen) text tower, which is then dropped: the
    store's ``classes/text`` is computed the same way, so re-extracted stores match.
    """
    ex = config.extract
    spec = encoder_spec(config)
    encoder = build_encoder(spec, device=device)
    templates = resolve_templates(ex.prompts)
    with torch.no_grad():
        class_text = encode_class_names(encoder.model, encoder.tokenizer, class_names, templates)
    class_text = class_text.mean(dim=1).to(device)
    visual = encoder.model.visual
    prep = preprocess_from_config(config, encoder.image_size)
    shallow = training_inputs(config.head).layer
    layer_dims = probe_layer_dims(visual, shallow, prep.crop, device)
    torch.manual_seed(config.train.seed)  # the head's initial weights
    head = build_head(config.head, encoder.embed_dim, layer_dims, num_train_classes)
    model = VideoModel(visual, head, prep, shallow).to(device)
    record = {
        "model": spec.model,
        "pretrained": spec.pretrained,
        "weights": spec.weights,
        "initial_weights": encoder.weights_id,
        # what a re-extraction's text encoder must come from (the checkpoint holds the visual)
        "text_weights": weights_id(EncoderSpec(spec.model, spec.pretrained, spec.weights)),
        "quick_gelu": encoder.quick_gelu,
        "image_size": encoder.image_size,
        **prep.recipe(),
        "frame_listing": ex.frame_listing,
    }
    return Setup(model, class_text, prep, evaluation_policy(config), spec, record, layer_dims)


def load_video_model(payload: dict[str, Any], class_names, device: torch.device) -> Setup:
    """The encoder and head of a finetune checkpoint, rebuilt as the run built them."""
    config = config_from_record(payload)
    # the encoder's weights come from the checkpoint: skip the run's initial visual weights
    config = replace(config, model=replace(config.model, checkpoint=None))
    setup = build_video_model(config, class_names, device, payload.get("num_train_classes"))
    if setup.encoder_record["text_weights"] != payload["encoder"]["text_weights"]:
        raise ConfigError(
            f"the text encoder now resolves to {setup.encoder_record['text_weights']}, the run "
            f"used {payload['encoder']['text_weights']}: restore the run's model.weights file"
        )
    setup.model.visual.load_state_dict(payload["visual"])
    setup.model.head.load_state_dict(payload["head"])
    return setup


@torch.no_grad()
def probe_layer_dims(visual, layer: str | None, crop: int, device) -> dict[str, int]:
    if layer is None:
        return {}
    taps = LayerTaps(visual, [layer])
    visual(torch.zeros(1, 3, crop, crop, device=device))
    dims = {name: int(value.shape[-1]) for name, value in taps.pop().items()}
    taps.remove()
    return dims


def finetune(config: Config, progress: bool = True) -> TrainResult:
    """Fine-tune (or resume fine-tuning) the encoder and head of ``config``."""
    tr, ft, ex = config.train, config.finetune, config.extract
    if not config.dataset.root:
        raise ConfigError("dataset.root is not set: pass --root DIR (the local copy of the videos)")
    if not tr.out:
        raise ConfigError("train.out is not set: pass --out RUN_DIR")
    dist = init_distributed()
    local_tasks = tasks_per_rank(tr.tasks_per_batch, dist.world_size, ft.episode_batch)
    device = resolve_device(tr.device)
    if device.type == "cuda" and dist.world_size > 1:
        device = torch.device("cuda", dist.local_rank)
    out = Path(tr.out)
    selection = config.protocol.selection_split
    dataset = dataset_from_config(config.dataset, sorted({"train", selection}))
    listing = config.extract.frame_listing
    train_videos = video_split(dataset, "train", listing)
    select_videos = video_split(dataset, selection, listing)
    sampler = train_sampler(train_videos, config)
    select_episodes = selection_episodes(select_videos, config)
    train_classes = torch.unique(train_videos.class_ids)
    setup = build_video_model(config, dataset.class_names, device, len(train_classes))
    model = setup.model
    frozen = freeze_first_blocks(model.visual, ft.freeze_blocks)
    if ft.grad_checkpointing:
        enable_grad_checkpointing(model.visual)
    optimizer = build_optimizer(model, config)
    record = run_record(
        config, int(setup.class_text.shape[-1]), setup.layer_dims, train_videos, select_episodes,
        store_record(config, setup, dataset), regime=REGIME, encoder=setup.encoder_record,
        frozen_parameters=len(frozen), world_size=dist.world_size,
    )  # fmt: skip
    record["selection"]["validation"] = config.finetune.validation
    ranks = Ranks(dist, device)

    def restore(payload: dict[str, Any]) -> None:
        if payload["world_size"] != record["world_size"] and ranks.writer:
            print(
                f"note: {out / 'last.pt'} was written by {payload['world_size']} process(es), "
                f"this run has {record['world_size']}: the episodes are the same, float sums "
                "may differ slightly"
            )
        model.visual.load_state_dict(payload["visual"])
        model.head.load_state_dict(payload["head"])
        optimizer.load_state_dict(payload["optimizer"])

    state = open_run(out, tr.resume, record, FINETUNE_COMPARED, restore, ranks)
    trained = model
    if dist.world_size > 1:
        trained = DistributedDataParallel(
            model,
            device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=True,  # heads skip some parameters on some episodes
        )
        ranks = replace(ranks, no_sync=trained.no_sync)
    flip = ft.flip if ft.flip is not None else not config.dataset.name.startswith("ssv2")
    train_rule = resolve_rule(config.protocol.train_frames, config.dataset.name)
    episodes = TrainEpisodes(
        train_videos,
        sampler,
        tr.seed,
        ex.seq_len,
        setup.prep,
        flip,
        ex.decode_backend,
        rule=train_rule,
        k100_queries=train_rule == "clipfsar_k100_train",
    )
    my_tasks = [
        step * tr.tasks_per_batch + dist.rank * local_tasks + i
        for step in range(state.step, tr.steps)
        for i in range(local_tasks)
    ]
    loader = DataLoader(
        episodes,
        batch_size=ft.episode_batch,
        sampler=my_tasks,
        num_workers=ft.workers,
        collate_fn=collate_episodes,
        prefetch_factor=ft.prefetch if ft.workers else None,
        pin_memory=device.type == "cuda",
        worker_init_fn=ignore_interrupts_in_worker,
    )
    batches = iter(loader)

    def micro_batch() -> torch.Tensor:
        try:
            return train_micro_batch(
                trained, next(batches), setup.class_text, train_classes, config, device,
                scale=ft.episode_batch / local_tasks,
            )  # fmt: skip
        except RuntimeError as err:  # torch.OutOfMemoryError is one
            if not is_out_of_memory(err):
                raise
            raise FinetuneOutOfMemory(oom_message(config, device)) from err

    job = TrainingJob(
        config,
        trained,
        optimizer,
        local_tasks // ft.episode_batch,
        micro_batch,
        lambda: validate(model, setup, select_videos, select_episodes, config, progress),
        lambda: {
            "visual": model.visual.state_dict(),
            "head": model.head.state_dict(),
            "optimizer": optimizer.state_dict(),
        },
        record,
        lower="train.lr or finetune.backbone_lr",
        device=device,
        desc="finetune",
        ranks=ranks,
    )
    with cpu_threads_beside_workers(device, ft.workers):
        return run_steps(job, state, progress)


def tasks_per_rank(tasks_per_batch: int, world_size: int, episode_batch: int) -> int:
    if tasks_per_batch % world_size:
        raise ConfigError(
            f"train.tasks_per_batch ({tasks_per_batch}) must be a multiple of the number of "
            f"processes ({world_size}): each rank runs an equal share of the global batch"
        )
    local = tasks_per_batch // world_size
    if local % episode_batch:
        raise ConfigError(
            f"each of the {world_size} process(es) runs {local} episodes per step, not a "
            f"multiple of finetune.episode_batch ({episode_batch}): change one of them"
        )
    return local


def train_micro_batch(
    model, batch, class_text, train_classes, config: Config, device, scale: float
) -> torch.Tensor:
    """Forward + backward of one micro-batch; returns (loss * episodes, correct, queries)."""
    index = batch.episodes.to(device)
    extras = {"query_labels": index.query_labels}
    extras |= class_id_inputs(
        config.head,
        class_text,
        train_classes,
        index.classes.gather(1, index.support_labels),
        index.classes.gather(1, index.query_labels),
    )
    # dropout masks follow the task, not the rank or the resume point
    torch.manual_seed(task_seed(config.train.seed, batch.tasks[0], stream=1))
    with autocast_for(device, config.train.bf16):
        output = model(
            batch.support.to(device, non_blocking=True),
            index.support_labels,
            batch.query.to(device, non_blocking=True),
            class_text[index.classes],
            **extras,
        )
    # a non-finite loss is caught by the loop on the step's sum over ranks (all ranks stop)
    loss = episode_loss(output, index.query_labels, aux_weights(config.head, set(output.aux)))
    (loss * scale).backward()
    return micro_totals(output, index.query_labels, loss, len(batch.tasks))


def build_optimizer(model: VideoModel, config: Config) -> torch.optim.Optimizer:
    """One Adam; the encoder gets its own learning rate when finetune.backbone_lr is set."""
    tr, ft = config.train, config.finetune
    visual = [p for p in model.visual.parameters() if p.requires_grad]
    head = [p for p in model.head.parameters() if p.requires_grad]
    if ft.backbone_lr is None:
        groups = [{"params": visual + head}]
    else:
        groups = [{"params": visual, "lr": ft.backbone_lr}, {"params": head}]
    groups = [group for group in groups if group["params"]]
    if not groups:
        raise ConfigError("nothing to train: every encoder block is frozen and the head has none")
    return torch.optim.Adam(groups, lr=tr.lr, betas=tuple(tr.betas), weight_decay=tr.weight_decay)


def is_out_of_memory(error: BaseException) -> bool:
    """CUDA's OutOfMemoryError, or the CPU allocator's failure."""
    return isinstance(error, torch.OutOfMemoryError) or "can't allocate memory" in str(error)


def oom_message(config: Config, device: torch.device) -> str:
    tr, ft = config.train, config.finetune
    peak = ""
    if device.type == "cuda":
        peak = f" (peak {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB allocated)"
    tips = []
    if ft.episode_batch > 1:
        tips.append(f"finetune.episode_batch={ft.episode_batch // 2} (now {ft.episode_batch})")
    if not ft.grad_checkpointing:
        tips.append("finetune.grad_checkpointing=true")
    tips.append(f"finetune.freeze_blocks={ft.freeze_blocks + 2} (now {ft.freeze_blocks})")
    if device.type == "cuda" and not tr.bf16:
        tips.append("train.bf16=true")
    return (
        f"out of memory on {device}{peak} with {config.episodes.way}-way "
        f"{config.protocol.train_shot or config.episodes.shot}-shot "
        f"{config.protocol.train_query}-query episodes, {ft.episode_batch} per forward pass. "
        f"Lower memory with: {', '.join(tips)}. train.tasks_per_batch does not change memory "
        "(episodes are accumulated); last.pt holds the last saved state."
    )


def validate(model, setup, videos, episodes, config: Config, progress: bool):
    """Score the selection episodes with the encoder as it is now (cached or decoded)."""
    ft = config.finetune
    score = evaluate_cached if ft.validation == "cached" else evaluate_decoded
    kwargs = {"head_config": config.head} if ft.validation == "cached" else {}
    return score(
        model,
        videos,
        episodes,
        setup.class_text,
        setup.policy,
        setup.prep,
        workers=ft.workers,
        bf16=config.train.bf16,
        backend=config.extract.decode_backend,
        progress=progress,
        **test_frame_options(config),
        **kwargs,
    )


def ignore_interrupts_in_worker(_worker_id: int) -> None:
    """Decode workers leave Ctrl-C (sent to the whole process group) to the main process,
    which stops at its next safe point and then shuts them down."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def store_record(config: Config, setup: Setup, dataset) -> dict[str, Any]:
    """The run record's account of the store a re-extraction with this checkpoint gives: its
    ``weights`` depend on the checkpoint file's hash, so ``check_store_fits`` completes them."""
    return {
        "path": None,
        "fingerprint": None,
        "dataset": config.dataset.name,
        "variant": dataset.variant,
        "encoder": {**encoder_recipe(setup.encoder_record), "weights": None},
        "frames": "reference_test",
        "seq_len": config.extract.seq_len,
    }
