"""The validation token stream: every shard a glob matches, in sorted name order, concatenated (as the challenge's
load_validation_tokens), optionally cut to a prefix."""
import glob as globbing

import numpy as np
import torch

from ..data import read_shard
from ..errors import SqueezeError


def shard_paths(pattern: str) -> list:
    paths = sorted(globbing.glob(pattern))
    if not paths:
        raise SqueezeError(f"{pattern}: no token shards match")
    return paths


def load_stream(pattern: str, vocab_size: int, max_predictions: int | None = None) -> torch.Tensor:
    """int32 tokens of the matched shards; with `max_predictions`, only the first max_predictions + 1 tokens (that
    many predictions). Every token must be an id of the tokenizer's vocabulary."""
    chunks, held = [], 0
    for path in shard_paths(pattern):
        tokens = read_shard(path)
        if tokens.size and int(tokens.max()) >= vocab_size:
            bad = int(tokens.max())
            raise SqueezeError(f"{path}: token id {bad} is outside the tokenizer's vocabulary of {vocab_size}")
        chunks.append(tokens.astype(np.int32))
        held += tokens.size
        if max_predictions is not None and held > max_predictions:
            break  # later shards are not needed for the prefix
    stream = np.concatenate(chunks)
    if max_predictions is not None:
        stream = stream[: max_predictions + 1]
    return torch.from_numpy(stream)
