"""
Speed of a column of runs trained together (sweep.py's groups) against the same runs one after another.

Runs that differ only in their loss and their noise see the same image batches. Alone, each run
reads, augments and encodes every batch itself; together (sweep.train_together), each batch
is read, augmented and encoded once, and every run takes its own step on it. This times both, in one
process, on the same jobs: --runs runs (the four losses across noise settings), CLIP's RN50 with
random weights, --classes classes of Caltech101's names, generated JPEG images of a photo's size
(500 x 375) with CoOp's augmentation, each run built as dspt.prepare builds it. A step's time is
split into data loading (reading and augmenting the images, in the loader), the image encoder and
the run's own step (its text side, loss, backward and update, and train()'s diagnostics).

    python bench/together.py --bpe path/to/bpe_simple_vocab_16e6.txt.gz   # or set $DSPT_BPE
    python bench/together.py --runs 24 --classes 100 --shots 1 --epochs 1 --seed 2
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import dspt  # noqa: E402
import sweep  # noqa: E402
from speed import CALTECH101, CONFIGS, machine  # noqa: E402

SETTINGS = [(kind, rate) for kind in ("sym", "pair") for rate in (0.0, 0.125, 0.25, 0.375, 0.5, 0.625)]


def make_images(root, classes, per_class, seed):
    """per_class JPEGs (500 x 375, smooth colour fields with grain, about 40 kB) for each class."""
    from PIL import Image
    rng, items = np.random.default_rng(seed), []
    for c in range(classes):
        for i in range(per_class):
            coarse = rng.integers(0, 256, (6, 8, 3)).astype(np.float32)
            field = np.kron(coarse, np.ones((63, 63, 1), np.float32))[:375, :500]
            pixels = np.clip(field + rng.normal(0, 12, field.shape), 0, 255).astype(np.uint8)
            path = Path(root) / f"{c:03d}_{i:02d}.jpg"
            Image.fromarray(pixels).save(path, quality=90)
            items.append((path, c))
    return items


class Timer:
    """Seconds spent in the wrapped functions, by part."""
    def __init__(self, device):
        self.device, self.seconds = device, {}

    def wrap(self, owner, name, part):
        original = getattr(owner, name)

        def timed(*args, **kwargs):
            if self.device.startswith("cuda"):
                torch.cuda.synchronize()
            start = time.perf_counter()
            result = original(*args, **kwargs)
            if self.device.startswith("cuda"):
                torch.cuda.synchronize()
            self.seconds[part] = self.seconds.get(part, 0.0) + time.perf_counter() - start
            return result
        setattr(owner, name, timed)
        return original


def build_jobs(clip, items, args, tokenizer, classnames, only=None):
    """The runs' jobs (or the one numbered only) as dspt.prepare makes them (the few-shot sample given), each from
    the present RNG state, which is left as a run alone has it after its set-up."""
    settings = [(loss, kind, rate) for kind, rate in SETTINGS for loss in ("dspt", "ce", "gce", "mae")][:args.runs]
    settings = settings if only is None else settings[only:only + 1]
    clean, start, jobs = np.array([label for _, label in items]), torch.get_rng_state(), []
    for loss, kind, rate in settings:
        torch.set_rng_state(start)
        run_args = argparse.Namespace(**{**vars(args), "loss": loss, "noise": rate, "noise_kind": kind,
                                               "out": f"{loss}-{kind}{rate:g}"})
        given = dspt.inject_label_noise(clean, len(classnames), rate, kind, args.seed)
        learner = dspt.PackedPromptLearner(clip, classnames, tokenizer, 16)
        jobs.append(dspt.Job(dspt.PromptTuning(learner, dspt.LOSSES[loss]), items, torch.from_numpy(given),
                             torch.from_numpy(given != clean), run_args))
    return jobs


def timed_train(jobs, args):
    """Seconds of dspt.train (one job) or sweep.train_together over the jobs, by part, and the peak memory meanwhile."""
    timer = Timer(args.device)
    originals = [(dspt.ImageDataset, "__getitem__", timer.wrap(dspt.ImageDataset, "__getitem__", "loading")),
                 (dspt.PromptTuning, "encode", timer.wrap(dspt.PromptTuning, "encode", "image")),
                 (dspt.Tuning, "step", timer.wrap(dspt.Tuning, "step", "run step"))]
    sweep.reset_peak(args.device)
    start = time.perf_counter()
    try:
        if len(jobs) == 1:
            dspt.train(jobs[0].method, jobs[0].items, jobs[0].labels, jobs[0].noisy, jobs[0].args)
        else:
            sweep.train_together(jobs)
    finally:
        for owner, name, original in originals:
            setattr(owner, name, original)
    timer.seconds["total"] = time.perf_counter() - start
    timer.seconds["other"] = timer.seconds["total"] - sum(timer.seconds.get(p, 0) for p in ("loading", "image",
                                                                                           "run step"))
    return timer.seconds, sweep.memory_in_use(args.device, peak=True)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip(),
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add = parser.add_argument
    add("--runs", type=int, default=24, help=f"runs in the column (at most {4 * len(SETTINGS)})")
    add("--classes", type=int, default=100, help="classes (Caltech101's names)")
    add("--shots", type=int, default=1, help="images per class")
    add("--epochs", type=int, default=1, help="epochs of each run")
    add("--batch-size", type=int, default=32, help="images per step")
    add("--workers", type=int, default=0, help="loader processes (0: in this process, so that loading is timed)")
    add("--seed", type=int, default=1, help="seed of the images, the noise and the contexts")
    add("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    add("--bpe", default=None, metavar="PATH", help="the tokenizer's merges file (env DSPT_BPE)")
    args = parser.parse_args(argv)
    if not 2 <= args.runs <= 4 * len(SETTINGS) or not 2 <= args.classes <= len(CALTECH101):
        parser.error(f"--runs must be in 2..{4 * len(SETTINGS)} and --classes in 2..{len(CALTECH101)}")
    args.precision = "amp" if args.device.startswith("cuda") else "fp32"
    args.dtype, args.lr, args.no_augment = torch.float32, 0.002, False
    return args


def main(argv=None):
    args = parse_args(argv)
    dspt.reuse_freed_memory()
    tokenizer, classnames = dspt.load_tokenizer(args.bpe), CALTECH101[:args.classes]
    torch.manual_seed(0)
    clip = dspt.CLIP(**CONFIGS["RN50"]).requires_grad_(False).eval().to(args.device)
    print(f"machine: {machine(argparse.Namespace(device=args.device, threads=torch.get_num_threads()))}", flush=True)
    with tempfile.TemporaryDirectory() as folder:
        items = make_images(folder, args.classes, args.shots, args.seed)
        torch.manual_seed(args.seed)
        warm = build_jobs(clip, items, argparse.Namespace(**{**vars(args), "runs": 1}), tokenizer, classnames)
        timed_train(warm, argparse.Namespace(**{**vars(args), "epochs": 1}))  # warm-up, not counted
        start = torch.get_rng_state()  # each run, alone or together, starts from this state, as in a sweep
        jobs = build_jobs(clip, items, args, tokenizer, classnames)
        together, together_peak = timed_train(jobs, args)
        alone, alone_peak, identical = {}, 0, 0
        for i in range(args.runs):
            torch.set_rng_state(start)
            job = build_jobs(clip, items, args, tokenizer, classnames, only=i)[0]
            seconds, peak = timed_train([job], args)
            identical += torch.equal(job.method.learner.ctx, jobs[i].method.learner.ctx)
            alone_peak = max(alone_peak, peak)
            for part, value in seconds.items():
                alone[part] = alone.get(part, 0.0) + value
    steps = args.epochs * (len(items) // min(args.batch_size, len(items)))
    run_steps = steps * args.runs
    print(f"\n{args.runs} runs (the four losses across {-(-args.runs // 4)} noise settings), RN50 with random "
          f"weights, {args.classes} classes x {args.shots} shots, batch {args.batch_size}, {steps} steps a run, "
          f"augmented, {args.workers} loader workers, seed {args.seed}\n")
    print("| mode | steps/s per run | s per run-step | loading | image | run step | other | peak memory GiB |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for mode, seconds, peak in (("one after another", alone, alone_peak), ("together", together, together_peak)):
        parts = " | ".join(f"{seconds.get(p, 0) / run_steps:.3f}" for p in ("loading", "image", "run step", "other"))
        print(f"| {mode} | {run_steps / seconds['total']:.3f} | {seconds['total'] / run_steps:.3f} | {parts} | "
              f"{peak / 2**30:.2f} |")
    print(f"\ntrained contexts identical alone and together, bit for bit: {identical} of {args.runs} runs")
    print(f"speed-up per run: {alone['total'] / together['total']:.2f}x. Parts in seconds per run-step (a run's "
          f"step): loading, reading and augmenting its share of the images; image, the frozen image encoder; run "
          f"step, the run's text side, loss, backward, update and diagnostics; other, the rest of train(). Peak "
          f"memory: {'CUDA allocated' if args.device.startswith('cuda') else 'resident (VmHWM)'}, of the mode.")


if __name__ == "__main__":
    main()
