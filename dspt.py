"""
DSPT: Double-Softmax Prompt Tuning of CLIP on few-shot data with noisy labels.

One self-contained file: OpenAI's CLIP in its own model code and tokenizer; CoOp's context
vectors, learned on K images per class whose labels are partly wrong; the double-softmax loss
L(z, y) = -log softmax(softmax(z))_y, whose gradient vanishes wherever CLIP is confident, so that
the images CLIP confidently assigns to a class other than their (wrong) label barely move the prompt.

    python dspt.py --data ./caltech101 --noise 0.5

Reading order: the method first (the losses and the label noise depend on nothing); then the
substrate, leaves first: tokenizer, CLIP, loading weights; then CoOp's prompt learner as CoOp
writes it, and the packed learner, a drop-in subclass computing the same features many times
faster; last, the data, training and the command line. Sibling scripts import this file, never the
reverse: prepare_data.py (dataset layouts), predict.py (using a prompt), baselines.py, sweep.py.
"""

import argparse
import contextlib
import csv
import ctypes
import fcntl
import gzip
import hashlib
import html
import io
import json
import math
import os
import sys
import tempfile
import time
import warnings
from collections import OrderedDict
from functools import lru_cache
from pathlib import Path
from typing import NamedTuple

import ftfy
import numpy as np
import regex
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from torchvision import transforms


# -----------------------------------------------------------------------------
# Losses. Each maps logits [N, C] and labels [N] to the mean loss over the batch.

def double_softmax_loss(logits, target):
    r"""Double-softmax cross-entropy, the DSPT loss (mean over the batch).

        p = softmax(z),   q = softmax(p),   L(z, y) = -log q_y = -p_y + log sum_j exp(p_j)

        dL/dz = J (q - e_y),   J = diag(p) - p p^T   (the Jacobian of the first softmax)

    Cross-entropy of the class probabilities rather than of the logits. Its gradient passes
    through J, which is positive semi-definite with ||J|| <= trace J = 1 - |p|^2 <= 1 - max_k p_k^2:
    it vanishes whenever the prediction is confident about any class. A mislabelled sample that
    CLIP confidently assigns to its true class therefore barely moves the prompt, whereas
    cross-entropy's gradient p - e_y is largest exactly there. Computed in fp32.
    """
    return F.cross_entropy(logits.float().softmax(dim=-1), target)

def cross_entropy_loss(logits, target):
    return F.cross_entropy(logits.float(), target)

def generalized_cross_entropy_loss(logits, target, q=0.5):
    """GCE (Zhang & Sabuncu 2018), (1 - p_y^q) / q: cross-entropy as q -> 0, MAE at q = 1."""
    log_p_y = logits.float().log_softmax(dim=-1).gather(1, target[:, None]).squeeze(1)
    return ((1 - torch.exp(q * log_p_y)) / q).mean()

def mean_absolute_error_loss(logits, target):
    """MAE between the probabilities and the one-hot label, up to a factor 2: 1 - p_y."""
    return (1 - logits.float().softmax(dim=-1).gather(1, target[:, None]).squeeze(1)).mean()

LOSSES = {"dspt": double_softmax_loss, "ce": cross_entropy_loss,
          "gce": generalized_cross_entropy_loss, "mae": mean_absolute_error_loss}


# -----------------------------------------------------------------------------
# Label noise: the K-shot training labels are corrupted; test labels stay clean.

def inject_label_noise(labels, num_classes, rate, kind="sym", seed=0):
    """Noisy copy of labels: in each class c exactly round(rate * n_c) samples get a wrong label.

    kind "sym": the wrong label is a uniformly random other class; "pair": y -> (y + 1) mod C.
    Deterministic for a seed. Returns an int64 numpy array; the input is left unchanged.
    """
    if not 0 <= rate < 1 or kind not in ("sym", "pair"):
        raise ValueError(f"noise rate {rate} is outside [0, 1), or noise kind {kind!r} is not 'sym' or 'pair'")
    labels = np.asarray(labels, dtype=np.int64)
    noisy, rng = labels.copy(), np.random.default_rng(seed)
    for c in range(num_classes):
        members = np.flatnonzero(labels == c)
        flipped = rng.choice(members, size=round(rate * len(members)), replace=False)
        shift = rng.integers(1, num_classes, size=len(flipped)) if kind == "sym" else 1
        noisy[flipped] = (c + shift) % num_classes
    return noisy


# -----------------------------------------------------------------------------
# Tokenizer: CLIP's byte-level BPE, identical in output to OpenAI's.

SOT, EOT = "<|startoftext|>", "<|endoftext|>"

def bytes_to_unicode():
    """Map every byte to a printable character, so BPE can work on strings. The printable
    bytes map to themselves and come first; the order is the vocabulary's order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]  # whitespace and control bytes
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(others)}}

class Tokenizer:
    def __init__(self, bpe_path):
        with gzip.open(bpe_path, "rt", encoding="utf-8") as f:
            lines = f.read().split("\n")
        # The vocabulary has 49,408 entries: 256 bytes, the same with </w>, the merges, 2 specials.
        n_merges = 49408 - 2 * 256 - 2
        merges = [tuple(line.split()) for line in lines[1:1 + n_merges] if line]  # line 0: header
        if len(merges) != n_merges or any(len(merge) != 2 for merge in merges):
            raise ValueError(f"it holds {len(merges)} merges, CLIP's vocabulary needs {n_merges} pairs")
        self.byte_encoder = bytes_to_unicode()
        symbols = list(self.byte_encoder.values())
        vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + [SOT, EOT]
        self.encoder = {token: i for i, token in enumerate(vocab)}
        self.merge_rank = {pair: i for i, pair in enumerate(merges)}
        self.sot, self.eot = self.encoder[SOT], self.encoder[EOT]
        self.pattern = regex.compile(r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|"
                                     r"[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+", regex.IGNORECASE)

    @lru_cache(maxsize=100_000)
    def bpe(self, word):
        """Merge the characters of one pre-token, lowest-ranked pair first, into vocab entries."""
        if word in (SOT, EOT):
            return (word,)
        parts = list(word[:-1]) + [word[-1] + "</w>"]  # </w> marks the end of a word
        while len(parts) > 1:
            best = min(zip(parts, parts[1:]), key=lambda pair: self.merge_rank.get(pair, math.inf))
            if best not in self.merge_rank:
                break
            merged, i = [], 0
            while i < len(parts):  # every occurrence of the pair, left to right
                take = 2 if tuple(parts[i:i + 2]) == best else 1
                merged.append("".join(parts[i:i + take]))
                i += take
            parts = merged
        return tuple(parts)

    def encode(self, text):
        text = regex.sub(r"\s+", " ", html.unescape(html.unescape(ftfy.fix_text(text))).strip()).strip().lower()
        ids = []
        for word in self.pattern.findall(text):
            word = "".join(self.byte_encoder[b] for b in word.encode("utf-8"))
            ids.extend(self.encoder[part] for part in self.bpe(word))
        return ids

    def tokenize(self, texts, context_length=77, truncate=False):
        """[SOT] ids [EOT], zero-padded to context_length: a LongTensor [len(texts), context_length]."""
        texts = [texts] if isinstance(texts, str) else texts
        result = torch.zeros(len(texts), context_length, dtype=torch.long)
        for i, text in enumerate(texts):
            ids = [self.sot] + self.encode(text) + [self.eot]
            if len(ids) > context_length:
                if not truncate:
                    raise ValueError(f"{text!r} is {len(ids)} tokens long, more than the context "
                                     f"length {context_length}; shorten it or pass truncate=True")
                ids = ids[:context_length - 1] + [self.eot]
            result[i, :len(ids)] = torch.tensor(ids)
        return result


# -----------------------------------------------------------------------------
# CLIP: the image and text encoders. Attribute names equal the checkpoint's keys.

class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in at least fp32, so that it also works with fp16 weights and inputs."""
    def forward(self, x):
        dtype = torch.promote_types(x.dtype, torch.float32)
        return F.layer_norm(x.to(dtype), self.normalized_shape, self.weight.to(dtype),
                            self.bias.to(dtype), self.eps).to(x.dtype)

class QuickGELU(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)

class Bottleneck(nn.Module):
    """ResNet bottleneck; strided blocks downsample with an average pool, not a strided conv."""
    def __init__(self, inplanes, planes, stride=1):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(inplanes, planes, 1, bias=False), nn.BatchNorm2d(planes)
        self.conv2, self.bn2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False), nn.BatchNorm2d(planes)
        self.avgpool = nn.AvgPool2d(stride) if stride > 1 else nn.Identity()
        self.conv3, self.bn3 = nn.Conv2d(planes, planes * 4, 1, bias=False), nn.BatchNorm2d(planes * 4)
        self.downsample = None
        if stride > 1 or inplanes != planes * 4:  # keys "-1" (no weights), "0" and "1", as in the checkpoint
            self.downsample = nn.Sequential(OrderedDict([("-1", nn.AvgPool2d(stride)), (
                "0", nn.Conv2d(inplanes, planes * 4, 1, bias=False)), ("1", nn.BatchNorm2d(planes * 4))]))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(self.avgpool(out)))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))

def split_heads(x, heads):
    return x.unflatten(-1, (heads, -1)).transpose(1, 2)  # N L D -> N heads L D/heads

