"""Configuration: composition, dotted overrides, and errors that name the key."""

from __future__ import annotations

import pytest

from fsar.config import ConfigError, describe, load_config

from .conftest import run_fsar


def test_files_compose_in_order_and_overrides_win(tmp_path):
    dataset = tmp_path / "dataset.yaml"
    dataset.write_text("dataset:\n  name: hmdb51\n  variant: hmdb_ARN\nextract:\n  seq_len: 8\n")
    experiment = tmp_path / "exp.yaml"
    experiment.write_text("extract:\n  seq_len: 16\n  views: [center, flip]\n")
    config = load_config([dataset, experiment], ["extract.normalize=false", "model.name=RN50"])
    assert config.dataset.name == "hmdb51" and config.dataset.variant == "hmdb_ARN"
    assert config.extract.seq_len == 16
    assert config.extract.views == ["center", "flip"]
    assert config.extract.normalize is False
    assert config.model.name == "RN50"


def test_comma_lists_are_accepted_on_the_command_line():
    assert load_config([], ["extract.views=center,crop0"]).extract.views == ["center", "crop0"]


@pytest.mark.parametrize(
    "override, message",
    [
        ("extract.frame=all", "unknown key 'extract.frame' (did you mean 'extract.frames'?)"),
        ("extract.seq_len=abc", "extract.seq_len: expected an integer"),
        ("extract.backend=parquet", "extract.backend: 'parquet' is not one of"),
        ("extract.normalize=maybe", "extract.normalize: expected true/false"),
        ("extract.seq_len=0", "extract.seq_len must be >= 1"),
        ("dataset.splits=[train,dev]", "unknown split(s) ['dev']"),
        ("nonsense.key=1", "unknown key 'nonsense'"),
        ("extract", "must look like key.sub=value"),
    ],
)
def test_bad_settings_fail_before_any_work_naming_the_key(override, message):
    with pytest.raises(ConfigError) as error:
        load_config([], [override])
    assert message in str(error.value)


def test_every_key_is_documented():
    rows = describe()
    assert len(rows) > 20
    assert all(help_text for _, _, help_text in rows)
    assert ("extract.frames", "'reference_test'") in [(k, d) for k, d, _ in rows]


def test_cli_reports_config_errors_with_exit_code_2(tmp_path):
    result = run_fsar(
        "extract",
        "--dataset",
        "folder",
        "--root",
        str(tmp_path),
        "--out",
        str(tmp_path / "s.zarr"),
        "extract.viewz=center",
        check=False,
    )
    assert result.returncode == 2
    assert "extract.viewz" in result.stderr and "extract.views" in result.stderr
