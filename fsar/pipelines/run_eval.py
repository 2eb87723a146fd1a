"""``fsar eval``: score a trained, official or parameter-free head on fixed episodes of a store.

Writes one result JSON (schema ``fsar-eval/1``, read by ``fsar report``) and the per-class
confusion matrix as CSV beside it.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fsar.cache import open_store
from fsar.cache.bank import load_bank
from fsar.config import (
    Config,
    ConfigError,
    HeadConfig,
    ProtocolConfig,
    build_dataclass,
    config_from_record,
    to_dict,
)
from fsar.devices import resolve_device
from fsar.heads import FewShotHead, load_official
from fsar.pipelines.build import build_head, train_class_count
from fsar.pipelines.checkpoint import (
    NonFiniteWeights,
    check_store_fits,
    encoder_recipe,
    load_checkpoint,
    non_finite_entries,
)
from fsar.pipelines.episodes import EpisodeShape, fixed_episodes
from fsar.pipelines.evaluate import EvalOutcome, EvalSetup, evaluate_episodes
from fsar.pipelines.frame_plan import check_store_frames, store_frames

RESULT_KIND = "fsar-eval/1"


@dataclass
class HeadSource:
    """Where the head's weights come from, and what was recorded when it was trained."""

    head: FewShotHead
    head_config: HeadConfig
    protocol: ProtocolConfig
    checkpoint: dict[str, Any] | None  # fsar checkpoint payload
    label: str


def load_head_source(
    config: Config,
    checkpoint: str | None,
    device: torch.device,
    bank,
    num_train_classes: int | None = None,
) -> HeadSource:
    """The head to score: an fsar checkpoint's, an official one's, or a parameter-free head.

    num_train_classes: classes of the store's training split (heads with per-class layers)."""
    ev = config.eval
    if checkpoint and ev.official:
        raise ConfigError("eval.checkpoint and eval.official are exclusive: pass one of them")
    if checkpoint:
        payload = load_checkpoint(checkpoint)
        head_config = config_from_record(payload).head
        protocol = build_dataclass(ProtocolConfig, payload["protocol"], "protocol.")
        head = build_head(
            head_config,
            payload["feature_dim"],
            payload["layer_dims"],
            payload.get("num_train_classes"),
        )
        head.load_state_dict(payload["head"])
        check_finite_weights(head, str(checkpoint))
        return HeadSource(head.to(device), head_config, protocol, payload, head_config.name)
    head = build_head(config.head, bank.feature_dim, bank.layer_dims, num_train_classes)
    if ev.official:
        load_official(head, ev.official)
        check_finite_weights(head, ev.official)
    elif any(True for _ in head.parameters()):
        raise ConfigError(
            f"head {config.head.name} has trained parameters: pass eval.checkpoint (a best.pt "
            "from fsar train) or eval.official (a release checkpoint)"
        )
    return HeadSource(head.to(device), config.head, config.protocol, None, config.head.name)


def check_finite_weights(head: torch.nn.Module, source: str) -> None:
    """Refuse a head whose weights hold NaN or inf: every score it gives is meaningless."""
    bad = non_finite_entries(head.state_dict())
    if bad:
        raise NonFiniteWeights(
            f"{source} holds NaN or infinite weights ({len(bad)} tensor(s), e.g. {bad[0]}): it "
            "cannot be scored; retrain it (a lower train.lr)"
        )


