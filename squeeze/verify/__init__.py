"""verify: how much an artifact's round trip moves the validation score (the challenge's val_bpb).

    result = squeeze.verify.verify("model.sqz", checkpoint="final_model.pt", val="data/fineweb_val_*.bin",
                                   tokenizer="data/tokenizers/fineweb_1024_bpe.model")
    result.original.val_bpb, result.decoded.val_bpb, result.drift_bpb

The checkpoint's weights and the artifact's weights, decoded by the emitted tiny decoder, are each loaded into the
same model (models.py) and scored on the same windows of the validation stream (windows.py, eval.py), with bytes
counted as the challenge counts them (bpb.py), or taken from CaseOps byte sidecars (stream.py). Under torchrun every
rank scores a slice and the sums are combined (dist.py); every rank returns the same result.

verify() writes no files. `squeeze verify` writes record.document(result) beside the artifact (ARTIFACT.verify.json),
where `squeeze inspect` finds it (record.py).
"""
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..checkpoint import load_checkpoint
from ..errors import SqueezeError
from . import dist, models
from .bpb import byte_table, load_tokenizer
from .eval import Score, pick_device, precision, score
from .record import sha256_of
from .stream import ByteSource, byte_source, load_byte_counts, load_stream, shard_paths
from .weights import check_same_tensors, decode_with_shipped_decoder, mirrored
from .windows import plan_windows


PARTS = ("measured", "even", "odd")  # which drift: decoded − original, or its halves from mirrored weights


def bootstrap_drifts(results: list, samples: int = 2000, seed: int = 0, part: str = "measured") -> np.ndarray:
    """float64 [samples, len(results)]: each result's drift_bpb (part "measured"; "even" / "odd": drift_even_bpb /
    drift_odd_bpb, which need results scored with mirror=True) recomputed on `samples` resamples (with replacement)
    of the validation windows, the same resample for every result, so that drifts of several artifacts of one
    checkpoint, scored on the same windows, stay paired (a ratio of two drifts gets its interval from these rows).
    Windows are the unit: within a window tokens are correlated, across windows much less (a window is 1-2K
    tokens of the stream). Deterministic for a seed."""
    if part not in PARTS:
        raise SqueezeError(f"bootstrap: part {part!r}, expected one of {', '.join(PARTS)}")
    first = results[0]
    for r in results:
        if r.original.windows is None or r.decoded.windows is None:
            raise SqueezeError("bootstrap: a result without per-window sums (scored by an older verify)")
        if part != "measured" and (r.mirrored is None or r.mirrored.windows is None):
            raise SqueezeError(f"bootstrap: the {part} part needs results scored with mirror=True")
        if not torch.equal(r.original.windows, first.original.windows):
            raise SqueezeError("bootstrap: the results were not scored on the same windows of the same checkpoint")
    n = first.original.windows.shape[0]
    counts = torch.from_numpy(np.random.default_rng(seed).multinomial(n, np.full(n, 1.0 / n), size=samples)).double()
    byte_totals = counts @ first.original.windows[:, 2]
    out = np.empty((samples, len(results)))
    for j, r in enumerate(results):
        extra_nats = counts @ _window_drift_nats(r, part)
        out[:, j] = (extra_nats / (math.log(2) * byte_totals)).numpy()
    return out


def _window_drift_nats(r, part: str) -> torch.Tensor:
    """Each window's loss change (nats) of one part of the drift."""
    decoded, original = r.decoded.windows[:, 0], r.original.windows[:, 0]
    if part == "measured":
        return decoded - original
    mirror = r.mirrored.windows[:, 0]
    return (decoded + mirror) / 2 - original if part == "even" else (decoded - mirror) / 2


