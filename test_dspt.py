"""Tests for dspt.py, offline: OpenAI's own CLIP code (clip-openai) is the oracle for the model,
the loader and the tokenizer, closed forms are the oracle for the losses, and small generated
checkpoints and image folders drive main() end to end."""

import argparse
import hashlib
import json
import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.models as models

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # clip imports pkg_resources, which warns
    import clip as openai_clip

# The tokenizer's merges file ships with the reference package; nothing is downloaded.
BPE_PATH = str(Path(openai_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz")
os.environ["DSPT_BPE"] = BPE_PATH
import dspt
import prepare_data  # noqa: E402

HERE = Path(__file__).resolve().parent


def sha256(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


# -----------------------------------------------------------------------------
# Checkpoints in the official format, from random weights of the real architectures.

ARCHITECTURES = {
    "RN50": dict(embed_dim=1024, image_resolution=224, vision_layers=(3, 4, 6, 3), vision_width=64,
                 vision_patch_size=None),
    "ViT-B/32": dict(embed_dim=512, image_resolution=224, vision_layers=12, vision_width=768,
                     vision_patch_size=32),
}
TEXT_TOWER = dict(context_length=77, vocab_size=49408, transformer_width=512, transformer_heads=8,
                  transformer_layers=12)


def random_reference_clip(name, seed=0):
    """OpenAI's CLIP with random weights, converted to fp16 as the released files are.
    BatchNorm statistics and scales are randomised too, so every branch of the ResNet matters."""
    torch.manual_seed(seed)
    model = openai_clip.model.CLIP(**ARCHITECTURES[name], **TEXT_TOWER)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0, 0.1)
                module.running_mean.normal_(0, 0.1)
                module.running_var.uniform_(0.5, 1.5)
        model.logit_scale.fill_(np.log(100.0))
    openai_clip.model.convert_weights(model)
    return model.eval()


def save_torchscript_checkpoint(model, path):
    """A traced archive whose state dict carries the three extra scalars of the official files."""
    for key in ("context_length", "vocab_size"):
        delattr(model, key)
    for key, value in {"input_resolution": 224, "context_length": 77, "vocab_size": 49408}.items():
        model.register_buffer(key, torch.tensor(value))
    image = torch.randn(1, 3, 224, 224).half()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's notes on Python control flow
        traced = torch.jit.trace(model, (image, openai_clip.tokenize(["a dog"])), check_trace=False)
        traced.save(str(path))


@pytest.fixture(scope="module", params=list(ARCHITECTURES))
def checkpoints(request, tmp_path_factory):
    """(reference model in fp32, TorchScript file, plain state-dict file) for one architecture."""
    folder = tmp_path_factory.mktemp(request.param.replace("/", "-"))
    model = random_reference_clip(request.param)
    torch.save(model.state_dict(), folder / "state_dict.pt")
    save_torchscript_checkpoint(model, folder / "torchscript.pt")
    reference = openai_clip.model.build_model(torch.load(folder / "state_dict.pt")).float().eval()
    return reference, folder / "torchscript.pt", folder / "state_dict.pt"


def assert_close(actual, expected, tolerance=1e-5):
    """Max absolute difference, relative to the largest magnitude (at least 1), within tolerance."""
    scale = max(1.0, expected.abs().max().item())
    error = (actual - expected).abs().max().item() / scale
    assert error <= tolerance, f"max difference {error:.2e} (relative to {scale:.3g}) > {tolerance}"


# -----------------------------------------------------------------------------
# CLIP: parity with OpenAI's implementation.

@pytest.mark.parametrize("file_format", ["torchscript", "state_dict"])
def test_clip_matches_openai_reference_within_1e5(checkpoints, file_format):
    reference, torchscript, state_dict = checkpoints
    model, preprocess = dspt.load_clip(str(torchscript if file_format == "torchscript" else state_dict))
    assert model.visual.input_resolution == 224
    assert all(p.dtype == torch.float32 and not p.requires_grad for p in model.parameters())
    torch.manual_seed(1)
    images = torch.randn(3, 3, 224, 224)
    texts = openai_clip.tokenize(["a photo of a dog.", "a diagram", "x" * 60, "the cat sat on the mat"])
    with torch.no_grad():
        assert_close(model.encode_image(images), reference.encode_image(images))
        assert_close(model.encode_text(texts), reference.encode_text(texts))
        logits, _ = reference(images, texts)
        assert_close(model.logits(model.encode_image(images), model.encode_text(texts)), logits)


def test_preprocessing_matches_openai_reference():
    from PIL import Image
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (300, 257, 3), dtype=np.uint8))
    expected = openai_clip.clip._transform(224)(image)
    assert torch.equal(dspt.image_transform(224)(image), expected)


def test_build_model_infers_each_architecture(checkpoints):
    reference, _, state_dict = checkpoints
    model = dspt.build_model(torch.load(state_dict))
    assert model.state_dict().keys() == reference.state_dict().keys()
    assert model.transformer.layers == 12 and model.visual.input_resolution == 224


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_convert_weights_casts_the_parameters_openai_casts_to_fp16(checkpoints, dtype):
    reference, _, state_dict = checkpoints
    expected = openai_clip.model.build_model(torch.load(state_dict)).state_dict()  # OpenAI's fp16 model
    model = dspt.convert_weights(dspt.build_model(torch.load(state_dict)), dtype)
    assert model.dtype == dtype
    kept = {name for name, value in expected.items() if value.dtype != torch.float16}  # fp32, int64
    assert {"ln_final.weight", "token_embedding.weight", "positional_embedding"} <= kept
    for name, value in model.state_dict().items():
        assert value.dtype == (expected[name].dtype if name in kept else dtype), name


# -----------------------------------------------------------------------------
# Tokenizer: ids identical to OpenAI's.

def tokenizer_cases():
    classnames = (models.ResNet50_Weights.IMAGENET1K_V1.meta["categories"][::4]          # 250
                  + models.video.R3D_18_Weights.KINETICS400_V1.meta["categories"][::4]   # 100
                  + models.detection.FasterRCNN_ResNet50_FPN_Weights.COCO_V1.meta["categories"])
    handwritten = [
        "a photo of a dog.", "A PHOTO OF A DOG!", "Faces_easy", "BACKGROUND_Google", "yin_yang",
        "don't", "it's", "we're", "they've", "I'm", "you'll", "he'd", "O'Neil's", "rock'n'roll",
        "3.14159", "1,000,000", "2023-01-21", "x86_64", "version 10.2b", "R2-D2 & C-3PO",
        "café", "naïve façade", "Ångström", "Ærøskøbing", "São Paulo", "Zürich straße", "e\u0301",
        "東京タワー", "猫が好きです", "한국어 텍스트", "中文分词测试", "Ελληνικά", "Русский текст",
        "مرحبا بالعالم", "עברית", "हिन्दी", "ไทย", "🐶🐱", "I ❤️ NY", "👩‍👩‍👧‍👦 family", "🇯🇵 flag",
        "&amp;", "&lt;b&gt;bold&lt;/b&gt;", "&amp;amp;", "fish &amp; chips", "&#39;quoted&#39;", "&nbsp;x",
        "tabs\tand\nnewlines", "  leading and trailing  ", "many     spaces", "\u00a0nbsp\u2003em space",
        "<|startoftext|>", "<|endoftext|>", "a <|endoftext|> b", "!!!", "???", "...", "--", "@#$%^&*()",
        "url: https://example.com/a?b=c", "email@example.com", "C++ and C#", "$100", "100%", "#hashtag",
        "mojibake: Ã©tÃ©", "ﬁne ligature", "ＦＵＬＬＷＩＤＴＨ", "ⓒ", "½ ¾", "x²", "", " ",
    ]
    rng = np.random.default_rng(0)
    alphabet = list("abcdefghijklmnopqrstuvwxyzABCXYZ0123456789 .,;:!?'\"-_()[]&éüñ中文😀\t\n")
    random_strings = ["".join(rng.choice(alphabet, size=rng.integers(1, 40))) for _ in range(100)]
    return classnames + handwritten + random_strings


