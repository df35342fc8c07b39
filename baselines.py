"""
DSPT's peers under DSPT's protocol: CoOp, ProGrad, NLPrompt, VisPrompt, ANPrompt and UPL's
confident pseudo-labels, each a small change to dspt.py's run, which they import and reuse (model, data, label
noise, prompt learner, losses, training loop, evaluation, outputs).

    python baselines.py --method prograd --loss ce --data ./caltech101 --noise 0.5

Every flag of dspt.py means the same here; --method picks the only thing that changes:

    coop        dspt.py's run: CoOp's prompt tuning with --loss (dspt, ce, gce or mae)
    prograd     ProGrad (Zhu et al., ICCV 2023): the gradient of --loss loses its component
                against the direction that keeps the prediction close to zero-shot CLIP's
    nlprompt    NLPrompt (Pan et al., CVPR 2025): each epoch, optimal transport between the
                images and the class prompts splits the samples; cross-entropy for those whose
                transport label is their given label, MAE (1 - p_y) for the rest (--loss unused)
    visprompt   VisPrompt (Geng et al., 2026), reconstructed: each image conditions the context
                (attention to its feature, FiLM, a gate per token), NLPrompt's split on those
                prompts, cross-entropy for the clean and GCE (q = 0.5) for the rest (--loss unused)
    anprompt    ANPrompt (Gao, Zheng, Wang), reconstructed: noise prompts clustered from weakly
                perturbed sentences, anti-noise prompts in the deeper layers of both encoders, a
                visual prototype, --loss plus a weak alignment of clean and perturbed logits
    upl         UPL's top-K pseudo-labels (Huang et al., 2022), the unsupervised setting PTNL
                (Wu et al., ICCV 2023) discusses: no labels; zero-shot CLIP labels the whole train
                split, the --shots most confident images of each predicted class are kept, and
                the prompt is tuned on those pseudo-labels with --loss

Sections: ProGrad; NLPrompt (Sinkhorn, the transport split); VisPrompt; ANPrompt; UPL's pseudo-labels; main.
"""

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import dspt

METHODS = ["coop", "prograd", "nlprompt", "visprompt", "anprompt", "upl"]


# -----------------------------------------------------------------------------
# ProGrad: keep the update from moving the prediction away from zero-shot CLIP's.

def kl_to_zero_shot(logits, zero_shot_logits):
    """KL(p_zero_shot || p) at temperature 1, averaged over the batch; ProGrad's "general
    knowledge" loss. Its gradient equals that of cross-entropy to the soft zero-shot labels."""
    return F.kl_div(logits.float().log_softmax(dim=-1), zero_shot_logits.float().log_softmax(dim=-1),
                    reduction="batchmean", log_target=True)


def project_conflicting_gradient(gradient, direction, strength=1.0):
    r"""ProGrad's update: the gradient, less `strength` times its component along direction
    when the two conflict.

        g' = g - lambda (g . u) u   if g . u < 0,     g' = g   otherwise,     u = d / |d|

    With lambda = 1, g' is orthogonal to d: a step along -g' then does not, to first order,
    increase the loss whose gradient is d.
    """
    dot = (gradient * direction).sum()
    if dot >= 0:  # also when direction is zero
        return gradient
    return gradient - strength * dot / direction.square().sum() * direction


# ProGrad's release (BeierZhu/Prompt-align, trainers/prograd.py, CUSTOM_TEMPLATES): its zero-shot teacher's
# template for each dataset, whose words before " {}." also start the context (every config sets CTX_INIT).
PROGRAD_TEMPLATES = {
    "OxfordPets": "a type of pet, a photo of a {}.", "Flowers102": "a type of flower, a photo of a {}.",
    "FGVCAircraft": "a type of aircraft, a photo of a {}.", "DTD": "a texture of {}.",
    "EuroSAT": "a centered satellite photo of {}.", "StanfordCars": "a photo of a {}.",
    "Food101": "a type of food, a photo of {}.", "SUN397": "a photo of a {}.", "Caltech101": "a photo of a {}.",
    "UCF101": "a photo of a person doing {}.", "ImageNet": "a photo of a {}.",
}


def prograd_release_context(template, tokenizer):
    """(words that start the context, words fixed before each class name), as ProGrad's release splits the
    template's words before " {}.": it counts them by spaces and starts the last that many of its 16 context
    vectors (zeros before them) at the embeddings of as many of their tokens; "pet," is two tokens, so the
    tokens beyond that count stay in the prompt as fixed text ("a type of pet, a photo of" + "a")."""
    words = template.replace(" {}.", "").split(" ")
    learned, tokens = 0, 0
    while tokens < len(words):
        tokens += len(tokenizer.encode(words[learned]))
        learned += 1
    if tokens != len(words):
        raise ValueError(f"{template!r}: ProGrad's count of {len(words)} tokens ends inside a word")
    return " ".join(words[:learned]), "".join(word + " " for word in words[learned:])