@dataclass(frozen=True)
class VerifyResult:
    original: Score        # the checkpoint's weights
    decoded: Score         # the artifact's weights, through the emitted decoder
    artifact: str
    artifact_bytes: int
    params: int            # parameters of the checkpoint (every tensor's elements)
    checkpoint: str
    val: str
    model: str
    seq_len: int
    stride: int | None     # None: non-overlapping windows
    device: str
    precision: str
    world_size: int
    artifact_sha256: str = ""   # of the bytes verified, so a report can tell a later artifact at the same path
    val_files: tuple = ()       # the shards `val` matched
    max_tokens: int | None = None
    tokenizer: str = ""
    byte_source: ByteSource = ByteSource()  # the tokenizer's table, or the CaseOps sidecars the bytes came from
    mirrored: Score | None = None  # the weights 2·W − Ŵ (mirror=True): the artifact's error with its sign flipped

    @property
    def drift_loss(self) -> float:
        return self.decoded.val_loss - self.original.val_loss

    @property
    def drift_bpb(self) -> float:
        return self.decoded.val_bpb - self.original.val_bpb

    @property
    def drift_even_bpb(self) -> float | None:
        """The part of the drift even in the error E = Ŵ − W: (L(W + E) + L(W − E)) / 2 − L(W), in bits per byte.
        The curvature (second-order) term and up: what a quantizer's choices move. None without mirror=True."""
        if self.mirrored is None:
            return None
        return (self.decoded.val_bpb + self.mirrored.val_bpb) / 2 - self.original.val_bpb

    @property
    def drift_odd_bpb(self) -> float | None:
        """The part odd in E: (L(W + E) − L(W − E)) / 2, mostly g·E, the validation gradient along the error: of
        either sign for a given error pattern, zero in expectation over patterns. drift_bpb = even + odd."""
        if self.mirrored is None:
            return None
        return (self.decoded.val_bpb - self.mirrored.val_bpb) / 2

    @property
    def bits_per_param(self) -> float:
        return 8 * self.artifact_bytes / max(self.params, 1)

    def drift_interval(self, level: float = 0.95, samples: int = 2000, seed: int = 0,
                       part: str = "measured") -> tuple[float, float]:
        """The central `level` interval of drift_bpb (or of its even/odd part) over a paired bootstrap of the
        validation windows: what another sample of text of this size could have measured (bootstrap_drifts)."""
        drifts = bootstrap_drifts([self], samples, seed, part)[:, 0]
        return tuple(float(v) for v in np.quantile(drifts, [(1 - level) / 2, (1 + level) / 2]))

    def drift_exceeds(self, max_drift: float) -> bool:
        """The decoded weights score more than `max_drift` bits per byte worse than the original ones."""
        return self.drift_bpb > max_drift

    def to_dict(self) -> dict:
        drift = {"val_loss": self.drift_loss, "val_bpb": self.drift_bpb}
        mirror = {}
        if self.mirrored is not None:
            drift.update(even_val_bpb=self.drift_even_bpb, odd_val_bpb=self.drift_odd_bpb)
            mirror = {"mirrored": self.mirrored.to_dict()}
        return {
            "original": self.original.to_dict(),
            "decoded": self.decoded.to_dict(),
            **mirror,
            "drift": drift,
            "artifact": {"path": self.artifact, "sha256": self.artifact_sha256, "bytes": self.artifact_bytes,
                         "params": self.params, "bits_per_param": self.bits_per_param},
            "settings": {"checkpoint": self.checkpoint, "val": self.val, "val_files": list(self.val_files),
                         "tokenizer": self.tokenizer, "bytes": self.byte_source.label,
                         "val_bytes": self.byte_source.glob, "val_bytes_files": list(self.byte_source.files),
                         "val_bytes_found": self.byte_source.found, "model": self.model, "seq_len": self.seq_len,
                         "stride": self.stride, "max_tokens": self.max_tokens, "device": self.device,
                         "precision": self.precision, "world_size": self.world_size},
        }


def verify(artifact, checkpoint, val: str, tokenizer, *, model: str = models.BUILTIN, model_config=None,
           forward: str | None = None, seq_len: int = 1024, stride: int | None = None,
           max_tokens: int | None = None, batch_size: int = 32, device: str | None = None,
           progress: bool = False, val_bytes: str | None = None, mirror: bool = False) -> VerifyResult:
    """Score the checkpoint's weights and the artifact's decoded weights on the validation shards matching `val`.

    model: "pgolf" or "FILE.py:NAME" / "package.module:NAME" (contract in squeeze/verify/models.py).
    model_config: a dict, or the path of a JSON file (see models.load_model_config).
    forward: the model's method that returns logits (default: forward_logits when it has one, else forward; see
    models.logits_fn).
    seq_len, stride: windows (squeeze/verify/windows.py); max_tokens: score at most this many predictions, from the
    start of the stream. batch_size: windows per forward pass. device: default CUDA when available, else CPU.
    progress: a progress bar on stderr (rank 0 only, and only when stderr is a terminal).
    val_bytes: a glob of CaseOps byte sidecars (one original-text byte count per token of `val`) to count each
    target's bytes from, or "none" for the tokenizer's table; None: the sidecars X_bytes_NNNNNN.bin beside the token
    shards X_NNNNNN.bin when every shard has one, else the tokenizer's table (stream.byte_source).
    mirror: also score the weights 2·W − Ŵ (the artifact's error with its sign flipped), which splits the drift into
    its even part (curvature: what the quantizer controls) and its odd part (the validation gradient along the
    error: luck of the error pattern). A third scoring pass.
    """
    return Verifier(checkpoint, val, tokenizer, model=model, model_config=model_config, forward=forward,
                    seq_len=seq_len, stride=stride, max_tokens=max_tokens, batch_size=batch_size, device=device,
                    progress=progress, val_bytes=val_bytes).verify(artifact, mirror=mirror)