def test_tokenizer_matches_openai_on_500_varied_strings():
    cases = tokenizer_cases()
    assert len(cases) >= 500
    ours = dspt.load_tokenizer(BPE_PATH).tokenize(cases)
    expected = openai_clip.tokenize(cases)
    mismatches = [text for text, a, b in zip(cases, ours, expected) if not torch.equal(a, b)]
    assert not mismatches, f"{len(mismatches)} mismatches, e.g. {mismatches[:5]}"


def test_tokenizer_known_ids():
    ids = dspt.load_tokenizer(BPE_PATH).tokenize("a photo of a dog.")[0]
    assert ids[:8].tolist() == [49406, 320, 1125, 539, 320, 1929, 269, 49407]
    assert ids[8:].eq(0).all() and ids.shape == (77,)


def test_tokenizer_long_text_raises_unless_truncated():
    long_text = "a very long caption about many things " * 20
    with pytest.raises(ValueError, match="context length 77"):
        dspt.load_tokenizer(BPE_PATH).tokenize(long_text)
    with pytest.raises(RuntimeError):
        openai_clip.tokenize(long_text)
    truncated = dspt.load_tokenizer(BPE_PATH).tokenize([long_text, "short"], truncate=True)
    assert torch.equal(truncated, openai_clip.tokenize([long_text, "short"], truncate=True))
    assert truncated[0, -1] == 49407


def test_unreadable_bpe_files_are_one_clear_error(tmp_path):
    import gzip
    (tmp_path / "plain.txt").write_text("#version: 0.2\ni n\n")
    with gzip.open(tmp_path / "short.txt.gz", "wt") as f:
        f.write("#version: 0.2\ni n\nt h\n")
    for name, reason in (("plain.txt", "Not a gzipped file"), ("short.txt.gz", "2 merges")):
        with pytest.raises(dspt.UserError, match="cannot read the BPE merges file") as error:
            dspt.load_tokenizer(str(tmp_path / name))
        assert reason in str(error.value)
    with pytest.raises(dspt.UserError, match="does not exist"):
        dspt.load_tokenizer(str(tmp_path / "missing.txt.gz"))


def test_bpe_file_is_fetched_and_verified(tmp_path, monkeypatch):
    monkeypatch.setattr(dspt, "BPE_URL", Path(BPE_PATH).as_uri())
    monkeypatch.delenv("DSPT_BPE")
    tokenizer = dspt.load_tokenizer(None, str(tmp_path))
    assert sha256(tmp_path / "bpe_simple_vocab_16e6.txt.gz") == dspt.BPE_SHA256
    assert tokenizer.encode("hello world") == dspt.load_tokenizer(BPE_PATH).encode("hello world")


# -----------------------------------------------------------------------------
# Losses: closed forms, the vanishing gradient, numerical range.

def closed_forms(logits, target):
    """Per-sample DSPT loss and dL/dz in float64: L = -p_y + log sum exp(p), dL/dz = J (q - e_y)."""
    z = logits.double()
    p = z.softmax(-1)
    q = p.softmax(-1)
    e_y = torch.nn.functional.one_hot(target, z.shape[1]).double()
    loss = -p.gather(1, target[:, None]).squeeze(1) + torch.logsumexp(p, -1)
    jacobian = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    grad = (jacobian @ (q - e_y)[:, :, None]).squeeze(-1)
    return loss, grad


@pytest.mark.parametrize("scale", [1.0, 100.0])
def test_double_softmax_loss_and_gradient_equal_closed_form(scale):
    torch.manual_seed(0)
    logits = (scale * torch.randn(64, 10)).requires_grad_()
    target = torch.randint(0, 10, (64,))
    loss = dspt.double_softmax_loss(logits, target)
    loss.backward()
    expected_loss, expected_grad = closed_forms(logits.detach(), target)
    assert abs(loss.item() - expected_loss.mean().item()) < 1e-6
    torch.testing.assert_close(logits.grad.double(), expected_grad / 64, rtol=1e-5, atol=1e-8)


def test_double_softmax_loss_by_hand_for_two_classes():
    # z = (log 3, 0): p = (3/4, 1/4), q = softmax(p) = (1, e^(-1/2)) / (1 + e^(-1/2)), so
    # L(z, 0) = log(1 + e^(-1/2)) = 0.474 and L(z, 1) = log(1 + e^(1/2)) = 0.974; cross-entropy
    # would give log(4/3) = 0.288 and log 4 = 1.386.
    z = torch.tensor([[math.log(3), 0.0]])
    assert dspt.double_softmax_loss(z, torch.tensor([0])).item() == pytest.approx(math.log(1 + math.exp(-0.5)))
    assert dspt.double_softmax_loss(z, torch.tensor([1])).item() == pytest.approx(math.log(1 + math.exp(0.5)))
    # dL/dz_0 = p_0 p_1 (q_0 - e_y0 - q_1 + e_y1): for y = 0, (3/16) (-2 / (1 + e^(1/2)))
    z.requires_grad_()
    dspt.double_softmax_loss(z, torch.tensor([0])).backward()
    expected = 3 / 16 * -2 / (1 + math.exp(0.5))
    assert z.grad[0].tolist() == pytest.approx([expected, -expected])


def test_other_losses_equal_closed_forms():
    torch.manual_seed(0)
    logits, target = torch.randn(16, 5), torch.randint(0, 5, (16,))
    p_y = logits.double().softmax(-1)[torch.arange(16), target]
    assert dspt.cross_entropy_loss(logits, target).item() == pytest.approx(-p_y.log().mean().item(), rel=1e-6)
    assert dspt.generalized_cross_entropy_loss(logits, target).item() == pytest.approx(
        ((1 - p_y ** 0.5) / 0.5).mean().item(), rel=1e-6)
    assert dspt.mean_absolute_error_loss(logits, target).item() == pytest.approx((1 - p_y).mean().item(), rel=1e-6)


