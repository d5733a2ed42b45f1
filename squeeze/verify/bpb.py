"""Bits per byte exactly as the Parameter Golf challenge counts them (train_gpt.py: build_sentencepiece_luts, eval_val).

A predicted token's bytes are the UTF-8 bytes of its piece with a leading "▁" removed, plus one byte for that "▁"
(the space it stands for) unless the previous token is a boundary token (control, unknown or unused: after BOS a
document starts without a space). Byte-fallback tokens count 1; control, unknown and unused tokens count 0.
BPB = (summed loss in nats / ln 2) / summed bytes, so it does not depend on the tokenizer's granularity.
"""
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import SqueezeError

SPACE = "\u2581"  # SentencePiece's visible space


def load_tokenizer(path):
    """A SentencePiece processor, or a one-line SqueezeError naming the file."""
    import sentencepiece

    path = str(path)
    if not Path(path).is_file():
        raise SqueezeError(f"{path}: no such tokenizer file")
    try:
        return sentencepiece.SentencePieceProcessor(model_file=path)
    except (OSError, RuntimeError) as e:
        text = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise SqueezeError(f"{path}: not a SentencePiece model ({text})") from None


@dataclass(frozen=True)
class ByteTable:
    """Per-token-id lookup tables; `count(prev, target)` gives each predicted token's bytes."""
    base: torch.Tensor           # int64 [vocab]: bytes of the piece without its leading "▁"
    leading_space: torch.Tensor  # bool [vocab]: the piece starts with "▁"
    boundary: torch.Tensor       # bool [vocab]: control/unknown/unused; no space is counted after it

    @property
    def vocab_size(self) -> int:
        return self.base.numel()

    def to(self, device) -> "ByteTable":
        return ByteTable(self.base.to(device), self.leading_space.to(device), self.boundary.to(device))

    def count(self, prev_ids: torch.Tensor, target_ids: torch.Tensor) -> torch.Tensor:
        """Bytes of each target token (int64, same shape), given the token before it."""
        return self.base[target_ids] + (self.leading_space[target_ids] & ~self.boundary[prev_ids]).long()


def byte_table(sp) -> ByteTable:
    """The challenge's tables for a SentencePiece processor."""
    n = sp.vocab_size()
    base = torch.zeros(n, dtype=torch.int64)
    leading_space = torch.zeros(n, dtype=torch.bool)
    boundary = torch.ones(n, dtype=torch.bool)
    for i in range(n):
        if sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i):
            continue
        boundary[i] = False
        if sp.is_byte(i):
            base[i] = 1
            continue
        piece = sp.id_to_piece(i)
        if piece.startswith(SPACE):
            leading_space[i] = True
            piece = piece[1:]
        base[i] = len(piece.encode("utf-8"))
    return ByteTable(base, leading_space, boundary)


def bits_per_byte(loss_nats: float, n_bytes: int) -> float:
    return loss_nats / math.log(2) / n_bytes if n_bytes else float("nan")
