"""
Noise robustness of prompt tuning, measured end to end on a stand-in for CLIP pretrained here.

The claim under test is about behaviour: under label noise, cross-entropy prompt tuning drifts
away from CLIP's zero-shot prior while DSPT holds. OpenAI's weights cannot be fetched everywhere,
so this file builds a small world in which the whole path runs on a CPU in minutes, and uses
dspt.py's own code for everything (model classes, tokenizer, data loading, few-shot sampling,
label noise, prompt learner, losses, training loop, evaluation).

The world. 32x32 RGB images of one object with six attributes: a shape (ten, from circle to
heart), a colour (eight), a size (small or large), a fill (plain, striped or spotted), a position,
and a background (dark, light, striped or checkered). Each image has a caption in words, like
web alt-text: it names the shape nine times in ten and the other attributes now and then, in
varied phrasings ("a photo of a small red star on a striped background.", "clip art of a large
spotted ring in the top left", "heart, blue, small"). The real BPE tokenizes the captions.

Pretraining. dspt.CLIP in miniature: a ModifiedResNet (RN50's design, one bottleneck per stage,
width 16) and a 2-layer text transformer of width 64, trained contrastively on freshly drawn
batches, seeded, and cached in --cache so that later runs reuse it.

The shift. In pretraining every shape is drawn in six of the eight colours, never in the two of
HELD_OUT. The downstream task names the shape ("circle", ..., "heart") of images whose colour is
always one of their shape's held-out two, on a background pretraining never drew (noisy grey with
coloured specks). Zero-shot accuracy is thereby well above chance but far from perfect.

The grid, each cell run as dspt.py runs one: 16 shots per class from a pool of 50 per class, label
noise from dspt.inject_label_noise (none; symmetric or pair at 25, 50, 75%), the prompt learner's
16 context vectors from N(0, 0.02), 50 epochs of SGD at lr 0.002, batch 32: dspt.py's defaults,
except that there is no augmentation (--no-augment), because CoOp's random resized crop (scale
0.08-1) would often cut the object out of a 32-pixel image. Test accuracy on 1000 clean images.

The methods: CoOp's prompt tuning with each of dspt.py's losses (ce, gce, mae, dspt), and the peers
of baselines.py at the same cells: ProGrad with cross-entropy as its domain loss (lambda 1) and its
published initialisation ("a photo of a" after 12 zero vectors), trained 50 epochs under DSPT's
protocol where the paper trains 200; and NLPrompt (optimal transport splits the samples; CE on the
clean, MAE on the rest); VisPrompt and ANPrompt as baselines.py reconstructs them (ANPrompt with
cross-entropy). UPL's pseudo-labelling has no labels, hence no noise axis: zero-shot CLIP
pseudo-labels the whole pool of 500 training images, the 16 most confident per predicted class are
kept, and the prompt is tuned on them with the dspt loss and with ce; it gets its own table.

    python bench/noise.py --bpe path/to/bpe_simple_vocab_16e6.txt.gz   # or set $DSPT_BPE
    python bench/noise.py --quick     # shorter pretraining, one seed, three noise settings

Writes noise.md (tables), noise.png (accuracy against noise rate) and noise.json (every run)
into --out. Delete --cache to pretrain again.
"""

import argparse
import contextlib
import hashlib
import inspect
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import baselines  # noqa: E402
import dspt  # noqa: E402

HERE = Path(__file__).resolve().parent

# -----------------------------------------------------------------------------
# The world: attributes, images drawn from them, and captions.

RES, SUPERSAMPLE = 32, 2  # images are drawn at 64x64 and averaged down, for smooth edges
SHAPES = ["circle", "square", "triangle", "diamond", "hexagon", "star", "cross", "ring", "crescent", "heart"]
COLOURS = {"red": (215, 35, 35), "orange": (240, 135, 20), "yellow": (235, 215, 40), "green": (35, 165, 55),
           "blue": (35, 75, 215), "purple": (135, 45, 185), "pink": (240, 125, 185), "white": (240, 240, 240)}
COLOUR_RGB = np.array(list(COLOURS.values()), dtype=np.float32)
TEXTURES = ["plain", "striped", "spotted"]
BACKGROUNDS = ["dark", "light", "striped", "checkered", "speckled"]  # speckled: downstream only
HELD_OUT = [{s % 8, (s + 3) % 8} for s in range(len(SHAPES))]  # colours shape s never has in pretraining
PRETRAINING_COLOURS = np.array([[c for c in range(8) if c not in HELD_OUT[s]] for s in range(len(SHAPES))])
DOWNSTREAM_COLOURS = np.array([sorted(HELD_OUT[s]) for s in range(len(SHAPES))])
POSITIONS = [["in the top left", "at the top", "in the top right"],
             ["on the left", "in the center", "on the right"],
             ["in the bottom left", "at the bottom", "in the bottom right"]]
PREFIXES = ["a photo of", "a picture of", "an image of", "a drawing of", "clip art of", ""]


