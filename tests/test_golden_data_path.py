"""The release presets feed the encoder what each release feeds it (golden/data_path, normative).

The golden files come from running the CLIP-SPM and CLIP-FSAR releases' own code on the small
media of the shared folder; here the same media go through fsar's decoders, the release presets'
pixel rules, the real extraction runner and the `fsar frames` command.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

from fsar.cache import StoreMismatchError, open_store
from fsar.cache.bank import load_bank
from fsar.config import load_config
from fsar.data.release_frames import release_indices, resolve_rule
from fsar.data.transforms import (
    apply_view,
    center_offsets,
    model_input,
    resized_size,
    train_crop,
)
from fsar.data.video import open_source
from fsar.extract.encoders import EncoderSpec, build_encoder
from fsar.extract.frames_dump import sheet_size
from fsar.extract.recipe import preprocess_from_config
from fsar.extract.runner import encode_images, run_extraction

from .conftest import REPO, run_fsar

PRESETS = REPO / "configs" / "presets"
SPM_TOLERANCE = 1 / 255 + 1e-6  # golden README: CLIP-SPM pixels in [0, 1]
FSAR_TOLERANCE = 1e-5  # golden README: CLIP-FSAR pixels from the stored decoded frames
MP4S = ("clip_320x240_30fps.mp4", "clip_170x128_12fps.mp4")
# a random-init ViT with the releases' 224 input (the shipped tiny configs take 64)
VIT224 = "fsar-test-vit224"
VIT224_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 224, "layers": 1, "width": 32, "head_width": 16, "patch_size": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


@pytest.fixture(scope="module")
def golden(shared) -> Path:
    return shared / "golden" / "data_path"


@pytest.fixture(scope="module")
def spm(golden):
    info = json.loads((golden / "clipspm_test.json").read_text())
    return info, np.load(golden / "clipspm_test.npz")


@pytest.fixture(scope="module")
def fsar_test(golden):
    return np.load(golden / "clipfsar_test.npz")


def spm_config(*overrides: str):
    return load_config([PRESETS / "clipspm_release.yaml"], list(overrides))


def test_clipspm_test_path_listing_indices_decode_and_pixels(golden, spm):
    info, arrays = spm
    config = spm_config()
    test_rule = resolve_rule(config.protocol.test_frames, config.dataset.name)
    assert test_rule == "clipspm_test"
    prep = preprocess_from_config(config, 224)
    assert len(info["folders"]) == 7
    for folder in info["folders"]:
        expected = info["videos"][folder]
        source = open_source(golden / "media" / "frames" / folder, listing="sorted_all")
        assert [p.name for p in source.files] == expected["listing"], folder
        indices = release_indices(test_rule, source.num_frames).tolist()  # the preset's rule
        assert indices == arrays[f"{folder}.indices"].tolist(), folder
        assert [source.files[i].name for i in indices] == expected["files_read"], folder
        width, height = expected["source_wh"]
        resized = resized_size((height, width), prep)
        assert [resized[1], resized[0]] == expected["resize"]["out_wh"], folder
        assert (resized == (height, width)) == expected["resize"]["skipped"], folder
        top, left = center_offsets(resized, prep)  # round half to even: 58.5 -> 58, 115.5 -> 116
        assert (left, top) == (expected["center_crop"]["x1"], expected["center_crop"]["y1"])
        frames = source.read(indices)
        digests = [hashlib.sha256(frame.tobytes()).hexdigest() for frame in frames]
        assert digests == expected["decoded_rgb_sha256"], folder  # the decoder, not the resize
        pixels = apply_view(frames, "center", prep)
        golden_pixels = torch.from_numpy(arrays[f"{folder}.pixels"])
        assert pixels.shape == golden_pixels.shape == (8, 3, 224, 224)
        assert float((pixels - golden_pixels).abs().max()) <= SPM_TOLERANCE, folder


def test_stray_file_is_a_listed_frame_that_fails_to_decode(golden):
    folder = golden / "media" / "frames" / "unpadded_320x240_stray"
    release = open_source(folder, listing="sorted_all")
    assert release.num_frames == 21 and release.files[0].name == "Thumbs.db"
    with pytest.raises(Exception, match="Thumbs.db"):  # a training draw with start = 0
        release.read([0])
    fsar_order = open_source(folder)  # fsar's own rule: JPEGs only, natural order
    assert [p.name for p in fsar_order.files] == [f"img_{i}.jpg" for i in range(1, 21)]


def test_clipspm_training_forced_flip_then_crop(golden):
    forced = np.load(golden / "clipspm_train.npz")
    prep = preprocess_from_config(spm_config(), 224)
    source = open_source(golden / "media" / "frames" / "landscape_320x240", listing="sorted_all")
    cases = {"flip_x0_y32": (True, 0, 32), "noflip_x117_y0": (False, 117, 0)}
    for case, (flip, x1, y1) in cases.items():
        frames = source.read(forced[f"forced.{case}.indices"].tolist())
        pixels = model_input(train_crop(frames, prep, flip, x1, y1), prep)
        difference = (pixels - torch.from_numpy(forced[f"forced.{case}.pixels"])).abs().max()
        assert float(difference) <= SPM_TOLERANCE, case
    # crop-then-flip is a different image: the order is pinned
    frames = source.read(forced["forced.flip_x0_y32.indices"].tolist())
    wrong = model_input(train_crop(frames, prep, False, 0, 32), prep).flip(-1)
    assert float((wrong - torch.from_numpy(forced["forced.flip_x0_y32.pixels"])).abs().max()) > 0.1


@pytest.mark.parametrize("mp4", MP4S)
@pytest.mark.parametrize("backend", ["pyav", "decord"])
def test_clipfsar_decoding_is_exact(golden, fsar_test, mp4, backend):
    if backend == "decord":
        pytest.importorskip("decord")
    source = open_source(golden / "media" / "videos" / mp4, backend=backend)
    assert source.num_frames == 40
    frames = source.read(fsar_test[f"video.{mp4}.indices"].tolist())
    np.testing.assert_array_equal(frames, fsar_test[f"video.{mp4}.decoded"])


@pytest.mark.parametrize("mp4", MP4S)
def test_clipfsar_pixels_squash_crop_normalise(fsar_test, mp4):
    preset = load_config([PRESETS / "clipfsar_release.yaml"])
    prep = preprocess_from_config(preset, 224)
    decoded = fsar_test[f"video.{mp4}.decoded"]
    golden_pixels = torch.from_numpy(fsar_test[f"video.{mp4}.pixels"])
    pixels = apply_view(decoded, "center", prep)
    assert float((pixels - golden_pixels).abs().max()) <= FSAR_TOLERANCE
    # UCF101 5-shot keeps the base mean/std (0.45 / 0.225): the experiment file sets them
    ucf = load_config(
        [
            REPO / "configs" / "datasets" / "ucf101.yaml",
            PRESETS / "clipfsar_release.yaml",
            REPO / "configs" / "experiments" / "clipfsar" / "ucf101_ViT-B-16_5shot.yaml",
        ]
    )
    ucf_prep = preprocess_from_config(ucf, 224)
    assert (ucf_prep.mean, ucf_prep.std) == ((0.45,) * 3, (0.225,) * 3)
    clip_mean = torch.tensor(prep.mean).view(3, 1, 1)
    clip_std = torch.tensor(prep.std).view(3, 1, 1)
    renormalised = (golden_pixels * clip_std + clip_mean - 0.45) / 0.225
    ucf_pixels = apply_view(decoded, "center", ucf_prep)
    assert float((ucf_pixels - renormalised).abs().max()) <= FSAR_TOLERANCE
    # fsar's own rule (aspect kept, bicubic) is far from the release: the test can tell
    own = apply_view(decoded, "center", preprocess_from_config(load_config([]), 224))
    assert float((own - golden_pixels).abs().max()) > 0.5


@pytest.fixture(scope="module")
def frame_folders(golden, tmp_path_factory) -> Path:
    """A `folder` dataset: one class holding the 7 golden frame folders."""
    root = tmp_path_factory.mktemp("golden_folders")
    for folder in (golden / "media" / "frames").iterdir():
        shutil.copytree(folder, root / "media" / folder.name)
    return root


@pytest.fixture(scope="module")
def vit224(tmp_path_factory) -> str:
    configs = tmp_path_factory.mktemp("model_configs")
    (configs / f"{VIT224}.json").write_text(json.dumps(VIT224_CONFIG))
    open_clip.add_model_config(configs)
    return VIT224


def extraction_config(root: Path, out: Path, model: str, *overrides: str):
    return spm_config(
        "dataset.name=folder",
        f"dataset.root={root}",
        f"model.name={model}",
        "model.random_init=true",
        f"extract.out={out}",
        "extract.workers=0",
        "extract.device=cpu",
        "extract.prompts=single",
        *overrides,
    )


def test_extracted_store_encodes_the_golden_pixels(spm, frame_folders, vit224, tmp_path):
    info, arrays = spm
    out = tmp_path / "spm.zarr"
    # reference_test caches exactly the release's 8 test frames (the preset's dense store also
    # caches the rest; the stray folder's Thumbs.db then fails that video, as the release fails
    # on a training draw of it)
    config = extraction_config(frame_folders, out, vit224, "extract.frames=reference_test")
    result = run_extraction(config, progress=False)
    assert (result.done, result.failed) == (7, 0)
    store = open_store(out)
    recipe = store.recipe
    assert recipe["interpolation"] == "pil_bilinear" and recipe["frame_listing"] == "sorted_all"
    assert (recipe["precision"], recipe["feature_dtype"]) == ("fp32", "float32")
    assert (recipe["crop"], recipe["resize"], recipe["normalize"]) == (224, 256, False)
    features = store.read_features("center")
    assert features.dtype == np.float32
    encoder = build_encoder(EncoderSpec(vit224, random_init=True))
    for folder in info["folders"]:
        row = store.video_ids.index(f"media/{folder}")
        np.testing.assert_array_equal(store.frame_index[row], arrays[f"{folder}.indices"])
        pixels = torch.from_numpy(arrays[f"{folder}.pixels"])
        expected, _ = encode_images(encoder, pixels, 64, "fp32", "float32")
        np.testing.assert_allclose(features[row], expected, rtol=0, atol=1e-5, err_msg=folder)

    # the bank reads a float32 store as it is; gathers give float32 either way
    bank = load_bank(store, "test", views=("center",))
    assert bank.features["center"].dtype == torch.float32
    first = store.video_ids.index(f"media/{info['folders'][0]}")
    row = int(np.flatnonzero(bank.store_rows == first)[0])
    gathered = bank.gather(torch.tensor([row]), torch.arange(8)[None])
    np.testing.assert_array_equal(gathered[0].numpy(), features[first])

    # a store made with one pixel rule is never reopened for writing with another
    for override, field in (
        ("extract.interpolation=bilinear", "interpolation"),
        ("extract.frame_listing=natural_images", "frame_listing"),
        ("extract.crop_offset=floor", "crop_offset"),
        ("extract.feature_dtype=float16", "feature_dtype"),
    ):
        with pytest.raises(StoreMismatchError, match=field):
            run_extraction(
                extraction_config(
                    frame_folders, out, vit224, "extract.frames=reference_test", override
                ),
                progress=False,
            )


def test_fsar_frames_writes_the_golden_encoder_input(spm, frame_folders, tmp_path):
    info, arrays = spm
    out = tmp_path / "frames.npz"
    ids = [f"media/{folder}" for folder in info["folders"]]
    result = run_fsar(
        "frames",
        "--dataset",
        "folder",
        "--root",
        str(frame_folders),
        "--config",
        str(PRESETS / "clipspm_release.yaml"),
        "--model",
        "RN50",  # the input size only: no weights are read
        "--videos",
        ",".join(ids),
        "--out",
        str(out),
    )
    assert "no normalisation" in result.stdout
    written = np.load(out)
    assert sorted(written.files) == sorted(
        [f"{video}.{kind}" for video in ids for kind in ("indices", "pixels")]
    )
    for folder in info["folders"]:
        np.testing.assert_array_equal(
            written[f"media/{folder}.indices"], arrays[f"{folder}.indices"]
        )
        pixels = written[f"media/{folder}.pixels"]
        assert pixels.dtype == np.float32 and pixels.shape == (8, 3, 224, 224)
        assert np.abs(pixels - arrays[f"{folder}.pixels"]).max() <= SPM_TOLERANCE, folder
    with Image.open(out.with_suffix(".png")) as sheet:
        assert sheet.size == sheet_size(len(ids), 8, 224)
        # the first frame of the first row, de-normalised, is the golden frame
        from fsar.extract.frames_dump import SHEET_GAP, SHEET_LABEL

        cell = np.asarray(sheet.convert("RGB"))[
            SHEET_GAP + SHEET_LABEL : SHEET_GAP + SHEET_LABEL + 224, SHEET_GAP : SHEET_GAP + 224
        ]
    first = arrays[f"{info['folders'][0]}.pixels"][0].transpose(1, 2, 0)
    np.testing.assert_array_equal(cell, np.round(first * 255).astype(np.uint8))


def test_fsar_frames_draws_and_normalised_display(frame_folders, tmp_path):
    out = tmp_path / "draws.npz"
    run_fsar(
        "frames",
        "--dataset",
        "folder",
        "--root",
        str(frame_folders),
        "--model",
        "fsar-tiny-vit",
        "--videos",
        "media/square_256x256",
        "--out",
        str(out),
        "--seed",
        "3",
        "--draw",
        "2",
        "extract.views=[center,flip]",
    )
    written = np.load(out)
    key = "media/square_256x256.draw1"
    assert written[f"{key}.pixels"].shape == (8, 3, 64, 64)  # fsar-tiny-vit's input size
    np.testing.assert_array_equal(
        written[f"{key}.flip.pixels"], written[f"{key}.pixels"][..., ::-1]
    )
    # fsar's preset normalises with CLIP's mean/std: values leave [0, 1]
    assert written[f"{key}.pixels"].min() < 0
    with Image.open(out.with_suffix(".png")) as sheet:
        assert sheet.size == sheet_size(2, 8, 64)


def test_recipe_round_trip_and_cpu_precision():
    from fsar.data.transforms import Preprocess
    from fsar.extract.recipe import effective_precision

    fsar_config = load_config(
        [PRESETS / "clipfsar_release.yaml"], ["extract.mean=[0.45,0.45,0.45]"]
    )
    prep = preprocess_from_config(fsar_config, 224)
    assert Preprocess.from_recipe(prep.recipe()) == prep
    assert prep.recipe()["mean"] == [0.45] * 3 and prep.recipe()["resize_mode"] == "squash"
    # a recipe from before the pixel rules were recorded reads back as the old defaults
    assert Preprocess.from_recipe({"resize": 73, "crop": 64, "normalize": True}) == Preprocess(
        73, 64
    )
    # autocast is a GPU thing: on CPU every precision encodes (and is recorded) as fp32
    fp16 = load_config([], ["extract.precision=fp16"])
    assert effective_precision(fp16, torch.device("cpu")) == "fp32"
    assert effective_precision(fp16, torch.device("cuda")) == "fp16"


def test_fsar_frames_draws_the_clipfsar_release_test_frames(golden, fsar_test, tmp_path):
    """Under the CLIP-FSAR preset `fsar frames` shows the release's test frames: one random
    frame per segment (redrawn per draw), squashed, cropped and normalised as the release does."""
    root = tmp_path / "videos"
    (root / "media").mkdir(parents=True)
    for mp4 in MP4S:
        shutil.copy(golden / "media" / "videos" / mp4, root / "media" / mp4)
    out = tmp_path / "fsar_draws.npz"
    ids = [f"media/{Path(mp4).stem}" for mp4 in MP4S]
    draws = 6
    run_fsar(
        "frames", "--dataset", "folder", "--root", str(root),
        "--config", str(PRESETS / "clipfsar_release.yaml"), "--model", "RN50",
        "--videos", ",".join(ids), "--out", str(out), "--seed", "0", "--draw", str(draws),
    )  # fmt: skip
    written = np.load(out)
    row = 40 - 1  # both clips decode to L = 40 frames; row r of the tables is L = r + 1
    seg_min, seg_max = (
        fsar_test["segment.fps12.seg_min"][row],
        fsar_test["segment.fps12.seg_max"][row],
    )
    config = load_config([PRESETS / "clipfsar_release.yaml"], [])
    prep = preprocess_from_config(config, 224)
    matched = 0
    for video_id, mp4 in zip(ids, MP4S, strict=True):
        source = open_source(golden / "media" / "videos" / mp4)
        drawn = np.stack([written[f"{video_id}.draw{k}.indices"] for k in range(draws)])
        assert ((drawn >= seg_min) & (drawn <= seg_max)).all(), video_id
        assert len({tuple(d) for d in drawn}) > 1  # redrawn, not one fixed clip
        # the pixels of a draw are the release's pixels of its frames: where a drawn frame is
        # one the golden tensor holds, they agree to the golden tolerance
        golden_indices = fsar_test[f"video.{mp4}.indices"]
        golden_pixels = fsar_test[f"video.{mp4}.pixels"]
        for k in range(draws):
            pixels = written[f"{video_id}.draw{k}.pixels"]
            expected = apply_view(source.read(drawn[k].tolist()), "center", prep, 0).numpy()
            np.testing.assert_array_equal(pixels, expected)
            same = drawn[k] == golden_indices
            if same.any():
                assert np.abs(pixels[same] - golden_pixels[same]).max() <= FSAR_TOLERANCE
            matched += int(same.sum())
    assert matched > 0  # the seeded draws do meet golden frames, so the comparison ran
