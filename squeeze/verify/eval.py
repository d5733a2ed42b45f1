"""Scoring a model on a token stream: summed loss (nats), predicted tokens and their bytes over a window plan."""
import contextlib
import math
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..errors import SqueezeError
from . import dist
from .bpb import ByteTable, bits_per_byte
from .progress import ProgressBar
from .windows import WindowPlan


@dataclass(frozen=True)
class Score:
    loss_nats: float   # summed cross-entropy of every scored prediction
    tokens: int        # scored predictions
    bytes: int         # their bytes, counted as the challenge does
    seconds: float     # wall time of the scoring, slowest rank
    # float64 [windows, 3]: each window's summed loss, scored tokens and bytes, in plan order (a bootstrap over
    # windows puts a noise floor on a drift: bootstrap_drifts); not part of the report
    windows: torch.Tensor | None = field(default=None, compare=False, repr=False)

    @property
    def val_loss(self) -> float:
        return self.loss_nats / self.tokens

    @property
    def val_bpb(self) -> float:
        return bits_per_byte(self.loss_nats, self.bytes)

    def to_dict(self) -> dict:
        return {"val_loss": self.val_loss, "val_bpb": self.val_bpb, "tokens": self.tokens, "bytes": self.bytes,
                "seconds": self.seconds}


def pick_device(requested: str | None, procs: dist.Processes) -> torch.device:
    """--device, or CUDA when available, else the CPU. Under torchrun a bare "cuda" means this rank's GPU
    (LOCAL_RANK)."""
    if requested is None:
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(requested)
    except (RuntimeError, ValueError):
        raise SqueezeError(f"--device {requested}: not a torch device (e.g. cpu, cuda, cuda:1)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SqueezeError(f"--device {requested}: CUDA is not available on this machine")
        if device.index is None:
            device = torch.device("cuda", procs.local_rank)
        torch.cuda.set_device(device)
    return device


def precision(device: torch.device) -> str:
    """bf16 autocast on CUDA, as the challenge evaluates; plain fp32 elsewhere."""
    return "bf16 autocast" if device.type == "cuda" else "fp32"


def _autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.inference_mode()
def score(model: torch.nn.Module, stream: torch.Tensor, table: ByteTable, plan: WindowPlan, *,
          batch_size: int = 32, device: torch.device = torch.device("cpu"), procs: dist.Processes = dist.Processes(),
          progress_label: str | None = None, byte_counts: torch.Tensor | None = None) -> Score:
    """Score `model` (on `device`, in eval mode; a module called as model(ids), or models.logits_fn's callable)
    over the plan's windows of `stream`.

    Each target's bytes come from `table` (given the token before it), or, with `byte_counts` (a CaseOps sidecar:
    one count per token of `stream`, stream.load_byte_counts), from the count at the target's own position.

    Windows are grouped into batches of `batch_size` in plan order and each rank scores a contiguous run of those
    batches. Each window's sums (float64 loss, exact integer counts) go into one [windows, 3] table that is summed
    across ranks (a rank's rows are zero elsewhere) and then added up exactly (math.fsum), so any number of
    processes gives the single-process result: each batch holds the same windows, whatever the world size.
    """
    started = time.perf_counter()
    table = table.to(device)
    batches = plan.batches(batch_size)
    mine = dist.split(len(batches), procs)
    per_window = torch.zeros(len(plan), 3, dtype=torch.float64, device=device)  # loss, tokens, bytes
    positions = torch.arange(plan.seq_len, device=device)
    offsets = torch.arange(plan.seq_len + 1)
    bar = ProgressBar(progress_label or "", sum(int((plan.seq_len - plan.score_from[batches[b]]).sum()) for b in mine),
                      enabled=progress_label is not None)
    for b in mine:
        starts = torch.from_numpy(plan.starts[batches[b]])
        at = starts[:, None] + offsets  # stream positions of each window's tokens; targets are at[:, 1:]
        chunk = stream[at].to(device=device, dtype=torch.int64, non_blocking=True)
        x, y = chunk[:, :-1], chunk[:, 1:]
        score_from = plan.score_from[batches[b]]  # numpy: deciding the path costs no device sync
        with _autocast(device):
            logits = model(x)
        counts = None if byte_counts is None else byte_counts[at[:, 1:]].to(device=device, non_blocking=True)
        if not score_from.any():
            scored = None
            picked_logits, targets, prev = logits.flatten(0, 1), y.flatten(), x.flatten()
            counts = None if counts is None else counts.flatten()
        else:  # sliding windows: only the positions no earlier window scored
            scored = positions[None, :] >= torch.from_numpy(score_from).to(device)[:, None]
            picked_logits, targets, prev = logits[scored], y[scored], x[scored]
            counts = None if counts is None else counts[scored]
        losses = F.cross_entropy(picked_logits.float(), targets, reduction="none")
        target_bytes = table.count(prev, targets) if counts is None else counts
        columns = torch.stack([losses.double(), torch.ones_like(losses, dtype=torch.float64),
                               target_bytes.double()], dim=-1)
        if scored is None:
            per_window[batches[b]] = columns.view(y.shape[0], y.shape[1], 3).sum(1)
        else:
            window_of = torch.arange(y.shape[0], device=device)[:, None].expand_as(scored)[scored]
            per_window[batches[b]] = torch.zeros(y.shape[0], 3, dtype=torch.float64, device=device).index_add_(
                0, window_of, columns)
        bar.advance(targets.numel())
    bar.close()
    windows = dist.sum_across(per_window, procs).cpu()
    seconds = dist.max_across(time.perf_counter() - started, procs, device)
    return Score(loss_nats=math.fsum(windows[:, 0].tolist()), tokens=int(windows[:, 1].sum().item()),
                 bytes=int(windows[:, 2].sum().item()), seconds=seconds, windows=windows)
