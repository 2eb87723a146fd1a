"""Datasets: benchmark lists resolved against local layouts, and the user's `folder` dataset."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from fsar.data.datasets import BENCHMARKS, find_split_lists, load_dataset, load_folder_dataset


@pytest.fixture(scope="module")
def lists(shared) -> Path:
    return shared / "splits"


def touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return path


def test_every_benchmark_default_variant_is_the_published_split(shared):
    published = yaml.safe_load((shared / "reference/paper_results.yaml").read_text())
    for name, row in published["benchmarks"].items():
        assert BENCHMARKS[name].variants[0] == row["split"]


def test_hmdb51_class_ids_put_train_then_val_then_test_whatever_splits_are_loaded(lists, tmp_path):
    full = load_dataset("hmdb51", tmp_path, splits_dir=lists)
    test_only = load_dataset("hmdb51", tmp_path, splits_dir=lists, splits=("test",))
    assert full.variant == "hmdb_ARN" and len(full.class_names) == 51
    assert len(full.items) == 4280 + 1194 + 1292 and len(full.missing) == len(full.items)
    assert full.class_names == test_only.class_names
    assert len(test_only.items) == 1292 and {i.split for i in test_only.items} == {"test"}
    assert {i.class_id for i in test_only.items} == set(range(41, 51))
    first = test_only.items[0]
    assert (first.class_name, first.class_id, first.path) == ("fencing", 41, None)


def test_class_names_are_the_release_prompt_strings_in_release_order(lists, shared, tmp_path):
    release = yaml.safe_load((shared / "reference/clipspm_release.yaml").read_text())["datasets"]
    cases = {"hmdb51": "hmdb", "ucf101": "ucf", "kinetics": "k100", "ssv2_small": "ssv2_cmn"}
    for name, key in cases.items():
        index = load_dataset(name, tmp_path, splits_dir=lists, splits=())
        train, test = release[key]["train"]["class_names"], release[key]["test"]["class_names"]
        assert index.class_names[: len(train)] == train, name
        assert index.class_names[-len(test) :] == test, name


def test_local_layouts_resolve_frame_folders_video_files_and_time_span_names(lists, tmp_path):
    root = tmp_path / "kinetics"
    frames = root / "test" / "stretching_arm" / "nfLjZfWpjVg"
    frames.mkdir(parents=True)
    video = touch(root / "stretching_arm" / "O6v_NghD88o.mp4")
    folder = root / "stretching_arm" / "ho4ZknDNNG4"
    folder.mkdir()
    span = touch(root / "throwing_axe" / "sJFGRCL9y4o_000012_000022.webm")
    index = load_dataset("kinetics", root, splits_dir=lists / "kinetics_CMN", splits=("test",))
    paths = {item.video_id: item.path for item in index.items if item.path is not None}
    assert paths == {
        "stretching_arm/nfLjZfWpjVg": frames,
        "stretching_arm/O6v_NghD88o": video,
        "stretching_arm/ho4ZknDNNG4": folder,
        "throwing_axe/sJFGRCL9y4o": span,
    }
    assert len(index.missing) == 2400 - 4


def test_clipfsar_paths_and_ssv2_ids_resolve_under_their_own_layouts(lists, tmp_path):
    hmdb = touch(
        tmp_path / "h" / "videos" / "talk" / "veoh_harold_and_kumar_talk_u_nm_np1_fr_goo_14.avi"
    )
    index = load_dataset("hmdb51", tmp_path / "h", variant="clipfsar_hmdb51", splits_dir=lists)
    found = [item for item in index.items if item.path is not None]
    assert [(i.video_id, i.path) for i in found] == [
        ("talk/veoh_harold_and_kumar_talk_u_nm_np1_fr_goo_14", hmdb)
    ]
    flat = touch(tmp_path / "s" / "88644.webm")  # first ssv2_small test id
    renumbered = tmp_path / "s" / "train" / "train24" / "51958"  # CMN key, CLIP-FSAR list
    renumbered.mkdir(parents=True)
    index = load_dataset(
        "ssv2_small", tmp_path / "s", variant="clipfsar_ssv2_small", splits_dir=lists
    )
    paths = {i.video_id: i.path for i in index.items if i.path is not None}
    assert paths == {"88644": flat, "51958": renumbered}
    assert index.class_names[0] == "Pouring [something] into [something]"


def test_missing_split_lists_name_the_fetch_command(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"fsar splits fetch clipfsar_ucf101.*--splits-dir"):
        load_dataset("ucf101", tmp_path, variant="clipfsar_ucf101", splits_dir=tmp_path)


def test_wrong_dataset_variant_or_split_names_list_the_choices(lists, tmp_path):
    with pytest.raises(ValueError, match="unknown dataset 'ucf'; valid: kinetics, ssv2_full"):
        load_dataset("ucf", tmp_path)
    with pytest.raises(ValueError, match="not one of hmdb51's: hmdb_ARN, clipfsar_hmdb51"):
        load_dataset("hmdb51", tmp_path, variant="ucf_ARN", splits_dir=lists)
    with pytest.raises(ValueError, match=r"unknown split\(s\) \['dev'\]"):
        load_dataset("hmdb51", tmp_path, splits=("dev",))
    assert find_split_lists("hmdb_ARN", lists) == lists / "hmdb_ARN"
    assert find_split_lists("hmdb_ARN", lists / "hmdb_ARN") == lists / "hmdb_ARN"


def test_modified_lists_load_with_their_anomalies_reported_and_duplicates_dropped(lists, tmp_path):
    folder = tmp_path / "hmdb_ARN"
    shutil.copytree(lists / "hmdb_ARN", folder)
    with open(folder / "testlist03.txt", "a") as handle:
        handle.write("talk/veoh_harold_and_kumar_talk_u_nm_np1_fr_goo_14\n")
    index = load_dataset("hmdb51", tmp_path, splits_dir=tmp_path, splits=("test",))
    assert len(index.items) == 1292
    assert "testlist03.txt: not the registered hmdb_ARN file" in index.anomalies
    assert any("line 1293: duplicate of line 1292" in a for a in index.anomalies)


def test_folder_without_lists_puts_every_video_in_test_with_readable_names(tmp_path):
    touch(tmp_path / "push_left" / "a.mp4")
    touch(tmp_path / "push_left" / "b.avi")
    (tmp_path / "lift_box" / "clip1").mkdir(parents=True)  # a JPEG frame folder
    touch(tmp_path / "lift_box" / "notes.txt")  # not a video: ignored
    index = load_folder_dataset(tmp_path)
    assert index.class_names == ["lift box", "push left"]
    assert [(i.video_id, i.class_id, i.split) for i in index.items] == [
        ("lift_box/clip1", 0, "test"),
        ("push_left/a", 1, "test"),
        ("push_left/b", 1, "test"),
    ]
    assert index.items[1].path == tmp_path / "push_left" / "a.mp4" and index.missing == []


def test_folder_lists_assign_splits_with_optional_extensions_and_train_classes_first(tmp_path):
    for name in ("x/1.mp4", "x/2.mp4", "y/1.mkv", "z/1.webm"):
        touch(tmp_path / name)
    (tmp_path / "trainlist.txt").write_text("z/1.webm\ny/1\n")
    (tmp_path / "testlist.txt").write_text("x/1\n\nx/2.mp4\nx/gone\n")
    index = load_dataset("folder", tmp_path)
    assert index.class_names == ["z", "y", "x"]
    assert [(i.video_id, i.split) for i in index.items] == [
        ("z/1", "train"), ("y/1", "train"), ("x/1", "test"), ("x/2", "test"), ("x/gone", "test")
    ]  # fmt: skip
    assert [i.video_id for i in index.missing] == ["x/gone"]
    assert index.anomalies == ["testlist.txt:4: x/gone is listed but not under " + str(tmp_path)]
    assert [i.video_id for i in load_folder_dataset(tmp_path, splits=("train",)).items] == [
        "z/1",
        "y/1",
    ]
    assert load_dataset("demo", tmp_path).variant == "demo"


def test_folder_errors_name_the_bad_folder_or_line(tmp_path):
    with pytest.raises(ValueError, match="holds no class folders"):
        load_folder_dataset(tmp_path)
    (tmp_path / "empty_class").mkdir()
    with pytest.raises(ValueError, match="class folder .*empty_class holds no videos"):
        load_folder_dataset(tmp_path)
    touch(tmp_path / "empty_class" / "v.mp4")
    (tmp_path / "empty_class" / "v").mkdir()
    with pytest.raises(ValueError, match="empty_class/v is ambiguous"):
        load_folder_dataset(tmp_path)
    shutil.rmtree(tmp_path / "empty_class" / "v")
    (tmp_path / "trainlist.txt").write_text("empty_class/v\n")
    (tmp_path / "testlist.txt").write_text("empty_class/v.mp4\nnope/v\nbad line\n")
    with pytest.raises(ValueError) as err:
        load_folder_dataset(tmp_path)
    message = str(err.value)
    assert "testlist.txt:1: empty_class/v is already listed at trainlist.txt:1" in message
    assert "testlist.txt:2: class folder" in message and "nope does not exist" in message
    assert "testlist.txt:3: expected '<class>/<video>', got 'bad line'" in message
    with pytest.raises(FileNotFoundError, match="dataset folder not found"):
        load_folder_dataset(tmp_path / "absent")
