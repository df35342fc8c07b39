"""Tests of dspt.py's datasets: miniature copies of the eleven datasets of CoOp's benchmark, in
CoOp's layout and in torchvision's, with split files written here in CoOp's format. The
oracles are the facts of CoOp's protocol written out below (class names from the split file
with "_" read as a space, its train and test lists, CoOp's zero-shot templates), hashlib for
the recorded split file, and the written training sample read back."""

import csv
import hashlib
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from test_dspt import expect_user_error, image_folder, make_images, run_main, tiny_checkpoint  # noqa: F401

import dspt  # noqa: E402
import predict  # noqa: E402
import prepare_data  # noqa: E402

# CoOp's zero-shot templates, as its code has them.
TEMPLATES = {
    "Caltech101": "a photo of a {}.", "OxfordPets": "a photo of a {}, a type of pet.",
    "StanfordCars": "a photo of a {}.", "Flowers102": "a photo of a {}, a type of flower.",
    "Food101": "a photo of {}, a type of food.", "FGVCAircraft": "a photo of a {}, a type of aircraft.",
    "SUN397": "a photo of a {}.", "DTD": "{} texture.", "EuroSAT": "a centered satellite photo of {}.",
    "UCF101": "a photo of a person doing {}.", "ImageNet": "a photo of a {}.",
}
# For each dataset with a split file: its file name, the image folder in CoOp's layout and in
# torchvision's (None: torchvision cannot fetch it), and a path in its style for class c, image i.
SPLIT_DATASETS = {
    "Caltech101": ("split_zhou_Caltech101.json", "101_ObjectCategories", "caltech101/101_ObjectCategories",
                   lambda c, i: f"class_{c}/image_{i:04d}.jpg"),
    "OxfordPets": ("split_zhou_OxfordPets.json", "images", "oxford-iiit-pet/images",
                   lambda c, i: f"breed_{c}_{i}.jpg"),
    "StanfordCars": ("split_zhou_StanfordCars.json", ".", None,
                     lambda c, i: f"cars_{'train' if i % 2 else 'test'}/{c:02d}{i:03d}.jpg"),
    "Flowers102": ("split_zhou_OxfordFlowers.json", "jpg", "flowers-102/jpg", lambda c, i: f"image_{c:02d}{i:03d}.jpg"),
    "Food101": ("split_zhou_Food101.json", "images", "food-101/images", lambda c, i: f"dish_{c}/{i}.jpg"),
    "SUN397": ("split_zhou_SUN397.json", "SUN397", None, lambda c, i: f"a/place_{c}/sun_{i}.jpg"),
    "DTD": ("split_zhou_DescribableTextures.json", "images", "dtd/dtd/images", lambda c, i: f"texture_{c}/t_{i}.jpg"),
    "EuroSAT": ("split_zhou_EuroSAT.json", "2750", "eurosat/2750", lambda c, i: f"Land{c}/Land{c}_{i}.jpg"),
    "UCF101": ("split_zhou_UCF101.json", "UCF-101-midframes", None, lambda c, i: f"Action_{c}/v_{i}.jpg"),
}
CLASSNAMES = ["yin_yang", "Annual Crop Land", "Boeing 707-320"]  # "_" becomes a space


def image(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (10 * len(path.name), 80, 160)).save(path)


def write_split_dataset(root, name, images_folder, per_class=(4, 2, 3)):
    """A miniature of name: 3 classes, per_class (train, val, test) images each, and its split file."""
    split_name, _, _, path_of = SPLIT_DATASETS[name]
    split, i = {"train": [], "val": [], "test": []}, 0
    for c, classname in enumerate(CLASSNAMES):
        for part, count in zip(split, per_class):
            for _ in range(count):
                i += 1
                split[part].append([path_of(c, i), c, classname])
                image(root / images_folder / path_of(c, i))
    (root / split_name).write_text(json.dumps(split))
    return split


