"""
Noise robustness of prompt tuning, measured end to end on a stand-in for CLIP pretrained here.

The claim under test is about behaviour: under label noise, cross-entropy prompt tuning drifts
away from CLIP's zero-shot prior while DSPT holds. OpenAI's weights cannot be fetched everywhere,
so this file builds a small world in which the whole path runs on a CPU in minutes, and uses
dspt.py's own code for everything (model classes, tokenizer, data loading, few-shot sampling,
label noise, prompt learner, losses, training loop, evaluation).

The world. 32x32 RGB images of one object: a shape (ten, from circle to heart), a colour (eight),
a size (small, medium, large), a fill (plain, striped or spotted), a position, and a background
with a tint (eight, named apart from the colours: "navy", "olive", ...), a pattern (plain,
striped, checkered) and four small specks of any colour, which no caption names. Each image has
a caption in words, like web alt-text: it names the shape nine times in ten and each other
attribute often, in varied phrasings ("a photo of a small red star on a navy striped
background.", "clip art of a large spotted ring in the top left", "heart, blue, small"). The
real BPE tokenizes the captions. Two correlations of web data are built in: each shape has six of
the eight colours (never the two of HELD_OUT), and two usual background tints that it has in half
of its images.

Pretraining. dspt.CLIP in miniature: a ModifiedResNet (RN50's design, one bottleneck per stage,
width 16), a 2-layer text transformer of width 128, 256-dimensional embeddings; trained
contrastively on freshly drawn batches with the logit scale raised from CLIP's initial 1/0.07 to
CLIP's 100 over the first half of the steps and then held there (a schedule, not a learnt
parameter). Captions here repeat, where CLIP's are nearly all different, so a second term of the
same loss between the batch's images and themselves keeps apart the images that one caption
describes, as CLIP's are kept apart. Seeded, and cached in --cache.

Two downstream tasks, PNG files in class folders (50 training images per class, the few-shot
pool, and 50 or 100 test images per class):
- near (like Caltech101): 40 classes, each a shape in one of its pretraining colours ("red star"),
  drawn as in pretraining except that every tint is equally likely with every shape. Zero-shot
  CLIP is confident and mostly right; what the spurious tints cost it, prompt tuning can win back.
- far (like DTD or EuroSAT): the 10 shapes on a background pretraining never showed (grey, pixel
  noise and three larger specks), each in a colour its shape never had there, and turned up to
  0.8 radians either way (0.3 in pretraining).

The grid, each cell run as dspt.py runs one: 16 shots per class, label noise from
dspt.inject_label_noise (none; symmetric or pair at 25, 50, 75%), the prompt learner's 16 context
vectors from N(0, 0.02), SGD at lr 0.002, batch 32: dspt.py's defaults, except that there is no
augmentation (--no-augment), because CoOp's random resized crop (scale 0.08-1) would often cut the
object out of a 32-pixel image, and that the runs are 25 epochs (dspt.py's 50 halved, to fit the
grid in about half an hour on two cores; after epoch 16 the mean test accuracy curves move by
about a point at most, cross-entropy's under pair noise by up to 3).
Five seeds; the mean, sample std and 95% t-interval of each cell. At 50% symmetric and 50% pair
noise the losses also record the clean test accuracy and the fit of the wrong labels after every
epoch (the memorisation curves). Beside the methods, "free class vectors" (free_class_vectors)
measures what any classifier of CoOp's form could fit on the frozen image features;
bench/memorisation.py asks whether those features or the prompt's form keep CoOp from fitting more.

The methods: CoOp's prompt tuning with each of dspt.py's losses (ce, gce, mae, dspt), and the peers
of baselines.py at the same cells: ProGrad with cross-entropy as its domain loss (lambda 1) and its
published initialisation ("a photo of a" after 12 zero vectors), trained 25 epochs where the
paper trains 200; and NLPrompt (optimal transport splits the samples; CE on the clean, MAE on the
rest); VisPrompt and ANPrompt as baselines.py reconstructs them (ANPrompt with cross-entropy).
VisPrompt is too slow for the near task on a CPU (NOT_RUN): the grid times one epoch of it, and a
separate --slow pass runs it and adds it to the report. UPL's pseudo-labelling has no labels,
hence no noise axis: zero-shot CLIP pseudo-labels the whole pool, the 16 most confident per
predicted class are kept, and the prompt is tuned on them with the dspt loss and with ce; it gets
its own table.

    python bench/noise.py --bpe path/to/bpe_simple_vocab_16e6.txt.gz   # or set $DSPT_BPE
    python bench/noise.py --quick     # shorter pretraining, 5 epochs, one seed, noise none and sym 50%
    python bench/noise.py --slow      # after the grid: VisPrompt on the near task, added to its report

Writes noise.md (tables), noise.png (accuracy against noise rate), noise-curves.png (the
memorisation curves) and noise.json (every run) into --out. Delete --cache to pretrain again.
"""

import argparse
import concurrent.futures
import contextlib
import hashlib
import inspect
import json
import math
import multiprocessing
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
import prepare_data  # noqa: E402

HERE = Path(__file__).resolve().parent

# -----------------------------------------------------------------------------
# The world: attributes, images drawn from them, and captions.

RES, SUPERSAMPLE = 32, 2  # images are drawn at 64x64 and averaged down, for smooth edges
SHAPES = ["circle", "square", "triangle", "diamond", "hexagon", "star", "cross", "ring", "crescent", "heart"]
COLOURS = {"red": (215, 35, 35), "orange": (240, 135, 20), "yellow": (235, 215, 40), "green": (35, 165, 55),
           "blue": (35, 75, 215), "purple": (135, 45, 185), "pink": (240, 125, 185), "white": (240, 240, 240)}
COLOUR_RGB = np.array(list(COLOURS.values()), dtype=np.float32)
TEXTURES = ["plain", "striped", "spotted"]
CLUTTER = 4  # specks scattered over every background
SIZES = {"small": (5, 6.5), "medium": (7.5, 9), "large": (10, 12.5)}  # radius in pixels
BACKGROUNDS = ["plain", "striped", "checkered", "speckled"]  # speckled: the far task only
TINTS = {"black": (25, 25, 25), "grey": (128, 128, 128), "brown": (115, 75, 40), "beige": (220, 205, 165),
         "navy": (25, 35, 95), "teal": (30, 120, 120), "olive": (110, 110, 35), "maroon": (110, 25, 45)}
USUAL_TINTS, USUAL_TINT_CHANCE = np.array([[s % 8, (s + 5) % 8] for s in range(10)]), 0.5
TINT_RGB = np.array(list(TINTS.values()), dtype=np.float32)  # the backgrounds' colours, named apart from COLOURS
HELD_OUT = [{s % 8, (s + 3) % 8} for s in range(len(SHAPES))]  # colours shape s never has in pretraining
PRETRAINING_COLOURS = np.array([[c for c in range(8) if c not in HELD_OUT[s]] for s in range(len(SHAPES))])
FAR_COLOURS = np.array([sorted(HELD_OUT[s]) for s in range(len(SHAPES))])
# The near task: 40 classes, each a shape in one of four of its pretraining colours ("red star").
NEAR_CLASSES = [(s, c) for s in range(len(SHAPES)) for c in PRETRAINING_COLOURS[s][:4]]
POSITIONS = [["in the top left", "at the top", "in the top right"],
             ["on the left", "in the center", "on the right"],
             ["in the bottom left", "at the bottom", "in the bottom right"]]
PREFIXES = ["a photo of", "a picture of", "an image of", "a drawing of", "clip art of", ""]


def classnames(task):
    """The classes of a task (None: the shapes, as pretraining's captions name them)."""
    return [f"{list(COLOURS)[c]} {SHAPES[s]}" for s, c in NEAR_CLASSES] if task == "near" else list(SHAPES)


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


