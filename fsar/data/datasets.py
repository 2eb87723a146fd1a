"""Datasets: a benchmark's split variant (or a user's folder) + a local root -> a list of videos.

Benchmarks read the official lists (`fsar splits fetch <variant>`) and look every listed video up
under `root`, trying in this order (extensions mp4, avi, webm, mkv, or a JPEG frame folder):
  1. `<root>/<split>/<class>/<video>/`      the public pre-extracted frame sets (SPEC 4)
  2. `<root>/<class>/<video>.<ext>` or `<root>/<class>/<video>/`
  3. `<root>/<path in the line>`             CLIP-FSAR lists (videos/brush_hair/x.avi, ...)
  4. `<root>/<id>.<ext>`, `<root>/<id>/`, `<root>/<split>/<any class>/<id>/`   SSv2 ids
  5. `<root>/[<split>/]<class>/<id>_<start>_<end>.<ext>`   Kinetics clips named by time span
Directories are listed once each (no stat per candidate): the 82k SSv2-Full ids resolve in ~2 s.

`folder` (and `demo`, the same layout rendered by fsar): `DIR/<class>/<video>.<ext>` files or
`DIR/<class>/<video>/` frame folders, optional `DIR/trainlist.txt|vallist.txt|testlist.txt`
(`<class>/<video>` per line, extension optional); without lists every video is in `test`.
A listed video missing from its class folder is kept with path None (recorded as failed).
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from fsar.data.split_registry import default_splits_dir, identify_variant
from fsar.data.splits import SPLITS, SplitEntry, SplitSet, class_order, parse_split_dir
from fsar.errors import DatasetError

if TYPE_CHECKING:
    from fsar.config import DatasetConfig

VIDEO_EXTENSIONS = (".mp4", ".avi", ".webm", ".mkv")
FOLDER_DATASETS = ("folder", "demo")
_TIME_SPAN = re.compile(r"^(.+)_\d{6}_\d{6}$")


@dataclass(frozen=True)
class Benchmark:
    name: str
    variants: tuple[str, ...]  # registered split variants; the first is the default
    description: str


BENCHMARKS = {
    "kinetics": Benchmark(
        "kinetics", ("kinetics_CMN", "clipfsar_kinetics100"), "Kinetics-100, 64/12/24 classes"
    ),
    "ssv2_full": Benchmark("ssv2_full", ("ssv2_OTAM", "clipfsar_ssv2_full"), "SSv2-Full, 64/12/24"),
    "ssv2_small": Benchmark(
        "ssv2_small", ("ssv2_CMN", "clipfsar_ssv2_small"), "SSv2-Small, 64/12/24 x 100 videos"
    ),
    "ucf101": Benchmark("ucf101", ("ucf_ARN", "clipfsar_ucf101"), "UCF101, 70/10/21 classes"),
    "hmdb51": Benchmark("hmdb51", ("hmdb_ARN", "clipfsar_hmdb51"), "HMDB51, 31/10/10 classes"),
}
DATASETS = (*BENCHMARKS, *FOLDER_DATASETS)


@dataclass(frozen=True)
class VideoItem:
    video_id: str  # as in the split list, e.g. "brush_hair/April_09_..." (SSv2: "78687")
    class_name: str  # the prompted name
    class_id: int  # index into DatasetIndex.class_names
    split: str  # train | val | test
    path: Path | None  # local video file or JPEG frame folder; None when missing


@dataclass
class DatasetIndex:
    name: str
    variant: str
    class_names: list[str]  # index = class_id: train classes first, then val, then test
    items: list[VideoItem]  # every listed video of the requested splits, missing ones included
    missing: list[VideoItem]  # the items whose path is None
    class_keys: list[str] = field(default_factory=list)  # class as the lists name it, per id
    anomalies: list[str] = field(default_factory=list)  # oddities of the lists (kept, reported)


def dataset_from_config(
    section: DatasetConfig, splits: Sequence[str] | None = None
) -> DatasetIndex:
    """``load_dataset`` for a config's ``dataset`` section (its splits unless ``splits``)."""
    return load_dataset(
        section.name,
        Path(section.root),
        variant=section.variant,
        splits_dir=Path(section.splits_dir) if section.splits_dir else None,
        splits=section.splits if splits is None else splits,
    )


