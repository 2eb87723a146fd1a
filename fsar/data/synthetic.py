"""Writing real video files / JPEG folders, and the synthetic demo dataset (SPEC 8).

The demo dataset holds pairs of "visually similar actions": both classes of a pair show the same
object on the same background and differ only in temporal order (moving right vs. left, growing
vs. shrinking, ...). A video of the reversed class is rendered exactly like one of the forward
class and then played backwards, so the two classes have the same distribution of single frames:
an order-free representation (the frame mean) cannot tell them apart; a temporal alignment can.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

# suffix -> (FFmpeg encoder, encoder options). One encoder thread: the bytes then depend only on
# the frames and the library version, not on the machine's core count.
_ENCODERS = {
    ".mp4": ("libx264", {"crf": "18", "preset": "superfast"}),
    ".avi": ("mpeg4", {}),
    ".webm": ("libvpx-vp9", {"crf": "24", "b": "0", "deadline": "realtime", "cpu-used": "8"}),
}


def write_video(path: Path, frames: np.ndarray, fps: int = 12) -> None:
    """Encode uint8 RGB frames `[T, H, W, 3]` (H, W even) to `path`, atomically.

    The codec follows the suffix: .mp4 H.264 (libx264, yuv420p), .avi MPEG-4 part 2,
    .webm VP9 (libvpx-vp9). The file appears under its final name only once complete.
    """
    import av

    path = Path(path)
    frames = np.asarray(frames)
    if path.suffix.lower() not in _ENCODERS:
        raise ValueError(f"unsupported video suffix {path.suffix!r}; valid: {', '.join(_ENCODERS)}")
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3 or len(frames) == 0:
        raise ValueError(f"frames must be uint8 [T>0, H, W, 3], got {frames.dtype} {frames.shape}")
    height, width = frames.shape[1:3]
    if height % 2 or width % 2:
        raise ValueError(f"frame height and width must be even (yuv420p), got {height}x{width}")
    codec, options = _ENCODERS[path.suffix.lower()]
    partial = path.with_name(f".{path.stem}.partial{path.suffix}")
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(partial), mode="w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = options
        stream.codec_context.thread_count = 1
        if codec == "mpeg4":
            stream.bit_rate = 8_000_000  # near-lossless for the small frames used here
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())  # flush
    os.replace(partial, path)


def write_frame_folder(directory: Path, frames: np.ndarray, quality: int = 95) -> None:
    """Write uint8 RGB frames `[T, H, W, 3]` as `directory/00001.jpg, 00002.jpg, ...` (PIL)."""
    from PIL import Image

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for number, frame in enumerate(np.asarray(frames), start=1):
        Image.fromarray(frame).save(directory / f"{number:05d}.jpg", quality=quality)


# ----------------------------------------------------------------------------- demo dataset

# Shapes in object coordinates (u, v): the object's extent is about [-1, 1]^2.
_SHAPES: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    "circle": lambda u, v: u**2 + v**2 <= 1,
    "square": lambda u, v: np.maximum(abs(u), abs(v)) <= 0.85,
    "triangle": lambda u, v: (v <= 0.7) & (v >= 2 * abs(u) - 1.2),
    "diamond": lambda u, v: abs(u) + abs(v) <= 1,
    "cross": lambda u, v: (abs(u) <= 0.33) & (abs(v) <= 1) | (abs(v) <= 0.33) & (abs(u) <= 1),
    "ring": lambda u, v: (u**2 + v**2 <= 1) & (u**2 + v**2 >= 0.35),
    "bar": lambda u, v: (abs(u) <= 1) & (abs(v) <= 0.35),
    "arrow": lambda u, v: (abs(v) <= 0.25) & (u >= -1) & (u <= 0.2) | (u > 0.2) & (abs(v) <= 1 - u),
    "star": lambda u, v: np.hypot(u, v) <= 0.6 + 0.4 * np.cos(5 * np.arctan2(v, u)),
    "hexagon": lambda u, v: np.maximum(abs(v), (abs(v) + np.sqrt(3) * abs(u)) / 2) <= 0.9,
    "ellipse": lambda u, v: (u / 1.0) ** 2 + (v / 0.6) ** 2 <= 1,
    "blob": lambda u, v: np.hypot(u, v) <= 0.8 + 0.2 * np.sin(3 * np.arctan2(v, u)),
}
# Textures in object coordinates: a brightness factor, so they move/rotate with the object.
_TEXTURES: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    "solid": lambda u, v: np.ones_like(u),
    "stripes": lambda u, v: 0.6 + 0.4 * (np.sin(7 * u) > 0),
    "checker": lambda u, v: 0.6 + 0.4 * ((np.floor(2.5 * u) + np.floor(2.5 * v)) % 2),
    "dots": lambda u, v: 1 - 0.45 * (np.hypot((u * 2.5) % 1 - 0.5, (v * 2.5) % 1 - 0.5) < 0.25),
}
# motion kind -> (forward class suffix, reversed class suffix)
MOTIONS = {
    "translate_x": ("moving_right", "moving_left"),
    "translate_y": ("moving_down", "moving_up"),
    "scale": ("growing", "shrinking"),
    "rotate": ("rotating_clockwise", "rotating_counterclockwise"),
    "fill": ("filling", "emptying"),
    "fade": ("fading_in", "fading_out"),
}
# (colour, object RGB, shape, texture, background RGB); pair i moves with motion kind i % 6, so
# every motion kind of the val/test pairs is also seen (on other objects) in training.
_APPEARANCES = [
    ("red", (220, 50, 40), "circle", "stripes", (40, 40, 70)),
    ("blue", (40, 90, 230), "square", "checker", (200, 190, 150)),
    ("green", (50, 190, 60), "diamond", "dots", (60, 30, 40)),
    ("yellow", (235, 210, 40), "triangle", "stripes", (30, 70, 90)),
    ("purple", (150, 60, 200), "ring", "solid", (210, 220, 200)),
    ("orange", (250, 140, 30), "star", "checker", (20, 50, 30)),
    ("cyan", (40, 210, 220), "hexagon", "solid", (90, 20, 20)),
    ("white", (240, 240, 240), "cross", "dots", (60, 60, 60)),
    ("pink", (240, 120, 180), "ellipse", "stripes", (30, 60, 30)),
    ("lime", (170, 240, 60), "arrow", "solid", (70, 40, 110)),
    ("brown", (150, 90, 40), "bar", "checker", (170, 210, 230)),
    ("teal", (20, 140, 130), "blob", "dots", (230, 200, 170)),
]


@dataclass(frozen=True)
class DemoSpec:
    """Size and randomness of the demo dataset (defaults: 24 classes, 240 videos, ~5 s)."""

    n_pairs: int = 12  # class pairs (2 classes each); at most 12
    train_pairs: int = 6  # first pairs -> train; then val_pairs; the rest -> test
    val_pairs: int = 3
    videos_per_class: int = 10
    n_frames: int = 20  # mean frames per video
    frames_jitter: int = 4  # per video n_frames +- frames_jitter
    size: int = 96  # square frames, even
    fps: int = 12
    noise: float = 4.0  # std of per-pixel Gaussian noise (0-255 scale)
    seed: int = 0
    suffix: str = ".mp4"

    def __post_init__(self) -> None:
        if not 1 <= self.n_pairs <= len(_APPEARANCES):
            raise ValueError(f"n_pairs={self.n_pairs}; valid: 1..{len(_APPEARANCES)}")
        if (
            self.train_pairs < 1
            or self.val_pairs < 0
            or self.train_pairs + self.val_pairs >= self.n_pairs
        ):
            raise ValueError(
                f"train_pairs={self.train_pairs}, val_pairs={self.val_pairs} leave no test pair "
                f"of n_pairs={self.n_pairs}"
            )
        if self.size % 2 or self.size < 32:
            raise ValueError(f"size={self.size}; must be even and >= 32")
        if self.n_frames - self.frames_jitter < 2 or self.frames_jitter < 0:
            raise ValueError(
                f"n_frames={self.n_frames}, frames_jitter={self.frames_jitter}; need "
                "frames_jitter >= 0 and n_frames - frames_jitter >= 2"
            )
        if self.videos_per_class < 1 or self.seed < 0:
            raise ValueError(
                f"videos_per_class={self.videos_per_class}, seed={self.seed}; need >= 1 and >= 0"
            )
        if self.suffix not in _ENCODERS:
            raise ValueError(f"suffix={self.suffix!r}; valid: {', '.join(_ENCODERS)}")


@dataclass(frozen=True)
class DemoPair:
    """Two classes sharing one appearance; `reverse` is `forward` played backwards."""

    index: int
    motion: str  # key of MOTIONS
    colour: str
    rgb: tuple[int, int, int]
    shape: str
    texture: str
    background: tuple[int, int, int]

    @property
    def forward(self) -> str:
        return f"{self.colour}_{self.shape}_{MOTIONS[self.motion][0]}"

    @property
    def reverse(self) -> str:
        return f"{self.colour}_{self.shape}_{MOTIONS[self.motion][1]}"


@dataclass(frozen=True)
class DemoInfo:
    """What `render_demo_dataset` wrote."""

    root: Path
    pairs: tuple[DemoPair, ...]
    train_classes: tuple[str, ...]
    val_classes: tuple[str, ...]
    test_classes: tuple[str, ...]
    n_videos: int

    @property
    def classes(self) -> tuple[str, ...]:
        return self.train_classes + self.val_classes + self.test_classes


def demo_pairs(spec: DemoSpec) -> tuple[DemoPair, ...]:
    """The spec's class pairs, in split order (train pairs, then val, then test)."""
    kinds = list(MOTIONS)
    return tuple(DemoPair(i, kinds[i % len(kinds)], *_APPEARANCES[i]) for i in range(spec.n_pairs))


