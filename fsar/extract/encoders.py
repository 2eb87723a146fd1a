"""open_clip encoders: resolve the weights source, build the model, load the weights.

Architecture and weights are separate (open_clip's habit): an ``EncoderSpec`` names both and
``weights_id`` turns the weights source into the string that goes into a store's fingerprint.
"""

from __future__ import annotations

import hashlib
import logging
import pickle
from dataclasses import dataclass
from pathlib import Path

import open_clip
import torch

from fsar.errors import FsarError
from fsar.extract.layers import LayerTaps
from fsar.torch_files import check_weights_file, first_sentence, load_torch_file, refusal_reason

TINY_MODELS = ("fsar-tiny-vit", "fsar-tiny-rn")
_CONFIG_DIR = Path(__file__).resolve().parent / "model_configs"
# Seed of the random initialisation of the tiny models: every process (ranks, resumed runs)
# must build bitwise the same weights, or a store would mix encoders.
RANDOM_INIT_SEED = 0


class EncoderError(FsarError, RuntimeError):
    """The encoder cannot be built; the message says which file or flag to pass."""


@dataclass(frozen=True)
class EncoderSpec:
    model: str  # open_clip model name or a registered fsar-tiny-* config
    pretrained: str | None = None  # open_clip pretrained tag
    weights: str | None = None  # local file holding the whole CLIP model's weights
    checkpoint: str | None = None  # official CLIP-SPM / CLIP-FSAR checkpoint (backbone.* keys)
    random_init: bool = False  # explicit opt-in for random weights on a real architecture
    quick_gelu: bool | None = None  # None: True for OpenAI weights (tag 'openai' or a checkpoint)


@dataclass
class Encoder:
    model: torch.nn.Module  # the open_clip CLIP model, eval mode
    spec: EncoderSpec
    weights_id: str
    image_size: int
    embed_dim: int
    tokenizer: object
    taps: LayerTaps
    quick_gelu: bool  # resolved from the spec

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


def register_tiny_configs() -> None:
    """Make ``fsar-tiny-vit`` / ``fsar-tiny-rn`` valid open_clip model names (idempotent)."""
    if TINY_MODELS[0] not in open_clip.list_models():
        open_clip.add_model_config(_CONFIG_DIR)