def load_dataset(
    name: str,
    root: Path,
    *,
    variant: str | None = None,
    splits_dir: Path | None = None,
    splits: Sequence[str] = SPLITS,
) -> DatasetIndex:
    """Index the videos of `name` under `root` (see the module docstring for the layouts).

    variant: split variant of a benchmark (default: its first, e.g. kinetics_CMN).
    splits_dir: folder holding `<variant>/` (or the variant's lists themselves); default
        `default_splits_dir()`. Class ids cover every class of the variant, whatever `splits`.
    """
    bad = [s for s in splits if s not in SPLITS]
    if bad:
        raise DatasetError(f"unknown split(s) {bad}; valid: {', '.join(SPLITS)}")
    if name in FOLDER_DATASETS:
        return load_folder_dataset(root, name=name, splits=splits)
    if name not in BENCHMARKS:
        raise DatasetError(f"unknown dataset {name!r}; valid: {', '.join(DATASETS)}")
    benchmark = BENCHMARKS[name]
    variant = variant or benchmark.variants[0]
    if variant not in benchmark.variants:
        raise DatasetError(
            f"split variant {variant!r} is not one of {name}'s: {', '.join(benchmark.variants)}"
        )
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"dataset root not found: {root}")
    lists_dir = find_split_lists(variant, splits_dir)
    split_set = parse_split_dir(lists_dir, variant)
    registered, checks = identify_variant(lists_dir)
    anomalies = [
        f"{c.name}: not the registered {variant} file" for c in checks if c.status == "differs"
    ]
    if registered != variant:
        anomalies.append(f"{lists_dir} holds {registered or 'unregistered'} lists, not {variant}")
    anomalies += [f"{s}: {a}" for s, lst in split_set.splits.items() for a in lst.anomalies]
    anomalies += split_set.anomalies
    keys = list(dict.fromkeys(k for lst in split_set.splits.values() for k in class_order(lst)))
    class_id = {key: i for i, key in enumerate(keys)}
    names = [split_set.class_names[key] for key in keys]
    paths = resolve_split_paths(split_set, root, splits)
    items, seen = [], set()
    for split in (s for s in SPLITS if s in splits and s in split_set.splits):
        for entry in split_set.splits[split].entries:
            if entry.video_id in seen:  # duplicates are reported in anomalies; keep the first
                continue
            seen.add(entry.video_id)
            cid = class_id[entry.class_key]
            items.append(
                VideoItem(entry.video_id, names[cid], cid, split, paths[split][entry.video_id])
            )
    missing = [item for item in items if item.path is None]
    return DatasetIndex(name, variant, names, items, missing, keys, anomalies)


def find_split_lists(variant: str, splits_dir: Path | None = None) -> Path:
    """The folder holding `variant`'s lists: `<splits_dir>/<variant>/` or `splits_dir` itself."""
    base = Path(splits_dir) if splits_dir is not None else default_splits_dir()
    for candidate in (base / variant, base):
        patterns = ("*_few_shot.txt", "*list[0-9][0-9].txt")
        if candidate.is_dir() and any(next(candidate.glob(p), None) for p in patterns):
            return candidate
    raise FileNotFoundError(
        f"the {variant} split lists are not in {base / variant}: run "
        f"`fsar splits fetch {variant}` (or pass --splits-dir DIR)"
    )


def resolve_split_paths(
    split_set: SplitSet, root: Path, splits: Sequence[str] = SPLITS
) -> dict[str, dict[str, Path | None]]:
    """split -> video id -> local path (None when not found), for every listed video."""
    listing = _Listing()
    root_text = str(Path(root))
    result = {}
    for split, split_list in split_set.splits.items():
        if split not in splits:
            continue
        result[split] = found = {}
        for entry in split_list.entries:
            if entry.video_id not in found:
                found[entry.video_id] = _resolve(listing, root_text, split, entry)
    return result