def render_clip(
    pair: DemoPair, rng: np.random.Generator, spec: DemoSpec, reverse: bool = False
) -> np.ndarray:
    """One video of `pair` as uint8 `[n, size, size, 3]`, n = spec.n_frames +- frames_jitter.

    All randomness (length, timing, position, extent, colours, noise) comes from `rng`; with
    `reverse` the same frames are returned in reverse order (the reversed class).
    """
    size = spec.size
    n = int(
        rng.integers(spec.n_frames - spec.frames_jitter, spec.n_frames + spec.frames_jitter + 1)
    )
    start, duration = rng.uniform(0.0, 0.15), rng.uniform(0.7, 0.85)
    progress = np.clip((np.linspace(0, 1, n) - start) / duration, 0, 1)  # [n] in [0, 1]
    colour = np.clip(np.array(pair.rgb) + rng.uniform(-20, 20, 3), 0, 255)
    background = np.clip(np.array(pair.background) + rng.uniform(-15, 15, 3), 0, 255)
    # Defaults: object centred, radius ~ 0.14 size, upright, full, opaque.
    cx = cy = np.full(n, size / 2 + rng.uniform(-0.05, 0.05) * size)
    radius = np.full(n, rng.uniform(0.12, 0.16) * size)
    angle = np.full(n, rng.uniform(-0.1, 0.1) * np.pi)
    level, alpha = np.ones(n), np.ones(n)
    if pair.motion in ("translate_x", "translate_y"):
        extent = rng.uniform(0.45, 0.6) * size
        origin = rng.uniform(0.18 * size, 0.82 * size - extent)
        track = origin + progress * extent
        cx, cy = (track, cy) if pair.motion == "translate_x" else (cx, track)
    elif pair.motion == "scale":
        small, large = rng.uniform(0.05, 0.08) * size, rng.uniform(0.26, 0.32) * size
        radius = small + progress * (large - small)
    elif pair.motion == "rotate":
        angle = angle + progress * rng.uniform(0.5, 0.7) * np.pi  # y points down: clockwise
        radius = radius * 1.6
    elif pair.motion == "fill":
        level, radius = progress, radius * 1.8
    else:  # fade
        alpha = progress
    grid = np.arange(size, dtype=np.float32) + np.float32(0.5)  # pixel centres
    shape, texture = _SHAPES[pair.shape], _TEXTURES[pair.texture]
    colour, background = colour.astype(np.float32), background.astype(np.float32)
    frames = np.empty((n, size, size, 3), np.float32)
    frames[:] = background
    for t in range(n):
        r, a, lift = float(radius[t]), float(alpha[t]), 1.2 * float(radius[t]) * (1 - 2 * level[t])
        half = int(1.6 * r) + 2  # every shape fits in |u|, |v| <= 1.1: draw only this box
        top, left = max(int(cy[t]) - half, 0), max(int(cx[t]) - half, 0)
        rows, cols = slice(top, int(cy[t]) + half + 1), slice(left, int(cx[t]) + half + 1)
        dy = (grid[rows] - np.float32(cy[t]))[:, None]  # [h, 1]
        dx = (grid[cols] - np.float32(cx[t]))[None, :]  # [1, w]
        cos, sin = np.float32(np.cos(angle[t]) / r), np.float32(np.sin(angle[t]) / r)
        u, v = dx * cos + dy * sin, dy * cos - dx * sin  # [h, w] object coordinates
        inside = shape(u, v)
        filled = inside & (dy >= lift)  # liquid level, rising from below
        outline = inside & ~shape(u / np.float32(0.82), v / np.float32(0.82))
        cover = (filled | outline)[..., None].astype(np.float32) * np.float32(a)  # [h, w, 1]
        paint = colour * texture(u, v)[..., None].astype(np.float32)
        frames[t, rows, cols] = background + (paint - background) * cover
    noise = rng.standard_normal((n, size, size, 1), dtype=np.float32)  # grey: same on R, G, B
    frames += noise * np.float32(spec.noise) + np.float32(0.5)  # + 0.5: round when truncating
    clip = np.clip(frames, 0, 255, out=frames).astype(np.uint8)
    return np.ascontiguousarray(clip[::-1]) if reverse else clip


