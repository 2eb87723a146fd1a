"""Ablation grids and sweeps as sets of jobs (issue 14): in parallel, in shards, with seeds,
killed and resumed, always the same table.

One module-scoped store of rendered demo videos (4 classes per split) and one reference grid
(3 learning rates of a tiny CLIP-FSAR head, one point after another) serve every test; each
other way of running the grid must write exactly the reference's table.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from fsar.cli import main
from fsar.config import load_config
from fsar.data.synthetic import DemoSpec, render_demo_dataset
from fsar.pipelines.ablate import ablation_jobs
from fsar.pipelines.evaluate import interval
from fsar.pipelines.jobs import JOB_FILE, make_plan, pending

from .conftest import REPO, start_fsar
from .test_pipelines import extract_store

STEPS = 40
GRID = ["--grid", "train.lr=0.001,0.0003,0.0001"]
SETTINGS = [
    "--head",
    "clipfsar",
    "--way",
    "3",
    "--steps",
    str(STEPS),
    "--device",
    "cpu",
    "head.heads=2",
    "head.dim_head=8",
    "head.mlp_dim=32",
    "protocol.train_query=2",
    "train.tasks_per_batch=2",
    "train.episode_batch=2",
    "train.val_every=10",
    "train.val_episodes=10",
    "train.log_every=1",
    "eval.episodes=40",
    "eval.episode_batch=20",
]


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("ablate")
    spec = DemoSpec(n_pairs=6, train_pairs=2, val_pairs=2, videos_per_class=5, n_frames=10, size=32)
    render_demo_dataset(base / "videos", spec)
    return extract_store(base / "videos", base / "store.zarr", "fsar-tiny-vit")


def ablate_args(store: Path, out: Path, *extra: str, grid: list[str] = GRID) -> list[str]:
    return ["ablate", "--store", str(store), "--out", str(out), *grid, *SETTINGS, *extra]


@pytest.fixture(scope="module")
def reference(store, tmp_path_factory) -> Path:
    """The grid run one point after another in this process."""
    out = tmp_path_factory.mktemp("reference") / "grid"
    threads = torch.get_num_threads()
    assert main(ablate_args(store, out)) == 0
    assert torch.get_num_threads() == threads  # each run's count is set for it, then restored
    return out


def job_records(out: Path) -> dict[str, dict]:
    return {
        str(path.parent.relative_to(out)): json.loads(path.read_text())
        for path in sorted(out.rglob(JOB_FILE))
    }


def assert_same_tables(a: Path, b: Path) -> None:
    assert (a / "table.md").read_bytes() == (b / "table.md").read_bytes()
    assert (a / "table.csv").read_bytes() == (b / "table.csv").read_bytes()


def assert_same_runs(a: Path, b: Path) -> None:
    """The same jobs, with the same per-episode scores and bitwise the same trained heads."""
    left, right = job_records(a), job_records(b)
    assert left.keys() == right.keys() and left
    for name, record in left.items():
        assert record["per_episode"] == right[name]["per_episode"], name
        assert record["threads"] == right[name]["threads"] == 1
        heads = [torch.load(o / name / "best.pt", weights_only=True)["head"] for o in (a, b)]
        assert all(torch.equal(heads[0][k], heads[1][k]) for k in heads[0]), name


def test_the_reference_table_pairs_every_point_with_the_first(reference):
    rows = (reference / "table.csv").read_text().splitlines()
    assert rows[0] == (
        "train.lr,accuracy,ci95,diff_vs_first,diff_ci95,selection_accuracy,seeds,seed_std"
    )
    assert len(rows) == 4 and rows[1].split(",")[3] == "0.0"
    table = (reference / "table.md").read_text()
    assert "1 CPU thread(s) (ablate.threads) on cpu" in table
    records = job_records(reference)
    assert sorted(records) == [
        "lr=0.0001/seed=6",
        "lr=0.0003/seed=6",
        "lr=0.001/seed=6",
    ]
    for name, record in records.items():  # the job's result is fsar eval's, of its own run
        result = json.loads((reference / name / "eval.json").read_text())
        assert record["result"]["accuracy"] == result["accuracy"]
        assert 100 * np.mean(record["per_episode"]) == pytest.approx(result["accuracy"])
        assert record["train"]["steps"] == STEPS


def test_two_jobs_at_a_time_give_the_table_of_one_at_a_time(store, reference, tmp_path, capsys):
    out = tmp_path / "parallel"
    assert main(ablate_args(store, out, "--jobs", "2")) == 0
    assert "ablate (2 at a time)" in capsys.readouterr().err
    assert_same_tables(out, reference)
    assert_same_runs(out, reference)


def test_shards_collected_give_the_table_of_one_machine(store, reference, tmp_path, capsys):
    first, second = tmp_path / "node0", tmp_path / "node1"
    assert main(ablate_args(store, first, "--shard", "0/2")) == 0
    printed = capsys.readouterr().out
    assert "shard 0/2 finished" in printed and f"fsar ablate --collect {first}" in printed
    assert not (first / "table.md").exists()
    assert sorted(job_records(first)) == ["lr=0.0001/seed=6", "lr=0.001/seed=6"]  # 0 and 2
    assert main(["ablate", "--collect", str(first)]) == 2
    assert "1 of 3 runs have no result yet (lr=0.0003/seed=6)" in capsys.readouterr().err
    assert main(ablate_args(store, second, "--shard", "1/2")) == 0
    assert sorted(job_records(second)) == ["lr=0.0003/seed=6"]
    shutil.copytree(second / "lr=0.0003", first / "lr=0.0003")  # gathered on one machine
    assert main(["ablate", "--collect", str(first)]) == 0
    assert_same_tables(first, reference)
    assert_same_runs(first, reference)


def test_a_shard_that_completes_the_grid_writes_the_table(store, reference, tmp_path):
    out = tmp_path / "shared_disk"
    shutil.copytree(reference, out)
    (out / "lr=0.0003" / "seed=6" / JOB_FILE).unlink()  # shard 1's point is not done yet
    (out / "table.md").unlink()
    assert main(ablate_args(store, out, "--shard", "1/2")) == 0
    assert_same_tables(out, reference)


def test_a_rerun_skips_only_jobs_run_with_the_same_settings(store, reference):
    def todo(*extra: str) -> tuple[int, int]:
        jobs = ablation_jobs(load_config([], ablate_overrides(store, reference, *extra)))
        found, done = pending(reference, make_plan("ablate", jobs, {}), jobs)
        return len(found), done

    assert todo() == (0, 3)
    assert todo("train.device=auto", "train.log_every=5") == (0, 3)  # where, what is printed
    assert todo("eval.episodes=30") == (3, 0)
    assert todo("ablate.grid.train.lr=[0.001,0.003]") == (1, 1)  # an added point runs alone


def ablate_overrides(store: Path, out: Path, *extra: str) -> list[str]:
    """The reference's settings as config overrides."""
    flags = {
        "--head": "head.name",
        "--way": "episodes.way",
        "--steps": "train.steps",
        "--device": "train.device",
    }
    settings, items = [], iter(SETTINGS)
    for item in items:
        settings.append(f"{flags[item]}={next(items)}" if item in flags else item)
    return [
        f"train.store={store}",
        f"ablate.out={out}",
        "ablate.grid.train.lr=[0.001,0.0003,0.0001]",
        *settings,
        *extra,
    ]


