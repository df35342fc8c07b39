"""
Lay out a dataset as dspt.py reads it: a split file in CoOp's JSON format beside the images.

    python prepare_data.py ./caltech101 --download Caltech101   # fetch through torchvision, then lay out
    python prepare_data.py ./fgvc_aircraft                      # lay out what is there

What it does, once per folder:
- torchvision's download layouts (caltech101/101_ObjectCategories, oxford-iiit-pet/images, flowers-102/jpg,
  food-101/images, fgvc-aircraft-2013b/data, dtd/dtd/images, eurosat/2750, stanford_cars) are moved into
  CoOp's layout (the image folder directly in DIR);
- FGVCAircraft's official lists (variants.txt, images_variant_{train,val,test}.txt) become
  split_FGVCAircraft.json, as CoOp reads those lists;
- ImageNet's classnames.txt ("<wnid> <class name>" lines, CoOp's) and train/ and val/ class folders (val is the
  test set) become split_ImageNet.json, labels in the sorted order of the wnids;
- DIR/train and DIR/test folders of class folders become split.json;
- a dataset of CoOp's benchmark that lies in class folders but has no split file (Food101, DTD, EuroSAT, UCF101;
  dspt.py reads Caltech101's folder as it is) gets one made here, 50/20/30 per class with dspt.py's seed, marked
  as made here: put CoOp's own split file (see SPLIT_FILES_URL) there to compare with published results.
Datasets whose split only CoOp's file gives (OxfordPets, Flowers102, StanfordCars, SUN397) need that file.

Food-101N (real label noise), as NLPrompt lays it out: DIR holds Food-101N's release (Food-101N_release/ or
food-101n/: images/<class>/*.jpg and meta/) and Food-101 as CoOp lays it out (food-101/ with
split_zhou_Food101.json and images/). split_Food101N.json then lists every Food-101N image as a training image
labelled by its folder (the web search's label), Food-101's test split as the test set, and, under
"verified", for the images the release verified, 1 if that label is right and 0 if not. The release's files,
as its README describes them: meta/classes.txt, a header line then the 101 class names, Food-101's; and
meta/verified_train.tsv and meta/verified_val.tsv, a header line ("class_name/key", "verification_label")
then "<class>/<image>.jpg<TAB>0 or 1" lines. Assumed where it says nothing: the classes are in Food-101's
order and named as Food-101's folders (checked, against CoOp's split file), and an image listed in both
files has the same flag in both (checked).
"""

import argparse
import json
import os
import shutil
import tempfile
from pathlib import Path

import dspt

# torchvision's class for each dataset it can download, and where its download puts the images.
TORCHVISION = {
    "Caltech101": ("Caltech101", "caltech101/101_ObjectCategories"),
    "OxfordPets": ("OxfordIIITPet", "oxford-iiit-pet/images"),
    "Flowers102": ("Flowers102", "flowers-102/jpg"),
    "Food101": ("Food101", "food-101/images"),
    "FGVCAircraft": ("FGVCAircraft", "fgvc-aircraft-2013b/data/images"),
    "DTD": ("DTD", "dtd/dtd/images"),
    "EuroSAT": ("EuroSAT", "eurosat/2750"),
    "StanfordCars": (None, "stanford_cars"),
}
IN_CLASS_FOLDERS = ("Food101", "DTD", "EuroSAT", "UCF101")  # a split can be made from their folders


def download(name, root):
    """Fetch name's images through torchvision into the new folder root, atomically."""
    torchvision_class, images = TORCHVISION.get(name, (None, None))
    split_name, folder, _ = dspt.DATASETS[name]
    if torchvision_class is None:
        raise dspt.UserError(f"torchvision cannot download {name}; put its images in {root / folder} and CoOp's "
                             f"{split_name} in {root} ({dspt.SPLIT_FILES_URL})")
    import torchvision.datasets
    tmp = Path(tempfile.mkdtemp(dir=root.parent if root.parent.exists() else None, prefix=f".{root.name}."))
    try:
        getattr(torchvision.datasets, torchvision_class)(str(tmp), download=True)
        os.replace(tmp, root)
    except Exception as e:
        raise dspt.UserError(f"cannot download {name} ({dspt.first_line(e)}); fetch it by hand and unpack it so "
                             f"that {root / images} exists") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_split(path, train, test, images, val=(), made_by=None, verified=None):
    """A split file in CoOp's format: [path relative to images, label, class name] per image."""
    def rows(part):
        return [[Path(p).relative_to(images).as_posix(), label, name] for p, label, name in part]
    split = {"train": rows(train), "val": rows(val), "test": rows(test), **({"made_by": made_by} if made_by else {}),
             **({"verified": verified} if verified is not None else {})}
    dspt.atomic_write(path, lambda f: f.write(json.dumps(split).encode()))
    print(f"wrote {path}: {len(train)} training and {len(test)} test images of "
          f"{len({label for _, label, _ in [*train, *test]})} classes")


