"""Helpers that build the independent oracle: a local torchrec module with the same weights
that Shoal was given."""
from __future__ import annotations

import torch


def fill_from_oracle(client, model: str, ebc) -> None:
    """Write every table of a torchrec EmbeddingBagCollection / EmbeddingCollection into Shoal."""
    bags = getattr(ebc, "embedding_bags", None) or getattr(ebc, "embeddings")
    with torch.no_grad():
        for name, module in bags.items():
            w = module.weight.detach()
            client.write_rows(model, name, torch.arange(w.shape[0]), w)
