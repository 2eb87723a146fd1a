"""Extraction throughput: the fsar runner against a naive loop, same inputs, same model, one run.

The naive loop is what release-style code does per video: decode every needed frame to a PIL
image, transform each image on its own, push one image at a time through the encoder.
Two inputs, both measured: JPEG frame folders (the input of the CLIP-SPM release, which reads
pre-extracted frames with PIL) and mp4 files (decoded sequentially, since h264 frames depend on
earlier ones). Writes JSON (frames/s of both loops per input, their ratio, the machine).
Absolute numbers only mean something on the machine recorded with them; the ratio is the claim.

    python benchmarks/extract.py --out benchmarks/results/extract.json [--model fsar-tiny-vit]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import av
import numpy as np
import torch
from PIL import Image
from torchvision import transforms as T

from fsar.config import load_config
from fsar.data.frames import parse_frame_policy, select_frames
from fsar.data.synthetic import write_frame_folder, write_video
from fsar.data.video import open_source
from fsar.extract.encoders import EncoderSpec, build_encoder
from fsar.extract.runner import run_extraction


def render(
    root: Path, n_videos: int, n_frames: int, size: tuple[int, int], kind: str = "mp4"
) -> list[Path]:
    """Camera-like content (smooth gradients, a moving object, mild noise): pure random noise
    would make both loops measure nothing but the codec's worst case."""
    rng = np.random.default_rng(0)
    height, width = size
    ys, xs = np.mgrid[0:height, 0:width]
    paths = []
    for index in range(n_videos):
        base = np.stack([(xs * (index + 1)) % 256, ys % 256, (xs + ys) % 256], -1)
        frames = np.repeat(base[None], n_frames, 0).astype(np.int16)
        for t in range(n_frames):
            x = (t * 3 + index * 7) % (width - 40)
            frames[t, 60:100, x : x + 40] = (255, 64, 32)
        frames += rng.integers(-6, 7, size=frames.shape, dtype=np.int16)
        frames = np.clip(frames, 0, 255).astype(np.uint8)
        if kind == "jpeg":
            path = root / f"class{index % 4}" / f"video{index}"
            write_frame_folder(path, frames)
        else:
            path = root / f"class{index % 4}" / f"video{index}.mp4"
            write_video(path, frames, fps=25)
        paths.append(path)
    return paths


def naive_loop(
    paths: list[Path], model_name: str, seq_len: int, random_init: bool
) -> tuple[int, float]:
    encoder = build_encoder(EncoderSpec(model_name, random_init=random_init))
    crop = encoder.image_size
    transform = T.Compose(
        [
            T.Resize(round(crop * 256 / 224), interpolation=T.InterpolationMode.BICUBIC),
            T.CenterCrop(crop),
            T.ToTensor(),
            T.Normalize((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
        ]
    )
    policy = parse_frame_policy("reference_test", seq_len=seq_len)
    frames = 0
    start = time.perf_counter()
    with torch.no_grad():
        for path in paths:
            images = read_pil_frames(path, policy)
            for image in images:
                encoder.model.encode_image(transform(image).unsqueeze(0))
                frames += 1
    return frames, time.perf_counter() - start


def read_pil_frames(path: Path, policy) -> list[Image.Image]:
    if path.is_dir():  # a JPEG frame folder: open only the needed files, as the release does
        files = sorted(path.glob("*.jpg"))
        return [Image.open(files[i]).convert("RGB") for i in select_frames(policy, len(files))]
    with av.open(str(path)) as container:
        wanted = set(select_frames(policy, container.streams.video[0].frames))
        return [  # decode sequentially, turn only the needed frames into PIL images
            frame.to_image()
            for index, frame in enumerate(container.decode(video=0))
            if index in wanted
        ]


def serial_decode_seconds(paths: list[Path], seq_len: int) -> float:
    """Time to decode every video's needed frames in one process with fsar's own sources:
    on a CPU-bound machine, naive time / (this / cores) bounds any decode-in-workers speedup."""
    policy = parse_frame_policy("reference_test", seq_len=seq_len)
    start = time.perf_counter()
    for path in paths:
        source = open_source(path)
        source.read(select_frames(policy, source.num_frames))
    return time.perf_counter() - start


def fsar_runner(
    root: Path, out: Path, model_name: str, workers: int, random_init: bool
) -> tuple[int, float]:
    config = load_config(
        [],
        [
            "dataset.name=folder",
            f"dataset.root={root}",
            f"model.name={model_name}",
            f"model.random_init={str(random_init).lower()}",
            f"extract.out={out}",
            f"extract.workers={workers}",
        ],
    )
    start = time.perf_counter()
    result = run_extraction(config, progress=False)
    return result.frames_now, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/extract.json")
    parser.add_argument("--model", default="fsar-tiny-vit")
    parser.add_argument("--videos", type=int, default=512)
    parser.add_argument("--frames", type=int, default=64, help="frames per rendered video")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    random_init = not args.model.startswith("fsar-tiny")
    inputs = {}
    for kind in ("jpeg", "mp4"):
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp) / "videos"
            paths = render(root, args.videos, args.frames, (180, 240), kind)
            naive_frames, naive_seconds = naive_loop(paths, args.model, 8, random_init)
            decode_seconds = serial_decode_seconds(paths, 8)
            fsar_frames, fsar_seconds = fsar_runner(
                root, Path(tmp) / "store.zarr", args.model, args.workers, random_init
            )
        assert naive_frames == fsar_frames, (naive_frames, fsar_frames)
        naive_rate, fsar_rate = naive_frames / naive_seconds, fsar_frames / fsar_seconds
        inputs[kind] = {
            "frames_encoded": fsar_frames,
            "naive_frames_per_s": round(naive_rate, 1),
            "fsar_frames_per_s": round(fsar_rate, 1),
            "speedup": round(fsar_rate / naive_rate, 2),
            "serial_decode_seconds": round(decode_seconds, 2),
            "decode_bound_speedup": round(
                naive_seconds / (decode_seconds / (os.cpu_count() or 1)), 2
            ),
        }
    report = {
        "benchmark": "extract",
        "model": args.model,
        "videos": args.videos,
        "frames_per_video_rendered": args.frames,
        "frame_size": [180, 240],
        "workers": args.workers,
        "inputs": inputs,
        "fsar_seconds_include": "store creation, text encoding, worker start-up",
        "device": "cuda:" + torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "cpu_count": os.cpu_count(),
        "machine": platform.platform(),
        "torch": torch.__version__,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
