"""
What keeps cross-entropy prompt tuning from memorising symmetric label noise on bench/noise.py's
stand-in CLIP: its image features, or the form of CoOp's classifier?

bench/noise.py finds that under symmetric noise CoOp with cross-entropy fits almost none of the
wrong labels and makes its class prompts alike instead. Either of two things could stop it. The
frozen image features may leave too little of each image's own to fit: one free vector per class
(noise.free_class_vectors) fits only about a third of the near task's wrong labels. Or CoOp's
classifier may be unable to use even that: its class vectors come from one shared context in front
of fixed class names, through the frozen text encoder. This probe changes one thing at a time, on
the same pretrained stand-in, tasks, few-shot samples and label noise as the grid.

Features:
- encoded: what the image encoder gives, as in the grid;
- instance-rich: each image's unit feature plus DETAIL times a random unit direction of its own,
  drawn from a seed that its pixels fix, then normalised. Every image then has detail that no
  other image shares (the within-class spread fills many more dimensions), and free class
  vectors can fit nearly every wrong label.
Classifiers, each trained on the same samples and labels:
- free class vectors: the grid's bound (noise.free_class_vectors);
- CoOp: dspt.py's prompt tuning with cross-entropy, as the grid runs it;
- CoOp with learned names: the class-name tokens' embeddings are trained along with the context
  (PTNL's ablation, which finds the fixed names to be what makes prompt tuning robust).

    python bench/memorisation.py                                   # seeds 1-5, into bench/results
    python bench/memorisation.py --seeds 6 7 8 9 10 --out bench/results/seeds-6-10
    python bench/memorisation.py --epochs 100 --out bench/results/epochs-100   # CoOp trained longer
    python bench/memorisation.py --quick      # noise.py's --quick model, 5 epochs, seed 1

Writes memorisation.md (tables) and memorisation.json (every run) into --out. Uses the pretrained
model and tasks that bench/noise.py caches in --cache (pretraining them first if they are not there).
"""

import argparse
import contextlib
import hashlib
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import noise  # bench/noise.py: the stand-in, its tasks and its bound
from noise import dspt

DETAIL = 1.0  # the length of the random direction added to each image's unit feature
SETTINGS = noise.CURVES  # 50% symmetric and 50% pair noise, where the grid draws its curves
CLASSIFIERS = ["free class vectors", "coop", "coop, learned names"]

# -----------------------------------------------------------------------------
# The features and the classifiers.


def own_direction(image, dim):
    """A random unit vector [dim] that depends only on the image's pixels (a 64-bit digest of
    them seeds its generator)."""
    seed = int.from_bytes(hashlib.blake2b(image.float().numpy().tobytes(), digest_size=8).digest(), "little")
    return F.normalize(torch.randn(dim, generator=torch.Generator().manual_seed(seed)), dim=0)


def instance_rich(encode, detail=DETAIL):
    """An image encoder: encode's unit features plus detail times each image's own direction,
    normalised again."""
    def encode_rich(images):
        features = F.normalize(encode(images).float(), dim=-1)
        directions = torch.stack([own_direction(image, features.shape[-1]) for image in images])
        return F.normalize(features + detail * directions, dim=-1)
    return encode_rich


class LearnedNames(dspt.PackedPromptLearner):
    """CoOp's prompt learner whose class-name tokens' embeddings are trained too, each class its
    own (not the "." and EOT after them); dspt.train gives them the context's weight decay."""

    def __init__(self, clip, classnames, tokenizer, n_ctx=None):
        super().__init__(clip, classnames, tokenizer, n_ctx)
        n_ctx, dot = len(self.ctx), tokenizer.encode(".")
        rows, start = [], 0  # the names' rows in the packed suffixes "name . EOT", one class after another
        for name in classnames:
            tokens = tokenizer.tokenize(" ".join(["x"] * n_ctx) + f" {name}.", clip.positional_embedding.shape[0])[0]
            end = int(tokens.argmax())  # EOT has the largest id
            if tokens[end - 1:end].tolist() != dot:
                raise ValueError(f"the class name {name!r} ends in punctuation that merges with the \".\" after it")
            rows += range(start, start + end - n_ctx - 2)
            start += end - n_ctx
        fixed = self.suffix_embedding
        del self.suffix_embedding  # a buffer: the fixed embeddings, and the names' rows trained in their place
        self.register_buffer("fixed_suffix", fixed)
        self.register_buffer("name_rows", torch.tensor(rows), persistent=False)
        self.names = torch.nn.Parameter(fixed[self.name_rows].clone())

    def text_features(self, ctx=None):
        # the learner's text_features reads self.suffix_embedding: here made anew from the trained names
        self.suffix_embedding = self.fixed_suffix.index_put((self.name_rows,), self.names)
        return super().text_features(ctx)


