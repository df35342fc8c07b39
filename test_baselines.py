"""Tests for baselines.py, offline. Oracles: ProGrad's projection against its closed form and
against gradients from separate backward passes; Sinkhorn against its marginals, a 2 x 2 plan
solved by hand and textbook Sinkhorn without logarithms; the transport split against planted
label noise; the pseudo-label selection against a brute-force sort and against images whose
zero-shot probabilities are known; every method end to end on test_dspt's small checkpoint and
image folder, --method coop against dspt.py itself."""

import argparse
import json
import math
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from test_dspt import BPE_PATH, image_folder, learnable_task, learners, tiny_checkpoint  # noqa: F401 (fixtures); sets DSPT_BPE

import baselines  # noqa: E402
import dspt  # noqa: E402
import predict  # noqa: E402

CLASSNAMES = ["dog", "great white shark", "yin yang", "airplane"]
NO_SCALING = dspt.grad_scaler(argparse.Namespace(precision="fp32"))


def tiny_learner(tiny_checkpoint, n_ctx=4):
    model, _ = dspt.load_clip(str(tiny_checkpoint))
    torch.manual_seed(0)
    return dspt.PackedPromptLearner(model, CLASSNAMES, dspt.load_tokenizer(BPE_PATH), n_ctx=n_ctx)


# -----------------------------------------------------------------------------
# ProGrad

def test_projected_gradient_is_orthogonal_to_the_direction_when_they_conflict():
    torch.manual_seed(0)
    for _ in range(20):
        gradient, direction = torch.randn(4, 64), torch.randn(4, 64)
        if (gradient * direction).sum() > 0:
            direction = -direction
        projected = baselines.project_conflicting_gradient(gradient, direction)
        g, d = gradient.double().flatten(), direction.double().flatten()
        expected = g - (g @ d) / (d @ d) * d
        assert torch.allclose(projected.double().flatten(), expected, atol=1e-6)
        cosine = (projected.double().flatten() @ d) / (projected.double().norm() * d.norm())
        assert abs(cosine) < 1e-6


def test_projection_strength_removes_that_fraction_of_the_conflicting_component():
    gradient, direction = torch.tensor([[1.0, -2.0]]), torch.tensor([[0.0, 3.0]])  # g . u = -2
    projected = baselines.project_conflicting_gradient(gradient, direction, strength=0.25)
    assert torch.allclose(projected, torch.tensor([[1.0, -1.5]]))  # (1 - 0.25) of -2 remains


def test_gradient_that_agrees_with_the_direction_is_untouched():
    torch.manual_seed(1)
    gradient, direction = torch.randn(4, 64), torch.randn(4, 64)
    direction = direction if (gradient * direction).sum() > 0 else -direction
    assert torch.equal(baselines.project_conflicting_gradient(gradient, direction), gradient)
    orthogonal = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    assert torch.equal(baselines.project_conflicting_gradient(*orthogonal), orthogonal[0])
    assert torch.equal(baselines.project_conflicting_gradient(gradient, torch.zeros_like(gradient)), gradient)


def separate_gradients(learner, image_features, target, zero_shot, loss_fn):
    """The domain loss and the gradients of it and of the KL to zero-shot CLIP with respect to
    ctx, each from its own forward and backward pass."""
    gradients = []
    for kind in ("domain", "kl"):
        learner.ctx.grad = None
        logits = learner.clip.logits(image_features, learner.text_features())
        if kind == "domain":
            loss = loss_fn(logits, target)
            domain_loss = loss.item()
        else:
            p_zero_shot = learner.clip.logits(image_features, zero_shot).softmax(dim=-1)
            loss = (p_zero_shot * (p_zero_shot.log() - logits.log_softmax(dim=-1))).sum(-1).mean()
        loss.backward()
        gradients.append(learner.ctx.grad.double().clone())
    learner.ctx.grad = None
    return domain_loss, *gradients


def test_prograd_step_has_the_domain_loss_value_and_the_projected_gradient(tiny_checkpoint):
    # Both sides are float32 gradients through the text transformer, of two different but equal
    # expressions of the KL; they agree to about 1e-5, hence the tolerance of 1e-4.
    learner = tiny_learner(tiny_checkpoint)
    clip, tokenizer = learner.clip, dspt.load_tokenizer(BPE_PATH)
    zero_shot = clip.encode_text(tokenizer.tokenize([f"a photo of a {name}." for name in CLASSNAMES]))
    conflicts = set()
    for seed in range(8):
        torch.manual_seed(seed)
        image_features, target = torch.randn(6, 32), torch.randint(0, len(CLASSNAMES), (6,))
        strength = 1.0 if seed % 2 else 0.5
        prograd = baselines.ProGrad(learner, dspt.cross_entropy_loss, zero_shot, NO_SCALING, strength)
        domain_loss, g, d = separate_gradients(learner, image_features, target, zero_shot,
                                               dspt.cross_entropy_loss)
        conflict = (g * d).sum().item() < 0
        conflicts.add(conflict)
        expected = g - strength * (g * d).sum() / (d * d).sum() * d if conflict else g

        logits, loss = prograd.step(image_features, target, torch.arange(6), epoch=0)
        loss.backward()
        assert math.isclose(loss.item(), domain_loss, rel_tol=1e-6)
        assert ((learner.ctx.grad.double() - expected).norm() / expected.norm()).item() < 1e-4
        if conflict and strength == 1.0:
            assert abs((learner.ctx.grad.double() * d).sum().item()) < 1e-4 * expected.norm() * d.norm()
        assert prograd.epoch_record(0) == {"prograd_conflict_fraction": float(conflict)}
        learner.ctx.grad = None
    assert conflicts == {True, False}, "the cases should exercise both branches"