def aircraft(root):
    """split_FGVCAircraft.json from the official lists, as CoOp reads them: variants.txt names the classes in
    label order; images_variant_<part>.txt gives "<image id> <variant>" for images/<id>.jpg."""
    classnames = [line for line in (root / "variants.txt").read_text().splitlines() if line]
    label = {name: c for c, name in enumerate(classnames)}

    def part(name):
        lines = (root / f"images_variant_{name}.txt").read_text().splitlines() if (
            root / f"images_variant_{name}.txt").is_file() else []
        return [(root / "images" / f"{image}.jpg", label[variant], variant)
                for image, variant in (line.split(" ", 1) for line in lines if line)]
    write_split(root / "split_FGVCAircraft.json", part("train"), part("test"), root / "images", part("val"))


def imagenet(root):
    """split_ImageNet.json from classnames.txt and the images/train and images/val class folders."""
    images = root / "images"
    if not ((images / "train").is_dir() and (images / "val").is_dir()):
        raise dspt.UserError(f"{root} has ImageNet's classnames.txt but no train/ and val/ folders in {images} or "
                             f"{root}; put ImageNet's class folders there")
    names = dict(line.split(" ", 1) for line in (root / "classnames.txt").read_text().splitlines() if line)
    wnids = [folder.name for folder in dspt.class_folders(images / "train")]
    for wnid in wnids:
        if wnid not in names:
            raise dspt.UserError(f"{root / 'classnames.txt'} has no line for the folder {images / 'train' / wnid}; "
                                 f"use CoOp's classnames.txt ({dspt.SPLIT_FILES_URL}), which names all 1000 classes")
    if [folder.name for folder in dspt.class_folders(images / "val")] != wnids:
        raise dspt.UserError(f"{images / 'val'} must hold the same class folders as {images / 'train'}")
    train, test = ([(path, c, names[wnid]) for c, wnid in enumerate(wnids) for path in dspt.images_in(images / part / wnid)]
                   for part in ("train", "val"))
    write_split(root / "split_ImageNet.json", train, test, images)


def food101n(root, release):
    """split_Food101N.json in root from Food-101N's release folder and root/food-101 (see the docstring)."""
    meta, food101 = release / "meta", root / "food-101"
    if not (meta / "classes.txt").is_file():
        raise dspt.UserError(f"{release} has no meta/classes.txt; unpack Food-101N's release whole, with its meta/")
    if not (food101 / "split_zhou_Food101.json").is_file():
        raise dspt.UserError(f"Food-101N's test set is Food-101's: put Food-101 with CoOp's split_zhou_Food101.json "
                             f"in {food101} ({dspt.SPLIT_FILES_URL})")
    classes = (meta / "classes.txt").read_text().split()[1:]  # after the header line
    food = dspt.read_split_file(food101 / "split_zhou_Food101.json", food101 / "images", "Food101", "")
    if [name.replace("_", " ") for name in classes] != food.classnames:
        extra = set(name.replace("_", " ") for name in classes) ^ set(food.classnames)
        raise dspt.UserError(f"{meta / 'classes.txt'} and {food101 / 'split_zhou_Food101.json'} do not name the same "
                             f"classes in the same order (e.g. {sorted(extra)[:3] or 'the order'}); use both files "
                             f"as released")
    verified = {}
    for tsv in (meta / "verified_train.tsv", meta / "verified_val.tsv"):
        lines = tsv.read_text().splitlines()[1:] if tsv.is_file() else []
        for number, line in enumerate(lines, 2):
            key, _, flag = line.partition("\t")
            if flag.strip() not in ("0", "1") or key.split("/")[0] not in classes:
                raise dspt.UserError(f"{tsv}, line {number}, is not \"<class>/<image>.jpg<TAB>0 or 1\": {line[:60]!r}; "
                                     f"use the file as Food-101N's release has it")
            if verified.setdefault(key, int(flag)) != int(flag):
                raise dspt.UserError(f"{tsv} flags {key} otherwise than the other verification file does")
    train = [(path, c, name) for c, name in enumerate(classes) for path in dspt.images_in(release / "images" / name)]
    if not train:
        raise dspt.UserError(f"{release / 'images'} holds no images in class folders; unpack Food-101N's release whole")
    test = [(path, label, classes[label]) for path, label in food.test]
    flags = {(release / "images" / key).relative_to(root).as_posix(): flag for key, flag in verified.items()
             if (release / "images" / key).is_file()}
    write_split(root / "split_Food101N.json", train, test, root, verified=flags)