def sample_attributes(rng, n, task=None, label=None):
    """n images' attributes: as in pretraining (task None), or the near or the far task's, whose
    attribute "label" is the class: a shape in one of its colours (near), or a shape on a speckled
    background pretraining never showed, in a colour it never had there in a fraction of the
    images (far). label: the classes to draw (random if None)."""
    if label is None:
        label = rng.integers(0, len(classnames(task)), n)
    if task == "near":
        shape, colour = np.array(NEAR_CLASSES)[label].T
    else:
        shape, colour = label, PRETRAINING_COLOURS[label, rng.integers(0, PRETRAINING_COLOURS.shape[1], n)]
        if task == "far":  # a shape's colour is one pretraining never gave it, in this fraction of the images
            unusual = rng.random(n) < TASKS["far"]["unusual_colour"]
            colour = np.where(unusual, FAR_COLOURS[label, rng.integers(0, FAR_COLOURS.shape[1], n)], colour)
    size = rng.integers(0, len(SIZES), n)
    radius = np.array(list(SIZES.values()))[size, 0] + rng.random(n) * np.ptp(list(SIZES.values()), axis=1)[size]
    return {"shape": shape, "colour": colour, "label": label,
            "size": size, "radius": radius, "texture": rng.integers(0, len(TEXTURES), n),
            "x": rng.uniform(radius + 0.5, RES - radius - 0.5), "y": rng.uniform(radius + 0.5, RES - radius - 0.5),
            "angle": rng.uniform(-0.3, 0.3, n),
            "background": np.full(n, 3) if task == "far" else rng.integers(0, 3, n),
            "tint": tints(rng, shape, task)}


def tints(rng, shape, task):
    """Background tints: in pretraining a shape's USUAL_TINTS in USUAL_TINT_CHANCE of its images
    (a spurious correlation, as boats are usually on water), any tint in the downstream tasks."""
    n = len(shape)
    anyone = rng.integers(0, len(TINTS), n)
    if task is not None:
        return anyone
    usual = USUAL_TINTS[shape, rng.integers(0, USUAL_TINTS.shape[1], n)]
    return np.where(rng.random(n) < USUAL_TINT_CHANCE, usual, anyone)