def test_dspt_gradient_vanishes_for_confident_wrong_predictions():
    # CLIP-like logits (100 x cosine): class 3 wins by a margin of 20, the label says 0.
    logits = torch.full((1, 10), 20.0)
    logits[0, 3] = 40.0
    target = torch.tensor([0])
    norms = {name: dspt.per_sample_gradient_norms(dspt.LOSSES[name], logits, target).item()
             for name in ("dspt", "ce")}
    assert norms["dspt"] < 1e-7
    assert norms["ce"] > 1.41  # ~ sqrt(2), the largest possible


def test_dspt_gradient_stays_for_uncertain_predictions():
    logits, target = torch.zeros(1, 10), torch.tensor([0])
    assert dspt.per_sample_gradient_norms(dspt.double_softmax_loss, logits, target).item() > 0.05


@pytest.mark.parametrize("magnitude", [1.0, 1e2, 1e3, 1e4])
def test_losses_are_finite_for_large_and_fp16_logits(magnitude):
    torch.manual_seed(0)
    target = torch.randint(0, 7, (8,))
    for dtype in (torch.float32, torch.float16):
        logits = (magnitude * torch.randn(8, 7)).clamp(-1e4, 1e4).to(dtype).requires_grad_()
        for name, loss_fn in dspt.LOSSES.items():
            loss = loss_fn(logits, target)
            (grad,) = torch.autograd.grad(loss, logits)
            assert loss.dtype == torch.float32, name
            assert torch.isfinite(loss) and torch.isfinite(grad).all(), (name, dtype, magnitude)
    half = (10 * torch.randn(8, 7)).half()
    assert dspt.double_softmax_loss(half, target).item() == dspt.double_softmax_loss(half.float(), target).item()


# -----------------------------------------------------------------------------
# Label noise.

def test_noise_flips_exactly_round_rate_n_in_each_class():
    labels = np.repeat(np.arange(10), [16, 16, 16, 16, 16, 3, 5, 7, 9, 1])
    for rate in (0.125, 0.25, 0.375, 0.5, 0.625, 0.75):
        for kind in ("sym", "pair"):
            noisy = dspt.inject_label_noise(labels, 10, rate, kind, seed=3)
            for c in range(10):
                members = labels == c
                assert (noisy[members] != c).sum() == round(rate * members.sum())


def test_symmetric_noise_picks_other_classes_uniformly():
    labels = np.repeat(np.arange(5), 2000)
    noisy = dspt.inject_label_noise(labels, 5, 0.5, "sym", seed=0)
    flipped = noisy != labels
    for c in range(5):
        targets = noisy[flipped & (labels == c)]
        counts = np.bincount(targets, minlength=5)
        assert counts[c] == 0
        assert np.all(np.abs(counts[np.arange(5) != c] - 250) < 60)  # 1000 flips over 4 classes


def test_pair_noise_maps_y_to_y_plus_1():
    labels = np.repeat(np.arange(4), 16)
    noisy = dspt.inject_label_noise(labels, 4, 0.5, "pair", seed=0)
    flipped = noisy != labels
    assert np.array_equal(noisy[flipped], (labels[flipped] + 1) % 4)


def test_noise_is_deterministic_per_seed_and_leaves_input_alone():
    labels = list(np.repeat(np.arange(8), 16))
    first = dspt.inject_label_noise(labels, 8, 0.5, "sym", seed=1)
    assert np.array_equal(first, dspt.inject_label_noise(labels, 8, 0.5, "sym", seed=1))
    assert not np.array_equal(first, dspt.inject_label_noise(labels, 8, 0.5, "sym", seed=2))
    assert labels == list(np.repeat(np.arange(8), 16))


def test_noise_rate_zero_changes_nothing_and_bad_rates_raise():
    labels = np.repeat(np.arange(8), 16)
    assert np.array_equal(dspt.inject_label_noise(labels, 8, 0.0, "sym", seed=1), labels)
    for rate in (-0.1, 1.0, 1.5):
        with pytest.raises(ValueError, match="outside"):
            dspt.inject_label_noise(labels, 8, rate)


# -----------------------------------------------------------------------------
# Prompt learner: the prompt computation against OpenAI's text transformer.

def coop_text_features(reference, tokenizer, ctx, classnames):
    """CoOp's straightforward computation with OpenAI's modules: every class's full 77-token
    prompt, the placeholder embeddings replaced by ctx, through the whole text transformer."""
    n_ctx = len(ctx)
    tokens = tokenizer.tokenize([" ".join(["x"] * n_ctx) + f" {name}." for name in classnames])
    x = reference.token_embedding(tokens)
    x = torch.cat([x[:, :1], ctx.expand(len(classnames), -1, -1), x[:, 1 + n_ctx:]], dim=1)
    x = x + reference.positional_embedding
    x = reference.transformer(x.permute(1, 0, 2)).permute(1, 0, 2)  # NLD -> LND -> NLD
    x = reference.ln_final(x)
    return x[torch.arange(len(x)), tokens.argmax(-1)] @ reference.text_projection


CLASSNAMES = ["dog", "great white shark", "yin yang", "airplane", "crayfish", "sea horse",
              "Windsor tie", "motorbike", "T-shirt", "ceiling fan"]
# 125 ImageNet names of 1 to 7 tokens: their prompts fill three packed rows.
MANY_CLASSNAMES = models.ResNet50_Weights.IMAGENET1K_V1.meta["categories"][1::8]


@pytest.mark.parametrize("learner_class", ["PromptLearner", "PackedPromptLearner"])
@pytest.mark.parametrize("classnames", [CLASSNAMES, MANY_CLASSNAMES], ids=["one-row", "three-rows"])
def test_prompt_learners_equal_coop_computation_with_openai_modules(checkpoints, classnames, learner_class):
    reference, _, state_dict = checkpoints
    model, _ = dspt.load_clip(str(state_dict))
    tokenizer = dspt.load_tokenizer(BPE_PATH)
    torch.manual_seed(0)
    learner = getattr(dspt, learner_class)(model, classnames, tokenizer, n_ctx=16)
    if learner_class == "PackedPromptLearner":
        assert len(learner.index) == (1 if classnames is CLASSNAMES else 3)
    image_features = torch.randn(8, model.text_projection.shape[1])
    target = torch.randint(0, len(classnames), (8,))

    logits = model.logits(image_features, learner.text_features())
    dspt.double_softmax_loss(logits, target).backward()

    ctx = learner.ctx.detach().clone().requires_grad_()
    reference.requires_grad_(False)
    expected = model.logits(image_features, coop_text_features(reference, tokenizer, ctx, classnames))
    dspt.double_softmax_loss(expected, target).backward()

    assert_close(logits.detach(), expected.detach())
    relative = ((learner.ctx.grad - ctx.grad).norm() / ctx.grad.norm()).item()
    assert relative < 1e-5, relative


