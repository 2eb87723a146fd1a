"""Registry of the official split lists (`splits_registry.yaml`): fetch, hash-check, identify.

A split variant (e.g. `hmdb_ARN`, `clipfsar_ssv2_full`) is a set of list files identified by
their sha256. `fetch_split` downloads them into `<dest>/<variant>/` and refuses any file whose
hash differs; `verify_split_dir` tells which variant a folder holds, which files differ and,
given the local copy of the dataset, which listed videos are missing from it.
"""

from __future__ import annotations

import hashlib
import os
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from fsar.atomic import write_atomic
from fsar.data.splits import SPLITS, parse_split_dir
from fsar.errors import DatasetError, FsarError

REGISTRY_FILE = Path(__file__).with_name("splits_registry.yaml")
_FILE_KEYS = {"name", "url", "sha256", "required", "note"}
_VARIANT_KEYS = {"benchmark", "description", "source", "note", "files"}


class SplitFetchError(FsarError, RuntimeError):
    """A list could not be fetched, or its bytes are not the registered ones."""


@dataclass(frozen=True)
class RegistryFile:
    name: str  # file name inside the variant folder
    url: str | None  # public address pinned to a commit; None when none was confirmed
    sha256: str
    required: bool = True  # False: informational file fsar does not read
    note: str = ""


@dataclass(frozen=True)
class SplitVariant:
    name: str
    benchmark: str  # kinetics | ssv2_full | ssv2_small | ucf101 | hmdb51
    files: tuple[RegistryFile, ...]
    description: str
    source: str = ""  # the release(s) the lists come from
    note: str = ""


@dataclass(frozen=True)
class FileCheck:
    name: str
    status: str  # ok | differs | missing | missing-optional | unregistered
    expected: str | None = None
    actual: str | None = None


@dataclass
class VerifyReport:
    directory: Path
    variant: str | None  # the registered variant the folder holds; None when nothing matches
    files: list[FileCheck]
    counts: dict[str, tuple[int, int]] = field(default_factory=dict)  # split -> (classes, lines)
    anomalies: list[str] = field(default_factory=list)
    root: Path | None = None
    missing: dict[str, list[str]] = field(default_factory=dict)  # split -> ids absent under root
    found: dict[str, int] = field(default_factory=dict)  # split -> distinct ids found under root

    @property
    def ok(self) -> bool:
        """Every registered file present with its registered hash (optional files may be absent)."""
        good = {"ok", "missing-optional", "unregistered"}
        return self.variant is not None and all(check.status in good for check in self.files)


def load_registry(path: Path = REGISTRY_FILE) -> dict[str, SplitVariant]:
    """All registered split variants by name."""
    data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    variants = {}
    for name, entry in data["variants"].items():
        _check_keys(entry, _VARIANT_KEYS, f"{path}: variant {name}")
        files = []
        for item in entry["files"]:
            _check_keys(item, _FILE_KEYS, f"{path}: variant {name} file {item.get('name')}")
            files.append(RegistryFile(**item))
        fields = {k: v for k, v in entry.items() if k != "files"}
        variants[name] = SplitVariant(name=name, files=tuple(files), **fields)
    return variants


def resolve_variant(name: str) -> SplitVariant:
    """A registered variant by its name, or the default variant of a benchmark name."""
    from fsar.data.datasets import BENCHMARKS  # local import: datasets imports this module

    registry = load_registry()
    if name in registry:
        return registry[name]
    if name in BENCHMARKS:
        return registry[BENCHMARKS[name].variants[0]]
    raise DatasetError(
        f"unknown split variant or benchmark {name!r}; variants: {', '.join(sorted(registry))}; "
        f"benchmarks: {', '.join(BENCHMARKS)}"
    )


