"""Tests of what happens when things go wrong: two runs into one folder, a run that diverges, the
arguments and files users really give, a full disk. Each bad case must end in one line naming the
problem and the fix, a non-zero exit and no result written; the oracles are the files left behind
(read back with json and torch), the process's own umask, and hand-made bad inputs."""

import errno
import gzip
import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from PIL import Image

from test_dspt import BPE_PATH, HERE, expect_user_error, image_folder, run_main, tiny_checkpoint  # noqa: F401

import baselines  # noqa: E402
import dspt  # noqa: E402
import predict  # noqa: E402
import sweep  # noqa: E402


def base(image_folder, tiny_checkpoint, out):
    return ["--data", str(image_folder), "--backbone", str(tiny_checkpoint), "--epochs", "2", "--shots", "4",
            "--batch-size", "4", "--workers", "0", "--n-ctx", "4", "--out", str(out)]


# -----------------------------------------------------------------------------
# Two runs, one folder.

def test_a_second_run_into_a_held_folder_stops_at_once_naming_the_holder(tmp_path, image_folder, tiny_checkpoint,
                                                                         capsys):
    out = tmp_path / "out"
    with dspt.owning(out):
        line = expect_user_error(capsys, base(image_folder, tiny_checkpoint, out), f"{out} is in use by another run",
                                 f"pid {os.getpid()}")
        assert "give another --out" in line
        expect_user_error(capsys, [*base(image_folder, tiny_checkpoint, out), "--method", "nlprompt"],
                          "is in use by another run", script=baselines)
        assert not (out / "metrics.json").exists()
    metrics = run_main(tmp_path, image_folder, backbone=tiny_checkpoint)  # released: the run goes ahead
    assert json.loads((out / "metrics.json").read_text())["test_accuracy"] == metrics["test_accuracy"]


HOLD = """
import sys, time
sys.path.insert(0, sys.argv[2])
import dspt
with dspt.owning(sys.argv[1]):
    print("held", flush=True)
    time.sleep(60)
"""


def test_a_killed_run_leaves_no_stale_lock(tmp_path, image_folder, tiny_checkpoint, capsys):
    out = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out), str(HERE)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    expect_user_error(capsys, base(image_folder, tiny_checkpoint, out), f"pid {holder.pid}")
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    run_main(tmp_path, image_folder, backbone=tiny_checkpoint)  # kill -9 released the lock
    assert (out / "metrics.json").is_file()


def test_a_checkpoint_of_other_arguments_is_never_loaded(tmp_path, image_folder, tiny_checkpoint):
    # The start-up check passed; then a run with other arguments wrote the checkpoint train() finds.
    run_main(tmp_path, image_folder, backbone=tiny_checkpoint)
    args = dspt.parse_args([*base(image_folder, tiny_checkpoint, tmp_path / "mine"), "--lr", "0.02"])
    dspt.check_args(args)
    dataset, (tokenizer, clip, _) = dspt.load_dataset(args.data), dspt.load_model(args)
    learner = dspt.PackedPromptLearner(clip, dataset.classnames, tokenizer, 4)
    initial = learner.ctx.detach().clone()
    with pytest.raises(dspt.UserError, match="checkpoint.pt is of a run with --lr 0.002, not 0.02"):
        dspt.train(dspt.PromptTuning(learner, dspt.double_softmax_loss), dataset.train[:12],
                   torch.zeros(12, dtype=torch.long), torch.zeros(12, dtype=torch.bool), args,
                   tmp_path / "out" / "checkpoint.pt")
    assert torch.equal(learner.ctx.detach(), initial)  # nothing of the other run's state was taken


def test_default_output_folder_differs_for_every_argument_that_decides_the_run(tiny_checkpoint):
    def default_out(*extra):
        args = dspt.parse_args(["--data", "somewhere", "--backbone", str(tiny_checkpoint), "--device", "cpu", *extra])
        dspt.check_args(args)
        return args.out
    plain = default_out()
    assert plain.startswith("runs/somewhere-tiny-dspt-sym0-16shot-seed1-") and plain == default_out()
    others = [default_out(*flag) for flag in (["--lr", "0.02"], ["--epochs", "10"], ["--n-ctx", "4"],
                                              ["--no-augment"], ["--ctx-init", "a photo of a"], ["--batch-size", "8"])]
    assert len({plain, *others}) == 1 + len(others)


# -----------------------------------------------------------------------------
# A run that diverges.

def test_a_diverging_run_stops_at_that_step_writes_no_result_and_keeps_its_last_good_checkpoint(
        tmp_path, image_folder, tiny_checkpoint, capsys):
    line = expect_user_error(capsys, [*base(image_folder, tiny_checkpoint, tmp_path / "out"), "--epochs", "3",
                                      "--lr", "1e30", "--loss", "ce"], "training diverged at epoch 2, step",
                             "lower --lr (1e+30)")
    assert "no result is written" in line
    out = tmp_path / "out"
    assert not (out / "metrics.json").exists() and not (out / "prompt.pt").exists()
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert len(state["history"]) == 1 and all(torch.isfinite(v).all() for v in state["trained"].values())