def test_prograd_gradient_passes_a_grad_scaler_unchanged(tiny_checkpoint):
    learner = tiny_learner(tiny_checkpoint)
    zero_shot = torch.randn(len(CLASSNAMES), 32)
    torch.manual_seed(3)
    image_features, target = torch.randn(6, 32), torch.randint(0, len(CLASSNAMES), (6,))
    prograd = baselines.ProGrad(learner, dspt.double_softmax_loss, zero_shot, NO_SCALING)
    prograd.step(image_features, target, torch.arange(6), epoch=0)[1].backward()
    unscaled = learner.ctx.grad.clone()
    learner.ctx.grad = None
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12)
    optimizer = torch.optim.SGD([learner.ctx], lr=0.1)
    scaled = baselines.ProGrad(learner, dspt.double_softmax_loss, zero_shot, scaler)
    scaler.scale(scaled.step(image_features, target, torch.arange(6), epoch=0)[1]).backward()
    # The inner gradients were taken of the losses times 2^12 (exact in binary) and divided again.
    torch.testing.assert_close(learner.ctx.grad, unscaled * 2.0 ** 12, rtol=1e-6, atol=0)
    scaler.unscale_(optimizer)
    torch.testing.assert_close(learner.ctx.grad, unscaled, rtol=1e-6, atol=0)


# -----------------------------------------------------------------------------
# NLPrompt: Sinkhorn and the transport split

def test_sinkhorn_plan_has_uniform_marginals():
    torch.manual_seed(0)
    for n, c, scale in [(37, 5, 10.0), (200, 10, 30.0), (3, 7, 1.0)]:
        logits = scale * torch.randn(n, c)
        plan = baselines.sinkhorn(-logits.log_softmax(dim=-1))
        assert plan.shape == (n, c) and (plan >= 0).all()
        assert (plan.sum(dim=1) - 1 / n).abs().max() < 1e-6
        assert (plan.sum(dim=0) - 1 / c).abs().max() < 1e-6
        assert abs(plan.sum().item() - 1) < 1e-6


def test_sinkhorn_two_by_two_by_hand():
    # Symmetric cost [[0, 1], [1, 0]]: by symmetry P = s K with K = exp(-M / eps), and each row
    # sums to 1/2, so the diagonal is 1 / (2 (1 + exp(-1 / eps))).
    for epsilon in (0.1, 0.5, 2.0):
        plan = baselines.sinkhorn(torch.tensor([[0.0, 1.0], [1.0, 0.0]]), epsilon)
        diagonal = 1 / (2 * (1 + math.exp(-1 / epsilon)))
        expected = torch.tensor([[diagonal, 0.5 - diagonal], [0.5 - diagonal, diagonal]], dtype=torch.float64)
        assert torch.allclose(plan, expected, atol=1e-12)


def test_sinkhorn_equals_textbook_sinkhorn_without_logarithms():
    torch.manual_seed(1)
    cost = torch.rand(30, 6, dtype=torch.float64)
    kernel = torch.exp(-cost / baselines.OT_EPSILON)
    u, v = torch.ones(30, dtype=torch.float64), torch.ones(6, dtype=torch.float64)
    for _ in range(5000):
        u = (1 / 30) / (kernel @ v)
        v = (1 / 6) / (kernel.T @ u)
    assert torch.allclose(baselines.sinkhorn(cost), u[:, None] * kernel * v[None, :], atol=1e-10)


def planted_noise(seed=0, classes=5, per_class=20, rate=0.3, spread=0.1):
    """CLIP-like logits (100 x cosine) of images close to their class's text feature, the true
    labels, and labels with a known subset flipped to another class."""
    generator = torch.Generator().manual_seed(seed)
    text = torch.linalg.qr(torch.randn(16, classes, generator=generator))[0].T  # orthonormal rows
    true = torch.arange(classes).repeat_interleave(per_class)
    images = text[true] + spread * torch.randn(len(true), 16, generator=generator)
    logits = 100 * F.normalize(images, dim=-1) @ text.T
    flipped = torch.rand(len(true), generator=generator) < rate
    shift = torch.randint(1, classes, (len(true),), generator=generator)
    given = torch.where(flipped, (true + shift) % classes, true)
    return logits, true, given, flipped


def test_transport_labels_flag_exactly_the_planted_wrong_labels():
    for seed in range(3):
        logits, true, given, flipped = planted_noise(seed)
        assert 0.2 < flipped.float().mean() < 0.4
        assert torch.equal(baselines.transport_labels(logits) != given, flipped)