def test_packed_rows_show_each_prompt_exactly_its_own_tokens():
    n_prefix, lengths = 3, [2, 5, 1, 4, 3, 2, 6]
    index, position, mask, eot_index = dspt.pack_prompts(n_prefix, lengths, row_length=10)
    rows, length = index.shape
    assert rows > 1 and mask.shape == (rows, length, length)
    assert length <= 10 + max(lengths)
    padding = n_prefix + sum(lengths)
    for c, n in enumerate(lengths):
        own_tokens = list(range(n_prefix)) + [n_prefix + sum(lengths[:c]) + k for k in range(n)]
        row, eot = divmod(int(eot_index[c]), length)
        assert index[row, eot] == own_tokens[-1]
        # Every place of this prompt attends to exactly the places of its prompt up to itself,
        # which hold its tokens in order, each with its position in the prompt.
        places = [int(torch.nonzero(index[row] == token)[0]) for token in own_tokens]
        for i, place in enumerate(places):
            seen = torch.nonzero(mask[row, place]).flatten().tolist()
            assert seen == places[:i + 1], (c, i)
            assert position[row, place] == i
    suffix_tokens = index[:, n_prefix:][index[:, n_prefix:] != padding]
    assert sorted(suffix_tokens.tolist()) == list(range(n_prefix, padding))  # each suffix token once
    assert (index[:, n_prefix] != padding).all()  # no empty row
    assert (mask.sum(-1) > 0).all()  # padding attends somewhere too: no row of -inf in softmax


def test_prompt_learner_with_template_context_equals_zero_shot_clip(checkpoints):
    _, _, state_dict = checkpoints
    model, _ = dspt.load_clip(str(state_dict))
    tokenizer = dspt.load_tokenizer(BPE_PATH)
    image_features = torch.randn(5, model.text_projection.shape[1])
    zero_shot = model.encode_text(tokenizer.tokenize([f"a photo of a {name}." for name in CLASSNAMES]))
    for learner_class in (dspt.PromptLearner, dspt.PackedPromptLearner):
        learner = learner_class(model, CLASSNAMES, tokenizer, ctx_init="a photo of a")
        assert learner.ctx.shape == (4, 512)
        with torch.no_grad():
            assert_close(model.logits(image_features, learner.text_features()),
                         model.logits(image_features, zero_shot))


def packed_and_straightforward(model, classnames, precision, device):
    """Logits and ctx gradients of the DSPT loss, by PackedPromptLearner and by PromptLearner (CoOp's
    straightforward computation: every class's whole prompt), from the same context, under precision."""
    tokenizer = dspt.load_tokenizer(BPE_PATH)
    torch.manual_seed(0)
    packed = dspt.PackedPromptLearner(model, classnames, tokenizer, n_ctx=16)
    plain = dspt.PromptLearner(model, classnames, tokenizer, n_ctx=16)
    plain.ctx.data.copy_(packed.ctx.data)
    image_features = torch.randn(8, model.text_projection.shape[1], device=device)
    target = torch.randint(0, len(classnames), (8,), device=device)
    args = argparse.Namespace(precision=precision)
    results = []
    for learner in (packed, plain):
        with dspt.autocast(args):
            logits = model.logits(image_features, learner.text_features())
            dspt.double_softmax_loss(logits, target).backward()
        results.append((logits.detach().float().cpu(), learner.ctx.grad.cpu()))
    return results


@pytest.mark.parametrize("precision, logit_tolerance, gradient_tolerance", [("fp32", 1e-5, 1e-4)])
def test_packed_learner_equals_the_plain_learner_with_batched_contexts(checkpoints, precision, logit_tolerance,
                                                                       gradient_tolerance):
    _, _, state_dict = checkpoints
    model, _ = dspt.load_clip(str(state_dict))
    (logits, gradient), (expected_logits, expected_gradient) = packed_and_straightforward(
        model, MANY_CLASSNAMES[:40], precision, "cpu")
    assert_close(logits, expected_logits, logit_tolerance)
    assert ((gradient - expected_gradient).norm() / expected_gradient.norm()).item() < gradient_tolerance
    tokenizer = dspt.load_tokenizer(BPE_PATH)
    torch.manual_seed(1)
    contexts = torch.randn(3, 16, model.ln_final.weight.shape[0]) * 0.02  # one per image, as VisPrompt makes them
    packed = dspt.PackedPromptLearner(model, CLASSNAMES, tokenizer, n_ctx=16).text_features(contexts)
    plain = dspt.PromptLearner(model, CLASSNAMES, tokenizer, n_ctx=16).text_features(contexts)
    assert packed.shape == plain.shape == (3, len(CLASSNAMES), model.text_projection.shape[1])
    assert_close(packed.detach(), plain.detach())


cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@cuda_only
@pytest.mark.parametrize("precision, logit_tolerance, gradient_tolerance",
                         [("fp32", 1e-5, 1e-4), ("amp", 1e-2, 0.1), ("bf16", 2e-2, 0.35)])
def test_packed_prompts_equal_the_straightforward_computation_on_cuda(checkpoints, precision, logit_tolerance,
                                                                      gradient_tolerance):
    # The two computations round differently; in bf16 on a CPU, with a random 12-layer text tower,
    # they differed by 0.4% in the logits and 17% (relative norm) in the context gradient.
    _, _, state_dict = checkpoints
    model, _ = dspt.load_clip(str(state_dict), "cuda")
    if precision == "bf16":
        dspt.convert_weights(model, torch.bfloat16)
    (logits, gradient), (expected_logits, expected_gradient) = packed_and_straightforward(
        model, MANY_CLASSNAMES, precision, "cuda")
    assert_close(logits, expected_logits, logit_tolerance)
    assert ((gradient - expected_gradient).norm() / expected_gradient.norm()).item() < gradient_tolerance


@cuda_only
def test_fp16_training_step_with_the_scaler_moves_the_context(tmp_path, image_folder, tiny_checkpoint, learners):
    metrics = run_main(tmp_path, image_folder, "--device", "cuda", "--precision", "fp16", "--noise", "0.5",
                       backbone=tiny_checkpoint)
    (learner, initial_ctx), = learners
    assert learner.clip.dtype == torch.float16 and learner.ctx.dtype == torch.float32
    assert torch.isfinite(learner.ctx).all() and not torch.equal(learner.ctx.detach(), initial_ctx)
    assert all(record["grad_norm_clean"] > 0 for record in metrics["history"])


def test_gradients_reach_the_context_only(tiny_checkpoint):
    model, _ = dspt.load_clip(str(tiny_checkpoint))
    learner = dspt.PromptLearner(model, CLASSNAMES[:3], dspt.load_tokenizer(BPE_PATH), n_ctx=4)
    images = torch.randn(2, 3, 32, 32)
    logits = model.logits(model.encode_image(images), learner.text_features())
    dspt.double_softmax_loss(logits, torch.tensor([0, 2])).backward()
    assert learner.ctx.grad is not None and learner.ctx.grad.abs().sum() > 0
    assert [name for name, p in learner.named_parameters() if p.requires_grad] == ["ctx"]
    assert all(p.grad is None for p in model.parameters())


