"""
Reproduce a table: every run of a grid of datasets x noise settings x methods x seeds, each one
a run of dspt.py or baselines.py in an output folder named by its settings, and the results
collected into tables (Markdown and CSV) and plots.

    python sweep.py --data data/caltech-101 data/dtd --out sweeps/table1 -- --backbone RN50
    python sweep.py --data ... --out sweeps/table1 --print-commands -- ...   # for a scheduler
    python sweep.py --data ... --out sweeps/table1 --report -- ...           # only collect

Runs already finished are skipped, so a sweep stopped at any point continues where it was when
started again (and a run stopped mid-way resumes from its checkpoint, as dspt.py does). The
pending runs go N at a time (--jobs), or one per GPU on a machine with several. With
--print-commands the pending runs are printed, one shell command a line, for SLURM, GNU
parallel or xargs; run the same sweep with --report afterwards to collect them. Everything
after "--" goes to every run.

Runs that differ only in their loss or noise (same data, seed and method) see the same image
batches, so by default they train together in one process (python sweep.py --together ...), each
batch read, augmented and encoded once for all of them, with every output identical to the run
made alone; --no-group runs each alone, --group-memory bounds what a group holds.

A run that fails (a non-zero exit) is logged with its command and the end of its output in its
folder, the sweep goes on, and the summary lists the failures; the tables mark failed and
missing runs and average only the seeds that finished, saying how many.
"""

import argparse
import concurrent.futures
import contextlib
import csv
import io
import json
import os
import queue
import shlex
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch

import baselines
import dspt

HERE = Path(__file__).resolve().parent
# Each method: the script and the flags that make it. The losses are CoOp's prompt tuning with
# that loss; ProGrad, VisPrompt and ANPrompt as published (ProGrad with its release's per-dataset
# template and context, baselines.py's default --prograd-init release).
METHODS = {
    "dspt": ["dspt.py", "--loss", "dspt"], "ce": ["dspt.py", "--loss", "ce"],
    "gce": ["dspt.py", "--loss", "gce"], "mae": ["dspt.py", "--loss", "mae"],
    "prograd": ["baselines.py", "--method", "prograd", "--loss", "ce"],
    "nlprompt": ["baselines.py", "--method", "nlprompt"],
    "visprompt": ["baselines.py", "--method", "visprompt"],
    "anprompt": ["baselines.py", "--method", "anprompt", "--loss", "ce"],
    "upl": ["baselines.py", "--method", "upl"],
}
WITHOUT_LABELS = {"upl"}  # runs only without noise
# Runs that differ only in --loss, --noise and --noise-kind see the same images, and by default train together
# (see run_together). ANPrompt does not: its image encoder carries learned prompts, so its images' features are
# its own. UPL neither: its training set is zero-shot CLIP's pseudo-labels, one run per dataset and seed.
SHARES_IMAGES = {"dspt", "ce", "gce", "mae", "prograd", "nlprompt", "visprompt"}
VARYING = {"loss", "noise", "noise_kind", "out", "fresh"}  # what may differ within a group
RATES = [0.125, 0.25, 0.375, 0.5, 0.625, 0.75]