def test_transport_labels_ignore_a_bias_toward_one_class_that_fools_argmax():
    # The column scaling absorbs any per-class factor of the kernel exp(log p), so adding a
    # constant to one class's logits leaves the plan unchanged; argmax is fooled by it.
    logits, true, given, flipped = planted_noise(seed=4)
    biased = logits + torch.tensor([120.0, 0, 0, 0, 0])
    assert (biased.argmax(dim=-1) == 0).all()
    assert torch.equal(baselines.transport_labels(biased), true)
    assert torch.equal(baselines.transport_labels(biased) != given, flipped)


# p = softmax(logits) = [[0.9, 0.1], [0.6, 0.4]]: argmax puts both samples in class 0. With the cost
# -log p at epsilon 1 the kernel is p, and the plan with uniform marginals is [[a, 1/2 - a],
# [1/2 - a, a]] with a^2 / (1/2 - a)^2 = (0.9 * 0.4) / (0.1 * 0.6) = 6 (the cross ratio is kept by
# row and column scaling), so a = sqrt(6) / (2 (1 + sqrt(6))) = 0.355: the second sample goes to class 1.
HAND_PROBABILITIES = torch.tensor([[0.9, 0.1], [0.6, 0.4]])
HAND_PLAN_DIAGONAL = math.sqrt(6) / (2 * (1 + math.sqrt(6)))


def test_transport_plan_and_labels_by_hand_where_argmax_differs():
    logits = HAND_PROBABILITIES.log()
    a = HAND_PLAN_DIAGONAL
    plan = baselines.sinkhorn(-logits.log_softmax(dim=-1))
    assert torch.allclose(plan, torch.tensor([[a, 0.5 - a], [0.5 - a, a]], dtype=torch.float64), atol=1e-9)
    assert baselines.transport_labels(logits).tolist() == [0, 1]
    assert logits.argmax(dim=-1).tolist() == [0, 0]


class FixedLogits:
    """A stand-in prompt learner (and its CLIP) whose logits are the image features themselves."""

    def __init__(self, num_classes):
        self.clip, self.num_classes = self, num_classes

    def text_features(self):
        return torch.eye(self.num_classes)

    def logits(self, image_features, text_features):
        return image_features @ text_features.T


def test_nlprompt_split_and_loss_by_hand():
    features = HAND_PROBABILITIES.log()
    labels, noisy = torch.tensor([0, 0]), torch.tensor([False, True])  # the second label is wrong
    nlprompt = baselines.NLPrompt(FixedLogits(2), features, torch.arange(2), labels, noisy)
    logits, loss = nlprompt.step(features, labels, torch.arange(2), epoch=0)
    # transport labels [0, 1]: sample 0 is clean (cross-entropy -log 0.9), sample 1 not (MAE 1 - 0.6)
    assert loss.item() == pytest.approx((-math.log(0.9) + (1 - 0.6)) / 2)
    assert nlprompt.epoch_record(0) == {"ot_clean_fraction": 0.5, "ot_noisy_precision": 1.0,
                                        "ot_noisy_recall": 1.0}


def test_nlprompt_splits_once_per_epoch_and_mixes_cross_entropy_and_mae(tiny_checkpoint):
    learner = tiny_learner(tiny_checkpoint)
    torch.manual_seed(0)
    n = 12
    features, labels = torch.randn(n, 32), torch.randint(0, len(CLASSNAMES), (n,))
    noisy = torch.zeros(n, dtype=torch.bool)
    noisy[:5] = True
    kept = torch.arange(n)
    nlprompt = baselines.NLPrompt(learner, features, kept, labels, noisy)
    with torch.no_grad():
        logits = learner.clip.logits(features, learner.text_features())
    clean = baselines.transport_labels(logits) == labels
    assert 0 < clean.sum() < n, "the case should have both clean and noisy samples"

    index = torch.tensor([0, 3, 5, 7, 11, 2])
    batch_logits, loss = nlprompt.step(features[index], labels[index], index, epoch=0)
    p = batch_logits.detach().double().softmax(dim=-1)
    p_y = p[torch.arange(len(index)), labels[index]]
    expected = torch.where(clean[index], -p_y.log(), 1 - p_y).mean()
    assert math.isclose(loss.item(), expected.item(), rel_tol=1e-5)
    assert math.isclose(nlprompt.loss(batch_logits, labels[index]).item(), loss.item(), rel_tol=1e-6)

    flagged = ~clean
    assert nlprompt.epoch_record(0) == {
        "ot_clean_fraction": clean.float().mean().item(),
        "ot_noisy_precision": (flagged & noisy).sum().item() / flagged.sum().item(),
        "ot_noisy_recall": (flagged & noisy).sum().item() / noisy.sum().item()}
    nlprompt.step(features[:4], labels[:4], torch.arange(4), epoch=0)
    assert len(nlprompt.records) == 1
    nlprompt.step(features[:4], labels[:4], torch.arange(4), epoch=1)
    assert len(nlprompt.records) == 2


# -----------------------------------------------------------------------------
# VisPrompt

