"""Parsers for the official few-shot split lists (both release formats are first-class).

CLIP-SPM / TRX style (`trainlist03.txt`, `vallist03.txt`, `testlist03.txt`), one `<class>/<video>`
per line:
- hmdb_ARN, ucf_ARN, kinetics_CMN: `brush_hair/April_09_..._0`. class key = the class folder name,
  video id = the whole line (`brush_hair/April_09_..._0`).
- ssv2_OTAM, ssv2_CMN: `train8/78687`. class key = `train8` (its real name is in `cls2realC.json`;
  ssv2_CMN numbers its classes globally: test0-23, train24-87, val88-99), video id = the SSv2 id
  `78687` (unique across SSv2, so the same video has the same id in every variant).

CLIP-FSAR style (`train_few_shot.txt`, `val_few_shot.txt`, `test_few_shot.txt`):
- hmdb51, ucf101, kinetics100: `train0//videos/brush_hair/April_09_..._0.avi`: `<split><index>`,
  `//`, then the video path relative to the dataset root. The index counts classes in order of
  first appearance. class key = the folder holding the file (`brush_hair`), video id =
  `<class>/<file stem>` (`brush_hair/April_09_..._0`: identical to the ARN id of the same video),
  `rel_path` keeps the path (`videos/brush_hair/April_09_..._0.avi`, `train_256/x/y.mp4`).
- ssv2_full, ssv2_small: `train8/78687`: as the CLIP-SPM SSv2 lists (clipfsar_ssv2_small numbers
  each split from 0: its train0 is ssv2_CMN's train24).

Nothing is silently fixed: blank lines, surrounding whitespace, CRLF line ends, duplicated lines
and videos listed twice are reported in `SplitList.anomalies` / `SplitSet.anomalies`; duplicated
lines stay in `entries` (consumers decide, e.g. `load_dataset` keeps the first).
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import yaml

from fsar.errors import DatasetError

SPLITS = ("train", "val", "test")
CLASS_NAMES_FILE = Path(__file__).with_name("class_names.yaml")
_SSV2_KEY = re.compile(r"^(train|val|test)(\d+)$")


@dataclass(frozen=True)
class SplitEntry:
    """One line of a split list."""

    class_key: str  # the class as the list names it: folder name or SSv2 key ("train8")
    video_id: str  # the store's id of the video (see the module docstring)
    rel_path: str | None = None  # CLIP-FSAR path lists only: the path inside the line


@dataclass
class SplitList:
    """One split's list file, parsed."""

    split: str
    entries: list[SplitEntry]
    class_keys: list[str]  # in order of first appearance
    anomalies: list[str] = field(default_factory=list)
    source: Path | None = None

    def videos_per_class(self) -> dict[str, int]:
        counts = Counter(entry.class_key for entry in self.entries)
        return {key: counts[key] for key in self.class_keys}

    def unique_video_ids(self) -> list[str]:
        return list(dict.fromkeys(entry.video_id for entry in self.entries))


@dataclass
class SplitSet:
    """The lists of one split variant: its splits, prompt names and cross-split anomalies."""

    variant: str
    format: str  # "clipspm" (<split>listNN.txt) or "clipfsar" (<split>_few_shot.txt)
    splits: dict[str, SplitList]
    class_names: dict[str, str]  # class key -> the string the text prompts use
    anomalies: list[str] = field(default_factory=list)