def test_seeds_average_the_runs_of_single_seed_grids(store, reference, tmp_path):
    two = ["--grid", "train.lr=0.001,0.0003"]
    seeds, single = tmp_path / "seeds", tmp_path / "seed7"
    assert main(ablate_args(store, seeds, "--seeds", "2", grid=two)) == 0
    assert main(ablate_args(store, single, "train.seed=7", grid=two)) == 0
    runs = job_records(seeds)
    alone = {**job_records(reference), **job_records(single)}
    assert sorted(runs) == sorted(f"lr={lr}/seed={s}" for lr in ("0.001", "0.0003") for s in (6, 7))
    for name, record in runs.items():  # each seed's run is the single-seed grid's run
        assert record["per_episode"] == alone[name]["per_episode"], name
    table = json.loads((seeds / "ablation.json").read_text())
    per_episode = {
        lr: np.array([alone[f"lr={lr}/seed={s}"]["per_episode"] for s in (6, 7)])
        for lr in ("0.001", "0.0003")
    }
    for entry, lr in zip(table, ("0.001", "0.0003"), strict=True):
        accuracies = [alone[f"lr={lr}/seed={s}"]["result"]["accuracy"] for s in (6, 7)]
        assert entry["seeds"] == [6, 7]
        assert entry["accuracy"] == np.mean(accuracies)
        assert entry["seed_std"] == np.std(accuracies, ddof=1)
        assert entry["ci95"] == interval(per_episode[lr].mean(0))
        delta = (per_episode[lr] - per_episode["0.001"]).reshape(-1)  # seeds x episodes pairs
        assert entry["diff_vs_first"] == pytest.approx(100 * delta.mean(), abs=1e-12)
        assert entry["diff_ci95"] == pytest.approx(interval(delta), abs=1e-12)
    text = (seeds / "table.md").read_text()
    assert "| train.lr | accuracy | seed std | diff vs first | selection acc |" in text
    assert "2 training seeds per point (train.seed 6, 7)" in text


