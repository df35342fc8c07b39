"""bench/noise.py --quick end to end, from an empty cache: pretraining, the grid, the report."""

import importlib.util
import os
from pathlib import Path

HERE = Path(__file__).resolve().parent


def load_benchmark():
    spec = importlib.util.spec_from_file_location("noise_benchmark", HERE / "noise.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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
    (section,) = [s for s in text.split("\n## ") if s.startswith(heading)]
    lines = [line for line in section.splitlines() if line.startswith("|") and not line.startswith("|---")]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines]


def test_quick_run_pretrains_then_clean_tuning_beats_zero_shot_and_writes_the_report(tmp_path):
    noise = load_benchmark()
    out, cache = tmp_path / "out", tmp_path / "cache"
    report = noise.main(["--quick", "--out", str(out), "--cache", str(cache), *bpe_arguments()])

    assert not report["pretraining"]["cached"]
    # Pretraining learnt the shapes from the captions: zero-shot far above chance (10 classes)
    # on images like its own; the shifted downstream task is allowed to be much harder.
    assert report["zero_shot_like_pretraining"] > 0.3
    clean = {run["method"]: run["test_accuracy"] for run in report["runs"] if run["kind"] == "clean"}
    assert list(clean) == list(noise.METHODS) == ["ce", "gce", "mae", "dspt", "prograd", "nlprompt", "visprompt", "anprompt"]
    zero_shot = report["zero_shot"]["test_accuracy"]
    for method, accuracy in clean.items():
        assert accuracy > zero_shot + 0.05, f"{method} tuned on clean labels does not beat zero-shot"
    for run in report["runs"]:
        if run["kind"] != "clean":
            assert 0 <= run["memorisation"] <= 1 and run["gradient_ratio"] > 0
    for run in report["runs"]:  # the peers' own diagnostics reach the report
        if run["method"] == "prograd":
            assert 0 <= run["prograd_conflict_fraction"] <= 1
        if run["method"] in ("nlprompt", "visprompt") and run["kind"] != "clean":
            assert 0 <= run["ot_clean_fraction"] <= 1 and 0 <= run["ot_noisy_recall"] <= 1
        if run["method"] == "visprompt":
            assert 0 < run["visprompt_gate_mean"] < 1
        if run["method"] == "anprompt":
            assert run["anprompt_alignment_loss"] >= 0
        assert run["epoch_seconds"] > 0
    # UPL: no noise axis; the whole pool pseudo-labelled, --shots kept per predicted class.
    upl = report["upl_runs"]
    assert [(run["seed"], run["loss"]) for run in upl] == [(1, loss) for loss in noise.UPL_LOSSES]
    for run in upl:
        assert run["pool"] == 500 and 0 < run["train_images"] <= 160
        assert 0 <= run["pseudo_label_accuracy"] <= 1 and 0 <= run["test_accuracy"] <= 1

    text = (out / "noise.md").read_text()
    header, *rows = markdown_table(text, "Test accuracy (%)")
    assert header == ["method", "clean", "sym 50%", "pair 50%"]
    assert [row[0] for row in rows] == ["zero-shot", "ce", "gce", "mae", "dspt", "prograd", "nlprompt", "visprompt", "anprompt"]
    assert abs(float(rows[0][1]) - 100 * zero_shot) <= 0.05
    for row in rows[1:]:
        mean, std = (float(number) for number in row[1].split(" ± "))
        assert abs(mean - 100 * clean[row[0]]) <= 0.05 and std == 0  # one seed
    header, *rows = markdown_table(text, "Memorisation")
    assert header == ["method", "sym 50%", "pair 50%"] and len(rows) == 8
    header, *rows = markdown_table(text, "UPL")
    assert header[:4] == ["method", "loss", "test accuracy (%)", "pseudo-label accuracy (%)"]
    assert [row[1] for row in rows] == noise.UPL_LOSSES
    for row, run in zip(rows, upl):
        mean, std = (float(number) for number in row[2].split(" ± "))
        assert abs(mean - 100 * run["test_accuracy"]) <= 0.05 and std == 0
    assert (out / "noise.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "noise.json").is_file()
