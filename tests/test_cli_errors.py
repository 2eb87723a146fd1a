"""A user's mistake or the environment gives one line and exit 2; a bug keeps its traceback.

Bad inputs go through the real CLI in subprocesses, as users run it. Failures that cannot be
produced for real here (a read-only file system while tests run as root) are injected at the
system-call boundary into an in-process ``cli.main``.
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fsar import cli
from fsar.errors import FsarError
from fsar.interrupts import RERUN_HINT, Interrupted

from .conftest import REPO, moving_square, run_fsar


def error_lines(stderr: str) -> list[str]:
    """stderr without progress-bar redraws (lines holding a carriage return)."""
    return [line for line in stderr.split("\n") if line.strip() and "\r" not in line]


def assert_one_line(result: subprocess.CompletedProcess, command: str, *words: str) -> str:
    lines = error_lines(result.stderr)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"fsar {command}: error: "), lines[0]
    for word in words:
        assert word in lines[0], (word, lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> Path:
    """3 classes x 6 videos, two per class in each of train / val / test."""
    from fsar.data.synthetic import write_video

    root = tmp_path_factory.mktemp("cli_errors_videos")
    lists: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    for c in range(3):
        for v in range(6):
            frames = moving_square(8, 32, (80 * c, 40, 200), 1 if c % 2 else -1, seed=10 * c + v)
            write_video(root / f"class{c}" / f"v{v}.mp4", frames, fps=8)
            lists[("train", "val", "test")[v // 2]].append(f"class{c}/v{v}")
    for split, items in lists.items():
        (root / f"{split}list.txt").write_text("\n".join(items) + "\n")
    return root


@pytest.fixture(scope="module")
def store(videos, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cli_errors_store") / "s.zarr"
    args = ["extract", "--dataset", "folder", "--root", str(videos), "--out", str(path)]
    assert cli.main(args + ["--workers", "0"]) == 0
    return path


# --- configuration -------------------------------------------------------------------------


def test_a_yaml_syntax_error_in_an_override_is_one_line_with_its_column():
    result = run_fsar("config", "extract.views=[center,flip", check=False)
    assert_one_line(result, "config", "extract.views=[center,flip", "YAML", "column 27")


def test_a_yaml_syntax_error_in_a_config_file_names_the_file_line_and_column(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("extract:\n  views: [center]\n   frames: all\n")
    result = run_fsar("config", "--config", str(bad), check=False)
    assert_one_line(result, "config", str(bad), "line 3, column 4")


# --- files and file systems ----------------------------------------------------------------


@pytest.mark.slow
def test_out_under_a_regular_file_is_one_line_naming_the_path(videos, tmp_path):
    (tmp_path / "afile").write_text("not a folder")
    out = tmp_path / "afile" / "s.zarr"
    result = run_fsar(
        "extract", "--dataset", "folder", "--root", str(videos), "--out", str(out), check=False
    )
    assert_one_line(result, "extract", str(tmp_path / "afile"), "Not a directory")
    assert (tmp_path / "afile").read_text() == "not a folder"


@pytest.mark.parametrize("code", [errno.EROFS, errno.ENOSPC])
def test_a_read_only_or_full_file_system_is_one_line(videos, tmp_path, monkeypatch, capsys, code):
    """Tests run as root, whom chmod does not stop: the kernel's answer is injected at mkdir."""
    blocked = tmp_path / "mounted"
    blocked.mkdir()
    real_mkdir = os.mkdir

    def mkdir(path, *args, **kwargs):
        if Path(path).is_relative_to(blocked):
            raise OSError(code, os.strerror(code), os.fspath(path))
        return real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "mkdir", mkdir)
    args = ["extract", "--dataset", "folder", "--root", str(videos), "--workers", "0"]
    assert cli.main(args + ["--out", str(blocked / "s.zarr")]) == 2
    lines = error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and lines[0].startswith("fsar extract: error: ")
    assert str(blocked) in lines[0] and os.strerror(code) in lines[0]


def test_a_full_disk_under_stdout_is_one_line():
    """/dev/full answers every write with ENOSPC: a real full device, not an injection."""
    with open("/dev/full", "w") as full:
        result = subprocess.run(
            [sys.executable, "-m", "fsar", "config"],
            stdout=full,
            stderr=subprocess.PIPE,
            text=True,
            cwd=REPO,
        )
    assert_one_line(result, "config", "No space left on device")