def wait_for(condition, process: subprocess.Popen, what: str) -> None:
    deadline = time.time() + 180
    while time.time() < deadline and process.poll() is None:
        if condition():
            return
        time.sleep(0.02)
    raise AssertionError(f"{what} did not happen (exit {process.poll()})")


def mid_grid(out: Path) -> bool:
    """One job is finished and another is between steps 2 and STEPS - 15 of its training."""
    if not list(out.rglob(JOB_FILE)):
        return False
    for metrics in out.rglob("metrics.jsonl"):
        if (metrics.parent / JOB_FILE).exists():
            continue
        try:
            step = json.loads(metrics.read_text().splitlines()[-1])["step"]
        except (IndexError, ValueError, KeyError):  # empty, or a line being written
            continue
        if 2 <= step <= STEPS - 15:
            return True
    return False


@pytest.mark.slow
@pytest.mark.parametrize(
    ("signum", "code", "jobs"),
    [(signal.SIGTERM, 143, "2"), (signal.SIGINT, 130, "1")],
    ids=["SIGTERM-jobs2", "SIGINT-jobs1"],
)
def test_a_killed_grid_resumes_to_the_same_table(
    store, reference, tmp_path, capsys, signum, code, jobs
):
    out = tmp_path / "killed"
    args = ablate_args(store, out, "--jobs", jobs)
    process = start_fsar(*args)
    wait_for(lambda: mid_grid(out), process, "a finished job and one in training")
    process.send_signal(signum)
    stdout, stderr = process.communicate(timeout=180)
    assert process.returncode == code, stderr
    last_line = stderr.strip().splitlines()[-1]
    assert "interrupted: rerun the same command to resume" in last_line, stderr[-3000:]
    assert "Traceback" not in stderr and "leaked" not in stderr, stderr[-3000:]
    assert not (out / "table.md").exists()
    finished = set(job_records(out))
    stopped = {
        str(p.parent.relative_to(out))
        for p in out.rglob("last.pt")
        if not (p.parent / JOB_FILE).exists()
    }
    assert finished and stopped and len(finished) < 3
    assert all(f"{name} stopped" in stdout for name in stopped)
    assert main(ablate_args(store, out)) == 0  # the same command (one job at a time: same bits)
    printed = capsys.readouterr().out
    assert f"ablate: {len(finished)} run(s) already finished in {out}: skipped" in printed
    assert "resumed at step" in printed
    assert_same_tables(out, reference)
    assert_same_runs(out, reference)


def test_bad_schedules_are_one_line_errors(store, tmp_path, capsys):
    for flags, message in (
        (["--shard", "3/2"], "ablate.shard must look like I/N with 0 <= I < N"),
        (["--shard", "1"], "ablate.shard must look like I/N"),
        (["--jobs", "0"], "ablate.jobs must be >= 1, got 0"),
        (["--seeds", "0"], "ablate.seeds must be >= 1, got 0"),
        (["--threads", "0"], "ablate.threads must be >= 1, got 0"),
    ):
        assert main(ablate_args(store, tmp_path / "x", *flags)) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert main(["ablate", "--collect", str(tmp_path)]) == 2
    assert "holds no plan.json" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def write_sweep(path: Path, store: Path, out: Path, methods: list[str]) -> Path:
    """A sweep over two heads and two shots; each head's widths in a file of its own."""
    for method, head in (("otam", {}), ("clipfsar", {"heads": 2, "dim_head": 8, "mlp_dim": 32})):
        (path.parent / f"{method}.yaml").write_text(json.dumps({"head": head}))
    settings = [a for a in SETTINGS if "=" in a and not a.startswith("head.")] + [
        "episodes.way=3",
        "protocol.train_query=1",  # 2-shot: a class has 3 videos in a split
        "train.steps=4",
        "train.device=cpu",
    ]
    sweep = {
        "out": str(out),
        "datasets": ["demo"],
        "backbones": ["fsar-tiny-vit"],
        "methods": methods,
        "shots": [1, 2],
        "store": str(store),
        "config": [str(path.parent / "{method}.yaml")],
        "overrides": settings,
    }
    path.write_text(json.dumps(sweep))
    return path


