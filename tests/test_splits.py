"""Split lists: parsing both release formats, published counts, registry, fetch and verify."""

from __future__ import annotations

import json
import os
import re
import shutil
from functools import cache
from pathlib import Path

import pytest
import yaml

from fsar.data.split_registry import (
    SplitFetchError,
    default_splits_dir,
    fetch_split,
    format_verify_report,
    identify_variant,
    load_registry,
    sha256_file,
    verify_split_dir,
)
from fsar.data.splits import SPLITS, class_order, derive_class_name, parse_split_dir

REPO = Path(__file__).resolve().parents[1]
# published count - list count, where the list file holds more than the paper reports (see
# test_the_three_extra_ssv2_full_test_entries_are_distinct_well_formed_lines)
EXPLAINED_EXTRA = {("ssv2_OTAM", "test"): 3}


@cache
def parsed(directory: Path):
    """Parse each official folder once per test session (they are read-only)."""
    return parse_split_dir(directory)


@pytest.fixture(scope="module")
def lists(shared) -> Path:
    return shared / "splits"


@pytest.fixture(scope="module")
def sums(lists) -> dict[str, str]:
    rows = (line.split() for line in (lists / "SHA256SUMS").read_text().splitlines() if line)
    return {path: digest for digest, path in rows}


@pytest.fixture(scope="module")
def published(shared) -> dict:
    return yaml.safe_load((shared / "reference/paper_results.yaml").read_text())["benchmarks"]


def test_parsed_counts_match_the_published_class_and_video_counts(lists, published):
    for benchmark, row in published.items():
        split_set = parsed(lists / row["split"])
        for i, split in enumerate(SPLITS):
            split_list = split_set.splits[split]
            extra = EXPLAINED_EXTRA.get((row["split"], split), 0)
            assert len(split_list.class_keys) == row["classes"][i], (benchmark, split)
            assert len(split_list.entries) == row["videos"][i] + extra, (benchmark, split)
            assert len(split_list.unique_video_ids()) == len(split_list.entries)


def test_the_three_extra_ssv2_full_test_entries_are_distinct_well_formed_lines(lists):
    raw = (lists / "ssv2_OTAM/testlist03.txt").read_text()
    test = parsed(lists / "ssv2_OTAM").splits["test"]
    assert raw.count("\n") == 2857 and raw.endswith("\n") and "\n\n" not in raw
    assert len(test.entries) == 2857 and test.anomalies == []
    # every id is also in classInd.json, whose size is the sum of the three lists as files
    class_ind = json.loads((lists / "ssv2_OTAM/classInd.json").read_text())
    assert len(class_ind) == 77500 + 1926 + 2857
    assert all(entry.video_id in class_ind for entry in test.entries)


def test_every_official_list_parses_without_anomalies(lists):
    for directory in sorted(p for p in lists.iterdir() if p.is_dir()):
        split_set = parsed(directory)
        assert split_set.anomalies == [], directory.name
        for split_list in split_set.splits.values():
            assert split_list.anomalies == [], (directory.name, split_list.split)


def test_clipfsar_lists_hold_the_same_videos_as_their_clipspm_counterparts(lists):
    pairs = {"clipfsar_hmdb51": "hmdb_ARN", "clipfsar_ucf101": "ucf_ARN",
             "clipfsar_ssv2_small": "ssv2_CMN"}  # fmt: skip
    for fsar_name, spm_name in pairs.items():
        fsar, spm = parsed(lists / fsar_name), parsed(lists / spm_name)
        assert fsar.format == "clipfsar" and spm.format == "clipspm"
        for split in SPLITS:
            fsar_ids = [e.video_id for e in fsar.splits[split].entries]
            assert fsar_ids == [e.video_id for e in spm.splits[split].entries], (fsar_name, split)


def test_clipfsar_ssv2_full_training_list_is_a_67013_line_prefix_of_the_otam_list(lists):
    fsar = parsed(lists / "clipfsar_ssv2_full").splits["train"].entries
    otam = parsed(lists / "ssv2_OTAM").splits["train"].entries
    assert (len(fsar), len(otam)) == (67013, 77500)
    assert fsar == otam[: len(fsar)]
    assert len({e.class_key for e in fsar}) == 64


def test_clipfsar_kinetics_replaces_57_of_the_2400_cmn_test_videos(lists):
    def youtube_ids(variant: str) -> set[str]:
        entries = parsed(lists / variant).splits["test"].entries
        return {(e.class_key, e.video_id.split("/")[1][:11]) for e in entries}

    cmn, fsar = youtube_ids("kinetics_CMN"), youtube_ids("clipfsar_kinetics100")
    assert len(cmn) == len(fsar) == 2400
    assert len(cmn - fsar) == len(fsar - cmn) == 57


def test_clipfsar_path_lines_keep_the_relative_path_and_use_class_and_stem_as_id(lists):
    entry = parsed(lists / "clipfsar_kinetics100").splits["train"].entries[0]
    assert entry.class_key == "air_drumming"
    assert entry.video_id == "air_drumming/-VtLx-mcPds_000012_000022"
    assert entry.rel_path == "train_256/air_drumming/-VtLx-mcPds_000012_000022.mp4"


