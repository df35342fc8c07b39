"""bench/noise.py: its statistics against hand-worked values, and --quick end to end from an
empty cache (pretraining, both tasks, the grid, the report)."""

import importlib.util
import json
import math
import os
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


def load_benchmark():
    spec = importlib.util.spec_from_file_location("noise_benchmark", HERE / "noise.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its worker processes find run_job by the module's name
    spec.loader.exec_module(module)
    return module


noise = load_benchmark()
sys.path.insert(0, str(HERE))
# bench/memorisation.py, run below on the model the quick run pretrains; it imports noise.py by its
# own name, a second copy of the module beside this file's noise_benchmark, with the same cache names
import memorisation  # noqa: E402


def bpe_arguments():
    """--bpe from $DSPT_BPE or OpenAI's clip package; none (dspt.py downloads it) otherwise."""
    if os.environ.get("DSPT_BPE"):
        return ["--bpe", os.environ["DSPT_BPE"]]
    spec = importlib.util.find_spec("clip")
    if spec and spec.submodule_search_locations:
        path = Path(spec.submodule_search_locations[0]) / "bpe_simple_vocab_16e6.txt.gz"
        if path.is_file():
            return ["--bpe", str(path)]
    return []


def markdown_table(text, heading):
    """The rows of the table in the section whose heading starts with heading, as lists of cells."""
    (section,) = [s for s in text.split("\n#") if s.lstrip("# ").startswith(heading)]
    lines = [line for line in section.splitlines() if line.startswith("|") and not line.startswith("|---")]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines]


def test_t_quantiles_leave_two_and_a_half_percent_in_each_tail():
    mpmath = pytest.importorskip("mpmath")
    for dof, t in noise.T_975.items():  # Student's t cdf by quadrature of its density
        density = lambda x: (mpmath.gamma((dof + 1) / 2) / (mpmath.sqrt(dof * mpmath.pi) * mpmath.gamma(dof / 2))
                             * (1 + x * x / dof) ** (-(dof + 1) / 2))
        assert abs(0.5 + float(mpmath.quad(density, [0, t])) - 0.975) < 2e-5, dof  # the density is even


def test_summary_is_mean_sample_std_and_t_interval():
    mean, std, half = noise.summary([0.5, 0.6, 0.7])
    assert mean == pytest.approx(0.6) and std == pytest.approx(0.1)  # sample std: sqrt(0.02 / 2)
    assert half == pytest.approx(4.303 * 0.1 / math.sqrt(3))
    assert noise.summary([0.42]) == (0.42, 0.0, 0.0)


def test_best_method_and_every_method_whose_interval_overlaps_it_are_marked():
    cells = [(0.70, 0.01, 0.02), (0.65, 0.01, 0.02), (0.66, 0.01, 0.02), (0.80, 0.01, 0.05), (0.74, 0.0, 0.0)]
    # best 0.80 +- 0.05 reaches down to 0.75: 0.70 + 0.02 and 0.74 + 0 fall short, none else overlaps
    assert noise.tied_with_best(cells) == [False, False, False, True, False]
    cells[4] = (0.74, 0.0, 0.011)  # now reaches 0.751
    assert noise.tied_with_best(cells) == [False, False, False, True, True]


def test_confidence_counts_calibration_like_the_papers():
    import torch
    logits = torch.log(torch.tensor([[0.95, 0.05], [0.95, 0.05], [0.6, 0.4], [0.6, 0.4]]))
    c = noise.confidence(logits, torch.tensor([0, 1, 0, 0]))
    # two in the 0.93-1.0 bin, one right (|0.5 - 0.95|); two in the 0.6 bin, both right (|1 - 0.6|)
    assert c["accuracy"] == 0.75 and c["mean_confidence"] == pytest.approx(0.775)
    assert c["ece"] == pytest.approx(0.5 * 0.45 + 0.5 * 0.4)
    assert c["correct_above_0.9"] == pytest.approx(1 / 3) and c["correct_above_0.5"] == 1.0