def draw_backgrounds(kind, tint, X, Y, rng):
    """[n, R, R, 3] float backgrounds of the given kinds (indices into BACKGROUNDS) and tints
    (indices into TINTS); the speckled ones are grey whatever their tint."""
    n, size = len(kind), X.shape[-1]
    base = (TINT_RGB[tint] + rng.uniform(-15, 15, (n, 3))).astype(np.float32)[:, None, None, :]
    period = rng.uniform(3, 6, (n, 1, 1)).astype(np.float32)
    direction = rng.integers(0, 3, (n, 1, 1))
    stripes = np.where(direction == 0, X, np.where(direction == 1, Y, X + Y)) // period % 2 == 1
    checks = (X // period + Y // period) % 2 == 1
    on = np.where((kind == 1)[:, None, None], stripes, checks & (kind == 2)[:, None, None])
    out = np.where(on[..., None], 0.55 * base + 20, base) * np.ones((1, size, size, 1), np.float32)
    rows = np.flatnonzero(kind == 3)  # speckled: grey, pixel noise and three coloured specks
    grey = rng.uniform(80, 150, (len(rows), 1)) + rng.uniform(-15, 15, (len(rows), 3))
    noise = rng.normal(0, 10, (len(rows), RES, RES, 3)).astype(np.float32)
    speckled = grey.astype(np.float32)[:, None, None, :] + noise.repeat(SUPERSAMPLE, 1).repeat(SUPERSAMPLE, 2)
    for _ in range(3):
        x, y, r = (rng.uniform(*bounds, (len(rows), 1, 1)) for bounds in ((0, RES), (0, RES), (0.8, 2.2)))
        speck = (np.hypot(X - x, Y - y) < r)[..., None]
        speckled = np.where(speck, COLOUR_RGB[rng.integers(0, 8, len(rows))][:, None, None, :], speckled)
    out[rows] = speckled
    return out.astype(np.float32)


def render(attributes, rng):
    """uint8 images [n, RES, RES, 3] of the attributes."""
    n, size = len(attributes["shape"]), RES * SUPERSAMPLE
    grid = (np.arange(size, dtype=np.float32) + 0.5) / SUPERSAMPLE
    X, Y = grid[None, None, :], grid[None, :, None]  # pixel coordinates, broadcast to [n, R, R]
    column = {key: value[:, None, None].astype(np.float32) for key, value in attributes.items()}
    images = draw_backgrounds(attributes["background"], attributes["tint"], X, Y, rng)
    for _ in range(CLUTTER):  # small specks of any colour: detail that no caption names
        x, y, r = (rng.uniform(*bounds, (n, 1, 1)) for bounds in ((0, RES), (0, RES), (0.6, 1.4)))
        speck = (np.hypot(X - x, Y - y) < r)[..., None]
        images = np.where(speck, COLOUR_RGB[rng.integers(0, len(COLOURS), n)][:, None, None, :], images)
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


CAPTION = dict(size=0.7, colour=0.8, texture=0.6, position=0.6, background=0.8)  # how often each is named


def caption(attributes, i, rng):
    """Alt-text for image i: the shape most of the time, other attributes now and then."""
    adjectives = [word for word, chance in [(list(SIZES)[attributes["size"][i]], CAPTION["size"]),
                                            (list(COLOURS)[attributes["colour"][i]], CAPTION["colour"]),
                                            (TEXTURES[attributes["texture"][i]], CAPTION["texture"])]
                  if word != "plain" and rng.random() < chance]
    noun = SHAPES[attributes["shape"][i]] if rng.random() < 0.9 else "shape"
    if rng.random() < 0.15:  # a list of tags
        return ", ".join([noun, *adjectives])
    row, column = (min(2, int(3 * attributes[axis][i] / RES)) for axis in ("y", "x"))  # thirds of the image
    extras = [phrase for phrase, chance in [
        (POSITIONS[row][column], CAPTION["position"]),
        (background(attributes, i, rng), CAPTION["background"])] if rng.random() < chance]
    phrase = " ".join([*adjectives, noun])
    words = [PREFIXES[rng.integers(len(PREFIXES))], "an" if phrase[0] in "aeiou" else "a", phrase, *extras]
    return " ".join(word for word in words if word) + ("." if rng.random() < 0.5 else "")


def background(attributes, i, rng):
    """The background in words: its tint, its pattern, or both ("on a navy striped background")."""
    tint, pattern = list(TINTS)[attributes["tint"][i]], BACKGROUNDS[attributes["background"][i]]
    words = [word for word, chance in [(tint, 0.8), (pattern, 0.0 if pattern == "plain" else 0.8)]
             if rng.random() < chance]
    phrase = " ".join(words or [tint])
    return f"on {'an' if phrase[0] in 'aeiou' else 'a'} {phrase} background"


def to_tensor(images):
    """What dspt.image_transform makes of RES-pixel images: [n, 3, RES, RES], CLIP-normalised."""
    mean, std = torch.tensor(dspt.CLIP_MEAN).view(3, 1, 1), torch.tensor(dspt.CLIP_STD).view(3, 1, 1)
    return ((torch.from_numpy(images).permute(0, 3, 1, 2) / 255 - mean) / std).contiguous()


# -----------------------------------------------------------------------------
# Pretraining a small CLIP contrastively on the world's captioned images.

MODEL = dict(embed_dim=256, image_resolution=RES, vision_layers=(1, 1, 1, 1), vision_width=16,
             vision_patch_size=None, context_length=77, vocab_size=49408,
             transformer_width=128, transformer_heads=2, transformer_layers=2)
PRETRAINING = {"full": dict(steps=3000, batch_size=128, lr=1e-3, warmup=100, scale_ramp=0.5, seed=0,
                            instance_weight=1.0, instance_scale=10.0),
               "quick": dict(steps=300, batch_size=128, lr=1e-3, warmup=100, scale_ramp=0.5, seed=0,
                             instance_weight=1.0, instance_scale=10.0)}


def initialise(clip):
    """CLIP's initialisation of the token embedding and the text transformer."""
    nn_init, width, layers = torch.nn.init, clip.transformer.width, clip.transformer.layers
    nn_init.normal_(clip.token_embedding.weight, std=0.02)
    for block in clip.transformer.resblocks:
        nn_init.normal_(block.attn.in_proj_weight, std=width ** -0.5)
        nn_init.normal_(block.attn.out_proj.weight, std=(2 * layers * width) ** -0.5)
        nn_init.normal_(block.mlp.c_fc.weight, std=(2 * width) ** -0.5)
        nn_init.normal_(block.mlp.c_proj.weight, std=(2 * layers * width) ** -0.5)


def contrastive(logits):
    """CLIP's symmetric loss on a batch's [n, n] similarities, whose diagonal pairs belong together."""
    targets = torch.arange(len(logits))
    return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2


def pretraining_loss(clip, images, tokens, settings):
    """One batch's loss: CLIP's contrastive loss between the images and their captions, plus
    instance_weight times the same loss between the images and themselves at scale instance_scale.
    Captions here repeat, where CLIP's web captions are nearly all different; this second term keeps
    apart the images that one caption describes, as CLIP's are kept apart."""
    image_features = F.normalize(clip.encode_image(images), dim=-1)
    text_features = F.normalize(clip.encode_text(tokens), dim=-1)
    loss = contrastive(clip.logit_scale.exp() * image_features @ text_features.T)
    similarity = settings["instance_scale"] * image_features @ image_features.T
    return loss + settings["instance_weight"] * contrastive(similarity)


def pretrain(settings, tokenizer):
    """A CLIP trained with pretraining_loss on freshly drawn batches; (model, stats)."""
    torch.manual_seed(settings["seed"])
    rng = np.random.default_rng(settings["seed"])
    clip = dspt.CLIP(**MODEL)
    initialise(clip)
    clip.logit_scale.requires_grad_(False)  # not learnt: set by the schedule below
    decayed = {name for name, p in clip.named_parameters() if p.ndim >= 2 and "embedding" not in name}
    optimizer = torch.optim.AdamW(
        [{"params": [p for name, p in clip.named_parameters() if name in decayed], "weight_decay": 0.1},
         {"params": [p for name, p in clip.named_parameters() if name not in decayed and p.requires_grad],
          "weight_decay": 0.0}],
        lr=settings["lr"], betas=(0.9, 0.98), eps=1e-6, fused=True)
    steps, start, losses = settings["steps"], time.time(), []
    for step in range(steps):
        warmup = min(1.0, (step + 1) / settings["warmup"])
        for group in optimizer.param_groups:
            group["lr"] = settings["lr"] * warmup * 0.5 * (1 + math.cos(math.pi * step / steps))
        ramp = min(1.0, step / (settings["scale_ramp"] * steps))  # 1/0.07 up to CLIP's 100, then held
        clip.logit_scale.fill_(math.log(1 / 0.07) + ramp * (math.log(100) - math.log(1 / 0.07)))
        attributes = sample_attributes(rng, settings["batch_size"])
        images = to_tensor(render(attributes, rng))
        tokens = tokenizer.tokenize([caption(attributes, i, rng) for i in range(len(images))])
        loss = pretraining_loss(clip, images, tokens, settings)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
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


WORLD = (RES, SUPERSAMPLE, SHAPES, COLOURS, TEXTURES, CLUTTER, SIZES, BACKGROUNDS, TINTS, USUAL_TINTS,
         USUAL_TINT_CHANCE, tints, HELD_OUT, NEAR_CLASSES, shape_mask, sample_attributes, draw_backgrounds, render)


def pretrained_clip(mode, tokenizer, cache):
    """(checkpoint path, pretraining stats), pretraining first unless the cache has it."""
    settings = PRETRAINING[mode]
    digest = fingerprint(*WORLD, caption, CAPTION, background, MODEL, settings, initialise, contrastive,
                         pretraining_loss, pretrain)
    path = Path(cache) / f"clip-{mode}-{digest}.pt"
    stats_path = path.with_suffix(".json")
    if path.is_file() and stats_path.is_file():
        return path, {**json.loads(stats_path.read_text()), "cached": True}
    clip, stats = pretrain(settings, tokenizer)
    dspt.atomic_write(path, lambda f: torch.save(clip.state_dict(), f))
    dspt.atomic_write(stats_path, lambda f: f.write(json.dumps(stats).encode()))
    return path, {**stats, "cached": False}


# -----------------------------------------------------------------------------
# The downstream task: PNG files in dspt.py's train/ and test/ class-folder layout.

TASKS = {"near": dict(train_per_class=50, test_per_class=50, seed=2024, unusual_tint=True),
         "far": dict(train_per_class=50, test_per_class=100, seed=2025, unusual_colour=1.0, turn=0.8)}


def task_attributes(rng, task, label):
    """The attributes of a task's images of the given classes: sample_attributes', then the
    task's own shifts from pretraining (TASKS)."""
    settings, n = TASKS[task], len(label)
    attributes = sample_attributes(rng, n, task, label)
    if settings.get("unusual_tint"):  # on a tint other than its shape's USUAL_TINTS
        others = np.array([[t for t in range(len(TINTS)) if t not in USUAL_TINTS[s]] for s in range(len(SHAPES))])
        attributes["tint"] = others[attributes["shape"], rng.integers(0, others.shape[1], n)]
    if settings.get("turn"):  # turned up to this many radians either way, where pretraining turns 0.3 at most
        attributes["angle"] = rng.uniform(-settings["turn"], settings["turn"], n)
    return attributes


def downstream_task(cache, task):
    """The task's folder, drawn once: train/<class>/ (the few-shot pool) and test/<class>/, the
    same number of images in every class."""
    settings, names = TASKS[task], classnames(task)
    root = Path(cache) / f"{task}-{fingerprint(*WORLD, settings, task_attributes)}"
    if root.is_dir():
        return root
    rng = np.random.default_rng(settings["seed"])
    partial = root.with_name(root.name + ".part")
    shutil.rmtree(partial, ignore_errors=True)
    for split in ("train", "test"):
        label = np.repeat(np.arange(len(names)), settings[f"{split}_per_class"])
        attributes = task_attributes(rng, task, rng.permutation(label))
        for i, image in enumerate(render(attributes, rng)):
            path = partial / split / names[attributes["label"][i]].replace(" ", "_") / f"{i:04d}.png"
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
# The grid: task x seed x noise setting x method, each cell one prompt tuning run.

TUNING = ["--shots", "16", "--n-ctx", "16", "--lr", "0.002", "--batch-size", "32",
          "--no-augment", "--workers", "0", "--device", "cpu"]
EPOCHS = {"full": 25, "quick": 5}  # dspt.py's 50 halved, for the time budget
NOISE = {"full": [("clean", 0.0)] + [(kind, rate) for kind in ("sym", "pair") for rate in (0.25, 0.5, 0.75)],
         "quick": [("clean", 0.0), ("sym", 0.5)]}
SEEDS = {"full": [1, 2, 3, 4, 5], "quick": [1]}
LOSS_METHODS = ["ce", "gce", "mae", "dspt"]
CURVES = [("sym", 0.5), ("pair", 0.5)]  # the settings whose per-epoch curves are recorded, for the LOSS_METHODS


def tune_with_loss(loss):
    """CoOp's prompt tuning with one of dspt.py's losses."""
    def tune(learner, items, labels, noisy, args, task):
        method = dspt.PromptTuning(learner, dspt.LOSSES[loss], dspt.grad_scaler(args))
        if task.get("curve"):
            method.epoch_record = task["curve"]
        return dspt.train(method, items, labels, noisy, args)
    return tune


def tune_prograd(learner, items, labels, noisy, args, task):
    """ProGrad as published: cross-entropy as the domain loss, lambda 1 (its context starts from
    CONTEXT_INIT)."""
    scaler = dspt.grad_scaler(args)
    method = baselines.ProGrad(learner, dspt.LOSSES["ce"], task["template"], scaler, strength=1.0)
    return dspt.train(method, items, labels, noisy, args)


def tune_with_transport(method_class):
    """NLPrompt (CE on the samples optimal transport calls clean, MAE on the rest) or VisPrompt
    (the same split on image-conditioned prompts, GCE on the rest); no choice of loss."""
    def tune(learner, items, labels, noisy, args, task):
        method = method_class(learner, *task["train_features"], labels, noisy)
        task["method"] = method  # for the evaluation: VisPrompt's logits are its own
        return dspt.train(method, items, labels, noisy, args)
    return tune


def tune_anprompt(learner, items, labels, noisy, args, task):
    """ANPrompt as reconstructed in baselines.py, with cross-entropy as published."""
    noise = baselines.noise_prompts(learner.clip, task["tokenizer"], learner.classnames, task["prompt"],
                                    len(learner.ctx))
    method = baselines.ANPrompt(learner, noise, dspt.LOSSES["ce"])
    task["method"] = method  # for the evaluation: through the prompted image encoder
    return dspt.train(method, items, labels, noisy, args)


# A method turns (learner, items, given labels, mask of wrong ones, args, task) into dspt.train's
# history; task holds what the peers need besides: zero-shot CLIP's text features ("template"),
# the image transform ("preprocess"), and for the losses at CURVES an epoch_record ("curve").
METHODS = {**{loss: tune_with_loss(loss) for loss in LOSS_METHODS},
           "prograd": tune_prograd, "nlprompt": tune_with_transport(baselines.NLPrompt),
           "visprompt": tune_with_transport(baselines.VisPrompt), "anprompt": tune_anprompt}
# The context's initial words, where a method publishes one (after zero vectors up to --n-ctx 16).
CONTEXT_INIT = {"prograd": "a photo of a"}
# UPL's pseudo-labelling has no labels, hence no noise axis: its own small grid, over these losses.
UPL_LOSSES = ["dspt", "ce"]
# Cells too slow for this benchmark's budget on a CPU: VisPrompt encodes every class's prompt anew
# for every image, 40 text-encoder passes per image on the near task. Timed for one epoch instead.
NOT_RUN = {("near", "visprompt")}


def tune_and_evaluate(method, clip, task, items, labels, noisy, args, log, ctx_init="", curve=False):
    """Train a fresh prompt learner on (items, labels) with method; the summary of its outcome.
    curve: record the clean test accuracy after every epoch."""
    torch.manual_seed(args.seed)
    test = task["test"]
    learner = dspt.PackedPromptLearner(clip, task["classnames"], task["tokenizer"], args.n_ctx, ctx_init)
    start, cell = time.time(), dict(task)  # a method may leave itself in cell
    if curve:
        cell["curve"] = lambda epoch: {"test_accuracy": test_accuracy(clip, test, learner.text_features)}
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
                                                    "encoding test images", method.encode)[0]
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
    if curve:
        extra["curve"] = {"test_accuracy": [r["test_accuracy"] for r in history],
                          "memorisation": [r["train_accuracy_noisy"] for r in history],
                          "clean_fit": [r["train_accuracy_clean"] for r in history]}
    return {"test_accuracy": accuracy, "memorisation": history[-1]["train_accuracy_noisy"],
            "clean_fit": history[-1]["train_accuracy_clean"],
            "gradient_ratio": ratio, "text_similarity": mean_pairwise_cosine(text_features),
            "seconds": time.time() - start, "epoch_seconds": float(np.mean([r["seconds"] for r in history])), **extra}