def run_evaluation(
    config: Config, checkpoint: str | None = None, progress: bool = True
) -> tuple[dict[str, Any], EvalOutcome]:
    """Evaluate; returns the result record (also written to eval.out) and the raw outcome.

    ``progress`` shows a bar over the episodes on stderr."""
    ev = config.eval
    checkpoint = checkpoint if checkpoint is not None else ev.checkpoint
    if ev.decode:
        return run_decoded_evaluation(config, checkpoint, progress)
    device = resolve_device(ev.device)
    store_path = ev.store or config.train.store
    if not store_path and checkpoint:
        store_path = load_checkpoint(checkpoint)["store"]["path"]
    if not store_path:
        raise ConfigError(
            "eval.store is not set: pass --store STORE (for a fsar finetune checkpoint: a store "
            "re-extracted with --checkpoint, or --decode --root VIDEOS)"
        )
    store = open_store(Path(store_path))
    dataset = store.recipe.get("dataset")
    if checkpoint:  # the frames the head was trained for; refused before loading the split
        protocol = load_checkpoint(checkpoint)["protocol"]
        test_frames = protocol.get("test_frames", "cached")
    else:
        test_frames = config.protocol.test_frames
    frames = store_frames(store.recipe)
    check_store_frames("protocol.test_frames", test_frames, frames, dataset, store.path)
    bank = load_bank(store, ev.split, device, ["center"], [])
    source = load_head_source(config, checkpoint, device, bank, train_class_count(store))
    if source.checkpoint is not None:
        check_store_fits(source.checkpoint, store.recipe, store.path, checkpoint)
    shape = EpisodeShape(config.episodes.way, config.episodes.shot, config.episodes.query)
    episodes = fixed_episodes(bank, shape, ev.episodes, ev.seed)
    setup = EvalSetup(
        bank,
        episodes,
        int(store.recipe["seq_len"]),
        source.protocol.test_frames,
        ev.seed,
        dataset,
    )
    outcome = evaluate_episodes(
        source.head, setup, source.head_config, ev.episode_batch, progress=progress
    )
    result = result_record(config, store, bank, setup, source, outcome, checkpoint)
    out = result_path(config, checkpoint, shape)
    write_result(result, outcome, bank.class_names, out)
    result["path"] = str(out)
    return result, outcome


def regime_of(payload: dict[str, Any] | None, decoded: bool) -> str:
    """How the number was produced: frozen features, or a fine-tuned encoder (scored on its
    re-extracted store, or on decoded videos)."""
    if payload is None or payload.get("regime") != "e2e":
        return "frozen cache"
    return "e2e, decoded" if decoded else "e2e, re-extracted store"


def run_decoded_evaluation(
    config: Config, checkpoint: str | None, progress: bool = True
) -> tuple[dict, EvalOutcome]:
    """``fsar eval --decode``: a finetune checkpoint scored on decoded videos of dataset.root."""
    from fsar.data.datasets import load_dataset
    from fsar.pipelines.clips import video_split
    from fsar.pipelines.e2e_eval import evaluate_decoded
    from fsar.pipelines.finetune import load_video_model, test_frame_options

    ev = config.eval
    if not checkpoint:
        raise ConfigError("eval.decode needs --checkpoint (best.pt / last.pt of fsar finetune)")
    payload = load_checkpoint(checkpoint)
    if payload.get("regime") != "e2e":
        raise ConfigError(
            f"{checkpoint} holds no encoder (fsar train on frozen features): score it on a "
            "store, without --decode"
        )
    if not config.dataset.root:
        raise ConfigError("eval.decode needs the videos: pass --root DIR")
    trained = config_from_record(payload)
    device = resolve_device(ev.device)
    dataset = load_dataset(
        trained.dataset.name,
        Path(config.dataset.root),
        variant=trained.dataset.variant,
        splits_dir=Path(config.dataset.splits_dir) if config.dataset.splits_dir else None,
        splits=[ev.split],
    )
    setup = load_video_model(payload, dataset.class_names, device)
    check_finite_weights(setup.model, str(checkpoint))
    videos = video_split(dataset, ev.split, trained.extract.frame_listing)
    shape = EpisodeShape(config.episodes.way, config.episodes.shot, config.episodes.query)
    episodes = fixed_episodes(videos, shape, ev.episodes, ev.seed)
    outcome = evaluate_decoded(
        setup.model,
        videos,
        episodes,
        setup.class_text,
        setup.policy,
        setup.prep,
        workers=trained.finetune.workers,
        bf16=trained.train.bf16,
        backend=trained.extract.decode_backend,
        progress=progress,
        **{**test_frame_options(trained), "seed": ev.seed},
    )
    head_config, protocol = trained.head, trained.protocol
    result = {
        "kind": RESULT_KIND,
        "label": head_config.name,
        "head": head_config.name,
        "regime": regime_of(payload, decoded=True),
        "backbone": payload["encoder"]["model"],
        "weights": payload["encoder"]["initial_weights"] + " (fine-tuned)",
        "dataset": trained.dataset.name,
        "variant": dataset.variant,
        "split": ev.split,
        "way": shape.way,
        "shot": shape.shot,
        "query": shape.query,
        "episodes": len(episodes),
        "episodes_sha256": episodes.digest(),
        "seed": ev.seed,
        "accuracy": outcome.accuracy,
        "ci95": outcome.ci95,
        "std": outcome.std,
        "protocol": to_dict(protocol),
        "selection": {
            "split": protocol.selection_split,
            "step": payload["best_step"],
            "accuracy": payload["best_accuracy"],
            "episodes": validation_episodes(payload),
        },
        "checkpoint": str(checkpoint),
        "official": None,
        "run_dir": str(Path(checkpoint).parent),
        "store": None,
        "videos": {"root": config.dataset.root, "count": len(videos), "missing": videos.skipped},
        "per_class": {
            name: float(100.0 * outcome.confusion[i, i] / outcome.confusion[i].sum())
            for i, name in enumerate(dataset.class_names)
            if outcome.confusion[i].sum()
        },
    }
    name = f"eval_decoded_{ev.split}_{shape.way}way_{shape.shot}shot.json"
    out = Path(ev.out) if ev.out else Path(checkpoint).parent / name
    write_result(result, outcome, dataset.class_names, out)
    result["path"] = str(out)
    return result, outcome