def test_one_key_attention_is_a_linear_map_of_the_key():
    torch.manual_seed(0)
    attention = torch.nn.MultiheadAttention(64, 8, batch_first=True)
    key, query = torch.randn(5, 1, 64), torch.randn(5, 16, 64)
    w_v, b_v = attention.in_proj_weight[128:], attention.in_proj_bias[128:]
    expected = attention.out_proj(key @ w_v.T + b_v).expand(-1, 16, -1)  # softmax over one key is 1
    torch.testing.assert_close(attention(query, key, key)[0], expected, rtol=1e-5, atol=1e-6)


def test_conditioned_context_is_film_and_gate_by_hand():
    torch.manual_seed(1)
    module = baselines.ImageConditionedContext(width=16, image_dim=8, heads=8)
    for parameter in module.parameters():  # random values everywhere, the zero-initialised layers too
        torch.nn.init.normal_(parameter, std=0.3)
    ctx, image = torch.randn(4, 16), torch.randn(3, 8)
    context, gate = module(ctx, image)
    # The attention output, by the one-key rule above; then FiLM, gate and FFN written out.
    key = image @ module.image_projection.weight.T + module.image_projection.bias
    w_v, b_v = module.attention.in_proj_weight[32:], module.attention.in_proj_bias[32:]
    a = ((key @ w_v.T + b_v) @ module.attention.out_proj.weight.T + module.attention.out_proj.bias)[:, None, :]
    a = a.expand(-1, 4, -1)
    film = a @ module.film.weight.T + module.film.bias
    gamma, beta = film[..., :16], film[..., 16:]
    g = torch.sigmoid(a @ module.gate.weight.T + module.gate.bias)
    expected = ctx + g * (ctx * (1 + gamma) + beta)
    layer_norm, first, _, last = module.feed_forward
    hidden = torch.nn.functional.gelu(layer_norm(expected) @ first.weight.T + first.bias)
    expected = expected + hidden @ last.weight.T + last.bias
    torch.testing.assert_close(context, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gate, g.squeeze(-1), rtol=1e-6, atol=1e-6)


def test_conditioned_context_starts_as_the_gated_shared_context():
    module = baselines.ImageConditionedContext(width=16, image_dim=8)
    ctx = torch.randn(4, 16)
    context, gate = module(ctx, torch.randn(3, 8))
    torch.testing.assert_close(context, ctx * (1 + gate[..., None]))  # FiLM and FFN start at zero
    # RN50's widths: projection 1024*512+512, norm 2*512, attention 4*512*512+4*512, FiLM 512*1024+1024,
    # gate 513, FFN 2*512 + 2*(512*512+512): 2,628,609 trained besides the context's 8,192.
    assert sum(p.numel() for p in baselines.ImageConditionedContext(512, 1024).parameters()) == 2_628_609


def test_per_image_packed_prompts_equal_the_straightforward_computation(tiny_checkpoint):
    learner = tiny_learner(tiny_checkpoint)
    torch.manual_seed(2)
    contexts = (learner.ctx.detach() + 0.1 * torch.randn(3, 4, 64)).requires_grad_()
    image_features, target = torch.randn(3, 32), torch.tensor([0, 3, 1])
    logits = baselines.per_image_logits(learner.clip, image_features, learner.text_features(contexts))
    dspt.double_softmax_loss(logits, target).backward()
    packed_gradient, contexts.grad = contexts.grad.clone(), None
    plain = dspt.PromptLearner(learner.clip, CLASSNAMES, dspt.load_tokenizer(BPE_PATH), n_ctx=4)
    text = torch.stack([plain.text_features(context) for context in contexts])
    expected = baselines.per_image_logits(learner.clip, image_features, text)
    dspt.double_softmax_loss(expected, target).backward()
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-5)
    assert ((packed_gradient - contexts.grad).norm() / contexts.grad.norm()).item() < 1e-5
    assert not torch.allclose(logits[0], logits[1])  # each image has its own prompts


def test_visprompt_scores_each_image_with_its_own_conditioned_prompts(tiny_checkpoint):
    learner = tiny_learner(tiny_checkpoint)
    torch.manual_seed(3)
    features, labels = torch.randn(6, 32), torch.randint(0, len(CLASSNAMES), (6,))
    visprompt = baselines.VisPrompt(learner, features, torch.arange(6), labels, torch.zeros(6, dtype=torch.bool))
    for parameter in learner.conditioner.film.parameters():
        torch.nn.init.normal_(parameter, std=0.3)
    assert [name for name, p in learner.named_parameters() if p.requires_grad][:2] == [
        "ctx", "conditioner.image_projection.weight"]  # trained with the context
    with torch.no_grad():
        logits = visprompt.logits(features)
        context, _ = learner.conditioner(learner.ctx, features)
        expected = baselines.per_image_logits(learner.clip, features, learner.text_features(context))
        shared = learner.clip.logits(features, learner.text_features())
    torch.testing.assert_close(logits, expected)
    assert not torch.allclose(logits, shared, atol=1e-3)