class ProGrad(dspt.PromptTuning):
    """ProGrad's step for dspt.train, with --loss as the "domain" loss.

    Each step takes the gradients of the domain loss and of the KL to zero-shot CLIP's
    prediction (the template's text features) with respect to the context, and projects the
    first as project_conflicting_gradient says. The KL only gives a direction; it is never
    added to the update. Both gradients are taken of the losses times the scaler's current
    scale and divided by it again, so that in fp16 they do not underflow (ProGrad's released
    code takes them unscaled); the projection does not depend on the scale of the direction.
    """

    def __init__(self, learner, loss_fn, zero_shot_text_features, scaler, strength=1.0):
        super().__init__(learner, loss_fn, scaler)
        self.strength, self.zero_shot_text_features = strength, zero_shot_text_features
        self.conflicts = {}  # epoch -> [steps whose gradients conflicted, steps]

    def step(self, image_features, target, index, epoch):
        clip, ctx = self.learner.clip, self.learner.ctx
        logits = clip.logits(image_features, self.learner.text_features())
        with torch.no_grad():
            zero_shot_logits = clip.logits(image_features, self.zero_shot_text_features)
        loss = self.loss_fn(logits, target)
        scale = self.scaler.get_scale() if self.scaler.is_enabled() else 1.0
        (domain_gradient,) = torch.autograd.grad(loss * scale, ctx, retain_graph=True)
        (kl_gradient,) = torch.autograd.grad(kl_to_zero_shot(logits, zero_shot_logits) * scale, ctx)
        domain_gradient = domain_gradient / scale
        gradient = project_conflicting_gradient(domain_gradient, kl_gradient, self.strength)
        counts = self.conflicts.setdefault(epoch, [0, 0])
        counts[0] += gradient is not domain_gradient  # without a conflict, g itself comes back
        counts[1] += 1
        # train() calls backward() on what this returns, so return a scalar whose value is the
        # domain loss and whose gradient with respect to ctx is the projected gradient:
        # <ctx, g'> - <ctx, g'>.detach() is exactly 0 and has gradient g'. The backward pass
        # stops at ctx (a leaf), so it is cheap. The GradScaler scales this loss and unscales the
        # gradient, so it passes g' through unchanged; if g' overflowed, the step is skipped.
        inner = (ctx * gradient).sum()
        return logits.detach(), loss.detach() + (inner - inner.detach())

    def epoch_record(self, epoch):
        conflicting, steps = self.conflicts.get(epoch, (0, 0))
        return {"prograd_conflict_fraction": conflicting / steps if steps else None}


# -----------------------------------------------------------------------------
# NLPrompt: optimal transport between images and class prompts splits clean from noisy.

OT_EPSILON = 1.0           # entropic regularisation of the transport, on the cost -log p
SINKHORN_ITERATIONS = 1000
SINKHORN_TOLERANCE = 1e-9  # largest error of a column sum (each should be 1/C)


def sinkhorn(cost, epsilon=OT_EPSILON):
    r"""The entropic optimal transport plan [N, C] between N samples and C classes with uniform
    marginals (every row sums to 1/N, every column to 1/C), computed in log space in float64.

        P = argmin  <P, M> - epsilon H(P)   subject to   P 1 = 1/N,  P^T 1 = 1/C
          = diag(u) K diag(v),   K = exp(-M / epsilon)

    Sinkhorn's iterations alternately rescale the rows and the columns to their marginals; here
    the scalings are kept as logarithms (f = log u, g = log v), so K may span any range. They
    stop when every column sum is within SINKHORN_TOLERANCE of 1/C; the rows are then exact.
    """
    log_kernel = -cost.double() / epsilon
    n, c = log_kernel.shape
    log_row, log_column = -math.log(n), -math.log(c)
    g = log_column - torch.logsumexp(log_kernel, dim=0)
    for _ in range(SINKHORN_ITERATIONS):
        f = log_row - torch.logsumexp(log_kernel + g[None, :], dim=1)
        column_log_sums = torch.logsumexp(log_kernel + f[:, None], dim=0)  # before scaling by v
        if (torch.exp(column_log_sums + g) - 1 / c).abs().max() < SINKHORN_TOLERANCE:
            break
        g = log_column - column_log_sums
    return torch.exp(log_kernel + f[:, None] + g[None, :])