def test_ssv2_keys_are_ordered_by_number_and_named_as_the_release_prompts(lists, shared):
    release = yaml.safe_load((shared / "reference/clipspm_release.yaml").read_text())["datasets"]
    for variant, key in (("ssv2_OTAM", "ssv2_otam"), ("ssv2_CMN", "ssv2_cmn")):
        split_set = parsed(lists / variant)
        for split in ("train", "test"):
            order = class_order(split_set.splits[split])
            names = [split_set.class_names[k] for k in order]
            assert names == release[key][split]["class_names"], (variant, split)
        val_names = [split_set.class_names[k] for k in class_order(split_set.splits["val"])]
        assert all("[" not in name for name in val_names)  # from cls2realC.json
    small = parsed(lists / "clipfsar_ssv2_small")
    cmn = parsed(lists / "ssv2_CMN")
    assert small.class_names["train0"] == cmn.class_names["train24"]
    assert small.class_names["val0"] == cmn.class_names["val88"]


def test_val_class_names_are_derived_where_the_release_names_none(lists):
    ucf = parsed(lists / "ucf_ARN")
    assert ucf.class_names["ApplyLipstick"] == "Apply Lipstick"
    assert ucf.class_names["BlowDryHair"] == "Blow DryHair"  # the release's own string
    assert derive_class_name("hurling_(sport)") == "hurling (sport)"
    assert derive_class_name("train8") == "train8"


def test_parser_reports_blank_duplicate_crlf_and_cross_split_lines_without_fixing(tmp_path):
    (tmp_path / "trainlist03.txt").write_bytes(b"a/v1\r\na/v1\r\n\r\n b/v2 \r\nc/v1\r\n")
    (tmp_path / "testlist03.txt").write_text("d/v9\nb/v2\n")
    split_set = parse_split_dir(tmp_path)
    train = split_set.splits["train"]
    assert [e.video_id for e in train.entries] == ["a/v1", "a/v1", "b/v2", "c/v1"]
    text = "\n".join(train.anomalies)
    assert "CRLF" in text and "line 2: duplicate of line 1" in text
    assert "line 3: blank line" in text and "line 4: surrounding whitespace" in text
    assert split_set.anomalies == ["video b/v2 is in both train and test"]
    assert "val" not in split_set.splits


def test_parser_reports_an_ssv2_video_listed_under_two_classes(tmp_path):
    (tmp_path / "train_few_shot.txt").write_text("train0/11\ntrain1/11\n")
    train = parse_split_dir(tmp_path).splits["train"]
    assert train.class_keys == ["train0", "train1"]
    assert train.anomalies and "video 11 listed again as 'train1'" in train.anomalies[0]


def test_parser_rejects_malformed_lines_and_mixed_or_missing_formats(tmp_path):
    (tmp_path / "trainlist03.txt").write_text("a/v1\nno_separator\n")
    with pytest.raises(ValueError, match=r"trainlist03.txt:2: expected '<class>/<video>'"):
        parse_split_dir(tmp_path)
    (tmp_path / "trainlist03.txt").write_text("a/v1\n")
    (tmp_path / "train_few_shot.txt").write_text("train0//videos/a/v1.avi\n")
    with pytest.raises(ValueError, match="mixes two list formats"):
        parse_split_dir(tmp_path)
    (tmp_path / "train_few_shot.txt").write_text("test0//videos/a/v1.avi\n")
    (tmp_path / "trainlist03.txt").unlink()
    with pytest.raises(ValueError, match="label 'test0' is not 'train<class index>'"):
        parse_split_dir(tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="trainlist03.txt"):
        parse_split_dir(empty)


def test_registry_holds_exactly_the_shared_hashes_and_pinned_public_addresses(lists, sums):
    registry = load_registry()
    assert set(registry) == {p.name for p in lists.iterdir() if p.is_dir()}
    pairs = {f"{v.name}/{f.name}": f.sha256 for v in registry.values() for f in v.files}
    assert pairs == sums
    pinned = re.compile(r"^https://raw\.githubusercontent\.com/[\w.-]+/[\w.-]+/[0-9a-f]{40}/\S+$")
    for variant in registry.values():
        assert variant.benchmark in {"kinetics", "ssv2_full", "ssv2_small", "ucf101", "hmdb51"}
        for file in variant.files:
            assert (file.url is None and file.note) or pinned.match(file.url), file


def test_fetch_from_a_mirror_folder_copies_and_verifies_every_file(lists, tmp_path):
    folder = fetch_split("hmdb51", tmp_path / "cache", mirror=str(lists))
    assert folder == tmp_path / "cache" / "hmdb_ARN"
    for file in load_registry()["hmdb_ARN"].files:
        assert sha256_file(folder / file.name) == file.sha256
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]  # no temporary left


def test_fetch_from_a_file_url_mirror_covers_files_without_a_public_address(lists, tmp_path):
    folder = fetch_split("ssv2_OTAM", tmp_path, mirror=lists.as_uri())
    assert verify_split_dir(folder).ok