def sha256(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


LAYOUTS = [(name, folder) for name, row in SPLIT_DATASETS.items() for folder in row[1:3] if folder]


@pytest.mark.parametrize("name, folder", LAYOUTS, ids=[f"{n}-{f}" for n, f in LAYOUTS])
def test_split_file_datasets_read_as_coop_has_them(tmp_path, name, folder):
    split_name, coop_folder = SPLIT_DATASETS[name][:2]
    split = write_split_dataset(tmp_path, name, folder)
    if folder != coop_folder:  # torchvision's layout: prepare_data.py moves the images into CoOp's
        with pytest.raises(dspt.UserError, match=f"run: python prepare_data.py {tmp_path}"):
            dspt.load_dataset(tmp_path)
        prepare_data.main([str(tmp_path)])
    dataset = dspt.load_dataset(tmp_path)
    assert dataset.name == name and dataset.template == TEMPLATES[name]
    assert dataset.classnames == ["yin yang", "Annual Crop Land", "Boeing 707-320"]
    images = (tmp_path / coop_folder).resolve()
    for part, items in (("train", dataset.train), ("test", dataset.test)):
        assert [(Path(p).resolve(), label) for p, label in items] == [(images / p, c) for p, c, _ in split[part]]
    assert len(dataset.train) == 12 and len(dataset.test) == 9  # the val part is not used
    assert dataset.split == f"{split_name} (sha256 {sha256(tmp_path / split_name)})"


def write_aircraft(lists, variants=("707-320", "A300B4", "Cessna 172")):
    lists.mkdir(parents=True, exist_ok=True)
    (lists / "variants.txt").write_text("".join(f"{v}\n" for v in variants))
    i = 0
    for part, count in (("train", 3), ("val", 2), ("test", 2)):
        lines = []
        for v in variants:
            for _ in range(count):
                i += 1
                lines.append(f"{1000000 + i} {v}")
                image(lists / "images" / f"{1000000 + i}.jpg")
        (lists / f"images_variant_{part}.txt").write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize("lists", [".", "fgvc-aircraft-2013b/data"])
def test_aircraft_from_its_official_lists(tmp_path, lists):
    write_aircraft(tmp_path / lists)
    with pytest.raises(dspt.UserError, match=f"run: python prepare_data.py {tmp_path}"):
        dspt.load_dataset(tmp_path)
    prepare_data.main([str(tmp_path)])
    dataset = dspt.load_dataset(tmp_path)
    assert dataset.name == "FGVCAircraft" and dataset.template == TEMPLATES["FGVCAircraft"]
    assert dataset.classnames == ["707-320", "A300B4", "Cessna 172"]  # variants.txt's order
    images = tmp_path / "images"
    assert dataset.train == [(images / f"{1000000 + i}.jpg", (i - 1) // 3) for i in range(1, 10)]
    assert dataset.test == [(images / f"{1000000 + i}.jpg", (i - 16) // 2) for i in range(16, 22)]
    split = json.loads((tmp_path / "split_FGVCAircraft.json").read_text())
    assert [row[0] for row in split["val"]] == [f"{1000000 + i}.jpg" for i in range(10, 16)]
    assert dataset.split == f"split_FGVCAircraft.json (sha256 {sha256(tmp_path / 'split_FGVCAircraft.json')})"


@pytest.mark.parametrize("images", [".", "images"])
def test_imagenet_from_classnames_and_train_and_val_folders(tmp_path, images):
    (tmp_path / "classnames.txt").write_text("n01440764 tench\nn01443537 goldfish\nn01484850 great white shark\n")
    for wnid in ("n01484850", "n01440764", "n01443537"):
        for part, count in (("train", 3), ("val", 2)):
            for i in range(count):
                image(tmp_path / images / part / wnid / f"{wnid}_{i}.JPEG")
    with pytest.raises(dspt.UserError, match=f"run: python prepare_data.py {tmp_path}"):
        dspt.load_dataset(tmp_path)
    prepare_data.main([str(tmp_path)])
    dataset = dspt.load_dataset(tmp_path)
    assert dataset.name == "ImageNet" and dataset.template == "a photo of a {}."
    assert dataset.classnames == ["tench", "goldfish", "great white shark"]  # sorted wnids
    root = tmp_path / "images"
    assert dataset.train == [(root / "train" / w / f"{w}_{i}.JPEG", c)
                             for c, w in enumerate(["n01440764", "n01443537", "n01484850"]) for i in range(3)]
    assert [label for _, label in dataset.test] == [0, 0, 1, 1, 2, 2]
    assert all("/val/" in str(path) for path, _ in dataset.test)


def test_few_shot_sample_groups_a_large_pool_in_one_pass():
    items = [(f"img{i}.jpg", i % 1000) for i in range(100_000)]
    opened = []
    original = dspt.read_image
    try:
        dspt.read_image = lambda path: opened.append(path) or True
        chosen, unreadable = dspt.sample_few_shot(items, 1000, 2, seed=1)
    finally:
        dspt.read_image = original
    assert len(chosen) == 2000 and unreadable == 0 and len(opened) == 2000  # only the chosen are opened
    assert sorted(label for _, label in chosen) == sorted(list(range(1000)) * 2)


def test_generated_split_warns_and_is_recorded(tmp_path, tiny_checkpoint, capsys):
    for name in ["AnnualCrop", "SeaLake", "Forest"]:
        make_images(tmp_path / "eurosat" / "eurosat" / "2750" / name, 10, seed=0, size=(8, 8))
    prepare_data.main([str(tmp_path / "eurosat")])
    assert (tmp_path / "eurosat" / "2750" / "Forest").is_dir()
    metrics = run_main(tmp_path, tmp_path / "eurosat", "--epochs", "1", backbone=tiny_checkpoint)
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("dspt: warning:")]
    assert len(warnings) == 1 and "split_zhou_EuroSAT.json: prepare_data.py" in warnings[0], warnings
    assert "not CoOp's split" in warnings[0] and "seed 1" in warnings[0]
    split_file = tmp_path / "eurosat" / "split_zhou_EuroSAT.json"
    assert metrics["dataset"] == "EuroSAT" and metrics["split"] == f"split_zhou_EuroSAT.json (sha256 {sha256(split_file)})"
    split = json.loads(split_file.read_text())
    assert [len(split[part]) for part in ("train", "test")] == [15, 9]  # 50% and 30% of 10 per class
    assert metrics["test_images"] == 9
    assert metrics["template"] == "a centered satellite photo of {}."
    assert metrics["classnames"] == ["AnnualCrop", "Forest", "SeaLake"]


def test_a_run_records_the_dataset_and_the_split_file_and_a_template_overrides(tmp_path, tiny_checkpoint):
    write_split_dataset(tmp_path / "dtd", "DTD", "images")
    metrics = run_main(tmp_path, tmp_path / "dtd", "--epochs", "1", backbone=tiny_checkpoint)
    digest = sha256(tmp_path / "dtd" / "split_zhou_DescribableTextures.json")
    assert metrics["dataset"] == "DTD" and metrics["split"] == f"split_zhou_DescribableTextures.json (sha256 {digest})"
    assert metrics["template"] == "{} texture." and metrics["train_images"] == 12
    metrics = run_main(tmp_path / "itap", tmp_path / "dtd", "--epochs", "1", "--template", "itap of a {}.",
                       backbone=tiny_checkpoint)
    assert metrics["template"] == "itap of a {}."


def test_training_sample_file_round_trips(tmp_path, image_folder, tiny_checkpoint, monkeypatch):
    trained = []
    original = dspt.train
    monkeypatch.setattr(dspt, "train", lambda method, items, labels, noisy, *rest, **kw: trained.append(
        (items, labels, noisy)) or original(method, items, labels, noisy, *rest, **kw))
    metrics = run_main(tmp_path, image_folder, "--noise", "0.5", backbone=tiny_checkpoint)
    items, given, noisy = trained[0]
    path = tmp_path / "out" / "training_sample.csv"
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["path", "true_label", "given_label", "true_class", "given_class", "given_label_is"]
    assert [row["given_label_is"] == "wrong" for row in rows] == noisy.tolist()
    assert [row["path"] for row in rows] == [str(Path(p).relative_to(image_folder)) for p, _ in items]
    assert all(row["true_class"] == metrics["classnames"][int(row["true_label"])] for row in rows)
    assert all(row["given_class"] == metrics["classnames"][int(row["given_label"])] for row in rows)
    read_items, read_given, read_noisy = predict.read_training_sample(path, image_folder)
    assert [(Path(p), label) for p, label in items] == read_items
    assert torch.equal(read_given, given) and torch.equal(read_noisy, noisy) and read_noisy.sum() == 6


# --download: torchvision's datasets replaced by stand-ins that lay out files as they do.

def fake_download(layout):
    def download(root, download):
        assert download
        layout(Path(root))
    return download


DOWNLOADS = {  # torchvision class: what its download lays out (a few images of three classes)
    "Caltech101": lambda root: [make_images(root / "caltech101" / "101_ObjectCategories" / c, 10, 0, (8, 8))
                                for c in ("Faces", "Faces_easy", "ant", "yin_yang")],
    "OxfordIIITPet": lambda root: [image(root / "oxford-iiit-pet" / "images" / f"breed_{c}_{i}.jpg")
                                   for c in range(3) for i in range(30)],
    "Flowers102": lambda root: [image(root / "flowers-102" / "jpg" / f"image_{c:02d}{i:03d}.jpg")
                                for c in range(3) for i in range(30)],
    "Food101": lambda root: [make_images(root / "food-101" / "images" / c, 10, 0, (8, 8))
                             for c in ("apple_pie", "pizza", "sushi")],
    "FGVCAircraft": lambda root: write_aircraft(root / "fgvc-aircraft-2013b" / "data"),
    "DTD": lambda root: [make_images(root / "dtd" / "dtd" / "images" / c, 10, 0, (8, 8))
                         for c in ("banded", "bubbly", "cracked")],
    "EuroSAT": lambda root: [make_images(root / "eurosat" / "2750" / c, 10, 0, (8, 8))
                             for c in ("AnnualCrop", "Forest", "SeaLake")],
}


@pytest.mark.parametrize("name", ["Caltech101", "OxfordPets", "Flowers102", "Food101", "FGVCAircraft", "DTD",
                                  "EuroSAT"])
def test_download_lays_out_each_dataset_as_dspt_reads_it(tmp_path, monkeypatch, name):
    import torchvision.datasets
    torchvision_class = prepare_data.TORCHVISION[name][0]
    monkeypatch.setattr(torchvision.datasets, torchvision_class, fake_download(DOWNLOADS[torchvision_class]))
    root = tmp_path / name.lower()
    if name in ("OxfordPets", "Flowers102"):  # no class folders: CoOp's split file is needed
        with pytest.raises(dspt.UserError, match=f"{dspt.DATASETS[name][0]}; download it into {root}"):
            prepare_data.run(prepare_data.parse_args([str(root), "--download", name]))
        split_name, _, _, path_of = SPLIT_DATASETS[name]
        split = {part: [[path_of(c, i), c, f"class {c}"] for c in range(3) for i in range(first, 30, 2)]
                 for part, first in (("train", 0), ("test", 1))}
        (root / split_name).write_text(json.dumps(split))
    prepare_data.main([str(root), "--download", name])
    dataset = dspt.load_dataset(root)
    assert dataset.name == name and dataset.template == TEMPLATES[name]
    assert len(dataset.classnames) == 3 and dataset.train and dataset.test
    assert [p.name for p in tmp_path.iterdir()] == [root.name]  # nothing else left behind


@pytest.mark.parametrize("name", ["StanfordCars", "SUN397", "UCF101", "ImageNet"])
def test_datasets_torchvision_cannot_fetch_say_what_to_put_where(tmp_path, capsys, name):
    line = expect_user_error(capsys, [str(tmp_path / "data"), "--download", name],
                             f"torchvision cannot download {name}", dspt.DATASETS[name][0], script=prepare_data)
    assert str(tmp_path / "data") in line
    assert list(tmp_path.iterdir()) == []


# Bad input: one line naming the problem and the fix, exit 1, nothing written.

def bad_dataset(tmp_path, kind):
    root = tmp_path / "data"
    if kind == "no layout":
        root.mkdir()
        (root / "notes.txt").write_text("no images here")
    elif kind == "missing images":
        split = write_split_dataset(root, "Food101", "images")
        (root / "images" / split["test"][0][0]).unlink()
    elif kind == "labels and names disagree":
        split = write_split_dataset(root, "Food101", "images")
        split["test"][0][2] = "another name"
        (root / "split_zhou_Food101.json").write_text(json.dumps(split))
    elif kind == "not a split file":
        write_split_dataset(root, "Food101", "images")
        (root / "split_zhou_Food101.json").write_text('{"train": [["a.jpg", 0]]}')
    elif kind == "classnames.txt misses a folder":
        (root / "classnames.txt").parent.mkdir(parents=True)
        (root / "classnames.txt").write_text("n01440764 tench\n")
        for wnid in ("n01440764", "n01443537"):
            for part in ("train", "val"):
                image(root / part / wnid / "x.JPEG")
    elif kind == "split file missing for flat images":
        image(root / "oxford-iiit-pet" / "images" / "breed_0_1.jpg")
    return root


BAD_DATASETS = {
    "no layout": "holds no usable dataset",
    "missing images": "of the images split_zhou_Food101.json names are missing",
    "labels and names disagree": "calls label 0 both 'yin_yang' and 'another name'",
    "not a split file": "is not a split file in CoOp's format",
    "classnames.txt misses a folder": "run: python prepare_data.py",
    "split file missing for flat images": "run: python prepare_data.py",
}
PREPARE_ERRORS = {  # what prepare_data.py then says of them
    "classnames.txt misses a folder": "has no line for the folder",
    "split file missing for flat images": "split comes only from CoOp's split_zhou_OxfordPets.json",
}


@pytest.mark.parametrize("kind", list(BAD_DATASETS))
def test_bad_datasets_are_one_line_errors_and_write_nothing(tmp_path, tiny_checkpoint, capsys, kind):
    root = bad_dataset(tmp_path, kind)
    expect_user_error(capsys, ["--data", str(root), "--backbone", str(tiny_checkpoint), "--out",
                               str(tmp_path / "out")], BAD_DATASETS[kind])
    assert not (tmp_path / "out").exists()
    if kind in PREPARE_ERRORS:
        expect_user_error(capsys, [str(root)], PREPARE_ERRORS[kind], script=prepare_data)


def test_unknown_download_name_lists_the_datasets(tmp_path, capsys):
    line = expect_user_error(capsys, [str(tmp_path / "data"), "--download", "cifar10"], "'cifar10' is not a dataset",
                             script=prepare_data)
    assert all(name in line for name in dspt.DATASETS)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name, folder", [("Flowers102", "jpg/image_00001.jpg"), ("SUN397", "SUN397/a/abbey/1.jpg"),
                                          ("StanfordCars", "cars_train/00001.jpg")])
def test_datasets_only_coop_s_split_file_describes_are_not_read_as_class_folders(tmp_path, capsys, name, folder):
    image(tmp_path / folder)
    image(tmp_path / folder.replace("1", "2"))
    with pytest.raises(dspt.UserError, match=f"run: python prepare_data.py {tmp_path}"):
        dspt.load_dataset(tmp_path)
    expect_user_error(capsys, [str(tmp_path)], f"{name}'s split comes only from CoOp's {dspt.DATASETS[name][0]}",
                      script=prepare_data)


# -----------------------------------------------------------------------------
# Food-101N: real label noise, with the release's verification flags as the truth.

FOOD = ["apple_pie", "pizza", "sushi"]


def write_food101n(root, release="food-101n", classes=FOOD, flag_line=None):
    """A miniature of Food-101N's release (6 web images a class, 4 of them verified: image 0 and 1 right,
    2 and 3 wrong) beside Food-101 with CoOp's split file (2 train and 3 test images a class). Returns
    the verification flags written, by path relative to root."""
    flags = {}
    (root / release / "meta").mkdir(parents=True)
    (root / release / "meta" / "classes.txt").write_text("class_name\n" + "".join(f"{c}\n" for c in classes))
    train_lines, val_lines = ["class_name/key\tverification_label"], ["class_name/key\tverification_label"]
    for name in FOOD:
        for i in range(6):
            image(root / release / "images" / name / f"{name}{i:03d}.jpg")
            if i < 4:
                (train_lines if i % 2 else val_lines).append(f"{name}/{name}{i:03d}.jpg\t{int(i < 2)}")
                flags[f"{release}/images/{name}/{name}{i:03d}.jpg"] = int(i < 2)
    if flag_line:
        train_lines.append(flag_line)
    (root / release / "meta" / "verified_train.tsv").write_text("\n".join(train_lines) + "\n")
    (root / release / "meta" / "verified_val.tsv").write_text("\n".join(val_lines) + "\n")
    (root / release / "meta" / "imagelist.tsv").write_text(
        "class_name/key\n" + "".join(f"{n}/{n}{i:03d}.jpg\n" for n in FOOD for i in range(6)))
    split = {"train": [], "val": [], "test": []}
    for c, name in enumerate(FOOD):
        for i in range(5):
            part = "train" if i < 2 else "test"
            split[part].append([f"{name}/{i}.jpg", c, name])
            image(root / "food-101" / "images" / name / f"{i}.jpg")
    (root / "food-101" / "split_zhou_Food101.json").write_text(json.dumps(split))
    return flags


@pytest.mark.parametrize("release", ["food-101n", "Food-101N_release"])
def test_food101n_trains_on_web_labels_and_tests_on_food101(tmp_path, release):
    root = tmp_path / "food"
    flags = write_food101n(root, release)
    with pytest.raises(dspt.UserError, match=f"run: python prepare_data.py {root}"):
        dspt.load_dataset(root)
    prepare_data.main([str(root)])
    dataset = dspt.load_dataset(root)
    assert dataset.name == "Food101N" and dataset.template == "a photo of {}, a type of food."
    assert dataset.classnames == ["apple pie", "pizza", "sushi"]  # Food-101's names and order
    assert sorted((p.relative_to(root).as_posix(), c) for p, c in dataset.train) == sorted(
        (f"{release}/images/{n}/{n}{i:03d}.jpg", c) for c, n in enumerate(FOOD) for i in range(6))
    assert [(p.relative_to(root).as_posix(), c) for p, c in dataset.test] == [
        (f"food-101/images/{n}/{i}.jpg", c) for c, n in enumerate(FOOD) for i in range(2, 5)]
    assert {p.relative_to(root).as_posix(): int(v) for p, v in dataset.verified.items()} == flags


def read_sample(out):
    with open(out / "training_sample.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_food101n_verified_flags_reach_the_diagnostics_and_the_training_sample(tmp_path, tiny_checkpoint):
    root = tmp_path / "food"
    flags = write_food101n(root)
    prepare_data.main([str(root)])
    metrics = run_main(tmp_path, root, "--shots", "6", "--epochs", "1", backbone=tiny_checkpoint)
    rows = read_sample(tmp_path / "out")
    expected = ["unknown" if row["path"] not in flags else "right" if flags[row["path"]] else "wrong" for row in rows]
    assert [row["given_label_is"] for row in rows] == expected and len(rows) == 18
    assert metrics["label_truth"] == {"right": 6, "wrong": 6, "unknown": 6} and metrics["noise_rate"] == 6 / 18
    record = metrics["history"][0]
    assert record["train_accuracy_clean"] is not None and record["grad_norm_noisy"] > 0
    verified = run_main(tmp_path / "verified", root, "--shots", "2", "--epochs", "1", "--verified-only",
                        backbone=tiny_checkpoint)
    rows = read_sample(tmp_path / "verified" / "out")
    assert all(row["path"] in flags for row in rows) and verified["label_truth"]["unknown"] == 0
    assert verified["label_truth"]["right"] + verified["label_truth"]["wrong"] == 6


def test_verified_only_needs_verified_labels(tmp_path, image_folder, tiny_checkpoint, capsys):
    expect_user_error(capsys, ["--data", str(image_folder), "--backbone", str(tiny_checkpoint), "--verified-only",
                               "--out", str(tmp_path / "out")], "--verified-only needs verified labels")


FOOD101N_ERRORS = {
    "no meta": "has no meta/classes.txt",
    "other verification format": "verified_train.tsv, line",
    "a class missing": "do not name the same classes",
    "no Food-101": "put Food-101 with CoOp's split_zhou_Food101.json",
}


@pytest.mark.parametrize("kind", list(FOOD101N_ERRORS))
def test_food101n_layout_errors_name_the_file_and_the_fix(tmp_path, capsys, kind):
    root = tmp_path / "food"
    write_food101n(root, classes=FOOD[:2] if kind == "a class missing" else FOOD,
                   flag_line="pizza/pizza000.jpg yes" if kind == "other verification format" else None)
    if kind == "no meta":
        for path in (root / "food-101n" / "meta").iterdir():
            path.unlink()
        (root / "food-101n" / "meta").rmdir()
    if kind == "no Food-101":
        (root / "food-101" / "split_zhou_Food101.json").unlink()
    expect_user_error(capsys, [str(root)], FOOD101N_ERRORS[kind], script=prepare_data)
    assert not (root / "split_Food101N.json").exists()
