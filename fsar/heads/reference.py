"""Official checkpoint key names <-> fsar head parameters, both ways, in one place.

`load_official(head, state_dict_or_path)` copies an official state dict (or a release checkpoint
`{'model_state_dict': ...}` saved with torch) into a head; `to_official(head)` gives the state dict
under the official names. Keys starting with `backbone.` are ignored; any other key the head does
not know, and any head parameter the state dict lacks, is a `CheckpointError` that names the keys
(and the `--head` to pass when the file holds the other release's head).
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from fsar.torch_files import CheckpointError, load_torch_file

from .clipfsar import CLIPFSARHead
from .clipspm import CLIPSPMHead

__all__ = ["official_key_map", "load_official", "to_official", "IGNORED_PREFIXES"]

IGNORED_PREFIXES = ("backbone.",)

# Inside one official Transformer_v1 (depth 1) -> fsar TransformerLayer.
_TRANSFORMER = (
    ("layers.0.0.norm.", "norm."),
    ("layers.0.0.fn.to_q.", "attn.to_q."),
    ("layers.0.0.fn.to_k.", "attn.to_k."),
    ("layers.0.0.fn.to_v.", "attn.to_v."),
    ("layers.0.0.fn.to_out.0.", "attn.to_out."),
    ("layers.0.1.net.0.", "ffn.fc1."),
    ("layers.0.1.net.3.", "ffn.fc2."),
)
_GATE = (("0.", "fc1."), ("2.", "fc2."))

# official prefix -> (fsar prefix, inner table); per head type.
_PREFIXES: dict[type, tuple[tuple[str, str, tuple[tuple[str, str], ...]], ...]] = {
    CLIPSPMHead: (
        ("context1.", "padm.transformer.", _TRANSFORMER),
        ("context2.", "fusion.transformer.", _TRANSFORMER),
        ("gate_text.", "fusion.text_gate.", _GATE),
        ("gate_vision.", "fusion.vision_gate.", _GATE),
        ("token_tr.mlp.net.", "prompt_generator.ffn.", (("0.", "fc1."), ("3.", "fc2."))),
        ("motion_conv1.", "hsmr.motion.conv1.", (("", ""),)),
        ("motion_conv2.", "hsmr.motion.conv2.", (("", ""),)),
        ("mo_alpha1", "motion_alpha", (("", ""),)),
    ),
    CLIPFSARHead: (
        ("context2.", "transformer.", _TRANSFORMER),
        ("scale", "video_text_scale", (("", ""),)),
    ),
}
# Official parameters that these outputs never use: accepted and skipped on load, written with
# their initial value by `to_official` so the official model loads the result strictly.
_UNUSED: dict[type, dict[str, Tensor]] = {CLIPSPMHead: {"scale": torch.ones(1)}, CLIPFSARHead: {}}


def _head_type(head: nn.Module) -> type:
    for cls in _PREFIXES:
        if isinstance(head, cls):
            return cls
    raise CheckpointError(
        f"official checkpoints hold CLIP-SPM or CLIP-FSAR heads, not {type(head).__name__}: "
        "pass --head clipspm or --head clipfsar"
    )


def _to_official_key(cls: type, key: str) -> str | None:
    for official, ours, inner in _PREFIXES[cls]:
        if key.startswith(ours):
            rest = key[len(ours) :]
            for official_inner, ours_inner in inner:
                if rest.startswith(ours_inner):
                    return official + official_inner + rest[len(ours_inner) :]
    return None


def official_key_map(head: nn.Module) -> dict[str, str]:
    """{official key: fsar key} for every entry of `head.state_dict()` that has an official name."""
    cls = _head_type(head)
    mapping = {}
    for key in head.state_dict():
        official = _to_official_key(cls, key)
        if official is not None:
            mapping[official] = key
    return mapping


def to_official(head: nn.Module) -> dict[str, Tensor]:
    """The head's state under the official key names (fsar-only parameters are left out)."""
    cls = _head_type(head)
    state = head.state_dict()
    out = {
        official: state[ours].detach().clone() for official, ours in official_key_map(head).items()
    }
    for key, value in _UNUSED[cls].items():
        out[key] = value.clone()
    return out