def render_demo_dataset(root: Path, spec: DemoSpec = DemoSpec()) -> DemoInfo:
    """Render the demo to `root/<class>/v000.mp4 ...` plus `trainlist.txt`, `vallist.txt`,
    `testlist.txt` (one `<class>/<video>` per line). Deterministic from `spec.seed`.

    A root already holding a complete render of the same spec is reused as is (the marker
    `demo_spec.json` is written last). A root holding anything else is refused.
    """
    root = Path(root)
    pairs = demo_pairs(spec)
    info = _demo_info(root, pairs, spec)
    marker = root / "demo_spec.json"
    wanted = json.dumps(asdict(spec), sort_keys=True)
    if marker.exists():
        if marker.read_text() == wanted:
            return info
        raise ValueError(
            f"{root} holds a demo rendered with another spec ({marker.read_text()}); "
            "delete it or choose another root"
        )
    ours = set(info.classes) | {f"{s}list.txt" for s in ("train", "val", "test")}
    foreign = sorted(p.name for p in root.iterdir() if p.name not in ours) if root.exists() else []
    if foreign:
        raise ValueError(
            f"{root} is not empty and not a demo dataset (found {foreign[:5]}); "
            "choose an empty or new folder"
        )
    lists: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    for pair in pairs:
        split = _split_of(pair.index, spec)
        for side, name in enumerate((pair.forward, pair.reverse)):
            for k in range(spec.videos_per_class):
                rng = np.random.default_rng([spec.seed, pair.index, side, k])
                clip = render_clip(pair, rng, spec, reverse=side == 1)
                write_video(root / name / f"v{k:03d}{spec.suffix}", clip, fps=spec.fps)
                lists[split].append(f"{name}/v{k:03d}")
    for split, lines in lists.items():
        (root / f"{split}list.txt").write_text("".join(line + "\n" for line in lines))
    marker.write_text(wanted)
    return info


def _split_of(index: int, spec: DemoSpec) -> str:
    if index < spec.train_pairs:
        return "train"
    return "val" if index < spec.train_pairs + spec.val_pairs else "test"


def _demo_info(root: Path, pairs: tuple[DemoPair, ...], spec: DemoSpec) -> DemoInfo:
    by_split: dict[str, tuple[str, ...]] = {"train": (), "val": (), "test": ()}
    for pair in pairs:
        by_split[_split_of(pair.index, spec)] += (pair.forward, pair.reverse)
    n_videos = 2 * len(pairs) * spec.videos_per_class
    return DemoInfo(root, pairs, by_split["train"], by_split["val"], by_split["test"], n_videos)
