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
        _assert_instances_count_appearances(ep.instance[b], cls[b])


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
    a, c = _same_seed_same_episodes(sampler, 16, 7)
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
    got = sampler.shift(images, torch.Generator().manual_seed(7))
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


# ---- random sampling (task.sampling: random, task.steps) ---------------------------------------------------------


def random_task(**kw):
    return TaskConfig(**{"classes": 3, "instances": 4, "sampling": "random", "steps": 20, **kw})


def test_random_sampling_has_task_steps_and_draws_classes_as_randint():
    task = random_task()
    ep = EpisodeSampler(synthetic_pool(), task).sample(5, torch.Generator().manual_seed(3))
    assert ep.inputs.shape == (5, 20, 64 + 3) and ep.labels.shape == ep.instance.shape == (5, 20)
    # the draws in the sampler's order: 3 distinct classes, then every step's class slot uniform in [0, 3)
    g = torch.Generator().manual_seed(3)
    classes = torch.multinomial(torch.ones(5, 30), 3, replacement=False, generator=g)
    slot = torch.randint(0, 3, (5, 20), generator=g)
    cls, _ = decode(ep)
    assert torch.equal(cls, classes.gather(1, slot))
    # labels: one per class, the same label every time the class appears
    for b in range(5):
        pairs = set(zip(cls[b].tolist(), ep.labels[b].tolist()))
        assert len(pairs) == len(cls[b].unique()) == len({l for _, l in pairs})


def test_random_sampling_counts_vary_and_instances_are_numbered_past_k():
    task = random_task(classes=5, instances=10, steps=50)
    ep = EpisodeSampler(synthetic_pool(), task).sample(64, torch.Generator().manual_seed(4))
    cls, drawer = decode(ep)
    counts = torch.stack([torch.bincount(c, minlength=30) for c in cls])  # (64, 30)
    assert counts.sum(1).eq(50).all()
    assert len(counts[counts > 0].unique()) > 3  # samples per class vary between classes and episodes
    assert int(ep.instance.max()) > 10  # a class seen more than K times keeps counting
    for b in range(64):
        _assert_instances_count_appearances(ep.instance[b], cls[b])
        for c in cls[b].unique():  # distinct drawers while a class has fewer than 20 appearances
            assert len(drawer[b][cls[b] == c].unique()) == min(20, int((cls[b] == c).sum()))


def test_random_sampling_is_uniform_over_the_episode_classes():
    task = random_task(classes=5, instances=10, steps=100)
    ep = EpisodeSampler(synthetic_pool(), task).sample(400, torch.Generator().manual_seed(5))
    # after the first step, the first step's class comes back with probability 1/5 (40,000 draws, s.e. 0.002)
    share = (ep.labels[:, 1:] == ep.labels[:, :1]).float().mean()
    assert abs(float(share) - 0.2) < 0.01


def test_random_sampling_wraps_drawers_after_the_last():
    task = random_task(classes=2, instances=4, steps=60)
    ep = EpisodeSampler(synthetic_pool(classes=4, drawers=5), task).sample(2, torch.Generator().manual_seed(6))
    cls, drawer = decode(ep)
    for b in range(2):
        for c in cls[b].unique():
            ds = drawer[b][cls[b] == c]
            # appearance k shows the ((k-1) mod 5)-th drawer of one order: a cycle of the 5 drawers
            assert sorted(ds[:5].tolist()) == list(range(5)) and torch.equal(ds[5:], ds[: len(ds) - 5])


def test_random_sampling_same_seed_same_episodes():
    sampler = EpisodeSampler(synthetic_pool(), random_task(labels="string"), max_shift=1)
    a, c = _same_seed_same_episodes(sampler, 8, 9)
    assert not torch.equal(a.labels, c.labels)


def test_random_sampling_allows_more_appearances_than_drawers():
    # balanced sampling needs K distinct drawers; random sampling only scores K instances and wraps drawers
    EpisodeSampler(synthetic_pool(drawers=5), random_task(instances=10, steps=40))


