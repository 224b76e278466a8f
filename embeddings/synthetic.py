"""Synthetic recommendation traffic for demos, tests and benchmarks: Zipf-distributed ids in
DLRM-shaped KeyedJaggedTensors."""
from __future__ import annotations

import functools

import numpy as np
import torch


@functools.lru_cache(maxsize=16)
def _zipf_cdf(num_embeddings: int, alpha: float) -> np.ndarray:
    weights = np.arange(1, num_embeddings + 1, dtype=np.float64) ** -alpha
    cdf = np.cumsum(weights)
    return cdf / cdf[-1]


def zipf_ids(rng: np.random.Generator, n: int, num_embeddings: int, alpha: float = 1.05,
             ) -> np.ndarray:
    """``n`` ids in [0, num_embeddings) from a Zipf law truncated to the table: rank r (from 1)
    has probability proportional to 1 / r**alpha. Ranks are scattered over the id space by a
    fixed multiplicative hash so hot ids are not neighbours."""
    ranks = np.searchsorted(_zipf_cdf(num_embeddings, alpha), rng.random(n))
    ranks = np.minimum(ranks, num_embeddings - 1).astype(np.int64)
    return (ranks * 2_654_435_761) % num_embeddings


def random_kjt(rng: np.random.Generator, features: list[str], num_embeddings: list[int],
               batch_size: int, mean_bag: int, alpha: float = 1.05, weighted: bool = False,
               fixed_bag: bool = False):
    """A KeyedJaggedTensor with one bag per (feature, sample); bag sizes are ``mean_bag`` when
    ``fixed_bag``, else uniform in [0, 2 * mean_bag]."""
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    if fixed_bag:
        lengths = np.full(len(features) * batch_size, mean_bag, dtype=np.int32)
    else:
        lengths = rng.integers(0, 2 * mean_bag + 1, len(features) * batch_size, dtype=np.int32)
    per_key = lengths.reshape(len(features), batch_size).sum(axis=1)
    values = np.concatenate([zipf_ids(rng, int(c), n, alpha)
                             for c, n in zip(per_key, num_embeddings)])
    weights = torch.from_numpy(rng.random(len(values), dtype=np.float32)) if weighted else None
    return KeyedJaggedTensor(keys=list(features), values=torch.from_numpy(values),
                             lengths=torch.from_numpy(lengths), weights=weights)