def test_a_sweep_in_two_shards_writes_one_report_in_the_papers_layout(store, tmp_path, capsys):
    out = tmp_path / "sweep"
    sweep = write_sweep(tmp_path / "sweep.yaml", store, out, ["otam", "clipfsar"])
    assert main(["sweep", str(sweep), "--shard", "0/2"]) == 0
    assert "shard 0/2 finished" in capsys.readouterr().out
    assert not (out / "report").exists()
    assert main(["sweep", str(sweep), "--shard", "1/2"]) == 0  # the same disk: it completes
    assert "report ->" in capsys.readouterr().out
    report = (out / "report" / "report.md").read_text()
    assert "| method | backbone | regime | split | demo 1-shot | demo 2-shot |" in report
    rows = [line for line in report.splitlines() if line.startswith(("| OTAM", "| CLIP-FSAR"))]
    assert [row.split(" (")[0] for row in rows] == ["| OTAM", "| CLIP-FSAR"]  # papers' order
    for method, row in zip(("otam", "clipfsar"), rows, strict=True):
        for shot, cell in zip((1, 2), row.split(" | ")[4:], strict=True):
            run = out / "runs" / f"demo_fsar-tiny-vit_{method}_{shot}shot" / "seed=6"
            result = json.loads((run / "eval.json").read_text())
            assert cell.strip(" |") == f"{result['accuracy']:.1f} ± {result['ci95']:.1f}"
            assert result["shot"] == shot and result["head"] == method
    first = (out / "report" / "report.md").read_bytes()
    shutil.rmtree(out / "report")
    assert main(["sweep", "--collect", str(out)]) == 0
    assert (out / "report" / "report.md").read_bytes() == first


def test_a_sweep_names_the_config_files_it_misses(store, tmp_path, capsys):
    sweep = write_sweep(tmp_path / "sweep.yaml", store, tmp_path / "out", ["otam", "trx"])
    assert main(["sweep", str(sweep)]) == 2
    err = capsys.readouterr().err
    assert "1 config file(s) named by the sweep do not exist" in err and "trx.yaml" in err
    assert main(["sweep", str(sweep), "--jobs", "2", "shots=[]"]) == 2  # settings after flags
    assert "shots of the sweep is empty" in capsys.readouterr().err
    assert main(["sweep", "--shard", "2/2", str(sweep)]) == 2
    assert "shard must look like I/N with 0 <= I < N" in capsys.readouterr().err


def test_the_shipped_paper_sweep_composes_every_cell_from_its_files(monkeypatch):
    from fsar.pipelines.sweep import load_sweep, sweep_jobs

    monkeypatch.chdir(REPO)  # its paths are relative to the repository root
    jobs = sweep_jobs(load_sweep(REPO / "configs" / "sweeps" / "paper_tables.yaml"))
    assert len(jobs) == 5 * 2 * 2 * 3 and len({job.group for job in jobs}) == len(jobs)
    for job in jobs:
        labels, config = job.labels, job.config
        assert config.head.name == labels["method"]
        assert config.protocol.preset == f"{labels['method']}_release"
        assert (config.dataset.name, config.model.name) == (labels["dataset"], labels["backbone"])
        assert config.episodes.shot == labels["shot"] and config.episodes.way == 5
        assert config.eval.episodes == 10000
        fsar_ucf_5shot = job.group.startswith("ucf101_") and job.group.endswith("clipfsar_5shot")
        assert config.extract.mean == ([0.45] * 3 if fsar_ucf_5shot else None)
        assert config.train.store == (
            f"stores/ucf101_{labels['backbone']}_clipfsar_release_5shot.zarr"
            if fsar_ucf_5shot
            else f"stores/{labels['dataset']}_{labels['backbone']}_{labels['method']}_release.zarr"
        )