def test_accuracy_by_instance_unequal_counts_hand_computed():
    # episode 0: class A at instances 1,2,3 (3rd not scored with K=2), class B at 1; episode 1: no 2nd instance
    labels = torch.tensor([[7, 7, 9, 7], [1, 2, 3, 4]])
    instance = torch.tensor([[1, 2, 1, 3], [1, 1, 1, 1]])
    pred = torch.tensor([[7, 0, 9, 0], [1, 0, 0, 4]])
    got = accuracy_by_instance(pred, labels, instance, 2)
    # episode 0: 1st instances (steps 0, 2) both right; 2nd (step 1) wrong; episode 1: 1st 2 of 4, 2nd none
    torch.testing.assert_close(got, torch.tensor([[1.0, 0.0], [0.5, float("nan")]]), equal_nan=True)


def test_mean_ci95_skips_episodes_without_the_instance():
    from mann.train import mean_ci95

    nan = float("nan")
    acc = torch.tensor([[1.0, 0.0], [0.5, nan], [0.0, 1.0]])
    mean, ci = mean_ci95(acc)
    torch.testing.assert_close(mean, torch.tensor([0.5, 0.5], dtype=torch.float64))
    # column 0: sample std of (1, .5, 0) is .5 over 3 episodes; column 1: std of (0, 1) is sqrt(.5) over 2
    want = torch.tensor([1.96 * 0.5 / 3**0.5, 1.96 * 0.5**0.5 / 2**0.5], dtype=torch.float64)
    torch.testing.assert_close(ci, want)
    mean, ci = mean_ci95(torch.tensor([[nan], [nan]]))
    assert mean.tolist() == [0.0] and ci.tolist() == [0.0]


def test_string_loss_sum_is_five_times_the_mean():
    from mann.model import episode_loss

    task = TaskConfig(classes=3, instances=2, labels="string")
    logits = torch.randn(2, 6, 25, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([[0, 3124, 7, 0, 3124, 7], [5, 6, 7, 8, 9, 10]])
    mean = episode_loss(logits, labels, task)
    digits = string_digits(labels)
    by_hand = sum(
        torch.nn.functional.cross_entropy(logits[..., 5 * j : 5 * j + 5].reshape(-1, 5), digits[..., j].reshape(-1))
        for j in range(5)
    ) / 5
    torch.testing.assert_close(mean, by_hand)
    torch.testing.assert_close(episode_loss(logits, labels, task, "sum"), 5 * by_hand)


def test_string_scoring_needs_all_five_characters():
    from mann.model import predict

    task = TaskConfig(classes=3, instances=2, labels="string")
    labels = torch.tensor([[0, 3124, 1233, 7]])  # 1233 = 1,4,4,1,3 in base 5
    logits = encode_labels(labels, task)  # the label's own five one-hots as logits: every character right
    assert torch.equal(predict(logits, task), labels)
    wrong = logits.clone()
    wrong[0, 2, 20:25] = torch.tensor([0.0, 0.0, 0.0, 0.0, 2.0])  # the last character of step 2 becomes 4
    got = predict(wrong, task)
    assert (got == labels).tolist() == [[True, True, False, True]] and int(got[0, 2]) == 1234


def _assert_instances_count_appearances(instance, cls) -> None:
    """``[T]`` instance numbers are, step by step, how often the step's class has appeared so far (a loop)."""
    seen: dict[int, int] = {}
    for t in range(len(cls)):
        c = int(cls[t])
        seen[c] = seen.get(c, 0) + 1
        assert int(instance[t]) == seen[c]


def _same_seed_same_episodes(sampler: EpisodeSampler, batch: int, seed: int):
    """Asserts two draws with ``seed`` are equal; returns one of them and a draw with ``seed + 1``."""
    a = sampler.sample(batch, torch.Generator().manual_seed(seed))
    b = sampler.sample(batch, torch.Generator().manual_seed(seed))
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    return a, sampler.sample(batch, torch.Generator().manual_seed(seed + 1))
