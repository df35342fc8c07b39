"""Tests of sweep.py on the small test checkpoint and generated image folders. The oracles: the
runs' own metrics.json files (the tables must hold their mean and std), the printed commands
run by a shell loop (the same metrics as the sweep's own runs), and the files on disk (which
runs ran again)."""

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from test_dspt import learnable_task  # noqa: F401 (fixture); sets DSPT_BPE

import sweep  # noqa: E402

TINY_RUN = ["--epochs", "4", "--lr", "0.1", "--shots", "4", "--batch-size", "4", "--workers", "0", "--n-ctx", "4",
            "--no-augment"]


def datasets(root, names, learnable_task):
    """Copies of test_dspt's learnable task (one colour per class), under these names."""
    for name in names:
        shutil.copytree(learnable_task[0], root / name)
    return [str(root / name) for name in names]


def grid(data, out, checkpoint, seeds=("1", "2"), methods=("dspt", "ce")):
    return ["--data", *data, "--kinds", "sym", "--rates", "0.5", "--seeds", *seeds, "--methods", *methods,
            "--out", str(out), "--jobs", "2", "--", "--backbone", str(checkpoint), *TINY_RUN]


def without_volatile(metrics):
    """A run's metrics less what differs between two runs of one command: the seconds, the folder."""
    history = [{k: v for k, v in record.items() if k != "seconds"} for record in metrics["history"]]
    return {**metrics, "history": history, "args": {k: v for k, v in metrics["args"].items() if k != "out"}}


@pytest.fixture(scope="module")
def checkpoint(learnable_task):
    return learnable_task[1]


@pytest.fixture(scope="module")
def finished_sweep(tmp_path_factory, checkpoint, learnable_task):
    root = tmp_path_factory.mktemp("sweep")
    data = datasets(root, ["alpha", "beta"], learnable_task)
    runs, failed = sweep.main(grid(data, root / "out", checkpoint))
    return root, data, runs, failed


