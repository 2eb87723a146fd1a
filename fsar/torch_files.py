"""Reading untrusted PyTorch files (checkpoints, weights) and saying why one is refused.

Every checkpoint and weights file fsar reads goes through ``torch.load(weights_only=True)`` (or
safetensors): tensors and plain containers only, never code. ``torch.load`` reports a bad file
with many unrelated exception types and long multi-line texts (some advise turning that safety
off); ``refusal_reason`` turns any of them into one short line naming what is wrong with the file.
"""

from __future__ import annotations

import json
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from fsar.errors import FsarError

PICKLE_PROTOCOL_2_PLUS = b"\x80"  # first byte of a pickle written by torch.save (legacy format)


class CheckpointError(FsarError, ValueError):
    """A checkpoint is missing, unreadable, refused or does not fit the use it is put to."""


def load_torch_file(
    path: str | Path, what: str, map_location: str | torch.device = "cpu", mmap: bool = False
) -> Any:
    """``torch.load(path, weights_only=True)``; a file that cannot be read that way raises one
    CheckpointError line: ``{what} {path} refused: <reason>``. ``mmap``: map a zip checkpoint
    instead of reading it (cheap when only a small record of a large file is needed)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{what} {path}: no such file")
    mmap = mmap and zipfile.is_zipfile(path)  # files older than torch 1.6 cannot be mapped
    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as err:  # torch.load raises many unrelated types for a bad file
        raise CheckpointError(f"{what} {path} refused: {refusal_reason(path, err)}") from err


def check_weights_file(path: str | Path, what: str) -> None:
    """Refuse, without loading it, a file that is neither a PyTorch file nor safetensors."""
    path = Path(path)
    with path.open("rb") as file:
        head = file.read(9)
    if not head:
        raise CheckpointError(f"{what} {path} refused: the file is empty")
    if path.suffix == ".safetensors":
        reason = _safetensors_problem(path)
        if reason:
            raise CheckpointError(f"{what} {path} refused: {reason}")
        return
    if not (zipfile.is_zipfile(path) or head.startswith((b"PK", PICKLE_PROTOCOL_2_PLUS))):
        raise CheckpointError(f"{what} {path} refused: {_NOT_TORCH}")


def _safetensors_problem(path: Path) -> str | None:
    """What is wrong with a safetensors file, read from its header alone (None: looks whole).

    The format is an 8-byte little-endian header length, a JSON header giving each tensor's byte
    range, then the data; a truncated copy is shorter than the ranges say.
    """
    size = path.stat().st_size
    with path.open("rb") as file:
        header_size = int.from_bytes(file.read(8), "little")
        if size < 8 or not 2 <= header_size <= size - 8:
            return "not a safetensors file (no JSON header at the start)"
        try:
            header = json.loads(file.read(header_size))
            ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
        except (ValueError, TypeError, KeyError, IndexError, AttributeError):
            return "not a safetensors file (its header is not the format's JSON)"
    expected = 8 + header_size + max(ends, default=0)
    if expected != size:
        return f"a truncated or damaged safetensors file ({size} bytes; its header says {expected})"
    return None


_NOT_TORCH = "not a PyTorch file (neither a torch.save zip archive nor a pickle)"


def refusal_reason(path: str | Path, err: BaseException) -> str:
    """Why ``torch.load(path, weights_only=True)`` failed with ``err``, in one line."""
    path = Path(path)
    text = str(err)
    if path.stat().st_size == 0:
        return "the file is empty"
    if isinstance(err, pickle.UnpicklingError) and "Unsupported global" in text:
        name = text.split("Unsupported global:", 1)[1].split()[1]
        return (
            f"it stores Python objects, not only tensors (e.g. {name}); fsar loads checkpoints "
            "with torch.load(weights_only=True) and never runs code from a file"
        )
    if "TorchScript" in text:
        return "a TorchScript archive (code), not a state dict: pass a state-dict checkpoint"
    with path.open("rb") as file:
        head = file.read(2)
    if zipfile.is_zipfile(path):
        return f"a damaged PyTorch zip archive ({first_sentence(text)})"
    if head == b"PK":
        return "a truncated or damaged zip archive (its end is missing; copy the file again)"
    if not head.startswith(PICKLE_PROTOCOL_2_PLUS):
        return _NOT_TORCH
    return f"an unreadable or truncated pickle ({type(err).__name__}: {first_sentence(text)})"


def first_sentence(text: str, limit: int = 160) -> str:
    """The first line of a library's message, up to its first full stop, at most ``limit``."""
    line = next((line.strip() for line in text.splitlines() if line.strip()), "")
    line = line.split(". ", 1)[0].rstrip(".")
    return line if len(line) <= limit else line[: limit - 3] + "..."