def test_visprompt_gives_gce_to_the_flagged_samples_by_hand():
    features = HAND_PROBABILITIES.log()
    labels, noisy = torch.tensor([0, 0]), torch.tensor([False, True])
    visprompt = baselines.VisPrompt.__new__(baselines.VisPrompt)
    baselines.NLPrompt.__init__(visprompt, FixedLogits(2), features, torch.arange(2), labels, noisy)
    visprompt.gates = {}
    visprompt.logits = lambda image_features: image_features  # the hand case's logits
    _, loss = visprompt.step(features, labels, torch.arange(2), epoch=0)
    # sample 0 clean: -log 0.9; sample 1 flagged: GCE (1 - 0.6^0.5) / 0.5
    assert loss.item() == pytest.approx((-math.log(0.9) + (1 - 0.6 ** 0.5) / 0.5) / 2)


# -----------------------------------------------------------------------------
# ANPrompt (reconstruction)

def test_weak_alignment_loss_by_hand():
    logits, clean = torch.tensor([[3.0, 1.0, 2.0]]), torch.tensor([[1.0, 2.0, 3.0]])  # clean spread: std 1
    assert baselines.weak_alignment_loss(logits, clean).item() == pytest.approx((4 + 1 + 1) / 3, rel=1e-5)
    assert baselines.weak_alignment_loss(10 * logits, 10 * clean).item() == pytest.approx(2.0, rel=1e-5)
    # nearly flat clean logits (std 0.1): divided by 1, not by 0.1
    assert baselines.weak_alignment_loss(0.1 * logits, 0.1 * clean).item() == pytest.approx(0.02, rel=1e-5)


def test_kmeans_finds_the_means_of_separated_clusters():
    torch.manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    points = torch.cat([c + 0.1 * torch.randn(20, 2) for c in centres])
    found = baselines.kmeans(points, 3)
    expected = torch.stack([points[20 * i:20 * (i + 1)].mean(dim=0) for i in range(3)])
    order = torch.cdist(expected, found).argmin(dim=1)
    torch.testing.assert_close(found[order], expected)


def anprompt_learner(tiny_checkpoint):
    learner = tiny_learner(tiny_checkpoint)
    noise = baselines.noise_prompts(learner.clip, dspt.load_tokenizer(BPE_PATH), CLASSNAMES, "a photo of a {}.", 4)
    return learner, baselines.ANPrompt(learner, noise, dspt.cross_entropy_loss)