@pytest.mark.parametrize(
    "command",
    [
        ["cache", "info", "STORE"],
        ["config"],
        pytest.param(["splits", "list"], marks=pytest.mark.slow),  # imports torch: ~7 s
    ],
)
def test_output_into_a_closed_pipe_exits_quietly(store, command):
    """`fsar cache info STORE | head`: the reader is gone before we write."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    args = [str(store) if word == "STORE" else word for word in command]
    result = subprocess.run(
        [sys.executable, "-m", "fsar", *args],
        stdout=write_end,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    os.close(write_end)
    assert result.stderr == ""
    assert result.returncode == 141  # 128 + SIGPIPE, as a program killed by the signal


def test_output_into_head_is_complete_and_quiet(store):
    result = subprocess.run(
        f"{sys.executable} -m fsar cache info {store} | head -n 1",
        shell=True,
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert result.returncode == 0 and result.stderr == ""
    assert result.stdout.startswith("store ") and str(store) in result.stdout


# --- stores and checkpoints ----------------------------------------------------------------


def test_a_truncated_hdf5_store_is_one_line_naming_it(store, tmp_path):
    from fsar.cache import export_hdf5, open_store

    h5 = tmp_path / "s.h5"
    export_hdf5(open_store(store), h5)
    cut = tmp_path / "cut.h5"
    cut.write_bytes(h5.read_bytes()[: h5.stat().st_size // 3])
    result = run_fsar("cache", "info", str(cut), check=False)
    assert_one_line(result, "cache", str(cut), "truncated")


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("bad_files")
    files = {
        "garbage": folder / "garbage.pth",
        "empty": folder / "empty.pth",
        "code": folder / "code.pth",
        "no_backbone": folder / "no_backbone.pth",
        "cut_zip": folder / "cut.pth",
    }
    files["garbage"].write_bytes(b"this is not a checkpoint\n" * 40)
    files["empty"].write_bytes(b"")
    # a pickle that needs a Python class: refused by weights_only loading
    torch.save({"model_state_dict": {"x": torch.nn.Linear(2, 2)}}, files["code"])
    torch.save({"model_state_dict": {"classifier.weight": torch.zeros(2)}}, files["no_backbone"])
    whole = files["no_backbone"].read_bytes()
    files["cut_zip"].write_bytes(whole[: len(whole) // 2])
    return files


@pytest.mark.slow
@pytest.mark.parametrize(
    "flag, kind, reason",
    [
        ("--checkpoint", "garbage", "not a PyTorch file"),
        ("--checkpoint", "no_backbone", "no backbone.* or visual.* keys"),
        ("--weights", "code", "Python objects"),
    ],
)
def test_bad_files_given_to_extract_are_refused_in_one_line(
    videos, tmp_path, bad_files, flag, kind, reason
):
    result = run_fsar(
        "extract", "--dataset", "folder", "--root", str(videos), flag, str(bad_files[kind]),
        "--out", str(tmp_path / "s.zarr"), check=False,
    )  # fmt: skip
    line = assert_one_line(result, "extract", str(bad_files[kind]), "refused", reason)
    assert "weights_only=False" not in line
    assert not (tmp_path / "s.zarr").exists()


@pytest.mark.parametrize("flag", ["--checkpoint", "--weights"])
@pytest.mark.parametrize(
    "kind, reason", [("empty", "the file is empty"), ("cut_zip", "truncated"), ("code", "Python")]
)
def test_every_kind_of_bad_weights_file_is_named(
    videos, tmp_path, bad_files, capsys, flag, kind, reason
):
    """The same refusals as above, in-process (the subprocess start-up is the slow part)."""
    args = ["extract", "--dataset", "folder", "--root", str(videos), flag, str(bad_files[kind])]
    assert cli.main(args + ["--out", str(tmp_path / "s.zarr")]) == 2
    lines = error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and f"{flag} {bad_files[kind]} refused: " in lines[0]
    assert reason in lines[0] and "weights_only=False" not in lines[0]


def test_a_truncated_safetensors_weights_file_is_refused_from_its_header(videos, tmp_path, capsys):
    from safetensors.torch import save_file

    whole = tmp_path / "whole.safetensors"
    save_file({"visual.proj": torch.zeros(64, 64)}, str(whole))
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    args = ["extract", "--dataset", "folder", "--root", str(videos), "--weights", str(cut)]
    assert cli.main(args + ["--out", str(tmp_path / "s.zarr")]) == 2
    lines = error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and f"--weights {cut} refused: a truncated" in lines[0]


@pytest.mark.slow
@pytest.mark.parametrize("kind, reason", [("garbage", "not a PyTorch file")])
def test_bad_files_given_to_eval_official_are_refused_in_one_line(store, bad_files, kind, reason):
    result = run_fsar(
        "eval", "--official", str(bad_files[kind]), "--head", "clipfsar", "--store", str(store),
        "--way", "2", "--episodes", "4", check=False,
    )  # fmt: skip
    line = assert_one_line(result, "eval", str(bad_files[kind]), "refused", reason)
    assert "weights_only=False" not in line


@pytest.mark.slow
def test_an_official_checkpoint_of_the_other_head_names_both_heads(store, tmp_path):
    from fsar.heads import CLIPFSARHead, to_official

    official = tmp_path / "clipfsar_release.pth"
    torch.save({"model_state_dict": to_official(CLIPFSARHead(64, mlp_dim=32))}, official)
    result = run_fsar(
        "eval", "--official", str(official), "--head", "clipspm", "--store", str(store),
        "--way", "2", "--episodes", "4", check=False,
    )  # fmt: skip
    assert_one_line(result, "eval", "CLIP-FSAR head", "CLIP-SPM head", "--head clipfsar")


@pytest.mark.slow
def test_a_checkpoint_of_another_head_names_both_heads_and_the_flag(store, tmp_path):
    run = tmp_path / "run"
    args = ["train", "--store", str(store), "--head", "clipfsar", "--way", "2", "--shot", "1"]
    args += ["--steps", "1", "--out", str(run), "protocol.train_query=1", "train.val_every=1"]
    assert cli.main(args + ["train.val_episodes=4", "head.mlp_dim=32"]) == 0
    result = run_fsar(
        "eval", "--checkpoint", str(run / "best.pt"), "--head", "clipspm", "--way", "2",
        "--episodes", "4", "--out", str(tmp_path / "r.json"), check=False,
    )  # fmt: skip
    assert_one_line(result, "eval", "clipfsar head", "D=64", "--head clipspm", "--head clipfsar")
    assert not (tmp_path / "r.json").exists()


# --- bugs, debugging, interrupts, progress bars --------------------------------------------


def test_a_plain_value_error_is_a_bug_and_keeps_its_traceback(monkeypatch):
    from fsar import commands

    def broken(config):
        raise ValueError("an internal invariant broke")

    monkeypatch.setattr(commands, "show_config", broken)
    with pytest.raises(ValueError, match="internal invariant"):
        cli.main(["config"])


def test_fsar_debug_shows_the_traceback_of_an_expected_error():
    result = run_fsar("config", "extract.views=[center", env={"FSAR_DEBUG": "1"}, check=False)
    assert result.returncode == 2
    assert "Traceback" in result.stderr and "ConfigError" in result.stderr
    assert result.stderr.splitlines()[-1].startswith("fsar config: error: ")


def _raise_in_show_config(monkeypatch, error: BaseException) -> None:
    from fsar import commands

    def interrupted(config):
        raise error

    monkeypatch.setattr(commands, "show_config", interrupted)


def test_a_stop_at_a_safe_point_prints_its_line_and_exits_128_plus_the_signal(monkeypatch, capsys):
    _raise_in_show_config(monkeypatch, Interrupted(15, "saved step 3"))
    assert cli.main(["config"]) == 143
    assert capsys.readouterr().err == f"{RERUN_HINT} (SIGTERM; saved step 3)\n"


def test_ctrl_c_outside_a_guarded_loop_exits_130_with_the_rerun_hint(monkeypatch, capsys):
    _raise_in_show_config(monkeypatch, KeyboardInterrupt())
    assert cli.main(["config"]) == 130
    assert capsys.readouterr().err == RERUN_HINT + "\n"


def test_an_error_starts_its_own_line_after_a_live_progress_bar(monkeypatch, capsys):
    from tqdm import tqdm

    def fails_midway(config):
        bar = tqdm(total=10, desc="work", file=sys.stderr)
        bar.update(3)
        raise FsarError("the third item is bad")

    monkeypatch.setattr("fsar.commands.show_config", fails_midway)
    assert cli.main(["config"]) == 2
    err = capsys.readouterr().err
    assert "work" in err
    assert err.endswith("\nfsar config: error: the third item is bad\n")


# --- decoder libraries -----------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["auto", "decord", "pyav"])
def test_a_damaged_video_is_reported_by_our_error_alone(videos, tmp_path, capfd, backend):
    """No decoder library lines on the terminal (checked at the file descriptor); the reason
    stays in the DecodeError text that the store records."""
    from fsar.data.video import DecodeError, open_source

    whole = (videos / "class0" / "v0.mp4").read_bytes()
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(whole[: len(whole) // 3])  # the moov atom is at the end: missing
    noise = tmp_path / "noise.mp4"
    noise.write_bytes(bytes(range(256)) * 16)
    for path in (cut, noise):
        with pytest.raises(DecodeError) as error:
            source = open_source(path, backend=backend)
            source.read([0])
        assert str(path) in str(error.value) and "cannot decode" in str(error.value)
    print("marker", file=sys.stderr)  # stderr itself still works afterwards
    assert capfd.readouterr().err == "marker\n"


def test_a_disk_that_fills_up_while_blocks_are_written_is_one_line(
    videos, tmp_path, monkeypatch, capsys
):
    """ENOSPC where a chunk of features is synced to disk (injected: the disk is not full)."""
    real_fsync = os.fsync

    def fsync(fd):
        path = os.readlink(f"/proc/self/fd/{fd}")
        if "/features/" in path and "/c/" in path:  # a chunk, not the array metadata
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    args = ["extract", "--dataset", "folder", "--root", str(videos), "--workers", "0"]
    assert cli.main(args + ["--out", str(tmp_path / "s.zarr")]) == 2
    lines = error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and lines[0].startswith("fsar extract: error: ")
    for words in (str(tmp_path / "s.zarr"), "No space left on device", "rerun the same command"):
        assert words in lines[0], (words, lines[0])


def test_an_official_head_of_another_feature_width_names_both_widths():
    from fsar.heads import CLIPFSARHead, load_official, to_official
    from fsar.torch_files import CheckpointError

    wide = to_official(CLIPFSARHead(64, mlp_dim=32))
    with pytest.raises(CheckpointError) as error:
        load_official(CLIPFSARHead(32, mlp_dim=32), wide)
    message = str(error.value)
    assert "D=64" in message and "D=32" in message and "--store" in message


def test_an_expected_error_in_a_dataloader_worker_is_one_line_without_its_traceback(
    monkeypatch, capsys
):
    from torch.utils.data import DataLoader

    from fsar.data.video import DecodeError

    class Videos(torch.utils.data.Dataset):
        def __len__(self):
            return 2

        def __getitem__(self, index):
            raise DecodeError(f"cannot decode clip{index}.mp4: moov atom not found")

    def decode_in_a_worker(config):
        next(iter(DataLoader(Videos(), num_workers=1)))

    monkeypatch.setattr("fsar.commands.show_config", decode_in_a_worker)
    assert cli.main(["config"]) == 2
    lines = error_lines(capsys.readouterr().err)
    assert lines == ["fsar config: error: cannot decode clip0.mp4: moov atom not found"]


def test_a_broken_pipe_other_than_stdout_is_an_error_not_a_quiet_exit(monkeypatch, capsys):
    def lost_connection(config):
        raise BrokenPipeError(errno.EPIPE, os.strerror(errno.EPIPE))

    monkeypatch.setattr("fsar.commands.show_config", lost_connection)
    assert cli.main(["config"]) == 2
    assert error_lines(capsys.readouterr().err) == ["fsar config: error: Broken pipe"]


def test_a_bug_after_a_live_progress_bar_gets_its_traceback_on_a_fresh_line(monkeypatch, capsys):
    from tqdm import tqdm

    def fails_midway(config):
        bar = tqdm(total=10, desc="work", file=sys.stderr)
        bar.update(3)
        raise KeyError("a bug")

    monkeypatch.setattr("fsar.commands.show_config", fails_midway)
    try:
        cli.main(["config"])
    except KeyError:  # what stderr holds when Python prints the traceback (the bar is alive)
        err = capsys.readouterr().err
    assert "work" in err and err.endswith("\n")