def transport_labels(logits):
    """NLPrompt's label of each sample: the class to which its row of the transport plan sends
    the most mass, with CLIP's prediction as the cost.

    The cost is -log p (p = softmax of the logits) at epsilon = 1, so that K = p: the plan is
    p with its rows and columns rescaled, and a sample's transport label is argmax_c p_c v_c,
    CLIP's prediction reweighted so that every class receives N/C of the samples. Because the
    row scaling absorbs any per-sample constant, this is the same plan as the cost -cos(image,
    class prompt) at epsilon = 1/logit_scale (0.01 for CLIP): the negative similarity matrix
    of NLPrompt's paper. NLPrompt's released code uses the cost -p at epsilon = 0.01 instead, on
    which Sinkhorn converges far more slowly: on random 1600 x 100 problems its column sums
    were still off by 1e-5 after 1000 iterations, where -log p reached 1e-8 within 60.
    """
    return sinkhorn(-logits.float().log_softmax(dim=-1)).argmax(dim=-1)


class NLPrompt(dspt.PromptTuning):
    """NLPrompt (PromptOT with PromptMAE) for dspt.train; its loss is also the diagnostics' loss_fn.

    At the start of every epoch, the current prompts' logits of all training images go through
    transport_labels; a sample whose transport label equals its given label counts as clean. In
    each batch the clean samples get cross-entropy and the others MAE, 1 - p_y, each sample
    weighted 1/batch size. features: the frozen features of the training images at positions
    kept (dspt.encode_images); labels, noisy: the given labels and the mask of the wrong ones.
    """

    def __init__(self, learner, features, kept, labels, noisy, scaler=None):
        super().__init__(learner, self.loss, scaler)
        self.features, self.kept = features, kept
        self.labels, self.noisy = labels, noisy
        self.clean = torch.ones(len(labels), dtype=torch.bool)
        self.batch_clean = None
        self.epoch, self.records = None, {}  # epoch -> the transport split's figures

    def logits(self, image_features):
        return self.learner.clip.logits(image_features, self.learner.text_features())

    def flagged_loss(self, logits, target):
        """MAE, 1 - p_y, per sample: the loss of the samples the transport does not call clean."""
        return 1 - logits.softmax(dim=-1).gather(1, target[:, None]).squeeze(1)

    def split(self):
        with torch.no_grad():
            logits = torch.cat([self.logits(chunk) for chunk in self.features.split(256)])
        agrees = transport_labels(logits).cpu() == self.labels[self.kept]
        self.clean[self.kept] = agrees
        flagged, wrong = ~agrees, self.noisy[self.kept] == 1
        caught = (flagged & wrong).sum().item()
        record = {"ot_clean_fraction": agrees.float().mean().item(),
                  "ot_noisy_precision": caught / flagged.sum().item() if flagged.any() else None,
                  "ot_noisy_recall": caught / wrong.sum().item() if wrong.any() else None}
        self.records[self.epoch] = record
        print(f"optimal transport: {agrees.sum().item()} of {len(agrees)} samples clean; of the "
              f"{flagged.sum().item()} others, {caught} have wrong labels (of {wrong.sum().item()})",
              flush=True)

    def loss(self, logits, target):
        """Mean of cross-entropy on this batch's clean samples and flagged_loss on the others."""
        logits = logits.float()
        cross_entropy = F.cross_entropy(logits, target, reduction="none")
        return torch.where(self.batch_clean.to(logits.device), cross_entropy, self.flagged_loss(logits, target)).mean()

    def step(self, image_features, target, index, epoch):
        if epoch != self.epoch:
            self.epoch = epoch
            self.split()
        # Kept for self.loss, which train() calls again, on this batch, for its diagnostics.
        self.batch_clean = self.clean[index]
        logits = self.logits(image_features)
        return logits, self.loss(logits, target)

    def epoch_record(self, epoch):
        return self.records[epoch]


# -----------------------------------------------------------------------------
# VisPrompt: the context conditioned on each image; NLPrompt's split, with GCE for the flagged.