BOUND = dict(steps=2000, lr=0.03)  # free_class_vectors' full-batch Adam


def free_class_vectors(task, clip, labels, noisy, steps=BOUND["steps"], lr=BOUND["lr"]):
    """What a classifier of CoOp's form could fit at best: one free unit vector per class in
    place of the prompts' text features (started from zero-shot's), trained with cross-entropy at
    CLIP's logit scale on the training images' features by full-batch Adam. Its last-step fit of
    the correctly labelled samples, memorisation of the wrongly labelled ones, and test accuracy."""
    features, kept = task["train_features"]
    labels, noisy = labels[kept], noisy[kept]
    vectors = task["template"].clone().requires_grad_(True)
    optimizer = torch.optim.Adam([vectors], lr=lr)
    for _ in range(steps):
        logits = clip.logits(features, vectors)
        loss = F.cross_entropy(logits, labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    correct = logits.argmax(dim=-1) == labels
    return {"clean_fit": correct[~noisy].float().mean().item(),
            "memorisation": correct[noisy].float().mean().item() if noisy.any() else None,
            "test_accuracy": test_accuracy(clip, task["test"], lambda: vectors.detach())}


@torch.no_grad()
def test_accuracy(clip, test, text_features):
    return dspt.accuracy(clip.logits(test["features"], text_features()), test["labels"])


def mean_pairwise_cosine(text_features):
    """How alike the class prompts are: 1 when the classifier has collapsed to one prompt."""
    normalised = F.normalize(text_features, dim=-1)
    similarity = normalised @ normalised.T
    return ((similarity.sum() - similarity.trace()) / (len(similarity) * (len(similarity) - 1))).item()


@torch.no_grad()
def confidence(logits, labels, bins=15):
    """How sure zero-shot predictions are: accuracy, mean top probability, the expected
    calibration error over equal-width bins (as the calibration papers compute it), and the
    quartiles of the top probability of the correct predictions."""
    top, predicted = logits.softmax(dim=-1).max(dim=-1)
    correct = (predicted == labels).float()
    bin_of = torch.clamp((top * bins).long(), max=bins - 1)
    ece = sum((bin_of == b).float().mean() * abs(correct[bin_of == b].mean() - top[bin_of == b].mean())
              for b in range(bins) if (bin_of == b).any())
    right = top[correct.bool()]
    return {"accuracy": correct.mean().item(), "mean_confidence": top.mean().item(), "ece": float(ece),
            "correct_top_probability_quartiles": torch.quantile(right, torch.tensor([0.25, 0.5, 0.75])).tolist(),
            "correct_above_0.9": (right > 0.9).float().mean().item(),
            "correct_above_0.5": (right > 0.5).float().mean().item()}


def prepare_task(name, data, clip, preprocess, tokenizer, base):
    """What every cell of a task shares: its dataset, test features and zero-shot outcome."""
    if not (Path(data) / "split.json").is_file():  # its train/ and test/ folders, as dspt.py reads them
        prepare_data.train_and_test_folders(Path(data))
    dataset = dspt.load_dataset(data)
    features, kept, _ = dspt.encode_images(clip, dataset.test, preprocess, base, f"encoding {name} test images")
    test = {"features": features, "labels": torch.tensor([dataset.test[i][1] for i in kept.tolist()]),
            "items": [dataset.test[i] for i in kept.tolist()]}
    with torch.no_grad():
        template = clip.encode_text(tokenizer.tokenize([dataset.template.format(c) for c in dataset.classnames]))
    logits = clip.logits(test["features"], template)
    zero_shot = {"test_accuracy": dspt.accuracy(logits, test["labels"]),
                 "text_similarity": mean_pairwise_cosine(template),
                 "confidence": confidence(logits, test["labels"]), "classes": len(dataset.classnames),
                 "test_images": len(kept), "pool": len(dataset.train)}
    print(f"{name}: zero-shot test accuracy {zero_shot['test_accuracy']:.1%} ({len(dataset.classnames)} classes, "
          f"{len(kept)} test images)", flush=True)
    return {"name": name, "data": data, "classnames": dataset.classnames, "train": dataset.train, "test": test,
            "template": template, "prompt": dataset.template, "preprocess": preprocess, "tokenizer": tokenizer,
            "zero_shot": zero_shot}


GRID = {}  # what the grid's worker processes share: filled before they fork


def run_job(job):
    """One job of the grid: every method at (task, seed, noise kind, rate); or UPL's runs at
    (task, seed) when the kind is "upl"; or, when it is "timing", one epoch of each NOT_RUN
    method of the task on clean labels. In a --slow pass (GRID["slow"]), the NOT_RUN methods only."""
    name, seed, kind, rate = job
    task, clip, mode = GRID["tasks"][name], GRID["clip"], GRID["mode"]
    torch.set_num_threads(GRID["threads"])
    args = dspt.parse_args(["--data", str(task["data"]), "--out", str(Path(GRID["cache"]) / "runs"),
                            "--seed", str(seed), "--epochs", str(1 if kind == "timing" else EPOCHS[mode]), *TUNING,
                            *(["--noise", str(rate), "--noise-kind", kind] if kind in ("sym", "pair") else [])])
    dspt.check_args(args)
    logs = Path(GRID["cache"]) / f"logs-{mode}"
    logs.mkdir(exist_ok=True)
    runs = []
    with open(logs / f"{name}-seed{seed}-{kind}{rate:g}{'-slow' if GRID['slow'] else ''}.log", "w") as log:
        if kind == "upl":
            return run_upl(task, clip, seed, args, log)
        items, labels, noisy, _ = dspt.noisy_few_shot(task["train"], len(task["classnames"]), args)
        with torch.random.fork_rng(devices=[]), contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            features, kept, _ = dspt.encode_images(clip, items, task["preprocess"], args, "encoding training images")
        task = {**task, "train_features": (features, kept)}  # for the transport split and the bound, encoded once
        if kind != "timing" and not GRID["slow"]:
            runs.append({"task": name, "kind": kind, "rate": rate, "seed": seed, "method": "free class vectors",
                         **free_class_vectors(task, clip, labels, noisy)})
        for method in METHODS:
            if ((name, method) in NOT_RUN) != (kind == "timing" or GRID["slow"]):
                continue
            curve = method in LOSS_METHODS and (kind, rate) in CURVES
            run = {"task": name, "method": method, "kind": kind, "rate": rate, "seed": seed,
                   **tune_and_evaluate(METHODS[method], clip, task, items, labels, noisy, args, log,
                                       CONTEXT_INIT.get(method, ""), curve)}
            runs.append(run)
            print(f"{name}  seed {seed}  {kind} {rate:.0%}  {method:9s} test accuracy {run['test_accuracy']:.1%}"
                  f"  ({run['seconds']:.1f}s)", flush=True)
    return runs


def run_upl(task, clip, seed, args, log):
    """UPL's pseudo-labels (the unsupervised setting PTNL discusses): zero-shot CLIP labels the
    whole training pool, the --shots most confident images of each predicted class are kept, and
    the prompt is tuned on those pseudo-labels (no given labels, no injected noise). The selection
    depends on no seed; the seeds vary the context's initialisation and the batches."""
    with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        items, pseudo, wrong, _ = baselines.pseudo_labelled_training_set(
            clip, task["preprocess"], task["train"], task["template"], args)
    runs = []
    for loss in UPL_LOSSES:
        run = {"task": task["name"], "method": "upl", "loss": loss, "seed": args.seed, "pool": len(task["train"]),
               "train_images": len(items), "pseudo_label_accuracy": 1 - wrong.float().mean().item(),
               **tune_and_evaluate(tune_with_loss(loss), clip, task, items, pseudo, wrong, args, log)}
        runs.append(run)
        print(f"{task['name']}  seed {args.seed}  upl, {loss:4s} test accuracy {run['test_accuracy']:.1%} "
              f"(pseudo-labels {run['pseudo_label_accuracy']:.1%} right)  ({run['seconds']:.1f}s)", flush=True)
    return runs


def run_grid(mode, tasks, clip, cache, seeds, jobs, threads, slow=False):
    """(the runs, UPL's runs, free_class_vectors' runs, the NOT_RUN methods' timing runs) over the
    tasks, the seeds, the mode's noise settings and the methods, in jobs worker processes of
    threads torch threads each; in a fixed order whatever the jobs. slow: the NOT_RUN cells only."""
    GRID.update(tasks=tasks, clip=clip, mode=mode, cache=cache, threads=threads, slow=slow)
    work = [(name, seed, kind, rate) for name in tasks for seed in seeds
            for kind, rate in [*NOISE[mode], ("upl", 0.0)]]
    if slow:
        work = [(name, seed, kind, rate) for name in tasks if any(task == name for task, _ in NOT_RUN)
                for seed in seeds for kind, rate in NOISE[mode]]
    elif mode == "full":
        work += [(name, seeds[0], "timing", 0.0) for name in tasks if any(task == name for task, _ in NOT_RUN)]
    if jobs == 1:
        results = [run_job(job) for job in work]
    else:  # forked workers inherit GRID; the slowest jobs (the many-class task's) go first
        with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("fork")) as pool:
            results = list(pool.map(run_job, work))
    runs = [run for result in results for run in result]

    def role(run):
        if run["method"] in ("upl", "free class vectors"):
            return run["method"]
        return "timing" if run["kind"] == "timing" else "tuned"
    return tuple([run for run in runs if role(run) == r] for r in ("tuned", "upl", "free class vectors", "timing"))