def load_folder_dataset(
    root: Path, *, name: str = "folder", splits: Sequence[str] = SPLITS
) -> DatasetIndex:
    """A user's folder of videos (see the module docstring); class names: `_` shown as space."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"dataset folder not found: {root}")
    videos = _scan_folder(root)
    lists = {s: root / f"{s}list.txt" for s in SPLITS if (root / f"{s}list.txt").is_file()}
    notes: list[str] = []
    if lists:
        assigned = _read_folder_lists(lists, videos, notes)
    else:
        assigned = {video_id: "test" for video_id in videos}
    ordered = [v for s in SPLITS for v, split in assigned.items() if split == s]
    keys = list(dict.fromkeys(v.split("/")[0] for v in ordered))
    class_id = {key: i for i, key in enumerate(keys)}
    names = [key.replace("_", " ") for key in keys]
    items = []
    for video_id in ordered:
        split, cid = assigned[video_id], class_id[video_id.split("/")[0]]
        if split in splits:
            path = videos.get(video_id)
            items.append(VideoItem(video_id, names[cid], cid, split, path))
    missing = [item for item in items if item.path is None]
    return DatasetIndex(name, name, names, items, missing, keys, notes)


class _Listing:
    """Directory listings, each read once with os.scandir (name -> is_dir).

    Works on plain strings: pathlib objects cost more than the lookups themselves at 80k ids.
    """

    def __init__(self) -> None:
        self._names: dict[str, dict[str, bool]] = {}
        self._spans: dict[str, dict[str, str]] = {}
        self._split_ids: dict[str, dict[str, str]] = {}

    def names(self, directory: str) -> dict[str, bool]:
        listed = self._names.get(directory)
        if listed is None:
            try:
                with os.scandir(directory) as entries:
                    listed = {e.name: e.is_dir() for e in entries}
            except (FileNotFoundError, NotADirectoryError):
                listed = {}
            self._names[directory] = listed
        return listed

    def find(self, directory: str, stem: str) -> str | None:
        """`directory/stem/` (frame folder) or `directory/stem.<ext>` (video file)."""
        names = self.names(directory)
        if not names:
            return None
        if names.get(stem) is True:
            return f"{directory}/{stem}"
        for ext in VIDEO_EXTENSIONS:
            if names.get(stem + ext) is False:
                return f"{directory}/{stem}{ext}"
        return None

    def find_span(self, directory: str, stem: str) -> str | None:
        """`directory/<stem>_<start>_<end>.<ext>` (Kinetics clips named by their time span)."""
        spans = self._spans.get(directory)
        if spans is None:
            spans = self._spans[directory] = {}
            for name in self.names(directory):
                base, ext = os.path.splitext(name)
                match = _TIME_SPAN.match(base)
                if match and ext in VIDEO_EXTENSIONS:
                    spans.setdefault(match.group(1), name)
        name = spans.get(stem)
        return f"{directory}/{name}" if name else None

    def find_in_split(self, split_dir: str, video: str) -> str | None:
        """`split_dir/<any class>/<video>/` (SSv2 frame sets keyed by another numbering)."""
        ids = self._split_ids.get(split_dir)
        if ids is None:
            ids = self._split_ids[split_dir] = {}
            for class_dir, is_dir in self.names(split_dir).items():
                if is_dir:
                    sub = f"{split_dir}/{class_dir}"
                    for name, sub_is_dir in self.names(sub).items():
                        if sub_is_dir:
                            ids.setdefault(name, f"{sub}/{name}")
        return ids.get(video)


def _resolve(listing: _Listing, root: str, split: str, entry: SplitEntry) -> Path | None:
    video = entry.video_id.rsplit("/", 1)[-1]
    by_split, by_class = f"{root}/{split}/{entry.class_key}", f"{root}/{entry.class_key}"
    found = listing.find(by_split, video) or listing.find(by_class, video)
    if found is None and entry.rel_path is not None:
        parent, _, name = f"{root}/{entry.rel_path}".rpartition("/")
        if name in listing.names(parent):
            found = f"{parent}/{name}"
    if found is None and "/" not in entry.video_id:
        found = listing.find(root, video) or listing.find_in_split(f"{root}/{split}", video)
    if found is None:
        found = listing.find_span(by_split, video) or listing.find_span(by_class, video)
    return Path(found) if found is not None else None


def _scan_folder(root: Path) -> dict[str, Path]:
    """`<class>/<video>` -> path for every video file or frame folder under `root`."""
    videos: dict[str, Path] = {}
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not class_dirs:
        raise DatasetError(
            f"{root} holds no class folders: expected {root}/<class>/<video>.<ext> "
            f"({', '.join(VIDEO_EXTENSIONS)}) or {root}/<class>/<video>/ JPEG frame folders"
        )
    for class_dir in class_dirs:
        count = 0
        for path in sorted(class_dir.iterdir()):
            if path.name.startswith(".") or not (path.is_dir() or path.suffix in VIDEO_EXTENSIONS):
                continue
            video_id = f"{class_dir.name}/{path.stem if path.is_file() else path.name}"
            if video_id in videos:
                raise DatasetError(f"{video_id} is ambiguous: both {videos[video_id]} and {path}")
            videos[video_id] = path
            count += 1
        if count == 0:
            raise DatasetError(
                f"class folder {class_dir} holds no videos ({', '.join(VIDEO_EXTENSIONS)}) "
                "or JPEG frame folders"
            )
    return videos


def _read_folder_lists(
    lists: dict[str, Path], videos: dict[str, Path], notes: list[str]
) -> dict[str, str]:
    """video id -> split from the folder's list files; every problem reported at once.

    A listed video absent from an existing class folder stays listed (path None: the extraction
    runner records it as failed, like any unreadable video) and is noted; a line that is not
    `<class>/<video>`, names a class folder that does not exist, or repeats a video is an error.
    """
    classes = {video_id.split("/")[0] for video_id in videos}
    assigned: dict[str, str] = {}
    where: dict[str, str] = {}
    errors = []
    for split, path in lists.items():
        for number, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            line = raw.strip()
            if not line:
                continue
            stem, ext = os.path.splitext(line)
            video_id = stem if ext in VIDEO_EXTENSIONS else line
            parts = video_id.split("/")
            here = f"{path.name}:{number}"
            if len(parts) != 2 or not all(parts):
                errors.append(f"{here}: expected '<class>/<video>', got {line!r}")
            elif parts[0] not in classes:
                errors.append(f"{here}: class folder {path.parent / parts[0]} does not exist")
            elif video_id in assigned:
                errors.append(f"{here}: {video_id} is already listed at {where[video_id]}")
            else:
                assigned[video_id], where[video_id] = split, here
                if video_id not in videos:
                    notes.append(f"{here}: {video_id} is listed but not under {path.parent}")
    if errors:
        more = f"\n  ... and {len(errors) - 10} more" if len(errors) > 10 else ""
        raise DatasetError("problems in the split lists:\n  " + "\n  ".join(errors[:10]) + more)
    return assigned