def shape_mask(shape, u, v):
    """Inside-test of a shape of radius about 1 at coordinates (u, v), v pointing down."""
    rho, theta = np.hypot(u, v), np.arctan2(v, u)

    def polygon(sides, first_normal, apothem):
        normals = first_normal + 2 * np.pi * np.arange(sides) / sides
        return np.max([np.cos(a) * u + np.sin(a) * v for a in normals], axis=0) <= apothem

    if shape == "circle":
        return rho <= 0.9
    if shape == "square":
        return np.maximum(abs(u), abs(v)) <= 0.75
    if shape == "triangle":
        return polygon(3, np.pi / 2, 0.5)
    if shape == "diamond":
        return abs(u) / 0.75 + abs(v) <= 1
    if shape == "hexagon":
        return polygon(6, 0, 0.82)
    if shape == "star":
        return rho <= 0.42 + 0.6 * ((1 + np.cos(5 * (theta + np.pi / 2))) / 2) ** 3
    if shape == "cross":
        return (abs(u) <= 0.28) & (abs(v) <= 0.95) | (abs(u) <= 0.95) & (abs(v) <= 0.28)
    if shape == "ring":
        return (rho <= 0.95) & (rho >= 0.55)
    if shape == "crescent":
        return (rho <= 0.95) & (np.hypot(u - 0.45, v + 0.15) >= 0.75)
    x, y = 1.15 * u, 0.25 - 1.15 * v  # heart: (x^2 + y^2 - 1)^3 <= x^2 y^3
    return (x * x + y * y - 1) ** 3 <= x * x * y ** 3


def sample_attributes(rng, n, downstream=False):
    """n images' attributes: pretraining's, or the downstream task's (held-out colours, speckles)."""
    shape = rng.integers(0, len(SHAPES), n)
    colours = DOWNSTREAM_COLOURS if downstream else PRETRAINING_COLOURS
    large = rng.random(n) < 0.5
    radius = np.where(large, rng.uniform(9, 12, n), rng.uniform(5.5, 7.5, n))
    return {"shape": shape, "colour": colours[shape, rng.integers(0, colours.shape[1], n)],
            "large": large, "radius": radius, "texture": rng.integers(0, len(TEXTURES), n),
            "x": rng.uniform(radius + 0.5, RES - radius - 0.5), "y": rng.uniform(radius + 0.5, RES - radius - 0.5),
            "angle": rng.uniform(-0.3, 0.3, n),
            "background": np.full(n, 4) if downstream else rng.integers(0, 4, n)}