# -----------------------------------------------------------------------------
# Report: markdown tables and plots.

# Two-sided 95% quantiles of Student's t with n - 1 degrees of freedom, for intervals over n seeds.
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def column_name(kind, rate):
    return "clean" if kind == "clean" else f"{kind} {rate:.0%}"


def summary(values):
    """(mean, sample std, half-width of the 95% t-interval of the mean) over the seeds' values;
    std and interval are 0 for one value."""
    values = np.asarray(values, dtype=float)
    if len(values) == 1:
        return float(values[0]), 0.0, 0.0
    std = float(np.std(values, ddof=1))
    return float(np.mean(values)), std, T_975[len(values) - 1] * std / math.sqrt(len(values))


def cell(runs, task, method, kind, rate, key):
    """summary() of key over the seeds' runs of a cell, or None."""
    values = [run[key] for run in runs if (run["task"], run["method"], run["kind"], run["rate"]) ==
              (task, method, kind, rate) and run[key] is not None]
    return summary(values) if values else None


def tied_with_best(cells):
    """For each cell (mean, std, half-width) or None: whether it has the highest mean or its
    interval overlaps that of the cell with the highest mean."""
    best = max((c for c in cells if c is not None), key=lambda c: c[0])
    return [c is not None and (c is best or c[0] + c[2] >= best[0] - best[2]) for c in cells]