def test_metrics_with_a_non_finite_number_are_refused_not_written_as_bare_nan(tmp_path):
    args = dspt.parse_args(["--data", str(tmp_path), "--out", str(tmp_path / "out")])
    learner = type("Learner", (), {"ctx": torch.zeros(2, 4), "named_parameters": lambda self: []})()
    dataset = dspt.Dataset(["a"], [], [], "", "image folder", "{}")
    with pytest.raises(ValueError, match="not JSON compliant"):
        dspt.save_outputs(args, learner, dataset, [], torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.bool),
                          {"test_accuracy": float("nan")})
    assert not (tmp_path / "out").exists()  # not even the prompt


# -----------------------------------------------------------------------------
# Silently wrong inputs.

def test_a_merges_file_with_two_rows_swapped_is_refused(tmp_path):
    with gzip.open(BPE_PATH, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    lines[100], lines[101] = lines[101], lines[100]
    with gzip.open(tmp_path / "swapped.txt.gz", "wt", encoding="utf-8") as f:
        f.write("\n".join(lines))
    dspt.Tokenizer(tmp_path / "swapped.txt.gz")  # it parses: only the checksum can tell
    with pytest.raises(dspt.UserError, match="is not CLIP's"):
        dspt.load_tokenizer(str(tmp_path / "swapped.txt.gz"))
    assert dspt.load_tokenizer(BPE_PATH).encode("a photo of a dog.") == [320, 1125, 539, 320, 1929, 269]


def test_an_empty_class_name_is_refused(tmp_path, image_folder, tiny_checkpoint, capsys):
    image = sorted((image_folder / "blue circle").iterdir())[0]
    expect_user_error(capsys, ["--classify", str(image), "--classnames", "red square,,blue star", "--backbone",
                               str(tiny_checkpoint)], "has an empty class name", script=predict)


def grid_with_one_finished_run(tmp_path, image_folder, tiny_checkpoint):
    out = tmp_path / "sweep"
    argv = ["--data", str(image_folder), "--out", str(out), "--methods", "dspt", "--kinds", "sym", "--rates", "0.5",
            "--no-clean", "--seeds", "1", "2", "--report", "--"]
    runs = sweep.grid(sweep.parse_args(argv))
    for run in runs:  # each run's own command, as the sweep would run it
        dspt.main([*run.command[2:-2], "--backbone", str(tiny_checkpoint), "--epochs", "1", "--shots", "2",
                   "--batch-size", "2", "--workers", "0", "--n-ctx", "2", "--out", str(run.folder)])
    return argv, runs


def test_sweep_report_refuses_metrics_that_belong_to_another_run_or_are_truncated(tmp_path, image_folder,
                                                                                  tiny_checkpoint):
    argv, (first, second) = grid_with_one_finished_run(tmp_path, image_folder, tiny_checkpoint)
    second_metrics = (second.folder / "metrics.json").read_text()
    (second.folder / "metrics.json").write_text((first.folder / "metrics.json").read_text())  # copied in
    with pytest.raises(dspt.UserError, match=f"{second.folder / 'metrics.json'} is of a run with --seed 1, not 2"):
        sweep.main(argv)
    (second.folder / "metrics.json").write_text(second_metrics[:50])  # truncated
    with pytest.raises(dspt.UserError, match=f"{second.folder / 'metrics.json'} is damaged"):
        sweep.main(argv)
    (second.folder / "metrics.json").write_text(second_metrics)
    (tmp_path / "sweep" / "sweep.json").write_text('{"extra": [')  # truncated
    with pytest.raises(dspt.UserError, match="sweep.json is damaged"):
        sweep.main(argv[:-1])


# -----------------------------------------------------------------------------
# One line, not a traceback.

def test_backbones_that_are_not_clip_are_one_line_errors(tmp_path, image_folder, capsys):
    for name, width, vocab in (("narrow", 32, 49408), ("vocab", 64, 1000)):
        torch.manual_seed(0)
        model = dspt.CLIP(embed_dim=32, image_resolution=32, vision_layers=1, vision_width=64, vision_patch_size=8,
                          context_length=77, vocab_size=vocab, transformer_width=width, transformer_heads=1,
                          transformer_layers=1)
        torch.save(model.state_dict(), tmp_path / f"{name}.pt")
        expect_user_error(capsys, ["--data", str(image_folder), "--backbone", str(tmp_path / f"{name}.pt"),
                                   "--out", str(tmp_path / "out")], "is not a CLIP checkpoint",
                          "not a multiple of 64" if name == "narrow" else "not 49408")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", ["checkpoint.pt", "metrics.json"])
def test_a_checkpoint_or_metrics_file_holding_a_list_is_one_line_error(tmp_path, image_folder, tiny_checkpoint,
                                                                      capsys, name):
    (tmp_path / "out").mkdir()
    if name == "checkpoint.pt":
        torch.save([1, 2], tmp_path / "out" / name)
    else:
        (tmp_path / "out" / name).write_text("[1, 2]")
    expect_user_error(capsys, base(image_folder, tiny_checkpoint, tmp_path / "out"), f"{name} is damaged",
                      "holds a list", "--fresh")


def test_an_out_that_cannot_be_written_is_found_before_training(tmp_path, image_folder, tiny_checkpoint, capsys,
                                                                monkeypatch):
    (tmp_path / "a file").write_text("not a folder")
    for out in (tmp_path / "a file", tmp_path / "a file" / "below"):
        expect_user_error(capsys, base(image_folder, tiny_checkpoint, out), f"cannot write in --out {out}")
    loaded = []
    monkeypatch.setattr(dspt, "load_dataset", lambda root: loaded.append(root))
    real_mkdir = type(tmp_path).mkdir

    def read_only(path, *args, **kwargs):
        if "read-only" in str(path):
            raise PermissionError(errno.EACCES, "Permission denied")
        return real_mkdir(path, *args, **kwargs)
    monkeypatch.setattr(type(tmp_path), "mkdir", read_only)
    expect_user_error(capsys, base(image_folder, tiny_checkpoint, tmp_path / "read-only"), "Permission denied")
    assert loaded == []  # found out before the data is even read


def test_a_full_disk_is_one_line_error_and_the_previous_checkpoint_stays_whole(tmp_path, image_folder,
                                                                               tiny_checkpoint, capsys, monkeypatch):
    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        if isinstance(obj, dict) and len(obj.get("history", [])) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *args, **kwargs)
    monkeypatch.setattr(torch, "save", save)
    expect_user_error(capsys, [*base(image_folder, tiny_checkpoint, tmp_path / "out"), "--epochs", "3"],
                      "No space left on device", "checkpoint.pt", "is intact")
    assert len(torch.load(tmp_path / "out" / "checkpoint.pt", weights_only=True)["history"]) == 1
    assert [p.name for p in (tmp_path / "out").iterdir() if p.name.endswith(".part")] == []


