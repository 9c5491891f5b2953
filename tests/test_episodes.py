"""Episode sampler invariants on real Omniglot pools and synthetic ones."""

from __future__ import annotations

import pytest
import torch

from mann.config import TaskConfig
from mann.episodes import EpisodeSampler, accuracy_by_instance
from mann.labels import STRING_ALPHABET, encode_labels, string_digits


def synthetic_pool(classes=30, drawers=20, size=8):
    # every image encodes (class, drawer) in two pixels so the sampler's choices can be read back
    pool = torch.zeros(classes, drawers, size, size, dtype=torch.uint8)
    for c in range(classes):
        for d in range(drawers):
            pool[c, d, 0, 0] = c
            pool[c, d, 0, 1] = d
    return pool


def decode(ep, size=8):
    img = ep.inputs[..., : size * size].view(*ep.inputs.shape[:2], size, size) * 255
    return img[..., 0, 0].round().long(), img[..., 0, 1].round().long()


@pytest.mark.parametrize("classes,instances", [(5, 10), (15, 10), (3, 4), (2, 20)])
def test_exactly_k_instances_per_class_and_label_permutation(classes, instances):
    task = TaskConfig(classes=classes, instances=instances)
    sampler = EpisodeSampler(synthetic_pool(), task)
    ep = sampler.sample(8, torch.Generator().manual_seed(0))
    T = classes * instances
    assert ep.inputs.shape == (8, T, 64 + classes)
    cls, drawer = decode(ep)
    for b in range(8):
        counts = torch.bincount(cls[b], minlength=30)
        assert sorted(counts[counts > 0].tolist()) == [instances] * classes
        # labels are a bijection class <-> label, covering 0..classes-1
        pairs = set(zip(cls[b].tolist(), ep.labels[b].tolist()))
        assert len(pairs) == classes and sorted(l for _, l in pairs) == list(range(classes))
        # distinct drawers within a class
        for c in cls[b].unique():
            ds = drawer[b][cls[b] == c]
            assert len(ds.unique()) == instances


def test_previous_label_shift_and_instance_numbers():
    task = TaskConfig(classes=5, instances=10)
    ep = EpisodeSampler(synthetic_pool(), task).sample(4, torch.Generator().manual_seed(1))
    prev = ep.inputs[..., 64:]
    assert prev[:, 0].abs().sum() == 0  # zeros at the first step
    torch.testing.assert_close(prev[:, 1:], encode_labels(ep.labels, task)[:, :-1])
    cls, _ = decode(ep)
    for b in range(4):
        seen: dict[int, int] = {}
        for t in range(50):
            c = int(cls[b, t])
            seen[c] = seen.get(c, 0) + 1
            assert int(ep.instance[b, t]) == seen[c]


def test_string_labels_are_distinct_five_character_strings():
    task = TaskConfig(classes=15, instances=10, labels="string")
    ep = EpisodeSampler(synthetic_pool(), task).sample(6, torch.Generator().manual_seed(2))
    assert ep.inputs.shape[-1] == 64 + 25
    assert int(ep.labels.max()) < STRING_ALPHABET**5
    for b in range(6):
        assert len(ep.labels[b].unique()) == 15
    digits = string_digits(ep.labels)
    enc = encode_labels(ep.labels, task)
    assert enc.shape[-1] == 25 and torch.equal(enc.view(6, 150, 5, 5).argmax(-1), digits)
    assert torch.equal(enc.sum(-1), torch.full((6, 150), 5.0))


def test_same_seed_same_episodes_different_seed_different(omniglot_dir):
    from mann.config import DataConfig
    from mann.omniglot import load_omniglot, make_splits

    splits = make_splits(load_omniglot(DataConfig(data_dir=str(omniglot_dir))), DataConfig())
    sampler = EpisodeSampler(splits.train, TaskConfig(), max_shift=1)
    a = sampler.sample(16, torch.Generator().manual_seed(7))
    b = sampler.sample(16, torch.Generator().manual_seed(7))
    c = sampler.sample(16, torch.Generator().manual_seed(8))
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    assert not torch.equal(a.inputs, c.inputs)
    # images are real strokes in [0, 1]
    img = a.inputs[..., :400]
    assert 0.0 <= float(img.min()) and float(img.max()) <= 1.0 and 0.02 < float(img.mean()) < 0.5


def test_shift_moves_content_without_wrapping():
    pool = torch.zeros(5, 20, 8, 8, dtype=torch.uint8)
    pool[:, :, 3:5, 3:5] = 255  # a centred 2x2 square
    sampler = EpisodeSampler(pool, TaskConfig(classes=5, instances=4), max_shift=2)
    ep = sampler.sample(32, torch.Generator().manual_seed(0))
    img = ep.inputs[..., :64].view(32, 20, 8, 8)
    assert torch.equal(img.sum((-1, -2)), torch.full((32, 20), 4.0))  # nothing cut off or wrapped
    ys = img.sum(-1).argmax(-1)
    assert len(ys.unique()) == 5  # offsets -2..2 all occur


def test_shift_is_a_window_of_the_padded_image():
    """The vectorised shift equals cutting each image's window out of the zero-padded image by hand."""
    s, B, T, S = 2, 3, 4, 6
    images = torch.rand(B, T, S, S, generator=torch.Generator().manual_seed(1))
    sampler = EpisodeSampler(torch.zeros(5, 20, S, S, dtype=torch.uint8), TaskConfig(), max_shift=s)
    got = sampler._shift(images, torch.Generator().manual_seed(7))
    g = torch.Generator().manual_seed(7)  # the same draws as _shift: dy, then dx
    dy = torch.randint(0, 2 * s + 1, (B, T, 1, 1), generator=g)
    dx = torch.randint(0, 2 * s + 1, (B, T, 1, 1), generator=g)
    padded = torch.nn.functional.pad(images, (s, s, s, s))
    for b in range(B):
        for t in range(T):
            y, x = int(dy[b, t]), int(dx[b, t])
            assert torch.equal(got[b, t], padded[b, t, y : y + S, x : x + S])


def test_sampler_rejects_too_few_classes_or_drawers():
    with pytest.raises(ValueError, match="task.classes"):
        EpisodeSampler(synthetic_pool(classes=3), TaskConfig(classes=5))
    with pytest.raises(ValueError, match="task.instances"):
        EpisodeSampler(synthetic_pool(drawers=5), TaskConfig(classes=2, instances=10))


def test_accuracy_by_instance_hand_computed():
    labels = torch.tensor([[0, 1, 0, 1]])
    instance = torch.tensor([[1, 1, 2, 2]])
    pred = torch.tensor([[0, 0, 0, 1]])
    got = accuracy_by_instance(pred, labels, instance, 2)
    torch.testing.assert_close(got, torch.tensor([[0.5, 1.0]]))
