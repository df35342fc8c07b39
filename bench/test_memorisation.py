"""bench/memorisation.py's parts: the instance-rich features, the participation ratio against
hand-worked cases, and the learned-names learner against CoOp's. Its --quick run end to end is in
test_noise.py, on the model that test pretrains."""

import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import memorisation  # noqa: E402
from memorisation import dspt  # noqa: E402

TINY = dict(embed_dim=32, image_resolution=32, vision_layers=(1, 1, 1, 1), vision_width=8, vision_patch_size=None,
            context_length=77, vocab_size=49408, transformer_width=32, transformer_heads=2, transformer_layers=2)


def test_each_image_has_its_own_direction_fixed_by_its_pixels():
    images = torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    first = memorisation.own_direction(images[0], 16)
    assert torch.equal(first, memorisation.own_direction(images[0].clone(), 16))
    assert first.norm().item() == pytest.approx(1, abs=1e-6)
    assert abs(first @ memorisation.own_direction(images[1], 16)) < 0.9
    changed = images[0].clone()
    changed[0, 0, 0] += 0.5
    assert not torch.equal(first, memorisation.own_direction(changed, 16))


def test_instance_rich_features_add_the_own_direction_to_the_unit_feature():
    images = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    features = torch.tensor([[3.0, 4.0, 0, 0], [0, 0, 2.0, 0], [1.0, 0, 0, 0], [0, 0, 0, 5.0]])
    rich = memorisation.instance_rich(lambda x: features, detail=0.5)(images)
    for i in range(4):
        direction = memorisation.own_direction(images[i], 4)
        expected = features[i] / features[i].norm() + 0.5 * direction
        assert torch.allclose(rich[i], expected / expected.norm(), atol=1e-6)


def test_participation_ratio_counts_the_dimensions_of_the_within_class_spread():
    e = torch.eye(5)
    # unit points, each class spread along its own axis: class 0 at 0.8 e3 +- 0.6 e0, class 1 at
    # 0.6 e4 +- 0.8 e1; the spread's eigenvalues are 2 * 0.36 and 2 * 0.64, so 2^2 / (0.72^2 + 1.28^2)
    points = torch.stack([0.8 * e[3] + 0.6 * e[0], 0.8 * e[3] - 0.6 * e[0], 0.6 * e[4] + 0.8 * e[1],
                          0.6 * e[4] - 0.8 * e[1]])
    labels = torch.tensor([0, 0, 1, 1])
    assert memorisation.participation_ratio(points, labels) == pytest.approx(4 / (0.72 ** 2 + 1.28 ** 2))
    lengths = torch.tensor([[1.0], [2.0], [1.0], [3.0]])  # the ratio is of the unit features
    assert memorisation.participation_ratio(points * lengths, labels) == pytest.approx(4 / (0.72 ** 2 + 1.28 ** 2))
    # equal spread along three axes: exactly 3
    points = torch.stack([0.6 * e[3] + sign * 0.8 * e[axis] for axis in range(3) for sign in (1, -1)])
    assert memorisation.participation_ratio(points, torch.zeros(6, dtype=torch.long)) == pytest.approx(3.0)


@pytest.fixture(scope="module")
def tiny_clip_and_tokenizer():
    torch.manual_seed(0)
    clip = dspt.CLIP(**TINY).eval().requires_grad_(False)
    return clip, dspt.load_tokenizer(os.environ.get("DSPT_BPE") or openai_bpe())


def openai_bpe():
    """The BPE file of OpenAI's clip package (a test dependency), or None: dspt.py downloads it."""
    spec = importlib.util.find_spec("clip")
    path = spec and Path(spec.submodule_search_locations[0]) / "bpe_simple_vocab_16e6.txt.gz"
    return str(path) if path and path.is_file() else None


def test_learned_names_start_as_coop_and_train_only_the_names(tiny_clip_and_tokenizer):
    clip, tokenizer = tiny_clip_and_tokenizer
    names = ["red star", "great white shark", "dog"]
    torch.manual_seed(1)
    coop = dspt.PackedPromptLearner(clip, names, tokenizer, 4)
    torch.manual_seed(1)
    learner = memorisation.LearnedNames(clip, names, tokenizer, 4)
    assert torch.equal(learner.text_features(), coop.text_features())
    name_tokens = sum(len(tokenizer.encode(name)) for name in names)
    assert learner.names.shape == (name_tokens, clip.token_embedding.embedding_dim)
    assert [n for n, p in learner.named_parameters() if p.requires_grad] == ["ctx", "names"]

    before = coop.suffix_embedding.clone()
    optimizer = torch.optim.SGD([learner.ctx, learner.names], lr=1.0, weight_decay=5e-4)
    for _ in range(2):
        loss = learner.text_features()[:, 0].sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    learner.text_features()
    after = learner.suffix_embedding
    is_name = torch.zeros(len(before), dtype=torch.bool)
    is_name[learner.name_rows] = True
    assert (after[is_name] != before[is_name]).any(dim=-1).all()  # every name token moved
    assert torch.equal(after[~is_name], before[~is_name])  # ".", EOT and the padding did not
    tokens = tokenizer.tokenize([" ".join(["x"] * 4) + f" {name}." for name in names])
    suffix_tokens = torch.cat([row[5:int(row.argmax()) + 1] for row in tokens])  # after SOT and 4 "x"
    assert suffix_tokens[~is_name[:-1]].tolist() == [*tokenizer.encode("."), int(tokens.max())] * 3


def test_epochs_and_threads_below_one_are_refused():
    for flag in ("--epochs", "--threads"):
        with pytest.raises(SystemExit):
            memorisation.parse_args([flag, "0"])
    assert memorisation.parse_args(["--epochs", "100"]).epochs == 100