def test_an_evaluation_that_cannot_be_written_prints_its_accuracy_first(tmp_path, image_folder, tiny_checkpoint,
                                                                        capsys):
    metrics = run_main(tmp_path, image_folder, backbone=tiny_checkpoint)
    capsys.readouterr()
    (tmp_path / "a file").write_text("not a folder")
    with pytest.raises(SystemExit):
        predict.main(["--eval", str(tmp_path / "out" / "prompt.pt"), "--data", str(image_folder), "--backbone",
                      str(tiny_checkpoint), "--workers", "0", "--out", str(tmp_path / "a file" / "eval")])
    out, err = capsys.readouterr()
    assert f"test accuracy {metrics['test_accuracy']:.2%}" in out
    assert err.strip().splitlines()[-1].startswith("predict: error: cannot write") and "Traceback" not in err


# -----------------------------------------------------------------------------
# Files follow the umask.

@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_written_files_get_the_mode_the_umask_gives(tmp_path, umask):
    previous = os.umask(umask)
    try:
        dspt.atomic_write(tmp_path / "file.json", lambda f: f.write(b"{}"))
        with open(tmp_path / "plain", "w"):
            pass
    finally:
        os.umask(previous)
    assert (tmp_path / "file.json").stat().st_mode & 0o777 == (tmp_path / "plain").stat().st_mode & 0o777
    assert (tmp_path / "file.json").stat().st_mode & 0o777 == 0o666 & ~umask


def test_a_run_s_outputs_follow_the_umask(tmp_path, image_folder, tiny_checkpoint):
    previous = os.umask(0o022)
    try:
        run_main(tmp_path, image_folder, "--epochs", "1", backbone=tiny_checkpoint)
    finally:
        os.umask(previous)
    for name in ("metrics.json", "prompt.pt", "training_sample.csv", "checkpoint.pt"):
        assert (tmp_path / "out" / name).stat().st_mode & 0o777 == 0o644, name


def test_a_sweep_run_whose_folder_another_run_holds_fails_and_says_why(tmp_path, image_folder, tiny_checkpoint):
    runs = sweep.grid(sweep.parse_args(["--data", str(image_folder), "--out", str(tmp_path / "sweep"), "--methods",
                                        "dspt", "--kinds", "sym", "--rates", "0.5", "--no-clean", "--seeds", "1", "--",
                                        "--backbone", str(tiny_checkpoint), "--epochs", "1", "--workers", "0"]))
    with dspt.owning(runs[0].folder):
        assert sweep.run_all(runs, jobs=1, gpus=0) == runs
    assert "is in use by another run" in (runs[0].folder / "failed.txt").read_text()
    assert not (runs[0].folder / "metrics.json").exists()


def test_a_class_name_too_long_for_the_context_is_one_line_naming_it(tmp_path, tiny_checkpoint, capsys):
    long_name = "-".join("x" * 90)  # 179 characters, 179 tokens
    image = tmp_path / "one.png"
    Image.new("RGB", (8, 8)).save(image)
    line = expect_user_error(capsys, ["--classify", str(image), "--classnames", f"cat,{long_name}", "--backbone",
                                      str(tiny_checkpoint)], "a zero-shot prompt does not fit", "tokens long, more "
                             "than the context length 77", script=predict)
    assert long_name in line