def participation_ratio(features, labels):
    """How many dimensions the within-class spread of the unit features fills: (sum of the
    eigenvalues of its covariance)^2 / sum of their squares."""
    features = F.normalize(features, dim=-1)
    spread = torch.cat([features[labels == c] - features[labels == c].mean(dim=0) for c in labels.unique()])
    eigenvalues = torch.linalg.eigvalsh(spread.T.double() @ spread.double())
    return (eigenvalues.sum() ** 2 / (eigenvalues ** 2).sum()).item()


# -----------------------------------------------------------------------------
# The probe: every classifier on both kinds of features, at each task, seed and noise setting.


def with_feature_kinds(task, clip, args):
    """The task with its image encoders and the test features each gives, and zero-shot's
    accuracy on those."""
    encoders = {"encoded": clip.encode_image, "instance-rich": instance_rich(clip.encode_image)}
    tests, zero_shot = {}, {}
    for features, encode in encoders.items():
        test = dict(task["test"])
        if features != "encoded":
            test["features"] = dspt.encode_images(clip, test["items"], task["preprocess"], args,
                                                  f"encoding {task['name']} test images", encode)[0]
        tests[features] = test
        zero_shot[features] = noise.test_accuracy(clip, test, lambda: task["template"])
    return {**task, "encoders": encoders, "tests": tests, "zero_shot_by_features": zero_shot}


def tune(learner, clip, items, labels, noisy, args, encode, test):
    """CoOp's cross-entropy tuning of the learner, as the grid runs it; the summary of its outcome."""
    method = dspt.PromptTuning(learner, dspt.LOSSES["ce"], dspt.grad_scaler(args))
    method.encode = encode  # the features under study, in place of CLIP's
    history = dspt.train(method, items, labels, noisy, args)
    with torch.no_grad():
        text_features = learner.text_features()
    return {"memorisation": history[-1]["train_accuracy_noisy"], "clean_fit": history[-1]["train_accuracy_clean"],
            "test_accuracy": noise.test_accuracy(clip, test, lambda: text_features),
            "text_similarity": noise.mean_pairwise_cosine(text_features),
            "memorisation_curve": [r["train_accuracy_noisy"] for r in history]}


def probe(task, clip, seed, kind, rate, epochs, cache, log):
    """Every classifier on both kinds of features at one (task, seed, noise setting)."""
    args = dspt.parse_args(["--data", str(task["data"]), "--out", str(Path(cache) / "runs"), "--seed", str(seed),
                            "--epochs", str(epochs), *noise.TUNING, "--noise", str(rate),
                            "--noise-kind", kind])
    dspt.check_args(args)
    items, labels, noisy, _ = dspt.noisy_few_shot(task["train"], len(task["classnames"]), args)
    true_labels = torch.tensor([label for _, label in items])
    runs = []
    for features, encode in task["encoders"].items():
        with torch.random.fork_rng(devices=[]), contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            train_features, kept, _ = dspt.encode_images(clip, items, task["preprocess"], args, "encoding", encode)
        cell = {**task, "train_features": (train_features, kept), "test": task["tests"][features]}
        base = {"task": task["name"], "seed": seed, "kind": kind, "rate": rate, "features": features,
                "participation_ratio": participation_ratio(train_features, true_labels[kept])}
        runs.append({**base, "classifier": "free class vectors",
                     **noise.free_class_vectors(cell, clip, labels, noisy)})
        for classifier, learner_class in [("coop", dspt.PackedPromptLearner), ("coop, learned names", LearnedNames)]:
            torch.manual_seed(seed)
            learner = learner_class(clip, task["classnames"], task["tokenizer"], args.n_ctx)
            with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
                run = tune(learner, clip, items, labels, noisy, args, encode, cell["test"])
            runs.append({**base, "classifier": classifier, **run})
        print(f"{task['name']}  seed {seed}  {kind} {rate:.0%}  {features:13s} wrong labels fitted: "
              + ", ".join(f"{r['classifier']} {r['memorisation']:.1%}" for r in runs[-3:]), flush=True)
    return runs


# -----------------------------------------------------------------------------
# Report and main.


def cell_text(values, scale=100, digits=1):
    """mean ± sample std of the values (one a seed), or "-"."""
    values = [value for value in values if value is not None]
    if not values:
        return "-"
    mean, std, _ = noise.summary([scale * v for v in values])
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if len(values) > 1 else f"{mean:.{digits}f}"