class Run:
    """One cell of the grid: its settings, its folder and its command."""

    def __init__(self, data, method, kind, rate, seed, out, extra):
        self.data, self.method, self.kind, self.rate, self.seed = data, method, kind, rate, seed
        self.dataset = Path(data).name
        self.setting = "none" if kind == "none" else f"{kind}{rate:g}"
        self.folder = Path(out) / self.dataset / method / self.setting / f"seed{seed}"
        script, *flags = METHODS[method]
        noise = [] if kind == "none" else ["--noise", str(rate), "--noise-kind", kind]
        self.command = [sys.executable, str(HERE / script), "--data", str(data), *flags, *noise,
                        "--seed", str(seed), *extra, "--out", str(self.folder)]

    def group_key(self):
        """Runs with the same key can train together: the same data, seed, script and flags but --loss."""
        script, *flags = METHODS[self.method]
        method = flags[flags.index("--method") + 1] if "--method" in flags else None
        return (self.data, self.seed, script, method) if self.method in SHARES_IMAGES else (id(self),)

    def metrics(self):
        """The run's metrics.json, checked to be of the run this folder stands for."""
        path = self.folder / "metrics.json"
        if not path.is_file():
            return None
        metrics = read_json(path)
        script, *flags = METHODS[self.method]
        wanted = {"data": str(Path(self.data).resolve()), "seed": self.seed, "noise": self.rate,
                  **({"noise_kind": self.kind} if self.kind != "none" else {}),
                  **{flag[2:]: value for flag, value in zip(flags, flags[1:]) if flag in ("--loss", "--method")}}
        recorded = metrics.get("command", {}) if isinstance(metrics, dict) else {}
        for key, value in wanted.items():
            if recorded.get(key) != value:
                raise dspt.UserError(f"{path} is of a run with --{key.replace('_', '-')} {recorded.get(key)}, not "
                                     f"{value}: it does not belong in {self.folder}; delete it to run it again")
        return metrics

    def status(self):
        if (self.folder / "metrics.json").is_file():
            return "finished"
        return "failed" if (self.folder / "failed.txt").is_file() else "missing"


def read_json(path):
    try:
        return json.loads(Path(path).read_text())
    except ValueError as e:
        raise dspt.UserError(f"{path} is damaged ({e}); delete it (a run's folder then runs again)") from None


def grid(args):
    settings = ([("none", 0.0)] if not args.no_clean else []) + [(k, r) for k in args.kinds for r in args.rates]
    names = [Path(d).name for d in args.data]
    if len(set(names)) < len(names):
        raise dspt.UserError(f"two --data folders have the same name ({names}); their runs would share folders")
    return [Run(data, method, kind, rate, seed, args.out, args.extra)
            for data in args.data for method in args.methods for kind, rate in settings for seed in args.seeds
            if not (method in WITHOUT_LABELS and kind != "none")]


# -----------------------------------------------------------------------------
# Running: N at a time, or one per GPU.

