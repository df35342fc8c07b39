"""
Speed of one prompt-tuning step: CoOp's straightforward text encoding against dspt.py's.

A training step encodes a batch of images (frozen, no gradient), encodes every class's
prompt with the learned context, takes the double-softmax loss, back-propagates to the
context and makes an SGD step. The step is timed, and separately its two parts, for

    (a) full:      dspt.PromptLearner, CoOp's prompt learner as CoOp writes it: every class's whole
                   77-token prompt through the text transformer;
    (b) truncated: the same, cut after the last EOT (later positions cannot affect it);
    (c) dspt:      dspt.PackedPromptLearner, which packs the prompts into rows that share the
                   prefix "[SOT] ctx", without the padding after each EOT (dspt.pack_prompts).

The models are CLIP's real RN50 and ViT-B/32 architectures with random weights; the class
names are Caltech101's, or with --classnames imagenet ImageNet's 1,000 (torchvision's list).
With --memory-limit a variant that needs more memory fails instead of exhausting the machine's,
and the table says that it did not fit. Before timing, (a), (b) and (c) must give the same logits and the
same context gradient. Each variant then runs in a fresh process of its own, as a training
run would (with dspt.reuse_freed_memory, as dspt.py's runs have it): one warm-up step, then
--reps timed ones; the table gives medians.

    python bench/speed.py --bpe path/to/bpe_simple_vocab_16e6.txt.gz   # or set $DSPT_BPE
    python bench/speed.py --backbones RN50 --variants a c --reps 3
    python bench/speed.py --backbones RN50 --classnames imagenet --classes 1000 --memory-limit 20 --skip-check
"""

import argparse
import concurrent.futures
import multiprocessing
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import dspt  # noqa: E402

TEXT = dict(context_length=77, vocab_size=49408, transformer_width=512, transformer_heads=8, transformer_layers=12)
CONFIGS = {
    "RN50": dict(embed_dim=1024, image_resolution=224, vision_layers=(3, 4, 6, 3), vision_width=64,
                 vision_patch_size=None, **TEXT),
    "ViT-B/32": dict(embed_dim=512, image_resolution=224, vision_layers=12, vision_width=768,
                     vision_patch_size=32, **TEXT),
}
VARIANTS = {"a": "(a) full 77 tokens", "b": "(b) cut after EOT", "c": "(c) dspt.py"}
CALTECH101 = [
    "face", "leopard", "motorbike", "accordion", "airplane", "anchor", "ant", "barrel", "bass", "beaver",
    "binocular", "bonsai", "brain", "brontosaurus", "buddha", "butterfly", "camera", "cannon", "car side",
    "ceiling fan", "cellphone", "chair", "chandelier", "cougar body", "cougar face", "crab", "crayfish",
    "crocodile", "crocodile head", "cup", "dalmatian", "dollar bill", "dolphin", "dragonfly",
    "electric guitar", "elephant", "emu", "euphonium", "ewer", "ferry", "flamingo", "flamingo head",
    "garfield", "gerenuk", "gramophone", "grand piano", "hawksbill", "headphone", "hedgehog", "helicopter",
    "ibis", "inline skate", "joshua tree", "kangaroo", "ketch", "lamp", "laptop", "llama", "lobster",
    "lotus", "mandolin", "mayfly", "menorah", "metronome", "minaret", "nautilus", "octopus", "okapi",
    "pagoda", "panda", "pigeon", "pizza", "platypus", "pyramid", "revolver", "rhino", "rooster",
    "saxophone", "schooner", "scissors", "scorpion", "sea horse", "snoopy", "soccer ball", "stapler",
    "starfish", "stegosaurus", "stop sign", "strawberry", "sunflower", "tick", "trilobite", "umbrella",
    "watch", "water lilly", "wheelchair", "wild cat", "windsor chair", "wrench", "yin yang",
]
N_CTX = 16


def imagenet_classnames():
    from torchvision.models import ResNet50_Weights
    return ResNet50_Weights.IMAGENET1K_V1.meta["categories"]