def markdown(report):
    runs = report["runs"]

    def values(key, **where):
        return [r.get(key) for r in runs if all(r[k] == v for k, v in where.items())]

    lines = ["# What keeps cross-entropy prompt tuning from memorising, on bench/noise.py's stand-in", "",
             f"Mode {report['mode']}, seeds {', '.join(map(str, report['seeds']))}: mean ± sample std over the "
             f"seeds; fits and accuracies in %. {report['epochs']} epochs of dspt.py's training with noise.py's "
             f"settings. Instance-rich features: each image's unit feature plus {report['detail']:g} times a "
             f"random unit direction of its own. {report['seconds']:.0f} s on {report['threads']} CPU thread(s).",
             ""]
    for name, task in report["tasks"].items():
        lines += [f"## {name} task ({task['classes']} classes)", "",
                  "| features | within-class participation ratio | zero-shot test accuracy |", "|---|---|---|"]
        (kind, rate), first = report["settings"][0], CLASSIFIERS[0]  # one ratio a seed
        for features, accuracy in task["zero_shot"].items():
            ratio = values("participation_ratio", task=name, features=features, kind=kind, rate=rate,
                           classifier=first)
            lines.append(f"| {features} | {cell_text(ratio, scale=1)} | {100 * accuracy:.1f} |")
        for kind, rate in report["settings"]:
            lines += ["", f"At {noise.column_name(kind, rate)} noise:", "",
                      "| features | classifier | wrong labels fitted | most in any epoch | right labels fitted "
                      "| clean test accuracy | prompt cosine |", "|---|---|---|---|---|---|---|"]
            for features in task["zero_shot"]:
                for classifier in CLASSIFIERS:
                    where = dict(task=name, kind=kind, rate=rate, features=features, classifier=classifier)
                    peak = [max(curve) for curve in values("memorisation_curve", **where) if curve]
                    lines.append(" | ".join([
                        f"| {features}", classifier, cell_text(values("memorisation", **where)), cell_text(peak),
                        cell_text(values("clean_fit", **where)), cell_text(values("test_accuracy", **where)),
                        cell_text(values("text_similarity", **where), scale=1, digits=3)]) + " |")
        lines.append("")
    return "\n".join(lines)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="What keeps prompt tuning from memorising label noise on "
                                                 "bench/noise.py's stand-in CLIP: the features or the prompt.")
    add = parser.add_argument
    add("--quick", action="store_true", help="noise.py's --quick model, 5 epochs, seed 1")
    add("--out", metavar="DIR", help="where memorisation.md and memorisation.json go "
                                     "(default bench/results, or bench/out/quick with --quick)")
    add("--cache", default=str(noise.HERE / "cache"), metavar="DIR", help="noise.py's cache (default %(default)s)")
    add("--bpe", metavar="PATH", help="the tokenizer's bpe_simple_vocab_16e6.txt.gz; env DSPT_BPE "
                                      "(default: downloaded by dspt.py)")
    add("--seeds", type=int, nargs="+", metavar="SEED", help="default 1 2 3 4 5, or 1 with --quick")
    add("--epochs", type=int, help="CoOp's epochs (default the grid's: 25, or 5 with --quick)")
    add("--threads", type=int, default=1,
        help="torch CPU threads (default %(default)s, as each of noise.py's workers: the same results to the bit)")
    args = parser.parse_args(argv)
    if args.threads < 1 or (args.epochs is not None and args.epochs < 1):
        parser.error("--threads and --epochs must be at least 1")
    return args


def main(argv=None):
    """Run the probe; returns the report (also written to --out as memorisation.json)."""
    args = parse_args(argv)
    mode = "quick" if args.quick else "full"
    out = Path(args.out or (noise.HERE / "out" / "quick" if args.quick else noise.HERE / "results"))
    seeds, epochs = args.seeds or noise.SEEDS[mode], args.epochs or noise.EPOCHS[mode]
    torch.set_num_threads(args.threads)
    start = time.time()
    tokenizer = dspt.load_tokenizer(args.bpe)
    checkpoint, pretraining = noise.pretrained_clip(mode, tokenizer, args.cache)
    clip, preprocess = dspt.load_clip(str(checkpoint))
    base = dspt.parse_args(["--data", ".", *noise.TUNING])
    dspt.check_args(base)
    tasks = {name: with_feature_kinds(noise.prepare_task(name, noise.downstream_task(args.cache, name), clip,
                                                         preprocess, tokenizer, base), clip, base)
             for name in noise.TASKS}
    logs = Path(args.cache) / f"logs-{mode}"
    logs.mkdir(parents=True, exist_ok=True)
    runs = []
    with open(logs / f"memorisation-seeds{'-'.join(map(str, seeds))}-epochs{epochs}.log", "w") as log:
        for name, task in tasks.items():
            for seed in seeds:
                for kind, rate in SETTINGS:
                    runs += probe(task, clip, seed, kind, rate, epochs, args.cache, log)
    report = {"mode": mode, "seeds": seeds, "settings": SETTINGS, "epochs": epochs, "detail": DETAIL,
              "pretraining_final_loss": pretraining["final_loss"], "seconds": time.time() - start,
              "threads": args.threads,
              "tasks": {name: {"classes": len(task["classnames"]), "zero_shot": task["zero_shot_by_features"]}
                        for name, task in tasks.items()},
              "runs": runs}
    out.mkdir(parents=True, exist_ok=True)
    dspt.atomic_write(out / "memorisation.md", lambda f: f.write(markdown(report).encode()))
    dspt.atomic_write(out / "memorisation.json", lambda f: f.write(json.dumps(report, indent=1).encode()))
    print(f"wrote memorisation.md and memorisation.json into {out}")
    return report


if __name__ == "__main__":
    try:
        main()
    except dspt.UserError as e:
        print(f"memorisation: error: {e}", file=sys.stderr)
        raise SystemExit(1)
