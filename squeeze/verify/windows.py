"""Which tokens the model reads and which it is scored on: the evaluation windows over a token stream.

A stream of n tokens holds n - 1 predictions (target i is token i + 1, predicted from tokens 0..i). A window is
`seq_len` consecutive input tokens starting at `start`; it is scored on its positions `score_from`..seq_len-1.

- Non-overlapping (stride None), as the challenge's baseline eval_val: windows at 0, L, 2L, ..., all positions
  scored; the (n - 1) mod L predictions that do not fill a last window are not scored.
- Sliding (stride S, 1 <= S <= L): windows advance by S; the first is scored on all its positions, every later one
  only on its last S positions, so each prediction is scored once, with L - S + 1 to L tokens of context. Every
  prediction of the stream is scored: the last window is moved back to end exactly at the stream's end (it is
  scored only on the predictions no window has scored yet), so all windows are L tokens long and batch together.
"""
from dataclasses import dataclass

import numpy as np

from ..errors import SqueezeError


@dataclass(frozen=True)
class WindowPlan:
    seq_len: int
    starts: np.ndarray      # int64 [windows]: index of each window's first input token in the stream
    score_from: np.ndarray  # int64 [windows]: first scored position within the window

    def __len__(self) -> int:
        return len(self.starts)

    @property
    def scored_tokens(self) -> int:
        return int((self.seq_len - self.score_from).sum())

    def batches(self, batch_size: int) -> list:
        """Consecutive groups of `batch_size` windows (the last may be short), as slices into the plan."""
        return [slice(i, min(i + batch_size, len(self))) for i in range(0, len(self), batch_size)]


def plan_windows(n_tokens: int, seq_len: int, stride: int | None = None, source: str = "val") -> WindowPlan:
    """Windows over a stream of `n_tokens` tokens; `source` names the stream in errors."""
    if seq_len < 1:
        raise SqueezeError(f"--seq-len {seq_len}: must be at least 1")
    if stride is not None and not 1 <= stride <= seq_len:
        raise SqueezeError(f"--stride {stride}: must be between 1 and --seq-len ({seq_len})")
    predictions = n_tokens - 1
    if predictions < seq_len:
        raise SqueezeError(f"{source}: {n_tokens:,} tokens, fewer than --seq-len + 1 = {seq_len + 1:,}")
    if stride is None:
        starts = np.arange(predictions // seq_len, dtype=np.int64) * seq_len
        return WindowPlan(seq_len, starts, np.zeros_like(starts))
    # Full windows at k·S for k = 0..K, each ending at or before the stream's end.
    last_full = (predictions - seq_len) // stride
    starts = np.arange(last_full + 1, dtype=np.int64) * stride
    score_from = np.full_like(starts, seq_len - stride)
    score_from[0] = 0
    scored_until = int(starts[-1]) + seq_len
    if scored_until < predictions:
        # The window ending at the stream's end, scored from where the previous one stopped.
        tail = predictions - seq_len
        starts = np.append(starts, tail)
        score_from = np.append(score_from, scored_until - tail)
    return WindowPlan(seq_len, starts, score_from)