def merge_heads(x):
    return x.transpose(1, 2).flatten(2)  # N heads L D/heads -> N L D

class AttentionPool2d(nn.Module):
    """Attention pooling of a feature map, with the mean feature as the only query."""
    def __init__(self, spacial_dim, embed_dim, heads, output_dim):
        super().__init__()
        self.positional_embedding = nn.Parameter(torch.randn(spacial_dim ** 2 + 1, embed_dim) / embed_dim ** 0.5)
        self.k_proj, self.q_proj, self.v_proj = (nn.Linear(embed_dim, embed_dim) for _ in range(3))
        self.c_proj, self.heads = nn.Linear(embed_dim, output_dim), heads

    def forward(self, x):
        x = x.flatten(2).transpose(1, 2)  # NCHW -> N(HW)C
        x = torch.cat([x.mean(dim=1, keepdim=True), x], dim=1) + self.positional_embedding.to(x.dtype)
        q = split_heads(self.q_proj(x[:, :1]), self.heads)
        k, v = split_heads(self.k_proj(x), self.heads), split_heads(self.v_proj(x), self.heads)
        return self.c_proj(merge_heads(F.scaled_dot_product_attention(q, k, v)))[:, 0]

class ModifiedResNet(nn.Module):
    """CLIP's ResNet: a 3-conv stem with an average pool, anti-aliased strides, attention pooling."""
    def __init__(self, layers, output_dim, heads, input_resolution, width):
        super().__init__()
        self.input_resolution = input_resolution
        self.conv1 = nn.Conv2d(3, width // 2, 3, stride=2, padding=1, bias=False)
        self.conv2 = nn.Conv2d(width // 2, width // 2, 3, padding=1, bias=False)
        self.conv3 = nn.Conv2d(width // 2, width, 3, padding=1, bias=False)
        self.bn1, self.bn2, self.bn3 = nn.BatchNorm2d(width // 2), nn.BatchNorm2d(width // 2), nn.BatchNorm2d(width)
        self.avgpool = nn.AvgPool2d(2)
        inplanes = width
        for i, blocks in enumerate(layers):  # layer1 .. layer4; each after the first halves the resolution
            planes = width * 2 ** i
            setattr(self, f"layer{i + 1}", nn.Sequential(Bottleneck(inplanes, planes, 1 if i == 0 else 2),
                                                          *[Bottleneck(planes * 4, planes) for _ in range(blocks - 1)]))
            inplanes = planes * 4
        self.attnpool = AttentionPool2d(input_resolution // 32, width * 32, heads, output_dim)

    def forward(self, x):
        # Channels-last (NHWC) memory: the same convolutions, a quarter faster on a CPU.
        x = x.to(self.conv1.weight.dtype, memory_format=torch.channels_last)
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        x = self.avgpool(F.relu(self.bn3(self.conv3(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.attnpool(x)

class Attention(nn.Module):
    """Multi-head self-attention with nn.MultiheadAttention's parameter names."""
    def __init__(self, width, heads):
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)
        nn.init.xavier_uniform_(self.in_proj_weight)

    def forward(self, x, mask=None):
        """x: [N, L, D]; mask: bool, [L, L] or [N, 1, L, L], True where query i may attend to key j."""
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)
        q, k, v = (split_heads(t, self.heads) for t in qkv.chunk(3, dim=-1))
        return self.out_proj(merge_heads(F.scaled_dot_product_attention(q, k, v, attn_mask=mask)))

class ResidualAttentionBlock(nn.Module):
    def __init__(self, width, heads):
        super().__init__()
        self.attn, self.ln_1, self.ln_2 = Attention(width, heads), LayerNorm(width), LayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict([("c_fc", nn.Linear(width, width * 4)), ("gelu", QuickGELU()),
                                              ("c_proj", nn.Linear(width * 4, width))]))

    def forward(self, x, mask=None):
        x = x + self.attn(self.ln_1(x), mask)
        return x + self.mlp(self.ln_2(x))

def causal_mask(length, device=None):
    """[length, length] bool, True where query i may attend to key j: j <= i."""
    return torch.ones(length, length, dtype=torch.bool, device=device).tril()

class Transformer(nn.Module):
    def __init__(self, width, layers, heads):
        super().__init__()
        self.width, self.layers = width, layers
        self.resblocks = nn.Sequential(*[ResidualAttentionBlock(width, heads) for _ in range(layers)])

    def forward(self, x, mask=None):
        for block in self.resblocks:
            x = block(x, mask)
        return x

class VisionTransformer(nn.Module):
    def __init__(self, input_resolution, patch_size, width, layers, heads, output_dim):
        super().__init__()
        self.input_resolution = input_resolution
        self.conv1 = nn.Conv2d(3, width, patch_size, stride=patch_size, bias=False)
        scale = width ** -0.5
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn((input_resolution // patch_size) ** 2 + 1, width))
        self.ln_pre, self.ln_post = LayerNorm(width), LayerNorm(width)
        self.transformer = Transformer(width, layers, heads)
        self.proj = nn.Parameter(scale * torch.randn(width, output_dim))

    def forward(self, x):
        x = self.conv1(x.to(self.conv1.weight.dtype)).flatten(2).transpose(1, 2)  # NCHW -> N(HW)C
        x = torch.cat([self.class_embedding.to(x.dtype).expand(len(x), 1, -1), x], dim=1)
        x = x + self.positional_embedding.to(x.dtype)
        x = self.transformer(self.ln_pre(x))
        return self.ln_post(x[:, 0]) @ self.proj

class CLIP(nn.Module):
    def __init__(self, embed_dim, image_resolution, vision_layers, vision_width, vision_patch_size,
                 context_length, vocab_size, transformer_width, transformer_heads, transformer_layers):
        super().__init__()
        if isinstance(vision_layers, (tuple, list)):
            self.visual = ModifiedResNet(vision_layers, embed_dim, vision_width * 32 // 64, image_resolution,
                                         vision_width)
        else:
            self.visual = VisionTransformer(image_resolution, vision_patch_size, vision_width, vision_layers,
                                            vision_width // 64, embed_dim)
        self.transformer = Transformer(transformer_width, transformer_layers, transformer_heads)
        self.token_embedding = nn.Embedding(vocab_size, transformer_width)
        self.positional_embedding = nn.Parameter(torch.empty(context_length, transformer_width))
        self.ln_final = LayerNorm(transformer_width)
        self.text_projection = nn.Parameter(torch.empty(transformer_width, embed_dim))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        nn.init.normal_(self.positional_embedding, std=0.01)
        nn.init.normal_(self.text_projection, std=transformer_width ** -0.5)

    @property
    def dtype(self):
        """The type of the matrix weights: fp32, or fp16/bf16 after convert_weights."""
        return self.visual.conv1.weight.dtype

    def encode_image(self, image):
        return self.visual(image)

    def encode_text(self, tokens):
        """Token ids [N, context_length] -> text features [N, embed_dim]."""
        eot = tokens.argmax(dim=-1)  # EOT has the largest id
        length = int(eot.max()) + 1  # positions after the last EOT cannot affect it (causal mask)
        x = (self.token_embedding(tokens[:, :length]) + self.positional_embedding[:length]).to(self.dtype)
        x = self.transformer(x, causal_mask(length, device=x.device))
        return self.ln_final(x[torch.arange(len(x)), eot]) @ self.text_projection

    def logits(self, image_features, text_features):
        """Scaled cosine similarities [N_images, N_texts], computed in fp32."""
        image_features = F.normalize(image_features.float(), dim=-1)
        return self.logit_scale.exp().float() * image_features @ F.normalize(text_features.float(), dim=-1).T


# -----------------------------------------------------------------------------
# Loading: the tokenizer's merges and CLIP's weights, by name (downloaded, checked) or by path.

DEFAULT_CACHE = os.environ.get("DSPT_CACHE", os.path.expanduser("~/.cache/clip"))
BPE_URL = "https://github.com/openai/CLIP/raw/main/clip/bpe_simple_vocab_16e6.txt.gz"
BPE_SHA256 = "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a"
MODEL_URL = "https://openaipublic.azureedge.net/clip/models/"
MODELS = {  # name: "<SHA256>/<file>", as OpenAI publishes them
    "RN50": "afeb0e10f9e5a86da6080e35cf09123aca3b358a0c3e3b6c78a7b63bc04b6762/RN50.pt",
    "RN101": "8fa8567bab74a42d41c5915025a8e4538c3bdbe8804a470a72f30b0d94fab599/RN101.pt",
    "RN50x4": "7e526bd135e493cef0776de27d5f42653e6b4c8bf9e0f653bb11773263205fdd/RN50x4.pt",
    "RN50x16": "52378b407f34354e150460fe41077663dd5b39c54cd0bfd2b27167a4a06ec9aa/RN50x16.pt",
    "RN50x64": "be1cfb55d75a9666199fb2206c106743da0f6468c9d327f3e0d0a543a9919d9c/RN50x64.pt",
    "ViT-B/32": "40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af/ViT-B-32.pt",
    "ViT-B/16": "5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f/ViT-B-16.pt",
    "ViT-L/14": "b8cca3fd41ae0c99ba7e8951adf17d267cdb84cd88be6f7c2e0eca1737a03836/ViT-L-14.pt",
    "ViT-L/14@336px": "3035c92b350959924f9f00213499208652fc7ea050643e8b385c2dac08641f02/ViT-L-14-336px.pt",
}
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)

class UserError(Exception):
    """A problem with the input that the user can fix; main() prints it as one line."""

def warn(message):
    print(f"dspt: warning: {message}", file=sys.stderr)

def first_line(error):
    return str(error).splitlines()[0] if str(error) else type(error).__name__

def progress(items, total, desc):
    """Yield from items, showing a one-line progress display on stderr if it is a terminal."""
    start = time.time()
    for done, item in enumerate(items, 1):
        yield item
        if sys.stderr.isatty():
            print(f"\r{desc} {done}/{total} [{time.time() - start:.0f}s]", end="\n" if done == total else "",
                  file=sys.stderr, flush=True)

def atomic_write(path, write):
    """Call write(file_object) on a temporary file beside path, then rename it to path: a file that is there
    stays whole until the new one is. The file gets the mode the umask gives, not mkstemp's 0600."""
    tmp = None
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=Path(path).parent, prefix=f".{Path(path).name}.", suffix=".part")
        os.umask(umask := os.umask(0o22))  # read the umask
        os.chmod(tmp, 0o666 & ~umask)
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except OSError as e:  # e.g. no space left on the device, or no permission
        raise UserError(f"cannot write {path} ({e.strerror}); give a place you can write to (the file that was "
                        f"there, if any, is intact)") from None
    finally:
        if tmp and os.path.exists(tmp):
            os.remove(tmp)

def sha256_of(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()

def download(url, path, sha256):
    """path, downloaded there first (checked, atomically) unless a file with this SHA256 is there."""
    if not (Path(path).is_file() and sha256_of(path) == sha256):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        try:
            torch.hub.download_url_to_file(url, str(path), hash_prefix=sha256, progress=sys.stderr.isatty())
        except RuntimeError as e:  # the SHA256 differs
            raise UserError(f"checksum mismatch for {url}: {first_line(e)}; the download is corrupt, run again"
                            ) from None
        except OSError as e:  # urllib's URLError is one
            raise UserError(f"cannot download {url} ({getattr(e, 'reason', e)}); fetch it by hand and put it at "
                            f"{path}") from None
    return Path(path)

@lru_cache(maxsize=None)
def load_tokenizer(bpe_path=None, cache_dir=DEFAULT_CACHE):
    """The tokenizer from bpe_path, $DSPT_BPE, or the merges file fetched into cache_dir."""
    bpe_path = bpe_path or os.environ.get("DSPT_BPE")
    if bpe_path and not Path(bpe_path).is_file():
        raise UserError(f"BPE merges file {bpe_path} does not exist; give the path of bpe_simple_vocab_16e6.txt.gz, "
                        f"or leave --bpe unset to download it")
    bpe_path = bpe_path or download(BPE_URL, Path(cache_dir) / "bpe_simple_vocab_16e6.txt.gz", BPE_SHA256)
    try:
        tokenizer = Tokenizer(bpe_path)
    except (OSError, EOFError, UnicodeDecodeError, ValueError) as e:  # gzip.BadGzipFile is an OSError
        raise UserError(f"cannot read the BPE merges file {bpe_path} ({first_line(e)}); give the path of "
                        f"bpe_simple_vocab_16e6.txt.gz as it is distributed") from None
    if sha256_of(bpe_path) != BPE_SHA256:  # a reordered merge gives other token ids without any error
        raise UserError(f"the BPE merges file {bpe_path} is not CLIP's (its SHA256 is not {BPE_SHA256}); give "
                        f"bpe_simple_vocab_16e6.txt.gz as it is distributed")
    return tokenizer

def build_model(state_dict):
    """A CLIP whose architecture is read off the state dict's shapes, with those weights."""
    state_dict = {k: v for k, v in state_dict.items() if k not in ("input_resolution", "context_length", "vocab_size")}

    def blocks(prefix):  # how many numbered blocks prefix.0, prefix.1, ... the weights have
        return len({k[len(prefix):].split(".")[1] for k in state_dict if k.startswith(prefix + ".")})
    vit = "visual.proj" in state_dict
    positions = state_dict["visual.positional_embedding" if vit else "visual.attnpool.positional_embedding"]
    grid = round((positions.shape[0] - 1) ** 0.5)  # the image's grid of patches (ResNet: of 32-pixel cells)
    if vit:
        vision_width, patch = state_dict["visual.conv1.weight"].shape[0], state_dict["visual.conv1.weight"].shape[-1]
        vision_layers, image_resolution = blocks("visual.transformer.resblocks"), patch * grid
    else:  # ModifiedResNet
        vision_layers = tuple(blocks(f"visual.layer{b}") for b in (1, 2, 3, 4))
        vision_width, patch, image_resolution = state_dict["visual.layer1.0.conv1.weight"].shape[0], None, 32 * grid
    width, vocab_size = state_dict["ln_final.weight"].shape[0], state_dict["token_embedding.weight"].shape[0]
    if width % 64 or vocab_size != 49408:  # CLIP's heads are 64 wide; the tokenizer's vocabulary has 49,408 entries
        raise KeyError(f"a text width of {width} (not a multiple of 64) or a vocabulary of {vocab_size} (not 49408)")
    model = CLIP(state_dict["text_projection"].shape[1], image_resolution, vision_layers, vision_width, patch,
                 context_length=state_dict["positional_embedding"].shape[0],
                 vocab_size=vocab_size, transformer_width=width,
                 transformer_heads=width // 64, transformer_layers=blocks("transformer.resblocks"))
    model.load_state_dict(state_dict)
    return model

def convert_weights(model, dtype):
    """Cast the matrix weights (convolutions, linear layers, attention, the two projections) to
    dtype, as OpenAI's fp16 model has them; norms and embeddings stay in fp32."""
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear, Attention)):
            for parameter in module.parameters(recurse=False):
                parameter.data = parameter.data.to(dtype)
    for parameter in (model.text_projection, getattr(model.visual, "proj", None)):
        if parameter is not None:
            parameter.data = parameter.data.to(dtype)
    return model

def read_state_dict(path):
    """The state dict of a TorchScript archive (the official format) or a plain state-dict file."""
    with contextlib.suppress(RuntimeError), warnings.catch_warnings():  # RuntimeError: not TorchScript
        warnings.simplefilter("ignore")  # TorchScript's deprecation notice
        return torch.jit.load(path, map_location="cpu").state_dict()
    try:
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"cannot read {path}: it is neither a TorchScript archive nor a state-dict file "
                        f"({first_line(e)})") from None
    if not isinstance(state_dict, dict):
        raise UserError(f"{path} holds a {type(state_dict).__name__}, not a state dict")
    return state_dict

def image_transform(resolution, augment=False):
    """CLIP's preprocessing; with augment, CoOp's random resized crop and flip instead."""
    bicubic = transforms.InterpolationMode.BICUBIC
    geometry = ([transforms.RandomResizedCrop(resolution, scale=(0.08, 1.0), interpolation=bicubic),
                 transforms.RandomHorizontalFlip()] if augment else
                [transforms.Resize(resolution, interpolation=bicubic), transforms.CenterCrop(resolution)])
    return transforms.Compose([*geometry, transforms.ToTensor(), transforms.Normalize(CLIP_MEAN, CLIP_STD)])

def load_clip(name_or_path, device="cpu", cache_dir=DEFAULT_CACHE):
    """(model, preprocess): CLIP frozen in eval mode in fp32, and its image preprocessing."""
    if name_or_path in MODELS:
        digest, file = MODELS[name_or_path].split("/")
        path = download(MODEL_URL + MODELS[name_or_path], Path(cache_dir) / file, sha256=digest)
    elif Path(name_or_path).is_file():
        path = name_or_path
    else:
        raise UserError(f"unknown backbone {name_or_path!r}: use one of {', '.join(MODELS)} or a checkpoint file")
    try:
        model = build_model(read_state_dict(path))
    except (KeyError, RuntimeError) as e:
        raise UserError(f"{path} is not a CLIP checkpoint ({first_line(e)})") from None
    return model.float().to(device).eval().requires_grad_(False), image_transform(model.visual.input_resolution)


# -----------------------------------------------------------------------------
# Prompt learners (CoOp): "[SOT] ctx_1 .. ctx_n <class name> . [EOT]" with learned ctx.

class PromptLearner(nn.Module):
    """CoOp's prompt learner: context vectors shared by all classes, and the text features of the
    prompts they make, computed as CoOp computes them: every class's whole prompt, tokenized with an
    "x" for each context vector, whose embedding ctx replaces, through the text transformer.

    Only `ctx` is trained; `clip` stays frozen. The context starts as n_ctx vectors of N(0, 0.02)
    noise (CoOp), or as the word embeddings of ctx_init; n_ctx is then its number of tokens (CoOp),
    or, if larger, the words come after zero vectors (ProGrad's "a photo of a" padded to 16).
    name_prefix: fixed words between the context and every class name (ProGrad's release has some).
    """
    def __init__(self, clip, classnames, tokenizer, n_ctx=None, ctx_init=None, name_prefix=""):
        super().__init__()
        self.clip, self.classnames, self.name_prefix = clip, list(classnames), name_prefix
        embed, context_length = clip.token_embedding, clip.positional_embedding.shape[0]
        device = embed.weight.device
        if ctx_init:
            try:
                init_tokens = tokenizer.tokenize(ctx_init, context_length)[0]
            except ValueError:
                raise UserError(f"--ctx-init {ctx_init!r} is longer than the text context of {context_length} "
                                f"tokens; give a few words such as \"a photo of a\"") from None
            n_words = int(init_tokens.argmax()) - 1  # EOT has the largest id
            if not 0 < n_words <= (n_ctx or n_words):
                raise UserError(f"--ctx-init {ctx_init!r} is {n_words} tokens, which does not fit --n-ctx {n_ctx}; "
                                f"give at least one word and an --n-ctx of at least {n_words}")
            words = embed(init_tokens[1:1 + n_words].to(device)).detach().float()
            ctx = torch.cat([words.new_zeros((n_ctx or n_words) - n_words, words.shape[1]), words])
        else:
            ctx = torch.randn(n_ctx or 16, embed.embedding_dim, device=device) * 0.02
        self.ctx = nn.Parameter(ctx)  # kept in fp32 whatever the precision of clip
        try:
            tokens = tokenizer.tokenize([" ".join(["x"] * len(ctx)) + f" {name_prefix}{name}." for name in classnames],
                                        context_length)
        except ValueError as e:
            raise UserError(f"a prompt does not fit: {e}") from None
        self.register_buffer("tokens", tokens.to(device), persistent=False)  # [C, context_length]

    def text_features(self, ctx=None):
        """[C, embed_dim], differentiable with respect to ctx; or, given contexts [B, n_ctx, D] (one
        per image, as instance-conditioned methods make them), [B, C, embed_dim]."""
        clip, ctx = self.clip, self.ctx if ctx is None else ctx
        (n_classes, length), batch = self.tokens.shape, ctx.shape[:-2]  # batch: () or (B,)
        embedding = clip.token_embedding(self.tokens).detach().expand(*batch, -1, -1, -1)  # [..., C, L, D]
        x = torch.cat([embedding[..., :1, :], ctx[..., None, :, :].expand(*batch, n_classes, -1, -1),
                       embedding[..., 1 + ctx.shape[-2]:, :]], dim=-2)  # SOT, ctx, "name . EOT" and padding
        x = (x + clip.positional_embedding).to(clip.dtype).reshape(-1, length, x.shape[-1])
        x = clip.transformer(x, causal_mask(length, x.device)).reshape(*batch, n_classes, length, -1)
        x = x[..., torch.arange(n_classes), self.tokens.argmax(dim=-1), :]  # each prompt's EOT (the largest id)
        return clip.ln_final(x) @ clip.text_projection

class PackedPromptLearner(PromptLearner):
    """PromptLearner's features, the same up to rounding, with a fraction of the work.

    PromptLearner runs every class's whole prompt, padded to 77 tokens, through the text
    transformer, forward and backward, at every step. This packs the prompts into rows

        [SOT] ctx_1 .. ctx_n  dog . [EOT]  great white shark . [EOT]  yin yang . [EOT] ...

    with a mask that lets every position attend to what it would see in its own prompt and
    to nothing else: the prefix "[SOT] ctx" causally; a suffix position the whole prefix and
    the earlier positions of its own suffix. Every position also gets the position embedding
    it has in its own prompt. So every hidden state, in every layer, equals the one in that
    class's own prompt, and the EOT features are CoOp's. The work saved: the prefix, the
    same in every prompt because the causal mask keeps it from seeing the class name, is
    computed once per row instead of once per class; and the padding after the EOT, which
    the causal mask keeps from affecting it, is not computed at all.
    """
    def __init__(self, clip, classnames, tokenizer, n_ctx=None, ctx_init=None, name_prefix=""):
        super().__init__(clip, classnames, tokenizer, n_ctx, ctx_init, name_prefix)
        n_prefix, ends = 1 + len(self.ctx), self.tokens.argmax(dim=-1).tolist()
        suffixes = [row[n_prefix:end + 1] for row, end in zip(self.tokens, ends)]  # name . EOT
        self.register_buffer("sot_embedding", clip.token_embedding(self.tokens[:1, 0]).detach())  # [1, D]
        suffix_embedding = clip.token_embedding(torch.cat(suffixes)).detach()  # [sum of lengths, D]
        self.register_buffer("suffix_embedding", F.pad(suffix_embedding, (0, 0, 0, 1)))  # + a padding token
        packed = pack_prompts(n_prefix, [len(t) for t in suffixes])
        for name, value in zip(("index", "position", "mask", "eot_index"), packed):
            self.register_buffer(name, value.to(self.tokens.device), persistent=False)

    def text_features(self, ctx=None):
        clip, ctx = self.clip, self.ctx if ctx is None else ctx
        batch, (rows, length) = ctx.shape[:-2], self.index.shape  # batch: () or (B,)
        pieces = torch.cat([self.sot_embedding.expand(*batch, -1, -1), ctx,
                            self.suffix_embedding.expand(*batch, -1, -1)], dim=-2)  # all fp32
        x = (pieces[..., self.index, :] + clip.positional_embedding[self.position]).to(clip.dtype)
        x = x.reshape(-1, length, x.shape[-1])  # [B * rows, length, D]
        x = clip.transformer(x, self.mask.repeat(len(x) // rows, 1, 1)[:, None])  # the same for every head
        x = x.reshape(*batch, rows * length, -1)[..., self.eot_index, :]
        return clip.ln_final(x) @ clip.text_projection

def pack_prompts(n_prefix, suffix_lengths, row_length=256):
    """Lay out the prompts "prefix suffix_c" in rows "prefix suffix_a suffix_b ...".

    Tokens are numbered: 0 .. n_prefix-1 the prefix, then the suffixes' tokens in order,
    then one padding token. Rows of about row_length tokens keep the attention, which is
    quadratic in the row's length, cheap next to the rest. Returns
      index     [rows, length]: the number of the token at each place,
      position  [rows, length]: its position in its own prompt,
      mask      [rows, length, length]: True where query i may attend to key j,
      eot_index [C]: where each prompt's EOT is in the flattened rows.
    """
    lengths = torch.tensor(suffix_lengths)
    first = lengths.cumsum(0) - lengths  # where each suffix starts among all suffix tokens
    # Cut the suffix tokens, in order, into n_rows equal parts; each suffix goes to the row
    # its middle falls in, so rows are at most about a suffix longer than row_length.
    parts = -(-int(lengths.sum()) // (row_length - n_prefix))
    used_parts, row_of = (((2 * first + lengths) * parts) // (2 * lengths.sum())).unique(return_inverse=True)
    n_rows = len(used_parts)  # renumbered: no empty rows
    length = n_prefix + max(int(lengths[row_of == r].sum()) for r in range(n_rows))
    index = torch.full((n_rows, length), n_prefix + int(lengths.sum()))  # padding by default
    position = torch.zeros(n_rows, length, dtype=torch.long)
    segment = torch.full((n_rows, length), -2)  # -1: prefix, c: class c's suffix, -2: padding
    index[:, :n_prefix] = position[:, :n_prefix] = torch.arange(n_prefix)
    segment[:, :n_prefix] = -1
    eot_index, at = torch.zeros(len(lengths), dtype=torch.long), [n_prefix] * n_rows
    for c, (r, n) in enumerate(zip(row_of.tolist(), suffix_lengths)):
        place = slice(at[r], at[r] + n)
        index[r, place] = n_prefix + first[c] + torch.arange(n)
        position[r, place] = torch.arange(n_prefix, n_prefix + n)
        segment[r, place] = c
        at[r] += n
        eot_index[c] = r * length + at[r] - 1
    query, key = segment[:, :, None], segment[:, None, :]
    return index, position, causal_mask(length) & ((key == -1) | (key == query)), eot_index


# -----------------------------------------------------------------------------
# Data: a CoOp split file and its images, or a folder of class folders. prepare_data.py lays out
# the rest so (torchvision's downloads, FGVCAircraft's lists, ImageNet's folders, train/ and test/).

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
SPLIT_FILES_URL = "https://github.com/KaiyangZhou/CoOp/blob/main/DATASETS.md"
DATASETS = {  # CoOp's benchmark: each dataset's split file, the image folder beside it, its zero-shot template
    "Caltech101": ("split_zhou_Caltech101.json", "101_ObjectCategories", "a photo of a {}."),
    "OxfordPets": ("split_zhou_OxfordPets.json", "images", "a photo of a {}, a type of pet."),
    "StanfordCars": ("split_zhou_StanfordCars.json", ".", "a photo of a {}."),
    "Flowers102": ("split_zhou_OxfordFlowers.json", "jpg", "a photo of a {}, a type of flower."),
    "Food101": ("split_zhou_Food101.json", "images", "a photo of {}, a type of food."),
    "FGVCAircraft": ("split_FGVCAircraft.json", "images", "a photo of a {}, a type of aircraft."),
    "SUN397": ("split_zhou_SUN397.json", "SUN397", "a photo of a {}."),
    "DTD": ("split_zhou_DescribableTextures.json", "images", "{} texture."),
    "EuroSAT": ("split_zhou_EuroSAT.json", "2750", "a centered satellite photo of {}."),
    "UCF101": ("split_zhou_UCF101.json", "UCF-101-midframes", "a photo of a person doing {}."),
    "ImageNet": ("split_ImageNet.json", "images", "a photo of a {}."),
    "Food101N": ("split_Food101N.json", ".", "a photo of {}, a type of food."),  # real noise; see prepare_data.py
}
CALTECH_DROPPED = {"BACKGROUND_Google", "Faces_easy"}  # CoOp's reading of Caltech101's class folders
CALTECH_RENAMED = {"airplanes": "airplane", "Faces": "face", "Leopards": "leopard", "Motorbikes": "motorbike"}
SPLIT_SEED = 1  # a split made here is the same for every --seed, as a split file is

class Dataset(NamedTuple):  # what a run takes from --data; an item is (image path, label)
    classnames: list
    train: list
    test: list
    split: str     # where the split comes from, for metrics.json
    name: str      # one of DATASETS, or "image folder"
    template: str  # CoOp's zero-shot prompt for it
    verified: dict = {}  # training image -> whether its label was verified right (Food-101N's), for some

def class_folders(root):
    return sorted(d for d in Path(root).iterdir() if d.is_dir() and not d.name.startswith("."))

def images_in(folder):
    return sorted(Path(directory) / name for directory, _, names in os.walk(folder)
                  for name in names if Path(name).suffix.lower() in IMAGE_SUFFIXES)

def read_class_folders(folder, dropped=(), renamed=None):
    """(classnames, train, test, split) of a folder of class folders ("_" in a name is a space), split
    per class into 50% train, 20% val (unused) and 30% test with SPLIT_SEED."""
    folders = [d for d in class_folders(folder) if d.name not in dropped]
    items = [(path, c) for c, d in enumerate(folders) for path in images_in(d)]
    rng, train, test = np.random.default_rng(SPLIT_SEED), [], []
    for c in range(len(folders)):
        members = [items[i] for i in rng.permutation(len(items)) if items[i][1] == c]
        n_train, n_val = round(0.5 * len(members)), round(0.2 * len(members))
        train, test = train + members[:n_train], test + members[n_train + n_val:]
    classnames = [(renamed or {}).get(d.name, d.name).replace("_", " ") for d in folders]
    return classnames, train, test, f"generated, seed {SPLIT_SEED}"

def read_split_file(split_file, images, name, template):
    """The Dataset of a CoOp split file {"train": [[path, label, class name], ...], "val": [...], "test": [...]},
    paths relative to the folder images; "_" in a name is a space. prepare_data.py's may also hold "verified":
    {path: 1 if the training image's label was verified right, 0 if wrong}."""
    damaged = f"download it again ({SPLIT_FILES_URL}), or make it again with prepare_data.py"
    try:
        split = json.loads(split_file.read_text())
        entries = [(part, path, int(label), name) for part in ("train", "test") for path, label, name in split[part]]
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"{split_file} is not a split file in CoOp's format ({type(e).__name__}: {e}); {damaged}"
                        ) from None
    names = {}
    for _, _, label, classname in entries:
        if names.setdefault(label, classname) != classname:
            raise UserError(f"{split_file} calls label {label} both {names[label]!r} and {classname!r}; {damaged}")
    if sorted(names) != list(range(len(names))):
        raise UserError(f"{split_file} has labels {sorted(names)[:5]}... that are not 0 to {len(names) - 1}; {damaged}")
    missing = [images / path for _, path, _, _ in entries if not (images / path).is_file()]
    if missing:
        raise UserError(f"{len(missing)} of the images {split_file.name} names are missing, e.g. {missing[0]}; put "
                        f"them in {images}, or if they lie as torchvision downloads them, run: python prepare_data.py "
                        f"{split_file.parent}")
    if split.get("made_by"):  # prepare_data.py's split of a dataset that CoOp gives no split file for
        warn(f"{split_file.name}: {split['made_by']}")
    train, test = ([(images / path, label) for part, path, label, _ in entries if part == p] for p in ("train", "test"))
    classnames = [names[label].replace("_", " ") for label in range(len(names))]
    verified = {images / path: bool(flag) for path, flag in split.get("verified", {}).items()}
    return Dataset(classnames, train, test, f"{split_file.name} (sha256 {sha256_of(split_file)})", name, template, verified)

def load_dataset(root):
    """The Dataset in root: a split file of DATASETS and its images, or a folder of class folders (also
    CoOp's Caltech101 folder without its split file), split here."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"data folder {root} does not exist; give an existing folder, or fetch one of CoOp's "
                        f"datasets into it with: python prepare_data.py {root} --download NAME")
    for name, (split_name, images, template) in DATASETS.items():
        if (root / split_name).is_file():
            return read_split_file(root / split_name, root / images, name, template)
    if (root / "split.json").is_file():  # prepare_data.py's, of DIR/train and DIR/test folders of class folders
        return read_split_file(root / "split.json", root, "image folder", "a photo of a {}.")
    name = "Caltech101" if (root / "101_ObjectCategories").is_dir() else "image folder"
    if name != "Caltech101" and any((root / marker).exists() for marker in (
            "images", "jpg", "2750", "SUN397", "UCF-101-midframes", "cars_train", "train", "variants.txt",
            "classnames.txt", "Food-101N_release", "food-101n")):
        raise UserError(f"{root} holds a dataset in a layout dspt.py does not read; put CoOp's split file there "
                        f"({SPLIT_FILES_URL}), or run: python prepare_data.py {root}")
    read = (read_class_folders(root / "101_ObjectCategories", CALTECH_DROPPED, CALTECH_RENAMED)
            if name == "Caltech101" else read_class_folders(root))
    if len(read[0]) < 2 or not read[1] or not read[2]:
        raise UserError(f"data folder {root} holds no usable dataset: it needs a CoOp split file and its images, or "
                        f"at least two class folders of images; if it holds one of CoOp's datasets as torchvision "
                        f"downloads it, run: python prepare_data.py {root}")
    warn(f"{root} has no split file: the split is made here (50/20/30 per class, seed {SPLIT_SEED}), so results "
         f"do not compare with published ones")
    return Dataset(*read, name, DATASETS["Caltech101"][2] if name == "Caltech101" else "a photo of a {}.")

def read_image(path):
    """The image as RGB, or None if it cannot be read or decoded."""
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError):
        return None

def sample_few_shot(items, num_classes, shots, seed):
    """Up to `shots` readable images per class, chosen at random; returns (items, n_unreadable)."""
    rng, by_class, chosen, unreadable = np.random.default_rng(seed), [[] for _ in range(num_classes)], [], 0
    for item in items:  # one pass, however many items (ImageNet has 1.28M)
        by_class[item[1]].append(item)
    for c, members in enumerate(by_class):
        found = []
        for i in rng.permutation(len(members)):
            if len(found) == shots:
                break
            if read_image(members[i][0]) is None:
                unreadable += 1
            else:
                found.append(members[i])
        if len(found) < shots:
            warn(f"class {c} has only {len(found)} readable training images, fewer than --shots {shots}; using those")
        chosen += found
    return chosen, unreadable

class ImageDataset(torch.utils.data.Dataset):
    """(image, label, index); an unreadable image gives None, which collate() drops and counts."""
    def __init__(self, items, transform):
        self.items, self.transform = items, transform

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        image = read_image(self.items[index][0])
        return None if image is None else (self.transform(image), self.items[index][1], index)

def collate(batch):
    kept = [sample for sample in batch if sample is not None]
    images, labels, indices = zip(*kept) if kept else ([], [], [])
    return torch.stack(images) if kept else None, torch.tensor(labels), torch.tensor(indices), len(batch) - len(kept)


# -----------------------------------------------------------------------------
# Training and evaluation.

def autocast(args):
    return torch.autocast("cuda", dtype=torch.float16, enabled=args.precision == "amp")

def grad_scaler(args):
    """Loss scaling for fp16 (amp, or CLIP in fp16): DSPT's gradients are deliberately tiny."""
    return torch.amp.GradScaler("cuda", enabled=args.precision in ("fp16", "amp"))

class PromptTuning:
    """CoOp's prompt tuning with a loss: the method train() steps. baselines.py's methods subclass it
    and change what they need: step's loss, the images' encoding, the figures added to each epoch's
    record. loss_fn also gives train()'s per-sample gradient diagnostics; scaler: grad_scaler(args)."""
    def __init__(self, learner, loss_fn, scaler=None):
        self.learner, self.loss_fn = learner, loss_fn
        self.scaler = scaler or torch.amp.GradScaler("cuda", enabled=False)

    def encode(self, images):  # what step() gets of a batch of images
        return self.learner.clip.encode_image(images)

    def step(self, image_features, target, index, epoch):  # (logits, loss); index: positions among the items
        logits = self.learner.clip.logits(image_features, self.learner.text_features())
        return logits, self.loss_fn(logits, target)

    def epoch_record(self, epoch):  # the method's own figures for the epoch's record
        return {}

@torch.no_grad()
def encode_images(clip, items, transform, args, desc, encode=None):
    """(features [N, embed_dim] fp32, indices of the items they belong to, n_unreadable); encode
    replaces clip.encode_image."""
    loader = torch.utils.data.DataLoader(ImageDataset(items, transform), batch_size=args.batch_size,
                                         num_workers=args.workers, collate_fn=collate)
    features, indices, unreadable = [], [], 0
    for images, _, index, bad in progress(loader, len(loader), desc):
        unreadable += bad
        if images is not None:
            with autocast(args):
                features.append((encode or clip.encode_image)(images.to(args.device, args.dtype)).float())
            indices.append(index)
    if not features:
        raise UserError(f"none of the {len(items)} images for {desc} could be read")
    return torch.cat(features), torch.cat(indices), unreadable

def learning_rate(epoch, args):
    """CoOp's schedule (Dassl's constant warm-up, then cosine over --epochs): epoch 0 at 1e-5,
    then epoch e >= 1 at 0.5 lr (1 + cos(pi (e - 1) / epochs)), the full lr first."""
    return 1e-5 if epoch == 0 else 0.5 * args.lr * (1 + math.cos(math.pi * (epoch - 1) / args.epochs))

def per_sample_gradient_norms(loss_fn, logits, target):
    """||dL_i/dz_i|| for each sample: the mean loss times N is the sum of per-sample losses."""
    logits = logits.detach().float().requires_grad_()
    return torch.autograd.grad(loss_fn(logits, target) * len(target), logits)[0].norm(dim=-1)

def accuracy(logits, labels):
    return (logits.argmax(dim=-1) == labels).float().mean().item()

def mean_or_none(values):
    return values.float().mean().item() if len(values) else None

def load_checkpoint(path):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"the checkpoint {path} is damaged ({first_line(e)}); delete it, or pass --fresh") from None

class Job(NamedTuple):
    """A run ready to train: its method, its few-shot items, their given labels and which of them are wrong (see
    train()), its args and checkpoint file, and the metrics known before training (see prepare())."""
    method: PromptTuning
    items: list
    labels: torch.Tensor
    noisy: torch.Tensor
    args: argparse.Namespace
    checkpoint: Path = None
    metrics: dict = {}

class Tuning:
    """One run's side of train(): its trained parameters, optimizer, scaler, history and checkpoint, resumed from
    the checkpoint if there is one. sweep.py steps several on the same batches; prefix starts their printed lines."""
    def __init__(self, job, prefix=""):
        self.job, self.method, self.args, self.prefix, self.state = job, job.method, job.args, prefix, None
        self.trained = {name: p for name, p in job.method.learner.named_parameters() if p.requires_grad}
        self.optimizer = torch.optim.SGD(self.trained.values(), lr=self.args.lr, momentum=0.9, weight_decay=5e-4)
        self.history = []
        if job.checkpoint and Path(job.checkpoint).is_file():
            self.state = same_run(load_checkpoint(job.checkpoint), job.checkpoint, self.args)
            for name, value in self.state["trained"].items():
                self.trained[name].data.copy_(value)
            self.optimizer.load_state_dict(self.state["optimizer"])
            self.method.scaler.load_state_dict(self.state["scaler"])
            self.history = self.state["history"]
            print(f"{prefix}resuming after epoch {len(self.history)} from {job.checkpoint}", flush=True)

    def start_epoch(self, lr):
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.losses, self.correct, self.norms, self.is_noisy = [], [], [], []

    def step(self, image_features, index, epoch, step):
        method, scaler, args = self.method, self.method.scaler, self.args
        target = self.job.labels[index].to(args.device)
        with autocast(args):
            logits, loss = method.step(image_features, target, index, epoch)
        self.optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(self.optimizer)
        scaler.update()
        self.losses.append(loss.item())
        finite = all(p.isfinite().all() for p in self.trained.values())
        if not (finite and math.isfinite(self.losses[-1])):
            raise UserError(f"training diverged at epoch {epoch + 1}, step {step} (loss {self.losses[-1]:.4g}, trained "
                            f"parameters {'' if finite else 'not '}finite): lower --lr ({args.lr:g}); no result is "
                            f"written, and the checkpoint of the last finished epoch is kept")
        self.correct.append((logits.argmax(dim=-1) == target).cpu())
        self.norms.append(per_sample_gradient_norms(method.loss_fn, logits, target).cpu())
        self.is_noisy.append(self.job.noisy[index])

    def end_epoch(self, epoch, lr, seconds, generator):
        correct, norms, is_noisy = torch.cat(self.correct), torch.cat(self.norms), torch.cat(self.is_noisy)
        self.history.append({
            "epoch": epoch + 1, "loss": float(np.mean(self.losses)), "lr": lr,
            "train_accuracy_clean": mean_or_none(correct[is_noisy == 0]),  # against the given labels:
            "train_accuracy_noisy": mean_or_none(correct[is_noisy == 1]),  # here that is memorisation
            "grad_norm_clean": mean_or_none(norms[is_noisy == 0]), "grad_norm_noisy": mean_or_none(norms[is_noisy == 1]),
            "seconds": seconds, **self.method.epoch_record(epoch)})
        print(self.prefix + format_epoch(self.history[-1], self.args.epochs), flush=True)
        if self.job.checkpoint:
            atomic_write(self.job.checkpoint, lambda f: torch.save({
                "command": command(self.args), "trained": {n: p.detach().cpu() for n, p in self.trained.items()},
                "optimizer": self.optimizer.state_dict(), "scaler": self.method.scaler.state_dict(),
                "generator": generator.get_state(), "torch_rng": torch.get_rng_state(), "history": self.history}, f))

def training_batches(method, items, args, generator):
    """(steps, batches): batches() yields an epoch's steps, each (image features, indices into items), in an order
    drawn from generator; the last partial batch is dropped. Without augmentation the images' features never
    change, so they are encoded once, here."""
    clip, batch_size = method.learner.clip, min(args.batch_size, len(items))
    if args.no_augment:
        features, kept, _ = encode_images(clip, items, image_transform(clip.visual.input_resolution), args,
                                          "encoding training images", method.encode)
        steps = len(kept) // batch_size

        def batches():
            for rows in torch.randperm(len(kept), generator=generator).split(batch_size)[:steps]:
                yield features[rows], kept[rows]
        return steps, batches
    loader = torch.utils.data.DataLoader(
        ImageDataset(items, image_transform(clip.visual.input_resolution, augment=True)), batch_size=batch_size,
        shuffle=True, drop_last=True, num_workers=args.workers, collate_fn=collate, generator=generator)

    def batches():
        for images, _, index, _ in loader:
            with torch.no_grad(), autocast(args):  # CLIP is frozen: no graph for the images
                image_features = method.encode(images.to(args.device, args.dtype))
            yield image_features, index
    return len(loader), batches

def train(method, items, labels, noisy, args, checkpoint=None):
    """Tune the method's learner on items with the given (partly wrong) labels; noisy marks the wrong ones (1, or
    True; -1: not known, as for Food-101N's unverified images). Returns the per-epoch history. After every epoch
    the state (trained parameters, optimizer, scaler, history, and the random states that decide the later batches
    and augmentations) is saved to checkpoint, if given; a run that finds one there continues after its epoch."""
    generator = torch.Generator().manual_seed(args.seed)
    steps, batches = training_batches(method, items, args, generator)
    tuning = Tuning(Job(method, items, labels, noisy, args, checkpoint))
    if tuning.state:  # the batches and augmentations go on from where they were after its epoch
        generator.set_state(tuning.state["generator"])
        torch.set_rng_state(tuning.state["torch_rng"])
    for epoch in range(len(tuning.history), args.epochs):
        start, lr = time.time(), learning_rate(epoch, args)
        tuning.start_epoch(lr)
        for step, (image_features, index) in enumerate(progress(batches(), steps, f"epoch {epoch + 1}"), 1):
            tuning.step(image_features, index, epoch, step)
        tuning.end_epoch(epoch, lr, time.time() - start, generator)
    return tuning.history

def format_epoch(record, epochs):
    def value(key, spec):
        return "-" if record[key] is None else format(record[key], spec)
    return (f"epoch {record['epoch']:3d}/{epochs}  loss {record['loss']:.4f}  lr {record['lr']:.2e}  "
            f"train acc clean {value('train_accuracy_clean', '6.1%')} noisy {value('train_accuracy_noisy', '6.1%')}  "
            f"|dL/dz| clean {value('grad_norm_clean', '.4f')} noisy {value('grad_norm_noisy', '.4f')}  "
            f"{record['seconds']:.1f}s")


# -----------------------------------------------------------------------------
# Command line: few-shot sampling, label noise, zero-shot accuracy, prompt tuning, test accuracy.

def build_parser():
    """The command line's parser; baselines.py adds its flags to it."""
    parser = argparse.ArgumentParser(
        description="Double-Softmax Prompt Tuning (DSPT) of CLIP on few-shot data with noisy labels.",
        epilog="--data holds a CoOp split file (split_zhou_<Name>.json, for " + ", ".join(DATASETS) + ") and the "
               "dataset's images in their folder beside it, as CoOp lays them out; or a folder of class folders of "
               "images (also CoOp's Caltech101 folder without its split file), split here 50/20/30 per class, the "
               "same for every --seed. prepare_data.py lays out other layouts so; predict.py uses a learned prompt.")
    add = parser.add_argument
    add("--data", metavar="DIR", required=True, help="dataset folder (see below)")
    add_model_flags(parser)
    add("--shots", type=int, default=16, metavar="K", help="training images per class (default %(default)s)")
    add("--noise", type=float, default=0.0, metavar="RATE",
        help="fraction of wrong training labels in each class, in [0, 1) (default %(default)s)")
    add("--noise-kind", choices=["sym", "pair"], default="sym",
        help="sym: a random other class; pair: class y becomes y + 1 (default %(default)s)")
    add("--loss", choices=list(LOSSES), default="dspt", help="training loss (default %(default)s)")
    add("--n-ctx", type=int, metavar="N", help="learned context vectors (default 16, or as many as --ctx-init has tokens)")
    add("--ctx-init", default="", metavar="WORDS", help='initialise the context from these words, e.g. "a photo '
        'of a", instead of N(0, 0.02) noise; with a larger --n-ctx, zero vectors come first')
    add("--epochs", type=int, default=50, metavar="N", help="training epochs, the first a warm-up at lr 1e-5 "
        "(default %(default)s, PTNL's setting; CoOp, ProGrad and NLPrompt train 200 at 16 shots)")
    add("--lr", type=float, default=0.002, help="SGD learning rate before cosine decay (default %(default)s)")
    add("--no-augment", action="store_true", help="train on fixed center crops, encoding the training images "
        "once: much faster, but not CoOp's protocol, which augments with random resized crops and flips")
    add("--verified-only", action="store_true", help="sample the few-shot set only from the images whose label "
        "was verified (Food-101N's verified subset), so that every label's truth is known; the peers sample from "
        "all of Food-101N's images")
    add("--seed", type=int, default=1, help="seed of the few-shot sample, the label noise, the context and the "
        "order (default %(default)s)")
    add("--out", metavar="DIR", help="output folder (default: runs/[<method>-]<data>-<backbone>-<loss>-<kind><noise>-"
        "<shots>shot-seed<seed>); the same command again continues an interrupted run there, or reports a finished one")
    add("--fresh", action="store_true", help="start the run in --out over, discarding its checkpoint and results")
    return parser

def add_model_flags(parser):
    """The flags of the model and the machine, which predict.py shares."""
    add = parser.add_argument
    add("--backbone", default="RN50", metavar="NAME_OR_PATH",
        help=f"CLIP model, one of {', '.join(MODELS)}, or a checkpoint file (default %(default)s)")
    add("--cache-dir", default=DEFAULT_CACHE, metavar="DIR", help="where downloads are kept; env DSPT_CACHE")
    add("--bpe", metavar="PATH", help="the tokenizer's bpe_simple_vocab_16e6.txt.gz; env DSPT_BPE (default: "
        "downloaded into --cache-dir)")
    add("--template", help="zero-shot prompt, {} stands for the class name (default: CoOp's for the dataset, "
        "else 'a photo of a {}.')")
    add("--precision", choices=["fp32", "fp16", "bf16", "amp"], help="fp16/bf16: frozen CLIP in that type; "
        "amp: fp32 weights with fp16 autocast (default: amp on CUDA, fp32 on CPU)")
    add("--device", help="torch device (default: cuda if this torch can use it, else cpu)")
    add("--batch-size", type=int, default=32, metavar="N", help="images per step (default %(default)s)")
    add("--workers", type=int, default=min(4, os.cpu_count() or 1), metavar="N",
        help="image loading processes (default %(default)s)")

def parse_args(argv=None):
    return build_parser().parse_args(argv)

def gpu_is_visible():
    """Whether the system shows an NVIDIA GPU, whether or not torch can use it."""
    return any(Path("/dev").glob("nvidia[0-9]*")) or os.path.exists("/usr/bin/nvidia-smi")

def check_numbers(args, rules):
    """rules: (flag, whether its value is valid, what it must be); the first invalid one is an error."""
    for flag, valid, wanted in rules:
        if not valid:
            raise UserError(f"{flag} must be {wanted}, not {getattr(args, flag[2:].replace('-', '_'))}")

def check_model_args(args):
    """Check the flags of add_model_flags; settle --device, --precision and the frozen model's dtype."""
    try:  # format() fails on braces other than {}; "{{}}" formats to "{}", no place for a name
        one_slot = args.template is None or args.template.format("\0").count("\0") == 1
    except (IndexError, KeyError, ValueError):
        one_slot = False
    if not one_slot:
        raise UserError(f"--template {args.template!r} must hold one {{}}, where the class name goes, and no other "
                        f"braces; e.g. \"a photo of a {{}}.\"")
    check_numbers(args, [("--batch-size", args.batch_size >= 1, "at least 1"),
                         ("--workers", args.workers >= 0, "0 or more")])
    cuda, torch_version = torch.cuda.is_available(), f"this torch ({torch.__version__})"
    if args.device is None and not cuda and gpu_is_visible():
        warn(f"an NVIDIA GPU is visible but {torch_version} cannot use CUDA, so it runs on the CPU, many times "
             f"slower; install a CUDA build of torch, or pass --device cpu")
    args.device = args.device or ("cuda" if cuda else "cpu")
    try:
        on_cuda = torch.device(args.device).type == "cuda"
    except RuntimeError:
        raise UserError(f"--device {args.device!r} is not a torch device; use cpu, cuda or cuda:N") from None
    if on_cuda and not cuda:
        raise UserError(f"--device {args.device} was asked for but {torch_version} cannot use CUDA; install a CUDA "
                        f"build of torch, or use --device cpu")
    args.precision = args.precision or ("amp" if on_cuda else "fp32")
    if args.precision in ("fp16", "amp") and not on_cuda:
        raise UserError(f"--precision {args.precision} needs a CUDA device; use fp32 or bf16 on the CPU")
    args.dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(args.precision, torch.float32)

def check_args(args):
    """Check the parsed arguments once, and fill in the defaults that depend on others."""
    check_numbers(args, [
        ("--noise", 0 <= args.noise < 1, "in [0, 1), a fraction such as 0.5"), ("--shots", args.shots >= 1, "at least 1"),
        ("--n-ctx", args.n_ctx is None or args.n_ctx >= 1, "at least 1"), ("--epochs", args.epochs >= 1, "at least 1"),
        ("--lr", math.isfinite(args.lr) and args.lr > 0, "a positive number such as 0.002"),
        ("--seed", 0 <= args.seed < 2**63, "a whole number from 0 to 2^63 - 1")])
    args.n_ctx = args.n_ctx or (None if args.ctx_init else 16)  # CoOp's; with --ctx-init, as many as its tokens
    check_model_args(args)
    if args.out is None:  # named by the settings people compare, and a digest of every argument that decides the run
        backbone = Path(args.backbone).stem if Path(args.backbone).is_file() else args.backbone.replace("/", "-")
        digest = hashlib.sha256(json.dumps(command(args), sort_keys=True).encode()).hexdigest()[:8]
        args.out = (f"runs/{Path(args.data).resolve().name}-{backbone}-{args.loss}-{args.noise_kind}{args.noise:g}"
                    f"-{args.shots}shot-seed{args.seed}-{digest}")

def command(args):
    """The arguments that decide a run's results: a run in --out continues only with the same."""
    kept = {k: v for k, v in vars(args).items() if k not in ("out", "cache_dir", "bpe", "fresh", "dtype")}
    return {**kept, "data": str(Path(args.data).resolve())}

def same_run(saved, path, args):
    """saved (read from path: metrics.json or checkpoint.pt), if a run with these arguments wrote it."""
    if not isinstance(saved, dict):
        raise UserError(f"{path} is damaged (it holds a {type(saved).__name__}); delete it, or pass --fresh")
    ours, theirs = command(args), saved.get("command", {})
    for key in {**ours, **theirs}:  # a key only one has (baselines.py's --method) differs too
        if theirs.get(key, "(none)") != ours.get(key, "(none)"):
            raise UserError(f"{path} is of a run with --{key.replace('_', '-')} {theirs.get(key, '(none)')}, not "
                            f"{ours.get(key, '(none)')}; give another --out, or pass --fresh to start over in {args.out}")
    return saved

@contextlib.contextmanager
def owning(out):
    """Hold the folder out while a run writes there: a second run into it stops at once, naming this one.
    The lock (flock) dies with the process; a folder made here for a run that failed is removed again."""
    made = not Path(out).exists()
    try:
        Path(out).mkdir(parents=True, exist_ok=True)
        lock = open(Path(out) / ".lock", "a+")
    except OSError as e:
        raise UserError(f"cannot write in --out {out} ({e.strerror}); give a folder you can write to") from None
    try:
        with lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                lock.seek(0)
                raise UserError(f"{out} is in use by another run ({lock.read().strip() or 'starting'}); wait for it "
                                f"to end, or give another --out") from None
            lock.truncate(0)
            print(f"pid {os.getpid()}: {' '.join(sys.argv)}", file=lock, flush=True)
            try:
                yield
            finally:
                lock.truncate(0)
    except BaseException:
        if made and [p.name for p in Path(out).iterdir()] == [".lock"]:
            (Path(out) / ".lock").unlink()
            Path(out).rmdir()
        raise

def finished_or_resumable(args):
    """The metrics of the same run finished in --out, else None (train() continues a checkpoint there,
    if any). Results or a checkpoint of a run with other arguments are refused; --fresh discards both."""
    metrics, checkpoint = Path(args.out) / "metrics.json", Path(args.out) / "checkpoint.pt"
    if args.fresh:
        metrics.unlink(missing_ok=True)
        checkpoint.unlink(missing_ok=True)
    if metrics.is_file():
        try:
            return same_run(json.loads(metrics.read_text()), metrics, args)
        except ValueError:
            raise UserError(f"{metrics} is damaged; delete it, or pass --fresh to run again") from None
    if checkpoint.is_file():
        same_run(load_checkpoint(checkpoint), checkpoint, args)

def load_model(args):
    """(tokenizer, clip in --precision, preprocess) for checked args."""
    clip, preprocess = load_clip(args.backbone, args.device, args.cache_dir)
    return load_tokenizer(args.bpe, args.cache_dir), convert_weights(clip, args.dtype), preprocess

def noisy_few_shot(train_items, num_classes, args, verified=None, memo=None):
    """(--shots items per class, their labels with --noise, which are wrong, n_unreadable). Without
    verified flags: a bool mask; with them (Food-101N's): int8, 1 wrong, 0 right, -1 not known.
    memo: where runs that share their images keep the sample, which depends on the seed alone."""
    if args.verified_only and not verified:
        raise UserError(f"--verified-only needs verified labels, and {args.data} has none; prepare Food-101N with "
                        f"prepare_data.py, or leave --verified-only out")
    memo, key = {} if memo is None else memo, ("few-shot sample", args.shots, args.seed, args.verified_only)
    if key not in memo:
        pool = [item for item in train_items if item[0] in verified] if args.verified_only else train_items
        memo[key] = sample_few_shot(pool, num_classes, args.shots, args.seed)
    items, unreadable = memo[key]
    clean = np.array([label for _, label in items])
    given = inject_label_noise(clean, num_classes, args.noise, args.noise_kind, args.seed)
    wrong = torch.from_numpy(given != clean)
    if verified:
        truth = torch.tensor([-1 if path not in verified else 0 if verified[path] else 1 for path, _ in items])
        wrong = torch.where(wrong, 1, truth).to(torch.int8)
    return items, torch.from_numpy(given), wrong, unreadable

def encode_test_set(clip, dataset, preprocess, args):
    """(features, labels, n_unreadable) of the readable test images, each encoded once."""
    features, kept, unreadable = encode_images(clip, dataset.test, preprocess, args, "encoding test images")
    return features, torch.tensor([dataset.test[i][1] for i in kept.tolist()], device=args.device), unreadable

def zero_shot_text_features(clip, tokenizer, template, classnames, args, memo=None):
    """Zero-shot CLIP's text features [C, embed_dim]: template filled with each class name. memo: where runs
    that share their images keep them, so that the frozen text encoder sees a group's prompts once."""
    memo = {} if memo is None else memo
    if ("zero-shot", template) not in memo:
        try:
            tokens = tokenizer.tokenize([template.format(name) for name in classnames])
        except ValueError as e:
            raise UserError(f"a zero-shot prompt does not fit: {e}; shorten --template or the class name") from None
        with torch.no_grad(), autocast(args):
            memo["zero-shot", template] = clip.encode_text(tokens.to(args.device))
    return memo["zero-shot", template]

def label_truth(noisy):
    """How many training labels are right, wrong and not known (noisy: noisy_few_shot's)."""
    return {"right": int((noisy == 0).sum()), "wrong": int((noisy == 1).sum()), "unknown": int((noisy < 0).sum())}

def save_outputs(args, learner, dataset, items, given, noisy, metrics):
    """prompt.pt, training_sample.csv (each image with its true and given label, and whether the given label
    is right, wrong or not known) and metrics.json in --out, each written whole or not at all."""
    out, text = Path(args.out), io.StringIO()
    metrics_json = json.dumps(metrics, indent=2, allow_nan=False)  # valid JSON, or nothing is written
    atomic_write(out / "prompt.pt", lambda f: torch.save({
        "ctx": learner.ctx.detach().cpu(), "classnames": dataset.classnames, "backbone": args.backbone,
        "name_prefix": learner.name_prefix,
        "trained": {n: p.detach().cpu() for n, p in learner.named_parameters() if p.requires_grad and n != "ctx"}}, f))
    rows = csv.writer(text, lineterminator="\n")
    rows.writerow(["path", "true_label", "given_label", "true_class", "given_class", "given_label_is"])
    for (image, label), given_label, wrong in zip(items, given.tolist(), noisy.tolist()):
        image = Path(image).relative_to(args.data) if Path(image).is_relative_to(args.data) else Path(image)
        rows.writerow([image.as_posix(), label, given_label, dataset.classnames[label], dataset.classnames[given_label],
                       "unknown" if wrong < 0 else "wrong" if wrong else "right"])
    atomic_write(out / "training_sample.csv", lambda f: f.write(text.getvalue().encode()))
    atomic_write(out / "metrics.json", lambda f: f.write(metrics_json.encode()))
    print(f"wrote {out / 'metrics.json'}, {out / 'prompt.pt'} and {out / 'training_sample.csv'}")

class Shared(NamedTuple):  # what runs that share their images load once
    dataset: Dataset
    tokenizer: Tokenizer
    clip: CLIP
    preprocess: transforms.Compose
    test_features: torch.Tensor  # the frozen encoder sees each test image once, for zero-shot and final accuracy
    test_labels: torch.Tensor
    unreadable_test: int
    memo: dict  # what the runs compute alike from these, computed once: the few-shot sample, baselines.py's features

def load_shared(args):
    """The Shared of checked args: the dataset, the tokenizer and CLIP in --precision, the test set's features."""
    torch.manual_seed(args.seed)
    dataset, (tokenizer, clip, preprocess) = load_dataset(args.data), load_model(args)
    return Shared(dataset, tokenizer, clip, preprocess, *encode_test_set(clip, dataset, preprocess, args), {})

def prepare(args, shared):
    """The run's Job: its few-shot sample with --noise, its zero-shot accuracy, its learner and method."""
    dataset, clip, classnames = shared.dataset, shared.clip, shared.dataset.classnames
    items, given, noisy, unreadable = noisy_few_shot(dataset.train, len(classnames), args, dataset.verified,
                                                     shared.memo)
    truth, template = label_truth(noisy), args.template or dataset.template
    known = f", {truth['right']} verified right, {truth['unknown']} not known" if dataset.verified else ""
    print(f"{dataset.name}: {len(classnames)} classes, {len(items)} training images ({truth['wrong']} with wrong "
          f"labels{known}), {len(dataset.test)} test images, {args.backbone} on {args.device} ({args.precision})")
    template_features = zero_shot_text_features(clip, shared.tokenizer, template, classnames, args, shared.memo)
    zero_shot = accuracy(clip.logits(shared.test_features, template_features), shared.test_labels)
    print(f"zero-shot test accuracy {zero_shot:.2%}")
    learner = PackedPromptLearner(clip, classnames, shared.tokenizer, args.n_ctx, args.ctx_init)
    metrics = {
        "args": {k: v for k, v in vars(args).items() if k != "dtype"}, "command": command(args),
        "dataset": dataset.name, "split": dataset.split, "template": template, "classnames": classnames,
        "train_images": len(items), "test_images": len(shared.test_labels),
        "unreadable_images": unreadable + shared.unreadable_test, "noise_rate": truth["wrong"] / len(noisy),
        **({"label_truth": truth} if dataset.verified else {}), "zero_shot_accuracy": zero_shot}
    return Job(PromptTuning(learner, LOSSES[args.loss], grad_scaler(args)), items, given, noisy, args,
               Path(args.out) / "checkpoint.pt", metrics)

def finish(job, history, shared, test_logits=None):
    """The run's metrics with its test accuracy (from test_logits, by default the learned prompts'), written
    to --out with its prompt and training sample."""
    args, learner = job.args, job.method.learner
    if test_logits is None:
        with torch.no_grad(), autocast(args):
            test_logits = shared.clip.logits(shared.test_features, learner.text_features())
    final = accuracy(test_logits, shared.test_labels)
    print(f"test accuracy {final:.2%} (zero-shot {job.metrics['zero_shot_accuracy']:.2%})")
    metrics = {**job.metrics, "test_accuracy": final, "history": history}
    save_outputs(args, learner, shared.dataset, job.items, job.labels, job.noisy, metrics)
    return metrics

def run(args, check=check_args, prepare=prepare, finish=finish):
    """Train and evaluate; returns the metrics, also written to --out, which the run holds meanwhile.
    baselines.py's runs are this with its own check, prepare and finish; sweep.py also trains runs together."""
    check(args)
    with owning(args.out):
        finished = finished_or_resumable(args)
        if finished:
            print(f"already finished: {Path(args.out) / 'metrics.json'} (test accuracy {finished['test_accuracy']:.2%}); "
                  f"pass --fresh to run it again")
            return finished
        shared = load_shared(args)
        job = prepare(args, shared)
        return finish(job, train(job.method, job.items, job.labels, job.noisy, args, job.checkpoint), shared)

def reuse_freed_memory():
    """Have glibc (Linux) keep freed memory for reuse, rather than pay at every step for the page faults of
    fresh pages for large activations (up to twice the step's time on a CPU)."""
    with contextlib.suppress(OSError, AttributeError):  # not glibc
        mallopt = ctypes.CDLL("libc.so.6").mallopt
        mallopt(-3, 2**30)  # M_MMAP_THRESHOLD: blocks under 1 GiB come from the reusable heap
        mallopt(-1, -1)  # M_TRIM_THRESHOLD: -1, never give freed heap back

def main(argv=None, name="dspt", parse=parse_args, run=run):
    """Parse argv and run; a user error exits with one line and status 1. The sibling scripts'
    main() is this with their own name, parser and run."""
    args = parse(argv)
    reuse_freed_memory()
    try:
        return run(args)
    except UserError as e:
        print(f"{name}: error: {e}", file=sys.stderr)
        raise SystemExit(1)


if __name__ == "__main__":
    main()
