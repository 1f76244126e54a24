"""Synthetic recall tasks: MQAR, far recall, noisy recall and selective copying.

Every task is a frozen config dataclass (validated on construction) and a vectorised,
seed-deterministic generator returning a :class:`RecallBatch`.

Conventions shared by all tasks
-------------------------------
* ``inputs[b, t]`` is the token at position ``t``; ``labels[b, t]`` is the token the model
  must *output at position t* (its logits at ``t``), or ``-100`` where nothing is asked.
  The labels are already aligned with the inputs: train with
  ``cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)`` and do
  **not** shift them again as for language modelling.
* Token ``0`` is the blank (padding / default filler); no key, value or data token is 0.
* ``distances[b, t]`` is ``t - key_positions[b, t]`` at labelled positions (how far back the
  answer's key lies) and ``-1`` elsewhere; ``key_positions[b, t]`` is the position of the
  token that holds the answer (the key of a kv pair, the data token of selective copying)
  and ``-1`` elsewhere. ``num_kv_pairs[b]`` is the number of queries of example ``b``.

MQAR (multi-query associative recall; Zoology, Arora et al. 2023)
----------------------------------------------------------------
With ``V = vocab_size``, ``n = num_kv_pairs``, ``L = seq_len``:

* keys are ``n`` distinct tokens of ``[1, V//2)``, values ``n`` distinct tokens of ``[V//2, V)``;
* positions ``0 .. 2n-1`` hold the context ``k1 v1 k2 v2 …`` (key ``i`` at position ``2i``);
* positions ``s .. L-1`` are the query region, ``s = max(2n, 2(n-1) + gap_min)``; ``n`` of its
  positions are drawn without replacement with probability ``∝ a·j^(a-1)`` for the ``j``-th
  position of the region (``j = 1 …``; ``a = power_a``; ``a = 1`` is uniform, ``a < 1`` favours
  queries right after the context, ``a > 1`` late ones). As in Zoology the ``i``-th key in
  context order goes to the ``i``-th position drawn (successive sampling order). The query
  token is the key; its label is the key's value;
* every other position is filler: ``0`` (``filler="blank"``) or, with ``filler="random"``,
  a uniform token of the key range ``[1, V//2)`` that is *not* a key of this example (so
  each key occurs exactly twice: in the context and at its query).

Far recall is MQAR with ``gap_min > 0``: every query lies at least ``gap_min`` positions after
its key (the query region starts ``gap_min`` after the last key). Noisy recall follows each
kv pair in the context with ``noise_per_pair`` distractor tokens from a reserved range.
Selective copying (Mamba paper) scatters data tokens among noise and asks for them, in
order, at marker tokens at the end.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import math
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

__all__ = [
    "DEFAULT_LENGTHS",
    "IGNORE_INDEX",
    "SPLITS",
    "TASKS",
    "FarRecallConfig",
    "MQARConfig",
    "NoisyRecallConfig",
    "RecallBatch",
    "SelectiveCopyConfig",
    "Task",
    "TaskConfig",
    "TaskMixture",
    "config_hash",
    "generate",
    "generate_mqar",
    "generate_noisy_recall",
    "generate_selective_copy",
    "get_task",
    "make_dataset",
    "make_mixture",
    "task_config",
]

IGNORE_INDEX = -100
SPLITS = ("train", "test")
DEFAULT_LENGTHS: dict[str, tuple[int, ...]] = {"train": (64, 128), "test": (256, 512)}
"""Sequence lengths :func:`make_dataset` uses when ``lengths`` is not given: test is longer."""

_FORMAT_VERSION = 1  # bump when generated data changes, so cached datasets are not reused
_SPLIT_TAGS = {"train": 0x7472, "test": 0x7465}
_STREAM_DATASET, _STREAM_BATCH = 0, 1

SeedLike = int | np.random.SeedSequence | np.random.Generator


# --------------------------------------------------------------------------------------------
# The batch
# --------------------------------------------------------------------------------------------


@dataclass
class RecallBatch:
    """A batch of recall examples (all tensors ``torch.long``, on the same device).

    Attributes:
        inputs: ``[B, L]`` tokens.
        labels: ``[B, L]`` what the model must output at each position; ``-100`` where no
            answer is asked (aligned with ``inputs``: no further shift).
        distances: ``[B, L]`` ``t - key_position`` at labelled positions, ``-1`` elsewhere.
        num_kv_pairs: ``[B]`` number of queries (kv pairs / tokens to copy) per example.
        key_positions: ``[B, L]`` position of the token holding the answer at labelled
            positions, ``-1`` elsewhere (always set by the generators; optional for batches
            built by hand).
    """

    inputs: torch.Tensor
    labels: torch.Tensor
    distances: torch.Tensor
    num_kv_pairs: torch.Tensor
    key_positions: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.inputs.shape[0]

    @property
    def seq_len(self) -> int:
        return self.inputs.shape[1]

    @property
    def query_mask(self) -> torch.Tensor:
        """``[B, L]`` bool: positions with a label."""
        return self.labels != IGNORE_INDEX

    def _fields(self) -> dict[str, torch.Tensor | None]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def _map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> RecallBatch:
        return RecallBatch(**{k: None if v is None else fn(v) for k, v in self._fields().items()})

    def to(self, device: torch.device | str) -> RecallBatch:
        return self._map(lambda t: t.to(device))

    def __getitem__(self, index: int | slice | torch.Tensor) -> RecallBatch:
        """Select examples (rows); an int keeps the batch dimension."""
        if isinstance(index, int):
            index = slice(index, index + 1 if index != -1 else None)
        return self._map(lambda t: t[index])

    def minibatches(self, batch_size: int) -> Iterator[RecallBatch]:
        """Consecutive slices of ``batch_size`` examples (the last may be smaller)."""
        for start in range(0, len(self), batch_size):
            yield self[start : start + batch_size]

    def pad_to(self, seq_len: int) -> RecallBatch:
        """Right-pad to ``seq_len`` with blank inputs (0) and no labels (harmless for causal models)."""
        extra = seq_len - self.seq_len
        if extra < 0:
            raise ValueError(f"seq_len={seq_len} is shorter than the batch's {self.seq_len}")
        if extra == 0:
            return self
        fill = {"inputs": 0, "labels": IGNORE_INDEX, "distances": -1, "key_positions": -1}
        out = {}
        for name, t in self._fields().items():
            if t is None or name == "num_kv_pairs":
                out[name] = t
            else:
                out[name] = torch.nn.functional.pad(t, (0, extra), value=fill[name])
        return RecallBatch(**out)

    @staticmethod
    def cat(batches: Sequence[RecallBatch], pad: bool = False) -> RecallBatch:
        """Concatenate along the batch; with ``pad=True`` shorter batches are right-padded first."""
        if not batches:
            raise ValueError("cat needs at least one batch")
        length = max(b.seq_len for b in batches)
        if not pad and any(b.seq_len != length for b in batches):
            raise ValueError(f"batches have lengths {sorted({b.seq_len for b in batches})}; pass pad=True")
        batches = [b.pad_to(length) for b in batches]
        has_keys = all(b.key_positions is not None for b in batches)
        return RecallBatch(
            inputs=torch.cat([b.inputs for b in batches]),
            labels=torch.cat([b.labels for b in batches]),
            distances=torch.cat([b.distances for b in batches]),
            num_kv_pairs=torch.cat([b.num_kv_pairs for b in batches]),
            key_positions=torch.cat([b.key_positions for b in batches]) if has_keys else None,
        )

    def to_dict(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self._fields().items() if v is not None}

    @staticmethod
    def from_dict(d: dict[str, torch.Tensor]) -> RecallBatch:
        return RecallBatch(**d)


# --------------------------------------------------------------------------------------------
# Configs
# --------------------------------------------------------------------------------------------


def _check_int(cfg: Any, name: str, minimum: int) -> None:
    value = getattr(cfg, name)
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise ValueError(f"{name}={value!r} must be an int")
    if value < minimum:
        raise ValueError(f"{name}={value} must be >= {minimum}")


@dataclass(frozen=True)
class TaskConfig:
    """Base of the task configs: validated on construction (``ValueError`` naming the field)."""

    task_name: ClassVar[str] = ""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    @property
    def num_queries(self) -> int:
        raise NotImplementedError

    def generate(self, num_examples: int, seed: SeedLike = 0) -> RecallBatch:
        """Shorthand for ``generate(self, num_examples, seed)``."""
        return generate(self, num_examples, seed)

    def to_dict(self) -> dict[str, Any]:
        """The fields plus ``"task"``; inverse of :func:`task_config` (``task_config(**d)``)."""
        return {"task": self.task_name, **dataclasses.asdict(self)}


@dataclass(frozen=True)
class MQARConfig(TaskConfig):
    """Multi-query associative recall (see the module docstring for the exact layout).

    Attributes:
        vocab_size: ``V``; keys come from ``[1, V//2)``, values from ``[V//2, V)``.
        seq_len: ``L``, the length of every example.
        num_kv_pairs: ``n`` kv pairs in the context, each queried once.
        power_a: ``a`` of the query-position power law ``p(j) ∝ a·j^(a-1)``, ``a > 0``
            (1.0 uniform; Zoology's default 0.01 puts most queries right after the context).
        filler: ``"blank"`` (token 0) or ``"random"`` (non-key tokens of the key range).
        gap_min: every query is at least this many positions after its key (0: no constraint).
    """

    task_name: ClassVar[str] = "mqar"

    vocab_size: int = 256
    seq_len: int = 128
    num_kv_pairs: int = 8
    power_a: float = 0.01
    filler: str = "blank"
    gap_min: int = 0

    # layout helpers (overridden by noisy recall) -------------------------------------------
    @property
    def _pair_stride(self) -> int:
        return 2

    @property
    def _key_low(self) -> int:
        return 1

    @property
    def _filler_from_key_range(self) -> bool:
        return True

    @property
    def num_queries(self) -> int:
        return self.num_kv_pairs

    @property
    def context_len(self) -> int:
        """Number of positions the context occupies."""
        return self.num_kv_pairs * self._pair_stride

    @property
    def query_start(self) -> int:
        """First position of the query region."""
        last_key = (self.num_kv_pairs - 1) * self._pair_stride
        return max(self.context_len, last_key + self.gap_min)

    @property
    def key_range(self) -> tuple[int, int]:
        return self._key_low, self.vocab_size // 2

    @property
    def value_range(self) -> tuple[int, int]:
        return self.vocab_size // 2, self.vocab_size

    def validate(self) -> None:
        _check_int(self, "vocab_size", 4)
        _check_int(self, "seq_len", 1)
        _check_int(self, "num_kv_pairs", 1)
        _check_int(self, "gap_min", 0)
        a = self.power_a
        if isinstance(a, bool) or not isinstance(a, int | float) or not math.isfinite(a) or a <= 0:
            raise ValueError(f"power_a={a!r} must be a finite number > 0 (1.0 = uniform)")
        if self.filler not in ("blank", "random"):
            raise ValueError(f"filler={self.filler!r} must be 'blank' or 'random'")
        self._validate_vocab()
        n, lo, hi = self.num_kv_pairs, *self.key_range
        if self.filler == "random" and self._filler_from_key_range and n >= hi - lo:
            raise ValueError(
                f"filler='random' draws non-key tokens of the key range [{lo}, {hi}), but num_kv_pairs={n} "
                f"uses all {hi - lo} of them (needs num_kv_pairs < {hi - lo})"
            )
        needed = self.query_start + n
        if needed > self.seq_len:
            if self.query_start == self.context_len:
                raise ValueError(
                    f"num_kv_pairs={n} needs {self._pair_stride}*{n} context + {n} query positions = {needed} "
                    f"> seq_len={self.seq_len}"
                )
            raise ValueError(
                f"gap_min={self.gap_min} with num_kv_pairs={n}: the query region starts at {self.query_start} "
                f"(last key at {(n - 1) * self._pair_stride} + gap_min) and needs {n} query positions: "
                f"{needed} > seq_len={self.seq_len}"
            )

    def _validate_vocab(self) -> None:
        n, V = self.num_kv_pairs, self.vocab_size
        lo, hi = self.key_range
        if n > hi - lo:
            raise ValueError(
                f"num_kv_pairs={n} needs {n} distinct keys but the key range [{lo}, {hi}) of vocab_size={V} "
                f"has {hi - lo}"
            )
        vlo, vhi = self.value_range
        if n > vhi - vlo:  # pragma: no cover - the value half is never smaller than the key half
            raise ValueError(f"num_kv_pairs={n} needs {n} distinct values but [{vlo}, {vhi}) has {vhi - vlo}")


@dataclass(frozen=True)
class FarRecallConfig(MQARConfig):
    """MQAR where every query is at least ``gap_min`` (>= 1) positions after its key.

    Choose ``gap_min`` larger than the model's window + fading span so that only memory that
    survives the window can answer. The positions between the context and the query region
    are filler.
    """

    task_name: ClassVar[str] = "far_recall"

    gap_min: int = 32

    def validate(self) -> None:
        _check_int(self, "gap_min", 1)
        super().validate()


@dataclass(frozen=True)
class NoisyRecallConfig(MQARConfig):
    """MQAR whose context follows every kv pair with ``noise_per_pair`` distractor tokens.

    Vocabulary: distractors ``[1, 1 + num_distractor_tokens)``, keys
    ``[1 + num_distractor_tokens, V//2)``, values ``[V//2, V)`` (pairwise disjoint). Context:
    ``k1 v1 d … d k2 v2 d … d …`` (pair ``i``'s key at ``i·(2 + noise_per_pair)``); distractors are
    uniform with replacement. Queries are as in MQAR; ``filler="random"`` fills the rest with
    distractor tokens.
    """

    task_name: ClassVar[str] = "noisy_recall"

    noise_per_pair: int = 2
    num_distractor_tokens: int = 16

    @property
    def _pair_stride(self) -> int:
        return 2 + self.noise_per_pair

    @property
    def _key_low(self) -> int:
        return 1 + self.num_distractor_tokens

    @property
    def _filler_from_key_range(self) -> bool:  # random filler uses distractor tokens instead
        return False

    @property
    def distractor_range(self) -> tuple[int, int]:
        return 1, 1 + self.num_distractor_tokens

    def validate(self) -> None:
        _check_int(self, "noise_per_pair", 0)
        _check_int(self, "num_distractor_tokens", 1)
        super().validate()

    def _validate_vocab(self) -> None:
        n, V, D = self.num_kv_pairs, self.vocab_size, self.num_distractor_tokens
        lo, hi = self.key_range
        if n > hi - lo:
            raise ValueError(
                f"num_kv_pairs={n} needs {n} distinct keys but vocab_size={V} with num_distractor_tokens={D} "
                f"leaves the key range [{lo}, {hi}) with {max(hi - lo, 0)}"
            )
        super()._validate_vocab()


@dataclass(frozen=True)
class SelectiveCopyConfig(TaskConfig):
    """Selective copying (Mamba paper, Gu & Dao 2023).

    Layout: positions ``[0, region_len)`` hold ``num_tokens_to_copy`` data tokens at uniformly
    random distinct positions, noise elsewhere; positions ``region_len + j`` (``j < n``) hold
    the marker token ``V - 1`` and are labelled with the ``j``-th data token (in order of
    position); any remaining positions up to ``seq_len`` are blank padding without labels.

    Vocabulary: ``0`` blank, ``V - 1`` marker; with ``noise="blank"`` noise is token 0 and data
    tokens are ``[1, V-1)``; with ``noise="random"`` noise tokens are uniform in
    ``[1, 1 + num_noise_tokens)`` and data tokens are ``[1 + num_noise_tokens, V-1)``. Data tokens
    are drawn with replacement.

    Attributes:
        vocab_size, seq_len: as in MQAR.
        num_tokens_to_copy: ``n``.
        region_len: length of the noisy region; ``None`` = ``seq_len - num_tokens_to_copy``.
        noise: ``"blank"`` or ``"random"``.
        num_noise_tokens: size of the noise range (used with ``noise="random"``).
    """

    task_name: ClassVar[str] = "selective_copy"

    vocab_size: int = 256
    seq_len: int = 128
    num_tokens_to_copy: int = 16
    region_len: int | None = None
    noise: str = "blank"
    num_noise_tokens: int = 16

    @property
    def num_queries(self) -> int:
        return self.num_tokens_to_copy

    @property
    def effective_region_len(self) -> int:
        return self.seq_len - self.num_tokens_to_copy if self.region_len is None else self.region_len

    @property
    def marker_token(self) -> int:
        return self.vocab_size - 1

    @property
    def data_range(self) -> tuple[int, int]:
        low = 1 + (self.num_noise_tokens if self.noise == "random" else 0)
        return low, self.vocab_size - 1

    @property
    def noise_range(self) -> tuple[int, int]:
        return (1, 1 + self.num_noise_tokens) if self.noise == "random" else (0, 1)

    def validate(self) -> None:
        _check_int(self, "vocab_size", 3)
        _check_int(self, "seq_len", 2)
        _check_int(self, "num_tokens_to_copy", 1)
        _check_int(self, "num_noise_tokens", 1)
        if self.noise not in ("blank", "random"):
            raise ValueError(f"noise={self.noise!r} must be 'blank' or 'random'")
        if self.region_len is not None:
            _check_int(self, "region_len", 1)
        lo, hi = self.data_range
        if hi <= lo:
            raise ValueError(
                f"vocab_size={self.vocab_size} leaves no data token: data range [{lo}, {hi}) "
                f"(0 is blank, {self.vocab_size - 1} the marker"
                + (f", [1, {1 + self.num_noise_tokens}) noise)" if self.noise == "random" else ")")
            )
        n, r = self.num_tokens_to_copy, self.effective_region_len
        if n > r:
            raise ValueError(f"num_tokens_to_copy={n} needs {n} distinct positions but region_len={r}")
        if r + n > self.seq_len:
            raise ValueError(
                f"region_len={r} + num_tokens_to_copy={n} marker positions = {r + n} > seq_len={self.seq_len}"
            )


# --------------------------------------------------------------------------------------------
# Sampling helpers (vectorised over the batch)
# --------------------------------------------------------------------------------------------

_CHUNK_ELEMENTS = 1 << 22


def _choice_no_replace(rng: np.random.Generator, rows: int, pool: int, k: int) -> np.ndarray:
    """``[rows, k]`` indices into ``range(pool)``, distinct per row, uniformly random subset and order."""
    # Rejection (redraw rows with a repeat) costs ~ k·exp(k²/2pool) draws per row; the dense
    # method (top-k of pool uniforms, then a shuffle) costs ~ pool. Pick the cheaper.
    if k * k <= 2 * pool * math.log(max(pool / k, 1.0)):
        out = rng.integers(0, pool, size=(rows, k))
        todo = np.arange(rows)
        while todo.size:
            s = np.sort(out[todo], axis=1)
            todo = todo[(s[:, 1:] == s[:, :-1]).any(axis=1)]
            out[todo] = rng.integers(0, pool, size=(todo.size, k))
        return out
    parts, step = [], max(1, _CHUNK_ELEMENTS // pool)
    for start in range(0, rows, step):
        u = rng.random((min(rows - start, step), pool), dtype=np.float32)
        top = np.argpartition(u, k - 1, axis=1)[:, :k] if k < pool else np.argsort(u, axis=1)
        parts.append(np.take_along_axis(top, np.argsort(rng.random(top.shape), axis=1), axis=1))
    return np.concatenate(parts).astype(np.int64) if parts else np.zeros((0, k), dtype=np.int64)


def _choice_complement(rng: np.random.Generator, excluded: np.ndarray, pool: int, size: int) -> np.ndarray:
    """``[rows, size]`` uniform draws from ``range(pool)`` minus each row's ``excluded`` (distinct) indices."""
    rows, n = excluded.shape
    r = rng.integers(0, pool - n, size=(rows, size))
    # The r-th non-excluded index is r + #{j : s_j - j <= r} for the sorted excluded s.
    adjusted = np.sort(excluded, axis=1) - np.arange(n)
    offset = np.arange(rows)[:, None] * (pool + 1)
    count = np.searchsorted((adjusted + offset).ravel(), (r + offset).ravel(), side="right").reshape(rows, size)
    return r + count - np.arange(rows)[:, None] * n


def _power_law_positions(rng: np.random.Generator, rows: int, region: int, k: int, a: float) -> np.ndarray:
    """``[rows, k]`` distinct offsets in ``range(region)``, successive sampling with ``p(j) ∝ j^(a-1)``.

    Gumbel top-k: sorting ``log w + Gumbel`` in decreasing order is exactly successive sampling
    without replacement with probabilities proportional to ``w`` (what ``np.random.choice(...,
    replace=False, p=w)`` does one row at a time).
    """
    log_w = (a - 1.0) * np.log(np.arange(1, region + 1, dtype=np.float64))
    scores = log_w + rng.gumbel(size=(rows, region))
    top = np.argpartition(-scores, k - 1, axis=1)[:, :k] if k < region else np.tile(np.arange(region), (rows, 1))
    order = np.argsort(-np.take_along_axis(scores, top, axis=1), axis=1, kind="stable")
    return np.take_along_axis(top, order, axis=1)


def _to_batch(inputs, labels, distances, key_positions, num_queries: int) -> RecallBatch:
    rows = inputs.shape[0]
    return RecallBatch(
        inputs=torch.from_numpy(np.ascontiguousarray(inputs, dtype=np.int64)),
        labels=torch.from_numpy(np.ascontiguousarray(labels, dtype=np.int64)),
        distances=torch.from_numpy(np.ascontiguousarray(distances, dtype=np.int64)),
        num_kv_pairs=torch.full((rows,), num_queries, dtype=torch.long),
        key_positions=torch.from_numpy(np.ascontiguousarray(key_positions, dtype=np.int64)),
    )


def _check_num_examples(num_examples: int) -> None:
    if isinstance(num_examples, bool) or not isinstance(num_examples, int | np.integer) or num_examples < 0:
        raise ValueError(f"num_examples={num_examples!r} must be an int >= 0")


# --------------------------------------------------------------------------------------------
# Generators
# --------------------------------------------------------------------------------------------


def generate_mqar(config: MQARConfig, num_examples: int, seed: SeedLike = 0) -> RecallBatch:
    """Generate ``num_examples`` MQAR / far-recall / noisy-recall examples.

    Args:
        config: an :class:`MQARConfig` (or :class:`FarRecallConfig`, :class:`NoisyRecallConfig`).
        num_examples: ``B``.
        seed: an int, a ``SeedSequence`` or a ``numpy.random.Generator`` (used, and advanced, in place).

    Returns:
        :class:`RecallBatch` with tensors of shape ``[B, seq_len]`` (``num_kv_pairs``: ``[B]``).
        The same config and int seed always give the same batch.
    """
    if not isinstance(config, MQARConfig):
        raise TypeError(f"generate_mqar needs an MQARConfig, got {type(config).__name__}")
    _check_num_examples(num_examples)
    rng = np.random.default_rng(seed)
    B, L, n = int(num_examples), config.seq_len, config.num_kv_pairs
    klo, khi = config.key_range
    vlo, vhi = config.value_range
    rows = np.arange(B)[:, None]

    key_idx = _choice_no_replace(rng, B, khi - klo, n)
    keys = key_idx + klo
    values = _choice_no_replace(rng, B, vhi - vlo, n) + vlo

    noisy = isinstance(config, NoisyRecallConfig)
    if config.filler == "blank":
        inputs = np.zeros((B, L), dtype=np.int64)
    elif noisy:
        dlo, dhi = config.distractor_range
        inputs = rng.integers(dlo, dhi, size=(B, L))
    else:
        inputs = _choice_complement(rng, key_idx, khi - klo, L) + klo

    stride = config._pair_stride
    key_pos = np.arange(n) * stride  # [n], the same for every example
    if noisy and config.noise_per_pair > 0:
        dlo, dhi = config.distractor_range
        noise_pos = (key_pos[:, None] + 2 + np.arange(config.noise_per_pair)).ravel()
        inputs[:, noise_pos] = rng.integers(dlo, dhi, size=(B, noise_pos.size))
    inputs[:, key_pos] = keys
    inputs[:, key_pos + 1] = values

    start = config.query_start
    query_pos = start + _power_law_positions(rng, B, L - start, n, float(config.power_a))  # [B, n]
    inputs[rows, query_pos] = keys

    labels = np.full((B, L), IGNORE_INDEX, dtype=np.int64)
    labels[rows, query_pos] = values
    distances = np.full((B, L), -1, dtype=np.int64)
    distances[rows, query_pos] = query_pos - key_pos
    key_positions = np.full((B, L), -1, dtype=np.int64)
    key_positions[rows, query_pos] = np.broadcast_to(key_pos, (B, n))
    return _to_batch(inputs, labels, distances, key_positions, n)


def generate_noisy_recall(config: NoisyRecallConfig, num_examples: int, seed: SeedLike = 0) -> RecallBatch:
    """Generate noisy-recall examples (see :class:`NoisyRecallConfig`); shapes as :func:`generate_mqar`."""
    if not isinstance(config, NoisyRecallConfig):
        raise TypeError(f"generate_noisy_recall needs a NoisyRecallConfig, got {type(config).__name__}")
    return generate_mqar(config, num_examples, seed)


def generate_selective_copy(config: SelectiveCopyConfig, num_examples: int, seed: SeedLike = 0) -> RecallBatch:
    """Generate selective-copying examples (see :class:`SelectiveCopyConfig`).

    Returns:
        :class:`RecallBatch`, tensors ``[B, seq_len]``; ``labels[:, region_len + j]`` is the
        ``j``-th data token, ``key_positions`` its position in the region.
    """
    if not isinstance(config, SelectiveCopyConfig):
        raise TypeError(f"generate_selective_copy needs a SelectiveCopyConfig, got {type(config).__name__}")
    _check_num_examples(num_examples)
    rng = np.random.default_rng(seed)
    B, L, n, R = int(num_examples), config.seq_len, config.num_tokens_to_copy, config.effective_region_len
    rows = np.arange(B)[:, None]

    data_pos = np.sort(_choice_no_replace(rng, B, R, n), axis=1)  # [B, n], increasing
    dlo, dhi = config.data_range
    data = rng.integers(dlo, dhi, size=(B, n))

    inputs = np.zeros((B, L), dtype=np.int64)
    if config.noise == "random":
        nlo, nhi = config.noise_range
        inputs[:, :R] = rng.integers(nlo, nhi, size=(B, R))
    inputs[rows, data_pos] = data
    out_pos = R + np.arange(n)
    inputs[:, out_pos] = config.marker_token

    labels = np.full((B, L), IGNORE_INDEX, dtype=np.int64)
    labels[:, out_pos] = data
    distances = np.full((B, L), -1, dtype=np.int64)
    distances[:, out_pos] = out_pos - data_pos
    key_positions = np.full((B, L), -1, dtype=np.int64)
    key_positions[:, out_pos] = data_pos
    return _to_batch(inputs, labels, distances, key_positions, n)


# --------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Task:
    """A registered task: its name, config class, generator and a one-line description."""

    name: str
    config_class: type[TaskConfig]
    generate: Callable[[Any, int, SeedLike], RecallBatch]
    description: str


TASKS: dict[str, Task] = {
    "mqar": Task("mqar", MQARConfig, generate_mqar, "multi-query associative recall (Zoology)"),
    "far_recall": Task("far_recall", FarRecallConfig, generate_mqar, "MQAR with every query >= gap_min after its key"),
    "noisy_recall": Task(
        "noisy_recall", NoisyRecallConfig, generate_noisy_recall, "MQAR with distractor tokens between kv pairs"
    ),
    "selective_copy": Task(
        "selective_copy", SelectiveCopyConfig, generate_selective_copy, "copy the non-noise tokens in order (Mamba)"
    ),
}


def get_task(name: str) -> Task:
    """The registered :class:`Task` called ``name``; ``ValueError`` listing the valid names otherwise."""
    try:
        return TASKS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown task {name!r}; valid tasks: {', '.join(TASKS)}") from None


def task_config(task: str, **fields: Any) -> TaskConfig:
    """Build the config of ``task`` from keyword fields (``ValueError`` for an unknown field)."""
    if "task" in fields:
        named = fields.pop("task")
        if named != task:
            raise ValueError(f"task={named!r} in the fields does not match task {task!r}")
    cls = get_task(task).config_class
    valid = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(fields) - set(valid))
    if unknown:
        raise ValueError(f"unknown field(s) {', '.join(unknown)} for task {task!r}; valid fields: {', '.join(valid)}")
    return cls(**fields)


def generate(config: TaskConfig, num_examples: int, seed: SeedLike = 0) -> RecallBatch:
    """Generate ``num_examples`` examples of the task ``config`` belongs to (deterministic in ``seed``)."""
    return get_task(config.task_name).generate(config, num_examples, seed)


# --------------------------------------------------------------------------------------------
# Mixtures, splits and datasets
# --------------------------------------------------------------------------------------------


def _check_split(split: str) -> None:
    if split not in _SPLIT_TAGS:
        raise ValueError(f"split={split!r} must be one of {', '.join(SPLITS)}")


def _seed_sequence(seed: int, split: str, stream: int, index: int) -> np.random.SeedSequence:
    """Independent stream per (base seed, split, stream kind, index): train and test never share one."""
    _check_split(split)
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise ValueError(f"seed={seed!r} must be an int >= 0")
    return np.random.SeedSequence([int(seed), _SPLIT_TAGS[split], stream, int(index)])


@dataclass(frozen=True)
class TaskMixture:
    """A weighted mixture of task configs (e.g. several ``seq_len`` / ``num_kv_pairs``) for one split.

    Random streams are derived from ``(seed, split, …)``, so a train and a test mixture never
    share a stream, whatever their seeds.

    Attributes:
        configs: the task configs (any tasks; lengths may differ).
        weights: relative weights (default: equal).
        split: ``"train"`` or ``"test"``.
        seed: base seed (int >= 0).
    """

    configs: tuple[TaskConfig, ...]
    weights: tuple[float, ...] | None = None
    split: str = "train"
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "configs", tuple(self.configs))
        if not self.configs:
            raise ValueError("configs is empty: a mixture needs at least one task config")
        for c in self.configs:
            if not isinstance(c, TaskConfig):
                raise ValueError(f"configs must hold task configs, got {type(c).__name__}")
        if self.weights is not None:
            w = tuple(float(x) for x in self.weights)
            object.__setattr__(self, "weights", w)
            if len(w) != len(self.configs):
                raise ValueError(f"weights has {len(w)} entries for {len(self.configs)} configs")
            if any(not math.isfinite(x) or x < 0 for x in w) or sum(w) <= 0:
                raise ValueError(f"weights={w} must be finite, >= 0 and not all 0")
        _check_split(self.split)
        _seed_sequence(self.seed, self.split, 0, 0)  # validates the seed

    @property
    def probabilities(self) -> np.ndarray:
        w = np.ones(len(self.configs)) if self.weights is None else np.asarray(self.weights)
        return w / w.sum()

    @property
    def max_seq_len(self) -> int:
        return max(c.seq_len for c in self.configs)

    def counts(self, num_examples: int) -> list[int]:
        """Examples per config for a dataset of ``num_examples`` (largest remainders; sums exactly)."""
        _check_num_examples(num_examples)
        exact = self.probabilities * num_examples
        counts = np.floor(exact).astype(int)
        rest = num_examples - counts.sum()
        counts[np.argsort(-(exact - counts), kind="stable")[:rest]] += 1
        return counts.tolist()

    def dataset(self, num_examples: int) -> list[RecallBatch]:
        """A fixed dataset: one :class:`RecallBatch` per config (configs with 0 examples omitted)."""
        out = []
        for i, (config, count) in enumerate(zip(self.configs, self.counts(num_examples), strict=True)):
            if count:
                out.append(generate(config, count, _seed_sequence(self.seed, self.split, _STREAM_DATASET, i)))
        return out

    def batch(self, index: int, batch_size: int) -> RecallBatch:
        """On-the-fly batch number ``index`` (>= 0): one config drawn by weight, deterministic in
        ``(seed, split, index)`` alone, so a resumed run can regenerate batch ``k`` directly."""
        if isinstance(index, bool) or not isinstance(index, int | np.integer) or index < 0:
            raise ValueError(f"index={index!r} must be an int >= 0")
        rng = np.random.default_rng(_seed_sequence(self.seed, self.split, _STREAM_BATCH, index))
        config = self.configs[int(rng.choice(len(self.configs), p=self.probabilities))]
        return generate(config, batch_size, rng)

    def batches(self, batch_size: int, start: int = 0) -> Iterator[RecallBatch]:
        """Endless on-the-fly stream ``batch(start), batch(start + 1), …``."""
        for index in itertools.count(start):
            yield self.batch(index, batch_size)


def make_mixture(
    task: str,
    *,
    split: str = "train",
    seed: int = 0,
    lengths: Sequence[int] | None = None,
    weights: Sequence[float] | None = None,
    **fields: Any,
) -> TaskMixture:
    """A :class:`TaskMixture` of ``task`` over ``lengths`` × every list/tuple-valued field.

    Example: ``make_mixture("mqar", lengths=[64, 128], num_kv_pairs=[4, 8])`` mixes four configs.
    ``lengths`` defaults to ``DEFAULT_LENGTHS[split]`` (test longer than train). A combination
    that is invalid (e.g. too many kv pairs for a length) raises its ``ValueError``.
    """
    _check_split(split)
    get_task(task)
    if "seq_len" in fields:
        raise ValueError("pass sequence lengths as lengths=[...], not seq_len")
    lengths = DEFAULT_LENGTHS[split] if lengths is None else tuple(lengths)
    if not lengths:
        raise ValueError("lengths is empty")
    grid = {"seq_len": list(lengths)}
    for name, value in fields.items():
        grid[name] = list(value) if isinstance(value, list | tuple) else [value]
    names = list(grid)
    configs = [task_config(task, **dict(zip(names, combo, strict=True))) for combo in itertools.product(*grid.values())]
    return TaskMixture(tuple(configs), None if weights is None else tuple(weights), split, seed)


def config_hash(*parts: Any) -> str:
    """A short stable hash of task configs / mixtures and extra JSON-able values (for cache paths)."""

    def encode(x: Any) -> Any:
        if isinstance(x, TaskConfig):
            return x.to_dict()
        if isinstance(x, TaskMixture):
            return {"configs": [encode(c) for c in x.configs], "weights": x.weights, "split": x.split, "seed": x.seed}
        if isinstance(x, list | tuple):
            return [encode(y) for y in x]
        return x

    text = json.dumps([_FORMAT_VERSION, [encode(p) for p in parts]], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def make_dataset(
    task: str,
    *,
    num_examples: int,
    split: str = "train",
    seed: int = 0,
    lengths: Sequence[int] | None = None,
    weights: Sequence[float] | None = None,
    cache_dir: str | os.PathLike | None = None,
    **fields: Any,
) -> list[RecallBatch]:
    """A fixed dataset of ``num_examples`` examples of ``task`` for ``split``.

    Returns one :class:`RecallBatch` per config of :func:`make_mixture` (lengths differ between
    configs; ``RecallBatch.cat(batches, pad=True)`` makes one batch). With ``cache_dir`` the
    dataset is saved to / loaded from ``cache_dir/<task>-<split>-<hash>.pt`` where the hash
    covers the configs, weights, split, seed, ``num_examples`` and the generator version.
    """
    mixture = make_mixture(task, split=split, seed=seed, lengths=lengths, weights=weights, **fields)
    _check_num_examples(num_examples)
    path = None
    if cache_dir is not None:
        path = Path(cache_dir) / f"{task}-{split}-{config_hash(mixture, num_examples)}.pt"
        if path.exists():
            return [RecallBatch.from_dict(d) for d in torch.load(path, weights_only=True)["batches"]]
    batches = mixture.dataset(num_examples)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        payload = {"configs": [c.to_dict() for c in mixture.configs], "batches": [b.to_dict() for b in batches]}
        torch.save(payload, tmp)
        os.replace(tmp, path)
    return batches