def test_quick_run_pretrains_then_clean_tuning_beats_zero_shot_and_writes_the_report(tmp_path):
    out, cache = tmp_path / "out", tmp_path / "cache"
    report = noise.main(["--quick", "--out", str(out), "--cache", str(cache), "--jobs", "2", *bpe_arguments()])

    assert not report["pretraining"]["cached"]
    assert report["logit_scale_at_use"] == pytest.approx(100, abs=1e-3)  # CLIP's, in the saved model
    near, far = report["tasks"]["near"]["zero_shot"], report["tasks"]["far"]["zero_shot"]
    assert near["classes"] >= 40 and far["classes"] == 10
    clean = {(run["task"], run["method"]): run["test_accuracy"] for run in report["runs"] if run["kind"] == "clean"}
    methods = {name: [m for t, m in clean if t == name] for name in noise.TASKS}
    assert methods["far"] == list(noise.METHODS) == ["ce", "gce", "mae", "dspt", "prograd", "nlprompt", "visprompt",
                                                     "anprompt"]
    assert methods["near"] == [m for m in noise.METHODS if ("near", m) not in noise.NOT_RUN]
    assert clean["near", "ce"] > near["test_accuracy"] + 0.02, "CoOp tuned on clean labels does not beat zero-shot"
    for run in report["runs"]:
        assert 0 <= run["test_accuracy"] <= 1 and run["epoch_seconds"] > 0
        if run["kind"] != "clean":
            assert 0 <= run["memorisation"] <= 1 and run["gradient_ratio"] > 0
        if run["method"] == "prograd":  # the peers' own diagnostics reach the report
            assert 0 <= run["prograd_conflict_fraction"] <= 1
        if run["method"] in ("nlprompt", "visprompt") and run["kind"] != "clean":
            assert 0 <= run["ot_clean_fraction"] <= 1 and 0 <= run["ot_noisy_recall"] <= 1
        if run["method"] == "anprompt":
            assert run["anprompt_alignment_loss"] >= 0
        # the curves: the losses at CURVES (here sym 50% only), one point per epoch
        has_curve = run["method"] in noise.LOSS_METHODS and (run["kind"], run["rate"]) in noise.CURVES
        assert ("curve" in run) == has_curve
        if has_curve:
            assert len(run["curve"]["test_accuracy"]) == len(run["curve"]["memorisation"]) == noise.EPOCHS["quick"]
            assert run["curve"]["test_accuracy"][-1] == pytest.approx(run["test_accuracy"], abs=1e-6)
    # free class vectors, the bound of CoOp's classifier: one per task and noise setting, and
    # trained on the features they fit most clean labels (they start from zero-shot's 30-40% here)
    bounds = {(run["task"], run["kind"]) for run in report["bounds"]}
    assert bounds == {(t, kind) for t in noise.TASKS for kind, _ in noise.NOISE["quick"]}
    for run in report["bounds"]:
        assert run["clean_fit"] > 0.6 and (run["memorisation"] is None) == (run["kind"] == "clean")
    upl = report["upl_runs"]  # no noise axis: the whole pool pseudo-labelled, --shots kept per predicted class
    assert [(run["task"], run["loss"]) for run in upl] == [(t, loss) for t in noise.TASKS for loss in noise.UPL_LOSSES]
    for run in upl:
        assert run["pool"] == 50 * report["tasks"][run["task"]]["zero_shot"]["classes"]
        assert 0 < run["train_images"] <= 16 * report["tasks"][run["task"]]["zero_shot"]["classes"]

    text = (out / "noise.md").read_text()
    header, *rows = markdown_table(text, "The near task: test accuracy")
    assert header == ["method", "clean", "sym 50%"]
    assert [row[0] for row in rows] == ["zero-shot", *noise.METHODS]
    assert abs(float(rows[0][1]) - 100 * near["test_accuracy"]) <= 0.05
    for row in rows[1:]:
        if ("near", row[0]) in noise.NOT_RUN:
            assert row[1] == "-"
            continue
        body = row[1].strip("*")
        mean, rest = body.split(" ± ")
        assert abs(float(mean) - 100 * clean["near", row[0]]) <= 0.05 and rest == "0.0 [" + mean + ", " + mean + "]"
    # one seed: no interval, so only the best method of a column is in bold
    assert sum(row[1].startswith("**") for row in rows[1:]) == 1
    header, *rows = markdown_table(text, "far: memorisation")
    assert header == ["method", "sym 50%"] and len(rows) == len(noise.METHODS)
    header, *rows = markdown_table(text, "Zero-shot confidence")
    assert rows[0][0] == "near (stand-in)" and rows[1][0] == "far (stand-in)"
    for name in ("noise.png", "noise-curves.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "noise.json").is_file()
    assert not list(out.glob(".*.part"))

    # --slow runs the cells NOT_RUN leaves out and adds them to that report, changing nothing else
    quick = ["--quick", "--out", str(out), "--cache", str(cache), *bpe_arguments()]
    with pytest.raises(noise.dspt.UserError, match="another grid"):
        noise.main([*quick, "--slow", "--seeds", "2"])
    slow = noise.main([*quick, "--slow", "--jobs", "2"])
    before = json.loads(json.dumps(report["runs"]))
    assert slow["runs"][:len(before)] == before
    rest = {key: value for key, value in slow.items() if key not in ("runs", "slow")}
    assert rest == {key: value for key, value in json.loads(json.dumps(report)).items() if key != "runs"}
    added = {(run["task"], run["method"], run["kind"]) for run in slow["runs"][len(before):]}
    assert added == {(*cell, kind) for cell in noise.NOT_RUN for kind, _ in noise.NOISE["quick"]}
    assert slow["slow"]["runs"] == len(added) == len(slow["runs"]) - len(before)
    text = (out / "noise.md").read_text()
    header, *rows = markdown_table(text, "The near task: test accuracy")
    (visprompt,) = [row for row in rows if row[0] == "visprompt"]
    assert all(value.strip("*").split(" ± ")[0].replace(".", "").isdigit() for value in visprompt[1:])
    assert "visprompt ran on this task in a separate --slow pass" in text
    assert json.loads((out / "noise.json").read_text())["runs"] == json.loads(json.dumps(slow["runs"]))
    with pytest.raises(noise.dspt.UserError, match="already has"):
        noise.main([*quick, "--slow"])

    # bench/memorisation.py on the same model, tasks and samples: its CoOp on the encoded features
    # is the grid's cross-entropy run, and instance-rich features spread the classes wider
    probe = memorisation.main(["--quick", "--out", str(out), "--cache", str(cache), "--threads", "1",
                               *bpe_arguments()])
    cells = {(r["task"], r["kind"], r["features"], r["classifier"]): r for r in probe["runs"]}
    assert len(cells) == len(probe["runs"]) == len(noise.TASKS) * 2 * 2 * len(memorisation.CLASSIFIERS)
    for name in noise.TASKS:
        assert probe["tasks"][name]["zero_shot"]["encoded"] == report["tasks"][name]["zero_shot"]["test_accuracy"]
        (grid_ce,) = [r for r in report["runs"] if (r["task"], r["method"], r["kind"]) == (name, "ce", "sym")]
        coop = cells[name, "sym", "encoded", "coop"]
        for key in ("memorisation", "clean_fit", "test_accuracy", "text_similarity"):
            assert coop[key] == pytest.approx(grid_ce[key], abs=1e-6), key
        assert coop["memorisation_curve"] == pytest.approx(grid_ce["curve"]["memorisation"], abs=1e-6)
        for kind in ("sym", "pair"):
            rich, encoded = cells[name, kind, "instance-rich", "coop"], cells[name, kind, "encoded", "coop"]
            assert rich["participation_ratio"] > 2 * encoded["participation_ratio"]
            assert cells[name, kind, "instance-rich", "free class vectors"]["memorisation"] > 0.9
            for features in ("encoded", "instance-rich"):  # the names train inside dspt.train
                coop, named = cells[name, kind, features, "coop"], cells[name, kind, features, "coop, learned names"]
                assert named["text_similarity"] != coop["text_similarity"]
    header, *rows = markdown_table((out / "memorisation.md").read_text(), "near task")
    assert header == ["features", "within-class participation ratio", "zero-shot test accuracy"]
    assert [row[0] for row in rows[:2]] == ["encoded", "instance-rich"]
    assert rows[2][:3] == ["features", "classifier", "wrong labels fitted"]  # then a table per noise setting
    assert [row[:2] for row in rows[3:9]] == [[f, c] for f in ("encoded", "instance-rich")
                                              for c in memorisation.CLASSIFIERS]
    assert (out / "memorisation.json").is_file()


def test_contrastive_loss_is_clip_symmetric_cross_entropy():
    import torch
    # each row and column puts 2 on its own pair and 0 on the other: -log(e^2 / (e^2 + 1)) each way
    assert noise.contrastive(torch.tensor([[2.0, 0.0], [0.0, 2.0]])).item() == pytest.approx(math.log(1 + math.exp(-2)))
    # rows: [3, 1] -> -log(e^3/(e^3+e^1)); [0, 0] -> log 2; columns: [3, 0] and [1, 0]
    rows = math.log(1 + math.exp(-2)) + math.log(2)
    columns = math.log(1 + math.exp(-3)) + math.log(1 + math.exp(1))
    assert noise.contrastive(torch.tensor([[3.0, 1.0], [0.0, 0.0]])).item() == pytest.approx((rows + columns) / 4)


def test_plain_backgrounds_have_specks_no_caption_names(monkeypatch):
    import numpy as np
    attributes = noise.sample_attributes(np.random.default_rng(0), 50)
    attributes["background"][:] = 0  # plain, so that anything far from the tint off the object is a speck
    attributes["x"][:], attributes["y"][:], attributes["radius"][:] = 24.0, 24.0, 5.0

    def specked():
        images = noise.render(attributes, np.random.default_rng(1)).astype(float)
        corner = images[:, :14, :14]  # far from the object: background and specks only
        tint = noise.TINT_RGB[attributes["tint"]][:, None, None, :]
        return (np.abs(corner - tint).max(axis=-1) > 60).any(axis=(1, 2)).mean()
    # four specks of radius 0.6-1.4: at least one lands in the 14x14 corner of a 32x32 image in
    # 1 - (1 - 0.19)^4, about 57%, of the images
    assert specked() > 0.4
    monkeypatch.setattr(noise, "CLUTTER", 0)
    assert specked() == 0


def test_the_tasks_shift_from_pretraining():
    import numpy as np
    near = noise.task_attributes(np.random.default_rng(0), "near", np.repeat(np.arange(40), 20))
    usual = noise.USUAL_TINTS[near["shape"]]
    assert not (usual == near["tint"][:, None]).any()  # never on its shape's usual tints
    far = noise.task_attributes(np.random.default_rng(0), "far", np.repeat(np.arange(10), 40))
    assert np.abs(far["angle"]).max() <= 0.8 and (np.abs(far["angle"]) > 0.3).mean() > 0.5  # pretraining: 0.3
    assert not (noise.PRETRAINING_COLOURS[far["shape"]] == far["colour"][:, None]).any()  # colours never seen
    assert (far["background"] == noise.BACKGROUNDS.index("speckled")).all()


def test_curves_are_reported_at_symmetric_and_pair_noise():
    runs = [{"task": "near", "method": m, "kind": kind, "rate": 0.5,
             "curve": {"test_accuracy": [0.5, 0.6], "memorisation": [0.1, memorised]}}
            for m in noise.LOSS_METHODS for kind, memorised in (("sym", 0.2), ("pair", 0.4))]
    text = noise.curve_sections(runs, "near", [("clean", 0.0), ("sym", 0.5), ("pair", 0.5)], 2)
    sym, pair = text.split("### ")[1:]
    assert sym.startswith("near: per-epoch curves at sym 50%") and pair.startswith("near: per-epoch curves at pair 50%")
    assert "| ce | 50.0 / 10.0 | 60.0 / 20.0 |" in sym and "| ce | 50.0 / 10.0 | 60.0 / 40.0 |" in pair
    assert noise.curve_sections(runs, "near", [("clean", 0.0), ("sym", 0.5)], 2).count("### ") == 1


def test_pretraining_loss_adds_the_images_against_themselves():
    import torch
    import torch.nn.functional as F
    torch.manual_seed(0)
    clip = noise.dspt.CLIP(**noise.MODEL).eval()
    images = torch.randn(6, 3, noise.RES, noise.RES)
    tokens = torch.randint(1, 40000, (6, noise.MODEL["context_length"]))
    tokens[:, 9] = 49407  # the end-of-text token, where the text feature is read
    raw = torch.randn(6, noise.MODEL["embed_dim"])  # image features far apart (a fresh encoder's are alike)
    clip.encode_image = lambda x: raw if x is images else None
    with torch.no_grad():
        features = F.normalize(raw, dim=-1)

        def loss(weight, scale):
            return noise.pretraining_loss(clip, images, tokens, dict(instance_weight=weight, instance_scale=scale))
        for weight, scale in ((1.0, 1.0), (0.5, 3.0)):
            # the similarities are symmetric, so both directions of the term are the rows' cross-entropy
            term = F.cross_entropy(scale * features @ features.T, torch.arange(6))
            assert (loss(weight, scale) - loss(0.0, scale)).item() == pytest.approx(weight * term.item(), rel=1e-4)