def test_fetch_refuses_an_altered_copy_and_names_both_hashes(lists, tmp_path):
    mirror = tmp_path / "mirror"
    shutil.copytree(lists / "hmdb_ARN", mirror / "hmdb_ARN")
    altered = mirror / "hmdb_ARN" / "vallist03.txt"
    altered.write_bytes(altered.read_bytes().replace(b"cartwheel", b"cartwhee1", 1))
    actual = sha256_file(altered)
    expected = next(f.sha256 for f in load_registry()["hmdb_ARN"].files if f.name == altered.name)
    with pytest.raises(SplitFetchError) as err:
        fetch_split("hmdb_ARN", tmp_path / "dest", mirror=str(mirror))
    assert "vallist03.txt" in str(err.value)
    assert expected in str(err.value) and actual in str(err.value)
    assert not (tmp_path / "dest" / "hmdb_ARN" / "vallist03.txt").exists()


def test_fetch_without_an_address_fails_before_downloading_and_keeps_valid_files(lists, tmp_path):
    with pytest.raises(SplitFetchError, match="train_few_shot.txt"):
        fetch_split("clipfsar_ssv2_full", tmp_path)
    assert not (tmp_path / "clipfsar_ssv2_full").exists()
    shutil.copytree(lists / "clipfsar_ssv2_full", tmp_path / "clipfsar_ssv2_full")
    lines = []
    assert fetch_split("clipfsar_ssv2_full", tmp_path, report=lines.append).is_dir()
    assert len(lines) == 3 and all(line.startswith("present") for line in lines)


def test_fetch_rejects_an_unknown_name_listing_the_choices():
    with pytest.raises(ValueError, match="unknown split variant or benchmark 'hmdb'.*hmdb_ARN"):
        fetch_split("hmdb", Path("unused"))


def test_verify_identifies_variants_by_hash_even_in_a_renamed_folder(lists, tmp_path):
    shutil.copytree(lists / "clipfsar_ssv2_small", tmp_path / "lists")
    variant, checks = identify_variant(tmp_path / "lists")
    assert variant == "clipfsar_ssv2_small"
    assert [c.status for c in checks] == ["ok"] * 3
    report = verify_split_dir(lists / "hmdb_ARN")
    assert report.ok and report.counts == {
        "train": (31, 4280),
        "val": (10, 1194),
        "test": (10, 1292),
    }


def test_verify_reports_a_differing_file_with_expected_and_actual_hash(lists, tmp_path):
    folder = tmp_path / "ucf_ARN"
    shutil.copytree(lists / "ucf_ARN", folder)
    with open(folder / "testlist03.txt", "a") as handle:
        handle.write("YoYo/v_YoYo_g25_c05\n")  # a train video, now also in test
    report = verify_split_dir(folder)
    assert report.variant == "ucf_ARN" and not report.ok
    differs = [c for c in report.files if c.status == "differs"]
    assert [c.name for c in differs] == ["testlist03.txt"]
    text = format_verify_report(report)
    assert (
        f"DIFFERS  testlist03.txt: sha256 {differs[0].actual}, expected {differs[0].expected}"
        in text
    )
    assert "anomaly: video YoYo/v_YoYo_g25_c05 is in both train and test" in text


def test_verify_with_root_lists_the_split_videos_missing_locally(lists, tmp_path):
    root = tmp_path / "hmdb"
    first_test = "1899_Hamlet__the_Fencing_Scene_with_Laertes_fencing_f_cm_np2_le_med_0"
    (root / "test" / "fencing" / first_test).mkdir(parents=True)  # a JPEG frame folder
    (root / "talk").mkdir()
    (root / "talk" / "veoh_harold_and_kumar_talk_u_nm_np1_fr_goo_14.avi").write_bytes(b"")
    report = verify_split_dir(lists / "hmdb_ARN", root=root)
    assert report.found == {"train": 0, "val": 0, "test": 2}
    assert len(report.missing["test"]) == 1290 and len(report.missing["train"]) == 4280
    assert "talk/veoh_harold_and_kumar_talk_u_nm_np1_fr_goo_14" not in report.missing["test"]
    assert "[test]: 2/1292 videos found, 1290 missing" in format_verify_report(report)


def test_default_splits_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("FSAR_SPLITS_DIR", str(tmp_path))
    assert default_splits_dir() == tmp_path
    monkeypatch.delenv("FSAR_SPLITS_DIR")
    assert default_splits_dir() == Path.home() / ".cache" / "fsar" / "splits"


def test_the_repository_holds_no_copy_of_an_official_list(sums, lists):
    sizes = {(lists / path).stat().st_size for path in sums}
    digests = set(sums.values())
    skip = {".git", ".venv", "__pycache__", ".pytest_cache"}
    outputs = {REPO / name for name in ("outputs", "runs", "data")}  # ignored work folders
    for dirpath, dirnames, filenames in os.walk(REPO):
        dirnames[:] = [d for d in dirnames if d not in skip and Path(dirpath, d) not in outputs]
        for name in filenames:
            path = Path(dirpath) / name
            if path.stat().st_size in sizes:
                assert sha256_file(path) not in digests, path