def test_anprompt_text_side_starts_as_coop_and_adds_its_prompts_at_the_context(tiny_checkpoint):
    learner, anprompt = anprompt_learner(tiny_checkpoint)
    assert anprompt.noise.shape == (4, 32) and anprompt.text_depth == 1
    with torch.no_grad():
        torch.testing.assert_close(anprompt.text_features(), learner.text_features())  # T, W_t start at 0
        torch.nn.init.normal_(anprompt.text_tokens, std=0.1)
        torch.nn.init.normal_(anprompt.text_map, std=0.1)
        # The oracle: every class's whole prompt, the anti-noise prompt added at the context
        # positions before the last layer (the deeper half of 2).
        tokenizer, clip = dspt.load_tokenizer(BPE_PATH), learner.clip
        tokens = tokenizer.tokenize([" ".join(["x"] * 4) + f" {name}." for name in CLASSNAMES])
        x = clip.token_embedding(tokens)
        x = torch.cat([x[:, :1], learner.ctx.expand(len(CLASSNAMES), -1, -1), x[:, 5:]], dim=1) + clip.positional_embedding
        mask = dspt.causal_mask(77)
        x = clip.transformer.resblocks[0](x, mask)
        prompt = anprompt.text_tokens[0] + anprompt.noise @ anprompt.text_map
        x = torch.cat([x[:, :1], x[:, 1:5] + prompt, x[:, 5:]], dim=1)
        x = clip.ln_final(clip.transformer.resblocks[1](x, mask))
        expected = x[torch.arange(len(x)), tokens.argmax(-1)] @ clip.text_projection
        torch.testing.assert_close(anprompt.text_features(), expected, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(anprompt.text_features(noise=False), expected, atol=1e-4)


def test_anprompt_frozen_image_part_is_the_encoder_up_to_its_prompted_layers(tiny_checkpoint):
    learner, anprompt = anprompt_learner(tiny_checkpoint)
    visual, images = learner.clip.visual, torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        x = anprompt.encode(images)
        for block in visual.transformer.resblocks[-anprompt.vision_depth:]:
            x = block(x)
        torch.testing.assert_close(visual.ln_post(x[:, 0]) @ visual.proj, learner.clip.encode_image(images))
        features = anprompt.image_features(anprompt.encode(images))
    assert features.shape == (3, 32) and torch.isfinite(features).all()


def test_anprompt_on_a_resnet_pools_with_its_prompts(tiny_checkpoint):
    torch.manual_seed(0)
    model = dspt.CLIP(embed_dim=32, image_resolution=64, vision_layers=(1, 1, 1, 1), vision_width=16,
                      vision_patch_size=None, context_length=77, vocab_size=49408, transformer_width=64,
                      transformer_heads=1, transformer_layers=2).eval().requires_grad_(False)
    learner = dspt.PackedPromptLearner(model, CLASSNAMES, dspt.load_tokenizer(BPE_PATH), n_ctx=4)
    anprompt = baselines.ANPrompt(learner, torch.randn(4, 32), dspt.cross_entropy_loss)
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        frozen = anprompt.encode(images)  # the attention pool's input
        side = int(frozen.shape[1] ** 0.5)
        grid = frozen.transpose(1, 2).reshape(2, -1, side, side)
        torch.testing.assert_close(model.visual.attnpool(grid), model.encode_image(images))
        anprompt.vision_tokens.zero_()  # zero prompt tokens still take part in the attention
        anprompt.prototype_scale.fill_(1.0)
        features = anprompt.image_features(frozen, noise=False)
    assert features.shape == (2, 32) and not torch.allclose(features, model.encode_image(images))


# -----------------------------------------------------------------------------
# UPL: confident pseudo-labels

def test_confident_selection_equals_brute_force_sort():
    rng = np.random.default_rng(0)
    probabilities = np.round(rng.dirichlet(np.full(6, 0.3), size=400), 2)  # rounding makes ties
    probabilities[:, 5] = 0  # class 5 is never predicted
    probabilities[rng.random(400) < 0.9, 4] = 0  # class 4 rarely
    for k in (1, 7, 1000):
        predicted, confidence = probabilities.argmax(axis=1), probabilities.max(axis=1)
        expected = []
        for c in range(6):
            members = sorted((-confidence[i], i) for i in range(400) if predicted[i] == c)
            expected += [i for _, i in members[:k]]
        chosen, classes = baselines.select_confident_per_class(torch.from_numpy(probabilities), k)
        assert chosen.tolist() == expected
        assert classes.tolist() == predicted[expected].tolist()
    assert len(baselines.select_confident_per_class(torch.from_numpy(probabilities), 7)[0]) < 6 * 7


class MeanColourCLIP:
    """A stand-in for CLIP whose image feature is the mean RGB colour, so that zero-shot
    probabilities are known in closed form: softmax(10 cos(colour, e_c)) (a scale of 10 keeps
    them apart in float32)."""

    def encode_image(self, images):
        return images.mean(dim=(2, 3))

    def logits(self, image_features, text_features):
        return 10 * F.normalize(image_features.float(), dim=-1) @ F.normalize(text_features.float(), dim=-1).T


def test_pseudo_labelled_set_keeps_the_most_confident_images_of_each_class(tmp_path):
    from PIL import Image
    from torchvision import transforms
    rng = np.random.default_rng(0)
    pool, colours = [], []
    for i in range(30):
        true = i % 3
        colour = rng.integers(20, 120, size=3)
        colour[true if i % 5 else (true + 1) % 3] = rng.integers(150, 256)  # every 5th looks wrong
        path = tmp_path / f"{i:02d}.png"
        Image.new("RGB", (8, 8), tuple(int(v) for v in colour)).save(path)
        pool.append((path, true))
        colours.append(colour)
    (tmp_path / "broken.png").write_bytes(b"not an image")
    pool.insert(7, (tmp_path / "broken.png", 0))
    colours.insert(7, None)
    args = dspt.parse_args(["--data", str(tmp_path), "--shots", "4", "--workers", "0", "--batch-size", "8",
                            "--device", "cpu"])
    dspt.check_args(args)

    items, pseudo, wrong, unreadable = baselines.pseudo_labelled_training_set(
        MeanColourCLIP(), transforms.ToTensor(), pool, torch.eye(3), args)

    probabilities = {i: torch.from_numpy(10 * c / np.linalg.norm(c)).softmax(0).numpy()
                     for i, c in enumerate(colours) if c is not None}
    confidences = np.sort([p.max() for p in probabilities.values()])
    assert np.diff(confidences).min() > 1e-5, "near-ties would make the order depend on rounding"
    expected = []
    for c in range(3):
        members = sorted((-p.max(), i) for i, p in probabilities.items() if p.argmax() == c)
        expected += [(i, c) for _, i in members[:4]]
    assert unreadable == 1
    assert [pool.index(item) for item in items] == [i for i, _ in expected]
    assert pseudo.tolist() == [c for _, c in expected]
    assert wrong.tolist() == [pool[i][1] != c for i, c in expected]
    assert 0 < wrong.sum() < len(items)


# -----------------------------------------------------------------------------
# End to end on the small checkpoint and image folder

def run_baselines(tmp_path, data, checkpoint, *extra, out="out"):
    argv = ["--data", str(data), "--backbone", str(checkpoint), "--epochs", "2", "--shots", "4",
            "--batch-size", "4", "--workers", "0", "--n-ctx", "4", "--out", str(tmp_path / out), *extra]
    return baselines.main(argv)


@pytest.mark.parametrize("method", baselines.METHODS)
def test_each_method_trains_and_writes_metrics_and_prompt(tmp_path, image_folder, tiny_checkpoint, method, learners):
    noise = [] if method == "upl" else ["--noise", "0.5"]
    metrics = run_baselines(tmp_path, image_folder, tiny_checkpoint, "--method", method, *noise)
    written = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert written == json.loads(json.dumps(metrics))
    assert written["method"] == method and written["args"]["method"] == method
    assert [record["epoch"] for record in written["history"]] == [1, 2]
    prompt = torch.load(tmp_path / "out" / "prompt.pt")
    assert prompt["ctx"].shape == (4, 64) and prompt["classnames"] == written["classnames"]
    (learner, initial_ctx), = learners
    assert (prompt["ctx"] - initial_ctx).norm() > 1e-3 * initial_ctx.norm()  # the steps moved it
    for record in written["history"]:
        if method == "prograd":
            assert 0 <= record["prograd_conflict_fraction"] <= 1
        if method in ("nlprompt", "visprompt"):
            assert 0 <= record["ot_clean_fraction"] <= 1 and 0 <= record["ot_noisy_recall"] <= 1
        if method == "visprompt":
            assert 0 < record["visprompt_gate_mean"] < 1
        if method == "anprompt":
            assert record["anprompt_alignment_loss"] >= 0
    if method == "upl":
        assert written["pseudo_label_pool"] == 18 and 1 <= written["train_images"] <= 3 * 4
        assert written["pseudo_label_accuracy"] == pytest.approx(1 - written["noise_rate"])
    else:
        assert written["train_images"] == 12 and written["noise_rate"] == 0.5


def test_coop_is_dspt_run(tmp_path, image_folder, tiny_checkpoint, learners):
    ours = run_baselines(tmp_path, image_folder, tiny_checkpoint, "--method", "coop", "--noise", "0.5",
                         "--loss", "gce", out="baselines")
    theirs = dspt.main(["--data", str(image_folder), "--backbone", str(tiny_checkpoint), "--epochs", "2",
                        "--shots", "4", "--batch-size", "4", "--workers", "0", "--n-ctx", "4", "--noise", "0.5",
                        "--loss", "gce", "--out", str(tmp_path / "dspt")])
    ctx = torch.load(tmp_path / "baselines" / "prompt.pt")["ctx"]
    assert torch.equal(ctx, torch.load(tmp_path / "dspt" / "prompt.pt")["ctx"])
    (_, initial_ctx), (_, initial_ctx_dspt) = learners
    assert torch.equal(initial_ctx, initial_ctx_dspt) and not torch.allclose(ctx, initial_ctx)
    for key in ("train_images", "noise_rate", "zero_shot_accuracy", "test_accuracy"):
        assert ours[key] == theirs[key]
    drop_time = lambda history: [{k: v for k, v in r.items() if k != "seconds"} for r in history]  # noqa: E731
    assert drop_time(ours["history"]) == drop_time(theirs["history"])


def test_prograd_with_lambda_zero_trains_like_coop(tmp_path, image_folder, tiny_checkpoint, learners):
    for method in ("coop", "prograd"):
        run_baselines(tmp_path, image_folder, tiny_checkpoint, "--method", method, "--prograd-lambda", "0",
                      "--noise", "0.5", "--loss", "ce", out=method)
    coop, prograd = (torch.load(tmp_path / method / "prompt.pt")["ctx"] for method in ("coop", "prograd"))
    assert torch.allclose(prograd, coop, rtol=0, atol=1e-6)
    assert not torch.allclose(coop, learners[0][1], rtol=0, atol=1e-4)


@pytest.mark.parametrize("method", ["coop", "prograd", "nlprompt"])
def test_each_method_learns_a_task_the_model_can_learn(tmp_path, learnable_task, method):
    # As test_dspt's learning test, with cross-entropy as the loss (NLPrompt's clean samples
    # get it too). Measured: the loss falls from 1.45 to 1.11 (coop), 1.45 to 1.12 (prograd) and
    # 0.89 to 0.69 (nlprompt, which gives MAE to the 12 of 18 samples its transport calls
    # noisy); only coop's training accuracy rises (1/3 to 2/3) within these 10 epochs.
    data, checkpoint = learnable_task
    metrics = run_baselines(tmp_path, data, checkpoint, "--method", method, "--loss", "ce", "--no-augment",
                            "--epochs", "10", "--lr", "0.1", "--shots", "6", "--batch-size", "6")
    first, last = metrics["history"][0], metrics["history"][-1]
    assert last["loss"] < first["loss"] - 0.1, (first["loss"], last["loss"])
    if method == "coop":
        assert last["train_accuracy_clean"] >= first["train_accuracy_clean"] + 0.3


def test_upl_refuses_label_noise_and_lambda_outside_0_1(tmp_path, image_folder, tiny_checkpoint, capsys):
    for extra in (["--method", "upl", "--noise", "0.25"], ["--method", "prograd", "--prograd-lambda", "1.5"]):
        with pytest.raises(SystemExit) as exit_info:
            run_baselines(tmp_path, image_folder, tiny_checkpoint, *extra)
        assert exit_info.value.code == 1
        error = capsys.readouterr().err
        assert error.startswith("baselines: error:") and "Traceback" not in error
    assert not (tmp_path / "out").exists()


def test_default_output_folder_names_the_method():
    args = baselines.parse_args(["--data", "somewhere", "--method", "nlprompt", "--device", "cpu"])
    baselines.check_args(args)
    assert re.fullmatch(r"runs/nlprompt-somewhere-RN50-dspt-sym0-16shot-seed1-[0-9a-f]{8}", args.out), args.out


def test_help_documents_the_methods_and_every_dspt_flag(capsys):
    with pytest.raises(SystemExit) as exit_info:
        baselines.parse_args(["--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for flag in ["--method", "--prograd-lambda", "--data", "--backbone", "--cache-dir", "--bpe",
                 "--shots", "--noise", "--noise-kind", "--loss", "--n-ctx", "--ctx-init", "--template", "--epochs",
                 "--batch-size", "--lr", "--no-augment", "--precision", "--device", "--workers", "--seed", "--out"]:
        assert flag in text
    for method in baselines.METHODS:
        assert method in text
    assert "whatever --loss says" in text


# -----------------------------------------------------------------------------
# ProGrad's released per-dataset settings

def release_prompt_learner_state(template, classname, tokenizer, embedding):
    """What ProGrad's released PromptLearner builds (trainers/prograd.py, N_CTX 16, CTX_INIT True), written
    out from its code: the init words before " {}." are counted by spaces (w); the prompt is w "X"s short of
    16, then the init text and the class name; the last w context vectors start at the init's first w tokens'
    embeddings, the others at zero. Returns (initial context, the prompt's tokens after the 16 context places)."""
    init = template.replace(" {}.", "")
    w = len(init.split(" "))
    tokens = tokenizer.tokenize(" ".join(["X"] * (16 - w)) + f" {init} {classname}.")[0]
    ctx = torch.cat([torch.zeros(16 - w, embedding.embedding_dim), embedding(tokenizer.tokenize(init)[0, 1:1 + w])])
    return ctx.detach(), tokens[17:]


@pytest.mark.parametrize("dataset", list(baselines.PROGRAD_TEMPLATES))
def test_prograd_release_context_builds_the_released_prompt(tiny_checkpoint, dataset):
    model, _ = dspt.load_clip(str(tiny_checkpoint))
    tokenizer = dspt.load_tokenizer(BPE_PATH)
    template = baselines.PROGRAD_TEMPLATES[dataset]
    words, prefix = baselines.prograd_release_context(template, tokenizer)
    learner = dspt.PackedPromptLearner(model, ["great white shark"], tokenizer, 16, words, prefix)
    ctx, rest = release_prompt_learner_state(template, "great white shark", tokenizer, model.token_embedding)
    assert torch.equal(learner.ctx.detach(), ctx)
    assert torch.equal(learner.tokens[0, 17:], rest)


def test_prograd_release_templates_are_the_released_ones():
    # trainers/prograd.py's CUSTOM_TEMPLATES, keyed by dspt.py's dataset names.
    assert baselines.PROGRAD_TEMPLATES == {
        "OxfordPets": "a type of pet, a photo of a {}.", "Flowers102": "a type of flower, a photo of a {}.",
        "FGVCAircraft": "a type of aircraft, a photo of a {}.", "DTD": "a texture of {}.",
        "EuroSAT": "a centered satellite photo of {}.", "StanfordCars": "a photo of a {}.",
        "Food101": "a type of food, a photo of {}.", "SUN397": "a photo of a {}.", "Caltech101": "a photo of a {}.",
        "UCF101": "a photo of a person doing {}.", "ImageNet": "a photo of a {}."}
    assert set(baselines.PROGRAD_TEMPLATES) == set(dspt.DATASETS) - {"Food101N"}  # CoOp's eleven


def test_prograd_runs_with_the_release_s_settings_unless_told_coop(tmp_path, tiny_checkpoint, learners):
    from test_datasets import write_split_dataset
    write_split_dataset(tmp_path / "pets", "OxfordPets", "images", per_class=(6, 0, 3))
    tokenizer = dspt.load_tokenizer(BPE_PATH)
    model, _ = dspt.load_clip(str(tiny_checkpoint))
    release = run_baselines(tmp_path, tmp_path / "pets", tiny_checkpoint, "--method", "prograd", "--n-ctx", "16",
                            out="release")
    assert release["template"] == "a type of pet, a photo of a {}."
    assert release["prograd_context_init"] == "a type of pet, a photo of" and release["prograd_name_prefix"] == "a "
    (learner, initial), = learners
    ctx, rest = release_prompt_learner_state(release["template"], "yin yang", tokenizer, model.token_embedding)
    assert torch.equal(initial, ctx) and torch.equal(learner.tokens[0, 17:], rest)
    loaded = predict.load_prompt(tmp_path / "release" / "prompt.pt", learner.clip, tokenizer)
    assert loaded.name_prefix == "a "  # the prompt keeps its fixed words
    with torch.no_grad():
        assert torch.equal(loaded.text_features(), learner.text_features())
    coop = run_baselines(tmp_path, tmp_path / "pets", tiny_checkpoint, "--method", "prograd", "--n-ctx", "16",
                         "--prograd-init", "coop", out="coop")
    assert coop["template"] == "a photo of a {}, a type of pet." and coop["prograd_context_init"] == ""
    assert learners[-1][0].name_prefix == "" and learners[-1][1].abs().min() > 0  # CoOp's random start