def parse_split_dir(directory: Path, variant: str | None = None) -> SplitSet:
    """Parse every split list in `directory`, detecting the format from the file names.

    variant: the registry name (e.g. hmdb_ARN); default: the folder's name. Known variants take
    their prompt names from `class_names.yaml`; others derive them (`derive_class_name`).
    Raises FileNotFoundError when the folder holds no list, ValueError for a malformed line.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"split folder not found: {directory}")
    variant = variant or directory.name
    fsar_files = {s: directory / f"{s}_few_shot.txt" for s in SPLITS}
    fsar_files = {s: p for s, p in fsar_files.items() if p.is_file()}
    spm_files = {s: _spm_list(directory, s) for s in SPLITS}
    spm_files = {s: p for s, p in spm_files.items() if p is not None}
    if fsar_files and spm_files:
        raise DatasetError(
            f"{directory} mixes two list formats ({', '.join(p.name for p in fsar_files.values())}"
            f" and {', '.join(p.name for p in spm_files.values())}); keep one per folder"
        )
    if not fsar_files and not spm_files:
        raise FileNotFoundError(
            f"no split list in {directory}: expected trainlist03.txt/vallist03.txt/testlist03.txt"
            " or train_few_shot.txt/val_few_shot.txt/test_few_shot.txt"
        )
    fmt = "clipfsar" if fsar_files else "clipspm"
    parse = parse_clipfsar_list if fsar_files else parse_clipspm_list
    splits = {s: parse(path, s) for s, path in (fsar_files or spm_files).items()}
    real_names = _read_cls2real(directory)
    known = known_class_names().get(variant, {})
    class_names = {}
    for split_list in splits.values():
        for key in split_list.class_keys:
            class_names[key] = known.get(key) or real_names.get(key) or derive_class_name(key)
    return SplitSet(variant, fmt, splits, class_names, _cross_split_anomalies(splits))


def parse_clipspm_list(path: Path, split: str) -> SplitList:
    """A `<class>/<video>` list (see the module docstring for the id rules)."""
    lines, anomalies = _read_lines(path)
    pairs = []
    for number, line in lines:
        parts = line.split("/")
        if len(parts) != 2 or not all(parts):
            raise DatasetError(f"{path}:{number}: expected '<class>/<video>', got {line!r}")
        pairs.append((parts[0], parts[1]))
    ssv2 = bool(pairs) and all(_is_ssv2_pair(key, vid, split) for key, vid in pairs)
    entries = [SplitEntry(key, vid if ssv2 else f"{key}/{vid}") for key, vid in pairs]
    return _finish(path, split, entries, [n for n, _ in lines], anomalies)


def parse_clipfsar_list(path: Path, split: str) -> SplitList:
    """A `<split><index>//<relative path>` or (SSv2) `<split><index>/<id>` list."""
    lines, anomalies = _read_lines(path)
    entries, label_to_key = [], {}
    for number, line in lines:
        if "//" in line:
            label, rel_path = line.split("//", 1)
            parts = rel_path.split("/")
            if len(parts) < 2 or not all(parts):
                raise DatasetError(f"{path}:{number}: expected '<label>//<dir>/<class>/<file>'")
            class_key, stem = parts[-2], parts[-1].rsplit(".", 1)[0]
            entry = SplitEntry(class_key, f"{class_key}/{stem}", rel_path)
        else:
            label, _, video = line.partition("/")
            if not video or "/" in video:
                raise DatasetError(f"{path}:{number}: expected '<label>/<video id>', got {line!r}")
            entry = SplitEntry(label, video)
        if not re.fullmatch(rf"{split}\d+", label):
            raise DatasetError(f"{path}:{number}: label {label!r} is not '{split}<class index>'")
        previous = label_to_key.setdefault(label, entry.class_key)
        if previous != entry.class_key:
            anomalies.append(
                f"line {number}: label {label} names class {entry.class_key!r} "
                f"but earlier lines gave it {previous!r}"
            )
        entries.append(entry)
    return _finish(path, split, entries, [n for n, _ in lines], anomalies)


def derive_class_name(key: str) -> str:
    """A readable class name from a class key: `_` -> space, CamelCase split into words.

    `brush_hair` -> `brush hair`, `ApplyEyeMakeup` -> `Apply Eye Makeup`; SSv2 keys (`train8`)
    and anything else come back unchanged.
    """
    if "_" in key:
        return key.replace("_", " ")
    if re.fullmatch(r"[A-Z][A-Za-z0-9]*", key):
        return re.sub(r"(?<=[a-z0-9])(?=[A-Z])", " ", key)
    return key


def class_order(split_list: SplitList) -> list[str]:
    """Class order within a split as the releases use it: SSv2 keys by number, else first seen."""
    keys = split_list.class_keys
    if keys and all(_SSV2_KEY.match(key) for key in keys):
        return sorted(keys, key=lambda key: int(_SSV2_KEY.match(key).group(2)))
    return list(keys)


@cache
def known_class_names() -> dict[str, dict[str, str]]:
    """variant -> class key -> prompt name, from the packaged `class_names.yaml`."""
    return yaml.safe_load(CLASS_NAMES_FILE.read_text(encoding="utf-8"))


def _spm_list(directory: Path, split: str) -> Path | None:
    found = sorted(directory.glob(f"{split}list[0-9][0-9].txt"))
    if len(found) > 1:
        names = ", ".join(p.name for p in found)
        raise DatasetError(f"{directory} holds several {split} lists ({names}); keep one")
    return found[0] if found else None


def _read_lines(path: Path) -> tuple[list[tuple[int, str]], list[str]]:
    """Non-blank lines with their 1-based numbers, and what was odd about the file."""
    raw = path.read_bytes().decode("utf-8")
    anomalies = []
    if "\r" in raw:
        anomalies.append("CRLF line ends")
    rows = raw.replace("\r\n", "\n").split("\n")
    if rows and rows[-1] == "":  # the newline that ends the last line
        rows.pop()
    lines = []
    for number, row in enumerate(rows, start=1):
        text = row.strip()
        if not text:
            anomalies.append(f"line {number}: blank line")
            continue
        if text != row:
            anomalies.append(f"line {number}: surrounding whitespace around {text!r}")
        lines.append((number, text))
    return lines, anomalies


def _finish(
    path: Path, split: str, entries: list[SplitEntry], numbers: list[int], anomalies: list[str]
) -> SplitList:
    seen_line: dict[tuple, int] = {}
    seen_id: dict[str, SplitEntry] = {}
    for number, entry in zip(numbers, entries, strict=True):
        first = seen_line.setdefault((entry.class_key, entry.video_id, entry.rel_path), number)
        if first != number:
            anomalies.append(f"line {number}: duplicate of line {first} ({entry.video_id})")
            continue
        other = seen_id.setdefault(entry.video_id, entry)
        if other is not entry:
            anomalies.append(
                f"line {number}: video {entry.video_id} listed again as {_describe(entry)}"
                f" (first as {_describe(other)})"
            )
    keys = list(dict.fromkeys(entry.class_key for entry in entries))
    return SplitList(split, entries, keys, anomalies, path)


def _describe(entry: SplitEntry) -> str:
    return repr(entry.class_key) + (f" ({entry.rel_path})" if entry.rel_path else "")


def _is_ssv2_pair(key: str, video: str, split: str) -> bool:
    match = _SSV2_KEY.match(key)
    return bool(match) and match.group(1) == split and video.isdigit()


def _read_cls2real(directory: Path) -> dict[str, str]:
    path = directory / "cls2realC.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _cross_split_anomalies(splits: dict[str, SplitList]) -> list[str]:
    anomalies, owner = [], {}
    for split, split_list in splits.items():
        for video_id in split_list.unique_video_ids():
            first = owner.setdefault(video_id, split)
            if first != split:
                anomalies.append(f"video {video_id} is in both {first} and {split}")
    return anomalies
