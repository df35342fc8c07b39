"""Tests of interrupted runs and of using a learned prompt. The oracle for resuming is the same
command run without interruption: its metrics (every figure but the seconds) and its prompt
must come out identical. The oracles for using a prompt are the run that learned it: its final
test accuracy, and its logits for a training image."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from test_dspt import BPE_PATH, HERE, expect_user_error, image_folder, run_main, tiny_checkpoint  # noqa: F401

import dspt  # noqa: E402
import predict  # noqa: E402


class Interrupt(Exception):
    """Stands for the run being killed."""


def without_seconds(metrics):
    return {**metrics, "history": [{k: v for k, v in r.items() if k != "seconds"} for r in metrics["history"]]}


def interrupted_after(monkeypatch, epochs_done):
    """Make the run stop (raise) once it has saved the checkpoint of epoch epochs_done."""
    original = dspt.atomic_write

    def save_then_stop(path, write):
        original(path, write)
        if Path(path).name == "checkpoint.pt" and len(torch.load(path, weights_only=True)["history"]) == epochs_done:
            raise Interrupt
    monkeypatch.setattr(dspt, "atomic_write", save_then_stop)


RUN = ["--epochs", "4", "--noise", "0.5"]


@pytest.mark.parametrize("extra", [["--no-augment"], [], ["--workers", "2"]], ids=["no-augment", "augment", "workers"])
@pytest.mark.parametrize("epochs_done", [2, 4])
def test_resumed_run_equals_the_uninterrupted_one(tmp_path, image_folder, tiny_checkpoint, monkeypatch,
                                                  extra, epochs_done):
    whole = run_main(tmp_path / "whole", image_folder, *RUN, *extra, backbone=tiny_checkpoint)
    with monkeypatch.context() as patch:
        interrupted_after(patch, epochs_done)
        with pytest.raises(Interrupt):
            run_main(tmp_path / "parts", image_folder, *RUN, *extra, backbone=tiny_checkpoint)
    assert not (tmp_path / "parts" / "out" / "metrics.json").exists()
    assert len(torch.load(tmp_path / "parts" / "out" / "checkpoint.pt")["history"]) == epochs_done
    resumed = run_main(tmp_path / "parts", image_folder, *RUN, *extra, backbone=tiny_checkpoint)
    assert without_seconds(resumed) == without_seconds(whole) | {"args": resumed["args"]}
    assert resumed["args"]["out"] != whole["args"]["out"]
    assert {k: v for k, v in resumed["args"].items() if k != "out"} == {
        k: v for k, v in whole["args"].items() if k != "out"}
    assert torch.equal(torch.load(tmp_path / "parts" / "out" / "prompt.pt")["ctx"],
                       torch.load(tmp_path / "whole" / "out" / "prompt.pt")["ctx"])
    assert (tmp_path / "parts" / "out" / "training_sample.csv").read_text() == \
        (tmp_path / "whole" / "out" / "training_sample.csv").read_text().replace("whole", "parts")


@pytest.mark.parametrize("method", ["prograd", "nlprompt"])
def test_baselines_resume_with_their_own_records(tmp_path, image_folder, tiny_checkpoint, monkeypatch, method):
    import baselines
    argv = lambda out: ["--data", str(image_folder), "--backbone", str(tiny_checkpoint), "--epochs", "4",  # noqa: E731
                        "--shots", "4", "--batch-size", "4", "--workers", "0", "--n-ctx", "4", "--noise", "0.5",
                        "--method", method, "--out", str(tmp_path / out)]
    whole = baselines.main(argv("whole"))
    with monkeypatch.context() as patch:
        interrupted_after(patch, 2)
        with pytest.raises(Interrupt):
            baselines.main(argv("parts"))
    resumed = baselines.main(argv("parts"))
    assert without_seconds(resumed) == without_seconds(whole) | {"args": resumed["args"]}
    key = "prograd_conflict_fraction" if method == "prograd" else "ot_noisy_recall"
    assert all(key in record for record in resumed["history"])


def test_finished_run_is_not_run_again_unless_fresh(tmp_path, image_folder, tiny_checkpoint, capsys, monkeypatch):
    first = run_main(tmp_path, image_folder, *RUN, backbone=tiny_checkpoint)
    capsys.readouterr()
    monkeypatch.setattr(dspt, "train", lambda *a, **k: pytest.fail("a finished run was trained again"))
    again = run_main(tmp_path, image_folder, *RUN, backbone=tiny_checkpoint)
    out = capsys.readouterr().out
    assert again == first and "already finished" in out and str(tmp_path / "out" / "metrics.json") in out
    monkeypatch.undo()
    fresh = run_main(tmp_path, image_folder, *RUN, "--fresh", backbone=tiny_checkpoint)
    assert without_seconds(fresh) == without_seconds(first) | {"args": fresh["args"]}


@pytest.mark.parametrize("finished", [False, True])
def test_other_arguments_are_refused_naming_the_difference(tmp_path, image_folder, tiny_checkpoint, capsys,
                                                           monkeypatch, finished):
    with monkeypatch.context() as patch:
        if not finished:
            interrupted_after(patch, 1)
        try:
            run_main(tmp_path, image_folder, *RUN, backbone=tiny_checkpoint)
        except Interrupt:
            pass
    before = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}
    argv = ["--data", str(image_folder), "--backbone", str(tiny_checkpoint), "--epochs", "4", "--shots", "4",
            "--batch-size", "4", "--workers", "0", "--n-ctx", "4", "--out", str(tmp_path / "out")]
    expect_user_error(capsys, [*argv, "--noise", "0.25"], "--noise", "0.5", "0.25", "--fresh")
    expect_user_error(capsys, [*argv, "--noise", "0.5", "--loss", "ce"], "--loss")
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()} == before


@pytest.mark.parametrize("damage", [b"", b"not a checkpoint", None])
def test_damaged_checkpoint_is_one_clear_error(tmp_path, image_folder, tiny_checkpoint, capsys, damage):
    (tmp_path / "out").mkdir()
    path = tmp_path / "out" / "checkpoint.pt"
    if damage is None:  # a real checkpoint cut short
        torch.save({"history": [1, 2, 3], "ctx": torch.randn(100, 100)}, path)
        path.write_bytes(path.read_bytes()[:1000])
    else:
        path.write_bytes(damage)
    expect_user_error(capsys, ["--data", str(image_folder), "--backbone", str(tiny_checkpoint), "--workers", "0",
                               "--out", str(tmp_path / "out")], "checkpoint", "damaged", "--fresh")


def test_a_baselines_run_in_the_same_folder_is_refused_by_name(tmp_path, image_folder, tiny_checkpoint, capsys):
    import baselines
    run_main(tmp_path, image_folder, *RUN, backbone=tiny_checkpoint)
    argv = ["--data", str(image_folder), "--backbone", str(tiny_checkpoint), "--epochs", "4", "--shots", "4",
            "--batch-size", "4", "--workers", "0", "--n-ctx", "4", "--noise", "0.5", "--method", "nlprompt",
            "--out", str(tmp_path / "out")]
    with pytest.raises(SystemExit):
        baselines.main(argv)
    assert "--method (none), not nlprompt" in capsys.readouterr().err
    result = predict.main(["--data", str(image_folder), "--backbone", str(tiny_checkpoint), "--workers", "0",
                           "--eval", str(tmp_path / "out" / "prompt.pt")])
    assert result["test_accuracy"] == json.loads((tmp_path / "out" / "metrics.json").read_text())["test_accuracy"]


def test_evaluating_a_saved_prompt_reproduces_the_run(tmp_path, image_folder, tiny_checkpoint, capsys):
    metrics = run_main(tmp_path, image_folder, *RUN, backbone=tiny_checkpoint)
    capsys.readouterr()
    prompt = tmp_path / "out" / "prompt.pt"
    result = predict.main(["--data", str(image_folder), "--backbone", str(tiny_checkpoint), "--workers", "0",
                           "--eval", str(prompt), "--out", str(tmp_path / "eval")])
    assert result["test_accuracy"] == metrics["test_accuracy"]
    assert result["test_images"] == metrics["test_images"]
    assert json.loads((tmp_path / "eval" / "eval.json").read_text()) == result
    assert f"test accuracy {metrics['test_accuracy']:.2%}" in capsys.readouterr().out


def test_evaluation_refuses_a_prompt_for_other_classes(tmp_path, image_folder, tiny_checkpoint, capsys):
    prompt = tmp_path / "prompt.pt"
    torch.save({"ctx": torch.zeros(4, 64), "classnames": ["cat", "dog", "emu"], "backbone": str(tiny_checkpoint)},
               prompt)
    argv = ["--data", str(image_folder), "--workers", "0", "--eval", str(prompt), "--out", str(tmp_path / "eval")]
    expect_user_error(capsys, [*argv, "--backbone", str(tiny_checkpoint)], "class names", "cat", "blue circle",
                      script=predict)
    torch.save({"ctx": torch.zeros(4, 64), "classnames": ["cat", "dog", "emu"], "backbone": "ViT-B/16"}, prompt)
    expect_user_error(capsys, [*argv, "--backbone", str(tiny_checkpoint)], "learned on the backbone ViT-B/16",
                      "--backbone ViT-B/16", script=predict)
    assert not (tmp_path / "eval").exists()


@pytest.mark.parametrize("content", [b"", b"junk", "pickle"])
def test_damaged_prompt_files_are_one_clear_error(tmp_path, image_folder, tiny_checkpoint, capsys, content):
    prompt = tmp_path / "prompt.pt"
    if content == "pickle":  # code in a pickle is never run: weights_only refuses it
        torch.save({"ctx": torch.zeros(4, 64), "classnames": ["a"], "backbone": "x", "evil": Interrupt()}, prompt)
    else:
        prompt.write_bytes(content)
    expect_user_error(capsys, ["--data", str(image_folder), "--backbone", str(tiny_checkpoint), "--workers", "0",
                               "--eval", str(prompt), "--out", str(tmp_path / "eval")], "prompt", str(prompt),
                      script=predict)


def test_prompt_files_are_read_without_running_pickled_code(tmp_path, tiny_checkpoint):
    prompt = tmp_path / "prompt.pt"
    torch.save({"ctx": torch.zeros(4, 64), "classnames": ["a", "b"], "backbone": "x", "evil": Interrupt()}, prompt)
    clip, _ = dspt.load_clip(str(tiny_checkpoint))
    with pytest.raises(dspt.UserError, match="cannot read the prompt"):
        predict.load_prompt(prompt, clip, dspt.load_tokenizer(BPE_PATH))


def test_classifying_an_image_matches_the_run_that_learned_the_prompt(tmp_path, image_folder, tiny_checkpoint,
                                                                      capsys):
    run_main(tmp_path, image_folder, *RUN, "--no-augment", backbone=tiny_checkpoint)
    capsys.readouterr()
    prompt = torch.load(tmp_path / "out" / "prompt.pt")
    clip, preprocess = dspt.load_clip(str(tiny_checkpoint))
    learner = predict.load_prompt(tmp_path / "out" / "prompt.pt", clip, dspt.load_tokenizer(BPE_PATH))
    assert torch.equal(learner.ctx.detach(), prompt["ctx"]) and learner.classnames == prompt["classnames"]
    images = sorted((image_folder / "red_square").iterdir())[:2]
    with torch.no_grad():
        features = clip.encode_image(torch.stack([preprocess(dspt.read_image(p)) for p in images]))
        expected = clip.logits(features, learner.text_features()).softmax(dim=-1)
    predict.main(["--classify", *map(str, images), "--prompt", str(tmp_path / "out" / "prompt.pt"),
               "--backbone", str(tiny_checkpoint)])
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2
    for line, path, probabilities in zip(lines, images, expected):
        fields = line.split("\t")
        assert fields[0] == str(path) and len(fields) == 1 + 2 * 3  # 3 classes: top-3 only
        order = probabilities.argsort(descending=True)
        assert fields[1::2] == [prompt["classnames"][i] for i in order]
        assert [float(p) for p in fields[2::2]] == pytest.approx(probabilities[order].tolist(), abs=5e-5)


def test_zero_shot_classification_without_a_prompt(tmp_path, image_folder, tiny_checkpoint, capsys):
    image = sorted((image_folder / "blue circle").iterdir())[0]
    predict.main(["--classify", str(image), "--classnames", "cat,dog", "--template", "a photo of a {}.",
               "--backbone", str(tiny_checkpoint)])
    clip, preprocess = dspt.load_clip(str(tiny_checkpoint))
    tokenizer = dspt.load_tokenizer(BPE_PATH)
    with torch.no_grad():
        text = clip.encode_text(tokenizer.tokenize(["a photo of a cat.", "a photo of a dog."]))
        expected = clip.logits(clip.encode_image(preprocess(dspt.read_image(image))[None]), text).softmax(-1)[0]
    fields = capsys.readouterr().out.strip().split("\t")
    best = int(expected.argmax())
    assert fields[1] == ["cat", "dog"][best] and float(fields[2]) == pytest.approx(expected[best].item(), abs=5e-5)


def test_classify_needs_classes_and_readable_images(tmp_path, tiny_checkpoint, capsys):
    (tmp_path / "bad.jpg").write_bytes(b"not an image")
    expect_user_error(capsys, ["--classify", str(tmp_path / "bad.jpg"), "--backbone", str(tiny_checkpoint)],
                      "--prompt", "--classnames", script=predict)
    expect_user_error(capsys, ["--classify", str(tmp_path / "bad.jpg"), "--classnames", "a,b", "--backbone",
                               str(tiny_checkpoint)], "cannot read", "bad.jpg", script=predict)
    expect_user_error(capsys, ["--eval", str(tmp_path / "prompt.pt"), "--backbone", str(tiny_checkpoint)],
                      "--eval needs --data", script=predict)
    for script, needed in ((dspt, "--data"), (predict, "--eval --classify")):  # argparse's own one-line errors
        with pytest.raises(SystemExit) as exit_info:
            script.main(["--backbone", str(tiny_checkpoint)])
        assert exit_info.value.code == 2 and needed in capsys.readouterr().err


def test_new_flags_are_in_help_and_readme():
    readme = (HERE / "README.md").read_text()
    for script, flags in (("dspt.py", ("--fresh",)), ("predict.py", ("--eval", "--classify", "--prompt", "--classnames"))):
        text = " ".join(subprocess.run([sys.executable, str(HERE / script), "--help"], capture_output=True,
                                       text=True).stdout.split())
        for flag in flags:
            assert flag in text and f"`{flag}" in readme, flag
