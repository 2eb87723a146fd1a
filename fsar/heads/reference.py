"""Official checkpoint key names <-> fsar head parameters, both ways, in one place.

`load_official(head, state_dict_or_path)` copies an official state dict (or a release checkpoint
`{'model_state_dict': ...}`, or the alibaba framework's `{'model_state': {'head.<key>': ...}}`)
into a head, as each head's spec (`OfficialKeys`) names them; `to_official(head)` gives the
state dict under the official names. Keys starting with `backbone.` are ignored, and so are the
entries a head recomputes (`OfficialKeys.derived`); any other key the head does not know, and any
head parameter the state dict lacks, is a `CheckpointError` naming keys (and the `--head` to pass
when the file holds another release's head).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from fsar.torch_files import CheckpointError, load_torch_file

from .registry import HEADS, spec_of
from .spec import HeadSpec, OfficialKeys

__all__ = ["official_key_map", "load_official", "to_official", "IGNORED_PREFIXES"]

IGNORED_PREFIXES = ("backbone.",)


def _official(head: nn.Module) -> tuple[HeadSpec, OfficialKeys]:
    spec = spec_of(head)
    if spec is None or spec.official is None:
        known = [s.name for s in HEADS.values() if s.official is not None]
        raise CheckpointError(
            f"{type(head).__name__} has no official release checkpoint; heads with one: "
            f"{', '.join(known)} (pass --head NAME)"
        )
    return spec, spec.official


def _to_official_key(keys: OfficialKeys, key: str) -> str | None:
    for official, ours, inner in keys.prefixes:
        if key.startswith(ours):
            rest = key[len(ours) :]
            for official_inner, ours_inner in inner:
                if rest.startswith(ours_inner):
                    return official + official_inner + rest[len(ours_inner) :]
    return None


def official_key_map(head: nn.Module) -> dict[str, str]:
    """{official key: fsar key} for every entry of `head.state_dict()` that has an official name."""
    _, keys = _official(head)
    mapping = {}
    for key in head.state_dict():
        official = _to_official_key(keys, key)
        if official is not None:
            mapping[official] = key
    return mapping


def to_official(head: nn.Module) -> dict[str, Tensor]:
    """The head's state under the official key names (fsar-only parameters are left out)."""
    _, keys = _official(head)
    state = head.state_dict()
    out = {
        official: state[ours].detach().clone() for official, ours in official_key_map(head).items()
    }
    for key, value in _unused(head, keys).items():
        out[key] = value.clone()
    return out


def _unused(head: nn.Module, keys: OfficialKeys) -> dict[str, Tensor]:
    return keys.unused(head) if keys.unused is not None else {}


def _derived(keys: OfficialKeys, key: str) -> bool:
    return any(re.fullmatch(pattern, key) for pattern in keys.derived)


def _read_state_dict(source: Mapping[str, Tensor] | str | os.PathLike) -> Mapping[str, Tensor]:
    if isinstance(source, (str, os.PathLike)):
        loaded = load_torch_file(source, "official checkpoint")
        if isinstance(loaded, Mapping) and str(loaded.get("format", "")).startswith("fsar-"):
            raise CheckpointError(
                f"{os.fspath(source)} is an fsar checkpoint, not an official release one: pass it "
                "with --checkpoint"
            )
        for key in ("model_state_dict", "model_state"):  # CLIP-SPM/MEI, alibaba framework
            if isinstance(loaded, Mapping) and key in loaded:
                loaded = loaded[key]
                break
        if not isinstance(loaded, Mapping) or not all(
            isinstance(value, Tensor) for value in loaded.values()
        ):
            raise CheckpointError(
                f"official checkpoint {os.fspath(source)} refused: it holds no state dict "
                "(a mapping of parameter names to tensors, or {'model_state_dict': ...})"
            )
        return loaded
    return source


def _release_head(keys: list[str]) -> HeadSpec | None:
    """The head a release state dict was saved from: the spec with the most marker prefixes
    present in its keys (CLIP-SPM's state dict also has CLIP-FSAR's `context2.`); on a tie, the
    one spec whose markers are all present (CLIP-MEI's keys are CLIP-SPM's without the gates);
    None when none or several match equally."""
    counts, complete = {}, set()
    for spec in HEADS.values():
        if spec.official is not None and spec.official.markers:
            found = sum(any(k.startswith(m) for k in keys) for m in spec.official.markers)
            if found:
                counts[spec.name] = found
            if found == len(spec.official.markers):
                complete.add(spec.name)
    if not counts:
        return None
    best = max(counts.values())
    winners = [name for name, found in counts.items() if found == best]
    if len(winners) > 1:
        winners = [name for name in winners if name in complete]
    return HEADS[winners[0]] if len(winners) == 1 else None