def default_splits_dir() -> Path:
    """Where fetched lists live: $FSAR_SPLITS_DIR, else ~/.cache/fsar/splits."""
    env = os.environ.get("FSAR_SPLITS_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "fsar" / "splits"


def sha256_file(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def fetch_split(
    name: str,
    dest: Path | None = None,
    *,
    mirror: str | None = None,
    timeout: float = 30,
    report: Callable[[str], None] | None = None,
) -> Path:
    """Download a variant's lists into `<dest>/<variant>/` and return that folder.

    name: a variant (hmdb_ARN) or a benchmark (hmdb51 -> its default variant).
    dest: parent folder (default `default_splits_dir()`).
    mirror: replaces every registered address by `<mirror>/<variant>/<file>`: a local folder
        (also accepted: the variant folder itself), or a file:// / http(s):// base address.
    Files already present with the right hash are kept. Every download is hash-checked before it
    is written (temporary file + rename), so a folder never holds unverified bytes.
    Raises SplitFetchError naming the file, the expected and the actual hash on a mismatch, and
    before any download when a required file has no known address and no mirror is given.
    """
    say = report or (lambda _line: None)
    variant = resolve_variant(name)
    folder = Path(dest if dest is not None else default_splits_dir()) / variant.name
    todo, unavailable = [], []
    for file in variant.files:
        target = folder / file.name
        if target.is_file() and sha256_file(target) == file.sha256:
            say(f"present  {target}")
            continue
        source = _source(variant.name, file, mirror)
        if isinstance(source, Path) and not source.is_file() and not file.required:
            source = None  # a mirror folder without an optional file
        if source is None and file.required:
            unavailable.append(file)
        elif source is None:
            say(f"skipped  {file.name} (optional, not available: {file.note})")
        else:
            todo.append((file, source))
    if unavailable:
        lines = [f"  {f.name} (sha256 {f.sha256}): {f.note}" for f in unavailable]
        raise SplitFetchError(
            f"no public address is registered for these {variant.name} files:\n"
            + "\n".join(lines)
            + f"\nput them in {folder} by hand, or pass --mirror DIR|URL holding "
            f"<mirror>/{variant.name}/<file>"
        )
    folder.mkdir(parents=True, exist_ok=True)
    for file, source in todo:
        data = _read_source(source, timeout)
        actual = hashlib.sha256(data).hexdigest()
        if actual != file.sha256:
            raise SplitFetchError(
                f"refusing {variant.name}/{file.name} from {source}: its sha256 is {actual}, "
                f"the registry expects {file.sha256}"
            )
        write_atomic(folder / file.name, data)
        say(f"fetched  {folder / file.name}")
    return folder


def identify_variant(directory: Path) -> tuple[str | None, list[FileCheck]]:
    """Which registered variant a folder of lists holds, and how each of its files compares.

    The variant is the one sharing the most (file name, sha256) pairs with the folder; with no
    match at all, the variant named like the folder (if any), so its files show as differing.
    """
    directory = Path(directory)
    present = {
        p.name: sha256_file(p)
        for p in sorted(directory.iterdir())
        if p.is_file() and not p.name.startswith(".")
    }
    registry = load_registry()

    def score(variant: SplitVariant) -> tuple[int, bool]:
        matches = sum(present.get(f.name) == f.sha256 for f in variant.files)
        return matches, variant.name == directory.name

    best = max(registry.values(), key=score, default=None)
    if best is None or score(best) == (0, False):
        checks = [FileCheck(n, "unregistered", None, h) for n, h in present.items()]
        return None, checks
    checks = []
    for file in best.files:
        actual = present.get(file.name)
        if actual is None:
            status = "missing" if file.required else "missing-optional"
        else:
            status = "ok" if actual == file.sha256 else "differs"
        checks.append(FileCheck(file.name, status, file.sha256, actual))
    known = {f.name for f in best.files}
    checks += [FileCheck(n, "unregistered", None, h) for n, h in present.items() if n not in known]
    return best.name, checks


def verify_split_dir(directory: Path, *, root: Path | None = None) -> VerifyReport:
    """Hash-check a folder of lists against the registry; with `root`, list missing videos."""
    from fsar.data.datasets import resolve_split_paths  # local import: datasets imports us

    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"split folder not found: {directory}")
    variant, checks = identify_variant(directory)
    report = VerifyReport(directory, variant, checks, root=Path(root) if root else None)
    try:
        split_set = parse_split_dir(directory, variant)
    except (FileNotFoundError, ValueError) as err:
        report.anomalies.append(f"lists not parsed: {err}")
        return report
    for split, split_list in split_set.splits.items():
        report.counts[split] = (len(split_list.class_keys), len(split_list.entries))
        report.anomalies += [f"{split}: {a}" for a in split_list.anomalies]
    report.anomalies += split_set.anomalies
    if report.root is not None:
        paths = resolve_split_paths(split_set, report.root)
        for split, split_list in split_set.splits.items():
            ids = split_list.unique_video_ids()
            report.missing[split] = [v for v in ids if paths[split][v] is None]
            report.found[split] = len(ids) - len(report.missing[split])
    return report


def format_verify_report(report: VerifyReport, max_missing: int = 20) -> str:
    """Readable text for `fsar splits verify`."""
    if report.variant is None:
        head = f"{report.directory}: matches no registered split variant"
    else:
        state = "lists verified" if report.ok else "LISTS DO NOT MATCH THE REGISTRY"
        head = f"{report.directory}: variant {report.variant} - {state}"
    lines = [head]
    note = load_registry().get(report.variant or "", None)
    if note is not None and note.note:
        lines.append(f"  note: {note.note}")
    for check in report.files:
        if check.status == "differs":
            lines.append(
                f"  DIFFERS  {check.name}: sha256 {check.actual}, expected {check.expected}"
            )
        else:
            digest = (check.actual or check.expected or "")[:16]
            lines.append(f"  {check.status:<16} {check.name:<22} {digest}")
    for split in SPLITS:
        if split in report.counts:
            classes, videos = report.counts[split]
            lines.append(f"  {split:<5}: {classes} classes, {videos} listed videos")
    lines += [f"  anomaly: {a}" for a in report.anomalies]
    if report.root is not None:
        for split, missing in report.missing.items():
            found = report.found[split]
            lines.append(
                f"  {report.root} [{split}]: {found}/{found + len(missing)} videos found, "
                f"{len(missing)} missing"
            )
            lines += [f"    missing {video_id}" for video_id in missing[:max_missing]]
            if len(missing) > max_missing:
                lines.append(f"    ... and {len(missing) - max_missing} more")
    return "\n".join(lines)


def _check_keys(entry: dict, allowed: set[str], where: str) -> None:
    unknown = sorted(set(entry) - allowed)
    if unknown:
        raise DatasetError(f"{where}: unknown key(s) {unknown}; valid: {sorted(allowed)}")


def _source(variant: str, file: RegistryFile, mirror: str | None) -> str | Path | None:
    if mirror is None:
        return file.url
    if mirror.startswith(("http://", "https://", "file://")):
        return f"{mirror.rstrip('/')}/{variant}/{file.name}"
    base = Path(mirror).expanduser()
    nested = base / variant / file.name
    return nested if nested.is_file() or not (base / file.name).is_file() else base / file.name


def _read_source(source: str | Path, timeout: float) -> bytes:
    if isinstance(source, Path):
        if not source.is_file():
            raise SplitFetchError(f"mirror file not found: {source}")
        return source.read_bytes()
    try:
        with urllib.request.urlopen(source, timeout=timeout) as response:
            return response.read()
    except (urllib.error.URLError, OSError) as err:
        raise SplitFetchError(
            f"could not download {source}: {err}. Offline or behind a firewall? Copy the lists "
            "from a machine that can reach it and pass --mirror DIR"
        ) from err
