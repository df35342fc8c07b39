"""Tests of runs trained together (sweep.py's groups). The oracle is always the same run made alone,
with dspt.py's or baselines.py's main(): every output file must come out identical (metrics.json
but for the seconds and the folder, prompt.pt, training_sample.csv and checkpoint.pt byte for byte)."""

import json
from pathlib import Path

import pytest
import torch

from test_dspt import BPE_PATH, image_folder, tiny_checkpoint  # noqa: F401 (fixtures); sets DSPT_BPE

import baselines  # noqa: E402
import dspt  # noqa: E402
import sweep  # noqa: E402

BASE = ["--epochs", "3", "--shots", "4", "--batch-size", "4", "--n-ctx", "4", "--lr", "0.01"]
SETTINGS = [["--loss", "dspt"], ["--loss", "ce", "--noise", "0.5"], ["--loss", "gce", "--noise", "0.25",
            "--noise-kind", "pair"], ["--loss", "mae", "--noise", "0.5"]]


def argv(data, checkpoint, out, setting, extra=()):
    return ["--data", str(data), "--backbone", str(checkpoint), *BASE, *extra, *setting, "--out", str(out)]


def without_seconds(history):
    return [{k: v for k, v in record.items() if k != "seconds"} for record in history]


def exactly(value):
    """value with every tensor as (dtype, shape, bytes), so that == compares them bit for bit."""
    if isinstance(value, torch.Tensor):
        return value.dtype, tuple(value.shape), value.numpy().tobytes()
    if isinstance(value, dict):
        return {k: exactly(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [exactly(v) for v in value]
    return value


def outputs(folder):
    """What a run leaves in its folder, less what differs between two makings of one run: the seconds in
    metrics.json and checkpoint.pt, the folder in metrics.json's args."""
    metrics = json.loads((folder / "metrics.json").read_text())
    metrics["history"] = without_seconds(metrics["history"])
    metrics["args"] = {k: v for k, v in metrics["args"].items() if k != "out"}
    checkpoint = torch.load(folder / "checkpoint.pt", weights_only=True)
    checkpoint["history"] = without_seconds(checkpoint["history"])
    return {"metrics": metrics, "checkpoint.pt": exactly(checkpoint),
            **{name: (folder / name).read_bytes() for name in ("prompt.pt", "training_sample.csv")}}


def alone_and_together(tmp_path, data, checkpoint, settings, extra=(), script="dspt.py", memory=None):
    module = baselines if script == "baselines.py" else dspt
    for i, setting in enumerate(settings):
        module.main(argv(data, checkpoint, tmp_path / "alone" / str(i), setting, extra))
    argvs = [argv(data, checkpoint, tmp_path / "together" / str(i), setting, extra) for i, setting in enumerate(settings)]
    sweep.run_together(script, argvs, memory)
    return [(outputs(tmp_path / "alone" / str(i)), outputs(tmp_path / "together" / str(i)))
            for i in range(len(settings))]


@pytest.mark.parametrize("extra", [["--workers", "0"], ["--workers", "0", "--no-augment"], ["--workers", "2"],
                                   ["--workers", "0", "--precision", "bf16"]],
                         ids=["augment", "no-augment", "workers", "bf16"])
def test_runs_together_equal_the_runs_alone(tmp_path, image_folder, tiny_checkpoint, extra):
    pairs = alone_and_together(tmp_path, image_folder, tiny_checkpoint, SETTINGS, extra)
    for alone, together in pairs:
        assert together == alone
    contexts = [torch.load(tmp_path / "alone" / str(i) / "prompt.pt")["ctx"] for i in range(len(SETTINGS))]
    assert not any(torch.equal(contexts[0], ctx) for ctx in contexts[1:])  # the runs did differ


@pytest.mark.parametrize("extra", [["--workers", "0"], ["--workers", "0", "--no-augment"], ["--workers", "2"]],
                         ids=["augment", "no-augment", "workers"])
@pytest.mark.parametrize("method", ["prograd", "nlprompt", "visprompt"])
def test_methods_that_share_their_images_together_equal_alone(tmp_path, image_folder, tiny_checkpoint, method, extra):
    settings = [["--method", method, "--loss", "ce"], ["--method", method, "--loss", "ce", "--noise", "0.5"],
                ["--method", method, "--loss", "ce", "--noise", "0.25", "--noise-kind", "pair"]]
    for alone, together in alone_and_together(tmp_path, image_folder, tiny_checkpoint, settings, extra,
                                              "baselines.py"):
        assert together == alone


def test_a_memory_budget_splits_the_group_into_passes(tmp_path, image_folder, tiny_checkpoint, capsys):
    one_run = 12_000  # bytes: more than one of these runs holds of its own (9,197), less than two
    pairs = alone_and_together(tmp_path, image_folder, tiny_checkpoint, SETTINGS[:3], ["--workers", "0"],
                               memory=one_run)
    for alone, together in pairs:
        assert together == alone
    out = capsys.readouterr().out
    assert "pass 3: 1 runs together" in out and "pass 4" not in out and "peak memory" in out


class Interrupt(Exception):
    """Stands for the group's process being killed."""


def test_an_interrupted_group_resumes_and_each_run_resumes_alone(tmp_path, image_folder, tiny_checkpoint,
                                                                 monkeypatch):
    settings = SETTINGS[:3]
    for i, setting in enumerate(settings):
        dspt.main(argv(image_folder, tiny_checkpoint, tmp_path / "alone" / str(i), setting, ["--workers", "0"]))
    original, saved = dspt.atomic_write, []

    def stop_after_four_checkpoints(path, write):  # epoch 1 of all three, then epoch 2 of the first
        original(path, write)
        if Path(path).name == "checkpoint.pt":
            saved.append(path)
            if len(saved) == 4:
                raise Interrupt
    argvs = [argv(image_folder, tiny_checkpoint, tmp_path / "together" / str(i), s, ["--workers", "0"])
             for i, s in enumerate(settings)]
    with monkeypatch.context() as patch:
        patch.setattr(dspt, "atomic_write", stop_after_four_checkpoints)
        with pytest.raises(Interrupt):
            sweep.run_together("dspt.py", argvs)
    epochs = [len(torch.load(tmp_path / "together" / str(i) / "checkpoint.pt")["history"]) for i in range(3)]
    assert epochs == [2, 1, 1]
    dspt.main(argvs[1])  # one of the group's runs, resumed alone
    sweep.run_together("dspt.py", argvs)  # the others, one of them ahead of the other
    for i in range(3):
        assert outputs(tmp_path / "together" / str(i)) == outputs(tmp_path / "alone" / str(i))


def test_a_group_with_a_finished_run_trains_only_the_others(tmp_path, image_folder, tiny_checkpoint, capsys):
    settings = SETTINGS[:3]
    argvs = [argv(image_folder, tiny_checkpoint, tmp_path / "together" / str(i), s, ["--workers", "0"])
             for i, s in enumerate(settings)]
    dspt.main(argvs[1])
    before = (tmp_path / "together" / "1" / "metrics.json").stat().st_mtime_ns
    for i, setting in enumerate(settings):
        if i != 1:
            dspt.main(argv(image_folder, tiny_checkpoint, tmp_path / "alone" / str(i), setting, ["--workers", "0"]))
    capsys.readouterr()
    results = sweep.run_together("dspt.py", argvs)
    assert f"already finished: {tmp_path / 'together' / '1' / 'metrics.json'}" in capsys.readouterr().out
    assert (tmp_path / "together" / "1" / "metrics.json").stat().st_mtime_ns == before
    assert [r["args"]["loss"] for r in results] == ["dspt", "ce", "gce"]
    for i in (0, 2):
        assert outputs(tmp_path / "together" / str(i)) == outputs(tmp_path / "alone" / str(i))


@pytest.mark.parametrize("memory", [None, 1], ids=["one pass", "a pass per run"])
def test_a_run_that_diverges_stops_alone_and_the_others_finish(tmp_path, image_folder, tiny_checkpoint,
                                                               monkeypatch, memory):
    def diverging(logits, target):
        return dspt.cross_entropy_loss(logits, target) * float("nan")
    monkeypatch.setitem(dspt.LOSSES, "ce", diverging)
    argvs = [argv(image_folder, tiny_checkpoint, tmp_path / str(i), s, ["--workers", "0"])
             for i, s in enumerate(SETTINGS[:3])]
    with pytest.raises(dspt.UserError, match=r"1 of the runs failed: .*1: training diverged at epoch 1, step 1"):
        sweep.run_together("dspt.py", argvs, memory)
    assert (tmp_path / "0" / "metrics.json").is_file() and (tmp_path / "2" / "metrics.json").is_file()
    assert not (tmp_path / "1" / "metrics.json").exists()


def test_runs_that_cannot_share_are_refused_together_and_run_alone_in_a_sweep(tmp_path, image_folder,
                                                                              tiny_checkpoint):
    with pytest.raises(dspt.UserError, match="encodes the images with parameters of its own, so it cannot train"):
        sweep.run_together("baselines.py", [argv(image_folder, tiny_checkpoint, tmp_path / str(i),
                                                 ["--method", "anprompt", "--noise", str(rate)])
                                            for i, rate in enumerate((0, 0.5))])
    alone = sweep.run_together("baselines.py", [argv(image_folder, tiny_checkpoint, tmp_path / "alone",
                                                     ["--method", "anprompt", "--workers", "0"])])  # alone, it may
    assert alone[0]["history"] and (tmp_path / "alone" / "metrics.json").is_file()
    with pytest.raises(dspt.UserError, match="may differ only in --loss, --noise and --noise-kind; .* in --seed"):
        sweep.run_together("dspt.py", [argv(image_folder, tiny_checkpoint, tmp_path / str(seed), ["--seed", seed])
                                       for seed in ("1", "2")])
    runs = [sweep.Run(image_folder, method, kind, rate, seed, tmp_path, []) for method in sweep.METHODS
            for kind, rate in (("none", 0.0), ("sym", 0.5)) for seed in (1, 2)
            if not (method == "upl" and kind != "none")]
    units = sweep.groups(runs)
    shared = {tuple(sorted({run.method for run in unit})) for unit in units if len(unit) > 1}
    assert shared == {("ce", "dspt", "gce", "mae"), ("prograd",), ("nlprompt",), ("visprompt",)}
    assert all(len(unit) == 8 if unit[0].method in ("dspt", "ce") else len(unit) in (1, 2) for unit in units)
    assert [len(unit) for unit in units if unit[0].method in ("anprompt", "upl")] == [1] * 6
    column = [run for run in runs if run.method in ("dspt", "ce", "gce", "mae") and run.seed == 1]
    assert [len(unit) for unit in sweep.groups(column, slots=3)] == [2, 2, 4]  # every slot gets work
    assert [len(unit) for unit in sweep.groups(column[:2], slots=4)] == [1, 1]


def test_training_together_refuses_runs_with_other_items_or_image_encoding(tiny_checkpoint):
    clip, _ = dspt.load_clip(str(tiny_checkpoint))
    learner = dspt.PackedPromptLearner(clip, ["a", "b"], dspt.load_tokenizer(BPE_PATH), 4)
    items, labels = [("x.jpg", 0)], torch.zeros(1, dtype=torch.long)
    method = dspt.PromptTuning(learner, dspt.double_softmax_loss)

    class OwnEncoding(dspt.PromptTuning):
        def encode(self, images):
            return images
    own = OwnEncoding(learner, dspt.double_softmax_loss)
    for first, other in ((method, dspt.Job(method, [("y.jpg", 0)], labels, labels, None)),
                         (method, dspt.Job(own, items, labels, labels, None)),
                         (own, dspt.Job(own, items, labels, labels, None))):  # each run's features its own
        with pytest.raises(ValueError, match="same items and CLIP's own image encoding"):
            sweep.train_together([dspt.Job(first, items, labels, labels, None), other])


def test_a_group_command_with_bad_input_is_one_line(capsys):
    import subprocess
    import sys
    for argv in (["--together", "train.py", "--", "--data", "x"], ["--together", "dspt.py", "--group-memory", "lots",
                                                                    "--", "--data", "x"]):
        result = subprocess.run([sys.executable, str(sweep.HERE / "sweep.py"), *argv], capture_output=True, text=True)
        assert result.returncode == 1 and "Traceback" not in result.stderr
        assert result.stderr.startswith("sweep: error: --together takes dspt.py or baselines.py")


def test_a_group_encodes_the_training_images_for_optimal_transport_once(tmp_path, image_folder, tiny_checkpoint,
                                                                        monkeypatch):
    calls, original = [], dspt.encode_images

    def counted(clip, items, transform, args, desc, encode=None):
        calls.append(desc)
        return original(clip, items, transform, args, desc, encode)
    monkeypatch.setattr(dspt, "encode_images", counted)
    sweep.run_together("baselines.py", [argv(image_folder, tiny_checkpoint, tmp_path / str(i),
                                             ["--method", "nlprompt", "--noise", str(rate), "--workers", "0"])
                                        for i, rate in enumerate((0, 0.25, 0.5))])
    assert calls.count("encoding training images for optimal transport") == 1
    assert calls.count("encoding test images") == 1


def counting(monkeypatch, owner, name):
    """Replace owner.<name> with a wrapper that records its calls; returns the record."""
    calls, original = [], getattr(owner, name)

    def counted(*args):
        calls.append(name)
        return original(*args)
    monkeypatch.setattr(owner, name, counted)
    return calls


@pytest.mark.parametrize("script, extra", [("dspt.py", []), ("baselines.py", ["--method", "prograd"])])
def test_a_group_samples_its_few_shot_set_and_encodes_its_zero_shot_prompts_once(tmp_path, image_folder,
                                                                                 tiny_checkpoint, monkeypatch,
                                                                                 script, extra):
    samples = counting(monkeypatch, dspt, "sample_few_shot")
    prompts = counting(monkeypatch, dspt.CLIP, "encode_text")  # only the zero-shot prompts go through it
    settings = SETTINGS if script == "dspt.py" else [s[2:] for s in SETTINGS[:3]]  # noise settings only
    sweep.run_together(script, [argv(image_folder, tiny_checkpoint, tmp_path / str(i), [*extra, *s], ["--workers", "0"])
                                for i, s in enumerate(settings)])
    assert len(samples) == 1 and len(prompts) == 1