def table(runs, task, settings, key, scale=100, digits=1, zero_shot=None, methods=METHODS, intervals=False):
    """A markdown table of key: a row per method (and zero-shot's), a column per noise setting;
    with intervals, each cell also has its 95% interval, and the best method of each column and
    every method whose interval overlaps the best's are in bold."""
    def number(value):
        return f"{scale * value:.{digits}f}"

    def text(c, bold):
        if c is None:
            return "-"
        body = f"{number(c[0])} ± {number(c[1])}"
        if intervals:
            body += f" [{number(c[0] - c[2])}, {number(c[0] + c[2])}]"
        return f"**{body}**" if bold else body

    columns = [[cell(runs, task, method, *setting, key) for method in methods] for setting in settings]
    bold = [tied_with_best(cells) if intervals else [False] * len(cells) for cells in columns]
    lines = ["| method | " + " | ".join(column_name(*setting) for setting in settings) + " |",
             "|---" * (len(settings) + 1) + "|"]
    if zero_shot is not None:  # the same in every column: it sees no training labels
        lines.append("| zero-shot | " + " | ".join([number(zero_shot[key])] * len(settings)) + " |")
    for row, method in enumerate(methods):
        cells = [text(columns[c][row], bold[c][row]) for c in range(len(settings))]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def transport_table(runs, task, settings, method):
    """A method's last-epoch transport split: a row per diagnostic, a column per noise setting."""
    lines = [f"| {method} | " + " | ".join(column_name(*setting) for setting in settings) + " |",
             "|---" * (len(settings) + 1) + "|"]
    for name, key in [("recall", "ot_noisy_recall"), ("precision", "ot_noisy_precision"),
                      ("called clean", "ot_clean_fraction")]:
        cells = [cell(runs, task, method, *setting, key) for setting in settings]
        lines.append(f"| {name} | " + " | ".join(
            "-" if c is None else f"{100 * c[0]:.1f} ± {100 * c[1]:.1f}" for c in cells) + " |")
    return "\n".join(lines)


def curves_of(runs, task, method, kind, rate):
    return [run["curve"] for run in runs if run["task"] == task and run["method"] == method
            and (run["kind"], run["rate"]) == (kind, rate) and "curve" in run]


def curve_table(runs, task, kind, rate, epochs, every=5):
    """The losses' runs at (kind, rate), one of CURVES, mean over the seeds: clean test accuracy
    and the training accuracy of the mislabelled samples against their wrong labels, by epoch."""
    shown = sorted({1, *range(every, epochs + 1, every), epochs})
    lines = ["| loss | " + " | ".join(f"epoch {e}" for e in shown) + " |", "|---" * (len(shown) + 1) + "|"]
    for method in LOSS_METHODS:
        curves = curves_of(runs, task, method, kind, rate)
        if not curves:
            continue
        test = 100 * np.mean([c["test_accuracy"] for c in curves], axis=0)
        memorised = 100 * np.mean([c["memorisation"] for c in curves], axis=0)
        lines.append(f"| {method} | " + " | ".join(f"{test[e - 1]:.1f} / {memorised[e - 1]:.1f}" for e in shown) + " |")
    return "\n".join(lines)


def curve_sections(runs, task, settings, epochs):
    return "".join(f"### {task}: per-epoch curves at {column_name(*setting)}, mean over the seeds: clean test "
                   "accuracy / training accuracy of the mislabelled samples against their wrong labels (%)\n\n"
                   f"{curve_table(runs, task, *setting, epochs)}\n\n" for setting in CURVES if setting in settings)


def upl_table(upl_runs, task):
    """UPL's runs on a task: a row per loss, mean ± std over the seeds."""
    def mean_std(values, scale=100):
        mean, std, _ = summary(values)
        return f"{scale * mean:.1f} ± {scale * std:.1f}"

    lines = ["| method | loss | test accuracy (%) | pseudo-label accuracy (%) | images (of pool) "
             "| memorisation (%) |", "|---" * 6 + "|"]
    for loss in UPL_LOSSES:
        rows = [run for run in upl_runs if run["loss"] == loss and run["task"] == task]
        memorised = [run["memorisation"] for run in rows if run["memorisation"] is not None]
        lines.append(f"| upl | {loss} | {mean_std([r['test_accuracy'] for r in rows])} "
                     f"| {mean_std([r['pseudo_label_accuracy'] for r in rows])} "
                     f"| {rows[0]['train_images']} of {rows[0]['pool']} "
                     f"| {mean_std(memorised) if memorised else '-'} |")
    return "\n".join(lines)


# Published zero-shot CLIP on the full test sets: accuracy and expected calibration error (%), the
# "Baseline" rows of the results tables of A-TPT (Ahamed et al., ICLR 2026; github.com/
# MB-Shihab-Aaqil-Ahamed/A-TPT, README), RN50 and ViT-B/16.
PUBLISHED_CONFIDENCE = [("Caltech101", "RN50", 85.8, 4.33), ("Food101", "RN50", 74.0, 3.11),
                        ("DTD", "RN50", 40.0, 9.91), ("EuroSAT", "RN50", 23.7, 15.40),
                        ("Caltech101", "ViT-B/16", 92.9, 5.50), ("EuroSAT", "ViT-B/16", 41.3, 13.89)]


def confidence_table(report):
    lines = ["| task | classes | accuracy (%) | mean top probability (%) | ECE (%) "
             "| top probability of correct predictions: quartiles | correct with top probability > 0.5 / > 0.9 |",
             "|---" * 7 + "|"]
    for name, task in report["tasks"].items():
        c = task["zero_shot"]["confidence"]
        quartiles = " / ".join(f"{q:.2f}" for q in c["correct_top_probability_quartiles"])
        lines.append(f"| {name} (stand-in) | {task['zero_shot']['classes']} | {100 * c['accuracy']:.1f} "
                     f"| {100 * c['mean_confidence']:.1f} | {100 * c['ece']:.1f} | {quartiles} "
                     f"| {100 * c['correct_above_0.5']:.0f}% / {100 * c['correct_above_0.9']:.0f}% |")
    for name, backbone, accuracy, ece in PUBLISHED_CONFIDENCE:
        lines.append(f"| {name} (CLIP {backbone}, published) | | {accuracy} | | {ece} | | |")
    return "\n".join(lines)


def bound_table(bounds, task):
    """free_class_vectors' outcome: a row per figure, a column per noise setting it was run at."""
    settings = sorted({(run["kind"], run["rate"]) for run in bounds if run["task"] == task}, key=NOISE["full"].index)
    lines = ["| free class vectors | " + " | ".join(column_name(*setting) for setting in settings) + " |",
             "|---" * (len(settings) + 1) + "|"]
    for name, key in [("fit of the correctly labelled (%)", "clean_fit"),
                      ("memorisation of the wrongly labelled (%)", "memorisation"),
                      ("test accuracy (%)", "test_accuracy")]:
        cells = [cell(bounds, task, "free class vectors", *setting, key) for setting in settings]
        lines.append(f"| {name} | " + " | ".join(
            "-" if c is None else f"{100 * c[0]:.1f} ± {100 * c[1]:.1f}" for c in cells) + " |")
    return "\n".join(lines)


def not_run_note(report, runs, name):
    """Why a NOT_RUN method's row is empty, with the time one epoch of it took; or, once a --slow
    pass has run it, what that pass took."""
    notes = []
    if "slow" in report and any(task == name for task, _ in NOT_RUN):
        slow, methods = report["slow"], sorted(method for task, method in NOT_RUN if task == name)
        notes.append(f"{', '.join(methods)} ran on this task in a separate --slow pass: {slow['runs']} runs in "
                     f"{slow['seconds']:.0f} s ({slow['jobs']} worker process(es)).")
    for run in report["not_run"]:
        if run["task"] != name:
            continue
        ce = cell(runs, name, "ce", "clean", 0.0, "epoch_seconds")[0]
        epoch = (f"one epoch of {run['method']} took {run['epoch_seconds']:.1f} s (clean labels, seed {run['seed']}) "
                 f"against {ce:.2f} s for ce")
        if "slow" in report:
            notes.append(f"In the grid, {epoch}.")
            continue
        hours = run["epoch_seconds"] * EPOCHS["full"] * len(NOISE["full"]) * len(report["seeds"]) / 3600
        notes.append(f"{run['method']} is not run on this task: {epoch}, so its {len(NOISE['full'])} noise settings "
                     f"x {len(report['seeds'])} seeds x {EPOCHS['full']} epochs would take {hours:.1f} hours of one "
                     f"CPU worker (--slow runs them).")
    return " ".join(notes)