def train_and_test_folders(root):
    names = [d.name for d in dspt.class_folders(root / "train")]
    if [d.name for d in dspt.class_folders(root / "test")] != names:
        raise dspt.UserError(f"{root}/train and {root}/test must hold the same class folders")
    train, test = ([(path, c, name) for c, name in enumerate(names) for path in dspt.images_in(root / part / name)]
                   for part in ("train", "test"))
    write_split(root / "split.json", train, test, root)


def prepare(root, name=None):
    """Lay out root as dspt.py reads it (see the module docstring); name says which dataset it is."""
    root = Path(root)
    if not root.is_dir():
        raise dspt.UserError(f"{root} does not exist; give the dataset's folder, or add --download NAME")
    release = next((root / folder for folder in ("Food-101N_release", "food-101n") if (root / folder).is_dir()), None)
    if release:
        return food101n(root, release)
    for dataset, (_, images) in TORCHVISION.items():  # torchvision's layout -> CoOp's
        folder = dspt.DATASETS[dataset][1]
        if (root / images).is_dir() and not (folder != "." and (root / folder).exists()):
            for source, target in ([(root / images, root / folder)] if folder != "." else
                                   [(child, root / child.name) for child in (root / images).iterdir()]):
                os.replace(source, target)
            if dataset == "FGVCAircraft":  # its lists lie beside the images
                for lists in (root / images).parent.glob("*.txt"):
                    os.replace(lists, root / lists.name)
            print(f"moved {root / images} to {root / folder}, as CoOp lays {dataset} out")
            name = name or dataset
    if any((root / split_name).is_file() for split_name, _, _ in dspt.DATASETS.values()) or (root / "split.json").is_file():
        print(f"{root} has a split file: dspt.py reads it as it is")
        return
    if (root / "variants.txt").is_file():
        return aircraft(root)
    if (root / "classnames.txt").is_file():
        if (root / "train").is_dir() and not (root / "images").exists():
            (root / "images").mkdir()
            for part in ("train", "val"):
                os.replace(root / part, root / "images" / part)
        return imagenet(root)
    if (root / "train").is_dir() and (root / "test").is_dir():
        return train_and_test_folders(root)
    found = name or next((dataset for dataset, (_, folder, _) in dspt.DATASETS.items()  # by its own folder's name
                          if folder not in (".", "images") and (root / folder).is_dir()), None)
    found = found or ("StanfordCars" if (root / "cars_train").is_dir() else None)
    if found in IN_CLASS_FOLDERS:
        split_name, folder, _ = dspt.DATASETS[found]
        classnames, train, test, _ = dspt.read_class_folders(root / folder)
        write_split(root / split_name, [(p, c, classnames[c]) for p, c in train], [(p, c, classnames[c]) for p, c in test],
                    root / folder, made_by=f"prepare_data.py from the class folders (50/20/30 per class, seed "
                    f"{dspt.SPLIT_SEED}), not CoOp's split: results do not compare with published ones")
    elif found in dspt.DATASETS and found != "Caltech101":
        split_name = dspt.DATASETS[found][0]
        raise dspt.UserError(f"{found}'s split comes only from CoOp's {split_name}; download it into {root} "
                             f"({dspt.SPLIT_FILES_URL})")
    elif (root / "images").is_dir():
        raise dspt.UserError(f"{root}/images may be Food101's, DTD's or OxfordPets'; say which with --dataset NAME")
    else:
        print(f"{root} needs no preparation: dspt.py reads it as it is")


def run(args):
    if args.download:
        known = {name.lower(): name for name in dspt.DATASETS}
        if args.download.lower() not in known:
            raise dspt.UserError(f"--download {args.download!r} is not a dataset of CoOp's benchmark; use one of "
                                 f"{', '.join(dspt.DATASETS)}")
        args.download = known[args.download.lower()]
        if not Path(args.data).exists():
            download(args.download, Path(args.data))
    if args.dataset and args.dataset not in dspt.DATASETS:
        raise dspt.UserError(f"--dataset {args.dataset!r} is not one of {', '.join(dspt.DATASETS)}")
    prepare(args.data, args.dataset or args.download)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Lay out a dataset as dspt.py reads it: a split file in "
                                                 "CoOp's format beside its images (see the module docstring).")
    parser.add_argument("data", metavar="DIR", help="the dataset's folder")
    parser.add_argument("--download", metavar="NAME", help="if DIR does not exist, download this dataset's "
                        "images into it through torchvision: " + ", ".join(n for n, row in TORCHVISION.items() if row[0]))
    parser.add_argument("--dataset", metavar="NAME", help="which of CoOp's datasets DIR holds, where its layout "
                        "does not say (" + ", ".join(dspt.DATASETS) + ")")
    return parser.parse_args(argv)


def main(argv=None):
    return dspt.main(argv, "prepare_data", parse_args, run)


if __name__ == "__main__":
    main()