def groups(runs, slots=1):
    """The runs as units to run: lists of runs that train together (same group_key), in the grid's order. The
    largest are halved until there are at least as many units as slots (processes at a time), if they can be."""
    units = {}
    for run in runs:
        units.setdefault(run.group_key(), []).append(run)
    units = list(units.values())
    while len(units) < slots and max(map(len, units), default=1) > 1:
        largest = max(units, key=len)
        at = units.index(largest)
        units[at:at + 1] = [largest[:len(largest) // 2], largest[len(largest) // 2:]]
    return units


def unit_command(unit, memory=None):
    """The command of a unit: a run's own, or one process training the group's runs together."""
    if len(unit) == 1:
        return unit[0].command
    script = unit[0].command[1]
    argvs = [run.command[2:] for run in unit]
    budget = [] if memory is None else ["--group-memory", f"{memory:g}"]
    return [sys.executable, str(HERE / "sweep.py"), "--together", script, *budget, "--", *argvs[0],
            *[arg for argv in argvs[1:] for arg in ("--and", *argv)]]


def run_all(units, jobs, gpus, memory=None):
    """Run each unit (a run, or a list of runs trained together), jobs at a time, each on its own GPU if gpus.
    Returns the failed runs. Prints a line of progress whenever a run ends."""
    units = [unit if isinstance(unit, list) else [unit] for unit in units]
    total = sum(len(unit) for unit in units)
    slots = queue.Queue()
    for slot in (range(gpus) if gpus else range(jobs)):
        slots.put(slot)
    lock, counts, failed, start = threading.Lock(), {"done": 0, "running": 0, "failed": 0}, [], time.time()

    def one(unit):
        slot = slots.get()
        env = dict(os.environ, **({"CUDA_VISIBLE_DEVICES": str(slot)} if gpus else {}))
        command = unit_command(unit, memory)
        with lock:
            counts["running"] += len(unit)
        begin = time.time()
        for run in unit:
            run.folder.mkdir(parents=True, exist_ok=True)
            (run.folder / "failed.txt").unlink(missing_ok=True)
        with open(unit[0].folder / "log.txt", "w") as log:
            code = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env).returncode
        slots.put(slot)
        seconds, text = time.time() - begin, (unit[0].folder / "log.txt").read_text()
        for run in unit[1:]:  # every run of a group keeps the group's log
            (run.folder / "log.txt").write_text(text)
        with lock:
            for run in unit:
                counts["running"] -= 1
                ok = (run.folder / "metrics.json").is_file() and (code == 0 or len(unit) > 1)
                counts["done" if ok else "failed"] += 1
                if not ok:
                    tail = "\n".join(text.splitlines()[-15:])
                    dspt.atomic_write(run.folder / "failed.txt", lambda f: f.write(
                        f"exit status {code}\n{shlex.join(command)}\n{tail}\n".encode()))
                    failed.append(run)
                result = (f"{run.metrics()['test_accuracy']:.2%}" if ok else f"FAILED (exit {code}, see "
                          f"{run.folder / 'failed.txt'})")
                together = f", {len(unit)} together" if len(unit) > 1 else ""
                print(f"[{counts['done']} done, {counts['running']} running, {counts['failed']} failed, of {total}; "
                      f"{time.time() - start:.0f}s] {run.dataset} {run.method} {run.setting} seed {run.seed}: "
                      f"{result} ({seconds:.0f}s{together})", flush=True)

    with concurrent.futures.ThreadPoolExecutor(gpus or jobs) as pool:
        list(pool.map(one, units))
    return failed


# -----------------------------------------------------------------------------
# Runs that share their images, trained together in one process (python sweep.py --together ...).

def memory_in_use(device, peak=False):
    """Bytes the process uses now (or at its peak since reset_peak): on CUDA torch's allocated memory, on
    the CPU the resident memory (Linux's /proc)."""
    if str(device).startswith("cuda"):
        return (torch.cuda.max_memory_allocated if peak else torch.cuda.memory_allocated)(device)
    field = "VmHWM" if peak else "VmRSS"
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def reset_peak(device):
    if str(device).startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(device)
    else:
        try:
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the present resident memory
        except OSError:
            pass


def default_memory(device):
    """A quarter of the GPU's memory, or of the machine's, in bytes."""
    if str(device).startswith("cuda"):
        return torch.cuda.get_device_properties(device).total_memory // 4
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 4


def held_bytes(job):
    """The memory a run holds between steps, on top of what the group shares: its learner's and method's own
    tensors, and for each trained parameter its gradient and momentum."""
    shared = {id(t) for t in [*job.method.learner.clip.parameters(), *job.method.learner.clip.buffers()]}
    modules = [job.method.learner, job.method, *(m for m in vars(job.method).values() if isinstance(m, torch.nn.Module))]
    tensors = {id(t): t for module in modules if isinstance(module, torch.nn.Module)
               for t in [*module.parameters(), *module.buffers()] if id(t) not in shared}
    tensors.update({id(t): t for t in vars(job.method).values() if isinstance(t, torch.Tensor)})
    tensors.update({id(t): t for t in (job.labels, job.noisy)})
    return sum(t.nbytes * (3 if t.requires_grad else 1) for t in tensors.values())


def encodes_its_own_images(job):
    """Whether the job's method encodes images with parameters of its own (ANPrompt), so that it shares no features."""
    return type(job.method).encode is not dspt.PromptTuning.encode


def train_together(jobs):
    """dspt.train() for several runs (dspt.Jobs) on the same items, as run_together() groups them: each batch is
    read, augmented and encoded once, and each run takes its own step on it, exactly as alone (one run may be
    any method). A run resumed further than another waits for it; a run that diverges stops, the others go on.
    Returns each run's history, or the UserError it stopped with."""
    first, args = jobs[0], jobs[0].args
    if len(jobs) > 1 and any(job.items != first.items or encodes_its_own_images(job) for job in jobs):
        raise ValueError("runs trained together need the same items and CLIP's own image encoding")
    generator = torch.Generator().manual_seed(args.seed)
    steps, batches = dspt.training_batches(first.method, first.items, args, generator)
    tunings = [dspt.Tuning(job, f"{job.args.out}: " if len(jobs) > 1 else "") for job in jobs]
    behind, errors = min(tunings, key=lambda tuning: len(tuning.history)), {}
    if behind.state:  # the batches and augmentations go on from where they were after its epoch
        generator.set_state(behind.state["generator"])
        torch.set_rng_state(behind.state["torch_rng"])
    for epoch in range(len(behind.history), args.epochs):
        start, lr = time.time(), dspt.learning_rate(epoch, args)
        active = [tuning for tuning in tunings if len(tuning.history) == epoch]  # a run ahead waits
        for tuning in active:
            tuning.start_epoch(lr)
        for step, (image_features, index) in enumerate(dspt.progress(batches(), steps, f"epoch {epoch + 1}"), 1):
            for tuning in active:
                try:
                    tuning.step(image_features, index, epoch, step)
                except dspt.UserError as e:  # diverged: this run stops here
                    errors[tuning] = e
            active = [tuning for tuning in active if tuning not in errors]
        for tuning in active:
            tuning.end_epoch(epoch, lr, time.time() - start, generator)
    return [errors.get(tuning, tuning.history) for tuning in tunings]


def run_together(script, argvs, memory=None):
    """Train the runs of argvs (each a command line of script) as one group: the data, CLIP and the test
    set's features are loaded once; each run is prepared as alone; train() steps them all on each batch.
    Runs that hold more than memory bytes together go in several passes. Finished runs are skipped.
    Returns the runs' metrics; a run that fails is named at the end, after the others finished."""
    module = baselines if Path(script).name == "baselines.py" else dspt
    group = [module.parse_args(argv) for argv in argvs]
    for args in group:
        module.check_args(args)
    keys = [{k: v for k, v in dspt.command(args).items() if k not in VARYING} for args in group]
    for args, key in zip(group[1:], keys[1:]):
        differs = sorted(k for k in {**key, **keys[0]} if key.get(k) != keys[0].get(k))
        if differs:
            raise dspt.UserError(f"runs trained together may differ only in --loss, --noise and --noise-kind; "
                                 f"{args.out} differs from {group[0].out} in --{differs[0].replace('_', '-')}")
    results, failures = {}, []
    with contextlib.ExitStack() as held:
        for args in group:
            held.enter_context(dspt.owning(args.out))
        pending = []
        for args in group:
            results[args.out] = dspt.finished_or_resumable(args)
            if results[args.out]:
                print(f"already finished: {Path(args.out) / 'metrics.json'}")
            else:
                pending.append(args)
        if not pending:
            return [results[args.out] for args in group]
        shared = dspt.load_shared(pending[0])
        budget, start_state, passes = memory or default_memory(pending[0].device), torch.get_rng_state(), 0
        while pending:
            reset_peak(pending[0].device)
            jobs, sizes, after = [], [], None
            for args in list(pending):
                torch.set_rng_state(start_state)  # each run starts from the state a run alone has here
                print(f"== {args.out}", flush=True)
                job = module.prepare(args, shared)
                if len(group) > 1 and encodes_its_own_images(job):
                    raise dspt.UserError(f"{args.out}: its method encodes the images with parameters of its own, so "
                                         f"it cannot train together with other runs; run it alone")
                if jobs and sum(sizes) + held_bytes(job) > budget:
                    print(f"{args.out} does not fit in this pass's memory budget: it goes in the next", flush=True)
                    break  # the next pass prepares it again
                if after is not None and not torch.equal(after, torch.get_rng_state()):
                    raise dspt.UserError(f"{args.out} draws other random numbers while it is set up than "
                                         f"{jobs[0].args.out}, so it cannot train together with it; run it alone")
                jobs.append(job), sizes.append(held_bytes(job)), pending.remove(args)
                after = torch.get_rng_state()
            torch.set_rng_state(after)
            first = jobs[0]
            for job, history in zip(jobs, train_together(jobs)):
                if isinstance(history, Exception):
                    failures.append(f"{job.args.out}: {history}")
                else:
                    print(f"== {job.args.out}", flush=True)
                    results[job.args.out] = module.finish(job, history, shared)
            passes += 1
            print(f"pass {passes}: {len(jobs)} runs together, holding {sum(sizes) / 2**20:.3g} MiB of their own "
                  f"(budget {budget / 2**30:.3g} GiB); peak memory {memory_in_use(first.args.device, True) / 2**30:.2f} "
                  f"GiB", flush=True)
    if failures:
        raise dspt.UserError(f"{len(failures)} of the runs failed: " + "; ".join(failures))
    return [results[args.out] for args in group]


def together_main(argv):
    """python sweep.py --together SCRIPT [--group-memory GIB] -- ARGS... [--and ARGS...]..."""
    if len(argv) < 3 or "--" not in argv:
        raise dspt.UserError("usage: sweep.py --together SCRIPT [--group-memory GIB] -- ARGS... --and ARGS...")
    head, rest = argv[:argv.index("--")], argv[argv.index("--") + 1:]
    try:
        memory = float(head[head.index("--group-memory") + 1]) * 2**30 if "--group-memory" in head else None
    except (IndexError, ValueError):
        memory = 0
    if Path(head[0]).name not in ("dspt.py", "baselines.py") or (memory is not None and not memory > 0):
        raise dspt.UserError(f"--together takes dspt.py or baselines.py, not {head[0]}, and a positive "
                             f"--group-memory in GiB")
    argvs, current = [], []
    for arg in rest:
        if arg == "--and":
            argvs.append(current)
            current = []
        else:
            current.append(arg)
    return run_together(head[0], [*argvs, current], memory)


# -----------------------------------------------------------------------------
# Report: tables and plots from the runs' metrics.json.

def cells(runs):
    """{(dataset, method, setting): (test accuracies of the finished seeds, statuses)}."""
    table = {}
    for run in runs:
        values, statuses = table.setdefault((run.dataset, run.method, run.setting), ([], []))
        statuses.append(run.status())
        if statuses[-1] == "finished":
            values.append(run.metrics()["test_accuracy"])
    return table


def format_cell(values, statuses):
    """mean ± std over the finished seeds, in %, and how many seeds it has; failed or missing said."""
    if not values:
        return "failed" if "failed" in statuses else "missing"
    text = f"{100 * np.mean(values):.1f} ± {100 * np.std(values):.1f} ({len(values)}"
    if len(values) < len(statuses):
        lost = [f"{statuses.count(s)} {s}" for s in ("failed", "missing") if statuses.count(s)]
        text += f" of {len(statuses)}; {', '.join(lost)}"
    return text + ")"


def report(runs, out):
    """results.md, results.csv and a plot per dataset in out; returns the Markdown."""
    datasets = list(dict.fromkeys(run.dataset for run in runs))
    methods = list(dict.fromkeys(run.method for run in runs))
    settings = list(dict.fromkeys(run.setting for run in runs))
    table = cells(runs)
    zero_shot = {}
    for run in runs:
        if run.status() == "finished":
            zero_shot.setdefault(run.dataset, run.metrics()["zero_shot_accuracy"])
    header = "| method | " + " | ".join(settings) + " |\n|---" + "|---" * len(settings) + "|\n"
    parts = [f"# Test accuracy (%), mean ± std over seeds (seeds finished)\n\n{len(runs)} runs in {out}; "
             f"{sum(run.status() == 'finished' for run in runs)} finished, "
             f"{sum(run.status() == 'failed' for run in runs)} failed, "
             f"{sum(run.status() == 'missing' for run in runs)} missing.\n"]
    for dataset in datasets:
        rows = ["| zero-shot | " + " | ".join(
            [f"{100 * zero_shot[dataset]:.1f}" if dataset in zero_shot else "missing"] * len(settings)) + " |"]
        for method in methods:
            row = [format_cell(*table[(dataset, method, s)]) if (dataset, method, s) in table else "-" for s in settings]
            rows.append(f"| {method} | " + " | ".join(row) + " |")
        parts.append(f"## {dataset}\n\n" + header + "\n".join(rows) + "\n")
    rows = []
    for method in methods:
        row = []
        for setting in settings:
            means = [np.mean(table[(d, method, setting)][0]) for d in datasets
                     if (d, method, setting) in table and table[(d, method, setting)][0]]
            present = sum((d, method, setting) in table for d in datasets)
            cell = "-" if not present else "missing" if not means else f"{100 * np.mean(means):.1f}"
            if means and len(means) < len(datasets):
                cell += f" ({len(means)} of {len(datasets)} datasets)"
            row.append(cell)
        rows.append(f"| {method} | " + " | ".join(row) + " |")
    parts.append(f"## Mean over the {len(datasets)} datasets (of each dataset's mean over its seeds)\n\n"
                 + header + "\n".join(rows) + "\n")
    markdown = "\n".join(parts)
    dspt.atomic_write(Path(out) / "results.md", lambda f: f.write(markdown.encode()))

    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(["dataset", "method", "noise_kind", "noise_rate", "seed", "status", "test_accuracy",
                     "zero_shot_accuracy", "folder"])
    for run in runs:
        metrics = run.metrics()
        writer.writerow([run.dataset, run.method, run.kind, run.rate, run.seed, run.status(),
                         metrics["test_accuracy"] if metrics else "", metrics["zero_shot_accuracy"] if metrics else "",
                         run.folder])
    dspt.atomic_write(Path(out) / "results.csv", lambda f: f.write(text.getvalue().encode()))
    for dataset in datasets:
        plot(dataset, [run for run in runs if run.dataset == dataset], zero_shot.get(dataset), Path(out))
    return markdown


def plot(dataset, runs, zero_shot, out):
    """Test accuracy against noise rate: a line per method, zero-shot dashed, a panel per noise kind."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        dspt.warn("matplotlib is not installed: no plots (pip install matplotlib)")
        return
    kinds = [kind for kind in ("sym", "pair") if any(run.kind == kind for run in runs)] or ["none"]
    figure, axes = plt.subplots(1, len(kinds), figsize=(5 * len(kinds), 3.8), sharey=True, squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        for method in dict.fromkeys(run.method for run in runs):
            points = {}
            for run in runs:
                if run.method == method and run.kind in ("none", kind) and run.status() == "finished":
                    points.setdefault(run.rate, []).append(run.metrics()["test_accuracy"])
            if points:
                rates = sorted(points)
                ax.errorbar([100 * r for r in rates], [100 * np.mean(points[r]) for r in rates],
                            yerr=[100 * np.std(points[r]) for r in rates], marker="o", capsize=3, label=method)
        if zero_shot is not None:
            ax.axhline(100 * zero_shot, color="grey", linestyle="--", label="zero-shot")
        ax.set(title=f"{dataset}: {kind} noise", xlabel="noise rate (%)")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("test accuracy (%)")
    if axes[0][-1].get_legend_handles_labels()[0]:
        axes[0][-1].legend(fontsize=8)
    figure.tight_layout()
    dspt.atomic_write(out / f"{dataset}.png", lambda f: figure.savefig(f, format="png", dpi=120))
    plt.close(figure)


# -----------------------------------------------------------------------------
# main

def parse_args(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.strip().split("\n\n")[0],
                                     epilog='Everything after "--" is passed to every run, e.g. -- --backbone ViT-B/16 '
                                            '--epochs 200 --precision amp.')
    add = parser.add_argument
    add("--data", nargs="+", required=True, metavar="DIR", help="dataset folders, as dspt.py's --data")
    add("--kinds", nargs="*", choices=["sym", "pair"], default=["sym", "pair"], help="noise kinds (default: both)")
    add("--rates", nargs="*", type=float, default=RATES, metavar="RATE",
        help=f"noise rates of each kind (default: {' '.join(f'{r:g}' for r in RATES)})")
    add("--no-clean", action="store_true", help="leave out the runs without noise")
    add("--seeds", nargs="+", type=int, default=[1, 2, 3], help="seeds (default: 1 2 3)")
    add("--methods", nargs="+", choices=list(METHODS), default=list(METHODS),
        help="dspt, ce, gce, mae: dspt.py with that loss; prograd (as released, per dataset), nlprompt, "
             "visprompt, anprompt (--loss ce), upl: baselines.py (default: all)")
    add("--out", default="sweeps/sweep", metavar="DIR", help="where the runs' folders and the report go "
                                                             "(default %(default)s)")
    add("--jobs", type=int, default=1, metavar="N", help="runs at a time on this machine (default 1; with several "
                                                         "GPUs, one run per GPU)")
    add("--print-commands", action="store_true", help="print the pending runs' commands, one a line, and exit")
    add("--report", action="store_true", help="only collect the finished runs into the report")
    add("--no-group", action="store_true", help="run every run alone; by default the runs that differ only in "
        "their loss or noise (same data, seed and method) train together in one process, each image batch read, "
        "augmented and encoded once for all of them, with results identical to alone")
    add("--group-memory", type=float, metavar="GIB", help="what a group's runs may hold of their own (parameters, "
        "optimizer state, buffers) before it trains in several passes (default: a quarter of the GPU's memory, or "
        "of the machine's)")
    args = parser.parse_args(argv)
    args.extra = extra
    if args.jobs < 1:
        parser.error("--jobs must be at least 1")
    if args.group_memory is not None and not args.group_memory > 0:
        parser.error("--group-memory must be a positive number of GiB")
    return args


def gpu_count():
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def main(argv=None):
    """Run the sweep's pending runs and write the report; returns (runs, failed runs)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--together"]:
        return together_main(argv[1:]), []
    args = parse_args(argv)
    runs = grid(args)
    record = Path(args.out) / "sweep.json"  # a finished run counts only if made with these arguments
    recorded = read_json(record) if record.is_file() else {"extra": args.extra}
    if not isinstance(recorded, dict) or recorded.get("extra") != args.extra:
        raise dspt.UserError(f"{args.out} holds a sweep whose runs had the arguments "
                             f"{recorded.get('extra') if isinstance(recorded, dict) else recorded}, not {args.extra}; "
                             f"give another --out")
    if not record.is_file() and not args.report:
        dspt.atomic_write(record, lambda f: f.write(json.dumps({"extra": args.extra}).encode()))
    pending = [run for run in runs if run.status() != "finished"]
    gpus = gpu_count() if gpu_count() > 1 else 0
    units = [[run] for run in pending] if args.no_group else groups(pending, 1 if args.print_commands else gpus or args.jobs)
    if args.print_commands:
        for unit in units:
            print(shlex.join(unit_command(unit, args.group_memory)))
        return runs, []
    failed = []
    if not args.report:
        print(f"{len(runs)} runs, {len(runs) - len(pending)} finished, {len(pending)} to run in {len(units)} "
              f"{'processes' if len(units) != 1 else 'process'}, {f'on {gpus} GPUs' if gpus else f'{args.jobs} at a time'}",
              flush=True)
        failed = run_all(units, args.jobs, gpus, args.group_memory)
    report(runs, args.out)
    print(f"wrote {Path(args.out) / 'results.md'}, {Path(args.out) / 'results.csv'} and a plot per dataset")
    if failed:
        print(f"{len(failed)} runs failed:")
        for run in failed:
            print(f"  {run.folder / 'failed.txt'}: {shlex.join(run.command)}")
    return runs, failed


if __name__ == "__main__":
    try:
        runs, failed = main()
    except dspt.UserError as e:
        print(f"sweep: error: {e}", file=sys.stderr)
        raise SystemExit(1)
    raise SystemExit(1 if failed else 0)
