"""``fsar train``: episodic training of a head on a feature store (SPEC 6).

One optimizer step = ``tasks_per_batch`` episodes, run ``episode_batch`` at a time (true
batching) with gradient accumulation in between. Validation runs every ``val_every`` steps on a
fixed episode list of ``protocol.selection_split``; ``last.pt`` is written then and ``best.pt``
when the validation accuracy improves. Every random state lives in the checkpoint, so a run
killed at any moment and restarted with the same command ends with the same weights as an
uninterrupted one (bitwise on CPU). This module builds the head, the episodes and the
validation; ``fsar.pipelines.loop`` runs the steps (resume, divergence checks, signals, saving)
as it does for ``fsar finetune``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from fsar.cache import open_store
from fsar.cache.bank import FeatureBank, load_bank
from fsar.config import Config, ConfigError, check_head_batching
from fsar.devices import autocast_for, resolve_device
from fsar.heads import episode_loss
from fsar.pipelines.build import aux_weights, build_head, episode_tensors, training_inputs
from fsar.pipelines.checkpoint import encoder_recipe
from fsar.pipelines.compiled import step_head
from fsar.pipelines.episodes import train_positions
from fsar.pipelines.evaluate import EvalSetup, evaluate_episodes
from fsar.pipelines.frame_plan import (
    check_store_frames,
    resolve_rule,
    store_frames,
    training_positions,
)
from fsar.pipelines.loop import (
    TrainingDiverged,
    TrainingJob,
    TrainResult,
    micro_totals,
    open_run,
    run_record,
    run_steps,
    selection_episodes,
    train_sampler,
)
from fsar.pipelines.run_checkpoints import TRAIN_COMPARED

__all__ = ["TrainResult", "TrainingDiverged", "train_heads"]


def train_heads(config: Config, progress: bool = True) -> TrainResult:
    """Train (or resume training) ``config.head`` on ``config.train.store``."""
    tr = config.train
    check_head_batching(config)
    if not tr.store:
        raise ConfigError("train.store is not set: pass --store STORE (from fsar extract)")
    if not tr.out:
        raise ConfigError("train.out is not set: pass --out RUN_DIR")
    device = resolve_device(tr.device)
    store = open_store(Path(tr.store))
    seq_len = int(store.recipe["seq_len"])
    dataset = store.recipe.get("dataset")
    check_protocol_frames(config.protocol, store, dataset)
    layer = training_inputs(config.head).layer
    layers = [layer] if layer else []
    train_bank = load_bank(store, "train", device, config.protocol.train_views, layers)
    select_bank = load_bank(store, config.protocol.selection_split, device, ["center"], layers)
    sampler = train_sampler(train_bank, config)
    select = EvalSetup(
        select_bank,
        selection_episodes(select_bank, config),
        seq_len,
        config.protocol.test_frames,
        config.eval.seed,
        dataset,
    )
    train_rule = resolve_rule(config.protocol.train_frames, dataset)
    torch.manual_seed(tr.seed)
    train_classes = torch.unique(train_bank.class_ids)
    head = build_head(
        config.head, train_bank.feature_dim, train_bank.layer_dims, len(train_classes)
    ).to(device)
    model = step_head(head, config.train.compile)  # the head, or its compiled step
    params = [p for p in head.parameters() if p.requires_grad]
    optimizer = (
        torch.optim.Adam(params, lr=tr.lr, betas=tuple(tr.betas), weight_decay=tr.weight_decay)
        if params
        else None
    )
    generator = torch.Generator().manual_seed(tr.seed)
    record = run_record(
        config, train_bank.feature_dim, train_bank.layer_dims, train_bank, select.episodes,
        store_record(config, store),
    )  # fmt: skip

    def restore(payload: dict[str, Any]) -> None:
        """Weights, optimizer and every random state of a last.pt, for an exact resume."""
        head.load_state_dict(payload["head"])
        if optimizer is not None:
            optimizer.load_state_dict(payload["optimizer"])
        generator.set_state(payload["rng"]["generator"])
        torch.set_rng_state(payload["rng"]["torch"])
        if "cuda" in payload["rng"] and device.type == "cuda":
            torch.cuda.set_rng_state_all(payload["rng"]["cuda"])

    def state_dicts() -> dict[str, Any]:
        rng = {"torch": torch.get_rng_state(), "generator": generator.get_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        optimizer_state = optimizer.state_dict() if optimizer is not None else {}
        return {"head": head.state_dict(), "optimizer": optimizer_state, "rng": rng}

    def micro_batch() -> torch.Tensor:
        episodes = sampler.sample(tr.episode_batch, generator)
        positions, views = jitter_used_videos(train_bank, episodes, seq_len, generator, train_rule)
        batch = episode_tensors(
            train_bank, episodes, positions, views.to(device), config.head, True, train_classes
        )
        with autocast_for(device, tr.bf16):
            output = model(
                batch.support,
                batch.support_labels,
                batch.query,
                batch.class_text,
                query_labels=batch.query_labels,
                **batch.extras,
            )
        loss = episode_loss(output, batch.query_labels, aux_weights(config.head, set(output.aux)))
        (loss * tr.episode_batch / tr.tasks_per_batch).backward()
        return micro_totals(output, batch.query_labels, loss, tr.episode_batch)

    state = open_run(Path(tr.out), tr.resume, record, TRAIN_COMPARED, restore)
    job = TrainingJob(
        config,
        head,
        optimizer,
        tr.tasks_per_batch // tr.episode_batch,
        micro_batch,
        lambda: evaluate_episodes(model, select, config.head, config.eval.episode_batch),
        state_dicts,
        record,
        lower=f"train.lr (now {tr.lr})",
        device=device,
        desc=f"train {config.head.name}",
        check_inputs=" or check the store with fsar cache verify",
    )
    return run_steps(job, state, progress)


def check_protocol_frames(protocol, store, dataset: str | None) -> None:
    """A release frame rule needs a dense store: refuse any other before loading anything."""
    frames = store_frames(store.recipe)
    check_store_frames("protocol.test_frames", protocol.test_frames, frames, dataset, store.path)
    check_store_frames("protocol.train_frames", protocol.train_frames, frames, dataset, store.path)


def jitter_used_videos(
    bank: FeatureBank,
    episodes,
    seq_len: int,
    generator: torch.Generator,
    rule: str | None = None,
):
    """Training frames and views for the videos of these episodes only.

    A bank can hold tens of thousands of videos and an episode uses a few dozen, so the draws
    are made for the used rows and scattered into bank-sized tables (long [V, T] and [V]).
    ``rule``: a release training rule over the source frames of a dense store, drawn per
    occurrence (positions are then a (support, query) pair); None: the jitter over cached
    frames of SPEC 3.
    """
    rows = torch.unique(torch.cat([episodes.support.flatten(), episodes.query.flatten()]))
    if rule is not None:  # per occurrence: (support [B, S, T], query [B, Q, T])
        positions = training_positions(bank, episodes, rule, generator)
    else:
        positions = torch.zeros(len(bank), seq_len, dtype=torch.long)
        positions[rows] = train_positions(bank.n_frames.cpu()[rows], seq_len, generator)
        positions = positions.to(bank.device)
    views = torch.zeros(len(bank), dtype=torch.long)
    views[rows] = torch.randint(len(bank.views), (len(rows),), generator=generator)
    return positions, views


def store_record(config: Config, store) -> dict[str, Any]:
    """The run record's account of the store the head trains on."""
    recipe = store.recipe
    return {
        "path": str(store.path),
        "fingerprint": store.fingerprint,
        "dataset": recipe.get("dataset"),
        "variant": config.dataset.variant,
        "encoder": encoder_recipe(recipe),
        "frames": recipe.get("frames"),
        "seq_len": recipe.get("seq_len"),
    }