def task_sections(report, runs, name):
    mode, settings, task = report["mode"], NOISE[report["mode"]], report["tasks"][name]
    noisy = [setting for setting in settings if setting[0] != "clean"]
    return f"""## The {name} task: test accuracy (%)

{task['zero_shot']['classes']} classes, {task['zero_shot']['test_images']} clean test images. \
Mean ± std [95% interval of the mean] over seeds {", ".join(map(str, report["seeds"]))}; \
in bold, in each column, the best mean and every method whose interval overlaps the best's.

{table(runs, name, settings, "test_accuracy", zero_shot=task["zero_shot"], intervals=True)}

{not_run_note(report, runs, name)}

### {name}: training accuracy (%) of the correctly labelled samples at the last epoch (the fit)

{table(runs, name, settings, "clean_fit")}

### {name}: the most a classifier of CoOp's form could fit on these image features

One free unit vector per class in place of the prompts' text features, trained to convergence with \
cross-entropy at logit scale 100 on the same training samples (full-batch Adam, learning rate {BOUND['lr']}, \
{BOUND['steps']} steps, started from zero-shot's text features); mean ± std over the seeds.

{bound_table(report["bounds"], name)}

### {name}: memorisation, last-epoch training accuracy (%) of the wrongly labelled samples against their wrong labels

{table(runs, name, noisy, "memorisation")}

### {name}: noisy-to-clean ratio of the mean per-sample gradient norm |dL/dz|, summed over the epochs

{table(runs, name, noisy, "gradient_ratio", scale=1, digits=2)}

### {name}: mean cosine similarity between the classes' text features after tuning (1: all prompts alike)

{table(runs, name, settings, "text_similarity", scale=1, digits=2, zero_shot=task["zero_shot"])}

{curve_sections(runs, name, settings, EPOCHS[mode])}

### {name}: NLPrompt's transport split at the last epoch: the wrongly labelled samples it flags (recall, %), \
the flagged samples whose labels are wrong (precision, %), the fraction of all samples it calls clean

{transport_table(runs, name, noisy, "nlprompt")}

VisPrompt's split, on its image-conditioned prompts:

{transport_table(runs, name, noisy, "visprompt")}

### {name}: milliseconds per training epoch

{table(runs, name, settings, "epoch_seconds", scale=1000, digits=0)}

### {name}: UPL, no labels: zero-shot pseudo-labels for the whole training pool, the {TUNING[1]} most \
confident per predicted class kept

{upl_table(report["upl_runs"], name)}
"""


def markdown(report, runs):
    mode, pre, settings = report["mode"], report["pretraining"], PRETRAINING[report["mode"]]
    return f"""# Label-noise robustness on the stand-in CLIP ({mode})

Stand-in CLIP pretrained {settings['steps']} steps of {settings['batch_size']} captioned images, its logit \
scale raised from 1/0.07 to 100 over the first {settings['scale_ramp']:.0%} of the steps and then held at \
100 (a schedule, not learnt; its value in the saved model, as the tuning runs use it: \
**{report['logit_scale_at_use']:.1f}**). Zero-shot shape accuracy on images drawn as in pretraining: \
{report['zero_shot_like_pretraining']:.1%} (10 classes). Prompt tuning: 16 shots per class, \
16 context vectors, {EPOCHS[mode]} epochs, SGD lr 0.002, batch 32, no augmentation. Rows ce, gce, mae, dspt: \
CoOp with that loss; prograd: ProGrad with cross-entropy as its domain loss (lambda 1), its context started \
from "a photo of a" after 12 zero vectors; nlprompt: NLPrompt; visprompt, anprompt: VisPrompt and ANPrompt \
as reconstructed in baselines.py (ANPrompt with cross-entropy). Std: sample std (n - 1); the interval: \
mean ± t(0.975, n - 1) std / sqrt(n).

## Zero-shot confidence, stand-in and published CLIP

Top probability: the softmax's largest entry at logit scale 100. ECE: expected calibration error over 15 \
equal-width confidence bins. Published rows: zero-shot CLIP on the full test sets, the "Baseline" rows of \
A-TPT's results (Ahamed et al., ICLR 2026); a small ECE means the mean top probability is close to the \
accuracy.

{confidence_table(report)}

{"".join(task_sections(report, runs, name) for name in report["tasks"])}
Wall-clock: pretraining {pre['seconds']:.0f} s{' (cached by an earlier run)' if pre['cached'] else ''}, \
{len(runs) - report.get('slow', {}).get('runs', 0)} + {len(report['upl_runs'])} (UPL) tuning runs in \
{report['grid_seconds']:.0f} s ({report['jobs']} \
worker process(es) of {report['threads']} torch thread(s)), the whole command {report['seconds']:.0f} s, on \
{report['cpus']} CPUs; load average (1 min) {report['load'][0]:.1f} at the start, {report['load'][1]:.1f} at the end.
"""


def plot(report, runs, path):
    """Test accuracy against the noise rate: a row per task, a column per noise kind."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    settings, tasks = NOISE[report["mode"]], list(report["tasks"])
    kinds = [k for k in ("sym", "pair") if any(s[0] == k for s in settings)]
    figure, axes = plt.subplots(len(tasks), len(kinds), figsize=(5 * len(kinds), 3.8 * len(tasks)), squeeze=False)
    for axes_row, task in zip(axes, tasks):
        for ax, kind in zip(axes_row, kinds):
            points = [s for s in settings if s[0] in ("clean", kind)]
            for method in METHODS:
                if not any(run["task"] == task and run["method"] == method for run in runs):
                    continue  # NOT_RUN, before a --slow pass
                means, _, halves = zip(*(cell(runs, task, method, *s, "test_accuracy") for s in points))
                ax.errorbar([100 * s[1] for s in points], 100 * np.array(means), yerr=100 * np.array(halves),
                            marker="o", capsize=3, label=method)
            ax.axhline(100 * report["tasks"][task]["zero_shot"]["test_accuracy"], color="grey", linestyle="--",
                       label="zero-shot")
            ax.set(title=f"{task} task, {kind} noise", xlabel="noise rate (%)", ylabel="test accuracy (%)",
                   xticks=[100 * s[1] for s in points])
            ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110, format="png")
    plt.close(figure)


def plot_curves(report, runs, path):
    """The losses' per-epoch curves at CURVES: a row per task and setting; clean test accuracy, and the
    training accuracy of the mislabelled samples against their wrong labels."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [(task, setting) for task in report["tasks"] for setting in CURVES if setting in NOISE[report["mode"]]]
    figure, axes = plt.subplots(len(rows), 2, figsize=(10, 3.6 * len(rows)), squeeze=False)
    for (left, right), (task, setting) in zip(axes, rows):
        for method in LOSS_METHODS:
            curves = curves_of(runs, task, method, *setting)
            if not curves:
                continue
            epochs = np.arange(1, len(curves[0]["test_accuracy"]) + 1)
            left.plot(epochs, 100 * np.mean([c["test_accuracy"] for c in curves], axis=0), label=method)
            right.plot(epochs, 100 * np.mean([c["memorisation"] for c in curves], axis=0), label=method)
        left.axhline(100 * report["tasks"][task]["zero_shot"]["test_accuracy"], color="grey", linestyle="--",
                     label="zero-shot")
        left.set(title=f"{task} task, {column_name(*setting)}: clean test accuracy", xlabel="epoch", ylabel="%")
        right.set(title=f"{task}: mislabelled samples fitted to their wrong labels", xlabel="epoch", ylabel="%")
        right.set_ylim(0, 100)
        for ax in (left, right):
            ax.grid(alpha=0.3)
        left.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110, format="png")
    plt.close(figure)