CLASSNAMES = {"caltech101": lambda: CALTECH101, "imagenet": imagenet_classnames}


class TruncatedPrompts(nn.Module):
    """CoOp's text side written out: "[SOT] ctx_1 .. ctx_n name . [EOT]" built for every class and
    run through the transformer up to the last EOT, not all 77 positions."""

    def __init__(self, clip, classnames, tokenizer):
        super().__init__()
        self.clip = clip
        tokens = tokenizer.tokenize([" ".join(["x"] * N_CTX) + f" {name}." for name in classnames])
        tokens = tokens.to(clip.positional_embedding.device)
        self.register_buffer("eot", tokens.argmax(dim=-1))
        self.length = int(self.eot.max()) + 1
        with torch.no_grad():
            embedded = clip.token_embedding(tokens[:, :self.length])
        self.register_buffer("sot_embedding", embedded[:, :1])  # [C, 1, D]
        self.register_buffer("suffix_embedding", embedded[:, 1 + N_CTX:])  # [C, length - 1 - n_ctx, D]
        self.ctx = nn.Parameter(torch.randn(N_CTX, embedded.shape[-1], device=tokens.device) * 0.02)

    def text_features(self):
        clip, positions = self.clip, self.clip.positional_embedding
        ctx = self.ctx.to(positions.dtype).expand(len(self.eot), -1, -1)
        x = (torch.cat([self.sot_embedding, ctx, self.suffix_embedding], dim=1) + positions[:self.length]).to(clip.dtype)
        x = clip.transformer(x, dspt.causal_mask(self.length, device=x.device))
        return clip.ln_final(x[torch.arange(len(x)), self.eot]) @ clip.text_projection


def build_clip(backbone, args, dtype):
    """CLIP of this architecture with random weights (the same on every call), frozen."""
    torch.manual_seed(0)
    return dspt.convert_weights(dspt.CLIP(**CONFIGS[backbone]).requires_grad_(False).eval().to(args.device), dtype)


def build_prompts(clip, variant, args):
    classnames, tokenizer = CLASSNAMES[args.classnames]()[:args.classes], dspt.load_tokenizer(args.bpe)
    if variant == "a":
        return dspt.PromptLearner(clip, classnames, tokenizer, n_ctx=N_CTX)
    if variant == "c":
        return dspt.PackedPromptLearner(clip, classnames, tokenizer, n_ctx=N_CTX)
    return TruncatedPrompts(clip, classnames, tokenizer)


def text_tokens(prompts):
    """Positions the text transformer processes per step, counted at its first block."""
    counts = []
    hook = prompts.clip.transformer.resblocks[0].register_forward_hook(
        lambda block, inputs, output: counts.append(inputs[0].shape[:-1].numel()))
    with torch.no_grad():
        prompts.text_features()
    hook.remove()
    return sum(counts)


def check_equivalence(backbone, args):
    """(a), (b) and (c) give the same logits (1e-5 absolute) and context gradient (1e-5 relative).

    In fp64: in fp32, rounding alone puts each variant's gradient about 1.5e-5 (relative) from
    the exact one for these random weights. The image features are random: they are common to
    all three variants, and the check is about the text side.
    """
    clip = build_clip(backbone, args, torch.float64)
    generator = torch.Generator().manual_seed(1)
    image_features = torch.randn(args.batch, clip.text_projection.shape[1], generator=generator,
                                 dtype=torch.float64).to(args.device)
    target = torch.randint(args.classes, (args.batch,), generator=generator).to(args.device)
    prompts = {variant: build_prompts(clip, variant, args) for variant in "abc"}
    results = {}
    for variant, variant_prompts in prompts.items():
        variant_prompts.ctx.data.copy_(prompts["a"].ctx)
        logits = clip.logits(image_features, variant_prompts.text_features())
        (grad,) = torch.autograd.grad(dspt.double_softmax_loss(logits, target), variant_prompts.ctx)
        results[variant] = logits.detach(), grad
    for variant in "bc":
        logit_error = (results[variant][0] - results["a"][0]).abs().max().item()
        grad_error = ((results[variant][1] - results["a"][1]).norm() / results["a"][1].norm()).item()
        assert logit_error < 1e-5 and grad_error < 1e-5, (
            f"{backbone} ({variant}) differs from (a): logits by {logit_error:.2e}, gradient by {grad_error:.2e}")
        print(f"{backbone}: ({variant}) matches (a): max |logit difference| {logit_error:.1e}, "
              f"relative gradient difference {grad_error:.1e}", flush=True)