def test_sweep_runs_the_grid_and_writes_tables_and_plots(finished_sweep, checkpoint):
    root, data, runs, failed = finished_sweep
    assert len(runs) == 2 * 2 * 2 * 2 and not failed  # datasets x (none, sym 0.5) x seeds x methods
    assert {run.folder.relative_to(root / "out").as_posix() for run in runs} == {
        f"{d}/{m}/{s}/seed{k}" for d in ("alpha", "beta") for m in ("dspt", "ce") for s in ("none", "sym0.5")
        for k in (1, 2)}
    for run in runs:
        metrics = run.metrics()
        assert metrics["args"]["seed"] == run.seed and metrics["args"]["loss"] == run.method
        assert metrics["args"]["noise"] == run.rate and metrics["args"]["backbone"] == str(checkpoint)
        log = (run.folder / "log.txt").read_text()  # the log of the process that trained its group
        assert f"== {run.folder}\n" in log and "pass 1: 4 runs together" in log
    for name in ("results.md", "results.csv", "alpha.png", "beta.png"):
        assert (root / "out" / name).is_file()
    assert (root / "out" / "alpha.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_table_numbers_are_the_mean_and_std_of_the_runs(finished_sweep):
    root, data, runs, failed = finished_sweep
    with open(root / "out" / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 16 and {row["status"] for row in rows} == {"finished"}
    text = (root / "out" / "results.md").read_text()
    for dataset in ("alpha", "beta"):
        section = text.split(f"## {dataset}\n")[1].split("\n## ")[0]
        lines = [line for line in section.splitlines() if line.startswith("| ") and not line.startswith("| method")]
        table = {line.split("|")[1].strip(): [c.strip() for c in line.strip("|").split("|")[1:]] for line in lines}
        for method in ("dspt", "ce"):
            for column, folder in enumerate(["none", "sym0.5"]):
                accuracies = [json.loads((root / "out" / dataset / method / folder / f"seed{k}" / "metrics.json")
                                         .read_text())["test_accuracy"] for k in (1, 2)]
                expected = f"{100 * np.mean(accuracies):.1f} ± {100 * np.std(accuracies):.1f} (2)"
                assert table[method][column] == expected
                csv_values = sorted(float(r["test_accuracy"]) for r in rows if (r["dataset"], r["method"]) == (
                    dataset, method) and r["noise_kind"] == ("none" if folder == "none" else "sym"))
                assert csv_values == sorted(accuracies)


def test_a_second_call_runs_nothing_and_a_deleted_run_runs_again(finished_sweep, checkpoint, capsys):
    root, data, runs, _ = finished_sweep
    capsys.readouterr()
    sweep.main(grid(data, root / "out", checkpoint))
    assert "16 runs, 16 finished, 0 to run" in capsys.readouterr().out
    victim = runs[5]
    before = {run.folder: (run.folder / "metrics.json").stat().st_mtime_ns for run in runs if run is not victim}
    metrics = victim.metrics()
    subprocess.run(["rm", "-r", str(victim.folder)], check=True)
    sweep.main(grid(data, root / "out", checkpoint))
    out = capsys.readouterr().out
    assert "16 runs, 15 finished, 1 to run" in out and out.count(" done, ") == 1
    assert without_volatile(victim.metrics()) == without_volatile(metrics)
    assert {run.folder: (run.folder / "metrics.json").stat().st_mtime_ns for run in runs if run is not victim} == before


@pytest.mark.parametrize("group", [True, False], ids=["groups", "no-group"])
def test_printed_commands_run_by_a_shell_loop_give_the_same_metrics(finished_sweep, checkpoint, capsys, tmp_path,
                                                                    group):
    root, data, runs, _ = finished_sweep
    capsys.readouterr()
    sweep.main(["--print-commands", *([] if group else ["--no-group"]),
                *grid(data[:1], tmp_path / "elsewhere", checkpoint, seeds=("1",))])
    commands = capsys.readouterr().out
    lines = commands.splitlines()
    if group:  # the four runs share their images: one process trains them together
        assert len(lines) == 1 and "sweep.py --together" in lines[0] and lines[0].count("--out") == 4
    else:
        assert len(lines) == 4 and all(line.count("--out") == 1 and "--together" not in line for line in lines)
    (tmp_path / "commands.txt").write_text(commands)
    subprocess.run(["bash", "-c", "while read -r line; do eval \"$line\" > /dev/null 2>&1; done < commands.txt"],
                   cwd=tmp_path, check=True)
    for method in ("dspt", "ce"):
        for setting in ("none", "sym0.5"):
            ours = json.loads((tmp_path / "elsewhere" / "alpha" / method / setting / "seed1" / "metrics.json").read_text())
            theirs = json.loads((root / "out" / "alpha" / method / setting / "seed1" / "metrics.json").read_text())
            assert without_volatile(ours) == without_volatile(theirs)


def test_a_failing_run_is_reported_and_the_others_go_on(tmp_path, checkpoint, learnable_task, capsys):
    data = datasets(tmp_path, ["good"], learnable_task) + [str(tmp_path / "empty")]
    (tmp_path / "empty").mkdir()
    runs, failed = sweep.main(["--no-clean", *grid(data, tmp_path / "out", checkpoint, seeds=("1",),
                                                   methods=("dspt",))])
    assert [run.dataset for run in failed] == ["empty"]
    assert [run.status() for run in runs] == ["finished", "failed"]
    log = (failed[0].folder / "failed.txt").read_text()
    assert "exit status 1" in log and "dspt: error: data folder" in log and "--data" in log
    out = capsys.readouterr().out
    assert "1 runs failed" in out and "FAILED" in out
    text = (tmp_path / "out" / "results.md").read_text()
    assert "| dspt | failed |" in text and "1 failed" in text


def test_runs_are_spread_over_the_gpus_one_at_a_time(tmp_path):
    # Stand-in runs that record the GPU they were given and when they ran.
    script = ("import json, os, sys, time; start = time.time(); time.sleep(0.3); "
              "json.dump({'gpu': os.environ['CUDA_VISIBLE_DEVICES'], 'start': start, 'end': time.time(), "
              "'test_accuracy': 0, 'command': json.loads(sys.argv[2])}, open(sys.argv[1], 'w'))")
    runs = [sweep.Run("data/x", "dspt", "none", 0.0, seed, tmp_path, []) for seed in range(6)]
    for run in runs:  # the command each records is the one its folder stands for
        command = {"data": str(Path("data/x").resolve()), "seed": run.seed, "noise": 0.0, "loss": "dspt"}
        run.command = [sys.executable, "-c", script, str(run.folder / "metrics.json"), json.dumps(command)]
    assert sweep.run_all(runs, jobs=1, gpus=2) == []
    records = [run.metrics() for run in runs]
    assert {record["gpu"] for record in records} == {"0", "1"}
    for gpu in ("0", "1"):
        spans = sorted((r["start"], r["end"]) for r in records if r["gpu"] == gpu)
        assert all(end <= next_start for (_, end), (next_start, _) in zip(spans, spans[1:]))


def test_a_sweep_with_other_run_arguments_in_the_same_folder_is_refused(finished_sweep, checkpoint):
    root, data, runs, _ = finished_sweep
    argv = grid(data, root / "out", checkpoint)
    with pytest.raises(sweep.dspt.UserError, match="holds a sweep whose runs had the arguments"):
        sweep.main([*argv, "--lr", "0.5"])
