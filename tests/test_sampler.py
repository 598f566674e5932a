import random

from mentalglm.data.sampler import LengthGroupedBatchSampler, padding_stats


def skewed_lengths(n=1000, seed=0):
    # Mostly short posts with a long tail, like C-IMHI mixed with IMHI DR.
    rng = random.Random(seed)
    return [rng.randint(20, 60) if rng.random() < 0.7 else rng.randint(200, 1000) for _ in range(n)]


def test_every_index_once_per_epoch():
    lengths = skewed_lengths(103)
    sampler = LengthGroupedBatchSampler(lengths, 4, bucket_batches=5, seed=1)
    for epoch in range(3):
        sampler.set_epoch(epoch)
        batches = list(sampler)
        assert len(batches) == len(sampler) == 26
        assert sorted(i for b in batches for i in b) == list(range(103))
        assert all(len(b) == 4 for b in batches if len(b) != 3)


def test_drop_last():
    sampler = LengthGroupedBatchSampler(skewed_lengths(103), 4, bucket_batches=5, drop_last=True)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 25 and all(len(b) == 4 for b in batches)


def test_deterministic_per_seed_and_epoch():
    lengths = skewed_lengths(200)
    a, b = (LengthGroupedBatchSampler(lengths, 8, bucket_batches=4, seed=3) for _ in range(2))
    assert list(a) == list(b)
    a.set_epoch(1)
    first_epoch = list(b)
    assert list(a) != first_epoch  # a new epoch reshuffles
    assert list(LengthGroupedBatchSampler(lengths, 8, bucket_batches=4, seed=4)) != first_epoch


def test_grouping_keeps_little_padding():
    lengths = skewed_lengths()
    grouped = list(LengthGroupedBatchSampler(lengths, 4, bucket_batches=50))
    random_batches = list(LengthGroupedBatchSampler(lengths, 4, bucket_batches=1))  # sorted within 1 batch = random
    assert padding_stats(lengths, grouped) > 0.9
    assert padding_stats(lengths, random_batches) < 0.6
    # Batch order is still shuffled: long and short batches interleave.
    maxima = [max(lengths[i] for i in b) for b in grouped]
    assert maxima != sorted(maxima) and maxima != sorted(maxima, reverse=True)


def test_no_shuffle_sorts_longest_first():
    lengths = [3, 9, 1, 7, 5]
    assert list(LengthGroupedBatchSampler(lengths, 2, shuffle=False)) == [[1, 3], [4, 0], [2]]


def test_resume_mid_epoch():
    lengths = skewed_lengths(120)
    sampler = LengthGroupedBatchSampler(lengths, 4, bucket_batches=3, seed=7)
    sampler.set_epoch(2)
    full = list(sampler)
    it = iter(sampler)
    seen = [next(it) for _ in range(11)]
    state = sampler.state_dict()
    resumed = LengthGroupedBatchSampler(lengths, 4, bucket_batches=3, seed=7)
    resumed.load_state_dict(state)
    assert seen + list(resumed) == full
    assert list(resumed) == full  # the next pass is a whole epoch again
