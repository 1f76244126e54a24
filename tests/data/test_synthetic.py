"""Tests of the synthetic recall tasks: semantics checked in plain Python, seeds, validation, splits."""

import dataclasses
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bmojo.data import (
    DEFAULT_LENGTHS,
    TASKS,
    FarRecallConfig,
    MQARConfig,
    NoisyRecallConfig,
    RecallBatch,
    SelectiveCopyConfig,
    TaskMixture,
    generate,
    generate_mqar,
    generate_selective_copy,
    get_task,
    make_dataset,
    make_mixture,
    task_config,
)

# --------------------------------------------------------------------------------------------
# Plain-Python reference checks
# --------------------------------------------------------------------------------------------


def check_recall_example(cfg, inputs, labels, distances, key_positions):
    """Check one MQAR / far / noisy recall example against the documented semantics, in plain Python."""
    V, L, n = cfg.vocab_size, cfg.seq_len, cfg.num_kv_pairs
    noisy = isinstance(cfg, NoisyRecallConfig)
    stride = 2 + (cfg.noise_per_pair if noisy else 0)
    distractors = range(1, 1 + cfg.num_distractor_tokens) if noisy else range(0)
    key_range = range(1 + len(distractors), V // 2)
    value_range = range(V // 2, V)
    assert len(inputs) == len(labels) == L

    # context: k v (d ...) per pair
    pairs = {}
    key_pos = {}
    for i in range(n):
        k, v = inputs[i * stride], inputs[i * stride + 1]
        assert k in key_range and v in value_range
        assert k not in pairs, "keys must be distinct"
        pairs[k] = v
        key_pos[k] = i * stride
        for j in range(2, stride):
            assert inputs[i * stride + j] in distractors
    assert len(set(pairs.values())) == n, "values must be distinct (as in Zoology)"
    context_len = n * stride

    queried = []
    for t in range(L):
        if labels[t] == -100:
            assert distances[t] == -1 and key_positions[t] == -1
            continue
        assert t >= context_len, "queries come after the context"
        k = inputs[t]
        assert k in pairs, "a labelled position holds a key of the context"
        assert labels[t] == pairs[k], "label = the value paired with the queried key"
        assert key_positions[t] == key_pos[k]
        assert distances[t] == t - key_pos[k]
        assert distances[t] >= cfg.gap_min
        queried.append(k)
    assert sorted(queried) == sorted(pairs), "each key queried exactly once"

    # everything else is filler
    query_positions = {t for t in range(L) if labels[t] != -100}
    for t in range(context_len, L):
        if t in query_positions:
            continue
        tok = inputs[t]
        if cfg.filler == "blank":
            assert tok == 0
        elif noisy:
            assert tok in distractors
        else:
            assert tok in key_range and tok not in pairs, "random filler: a non-key token of the key range"


def check_recall_batch(cfg, batch):
    B = len(batch)
    for name in ("inputs", "labels", "distances", "key_positions"):
        t = getattr(batch, name)
        assert t.dtype == torch.long and t.shape == (B, cfg.seq_len), name
    assert batch.num_kv_pairs.dtype == torch.long and batch.num_kv_pairs.tolist() == [cfg.num_kv_pairs] * B
    for b in range(B):
        check_recall_example(
            cfg,
            batch.inputs[b].tolist(),
            batch.labels[b].tolist(),
            batch.distances[b].tolist(),
            batch.key_positions[b].tolist(),
        )


RECALL_CONFIGS = [
    MQARConfig(vocab_size=64, seq_len=48, num_kv_pairs=8),
    MQARConfig(vocab_size=64, seq_len=48, num_kv_pairs=8, filler="random", power_a=1.0),
    MQARConfig(vocab_size=32, seq_len=40, num_kv_pairs=12, filler="random"),  # dense key sampling
    MQARConfig(vocab_size=32, seq_len=45, num_kv_pairs=15),  # every key-range token is a key
    MQARConfig(vocab_size=8192, seq_len=64, num_kv_pairs=16, power_a=3.0),  # sparse (rejection) sampling
    MQARConfig(vocab_size=64, seq_len=24, num_kv_pairs=8),  # query region exactly full
    FarRecallConfig(vocab_size=64, seq_len=80, num_kv_pairs=6, gap_min=40),
    FarRecallConfig(vocab_size=64, seq_len=80, num_kv_pairs=6, gap_min=5, filler="random"),
    NoisyRecallConfig(vocab_size=64, seq_len=60, num_kv_pairs=6, noise_per_pair=3, num_distractor_tokens=8),
    NoisyRecallConfig(vocab_size=64, seq_len=60, num_kv_pairs=6, noise_per_pair=1, filler="random", gap_min=20),
    NoisyRecallConfig(vocab_size=64, seq_len=30, num_kv_pairs=6, noise_per_pair=0),
]


@pytest.mark.parametrize("cfg", RECALL_CONFIGS, ids=lambda c: f"{c.task_name}-{c.seq_len}-{c.num_kv_pairs}")
def test_recall_semantics(cfg):
    batch = generate(cfg, 64, seed=3)
    check_recall_batch(cfg, batch)
    assert (batch.query_mask.sum(1) == cfg.num_kv_pairs).all()


@settings(max_examples=25, deadline=None)
@given(
    vocab_size=st.integers(8, 300),
    num_kv_pairs=st.integers(1, 12),
    extra=st.integers(0, 30),
    gap_min=st.integers(0, 30),
    noise_per_pair=st.integers(0, 3),
    noisy=st.booleans(),
    filler=st.sampled_from(["blank", "random"]),
    power_a=st.floats(0.05, 4.0),
    seed=st.integers(0, 2**31),
)
def test_recall_semantics_property(
    vocab_size, num_kv_pairs, extra, gap_min, noise_per_pair, noisy, filler, power_a, seed
):
    common = dict(vocab_size=vocab_size, num_kv_pairs=num_kv_pairs, gap_min=gap_min, filler=filler, power_a=power_a)
    stride = 2 + noise_per_pair if noisy else 2
    seq_len = max(num_kv_pairs * stride, (num_kv_pairs - 1) * stride + gap_min) + num_kv_pairs + extra
    try:
        if noisy:
            cfg = NoisyRecallConfig(seq_len=seq_len, noise_per_pair=noise_per_pair, num_distractor_tokens=2, **common)
        else:
            cfg = MQARConfig(seq_len=seq_len, **common)
    except ValueError as e:  # only a too-small vocabulary may be rejected here
        assert "num_kv_pairs" in str(e)
        return
    check_recall_batch(cfg, generate(cfg, 4, seed))


def test_keys_and_values_cover_their_ranges_uniformly():
    cfg = MQARConfig(vocab_size=40, seq_len=24, num_kv_pairs=4)
    batch = generate(cfg, 4000, seed=0)
    keys = batch.inputs[:, 0:8:2].flatten()
    values = batch.inputs[:, 1:8:2].flatten()
    key_counts = torch.bincount(keys, minlength=40)
    value_counts = torch.bincount(values, minlength=40)
    assert key_counts[0] == 0 and key_counts[20:].sum() == 0 and value_counts[:20].sum() == 0
    expected_key = 4000 * 4 / 19
    assert (key_counts[1:20].float() - expected_key).abs().max() < 0.15 * expected_key
    expected_value = 4000 * 4 / 20
    assert (value_counts[20:].float() - expected_value).abs().max() < 0.15 * expected_value


# --------------------------------------------------------------------------------------------
# Query placement: the power law
# --------------------------------------------------------------------------------------------


def _gaps(batch, cfg, first_key_only=False):
    """0-based offsets of the queries from the start of the query region."""
    mask = batch.query_mask
    if first_key_only:
        mask = mask & (batch.key_positions == 0)
    t = torch.nonzero(mask)[:, 1]
    return (t - cfg.query_start).numpy()


def _power_law_cdf(a, region, upto):
    w = np.arange(1, region + 1, dtype=float) ** (a - 1)
    return w[:upto].sum() / w.sum()


def test_power_law_uniform_for_a_equal_one():
    region = 40
    cfg = MQARConfig(vocab_size=64, seq_len=2 + region, num_kv_pairs=1, power_a=1.0)
    gaps = _gaps(generate(cfg, 8000, seed=1), cfg)
    assert gaps.min() >= 0 and gaps.max() < region
    hist = np.bincount(gaps // 10, minlength=4) / len(gaps)  # four buckets of 10 positions
    assert np.allclose(hist, 0.25, atol=0.03), hist
    assert abs(gaps.mean() - (region - 1) / 2) < 1.0


@pytest.mark.parametrize("a", [0.1, 3.0])
def test_power_law_matches_the_distribution(a):
    region = 40
    cfg = MQARConfig(vocab_size=64, seq_len=2 + region, num_kv_pairs=1, power_a=a)
    gaps = _gaps(generate(cfg, 8000, seed=2), cfg)
    for upto in (1, 4, 20):
        expected = _power_law_cdf(a, region, upto)
        assert abs((gaps < upto).mean() - expected) < 0.03, (upto, expected)
    if a < 1:  # skewed toward small gaps: far more mass in the first tenth than uniform's 0.1
        assert (gaps < 4).mean() > 0.3
    else:
        assert (gaps >= 20).mean() > 0.8


def test_first_key_takes_the_first_draw_of_successive_sampling():
    # Zoology assigns the i-th key (context order) to the i-th position drawn without replacement,
    # so the first key's position follows the power law exactly, whatever the number of pairs.
    a, n, region = 0.1, 4, 40
    cfg = MQARConfig(vocab_size=64, seq_len=2 * n + region, num_kv_pairs=n, power_a=a)
    batch = generate(cfg, 8000, seed=4)
    first = _gaps(batch, cfg, first_key_only=True)
    assert len(first) == 8000
    assert abs((first < 4).mean() - _power_law_cdf(a, region, 4)) < 0.03
    all_gaps = _gaps(batch, cfg)
    uniform = _gaps(generate(dataclasses.replace(cfg, power_a=1.0), 2000, seed=4), cfg)
    assert all_gaps.mean() < 0.6 * uniform.mean()


# --------------------------------------------------------------------------------------------
# Far recall, noisy recall, selective copying
# --------------------------------------------------------------------------------------------


def test_far_recall_distances_at_least_gap_min():
    cfg = FarRecallConfig(vocab_size=128, seq_len=200, num_kv_pairs=16, gap_min=96, power_a=0.01)
    batch = generate(cfg, 200, seed=0)
    d = batch.distances[batch.query_mask]
    assert d.numel() == 200 * 16
    assert d.min().item() >= 96
    # the bound is tight: the last key is sometimes queried at the first position allowed
    uniform = generate(dataclasses.replace(cfg, power_a=1.0), 1000, seed=0)
    assert uniform.distances[uniform.query_mask].min().item() == 96
    # a plain MQAR of the same shape has many short distances
    plain = generate(MQARConfig(vocab_size=128, seq_len=200, num_kv_pairs=16, power_a=0.01), 200, seed=0)
    assert (plain.distances[plain.query_mask] < 96).float().mean() > 0.5


def test_noisy_recall_distractors_from_their_range():
    cfg = NoisyRecallConfig(vocab_size=64, seq_len=64, num_kv_pairs=8, noise_per_pair=3, num_distractor_tokens=10)
    batch = generate(cfg, 300, seed=0)
    stride = 5
    ctx = batch.inputs[:, : 8 * stride].reshape(300, 8, stride)
    noise = ctx[:, :, 2:]
    assert noise.min() >= 1 and noise.max() <= 10
    assert len(torch.unique(noise)) == 10  # the whole range is used
    assert ctx[:, :, 0].min() >= 11 and ctx[:, :, 0].max() < 32  # keys above the distractor range
    assert ctx[:, :, 1].min() >= 32  # values in the upper half
    check_recall_batch(cfg, batch[:50])


def check_selective_copy_example(cfg, inputs, labels, distances, key_positions):
    V, L, n, R = cfg.vocab_size, cfg.seq_len, cfg.num_tokens_to_copy, cfg.effective_region_len
    noise = set(range(1, 1 + cfg.num_noise_tokens)) if cfg.noise == "random" else {0}
    data_range = range(1 + (cfg.num_noise_tokens if cfg.noise == "random" else 0), V - 1)
    data = [(t, tok) for t, tok in enumerate(inputs[:R]) if tok not in noise]
    assert len(data) == n
    assert all(tok in data_range for _, tok in data)
    assert inputs[R : R + n] == [V - 1] * n, "markers"
    assert inputs[R + n :] == [0] * (L - R - n), "padding"
    assert labels[R : R + n] == [tok for _, tok in data], "labels = the data tokens in order"
    assert labels[:R] == [-100] * R and labels[R + n :] == [-100] * (L - R - n)
    assert key_positions[R : R + n] == [t for t, _ in data]
    assert distances[R : R + n] == [R + j - t for j, (t, _) in enumerate(data)]
    assert distances[:R] == [-1] * R and distances[R + n :] == [-1] * (L - R - n)


@pytest.mark.parametrize(
    "cfg",
    [
        SelectiveCopyConfig(vocab_size=16, seq_len=40, num_tokens_to_copy=8),
        SelectiveCopyConfig(vocab_size=20, seq_len=40, num_tokens_to_copy=6, noise="random", num_noise_tokens=5),
        SelectiveCopyConfig(vocab_size=16, seq_len=40, num_tokens_to_copy=8, region_len=20),  # padded
        SelectiveCopyConfig(vocab_size=3, seq_len=10, num_tokens_to_copy=5),  # region full of data
    ],
)
def test_selective_copy_semantics(cfg):
    batch = generate(cfg, 100, seed=5)
    assert batch.inputs.shape == (100, cfg.seq_len) and batch.num_kv_pairs.tolist() == [cfg.num_tokens_to_copy] * 100
    for b in range(100):
        check_selective_copy_example(
            cfg,
            batch.inputs[b].tolist(),
            batch.labels[b].tolist(),
            batch.distances[b].tolist(),
            batch.key_positions[b].tolist(),
        )


def test_selective_copy_positions_spread_over_region():
    cfg = SelectiveCopyConfig(vocab_size=16, seq_len=70, num_tokens_to_copy=6)
    batch = generate(cfg, 2000, seed=0)
    counts = torch.bincount(batch.key_positions[batch.query_mask], minlength=64)
    assert (counts > 0).all()
    assert counts.float().std() / counts.float().mean() < 0.25


# --------------------------------------------------------------------------------------------
# Determinism
# --------------------------------------------------------------------------------------------

ALL_TASK_CONFIGS = [
    MQARConfig(vocab_size=64, seq_len=40, num_kv_pairs=6, filler="random"),
    FarRecallConfig(vocab_size=64, seq_len=60, num_kv_pairs=6, gap_min=30),
    NoisyRecallConfig(vocab_size=64, seq_len=60, num_kv_pairs=6),
    SelectiveCopyConfig(vocab_size=16, seq_len=40, num_tokens_to_copy=6, noise="random", num_noise_tokens=4),
]


def _same(a: RecallBatch, b: RecallBatch) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.to_dict().values(), b.to_dict().values(), strict=True))


@pytest.mark.parametrize("cfg", ALL_TASK_CONFIGS, ids=lambda c: c.task_name)
def test_deterministic_given_seed(cfg):
    a, b = generate(cfg, 32, seed=7), generate(cfg, 32, seed=7)
    assert _same(a, b)
    assert _same(a, cfg.generate(32, 7))
    assert _same(a, generate(cfg, 32, np.random.default_rng(7)))
    c = generate(cfg, 32, seed=8)
    assert not torch.equal(a.inputs, c.inputs)
    # examples are not repeated within a batch
    assert len({tuple(r) for r in a.inputs.tolist()}) == 32


def test_task_specific_generators_reject_other_configs():
    with pytest.raises(TypeError):
        generate_mqar(SelectiveCopyConfig(), 1)
    with pytest.raises(TypeError):
        generate_selective_copy(MQARConfig(), 1)


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------


INVALID_CONFIGS = [
    (
        MQARConfig,
        dict(seq_len=100, num_kv_pairs=40),
        r"num_kv_pairs=40 needs 2\*40 context \+ 40 query .*120 > seq_len=100",
    ),
    (
        MQARConfig,
        dict(vocab_size=32, seq_len=100, num_kv_pairs=16),
        r"num_kv_pairs=16 needs 16 distinct keys.*\[1, 16\)",
    ),
    (MQARConfig, dict(vocab_size=32, seq_len=100, num_kv_pairs=15, filler="random"), r"filler='random'.*pairs=15"),
    (MQARConfig, dict(num_kv_pairs=0), r"num_kv_pairs=0 must be >= 1"),
    (MQARConfig, dict(vocab_size=3), r"vocab_size=3 must be >= 4"),
    (MQARConfig, dict(seq_len=12.5), r"seq_len=12.5 must be an int"),
    (MQARConfig, dict(power_a=0.0), r"power_a=0.0 must be"),
    (MQARConfig, dict(power_a=float("nan")), r"power_a=nan must be"),
    (MQARConfig, dict(filler="noise"), r"filler='noise' must be"),
    (MQARConfig, dict(gap_min=-1), r"gap_min=-1 must be >= 0"),
    (FarRecallConfig, dict(gap_min=0), r"gap_min=0 must be >= 1"),
    (FarRecallConfig, dict(seq_len=100, num_kv_pairs=8, gap_min=90), r"gap_min=90 .*num_kv_pairs=8.* > seq_len=100"),
    (NoisyRecallConfig, dict(seq_len=39, num_kv_pairs=8, noise_per_pair=2), r"num_kv_pairs=8 needs 4\*8 context"),
    (NoisyRecallConfig, dict(noise_per_pair=-1), r"noise_per_pair=-1 must be >= 0"),
    (NoisyRecallConfig, dict(num_distractor_tokens=0), r"num_distractor_tokens=0 must be >= 1"),
    (
        NoisyRecallConfig,
        dict(vocab_size=40, num_kv_pairs=8, num_distractor_tokens=12),
        r"num_kv_pairs=8 needs 8 distinct keys.*num_distractor_tokens=12",
    ),
    (SelectiveCopyConfig, dict(seq_len=20, num_tokens_to_copy=11), r"num_tokens_to_copy=11 .*region_len=9"),
    (
        SelectiveCopyConfig,
        dict(seq_len=20, num_tokens_to_copy=8, region_len=13),
        r"region_len=13 \+ num_tokens_to_copy=8 .*21 > seq_len=20",
    ),
    (SelectiveCopyConfig, dict(vocab_size=2), r"vocab_size=2 must be >= 3"),
    (SelectiveCopyConfig, dict(vocab_size=6, noise="random", num_noise_tokens=4), r"vocab_size=6 leaves no data token"),
    (SelectiveCopyConfig, dict(noise="zeros"), r"noise='zeros' must be"),
    (SelectiveCopyConfig, dict(region_len=0), r"region_len=0 must be >= 1"),
]


@pytest.mark.parametrize("cls, fields, pattern", INVALID_CONFIGS)
def test_validation_errors_name_the_field(cls, fields, pattern):
    with pytest.raises(ValueError, match=pattern):
        cls(**fields)


def test_replace_revalidates():
    cfg = MQARConfig(seq_len=64, num_kv_pairs=8)
    with pytest.raises(ValueError, match="seq_len=20"):
        dataclasses.replace(cfg, seq_len=20)


# --------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------


def test_registry():
    assert set(TASKS) == {"mqar", "far_recall", "noisy_recall", "selective_copy"}
    for name, task in TASKS.items():
        assert get_task(name) is task and task.config_class.task_name == name
        cfg = task.config_class()  # the defaults are valid
        batch = task.generate(cfg, 2, 0)
        assert batch.inputs.max() < cfg.vocab_size and batch.inputs.min() >= 0
        assert task_config(**cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown task 'copy'.*mqar, far_recall, noisy_recall, selective_copy"):
        get_task("copy")
    with pytest.raises(ValueError, match="unknown field.*num_pairs.*valid fields"):
        task_config("mqar", num_pairs=3)


# --------------------------------------------------------------------------------------------
# Mixtures, splits, datasets
# --------------------------------------------------------------------------------------------


def test_train_and_test_are_disjoint():
    # ~4.5e10 possible examples: independent streams would almost never collide; equal streams would
    kwargs = dict(lengths=[24], vocab_size=32, num_kv_pairs=3, power_a=1.0, num_examples=3000)
    train = RecallBatch.cat(make_dataset("mqar", split="train", seed=0, **kwargs))
    test = RecallBatch.cat(make_dataset("mqar", split="test", seed=0, **kwargs))
    train_rows = {tuple(r) for r in train.inputs.tolist()}
    test_rows = {tuple(r) for r in test.inputs.tolist()}
    assert len(train_rows) == len(test_rows) == 3000
    assert not train_rows & test_rows
    # the split, not only the base seed, decides the stream
    for s in range(3):
        a = make_mixture("mqar", split="train", seed=s, lengths=[32]).batch(0, 8)
        for t in range(3):
            b = make_mixture("mqar", split="test", seed=t, lengths=[32]).batch(0, 8)
            assert not torch.equal(a.inputs, b.inputs)


def test_make_dataset_mixture_and_lengths():
    batches = make_dataset("mqar", split="train", num_examples=100, seed=1, lengths=[32, 64], num_kv_pairs=[2, 4])
    assert [b.seq_len for b in batches] == [32, 32, 64, 64]
    assert [int(b.num_kv_pairs[0]) for b in batches] == [2, 4, 2, 4]
    assert sum(len(b) for b in batches) == 100
    for b, (L, n) in zip(batches, [(32, 2), (32, 4), (64, 2), (64, 4)], strict=True):
        check_recall_batch(MQARConfig(seq_len=L, num_kv_pairs=n), b)
    padded = RecallBatch.cat(batches, pad=True)
    assert padded.inputs.shape == (100, 64) and (padded.query_mask.sum(1) == padded.num_kv_pairs).all()
    assert (padded.labels[: len(batches[0]), 32:] == -100).all() and (padded.inputs[: len(batches[0]), 32:] == 0).all()
    with pytest.raises(ValueError, match="pass pad=True"):
        RecallBatch.cat(batches)
    # deterministic
    again = make_dataset("mqar", split="train", num_examples=100, seed=1, lengths=[32, 64], num_kv_pairs=[2, 4])
    assert all(_same(x, y) for x, y in zip(batches, again, strict=True))
    # test defaults are longer than train defaults
    assert min(DEFAULT_LENGTHS["test"]) > max(DEFAULT_LENGTHS["train"])
    test = make_dataset("far_recall", split="test", num_examples=4)
    assert [b.seq_len for b in test] == list(DEFAULT_LENGTHS["test"])
    # an impossible combination is reported
    with pytest.raises(ValueError, match="num_kv_pairs=20 needs"):
        make_dataset("mqar", num_examples=4, lengths=[32, 64], num_kv_pairs=20)
    with pytest.raises(ValueError, match="split='valid'"):
        make_dataset("mqar", num_examples=4, split="valid")
    with pytest.raises(ValueError, match="unknown task"):
        make_dataset("nope", num_examples=4)


def test_mixture_weights_and_on_the_fly_batches():
    configs = (MQARConfig(seq_len=32, num_kv_pairs=2), SelectiveCopyConfig(seq_len=48, num_tokens_to_copy=4))
    mixture = TaskMixture(configs, weights=(3.0, 1.0), seed=5)
    assert mixture.counts(10) == [8, 2] and mixture.counts(4) == [3, 1]
    assert mixture.max_seq_len == 48
    assert _same(mixture.batch(7, 4), mixture.batch(7, 4))
    stream = mixture.batches(4, start=3)
    assert _same(next(stream), mixture.batch(3, 4)) and _same(next(stream), mixture.batch(4, 4))
    lengths = [mixture.batch(i, 2).seq_len for i in range(200)]
    assert 0.65 < lengths.count(32) / 200 < 0.85
    with pytest.raises(ValueError, match="weights has 1 entries for 2 configs"):
        TaskMixture(configs, weights=(1.0,))
    with pytest.raises(ValueError, match="configs is empty"):
        TaskMixture(())
    with pytest.raises(ValueError, match="seed=-1"):
        TaskMixture(configs, seed=-1)


def test_dataset_cache_roundtrip(tmp_path):
    kwargs = dict(split="test", num_examples=20, seed=3, lengths=[24], num_kv_pairs=3, cache_dir=tmp_path)
    first = make_dataset("noisy_recall", **kwargs)
    files = list(tmp_path.glob("noisy_recall-test-*.pt"))
    assert len(files) == 1
    # the second call loads the file (prove it by tampering with the cached tensors)
    payload = torch.load(files[0], weights_only=True)
    payload["batches"][0]["inputs"][0, 0] = 999
    torch.save(payload, files[0])
    second = make_dataset("noisy_recall", **kwargs)
    assert second[0].inputs[0, 0] == 999
    assert torch.equal(second[0].labels, first[0].labels)
    make_dataset("noisy_recall", **{**kwargs, "seed": 4})
    assert len(list(tmp_path.glob("*.pt"))) == 2  # a different seed is a different file


def test_recall_batch_helpers():
    batch = generate(MQARConfig(seq_len=32, num_kv_pairs=4), 10, 0)
    assert len(batch) == 10 and batch.seq_len == 32
    assert len(batch[3]) == 1 and torch.equal(batch[3].inputs[0], batch.inputs[3])
    assert torch.equal(batch[-1].inputs[0], batch.inputs[-1])
    assert [len(b) for b in batch.minibatches(4)] == [4, 4, 2]
    assert _same(RecallBatch.cat(list(batch.minibatches(4))), batch)
    assert batch.pad_to(32) is batch
    padded = batch.pad_to(40)
    assert padded.inputs.shape == (10, 40) and (padded.distances[:, 32:] == -1).all()
    with pytest.raises(ValueError, match="shorter"):
        batch.pad_to(16)
    assert batch.to("cpu").inputs.device.type == "cpu"
    manual = RecallBatch(batch.inputs, batch.labels, batch.distances, batch.num_kv_pairs)  # key_positions optional
    assert manual.key_positions is None and len(manual[:2]) == 2


def test_distance_buckets_are_usable():
    # evaluation buckets accuracy by distance and by number of kv pairs: both come with the batch
    batch = RecallBatch.cat(make_dataset("mqar", num_examples=40, lengths=[64], num_kv_pairs=[2, 8], power_a=1.0))
    d = batch.distances[batch.query_mask]
    assert d.min() >= 1 and d.max() < 64
    per_example = batch.num_kv_pairs.unsqueeze(1).expand_as(batch.labels)[batch.query_mask]
    assert set(per_example.tolist()) == {2, 8}
    assert math.isclose(batch.query_mask.sum().item(), batch.num_kv_pairs.sum().item())