def _read_state_dict(source: Mapping[str, Tensor] | str | os.PathLike) -> Mapping[str, Tensor]:
    if isinstance(source, (str, os.PathLike)):
        loaded = load_torch_file(source, "official checkpoint")
        if isinstance(loaded, Mapping) and str(loaded.get("format", "")).startswith("fsar-"):
            raise CheckpointError(
                f"{os.fspath(source)} is an fsar checkpoint, not an official release one: pass it "
                "with --checkpoint"
            )
        if isinstance(loaded, Mapping) and "model_state_dict" in loaded:
            loaded = loaded["model_state_dict"]
        if not isinstance(loaded, Mapping) or not all(
            isinstance(value, Tensor) for value in loaded.values()
        ):
            raise CheckpointError(
                f"official checkpoint {os.fspath(source)} refused: it holds no state dict "
                "(a mapping of parameter names to tensors, or {'model_state_dict': ...})"
            )
        return loaded
    return source


# Keys only one release's head has: they tell which head a state dict was saved from.
_RELEASE_MARKERS = {
    CLIPSPMHead: (
        "context1.",
        "gate_text.",
        "gate_vision.",
        "token_tr.",
        "motion_conv",
        "mo_alpha",
    ),
    CLIPFSARHead: ("context2.",),
}
_HEAD_FLAG = {CLIPSPMHead: "clipspm", CLIPFSARHead: "clipfsar"}


def _release_head(keys: list[str]) -> type | None:
    """The head class a release state dict belongs to (CLIP-SPM markers win: it also has
    ``context2.``), or None when neither is recognised."""
    for cls, markers in _RELEASE_MARKERS.items():
        if any(key.startswith(markers) for key in keys):
            return cls
    return None


def _wrong_head(cls: type, keys: list[str], where: str) -> CheckpointError | None:
    saved = _release_head(keys)
    if saved is None or saved is cls:
        return None
    return CheckpointError(
        f"{where} holds a {saved.__name__.removesuffix('Head')} head but a "
        f"{cls.__name__.removesuffix('Head')} head was requested: pass --head {_HEAD_FLAG[saved]}"
    )


def load_official(
    head: nn.Module, source: Mapping[str, Tensor] | str | os.PathLike, strict: bool = True
) -> list[str]:
    """Copy official weights into `head`; return the fsar keys left unset (only when not strict).

    `source` is an official state dict, or the path of a release checkpoint. Keys under
    `backbone.` are ignored. Unknown keys are always an error; with `strict`, so are head
    parameters that the state dict lacks (e.g. fsar-only parts such as an HSMR shallow projection).
    """
    cls = _head_type(head)
    where = (
        f"official checkpoint {os.fspath(source)}"
        if isinstance(source, (str, os.PathLike))
        else "the official state dict"
    )
    state_dict = _read_state_dict(source)
    key_map = official_key_map(head)
    relevant = {k: v for k, v in state_dict.items() if not k.startswith(IGNORED_PREFIXES)}
    wrong_head = _wrong_head(cls, sorted(relevant), where)
    if wrong_head is not None:
        raise wrong_head
    unknown = sorted(k for k in relevant if k not in key_map and k not in _UNUSED[cls])
    if unknown:
        raise CheckpointError(
            f"{where}: keys unknown to this {cls.__name__} (built with these switches): "
            f"{_few(unknown)}; build the head with the release's switches (--config)"
        )
    target = head.state_dict()
    missing = sorted(ours for official, ours in key_map.items() if official not in relevant)
    missing += sorted(k for k in target if k not in key_map.values())
    if missing and strict:
        raise CheckpointError(
            f"{where}: {cls.__name__} parameters missing from it: {_few(missing)}"
        )
    with torch.no_grad():
        for official, ours in key_map.items():
            if official not in relevant:
                continue
            value = relevant[official]
            if value.shape != target[ours].shape:
                raise CheckpointError(
                    f"{where}: {official} has shape {list(value.shape)} but {ours} needs "
                    f"{list(target[ours].shape)}: {_width_hint(cls, relevant, target)}"
                )
            target[ours].copy_(value.to(target[ours].dtype))
    return missing


def _width_hint(cls: type, official: Mapping[str, Tensor], target: Mapping[str, Tensor]) -> str:
    """Name the feature widths when they differ (the store's encoder is not the checkpoint's)."""
    prefix = _PREFIXES[cls][0]
    norm_official = prefix[0] + "layers.0.0.norm.weight"
    norm_ours = prefix[1] + "norm.weight"
    if norm_official in official and norm_ours in target:
        saved, here = official[norm_official].shape[0], target[norm_ours].shape[0]
        if saved != here:
            return (
                f"the checkpoint's head takes D={saved} features but this store's are D={here}: "
                "evaluate on a store extracted with the checkpoint's backbone (--store)"
            )
    return "set the release's head sizes (head.heads / head.dim_head / head.mlp_dim) via --config"


def _few(keys: list[str], limit: int = 8) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f" ... ({len(keys)} in all)" if len(keys) > limit else "")