class ImageConditionedContext(nn.Module):
    r"""VisPrompt's context for each image, from the shared context ctx [n_ctx, D] and the images'
    global features f [B, E] (a reconstruction of the authors' unreleased module):

        k = W_k f                        the image feature projected to the text width D
        a = MHA(LN(ctx); k, k)           context tokens as queries, 8 heads; with the one key k the
                                         attention weights are all 1, so a = W_o W_v k + b
        gamma, beta = W_f a              FiLM: m = ctx * (1 + gamma) + beta
        g = sigmoid(w_g . a + b_g)       one gate per context token
        ctx' = ctx + g * m,   then ctx' + FFN(LN(ctx'))

    Inferred: the FiLM layer and the FFN's last layer start at zero (so m = ctx and the FFN adds
    nothing at first); the FFN's hidden width is D; the feature passed is the image's global
    CLIP feature, as the authors' code passes it (their text speaks of patch tokens).
    """

    def __init__(self, width, image_dim, heads=8):
        super().__init__()
        self.image_projection = nn.Linear(image_dim, width)
        self.norm = nn.LayerNorm(width)
        self.attention = nn.MultiheadAttention(width, heads, batch_first=True)
        self.film = nn.Linear(width, 2 * width)
        self.gate = nn.Linear(width, 1)
        self.feed_forward = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, width), nn.GELU(),
                                          nn.Linear(width, width))
        for layer in (self.film, self.feed_forward[-1]):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, ctx, image_features):
        """[B, n_ctx, D] from ctx [n_ctx, D] and image_features [B, E]; also the gates [B, n_ctx]."""
        key = self.image_projection(image_features.float())[:, None]  # [B, 1, D]
        query = self.norm(ctx).expand(len(key), -1, -1)  # [B, n_ctx, D]
        attended = self.attention(query, key, key, need_weights=False)[0]
        gamma, beta = self.film(attended).chunk(2, dim=-1)
        gate = torch.sigmoid(self.gate(attended))  # [B, n_ctx, 1]
        context = ctx + gate * (ctx * (1 + gamma) + beta)
        return context + self.feed_forward(context), gate.squeeze(-1)


def per_image_logits(clip, image_features, text_features):
    """Scaled cosine similarities [B, C] of each image with its own class prompts [B, C, E]."""
    image_features = F.normalize(image_features.float(), dim=-1)
    text_features = F.normalize(text_features.float(), dim=-1)
    return clip.logit_scale.exp().float() * torch.einsum("be,bce->bc", image_features, text_features)


class VisPrompt(NLPrompt):
    """VisPrompt for dspt.train: every image gets its own context
    (ImageConditionedContext, a submodule of the learner, so trained with ctx), packed into
    prompts for every class as dspt.PromptLearner packs them; each epoch NLPrompt's transport
    split on those logits; cross-entropy for the samples it calls clean, GCE (q = 0.5) for
    the others. Records the split and the mean gate of each epoch."""

    def __init__(self, learner, features, kept, labels, noisy, scaler=None):
        super().__init__(learner, features, kept, labels, noisy, scaler)
        clip = learner.clip
        learner.conditioner = ImageConditionedContext(learner.ctx.shape[-1], clip.text_projection.shape[1]).to(
            learner.ctx.device)
        self.gates = {}  # epoch -> [sum of the batches' mean gates, batches]

    def logits(self, image_features):
        context, gate = self.learner.conditioner(self.learner.ctx, image_features)
        if torch.is_grad_enabled():
            total = self.gates.setdefault(self.epoch, [0.0, 0])
            total[0] += gate.mean().item()
            total[1] += 1
        return per_image_logits(self.learner.clip, image_features, self.learner.text_features(context))

    def flagged_loss(self, logits, target):
        log_p_y = logits.log_softmax(dim=-1).gather(1, target[:, None]).squeeze(1)
        return (1 - torch.exp(0.5 * log_p_y)) / 0.5  # GCE, q = 0.5

    def epoch_record(self, epoch):
        total, batches = self.gates.get(epoch, (0.0, 0))
        return {**super().epoch_record(epoch), "visprompt_gate_mean": total / batches if batches else None}


# -----------------------------------------------------------------------------
# ANPrompt (a reconstruction): noise prompts from perturbed sentences, anti-noise prompts in
# the deeper layers of both encoders, a visual prototype, and a weak alignment loss.

# Mild perturbations of "a photo of a {}." (from CLIP's own prompt ensemble), fused with each
# class's main sentence into weakly perturbed text features.
PERTURBATIONS = ["a blurry photo of a {}.", "a cropped photo of a {}.", "a close-up photo of a {}.",
                 "a low resolution photo of a {}.", "a bright photo of a {}.", "a photo of the small {}."]


def kmeans(points, k, iterations=50):
    """Lloyd's k-means: the centroids [k, dim]. It starts from the first point and then, one at a
    time, the point farthest from those chosen, so that separated clusters each get one."""
    chosen = [0]
    for _ in range(k - 1):
        chosen.append(int(torch.cdist(points, points[chosen]).min(dim=1).values.argmax()))
    centroids = points[chosen].clone()
    for _ in range(iterations):
        assignment = torch.cdist(points, centroids).argmin(dim=1)
        for j in range(k):
            if (assignment == j).any():
                centroids[j] = points[assignment == j].mean(dim=0)
    return centroids