def file_sha256(path: str | Path, block: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(block):
            digest.update(chunk)
    return digest.hexdigest()


def weights_id(spec: EncoderSpec) -> str:
    """What produced the weights, as recorded in the store fingerprint."""
    if spec.pretrained:
        base = f"pretrained:{spec.pretrained}"
    elif spec.weights:
        base = f"file-sha256:{file_sha256(spec.weights)}"
    else:
        base = f"random-init:seed{RANDOM_INIT_SEED}"
    if spec.checkpoint:
        base += f"+visual-from-checkpoint-sha256:{file_sha256(spec.checkpoint)}"
    return base


def _check_sources(spec: EncoderSpec) -> None:
    register_tiny_configs()
    if spec.model not in open_clip.list_models():
        close = [m for m in open_clip.list_models() if spec.model.lower() in m.lower()][:8]
        raise EncoderError(
            f"unknown model {spec.model!r}; open_clip knows e.g. RN50, ViT-B-16, ViT-B-32 and fsar "
            f"adds {', '.join(TINY_MODELS)}" + (f"; close matches: {close}" if close else "")
        )
    for label, path in (("--weights", spec.weights), ("--checkpoint", spec.checkpoint)):
        if path and not Path(path).is_file():
            raise EncoderError(f"{label} file not found: {path}")
    has_text_weights = bool(spec.pretrained or spec.weights)
    if not has_text_weights and not spec.random_init and spec.model not in TINY_MODELS:
        what = (
            "the text encoder (a checkpoint holds only the visual one)" if spec.checkpoint else "it"
        )
        raise EncoderError(
            f"model {spec.model} has no weights: pass --pretrained openai (open_clip downloads it "
            f"on first use, which needs network), or --weights FILE (a local copy of the CLIP "
            f"weights, e.g. the {spec.model} open_clip_pytorch_model.bin / .safetensors or the "
            f"OpenAI .pt) for {what}"
        )


def build_encoder(spec: EncoderSpec, device: str | torch.device = "cpu", layers=()) -> Encoder:
    """Resolve the weights, build the open_clip model, load weights, attach layer taps."""
    _check_sources(spec)
    quick_gelu = spec.quick_gelu
    tuned = fine_tuned_encoder(spec.checkpoint) if spec.checkpoint else None
    if tuned is not None:
        check_fine_tuned_base(spec, tuned)
    if quick_gelu is None and tuned is not None:
        quick_gelu = bool(tuned["quick_gelu"])
    elif quick_gelu is None:
        quick_gelu = spec.pretrained == "openai" or bool(spec.checkpoint)
    pretrained = spec.pretrained or spec.weights
    if spec.weights:
        check_weights_file(spec.weights, "--weights")
    torch.manual_seed(RANDOM_INIT_SEED)
    try:
        previous = logging.getLogger().level
        logging.getLogger().setLevel(logging.ERROR)  # open_clip logs "initialized randomly"
        model = open_clip.create_model(
            spec.model, pretrained=pretrained, force_quick_gelu=quick_gelu, weights_only=True
        )
    except (RuntimeError, pickle.UnpicklingError, EOFError) as err:  # what torch.load raises
        raise EncoderError(_weights_failure(spec, err)) from err
    finally:
        logging.getLogger().setLevel(previous)
    if spec.checkpoint:
        load_visual_from_checkpoint(model, spec.checkpoint)
    model = model.to(device).eval()
    image_size = model.visual.image_size
    image_size = image_size[0] if isinstance(image_size, (tuple, list)) else int(image_size)
    with torch.no_grad():
        probe = torch.zeros(1, 3, image_size, image_size, device=device)
        embed_dim = int(model.encode_image(probe).shape[-1])
    return Encoder(
        model=model,
        spec=spec,
        weights_id=weights_id(spec),
        image_size=image_size,
        embed_dim=embed_dim,
        tokenizer=open_clip.get_tokenizer(spec.model),
        taps=LayerTaps(model.visual, layers),
        quick_gelu=quick_gelu,
    )


def _weights_failure(spec: EncoderSpec, err: BaseException) -> str:
    """One line saying why the weights of ``spec`` could not be loaded."""
    text = str(err)
    if spec.weights and "Error(s) in loading state_dict" in text:
        detail = text.split("\n\t")[1] if "\n\t" in text else text
        return (
            f"--weights {spec.weights} refused: its keys or shapes do not fit {spec.model} "
            f"({first_sentence(detail, 200)}); pass the weights of this model or the --model "
            "they belong to"
        )
    if spec.weights:
        return f"--weights {spec.weights} refused: {refusal_reason(spec.weights, err)}"
    return (
        f"could not load {spec.model} weights from tag {spec.pretrained!r}: "
        f"{first_sentence(text, 300)}. Offline machines: copy the weights file here and pass "
        "--weights FILE instead of --pretrained."
    )


# The format tag of fsar checkpoints (fsar.pipelines.checkpoint.FORMAT); fine-tuning ones carry
# the visual encoder under "visual" and how it was built under "encoder".
FSAR_CHECKPOINT_FORMAT = "fsar-heads/1"


def fine_tuned_encoder(path: str | Path) -> dict | None:
    """The ``encoder`` record of an fsar fine-tuning checkpoint (model, base weights, quick_gelu),
    or None for any other checkpoint."""
    raw = load_torch_file(path, "--checkpoint", mmap=True)  # only a small record is needed
    if isinstance(raw, dict) and raw.get("format") == FSAR_CHECKPOINT_FORMAT:
        if "visual" not in raw:
            raise EncoderError(
                f"{path} is an fsar head checkpoint from `fsar train` (frozen features): it "
                "holds no encoder; pass a checkpoint from `fsar finetune`"
            )
        return raw["encoder"]
    return None


def check_fine_tuned_base(spec: EncoderSpec, tuned: dict) -> None:
    """The architecture and text-encoder weights must be those the fine-tuning started from:
    the class text of the re-extracted store is what the head was trained against."""
    if spec.model != tuned["model"]:
        raise EncoderError(
            f"{spec.checkpoint} fine-tuned {tuned['model']}, not {spec.model}: pass --model "
            f"{tuned['model']}"
        )
    base = weights_id(EncoderSpec(spec.model, spec.pretrained, spec.weights))
    if base != tuned["text_weights"]:
        raise EncoderError(
            f"{spec.checkpoint} was fine-tuned from weights {tuned['text_weights']}, but this "
            f"run's text encoder would come from {base}: pass the same --pretrained / --weights "
            "as the fine-tuning run"
        )


def visual_state_from_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """The visual-encoder weights inside an official (or fsar) checkpoint, keys as open_clip's.

    The releases save ``{'model_state_dict': ...}`` whose ``backbone.*`` keys are the OpenAI CLIP
    visual encoder (``backbone.module.*`` when saved from DataParallel). fsar fine-tuning
    checkpoints hold the encoder's state dict under ``visual``. Read with ``weights_only=True``:
    never unpickle code.
    """
    raw = load_torch_file(path, "--checkpoint")
    if isinstance(raw, dict) and raw.get("format") == FSAR_CHECKPOINT_FORMAT and "visual" in raw:
        return dict(raw["visual"])
    state = (
        raw.get("model_state_dict", raw.get("state_dict", raw)) if isinstance(raw, dict) else None
    )
    if not isinstance(state, dict):
        raise EncoderError(
            f"--checkpoint {path} refused: it holds a {type(raw).__name__}, not a state dict"
        )
    visual = {}
    for key, value in state.items():
        for prefix in ("backbone.module.", "backbone.", "visual."):
            if key.startswith(prefix):
                visual[key[len(prefix) :]] = value
                break
    if not visual:
        sample = [str(key) for key in list(state)[:5]]
        raise EncoderError(
            f"--checkpoint {path} refused: no backbone.* or visual.* keys, so no visual encoder "
            f"to load (first keys: {sample}); pass a CLIP-SPM / CLIP-FSAR release checkpoint or "
            "a `fsar finetune` best.pt / last.pt"
        )
    return visual


def load_visual_from_checkpoint(model: torch.nn.Module, path: str | Path) -> None:
    state = visual_state_from_checkpoint(path)
    hint = "is --model the checkpoint's backbone?"
    try:
        result = model.visual.load_state_dict(state, strict=False)
    except RuntimeError as err:  # shape mismatches raise even when not strict
        first = str(err).split("\n\t")[1] if "\n\t" in str(err) else str(err)
        raise EncoderError(f"{path}: visual encoder weights do not fit {hint} ({first})") from err
    if result.missing_keys or result.unexpected_keys:
        raise EncoderError(
            f"{path}: visual encoder weights do not fit model "
            f"{type(model.visual).__name__}: missing {result.missing_keys[:5]}, "
            f"unexpected {result.unexpected_keys[:5]}; {hint}"
        )