PAGE_FAULTS = """
import resource, sys, torch, dspt
if sys.argv[1] == "reuse":
    dspt.reuse_freed_memory()
counts = []
for _ in range(12):  # allocate and free a 64 MiB tensor: 16384 pages of 4 KiB
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.ones(2**24)
    counts.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(sum(counts[4:]))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator: Linux only")
def test_reuse_freed_memory_stops_page_faults_of_repeated_large_tensors():
    def faults(mode):
        result = subprocess.run([sys.executable, "-c", PAGE_FAULTS, mode], cwd=HERE, capture_output=True,
                                text=True, check=True)
        return int(result.stdout)
    default, reuse = faults("default"), faults("reuse")
    assert default >= 8 * 32  # at least one fault per 2 MiB huge page, for each of 8 tensors
    assert reuse * 4 < default, (reuse, default)  # here: 0 or 16384 (one tensor's) against 131072


# -----------------------------------------------------------------------------
# End to end: main() on generated image folders with a small checkpoint.

@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """A small ViT CLIP (32 px, 2 layers, width 64) with the real vocabulary, as a state dict."""
    torch.manual_seed(0)
    model = dspt.CLIP(embed_dim=32, image_resolution=32, vision_layers=2, vision_width=64,
                      vision_patch_size=8, context_length=77, vocab_size=49408,
                      transformer_width=64, transformer_heads=1, transformer_layers=2)
    path = tmp_path_factory.mktemp("checkpoint") / "tiny.pt"
    torch.save(model.state_dict(), path)
    return path


def make_images(folder, count, seed, size=(40, 48)):
    from PIL import Image
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        pixels = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{i:03d}.jpg")


@pytest.fixture
def image_folder(tmp_path):
    for c, name in enumerate(["red_square", "blue circle", "green triangle"]):
        make_images(tmp_path / "data" / name, 12, seed=c)
    return tmp_path / "data"


@pytest.fixture
def learners(monkeypatch):
    """Every PackedPromptLearner that main() builds, with a copy of its context as it started."""
    created = []

    class RecordedPromptLearner(dspt.PackedPromptLearner):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            created.append((self, self.ctx.detach().clone()))

    monkeypatch.setattr(dspt, "PackedPromptLearner", RecordedPromptLearner)
    return created


@pytest.fixture(scope="session")
def learnable_task(tmp_path_factory):
    """A task the small model can learn: red, green and blue images (a distinct colour per class,
    with pixel noise), and the small checkpoint with CLIP's logit scale of 100."""
    from PIL import Image
    root = tmp_path_factory.mktemp("learnable")
    rng = np.random.default_rng(0)
    for name, rgb in {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}.items():
        (root / "data" / name).mkdir(parents=True)
        for i in range(12):
            pixels = np.clip(np.array(rgb) + rng.integers(-40, 40, (40, 48, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / "data" / name / f"{i:03d}.png")
    torch.manual_seed(0)
    model = dspt.CLIP(embed_dim=32, image_resolution=32, vision_layers=2, vision_width=64,
                      vision_patch_size=8, context_length=77, vocab_size=49408,
                      transformer_width=64, transformer_heads=1, transformer_layers=2)
    model.logit_scale.data.fill_(math.log(100))
    torch.save(model.state_dict(), root / "scale100.pt")
    return root / "data", root / "scale100.pt"


def run_main(tmp_path, data, *extra, backbone=None):
    argv = ["--data", str(data), "--backbone", str(backbone), "--epochs", "2", "--shots", "4",
            "--batch-size", "4", "--workers", "0", "--n-ctx", "4", "--out", str(tmp_path / "out"), *extra]
    return dspt.main(argv)


def test_main_trains_and_writes_metrics_and_prompt(tmp_path, image_folder, tiny_checkpoint, capsys, learners):
    metrics = run_main(tmp_path, image_folder, "--noise", "0.5", backbone=tiny_checkpoint)
    written = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert written == json.loads(json.dumps(metrics))
    assert written["args"]["noise"] == 0.5 and written["args"]["loss"] == "dspt"
    assert written["classnames"] == ["blue circle", "green triangle", "red square"]
    assert written["train_images"] == 12 and written["test_images"] == 12
    assert written["noise_rate"] == 0.5  # round(0.5 * 4) = 2 wrong labels in each class
    assert 0 <= written["zero_shot_accuracy"] <= 1 and 0 <= written["test_accuracy"] <= 1
    assert [record["epoch"] for record in written["history"]] == [1, 2]
    assert [record["lr"] for record in written["history"]] == [1e-5, 0.002]  # warm-up, then the full lr
    for record in written["history"]:
        assert record["grad_norm_clean"] > 0 and record["grad_norm_noisy"] > 0
        assert 0 <= record["train_accuracy_noisy"] <= 1
    prompt = torch.load(tmp_path / "out" / "prompt.pt")
    assert prompt["ctx"].shape == (4, 64) and prompt["classnames"] == written["classnames"]
    assert prompt["backbone"] == str(tiny_checkpoint)
    (learner, initial_ctx), = learners
    assert torch.equal(prompt["ctx"], learner.ctx.detach())
    assert (prompt["ctx"] - initial_ctx).norm() > 1e-3 * initial_ctx.norm()  # the steps moved it
    out = capsys.readouterr().out
    assert "zero-shot test accuracy" in out and out.count("epoch ") == 2
    assert not list((tmp_path / "out").glob("*.part"))


@pytest.mark.parametrize("loss", ["ce", "dspt"])
def test_tuning_learns_a_task_the_model_can_learn(tmp_path, learnable_task, learners, loss):
    # Measured with these settings: from the warm-up epoch to the last, the mean training loss
    # falls from 1.45 to 1.11 (ce) and from 1.18 to 1.06 (dspt), and training accuracy rises
    # from 1/3 to 2/3. Without a working optimizer step neither moves.
    data, checkpoint = learnable_task
    metrics = run_main(tmp_path, data, "--loss", loss, "--no-augment", "--epochs", "10", "--lr", "0.1",
                       "--shots", "6", "--batch-size", "6", backbone=checkpoint)
    first, last = metrics["history"][0], metrics["history"][-1]
    assert last["loss"] < first["loss"] - 0.1, (first["loss"], last["loss"])
    assert last["train_accuracy_clean"] >= first["train_accuracy_clean"] + 0.3
    (learner, initial_ctx), = learners
    assert (learner.ctx.detach() - initial_ctx).norm() > 0.1 * initial_ctx.norm()


def test_ctx_init_starts_the_context_at_the_words_embeddings(tmp_path, image_folder, tiny_checkpoint, learners):
    tokenizer = dspt.load_tokenizer(BPE_PATH)
    model, _ = dspt.load_clip(str(tiny_checkpoint))
    words = model.token_embedding(torch.tensor(tokenizer.encode("a photo of a")))  # 4 tokens
    run_main(tmp_path, image_folder, "--ctx-init", "a photo of a", "--n-ctx", "4", backbone=tiny_checkpoint)
    run_main(tmp_path / "six", image_folder, "--ctx-init", "a photo of a", "--n-ctx", "6", backbone=tiny_checkpoint)
    (_, four), (_, six) = learners
    assert torch.equal(four, words)
    assert torch.equal(six, torch.cat([torch.zeros(2, 64), words]))  # ProGrad's padding comes first


def test_ctx_init_sets_the_number_of_context_vectors_unless_n_ctx_is_given(tiny_checkpoint):
    model, _ = dspt.load_clip(str(tiny_checkpoint))
    tokenizer = dspt.load_tokenizer(BPE_PATH)
    assert dspt.PromptLearner(model, CLASSNAMES, tokenizer, ctx_init="a photo of a").ctx.shape == (4, 64)
    assert dspt.PromptLearner(model, CLASSNAMES, tokenizer, n_ctx=16, ctx_init="a photo of a").ctx.shape == (16, 64)
    assert dspt.PromptLearner(model, CLASSNAMES, tokenizer).ctx.shape == (16, 64)  # CoOp's default


def test_precision_bf16_puts_the_frozen_model_in_bf16(tmp_path, image_folder, tiny_checkpoint, learners):
    metrics = run_main(tmp_path, image_folder, "--precision", "bf16", "--no-augment", backbone=tiny_checkpoint)
    (learner, initial_ctx), = learners
    clip = learner.clip
    assert clip.dtype == torch.bfloat16 and clip.transformer.resblocks[0].mlp.c_fc.weight.dtype == torch.bfloat16
    assert clip.ln_final.weight.dtype == torch.float32 and clip.token_embedding.weight.dtype == torch.float32
    assert learner.ctx.dtype == torch.float32 and not torch.equal(learner.ctx.detach(), initial_ctx)
    assert metrics["args"]["precision"] == "bf16"


@pytest.mark.parametrize("extra", [["--loss", "gce"], ["--loss", "mae", "--noise-kind", "pair", "--noise", "0.25"]])
def test_main_options_run(tmp_path, image_folder, tiny_checkpoint, extra):
    metrics = run_main(tmp_path, image_folder, *extra, backbone=tiny_checkpoint)
    assert len(metrics["history"]) == 2 and (tmp_path / "out" / "prompt.pt").is_file()


def test_learning_rate_is_dassl_constant_warm_up_then_cosine():
    args = dspt.parse_args(["--data", "x", "--epochs", "10", "--lr", "0.002"])
    rates = [dspt.learning_rate(epoch, args) for epoch in range(10)]
    # 0.5 lr (1 + cos(pi (e - 1) / E)) after the warm-up epoch: cos(0) = 1, cos(pi/2) = 0
    assert rates[0] == 1e-5 and rates[1] == 0.002 and rates[6] == pytest.approx(0.001)
    assert rates[9] == pytest.approx(0.001 * (1 + math.cos(0.8 * math.pi)))
    assert all(a > b for a, b in zip(rates[1:], rates[2:]))


def test_no_augment_trains_on_features_encoded_once(tmp_path, image_folder, tiny_checkpoint, monkeypatch):
    calls = []
    original = dspt.CLIP.encode_image
    monkeypatch.setattr(dspt.CLIP, "encode_image", lambda self, x: calls.append(len(x)) or original(self, x))
    run_main(tmp_path, image_folder, "--no-augment", backbone=tiny_checkpoint)
    assert sum(calls) == 12 + 12  # the test images and the training images, once each


def test_help_documents_every_flag():
    result = subprocess.run([sys.executable, str(HERE / "dspt.py"), "--help"], capture_output=True, text=True)
    assert result.returncode == 0
    parser_flags = ["--data", "--backbone", "--cache-dir", "--bpe", "--shots", "--noise",
                    "--noise-kind", "--loss", "--n-ctx", "--ctx-init", "--template", "--epochs",
                    "--batch-size", "--lr", "--no-augment", "--precision", "--device", "--workers",
                    "--seed", "--out"]
    text = " ".join(result.stdout.split())
    for flag in parser_flags:
        assert flag in text
    assert "not CoOp's protocol" in text


# -----------------------------------------------------------------------------
# Data layouts.

def test_caltech101_coop_layout_filters_and_renames_classes(tmp_path):
    root = tmp_path / "caltech101"
    for name in ["BACKGROUND_Google", "Faces", "Faces_easy", "Leopards", "airplanes", "Motorbikes", "yin_yang"]:
        make_images(root / "101_ObjectCategories" / name, 10, seed=0, size=(8, 8))
    classnames, train, test, *_ = dspt.load_dataset(root)
    assert classnames == ["face", "leopard", "motorbike", "airplane", "yin yang"]  # sorted folder order
    assert len(train) == 5 * 5 and len(test) == 5 * 3  # 50% train, 20% val, 30% test
    assert not {p for p, _ in train} & {p for p, _ in test}


def test_generated_split_is_the_same_for_every_seed_and_only_the_few_shot_sample_varies(tmp_path, tiny_checkpoint):
    for name in ["ant", "bee", "cat"]:
        make_images(tmp_path / "data" / name, 20, seed=0, size=(8, 8))
    loaded = []
    for seed in ("1", "2"):
        args = dspt.parse_args(["--data", str(tmp_path / "data"), "--backbone", str(tiny_checkpoint), "--seed", seed])
        dspt.check_args(args)
        dataset = dspt.load_dataset(args.data)
        loaded.append((dataset.train, dataset.test, dspt.noisy_few_shot(dataset.train, 3, args)[0]))
    (train, test, sample_1), (train_2, test_2, sample_2) = loaded
    assert train == train_2 and test == test_2
    assert [sum(c == k for _, c in train) for k in range(3)] == [10, 10, 10]  # 50% of 20
    assert [sum(c == k for _, c in test) for k in range(3)] == [6, 6, 6]  # 30%
    assert sample_1 != sample_2 and set(sample_1) <= set(train) and set(sample_2) <= set(train)


def test_caltech101_split_file_is_used_when_present(tmp_path):
    root = tmp_path / "caltech101"
    for name in ["accordion", "airplanes"]:
        make_images(root / "101_ObjectCategories" / name, 4, seed=0, size=(8, 8))
    split = {"train": [["accordion/000.jpg", 0, "accordion"], ["airplanes/001.jpg", 1, "airplane"]],
             "val": [], "test": [["airplanes/003.jpg", 1, "airplane"]]}
    (root / "split_zhou_Caltech101.json").write_text(json.dumps(split))
    classnames, train, test, *_ = dspt.load_dataset(root)
    images = root / "101_ObjectCategories"
    assert classnames == ["accordion", "airplane"]
    assert train == [(images / "accordion/000.jpg", 0), (images / "airplanes/001.jpg", 1)]
    assert test == [(images / "airplanes/003.jpg", 1)]


def test_torchvision_caltech101_layout_is_prepared_once(tmp_path, capsys):
    for name in ["Faces_easy", "Faces", "ant"]:
        make_images(tmp_path / "caltech101" / "101_ObjectCategories" / name, 10, seed=0, size=(8, 8))
    with pytest.raises(dspt.UserError, match=f"run: python prepare_data.py {tmp_path}"):
        dspt.load_dataset(tmp_path)
    prepare_data.main([str(tmp_path)])
    classnames, train, test, *_ = dspt.load_dataset(tmp_path)
    assert classnames == ["face", "ant"] and len(train) == 10 and len(test) == 6
    assert all(str(tmp_path / "101_ObjectCategories") in str(p) for p, _ in train + test)


def test_train_and_test_folders_layout_is_prepared_into_a_split_file(tmp_path):
    for split, count in (("train", 5), ("test", 3)):
        for name in ["cat", "dog"]:
            make_images(tmp_path / split / name, count, seed=0, size=(8, 8))
    with pytest.raises(dspt.UserError, match=f"run: python prepare_data.py {tmp_path}"):
        dspt.load_dataset(tmp_path)
    prepare_data.main([str(tmp_path)])
    classnames, train, test, *_ = dspt.load_dataset(tmp_path)
    assert classnames == ["cat", "dog"] and len(train) == 10 and len(test) == 6
    assert all("/train/" in str(p) for p, _ in train) and all("/test/" in str(p) for p, _ in test)


# -----------------------------------------------------------------------------
# Bad input: one line on stderr, a non-zero exit, no traceback, nothing half-written.

def expect_user_error(capsys, argv, *phrases, script=dspt):
    with pytest.raises(SystemExit) as exit_info:
        script.main(argv)
    assert exit_info.value.code != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"{script.__name__}: error: ") and "Traceback" not in "\n".join(err), err
    for phrase in phrases:
        assert phrase in err[-1], (phrase, err[-1])
    return err[-1]


def test_missing_and_empty_data_folders(tmp_path, tiny_checkpoint, capsys):
    base = ["--backbone", str(tiny_checkpoint), "--out", str(tmp_path / "out")]
    expect_user_error(capsys, ["--data", str(tmp_path / "nope"), *base], "does not exist",
                      f"python prepare_data.py {tmp_path / 'nope'} --download NAME")
    (tmp_path / "empty").mkdir()
    expect_user_error(capsys, ["--data", str(tmp_path / "empty"), *base], "no usable dataset")
    assert not (tmp_path / "out").exists()


def test_noise_rate_outside_0_1(tmp_path, image_folder, tiny_checkpoint, capsys):
    for rate in ("1.0", "-0.2"):
        expect_user_error(capsys, ["--data", str(image_folder), "--backbone", str(tiny_checkpoint),
                                   "--noise", rate, "--out", str(tmp_path / "out")], "--noise must be in [0, 1)")
    assert not (tmp_path / "out").exists()


BAD_ARGUMENTS = [
    (["--shots", "0"], "--shots must be at least 1"),
    (["--n-ctx", "0"], "--n-ctx must be at least 1"),
    (["--epochs", "0"], "--epochs must be at least 1"),
    (["--batch-size", "0"], "--batch-size must be at least 1"),
    (["--template", "a photo"], "must hold one {}"),
    (["--template", "{} and {}"], "must hold one {}"),
    (["--template", "a {kind} of {}"], "no other braces"),
    (["--device", "cpu", "--precision", "fp16"], "--precision fp16 needs a CUDA device"),
    (["--device", "cpu", "--precision", "amp"], "--precision amp needs a CUDA device"),
    (["--ctx-init", "word " * 80], "longer than the text context of 77 tokens"),
    (["--ctx-init", "a photo of a", "--n-ctx", "3"], "is 4 tokens, which does not fit --n-ctx 3"),
    (["--ctx-init", " "], "give at least one word"),
    (["--lr", "-0.01"], "--lr must be a positive number"),
    (["--lr", "nan"], "--lr must be a positive number"),
    (["--lr", "inf"], "--lr must be a positive number"),
    (["--seed", "-1"], "--seed must be a whole number from 0 to 2^63 - 1, not -1"),
    (["--seed", str(2**64)], "--seed must be a whole number from 0 to 2^63 - 1"),
    (["--workers", "-1"], "--workers must be 0 or more, not -1"),
    (["--device", "foo"], "--device 'foo' is not a torch device"),
    (["--template", "a photo of a {{}}."], "must hold one {}"),
    (["--template", "a photo of a {} " + "very " * 80], ("a zero-shot prompt does not fit", "tokens long, more than")),
]


@pytest.mark.parametrize("extra, phrase", BAD_ARGUMENTS, ids=[" ".join(a)[:30] for a, _ in BAD_ARGUMENTS])
def test_bad_arguments_are_one_line_errors_and_write_nothing(tmp_path, image_folder, tiny_checkpoint, capsys,
                                                             extra, phrase):
    expect_user_error(capsys, ["--data", str(image_folder), "--backbone", str(tiny_checkpoint), "--workers", "0",
                               "--out", str(tmp_path / "out"), *extra], *(phrase if isinstance(phrase, tuple) else
                                                                          [phrase]))
    assert not (tmp_path / "out").exists()


def test_bad_bpe_file_is_a_one_line_error(tmp_path, image_folder, tiny_checkpoint, capsys):
    (tmp_path / "merges.txt").write_text("not gzip")
    expect_user_error(capsys, ["--data", str(image_folder), "--backbone", str(tiny_checkpoint), "--bpe",
                               str(tmp_path / "merges.txt"), "--out", str(tmp_path / "out")],
                      "cannot read the BPE merges file", "bpe_simple_vocab_16e6.txt.gz")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_asked_for_without_cuda(tmp_path, image_folder, capsys):
    expect_user_error(capsys, ["--data", str(image_folder), "--device", "cuda", "--out", str(tmp_path / "out")],
                      "cannot use CUDA", "--device cpu")


def test_a_visible_gpu_that_torch_cannot_use_is_reported(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for visible in (True, False):
        monkeypatch.setattr(dspt, "gpu_is_visible", lambda: visible)
        args = dspt.parse_args(["--data", "somewhere"])
        dspt.check_args(args)
        assert args.device == "cpu"
        err = capsys.readouterr().err
        assert ("GPU is visible but this torch" in err and "CPU" in err) == visible, err
    args = dspt.parse_args(["--data", "somewhere", "--device", "cpu"])  # asked for: no warning
    monkeypatch.setattr(dspt, "gpu_is_visible", lambda: True)
    dspt.check_args(args)
    assert capsys.readouterr().err == ""


def test_only_the_command_line_changes_the_memory_allocator(tmp_path, image_folder, tiny_checkpoint, monkeypatch):
    calls = []
    monkeypatch.setattr(dspt, "reuse_freed_memory", lambda: calls.append("mallopt"))
    args = dspt.parse_args(["--data", str(image_folder), "--backbone", str(tiny_checkpoint)])
    dspt.check_args(args)
    dspt.load_model(args)  # what other code imports and calls
    assert calls == []
    run_main(tmp_path, image_folder, "--epochs", "1", backbone=tiny_checkpoint)
    assert calls == ["mallopt"]


def test_unknown_backbone_lists_the_valid_ones(tmp_path, image_folder, capsys):
    line = expect_user_error(capsys, ["--data", str(image_folder), "--backbone", "ViT-Z/99",
                                      "--out", str(tmp_path / "out")], "unknown backbone")
    assert all(name in line for name in dspt.MODELS)


def test_corrupt_checkpoint_file(tmp_path, image_folder, capsys):
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    expect_user_error(capsys, ["--data", str(image_folder), "--backbone", str(tmp_path / "bad.pt"),
                               "--out", str(tmp_path / "out")], "cannot read")


def test_corrupt_images_are_skipped_and_counted(tmp_path, tiny_checkpoint, capsys):
    for split, count in (("train", 6), ("test", 3)):
        for name in ["cat", "dog"]:
            make_images(tmp_path / "data" / split / name, count, seed=0)
        (tmp_path / "data" / split / "dog" / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    prepare_data.main([str(tmp_path / "data")])
    metrics = run_main(tmp_path, tmp_path / "data", "--shots", "7", backbone=tiny_checkpoint)
    assert metrics["unreadable_images"] == 2  # one among the training images, one among the test images
    assert metrics["train_images"] == 12 and metrics["test_images"] == 6
    assert "class 1 has only 6 readable training images" in capsys.readouterr().err


def test_class_with_fewer_images_than_shots_uses_what_exists(tmp_path, image_folder, tiny_checkpoint, capsys):
    metrics = run_main(tmp_path, image_folder, "--shots", "10", backbone=tiny_checkpoint)
    assert metrics["train_images"] == 3 * 6  # 50% of 12 images per class
    assert capsys.readouterr().err.count("dspt: warning: class") == 3


def serve(tiny_checkpoint, folder, digest, monkeypatch):
    """Make 'tiny' an official name with this SHA256, downloaded from a local folder."""
    (folder / digest).mkdir(parents=True)
    (folder / digest / "tiny.pt").write_bytes(tiny_checkpoint.read_bytes())
    monkeypatch.setitem(dspt.MODELS, "tiny", f"{digest}/tiny.pt")
    monkeypatch.setattr(dspt, "MODEL_URL", folder.as_uri() + "/")


def test_official_name_is_downloaded_verified_and_cached(tmp_path, tiny_checkpoint, monkeypatch):
    digest, cache = sha256(tiny_checkpoint), tmp_path / "cache"
    serve(tiny_checkpoint, tmp_path / "served", digest, monkeypatch)
    dspt.load_clip("tiny", cache_dir=str(cache))
    assert sha256(cache / "tiny.pt") == digest
    (cache / "tiny.pt").write_bytes(b"stale partial file")  # a mismatched cached file is replaced
    dspt.load_clip("tiny", cache_dir=str(cache))
    assert sha256(cache / "tiny.pt") == digest
    assert [p.name for p in cache.iterdir()] == ["tiny.pt"]


def test_checksum_mismatch_fails_and_leaves_no_file(tmp_path, tiny_checkpoint, image_folder, capsys, monkeypatch):
    cache = tmp_path / "cache"
    serve(tiny_checkpoint, tmp_path / "served", "0" * 64, monkeypatch)
    expect_user_error(capsys, ["--data", str(image_folder), "--backbone", "tiny", "--cache-dir", str(cache),
                               "--out", str(tmp_path / "out")], "checksum mismatch")
    assert not cache.exists() or not list(cache.iterdir())


def test_no_network_names_the_url_and_where_to_put_the_file(tmp_path, tiny_checkpoint, image_folder,
                                                            capsys, monkeypatch):
    cache = tmp_path / "cache"
    serve(tiny_checkpoint, tmp_path / "served", sha256(tiny_checkpoint), monkeypatch)
    monkeypatch.setattr(dspt, "MODEL_URL", "http://127.0.0.1:9/clip/models/")  # nothing listens there
    line = expect_user_error(capsys, ["--data", str(image_folder), "--backbone", "tiny", "--cache-dir",
                                      str(cache), "--out", str(tmp_path / "out")], "cannot download")
    assert "http://127.0.0.1:9/clip/models/" in line and str(cache / "tiny.pt") in line
    assert not cache.exists() or not list(cache.iterdir())


def test_download_fetches_caltech101_into_a_new_folder(tmp_path, monkeypatch):
    import torchvision.datasets

    def fake_caltech101(root, download):  # lays the files out as torchvision's download does
        assert download
        for name in ["Faces_easy", "Faces", "ant"]:
            make_images(Path(root) / "caltech101" / "101_ObjectCategories" / name, 10, seed=0, size=(8, 8))

    monkeypatch.setattr(torchvision.datasets, "Caltech101", fake_caltech101)
    prepare_data.main([str(tmp_path / "caltech101"), "--download", "Caltech101"])
    classnames, train, test, *_ = dspt.load_dataset(tmp_path / "caltech101")
    assert classnames == ["face", "ant"] and len(train) == 10 and len(test) == 6
    assert [p.name for p in tmp_path.iterdir()] == ["caltech101"]


def test_failed_download_leaves_no_folder(tmp_path, image_folder, tiny_checkpoint, capsys, monkeypatch):
    import torchvision.datasets

    def failing_caltech101(root, download):
        (Path(root) / "caltech101").mkdir()
        (Path(root) / "caltech101" / "101_ObjectCategories.tar.gz").write_bytes(b"half")
        raise RuntimeError("File not found or corrupted.")

    monkeypatch.setattr(torchvision.datasets, "Caltech101", failing_caltech101)
    expect_user_error(capsys, [str(tmp_path / "caltech"), "--download", "caltech101"],
                      "cannot download Caltech101", "101_ObjectCategories", script=prepare_data)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]  # the image_folder fixture's


def test_user_errors_exit_without_traceback_from_the_command_line(tmp_path):
    result = subprocess.run([sys.executable, str(HERE / "dspt.py"), "--data", str(tmp_path / "missing")],
                            capture_output=True, text=True)
    assert result.returncode == 1
    assert result.stderr.strip().count("\n") == 0 and result.stderr.startswith("dspt: error: ")


# -----------------------------------------------------------------------------
# The analysis notebook: it asserts each of its numerical checks, so running it is the test.

def test_analysis_notebook_runs_and_its_checks_pass():
    import nbclient
    import nbformat
    notebook = nbformat.read(HERE / "analysis.ipynb", as_version=4)
    nbclient.NotebookClient(notebook, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(HERE)}}).execute()
    assert sum(cell.source.count("assert") for cell in notebook.cells if cell.cell_type == "code") >= 10