def noise_prompts(clip, tokenizer, classnames, template, n, weight=0.5):
    """[n, embed_dim]: the k-means centroids of every class's main sentence's text feature fused
    with each perturbed sentence's, (1 - weight) e(main) + weight e(perturbed), normalised."""
    def encode(texts):
        return F.normalize(clip.encode_text(tokenizer.tokenize(texts).to(clip.text_projection.device)).float(), dim=-1)
    with torch.no_grad():
        main = encode([template.format(name) for name in classnames])
        fused = [F.normalize((1 - weight) * main + weight * encode([p.format(name) for name in classnames]), dim=-1)
                 for p in PERTURBATIONS]
    return kmeans(torch.cat(fused).cpu(), min(n, len(classnames) * len(PERTURBATIONS))).to(main.device)


def weak_alignment_loss(logits, clean_logits):
    """The mean squared difference of the two predictions' logits over the classes, each sample's
    divided by the spread (standard deviation) of its clean logits, or by 1 if that is smaller: a
    consistency at the logit level that does not grow with CLIP's logit scale, nor explode when
    the logits are nearly flat."""
    spread = clean_logits.std(dim=-1, keepdim=True).detach().clamp(min=1.0)
    return (((logits - clean_logits) / spread) ** 2).mean()


class ANPrompt(nn.Module, dspt.PromptTuning):
    """ANPrompt for dspt.train (its step, and its encode: the frozen part of the image encoder), as
    reconstructed here (its code is unreleased; every choice below is inferred from its description).

    Noise prompts N [n_ctx, E]: noise_prompts of the class names. Anti-noise prompts: in each of
    the deeper half of the text transformer's layers, A_l = T_l + N W_t is added to the hidden
    states of the context positions; in the deeper half of a ViT's layers (a ResNet's attention
    pool), n_ctx vision prompt tokens V_l = U_l + N W_v are appended (replaced at every layer),
    and their outputs, averaged and projected like the class token, are the visual prototype
    added, times a learned scale, to the image feature (NRVPP). T, W_t, W_v and the scale start
    at zero, so the text side starts as CoOp's; U starts as N(0, 0.02). The "clean" prediction leaves out the noise prompts' share
    (N W_t, N W_v); the loss is --loss on the anti-noise prediction plus weight times
    weak_alignment_loss between the two. Predictions use the anti-noise prompts.
    """

    def __init__(self, learner, noise, loss_fn, weight=1.0, scaler=None):
        super().__init__()
        self.scaler = scaler or torch.amp.GradScaler("cuda", enabled=False)
        clip, n_ctx = learner.clip, len(learner.ctx)
        self.learners, self.loss_fn, self.weight = [learner], loss_fn, weight  # a list: not a submodule
        self.register_buffer("noise", noise.float())
        text_layers, text_width = len(clip.transformer.resblocks), clip.ln_final.weight.shape[0]
        self.text_depth = max(1, text_layers // 2)
        self.text_tokens = nn.Parameter(torch.zeros(self.text_depth, n_ctx, text_width))
        self.text_map = nn.Parameter(torch.zeros(noise.shape[1], text_width))
        visual = clip.visual
        self.vit = isinstance(visual, dspt.VisionTransformer)
        vision_width = visual.ln_post.weight.shape[0] if self.vit else visual.attnpool.k_proj.in_features
        self.vision_depth = max(1, len(visual.transformer.resblocks) // 2) if self.vit else 1
        self.vision_tokens = nn.Parameter(0.02 * torch.randn(self.vision_depth, n_ctx, vision_width))
        self.vision_map = nn.Parameter(torch.zeros(noise.shape[1], vision_width))
        self.prototype_scale = nn.Parameter(torch.zeros(()))  # the prototype's share starts at zero
        self.to(learner.ctx.device)
        learner.anprompt = self  # trained with the context
        self.alignment = {}  # epoch -> [sum of the steps' alignment losses, steps]

    @property
    def learner(self):
        return self.learners[0]

    def encode(self, images):
        """The image encoder up to its first prompted layer (no prompts before it): frozen."""
        visual = self.learner.clip.visual
        if not self.vit:
            x = images.to(visual.conv1.weight.dtype, memory_format=torch.channels_last)
            x = F.relu(visual.bn1(visual.conv1(x)))
            x = F.relu(visual.bn2(visual.conv2(x)))
            x = visual.avgpool(F.relu(visual.bn3(visual.conv3(x))))
            x = visual.layer4(visual.layer3(visual.layer2(visual.layer1(x))))
            return x.flatten(2).transpose(1, 2)  # NCHW -> N(HW)C, the attention pool's input
        x = visual.conv1(images.to(visual.conv1.weight.dtype)).flatten(2).transpose(1, 2)
        x = torch.cat([visual.class_embedding.to(x.dtype).expand(len(x), 1, -1), x], dim=1)
        x = visual.ln_pre(x + visual.positional_embedding.to(x.dtype))
        for block in visual.transformer.resblocks[:len(visual.transformer.resblocks) - self.vision_depth]:
            x = block(x)
        return x

    def image_features(self, frozen, noise=True):
        """[B, E]: the image feature plus the visual prototype, from encode's output."""
        visual, n = self.learner.clip.visual, self.vision_tokens.shape[1]
        dtype = visual.conv1.weight.dtype
        prompts = (self.vision_tokens + (self.noise @ self.vision_map if noise else 0)).to(dtype)  # [depth, n, width]
        x = frozen.to(dtype)
        if self.vit:
            x = torch.cat([x, prompts[0].expand(len(x), -1, -1)], dim=1)
            for depth, block in enumerate(visual.transformer.resblocks[-self.vision_depth:]):
                x = block(torch.cat([x[:, :-n], prompts[depth].expand(len(x), -1, -1)], dim=1))
            out = visual.ln_post(torch.stack([x[:, 0], x[:, -n:].mean(dim=1)])) @ visual.proj
            return out[0] + self.prototype_scale * out[1]
        pool = visual.attnpool
        x = torch.cat([x.mean(dim=1, keepdim=True), x], dim=1) + pool.positional_embedding.to(x.dtype)
        x = torch.cat([x, prompts[0].expand(len(x), -1, -1)], dim=1)
        queries = torch.cat([x[:, :1], x[:, -n:]], dim=1)  # the mean token and the prompts
        q = dspt.split_heads(pool.q_proj(queries), pool.heads)
        k, v = dspt.split_heads(pool.k_proj(x), pool.heads), dspt.split_heads(pool.v_proj(x), pool.heads)
        out = pool.c_proj(dspt.merge_heads(F.scaled_dot_product_attention(q, k, v)))
        return out[:, 0] + self.prototype_scale * out[:, 1:].mean(dim=1)

    def text_features(self, noise=True):
        """[C, E]: the learner's packed prompts with the anti-noise prompts added at the context
        positions of the deeper layers."""
        learner = self.learner
        clip, n = learner.clip, len(learner.ctx)
        prompts = self.text_tokens + (self.noise @ self.text_map if noise else 0)  # [depth, n, width]
        pieces = torch.cat([learner.sot_embedding, learner.ctx, learner.suffix_embedding])
        x = (pieces[learner.index] + clip.positional_embedding[learner.position]).to(clip.dtype)
        blocks = clip.transformer.resblocks
        for layer, block in enumerate(blocks):
            depth = layer - (len(blocks) - self.text_depth)
            if depth >= 0:
                x = torch.cat([x[:, :1], x[:, 1:1 + n] + prompts[depth].to(x.dtype), x[:, 1 + n:]], dim=1)
            x = block(x, learner.mask[:, None])
        return clip.ln_final(x.flatten(0, 1)[learner.eot_index]) @ clip.text_projection

    def logits(self, frozen, noise=True):
        return self.learner.clip.logits(self.image_features(frozen, noise), self.text_features(noise))

    def step(self, frozen, target, index, epoch):
        logits = self.logits(frozen)
        alignment = weak_alignment_loss(logits, self.logits(frozen, noise=False))
        total = self.alignment.setdefault(epoch, [0.0, 0])
        total[0] += alignment.item()
        total[1] += 1
        return logits, self.loss_fn(logits, target) + self.weight * alignment

    def epoch_record(self, epoch):
        total, steps = self.alignment.get(epoch, (0.0, 0))
        return {"anprompt_alignment_loss": total / steps if steps else None}


# -----------------------------------------------------------------------------
# UPL: zero-shot CLIP's most confident predictions as labels.

def select_confident_per_class(probabilities, k):
    """(indices, predicted classes) of the k samples of each predicted class with the highest
    predicted probability (fewer if fewer are predicted as that class), grouped by class, most
    confident first, ties to the lower index. probabilities: [N, C]."""
    confidence, predicted = probabilities.max(dim=-1)
    confidence, predicted = confidence.cpu().numpy(), predicted.cpu().numpy()
    order = np.lexsort((np.arange(len(predicted)), -confidence, predicted))  # last key sorts first
    first_of_class = np.searchsorted(predicted[order], predicted[order])
    chosen = order[np.arange(len(order)) - first_of_class < k]  # rank within the class < k
    return torch.from_numpy(chosen), torch.from_numpy(predicted[chosen])


def pseudo_labelled_training_set(clip, preprocess, pool, template_features, args):
    """(items, pseudo-labels, mask of the wrong ones, n_unreadable): the --shots images of each
    class that zero-shot CLIP is most confident about, from the whole pool. The true labels
    serve only to count the wrong pseudo-labels."""
    with torch.random.fork_rng(devices=[]):  # leave the global RNG, hence the context init, alone
        features, kept, unreadable = dspt.encode_images(clip, pool, preprocess, args,
                                                        "pseudo-labelling training images")
    with torch.no_grad():
        probabilities = clip.logits(features, template_features).softmax(dim=-1)
    chosen, pseudo = select_confident_per_class(probabilities, args.shots)
    items = [pool[i] for i in kept[chosen].tolist()]
    short = (torch.bincount(pseudo, minlength=len(template_features)) < args.shots).sum().item()
    if short:
        dspt.warn(f"zero-shot CLIP predicts {short} of the classes for fewer than --shots {args.shots} "
                  f"training images; they have fewer pseudo-labelled images than the others")
    true = torch.tensor([label for _, label in items])
    return items, pseudo, pseudo != true, unreadable


# -----------------------------------------------------------------------------
# main: dspt.py's run, with the method's training set and step loss.

def parse_args(argv=None):
    """dspt.py's flags, and --method and --prograd-lambda."""
    parser = dspt.build_parser()
    parser.description = ("DSPT's peers (CoOp, ProGrad, NLPrompt, VisPrompt, ANPrompt, UPL) under dspt.py's "
                          "protocol: every flag of dspt.py applies, and --method picks the method.")
    add = parser.add_argument
    add("--method", choices=METHODS, default="coop",
        help="coop: dspt.py's run, CoOp with --loss; prograd: ProGrad with --loss as its domain loss "
             "(as published: --loss ce --epochs 200, and --prograd-init release); "
             "nlprompt: NLPrompt, cross-entropy on the samples optimal transport calls clean and MAE "
             "on the rest, whatever --loss says; visprompt: VisPrompt as reconstructed here (inferred: "
             "the image's global feature as the one key, FiLM and FFN output starting at zero, FFN width "
             "as the text width), each image's own context, NLPrompt's split, cross-entropy on the clean "
             "and GCE q=0.5 on the rest, whatever --loss says; anprompt: ANPrompt as reconstructed here "
             "(inferred: the perturbed sentences, their fusion and clustering, additive text prompts and "
             "appended vision prompts in the deeper half of the layers, the prototype added to the image "
             "feature, the alignment loss; see README), --loss plus the alignment loss (published: --loss ce); "
             "upl: UPL's pseudo-labels, --loss on "
             "zero-shot CLIP's --shots most confident images per class, no labels, no --noise "
             "(default %(default)s)")
    add("--prograd-lambda", type=float, default=1.0, metavar="LAMBDA",
        help="prograd: the fraction of the conflicting component removed, in [0, 1] (default %(default)s)")
    add("--prograd-init", choices=["release", "coop"], default="release",
        help="prograd: release: as ProGrad's released code, on a dataset of CoOp's benchmark, the zero-shot "
             "teacher's template is ProGrad's own for the dataset (e.g. OxfordPets 'a type of pet, a photo of "
             "a {}.', DTD 'a texture of {}.') and --n-ctx context vectors start from its words, the last of them "
             "at the words' embeddings and zeros before; coop: CoOp's template and --ctx-init as given (random "
             "if none). An explicit --template or --ctx-init wins either way (default %(default)s)")
    return parser.parse_args(argv)


def check_args(args):
    """dspt.check_args, the method's own checks, and the method in the default --out."""
    if not 0 <= args.prograd_lambda <= 1:
        raise dspt.UserError(f"--prograd-lambda {args.prograd_lambda} is outside [0, 1]")
    if args.method == "upl" and args.noise:
        raise dspt.UserError("--method upl trains on zero-shot CLIP's pseudo-labels, which "
                             "have their own noise; leave --noise at 0")
    default_out = args.out is None
    dspt.check_args(args)
    if default_out:
        args.out = str(Path(args.out).with_name(f"{args.method}-{Path(args.out).name}"))


def prepare(args, shared):
    """dspt.prepare for args.method: its template, training set, context and method."""
    dataset, tokenizer, clip, preprocess = shared.dataset, shared.tokenizer, shared.clip, shared.preprocess
    classnames, train_items = dataset.classnames, dataset.train
    template, ctx_init, name_prefix = args.template or dataset.template, args.ctx_init, ""
    if args.method == "prograd" and args.prograd_init == "release" and dataset.name in PROGRAD_TEMPLATES:
        template = args.template or PROGRAD_TEMPLATES[dataset.name]
        if not args.ctx_init:
            ctx_init, name_prefix = prograd_release_context(PROGRAD_TEMPLATES[dataset.name], tokenizer)
    template_features = dspt.zero_shot_text_features(clip, tokenizer, template, classnames, args, shared.memo)
    if args.method == "upl":
        pool_size = len(train_items)
        train_items, labels, noisy, unreadable = pseudo_labelled_training_set(
            clip, preprocess, train_items, template_features, args)
        extra = {"pseudo_label_pool": pool_size, "pseudo_label_accuracy": 1 - noisy.float().mean().item()}
        print(f"{dataset.name}: {len(classnames)} classes, {len(train_items)} training images pseudo-labelled from "
              f"{pool_size} ({noisy.sum().item()} wrong), {len(dataset.test)} test images, "
              f"{args.backbone} on {args.device} ({args.precision})")
    else:
        train_items, labels, noisy, unreadable = dspt.noisy_few_shot(train_items, len(classnames), args,
                                                                      dataset.verified, shared.memo)
        extra = {"label_truth": dspt.label_truth(noisy)} if dataset.verified else {}
        print(f"{dataset.name}: {len(classnames)} classes, {len(train_items)} training images "
              f"({(noisy == 1).sum().item()} with wrong labels), {len(dataset.test)} test images, {args.backbone} "
              f"on {args.device} ({args.precision})")
    zero_shot = dspt.accuracy(clip.logits(shared.test_features, template_features), shared.test_labels)
    print(f"zero-shot test accuracy {zero_shot:.2%}")

    learner = dspt.PackedPromptLearner(clip, classnames, tokenizer, args.n_ctx, ctx_init, name_prefix)
    loss_fn, scaler = dspt.LOSSES[args.loss], dspt.grad_scaler(args)
    if args.method == "prograd":
        method = ProGrad(learner, loss_fn, template_features, scaler, args.prograd_lambda)
    elif args.method in ("nlprompt", "visprompt"):
        key = ("training features", tuple(path for path, _ in train_items))  # the same for a group's runs
        if key not in shared.memo:
            with torch.random.fork_rng(devices=[]):  # leave the global RNG, hence augmentation, alone
                shared.memo[key] = dspt.encode_images(clip, train_items, preprocess, args,
                                                      "encoding training images for optimal transport")
        features, kept_train, _ = shared.memo[key]
        method = (NLPrompt if args.method == "nlprompt" else VisPrompt)(learner, features, kept_train, labels, noisy,
                                                                         scaler)
    elif args.method == "anprompt":
        noise = noise_prompts(clip, tokenizer, classnames, template, len(learner.ctx))
        method = ANPrompt(learner, noise, loss_fn, scaler=scaler)
    else:  # coop, upl
        method = dspt.PromptTuning(learner, loss_fn, scaler)
    metrics = {
        "method": args.method,
        "args": {k: v for k, v in vars(args).items() if k != "dtype"}, "command": dspt.command(args),
        "dataset": dataset.name, "split": dataset.split, "template": template,
        **({"prograd_context_init": ctx_init, "prograd_name_prefix": name_prefix} if args.method == "prograd" else {}),
        "classnames": classnames, "train_images": len(train_items), "test_images": len(shared.test_labels),
        "unreadable_images": unreadable + shared.unreadable_test,
        "noise_rate": (noisy == 1).float().mean().item(), **extra, "zero_shot_accuracy": zero_shot,
    }
    return dspt.Job(method, train_items, labels, noisy, args, Path(args.out) / "checkpoint.pt", metrics)


def finish(job, history, shared):
    """dspt.finish, with the test logits of methods whose prompts depend on the image."""
    args, method, clip = job.args, job.method, shared.clip
    with torch.no_grad(), dspt.autocast(args):
        if args.method == "visprompt":  # each test image with its own prompts
            logits = torch.cat([method.logits(chunk) for chunk in shared.test_features.split(256)])
        elif args.method == "anprompt":  # each test image through the prompted encoder again
            logits, _, _ = dspt.encode_images(clip, shared.dataset.test, shared.preprocess, args, "encoding test images",
                                              lambda images: method.logits(method.encode(images)))
        else:
            logits = None
    return dspt.finish(job, history, shared, logits)


def run(args):
    """Train and evaluate args.method; returns the metrics, also written to --out, which the run holds meanwhile."""
    return dspt.run(args, check_args, prepare, finish)


def main(argv=None):
    """Train and evaluate; returns the metrics. A user error exits with one line and status 1."""
    return dspt.main(argv, "baselines", parse_args, run)


if __name__ == "__main__":
    main()
