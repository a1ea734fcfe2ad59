import numpy as np

from lucatrain.data.batching import BatchSpec, padded_lengths, plan_epoch, rank_micro_batches

FP = "ab" * 32


def lengths(n=1000, seed=0):
    return np.random.default_rng(seed).integers(20, 2000, size=n)


def test_fixed_plan_is_a_permutation_and_deterministic():
    lens = lengths()
    spec = BatchSpec(micro_batches_per_step=4, batch_size=8)
    plan = plan_epoch(lens, spec, seed=1, epoch=0, fingerprint=FP)
    assert len(plan) == 1000 // 32
    flat = np.concatenate(plan)
    assert len(np.unique(flat)) == len(flat)
    again = plan_epoch(lens, spec, seed=1, epoch=0, fingerprint=FP)
    assert all(np.array_equal(a, b) for a, b in zip(plan, again))
    other = plan_epoch(lens, spec, seed=1, epoch=1, fingerprint=FP)
    assert not np.array_equal(plan[0], other[0])


def test_token_budget_respected_and_every_sample_once():
    lens = lengths()
    spec = BatchSpec(micro_batches_per_step=2, max_tokens=4096, max_length=1026, sort_pool_size=256)
    plan = plan_epoch(lens, spec, seed=0, epoch=0, fingerprint=FP)
    flat = np.concatenate(plan)
    assert len(np.unique(flat)) == len(flat)
    assert len(flat) >= 0.95 * len(lens)  # only pool tails smaller than one step are dropped
    tokens = padded_lengths(lens, 1026)
    for batch in plan:
        for world, accum in ((1, 2), (2, 1)):
            for rank in range(world):
                for mb in rank_micro_batches(batch, lens, world, rank, accum):
                    assert len(mb) >= 1
                    assert len(mb) * tokens[mb].max() <= 4096


def test_global_stream_independent_of_world_split():
    lens = lengths()
    spec = BatchSpec(micro_batches_per_step=4, batch_size=4)
    batch = plan_epoch(lens, spec, seed=0, epoch=0, fingerprint=FP)[3]
    for world, accum in ((1, 4), (2, 2), (4, 1)):
        parts = [mb for r in range(world) for mb in rank_micro_batches(batch, lens, world, r, accum)]
        assert len(parts) == 4
        assert sorted(np.concatenate(parts).tolist()) == sorted(batch.tolist())


def test_token_budget_cuts_padding_vs_fixed():
    lens = lengths(4000)
    tokens = padded_lengths(lens, 1026)

    def efficiency(spec):
        real = padded = 0
        for batch in plan_epoch(lens, spec, 0, 0, FP):
            for mb in rank_micro_batches(batch, lens, 1, 0, spec.micro_batches_per_step):
                real += tokens[mb].sum()
                padded += len(mb) * tokens[mb].max()
        return real / padded

    fixed = efficiency(BatchSpec(micro_batches_per_step=1, batch_size=8, max_length=1026))
    budget = efficiency(BatchSpec(micro_batches_per_step=1, max_tokens=8192, max_length=1026, sort_pool_size=4000))
    assert budget > 0.9 > fixed
