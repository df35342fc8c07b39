"""
Use a prompt that dspt.py (or baselines.py) learned: its test accuracy on a dataset, or the
classes of some images.

    python predict.py --eval runs/caltech101-RN50-dspt-sym0.5-16shot-seed1/prompt.pt --data ./caltech101
    python predict.py --classify cat.jpg dog.png --prompt runs/.../prompt.pt
    python predict.py --classify cat.jpg --classnames "cat,dog,horse"     # zero-shot CLIP

--eval writes eval.json to --out (default: the prompt's folder). --classify prints a line per
image: its path, then its top-5 classes and their probabilities, tab-separated. In Python,
load_prompt(path, clip, tokenizer) gives the PackedPromptLearner a run saved, and
read_training_sample(path, data) the training sample and noisy labels it trained on.
"""

import argparse
import csv
import json
from pathlib import Path

import torch

import dspt


def load_prompt(path, clip, tokenizer, backbone=None):
    """The PackedPromptLearner a run saved in prompt.pt, on clip (of this backbone, if given: it must be
    the prompt's); read without running pickled code."""
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
        ctx, classnames = saved["ctx"], list(saved["classnames"])
    except Exception as e:
        raise dspt.UserError(f"cannot read the prompt {path} ({dspt.first_line(e)}); give a prompt.pt that "
                             f"dspt.py or baselines.py wrote") from None
    if backbone is not None and saved.get("backbone") != backbone:
        raise dspt.UserError(f"the prompt {path} was learned on the backbone {saved.get('backbone')}, not "
                             f"{backbone}; pass --backbone {saved.get('backbone')}")
    if saved.get("trained"):
        raise dspt.UserError(f"the prompt {path} was learned with modules besides the context "
                             f"({', '.join(saved['trained'])}); only a context-only prompt can be used here")
    learner = dspt.PackedPromptLearner(clip, classnames, tokenizer, n_ctx=len(ctx),
                                       name_prefix=saved.get("name_prefix", ""))
    if ctx.shape != learner.ctx.shape:
        raise dspt.UserError(f"the prompt {path} has context vectors of width {ctx.shape[-1]}, this backbone's "
                             f"text width is {learner.ctx.shape[-1]}; use the backbone it was learned with "
                             f"({saved.get('backbone')})")
    learner.ctx.data.copy_(ctx)
    return learner


def read_training_sample(path, data):
    """(items, given labels, mask of the wrong ones) from a run's training_sample.csv, to reuse its labels."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    items = [(Path(data) / row["path"], int(row["true_label"])) for row in rows]
    given = torch.tensor([int(row["given_label"]) for row in rows])
    return items, given, given != torch.tensor([label for _, label in items])


def evaluate(args):
    """Test accuracy of the prompt --eval on --data's test split; written to --out/eval.json."""
    dataset, (tokenizer, clip, preprocess) = dspt.load_dataset(args.data), dspt.load_model(args)
    learner = load_prompt(args.eval, clip, tokenizer, args.backbone)
    if learner.classnames != dataset.classnames:
        raise dspt.UserError(f"the prompt {args.eval} is for the class names {learner.classnames[:3]}..., "
                             f"{args.data} has {dataset.classnames[:3]}...; evaluate it on the dataset it was "
                             f"learned on")
    features, labels, unreadable = dspt.encode_test_set(clip, dataset, preprocess, args)
    with torch.no_grad(), dspt.autocast(args):
        result = {"prompt": str(args.eval), "data": args.data, "dataset": dataset.name, "split": dataset.split,
                  "test_images": len(labels), "unreadable_images": unreadable,
                  "test_accuracy": dspt.accuracy(clip.logits(features, learner.text_features()), labels)}
    out = Path(args.out or Path(args.eval).parent)
    print(f"test accuracy {result['test_accuracy']:.2%} on {len(labels)} images", flush=True)  # before writing can fail
    dspt.atomic_write(out / "eval.json", lambda f: f.write(json.dumps(result, indent=2, allow_nan=False).encode()))
    print(f"wrote {out / 'eval.json'}")
    return result


def classify(args):
    """Print each --classify image's top-5 classes, by the --prompt or zero-shot; returns the probabilities."""
    tokenizer, clip, preprocess = dspt.load_model(args)
    images = []
    for path in args.classify:
        image = dspt.read_image(path)
        if image is None:
            raise dspt.UserError(f"cannot read the image {path}; give image files (JPEG, PNG, ...)")
        images.append(preprocess(image))
    with torch.no_grad(), dspt.autocast(args):
        if args.prompt:
            learner = load_prompt(args.prompt, clip, tokenizer, args.backbone)
            classnames, text_features = learner.classnames, learner.text_features()
        else:
            classnames = [name.strip() for name in args.classnames.split(",")]
            text_features = dspt.zero_shot_text_features(clip, tokenizer, args.template or "a photo of a {}.",
                                                         classnames, args)
        features = clip.encode_image(torch.stack(images).to(args.device, args.dtype))
        probabilities = clip.logits(features, text_features).softmax(dim=-1).cpu()
    for path, p in zip(args.classify, probabilities):
        top = p.topk(min(5, len(classnames)))
        print("\t".join([str(path), *(f"{classnames[i]}\t{v:.4f}" for v, i in zip(top.values.tolist(),
                                                                                  top.indices.tolist()))]))
    return probabilities


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Evaluate a learned prompt, or classify images with it (or "
                                                 "zero-shot, with --classnames).")
    add = parser.add_argument
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--eval", metavar="PROMPT", help="evaluate this prompt.pt on --data's test split; writes "
                      "eval.json to --out (default: the prompt's folder)")
    what.add_argument("--classify", nargs="+", metavar="IMAGE", help="print each image's top-5 classes and "
                      "probabilities (tab-separated: path, then class and probability pairs)")
    add("--data", metavar="DIR", help="with --eval: the dataset folder, as dspt.py reads it")
    add("--prompt", metavar="PROMPT", help="with --classify: the prompt.pt to classify with; its class names are used")
    add("--classnames", metavar="A,B,...", help="with --classify and no --prompt: the classes, comma-separated, "
        "for zero-shot CLIP with --template")
    add("--out", metavar="DIR", help="with --eval: where eval.json goes (default: the prompt's folder)")
    dspt.add_model_flags(parser)
    return parser.parse_args(argv)


def run(args):
    if args.eval and not args.data:
        raise dspt.UserError("--eval needs --data DIR, the dataset whose test split to evaluate on")
    if args.classify and not (args.prompt or args.classnames):
        raise dspt.UserError("--classify needs the classes: --prompt PROMPT (a prompt.pt) or --classnames A,B,...")
    if args.classnames and not all(name.strip() for name in args.classnames.split(",")):
        raise dspt.UserError(f"--classnames {args.classnames!r} has an empty class name; give names separated by "
                             f"single commas, e.g. \"cat,dog\"")
    dspt.check_model_args(args)
    return evaluate(args) if args.eval else classify(args)


def main(argv=None):
    """Evaluate or classify; a user error exits with one line and status 1."""
    return dspt.main(argv, "predict", parse_args, run)


if __name__ == "__main__":
    main()