def _wrong_head(spec: HeadSpec, keys: list[str], where: str) -> CheckpointError | None:
    saved = _release_head(keys)
    if saved is None or saved is spec:
        return None
    return CheckpointError(
        f"{where} holds a {saved.title} head but a {spec.title} head was requested: "
        f"pass --head {saved.name}"
    )


def _strip_wrapper(state_dict: Mapping[str, Tensor], keys: OfficialKeys) -> dict[str, Tensor]:
    """Drop the release's whole-model prefix (e.g. `head.`) when every head key carries it."""
    relevant = {k: v for k, v in state_dict.items() if not k.startswith(IGNORED_PREFIXES)}
    prefix = keys.wrapper_prefix
    if prefix and relevant and all(k.startswith(prefix) for k in relevant):
        stripped = {k[len(prefix) :]: v for k, v in relevant.items()}
        return {k: v for k, v in stripped.items() if not k.startswith(IGNORED_PREFIXES)}
    return relevant


def load_official(
    head: nn.Module, source: Mapping[str, Tensor] | str | os.PathLike, strict: bool = True
) -> list[str]:
    """Copy official weights into `head`; return the fsar keys left unset (only when not strict).

    `source` is an official state dict, or the path of a release checkpoint. Keys under
    `backbone.` are ignored. Unknown keys are always an error; with `strict`, so are head
    parameters that the state dict lacks (e.g. fsar-only parts such as an HSMR shallow projection).
    """
    spec, keys = _official(head)
    where = (
        f"official checkpoint {os.fspath(source)}"
        if isinstance(source, (str, os.PathLike))
        else "the official state dict"
    )
    state_dict = _read_state_dict(source)
    key_map = official_key_map(head)
    relevant = _strip_wrapper(state_dict, keys)
    wrong_head = _wrong_head(spec, sorted(relevant), where)
    if wrong_head is not None:
        raise wrong_head
    unused = _unused(head, keys)
    unknown = sorted(
        k for k in relevant if k not in key_map and k not in unused and not _derived(keys, k)
    )
    if unknown:
        raise CheckpointError(
            f"{where}: keys unknown to this {spec.title} head (built with these switches): "
            f"{_few(unknown)}; build the head with the release's switches (--config)"
        )
    target = head.state_dict()
    missing = sorted(ours for official, ours in key_map.items() if official not in relevant)
    missing += sorted(k for k in target if k not in key_map.values())
    if missing and strict:
        raise CheckpointError(
            f"{where}: {spec.title} head parameters missing from it: {_few(missing)}"
        )
    with torch.no_grad():
        for official, ours in key_map.items():
            if official not in relevant:
                continue
            value = relevant[official]
            if value.shape != target[ours].shape:
                raise CheckpointError(
                    f"{where}: {official} has shape {list(value.shape)} but {ours} needs "
                    f"{list(target[ours].shape)}: {_width_hint(keys, relevant, target)}"
                )
            target[ours].copy_(value.to(target[ours].dtype))
    return missing


def _width_hint(
    keys: OfficialKeys, official: Mapping[str, Tensor], target: Mapping[str, Tensor]
) -> str:
    """Name the feature widths when they differ (the store's encoder is not the checkpoint's)."""
    prefix = keys.prefixes[0]
    norm_official = prefix[0] + "layers.0.0.norm.weight"
    norm_ours = prefix[1] + "norm.weight"
    if norm_official in official and norm_ours in target:
        saved, here = official[norm_official].shape[0], target[norm_ours].shape[0]
        if saved != here:
            return (
                f"the checkpoint's head takes D={saved} features but this store's are D={here}: "
                "evaluate on a store extracted with the checkpoint's backbone (--store)"
            )
    return "set the release's head sizes (the head's width options, `fsar config`) via --config"


def _few(keys: list[str], limit: int = 8) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f" ... ({len(keys)} in all)" if len(keys) > limit else "")