def draw_backgrounds(kind, X, Y, rng):
    """[n, R, R, 3] float backgrounds of the given kinds (indices into BACKGROUNDS)."""
    n, size = len(kind), X.shape[-1]
    out = np.empty((n, size, size, 3), np.float32)

    def tone(m, low, high):  # m random greyish colours, brightness in [low, high]
        grey = rng.uniform(low, high, (m, 1)) + rng.uniform(-15, 15, (m, 3))
        return grey.astype(np.float32)[:, None, None, :]

    for k, (low, high) in enumerate([(20, 70), (170, 220)]):  # dark, light
        rows = np.flatnonzero(kind == k)
        out[rows] = tone(len(rows), low, high)
    rows = np.flatnonzero((kind == 2) | (kind == 3))  # striped, checkered
    period = rng.uniform(3, 6, (len(rows), 1, 1)).astype(np.float32)
    direction = rng.integers(0, 3, (len(rows), 1, 1))
    stripes = np.where(direction == 0, X, np.where(direction == 1, Y, X + Y)) // period % 2 == 1
    checks = (X // period + Y // period) % 2 == 1
    on = np.where((kind[rows] == 2)[:, None, None], stripes, checks)[..., None]
    out[rows] = np.where(on, tone(len(rows), 30, 90), tone(len(rows), 140, 210))
    rows = np.flatnonzero(kind == 4)  # speckled: pixel noise and three coloured specks
    noise = rng.normal(0, 10, (len(rows), RES, RES, 3)).astype(np.float32)
    speckled = tone(len(rows), 80, 150) + noise.repeat(SUPERSAMPLE, 1).repeat(SUPERSAMPLE, 2)
    for _ in range(3):
        x, y, r = (rng.uniform(*bounds, (len(rows), 1, 1)) for bounds in ((0, RES), (0, RES), (0.8, 2.2)))
        speck = (np.hypot(X - x, Y - y) < r)[..., None]
        speckled = np.where(speck, COLOUR_RGB[rng.integers(0, 8, len(rows))][:, None, None, :], speckled)
    out[rows] = speckled
    return out


def render(attributes, rng):
    """uint8 images [n, RES, RES, 3] of the attributes."""
    n, size = len(attributes["shape"]), RES * SUPERSAMPLE
    grid = (np.arange(size, dtype=np.float32) + 0.5) / SUPERSAMPLE
    X, Y = grid[None, None, :], grid[None, :, None]  # pixel coordinates, broadcast to [n, R, R]
    column = {key: value[:, None, None].astype(np.float32) for key, value in attributes.items()}
    images = draw_backgrounds(attributes["background"], X, Y, rng)
    dx, dy = (X - column["x"]) / column["radius"], (Y - column["y"]) / column["radius"]
    cos, sin = np.cos(column["angle"]), np.sin(column["angle"])
    u, v = cos * dx + sin * dy, cos * dy - sin * dx  # rotated into the object's frame
    inside = np.zeros((n, size, size), bool)
    for k, name in enumerate(SHAPES):
        rows = np.flatnonzero(attributes["shape"] == k)
        inside[rows] = shape_mask(name, u[rows], v[rows])
    rgb = np.clip(COLOUR_RGB[attributes["colour"]] + rng.normal(0, 12, (n, 3)), 0, 255)[:, None, None, :]
    shaded = ((column["texture"] == 1) & ((X + Y) // 3 % 2 == 1)
              | (column["texture"] == 2) & (np.hypot(X % 4 - 2, Y % 4 - 2) < 1))
    fill = rgb * np.where(shaded, 0.45, 1.0)[..., None].astype(np.float32)
    images = np.where(inside[..., None], fill, images)
    images = sum(images[:, i::SUPERSAMPLE, j::SUPERSAMPLE] for i in range(SUPERSAMPLE) for j in range(SUPERSAMPLE))
    return np.round(images / SUPERSAMPLE ** 2).astype(np.uint8)


def caption(attributes, i, rng):
    """Alt-text for image i: the shape most of the time, other attributes now and then."""
    adjectives = [word for word, chance in [("large" if attributes["large"][i] else "small", 0.5),
                                            (list(COLOURS)[attributes["colour"][i]], 0.6),
                                            (TEXTURES[attributes["texture"][i]], 0.4)]
                  if word != "plain" and rng.random() < chance]
    noun = SHAPES[attributes["shape"][i]] if rng.random() < 0.9 else "shape"
    if rng.random() < 0.15:  # a list of tags
        return ", ".join([noun, *adjectives])
    row, column = (min(2, int(3 * attributes[axis][i] / RES)) for axis in ("y", "x"))  # thirds of the image
    extras = [phrase for phrase, chance in [
        (POSITIONS[row][column], 0.3),
        (f"on a {BACKGROUNDS[attributes['background'][i]]} background", 0.4)] if rng.random() < chance]
    phrase = " ".join([*adjectives, noun])
    words = [PREFIXES[rng.integers(len(PREFIXES))], "an" if phrase[0] in "aeiou" else "a", phrase, *extras]
    return " ".join(word for word in words if word) + ("." if rng.random() < 0.5 else "")


def to_tensor(images):
    """What dspt.image_transform makes of RES-pixel images: [n, 3, RES, RES], CLIP-normalised."""
    mean, std = torch.tensor(dspt.CLIP_MEAN).view(3, 1, 1), torch.tensor(dspt.CLIP_STD).view(3, 1, 1)
    return ((torch.from_numpy(images).permute(0, 3, 1, 2) / 255 - mean) / std).contiguous()


# -----------------------------------------------------------------------------
# Pretraining a small CLIP contrastively on the world's captioned images.

MODEL = dict(embed_dim=64, image_resolution=RES, vision_layers=(1, 1, 1, 1), vision_width=16,
             vision_patch_size=None, context_length=77, vocab_size=49408,
             transformer_width=64, transformer_heads=1, transformer_layers=2)
PRETRAINING = {"full": dict(steps=2000, batch_size=128, lr=1e-3, warmup=100, seed=0),
               "quick": dict(steps=500, batch_size=128, lr=1e-3, warmup=100, seed=0)}


def initialise(clip):
    """CLIP's initialisation of the token embedding and the text transformer."""
    nn_init, width, layers = torch.nn.init, clip.transformer.width, clip.transformer.layers
    nn_init.normal_(clip.token_embedding.weight, std=0.02)
    for block in clip.transformer.resblocks:
        nn_init.normal_(block.attn.in_proj_weight, std=width ** -0.5)
        nn_init.normal_(block.attn.out_proj.weight, std=(2 * layers * width) ** -0.5)
        nn_init.normal_(block.mlp.c_fc.weight, std=(2 * width) ** -0.5)
        nn_init.normal_(block.mlp.c_proj.weight, std=(2 * layers * width) ** -0.5)


def pretrain(settings, tokenizer):
    """A CLIP trained with the symmetric contrastive loss on fresh batches; (model, stats)."""
    torch.manual_seed(settings["seed"])
    rng = np.random.default_rng(settings["seed"])
    clip = dspt.CLIP(**MODEL)
    initialise(clip)
    decayed = {name for name, p in clip.named_parameters() if p.ndim >= 2 and "embedding" not in name}
    optimizer = torch.optim.AdamW(
        [{"params": [p for name, p in clip.named_parameters() if name in decayed], "weight_decay": 0.1},
         {"params": [p for name, p in clip.named_parameters() if name not in decayed], "weight_decay": 0.0}],
        lr=settings["lr"], betas=(0.9, 0.98), eps=1e-6, fused=True)
    steps, start, losses = settings["steps"], time.time(), []
    for step in range(steps):
        warmup = min(1.0, (step + 1) / settings["warmup"])
        for group in optimizer.param_groups:
            group["lr"] = settings["lr"] * warmup * 0.5 * (1 + math.cos(math.pi * step / steps))
        attributes = sample_attributes(rng, settings["batch_size"])
        images = to_tensor(render(attributes, rng))
        tokens = tokenizer.tokenize([caption(attributes, i, rng) for i in range(len(images))])
        image_features = F.normalize(clip.encode_image(images), dim=-1)
        text_features = F.normalize(clip.encode_text(tokens), dim=-1)
        logits = clip.logit_scale.exp() * image_features @ text_features.T  # [images, captions]
        targets = torch.arange(len(logits))
        loss = (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            clip.logit_scale.clamp_(0, math.log(100))
        losses.append(loss.item())
        if (step + 1) % 250 == 0 or step + 1 == steps:
            print(f"pretraining step {step + 1}/{steps}  loss {np.mean(losses[-50:]):.3f}  "
                  f"logit scale {clip.logit_scale.exp().item():.1f}  {time.time() - start:.0f}s", flush=True)
    stats = {"seconds": time.time() - start, "final_loss": float(np.mean(losses[-50:])),
             "logit_scale": clip.logit_scale.exp().item()}
    return clip, stats


def fingerprint(*parts):
    """A short digest of settings and of the source code of functions, naming a cached file."""
    text = json.dumps([inspect.getsource(p) if callable(p) else p for p in parts], default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


WORLD = (RES, SUPERSAMPLE, SHAPES, COLOURS, TEXTURES, BACKGROUNDS, HELD_OUT,
         shape_mask, sample_attributes, draw_backgrounds, render)


def pretrained_clip(mode, tokenizer, cache):
    """(checkpoint path, pretraining stats), pretraining first unless the cache has it."""
    settings = PRETRAINING[mode]
    path = Path(cache) / f"clip-{mode}-{fingerprint(*WORLD, caption, MODEL, settings, initialise, pretrain)}.pt"
    stats_path = path.with_suffix(".json")
    if path.is_file() and stats_path.is_file():
        return path, {**json.loads(stats_path.read_text()), "cached": True}
    clip, stats = pretrain(settings, tokenizer)
    dspt.atomic_write(path, lambda f: torch.save(clip.state_dict(), f))
    dspt.atomic_write(stats_path, lambda f: f.write(json.dumps(stats).encode()))
    return path, {**stats, "cached": False}


# -----------------------------------------------------------------------------
# The downstream task: PNG files in dspt.py's train/ and test/ class-folder layout.

DOWNSTREAM = dict(train_per_class=50, test_per_class=100, seed=2024)


def downstream_task(cache):
    """The task's folder, drawn once: train/<shape>/ (the few-shot pool) and test/<shape>/."""
    settings = DOWNSTREAM
    root = Path(cache) / f"downstream-{fingerprint(*WORLD, settings)}"
    if root.is_dir():
        return root
    rng = np.random.default_rng(settings["seed"])
    partial = root.with_name(root.name + ".part")
    shutil.rmtree(partial, ignore_errors=True)
    for split in ("train", "test"):
        n = settings[f"{split}_per_class"] * len(SHAPES)
        attributes = sample_attributes(rng, n, downstream=True)
        for i, image in enumerate(render(attributes, rng)):
            path = partial / split / SHAPES[attributes["shape"][i]] / f"{i:04d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(path)
    os.replace(partial, root)
    return root


@torch.no_grad()
def zero_shot_like_pretraining(clip, tokenizer, template, n=1000, seed=7):
    """Zero-shot shape accuracy on n images drawn as in pretraining: what the shift costs."""
    rng = np.random.default_rng(seed)
    attributes = sample_attributes(rng, n)
    text_features = clip.encode_text(tokenizer.tokenize([template.format(s) for s in SHAPES]))
    logits = clip.logits(clip.encode_image(to_tensor(render(attributes, rng))), text_features)
    return dspt.accuracy(logits, torch.from_numpy(attributes["shape"]))


# -----------------------------------------------------------------------------
# The grid: method x noise setting x seed, each cell one prompt tuning run.

TUNING = ["--shots", "16", "--n-ctx", "16", "--epochs", "50", "--lr", "0.002", "--batch-size", "32",
          "--no-augment", "--workers", "0", "--device", "cpu"]
NOISE = {"full": [("clean", 0.0)] + [(kind, rate) for kind in ("sym", "pair") for rate in (0.25, 0.5, 0.75)],
         "quick": [("clean", 0.0), ("sym", 0.5), ("pair", 0.5)]}
SEEDS = {"full": [1, 2, 3], "quick": [1]}


def tune_with_loss(loss):
    """CoOp's prompt tuning with one of dspt.py's losses."""
    def tune(learner, items, labels, noisy, args, task):
        return dspt.train(learner, items, labels, noisy, dspt.LOSSES[loss], args)
    return tune


def tune_prograd(learner, items, labels, noisy, args, task):
    """ProGrad as published: cross-entropy as the domain loss, lambda 1 (its context starts from
    CONTEXT_INIT)."""
    scaler = dspt.grad_scaler(args)
    method = baselines.ProGrad(learner, dspt.LOSSES["ce"], task["template"], scaler, strength=1.0)
    return dspt.train(learner, items, labels, noisy, dspt.LOSSES["ce"], args, method.step_loss, scaler,
                      method.epoch_record)


def tune_with_transport(method_class):
    """NLPrompt (CE on the samples optimal transport calls clean, MAE on the rest) or VisPrompt
    (the same split on image-conditioned prompts, GCE on the rest); no choice of loss."""
    def tune(learner, items, labels, noisy, args, task):
        with torch.random.fork_rng(devices=[]):  # as baselines.run: leave the global RNG alone
            features, kept, _ = dspt.encode_images(learner.clip, items, task["preprocess"], args,
                                                   "encoding training images for optimal transport")
        method = method_class(learner, features, kept, labels, noisy)
        task["method"] = method  # for the evaluation: VisPrompt's logits are its own
        return dspt.train(learner, items, labels, noisy, method.loss, args, method.step_loss,
                          epoch_record=method.epoch_record)
    return tune


def tune_anprompt(learner, items, labels, noisy, args, task):
    """ANPrompt as reconstructed in baselines.py, with cross-entropy as published."""
    noise = baselines.noise_prompts(learner.clip, task["tokenizer"], learner.classnames, task["prompt"], len(learner.ctx))
    method = baselines.ANPrompt(learner, noise, dspt.LOSSES["ce"])
    task["method"] = method  # for the evaluation: through the prompted image encoder
    return dspt.train(learner, items, labels, noisy, dspt.LOSSES["ce"], args, method.step_loss,
                      epoch_record=method.epoch_record, image_encoder=method.encode_frozen)


# A method turns (learner, items, given labels, mask of wrong ones, args, task) into dspt.train's
# history; task holds what the peers need besides: zero-shot CLIP's text features ("template")
# and the image transform ("preprocess").
METHODS = {**{loss: tune_with_loss(loss) for loss in ("ce", "gce", "mae", "dspt")},
           "prograd": tune_prograd, "nlprompt": tune_with_transport(baselines.NLPrompt),
           "visprompt": tune_with_transport(baselines.VisPrompt), "anprompt": tune_anprompt}
# The context's initial words, where a method publishes one (after zero vectors up to --n-ctx 16).
CONTEXT_INIT = {"prograd": "a photo of a"}
# UPL's pseudo-labelling has no labels, hence no noise axis: its own small grid, over these losses.
UPL_LOSSES = ["dspt", "ce"]


def run_cell(method, clip, tokenizer, classnames, train_items, test, task, args, log):
    """One prompt tuning run as dspt.run does it; the summary of its outcome."""
    items, labels, noisy, _ = dspt.noisy_few_shot(train_items, len(classnames), args)
    return tune_and_evaluate(METHODS[method], clip, tokenizer, classnames, items, labels, noisy, test, task,
                             args, log, CONTEXT_INIT.get(method, ""))


def tune_and_evaluate(method, clip, tokenizer, classnames, items, labels, noisy, test, task, args, log, ctx_init=""):
    """Train a fresh prompt learner on (items, labels) with method; the summary of its outcome."""
    torch.manual_seed(args.seed)
    learner = dspt.PromptLearner(clip, classnames, tokenizer, args.n_ctx, ctx_init)
    start, cell = time.time(), dict(task)  # a method may leave itself in cell
    with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        history = method(learner, items, labels, noisy, args, cell)
    with torch.no_grad():
        text_features = learner.text_features()
        if isinstance(cell.get("method"), baselines.VisPrompt):  # every image has its own prompts
            logits = torch.cat([cell["method"].logits(chunk) for chunk in test["features"].split(256)])
        elif isinstance(cell.get("method"), baselines.ANPrompt):  # through the prompted image encoder
            method = cell["method"]
            if "frozen" not in test:  # the encoder's frozen part, the same in every cell: encoded once
                test["frozen"] = dspt.encode_images(clip, test["items"], task["preprocess"], args,
                                                    "encoding test images", method.encode_frozen)[0]
            logits = torch.cat([method.logits(chunk) for chunk in test["frozen"].split(256)])
        else:
            logits = clip.logits(test["features"], text_features)
        accuracy = dspt.accuracy(logits, test["labels"])
    ratio = None
    if noisy.any():  # how hard the wrongly labelled samples pull, relative to the others, over training
        ratio = sum(r["grad_norm_noisy"] for r in history) / sum(r["grad_norm_clean"] for r in history)
    extra = {key: history[-1][key] for key in ("prograd_conflict_fraction", "ot_clean_fraction", "ot_noisy_precision",
                                                 "ot_noisy_recall", "visprompt_gate_mean", "anprompt_alignment_loss")
             if key in history[-1]}
    return {"test_accuracy": accuracy, "memorisation": history[-1]["train_accuracy_noisy"],
            "gradient_ratio": ratio, "text_similarity": mean_pairwise_cosine(text_features),
            "seconds": time.time() - start, "epoch_seconds": float(np.mean([r["seconds"] for r in history])), **extra}


def mean_pairwise_cosine(text_features):
    """How alike the class prompts are: 1 when the classifier has collapsed to one prompt."""
    normalised = F.normalize(text_features, dim=-1)
    similarity = normalised @ normalised.T
    return ((similarity.sum() - similarity.trace()) / (len(similarity) * (len(similarity) - 1))).item()


def run_grid(mode, data, clip, preprocess, tokenizer, cache):
    """(zero-shot CLIP's outcome, the runs, UPL's runs) over the mode's seeds, noise settings and
    methods; UPL's runs over the seeds and UPL_LOSSES."""
    base = dspt.parse_args(["--data", str(data), "--out", str(Path(cache) / "runs"), *TUNING])
    dspt.check_args(base)
    classnames, train_items, test_items, _, _, prompt = dspt.load_dataset(data)
    features, kept, _ = dspt.encode_images(clip, test_items, preprocess, base, "encoding test images")
    test = {"features": features, "labels": torch.tensor([test_items[i][1] for i in kept.tolist()]),
            "items": [test_items[i] for i in kept.tolist()]}
    with torch.no_grad():
        template = clip.encode_text(tokenizer.tokenize([prompt.format(c) for c in classnames]))
    zero_shot = {"test_accuracy": dspt.accuracy(clip.logits(test["features"], template), test["labels"]),
                 "text_similarity": mean_pairwise_cosine(template)}
    task = {"template": template, "preprocess": preprocess, "tokenizer": tokenizer, "prompt": prompt}
    print(f"zero-shot test accuracy {zero_shot['test_accuracy']:.1%} ({len(classnames)} classes, "
          f"{len(kept)} test images)")
    runs = []
    with open(Path(cache) / f"train-{mode}.log", "w") as log:
        for seed in SEEDS[mode]:
            for kind, rate in NOISE[mode]:
                args = dspt.parse_args(["--data", str(data), "--out", base.out, "--seed", str(seed),
                                        "--noise", str(rate), "--noise-kind", "sym" if kind == "clean" else kind,
                                        *TUNING])
                dspt.check_args(args)
                for method in METHODS:
                    run = {"method": method, "kind": kind, "rate": rate, "seed": seed,
                           **run_cell(method, clip, tokenizer, classnames, train_items, test, task, args, log)}
                    runs.append(run)
                    print(f"seed {seed}  {kind} {rate:.0%}  {method:8s} test accuracy {run['test_accuracy']:.1%}"
                          f"  ({run['seconds']:.1f}s)", flush=True)
        upl_runs = run_upl(mode, data, base.out, clip, preprocess, tokenizer, classnames, train_items, test,
                             task, log)
    return zero_shot, runs, upl_runs


def run_upl(mode, data, out, clip, preprocess, tokenizer, classnames, train_items, test, task, log):
    """UPL's pseudo-labels (the unsupervised setting PTNL discusses): zero-shot CLIP labels the
    whole training pool, the --shots most
    confident images of each predicted class are kept, and the prompt is tuned on those pseudo-labels
    (no given labels, no injected noise). The selection depends on no seed; the seeds vary the
    context's initialisation and the batches."""
    runs = []
    for seed in SEEDS[mode]:
        args = dspt.parse_args(["--data", str(data), "--out", out,
                                "--seed", str(seed), *TUNING])
        dspt.check_args(args)
        with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            items, pseudo, wrong, _ = baselines.pseudo_labelled_training_set(
                clip, preprocess, train_items, task["template"], args)
        for loss in UPL_LOSSES:
            run = {"method": "upl", "loss": loss, "seed": seed, "pool": len(train_items),
                   "train_images": len(items), "pseudo_label_accuracy": 1 - wrong.float().mean().item(),
                   **tune_and_evaluate(tune_with_loss(loss), clip, tokenizer, classnames, items, pseudo, wrong,
                                       test, task, args, log)}
            runs.append(run)
            print(f"seed {seed}  upl, {loss:4s} test accuracy {run['test_accuracy']:.1%} "
                  f"(pseudo-labels {run['pseudo_label_accuracy']:.1%} right)  ({run['seconds']:.1f}s)", flush=True)
    return runs


# -----------------------------------------------------------------------------
# Report: markdown tables and a plot.

def column_name(kind, rate):
    return "clean" if kind == "clean" else f"{kind} {rate:.0%}"


def cell(runs, method, kind, rate, key):
    """(mean, std) of key over the seeds' runs, or None."""
    values = [run[key] for run in runs
              if (run["method"], run["kind"], run["rate"]) == (method, kind, rate) and run[key] is not None]
    return (float(np.mean(values)), float(np.std(values))) if values else None


def table(runs, settings, key, scale=100, digits=1, zero_shot=None, methods=METHODS):
    """A markdown table of key: a row per method (and zero-shot's), a column per noise setting."""
    def number(value):
        return f"{scale * value:.{digits}f}"

    lines = ["| method | " + " | ".join(column_name(*setting) for setting in settings) + " |",
             "|---" * (len(settings) + 1) + "|"]
    if zero_shot is not None:  # the same in every column: it sees no training labels
        lines.append("| zero-shot | " + " | ".join([number(zero_shot[key])] * len(settings)) + " |")
    for method in methods:
        cells = [cell(runs, method, *setting, key) for setting in settings]
        lines.append(f"| {method} | " + " | ".join(
            "-" if c is None else f"{number(c[0])} ± {number(c[1])}" for c in cells) + " |")
    return "\n".join(lines)


def transport_table(runs, settings, method):
    """A method's last-epoch transport split: a row per diagnostic, a column per noise setting."""
    lines = [f"| {method} | " + " | ".join(column_name(*setting) for setting in settings) + " |",
             "|---" * (len(settings) + 1) + "|"]
    for name, key in [("recall", "ot_noisy_recall"), ("precision", "ot_noisy_precision"),
                      ("called clean", "ot_clean_fraction")]:
        cells = [cell(runs, method, *setting, key) for setting in settings]
        lines.append(f"| {name} | " + " | ".join(
            "-" if c is None else f"{100 * c[0]:.1f} ± {100 * c[1]:.1f}" for c in cells) + " |")
    return "\n".join(lines)


def upl_table(upl_runs):
    """UPL's runs: a row per loss, mean ± std over the seeds."""
    def mean_std(values, scale=100):
        return f"{scale * np.mean(values):.1f} ± {scale * np.std(values):.1f}"

    lines = ["| method | loss | test accuracy (%) | pseudo-label accuracy (%) | images (of pool) "
             "| memorisation (%) |", "|---" * 6 + "|"]
    for loss in UPL_LOSSES:
        rows = [run for run in upl_runs if run["loss"] == loss]
        memorised = [run["memorisation"] for run in rows if run["memorisation"] is not None]
        lines.append(f"| upl | {loss} | {mean_std([r['test_accuracy'] for r in rows])} "
                     f"| {mean_std([r['pseudo_label_accuracy'] for r in rows])} "
                     f"| {rows[0]['train_images']} of {rows[0]['pool']} "
                     f"| {mean_std(memorised) if memorised else '-'} |")
    return "\n".join(lines)


def markdown(report, runs):
    mode, settings, pre = report["mode"], NOISE[report["mode"]], report["pretraining"]
    noisy = [setting for setting in settings if setting[0] != "clean"]
    return f"""# Label-noise robustness on the stand-in world ({mode})

Stand-in CLIP pretrained {PRETRAINING[mode]['steps']} steps of {PRETRAINING[mode]['batch_size']} captioned \
images; final logit scale {pre['logit_scale']:.1f}. Zero-shot accuracy with "a photo of a {{}}.": \
**{report['zero_shot']['test_accuracy']:.1%}** on the shifted downstream test images (10 classes, chance \
10%), {report['zero_shot_like_pretraining']:.1%} on images drawn as in pretraining. Prompt tuning: 16 shots \
per class, dspt.py's defaults (16 context vectors, 50 epochs, SGD lr 0.002), no augmentation. \
Rows ce, gce, mae, dspt: CoOp with that loss; prograd: ProGrad with cross-entropy as its domain loss \
(lambda 1), its context started from "a photo of a" after 12 zero vectors, 50 epochs (under DSPT's protocol; \
the paper trains 200); nlprompt: NLPrompt; visprompt, anprompt: VisPrompt and ANPrompt as reconstructed in \
baselines.py (ANPrompt with cross-entropy). Mean ± std over seeds {", ".join(map(str, SEEDS[mode]))}.

## Test accuracy (%)

{table(runs, settings, "test_accuracy", zero_shot=report["zero_shot"])}

## Memorisation: last-epoch training accuracy (%) of the wrongly labelled samples, against their wrong labels

{table(runs, noisy, "memorisation")}

## Noisy-to-clean ratio of the mean per-sample gradient norm |dL/dz|, summed over the epochs

{table(runs, noisy, "gradient_ratio", scale=1, digits=2)}

For prograd the norms are of cross-entropy's gradient with respect to the logits, before ProGrad \
projects the context's gradient; for nlprompt, of each sample's loss as the epoch's transport split \
gives it (cross-entropy if called clean, MAE otherwise).

## Mean cosine similarity between the classes' text features after tuning (1: all prompts alike)

{table(runs, settings, "text_similarity", scale=1, digits=2, zero_shot=report["zero_shot"])}

## NLPrompt's transport split at the last epoch: the wrongly labelled samples it flags (recall, %) \
and the flagged samples whose labels are wrong (precision, %); \
the fraction of all samples it calls clean

{transport_table(runs, noisy, "nlprompt")}

VisPrompt's split, on its image-conditioned prompts:

{transport_table(runs, noisy, "visprompt")}

## Milliseconds per training epoch (5 steps of 32 images; the same machine and thread count)

{table(runs, settings, "epoch_seconds", scale=1000, digits=0)}

## UPL: no labels; zero-shot pseudo-labels for the whole training pool, the {TUNING[1]} \
most confident per predicted class kept; tuned 50 epochs as above

{upl_table(report["upl_runs"])}

Memorisation: last-epoch training accuracy of the images with wrong pseudo-labels, against those labels. \
The selection depends on no seed; the seeds vary the context's initialisation and the batches.

Wall-clock: pretraining {pre['seconds']:.0f} s{' (cached by an earlier run)' if pre['cached'] else ''}, \
{len(runs)} + {len(report['upl_runs'])} (UPL) tuning runs {report['grid_seconds']:.0f} s, the whole command \
{report['seconds']:.0f} s, on \
{report['cpus']} CPUs with {report['threads']} torch thread(s); load average (1 min) {report['load'][0]:.1f} \
at the start, {report['load'][1]:.1f} at the end.
"""


def plot(report, runs, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    settings = NOISE[report["mode"]]
    kinds = [k for k in ("sym", "pair") if any(s[0] == k for s in settings)]
    figure, axes = plt.subplots(1, len(kinds), figsize=(5 * len(kinds), 3.8), sharey=True, squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        points = [s for s in settings if s[0] in ("clean", kind)]
        for method in METHODS:
            means, stds = zip(*(cell(runs, method, *s, "test_accuracy") for s in points))
            ax.errorbar([100 * s[1] for s in points], 100 * np.array(means), yerr=100 * np.array(stds),
                        marker="o", capsize=3, label=method)
        ax.axhline(100 * report["zero_shot"]["test_accuracy"], color="grey", linestyle="--", label="zero-shot")
        ax.set(title=f"{kind} noise", xlabel="noise rate (%)", xticks=[100 * s[1] for s in points])
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("test accuracy (%)")
    axes[0][-1].legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


# -----------------------------------------------------------------------------
# main

def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Label-noise benchmark of dspt.py's prompt tuning on a "
                                                 "small CLIP pretrained on a procedurally drawn world.")
    add = parser.add_argument
    add("--quick", action="store_true", help="shorter pretraining, one seed, noise none/sym 50%%/pair 50%%")
    add("--out", metavar="DIR", help="where noise.md, noise.png and noise.json go "
                                     "(default bench/results, or bench/out/quick with --quick)")
    add("--cache", default=str(HERE / "cache"), metavar="DIR",
        help="pretrained model, downstream images and training logs (default %(default)s)")
    add("--bpe", metavar="PATH", help="the tokenizer's bpe_simple_vocab_16e6.txt.gz; env DSPT_BPE "
                                      "(default: downloaded by dspt.py)")
    add("--threads", type=int, default=1,
        help="torch CPU threads: on an idle machine 2 pretrain about 20%% faster, but on one shared with "
             "other jobs more threads than free cores are several times slower (default %(default)s)")
    return parser.parse_args(argv)


def main(argv=None):
    """Run the benchmark; returns the report (also written to --out as noise.json)."""
    args = parse_args(argv)
    mode = "quick" if args.quick else "full"
    out = Path(args.out or (HERE / "out" / "quick" if args.quick else HERE / "results"))
    torch.set_num_threads(args.threads)
    start, load_start = time.time(), os.getloadavg()[0]
    tokenizer = dspt.load_tokenizer(args.bpe)
    checkpoint, pretraining = pretrained_clip(mode, tokenizer, args.cache)
    clip, preprocess = dspt.load_clip(str(checkpoint))
    data = downstream_task(args.cache)
    grid_start = time.time()
    zero_shot, runs, upl_runs = run_grid(mode, data, clip, preprocess, tokenizer, args.cache)
    report = {"mode": mode, "pretraining": pretraining, "zero_shot": zero_shot,
              "zero_shot_like_pretraining": zero_shot_like_pretraining(clip, tokenizer, "a photo of a {}."),
              "grid_seconds": time.time() - grid_start, "seconds": time.time() - start,
              "load": [load_start, os.getloadavg()[0]], "cpus": os.cpu_count(), "threads": args.threads,
              "model": MODEL, "pretraining_settings": PRETRAINING[mode], "downstream": DOWNSTREAM,
              "tuning": TUNING, "noise": NOISE[mode], "seeds": SEEDS[mode], "runs": runs, "upl_runs": upl_runs}
    out.mkdir(parents=True, exist_ok=True)
    (out / "noise.md").write_text(markdown(report, runs))
    plot(report, runs, out / "noise.png")
    (out / "noise.json").write_text(json.dumps(report, indent=1))
    print(f"wrote {out / 'noise.md'}, {out / 'noise.png'} and {out / 'noise.json'} in {report['seconds']:.0f}s")
    return report


if __name__ == "__main__":
    try:
        main()
    except dspt.UserError as e:
        print(f"noise: error: {e}", file=sys.stderr)
        raise SystemExit(1)