# -----------------------------------------------------------------------------
# main

def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Label-noise benchmark of dspt.py's prompt tuning on a "
                                                 "small CLIP pretrained on a procedurally drawn world.")
    add = parser.add_argument
    add("--quick", action="store_true", help="shorter pretraining, 5 epochs, one seed, noise none and sym 50%%")
    add("--out", metavar="DIR", help="where noise.md, noise.png, noise-curves.png and noise.json go "
                                     "(default bench/results, or bench/out/quick with --quick)")
    add("--cache", default=str(HERE / "cache"), metavar="DIR",
        help="pretrained model, downstream images and training logs (default %(default)s)")
    add("--bpe", metavar="PATH", help="the tokenizer's bpe_simple_vocab_16e6.txt.gz; env DSPT_BPE "
                                      "(default: downloaded by dspt.py)")
    add("--seeds", type=int, nargs="+", metavar="SEED",
        help="the seeds of the grid, to check its results on others (default 1 2 3 4 5, or 1 with --quick)")
    add("--jobs", type=int, default=os.cpu_count(), metavar="N",
        help="tuning runs at once, in worker processes (default: the number of CPUs, %(default)s)")
    add("--slow", action="store_true",
        help="run only the cells the grid leaves out for their cost (NOT_RUN: VisPrompt on the near task, about "
             "an hour on 2 cores) and add them to the report in --out, written by an earlier run of the same "
             "mode and seeds")
    add("--threads", type=int, default=1,
        help="torch CPU threads of each worker; pretraining, before the workers start, uses --jobs times as many "
             "(default %(default)s)")
    args = parser.parse_args(argv)
    if args.jobs < 1 or args.threads < 1:
        parser.error("--jobs and --threads must be at least 1")
    return args


def main(argv=None):
    """Run the benchmark; returns the report (also written to --out as noise.json)."""
    args = parse_args(argv)
    mode = "quick" if args.quick else "full"
    out = Path(args.out or (HERE / "out" / "quick" if args.quick else HERE / "results"))
    torch.set_num_threads(min(os.cpu_count(), args.jobs * args.threads))  # the workers' threads, until they start
    start, load_start = time.time(), os.getloadavg()[0]
    tokenizer = dspt.load_tokenizer(args.bpe)
    seeds = args.seeds or SEEDS[mode]
    report = earlier_report(out, mode, seeds) if args.slow else None
    checkpoint, pretraining = pretrained_clip(mode, tokenizer, args.cache)
    if report and report["pretraining"]["final_loss"] != pretraining["final_loss"]:
        raise dspt.UserError(f"{out / 'noise.json'} is from another pretrained model (final pretraining loss "
                             f"{report['pretraining']['final_loss']:.6f} there, {pretraining['final_loss']:.6f} in "
                             f"{checkpoint}); run --slow with the --cache of its grid")
    clip, preprocess = dspt.load_clip(str(checkpoint))
    base = dspt.parse_args(["--data", ".", *TUNING])
    dspt.check_args(base)
    tasks = {name: prepare_task(name, downstream_task(args.cache, name), clip, preprocess, tokenizer, base)
             for name in TASKS}
    grid_start = time.time()
    torch.set_num_threads(args.threads)
    if args.slow:
        zero_shot = {name: task["zero_shot"]["test_accuracy"] for name, task in tasks.items()}
        if zero_shot != {name: task["zero_shot"]["test_accuracy"] for name, task in report["tasks"].items()}:
            raise dspt.UserError(f"the tasks drawn now are not those of {out / 'noise.json'} (their zero-shot "
                                 f"accuracies differ); run --slow with the --cache and the code of its grid")
        added = run_grid(mode, tasks, clip, args.cache, seeds, args.jobs, args.threads, slow=True)[0]
        saved = Path(args.cache) / f"logs-{mode}" / "slow-runs.json"  # kept should the report fail to draw
        dspt.atomic_write(saved, lambda f: f.write(json.dumps(added, indent=1).encode()))
        report["runs"] += added
        report["slow"] = {"seconds": time.time() - grid_start, "runs": len(added), "jobs": args.jobs,
                          "threads": args.threads, "load": [load_start, os.getloadavg()[0]]}
        write_report(out, report)
        return report
    runs, upl_runs, bounds, not_run = run_grid(mode, tasks, clip, args.cache, seeds, args.jobs, args.threads)
    report = {"mode": mode, "pretraining": pretraining,
              "tasks": {name: {"zero_shot": task["zero_shot"], "settings": TASKS[name]}
                        for name, task in tasks.items()},
              "zero_shot_like_pretraining": zero_shot_like_pretraining(clip, tokenizer, "a photo of a {}."),
              "grid_seconds": time.time() - grid_start, "seconds": time.time() - start,
              "load": [load_start, os.getloadavg()[0]], "cpus": os.cpu_count(), "jobs": args.jobs,
              "threads": args.threads, "model": MODEL, "pretraining_settings": PRETRAINING[mode],
              "tuning": [*TUNING, "--epochs", str(EPOCHS[mode])], "noise": NOISE[mode], "seeds": seeds,
              "logit_scale_at_use": clip.logit_scale.exp().item(),
              "runs": runs, "upl_runs": upl_runs, "bounds": bounds, "not_run": not_run}
    write_report(out, report)
    return report


def earlier_report(out, mode, seeds):
    """The report in out that a --slow pass adds to: written by a grid of this mode, on these
    seeds, with the settings this file has now."""
    path = out / "noise.json"
    try:
        report = json.loads(path.read_text())
        written = {key: report[key] for key in ("mode", "seeds", "tuning", "noise", "model", "pretraining_settings")}
        written["tasks"] = {name: task["settings"] for name, task in report["tasks"].items()}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise dspt.UserError(f"--slow adds to the report of a grid, and {path} is not one ({e!r}); run the grid "
                             f"first without --slow") from None
    now = json.loads(json.dumps({"mode": mode, "seeds": seeds, "tuning": [*TUNING, "--epochs", str(EPOCHS[mode])],
                                 "noise": NOISE[mode], "model": MODEL, "pretraining_settings": PRETRAINING[mode],
                                 "tasks": TASKS}))
    differ = [key for key in now if written[key] != now[key]]
    if differ:
        raise dspt.UserError(f"{path} is from another grid (its {', '.join(differ)} differ from this run's); run "
                             f"--slow with the grid's --quick and --seeds, and the settings it ran with")
    if "slow" in report:
        raise dspt.UserError(f"{path} already has its --slow runs")
    return report


def write_report(out, report):
    """noise.md, noise.png, noise-curves.png and noise.json into out, each whole or not at all."""
    out.mkdir(parents=True, exist_ok=True)
    runs = report["runs"]
    dspt.atomic_write(out / "noise.md", lambda f: f.write(markdown(report, runs).encode()))
    dspt.atomic_write(out / "noise.png", lambda f: plot(report, runs, f))
    dspt.atomic_write(out / "noise-curves.png", lambda f: plot_curves(report, runs, f))
    dspt.atomic_write(out / "noise.json", lambda f: f.write(json.dumps(report, indent=1).encode()))
    print(f"wrote noise.md, noise.png, noise-curves.png and noise.json into {out}")


if __name__ == "__main__":
    try:
        main()
    except dspt.UserError as e:
        print(f"noise: error: {e}", file=sys.stderr)
        raise SystemExit(1)