def resident_memory(field):
    """VmRSS (resident now) or VmHWM (peak resident) of this process, in bytes; Linux only.

    Not getrusage's ru_maxrss: that carries over the parent's peak into a spawned child.
    """
    with open("/proc/self/status") as f:
        kib = next(line.split()[1] for line in f if line.startswith(field + ":"))
    return int(kib) * 1024


def make_step(clip, prompts, images, target, args):
    """dspt.train's step (without its diagnostics) as a function that returns (image s, text s)."""
    optimizer = torch.optim.SGD([prompts.ctx], lr=0.002, momentum=0.9, weight_decay=5e-4)
    scaler = torch.amp.GradScaler("cuda", enabled=args.precision == "amp")

    def now():
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter()

    def step():
        start = now()
        with dspt.autocast(args), torch.no_grad():
            image_features = clip.encode_image(images)
        middle = now()
        with dspt.autocast(args):
            loss = dspt.double_softmax_loss(clip.logits(image_features, prompts.text_features()), target)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        return middle - start, now() - middle
    return step


def run_variant(backbone, variant, args):
    """Time one variant in a fresh process, as a training run has it: a warm-up step, then --reps.

    A process of its own makes the peak memory the variant's own, and the state of the
    memory allocator too: memory another variant had left mapped or freed changed the times.
    """
    torch.set_num_threads(args.threads)
    dspt.reuse_freed_memory()
    if args.memory_limit:  # address space, which bounds the resident memory too
        limit = int(args.memory_limit * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(args.precision, torch.float32)
    clip = build_clip(backbone, args, dtype)
    prompts = build_prompts(clip, variant, args)
    images = torch.randn(args.batch, 3, 224, 224).to(args.device, dtype)
    target = torch.randint(args.classes, (args.batch,)).to(args.device)
    step = make_step(clip, prompts, images, target, args)
    tokens = text_tokens(prompts)
    cuda = args.device.startswith("cuda")
    before = torch.cuda.memory_allocated() if cuda else resident_memory("VmRSS")
    try:
        step()  # warm-up
        image_s, text_s = zip(*(step() for _ in range(args.reps)))
    except (RuntimeError, MemoryError) as e:  # torch.OutOfMemoryError is a RuntimeError
        if "memory" not in str(e).lower():
            raise
        return dict(tokens=tokens, failed=str(e).splitlines()[0][:120])
    peak = torch.cuda.max_memory_allocated() if cuda else resident_memory("VmHWM")
    return dict(step=statistics.median(i + t for i, t in zip(image_s, text_s)), image=statistics.median(image_s),
                text=statistics.median(text_s), tokens=tokens, peak=peak, increase=peak - before)


def machine(args):
    if args.device.startswith("cuda"):
        return f"{torch.cuda.get_device_name(args.device)}, torch {torch.__version__}, CUDA {torch.version.cuda}"
    with open("/proc/cpuinfo") as f:
        cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), platform.machine())
    return (f"{cpu} ({torch.backends.cpu.get_cpu_capability()}), {os.cpu_count()} cores, {args.threads} torch "
            f"threads, torch {torch.__version__}")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip(),
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add = parser.add_argument
    add("--backbones", nargs="+", choices=list(CONFIGS), default=list(CONFIGS), help="CLIP architectures")
    add("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS),
        help="text encodings to time: a, every class's full 77-token prompt (CoOp); b, the same cut "
             "after the last EOT; c, dspt.PackedPromptLearner. Speed-ups are against a")
    add("--classnames", choices=list(CLASSNAMES), default="caltech101", help="whose class names")
    add("--classes", type=int, default=100, help="number of classes: the first of the names")
    add("--batch", type=int, default=32, help="images per step")
    add("--reps", type=int, default=5, help="timed steps after one warm-up step")
    add("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    add("--precision", choices=["fp32", "fp16", "bf16", "amp"], default=None,
        help="as dspt.py's --precision; default amp on CUDA, fp32 on CPU")
    add("--threads", type=int, default=len(os.sched_getaffinity(0)), help="torch threads (the cores available)")
    add("--bpe", default=None, metavar="PATH",
        help="the tokenizer's bpe_simple_vocab_16e6.txt.gz (env DSPT_BPE); by default downloaded")
    add("--skip-check", action="store_true", help="do not check first that the variants agree")
    add("--memory-limit", type=float, metavar="GIB",
        help="the most memory (address space) a variant's process may use; one that needs more is "
             "reported as not fitting (default: no limit)")
    args = parser.parse_args(argv)
    args.variants = sorted(set(args.variants))
    available = len(CLASSNAMES[args.classnames]())
    if not 2 <= args.classes <= available:
        parser.error(f"--classes must be between 2 and {available} (the {args.classnames} names)")
    args.precision = args.precision or ("amp" if args.device.startswith("cuda") else "fp32")
    if args.precision in ("fp16", "amp") and not args.device.startswith("cuda"):
        parser.error(f"--precision {args.precision} needs a CUDA device")
    return args


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    try:
        dspt.load_tokenizer(args.bpe)  # fail early if the merges file is missing
    except dspt.UserError as e:
        raise SystemExit(f"speed.py: error: {e}")
    start = time.perf_counter()
    print(f"machine: {machine(args)}; load average {os.getloadavg()[0]:.2f}", flush=True)
    rows = []
    for backbone in args.backbones:
        if not args.skip_check:
            check_equivalence(backbone, args)
        results = {}
        for variant in args.variants:
            with concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
                results[variant] = r = pool.submit(run_variant, backbone, variant, args).result()
            if "failed" in r:
                rows.append(f"| {backbone} | {VARIANTS[variant]} | {r['tokens']} | does not fit in "
                            f"{args.memory_limit:g} GiB ({r['failed']}) | | | | | | |")
                print(rows[-1], flush=True)
                continue
            base = results.get("a")
            base = None if base is None or "failed" in base else base  # speed-ups against (a) if it ran
            speedup = (f"{base['step'] / r['step']:.1f}x | {base['text'] / r['text']:.1f}x" if base else "- | -")
            rows.append(f"| {backbone} | {VARIANTS[variant]} | {r['tokens']} | {r['step']:.3f} | {r['text']:.3f} | "
                        f"{r['image']:.3f} | {speedup} | {r['peak'] / 2**30:.2f} | {r['increase'] / 2**30:.2f} |")
            print(rows[-1], f"load average {os.getloadavg()[0]:.2f}", flush=True)
    memory = ("peak CUDA memory allocated" if args.device.startswith("cuda")
              else "peak resident memory (RSS) of the variant's process")
    print(f"\nmachine: {machine(args)}")
    print(f"{args.classes} classes ({args.classnames} names), batch {args.batch}, {N_CTX} context tokens, {args.precision}, "
          f"median of {args.reps} steps after 1 warm-up; load average at the end {os.getloadavg()[0]:.2f}\n")
    print("| backbone | variant | text tokens | step s | text s | image s | step speed-up | text speed-up "
          "| peak mem GiB | step mem GiB |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    print("\n".join(rows))
    print(f"\ntext tokens: positions through the text transformer per step. text s: text encoding forward, "
          f"loss, backward and SGD update; image s: image encoding (no gradient). peak mem: {memory}, "
          f"model included; step mem: its increase over the memory held before the first step. "
          f"Speed-ups against (a) of the same run. Total {time.perf_counter() - start:.0f} s.")


if __name__ == "__main__":
    main()