class Verifier:
    """One checkpoint on one validation setup, against any number of its artifacts: the stream, byte counts, window
    plan and model are prepared once and the checkpoint's own weights are scored once (on the first verify), so a
    benchmark that verifies many artifacts of one checkpoint spends one scoring pass per artifact (two with
    mirror), not two (three). The arguments are verify()'s; verify(artifact, ...) = Verifier(...).verify(artifact)."""

    def __init__(self, checkpoint, val: str, tokenizer, *, model: str = models.BUILTIN, model_config=None,
                 forward: str | None = None, seq_len: int = 1024, stride: int | None = None,
                 max_tokens: int | None = None, batch_size: int = 32, device: str | None = None,
                 progress: bool = False, val_bytes: str | None = None):
        self.procs = dist.from_env()
        self.device = pick_device(device, self.procs)
        self.table = byte_table(load_tokenizer(tokenizer))
        self.stream = load_stream(val, self.table.vocab_size, max_tokens, option="--val")
        self.bytes_from = byte_source(val, val_bytes)
        self.byte_counts = load_byte_counts(self.bytes_from, val, max_tokens)
        self.plan = plan_windows(self.stream.numel(), seq_len, stride,
                                 source=val if max_tokens is None else f"{val} (cut by --max-tokens {max_tokens})")
        self.original_weights = load_checkpoint(checkpoint)
        if model_config is None:
            config, config_source = {}, "--model-config"
        elif isinstance(model_config, dict):
            config, config_source = dict(model_config), "--model-config"
        else:
            config, config_source = models.load_model_config(model_config), str(model_config)
        self.build = models.resolve(model, config, config_source)
        self.checkpoint, self.val, self.tokenizer, self.model, self.forward = checkpoint, val, tokenizer, model, forward
        self.seq_len, self.stride, self.max_tokens, self.batch_size = seq_len, stride, max_tokens, batch_size
        self.progress = progress
        self.original: Score | None = None  # the checkpoint's score, from the first verify

    def _run(self, weights: dict, source: str, label: str) -> Score:
        net = self.build(weights, source).to(self.device).eval()
        logits = models.logits_fn(net, self.forward, self.model)
        vocab = models.vocab_of(logits, self.device, self.model)
        if vocab != self.table.vocab_size:
            raise SqueezeError(f"{self.tokenizer}: vocabulary of {self.table.vocab_size} tokens, but the model "
                               f"predicts {vocab}")
        return score(logits, self.stream, self.table, self.plan, batch_size=self.batch_size, device=self.device,
                     procs=self.procs, progress_label=label if self.progress and self.procs.is_main else None,
                     byte_counts=self.byte_counts)

    def verify(self, artifact, mirror: bool = False) -> VerifyResult:
        """The checkpoint's score and `artifact`'s decoded (and with mirror, mirrored) weights' scores."""
        check_same_tensors(artifact, self.checkpoint, self.original_weights)
        decoded_weights = decode_with_shipped_decoder(artifact)
        blob = Path(artifact).read_bytes()  # readable: it was just decoded
        created = dist.start(self.procs, self.device)
        try:
            if self.original is None:
                self.original = self._run(self.original_weights, str(self.checkpoint), "original")
            decoded = self._run(decoded_weights, str(artifact), "decoded")
            mirror_score = (self._run(mirrored(self.original_weights, decoded_weights), f"{artifact} (mirrored)",
                                      "mirrored") if mirror else None)
        finally:
            dist.stop(created)
        return VerifyResult(
            original=self.original, decoded=decoded, artifact=str(artifact), artifact_bytes=len(blob),
            params=sum(t.numel() for t in self.original_weights.values()), checkpoint=str(self.checkpoint),
            val=self.val, model=self.model, seq_len=self.seq_len, stride=self.stride, device=str(self.device),
            precision=precision(self.device), world_size=self.procs.world_size, artifact_sha256=sha256_of(blob),
            val_files=tuple(shard_paths(self.val)), max_tokens=self.max_tokens, tokenizer=str(self.tokenizer),
            byte_source=self.bytes_from, mirrored=mirror_score)


__all__ = ["verify", "Verifier", "VerifyResult", "Score", "ByteSource"]