def validation_episodes(payload: dict) -> int | None:
    """Episodes per validation of the run that picked this checkpoint (the releases: 10,000)."""
    return (payload.get("config") or {}).get("train", {}).get("val_episodes")


def result_path(config: Config, checkpoint: str | None, shape: EpisodeShape) -> Path:
    if config.eval.out:
        return Path(config.eval.out)
    name = f"eval_{config.eval.split}_{shape.way}way_{shape.shot}shot.json"
    if checkpoint:
        return Path(checkpoint).parent / name
    raise ConfigError("eval.out is not set: pass --out RESULT.json")


def result_record(
    config, store, bank, setup, source: HeadSource, outcome, checkpoint
) -> dict[str, Any]:
    recipe = store.recipe
    payload = source.checkpoint
    selection = None
    if payload is not None and payload.get("best_step", -1) >= 0:
        selection = {
            "split": source.protocol.selection_split,
            "step": payload["best_step"],
            "accuracy": payload["best_accuracy"],
            "episodes": validation_episodes(payload),
        }
    per_class = {}
    for class_id, name in enumerate(bank.class_names):
        row = outcome.confusion[class_id]
        if row.sum():
            per_class[name] = float(100.0 * row[class_id] / row.sum())
    return {
        "kind": RESULT_KIND,
        "label": source.label,
        "head": source.head_config.name,
        "regime": regime_of(payload, decoded=False),
        "backbone": recipe.get("model"),
        "weights": recipe.get("weights"),
        "dataset": recipe.get("dataset"),
        "variant": payload["store"].get("variant") if payload else config.dataset.variant,
        "split": config.eval.split,
        "way": config.episodes.way,
        "shot": config.episodes.shot,
        "query": config.episodes.query,
        "episodes": len(setup.episodes),
        "episodes_sha256": setup.episodes.digest(),
        "seed": config.eval.seed,
        "accuracy": outcome.accuracy,
        "ci95": outcome.ci95,
        "std": outcome.std,
        "protocol": to_dict(source.protocol),
        "selection": selection,
        "checkpoint": str(checkpoint) if checkpoint else None,
        "official": config.eval.official,
        "run_dir": str(Path(checkpoint).parent) if checkpoint else None,
        "store": {
            "path": str(store.path),
            "fingerprint": store.fingerprint,
            "normalize": recipe.get("normalize"),
            "encoder": encoder_recipe(recipe),
            "videos": len(bank),
            "videos_skipped": bank.skipped,
        },
        "per_class": per_class,
    }


def write_result(result: dict, outcome: EvalOutcome, class_names, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    confusion_path = out.with_name(out.stem + "_confusion.csv")
    present = [i for i in range(len(class_names)) if outcome.confusion[i].sum()]
    with confusion_path.open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["true \\ predicted"] + [class_names[i] for i in present])
        for i in present:
            writer.writerow([class_names[i]] + [int(outcome.confusion[i, j]) for j in present])
    result["confusion_csv"] = confusion_path.name
    tmp = out.with_name(out.name + ".partial")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(out)


def format_result(result: dict) -> str:
    flag = ""
    if result["protocol"]["selection_split"] == "test" and result["selection"]:
        flag = " [model selected on test, as the releases do]"
    return (
        f"{result['label']} on {result['dataset']} {result['split']}: {result['way']}-way "
        f"{result['shot']}-shot, {result['episodes']} episodes: "
        f"{result['accuracy']:.2f} +- {result['ci95']:.2f}{flag} -> {result['path']}"
    )
