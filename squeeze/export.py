"""squeeze.export: compile the live model at the end of a training script, inside the time the script reserved.

Parameter Golf records export at the end of train_gpt.py, on 8 GPUs, within seconds of their 600 s: they collect
Hessians on training batches they already have, run GPTQ, and must keep artifact + code ≤ 16,000,000 bytes. From
their side, in about five lines:

    import squeeze
    result = squeeze.export(model, calib_batches, "final_model.sqz", budget=16_000_000, code=[__file__],
                            time_limit=10)
    if result.is_main:
        print(result.summary())

- `model`: the live module (DDP / torch.compile wrappers are looked through), on any device; its weights and their
  `.grad` are not changed (sensitivities come from torch.autograd.grad; probes restore weights exactly) and its
  train/eval mode is put back.
- `batches`: token id tensors [B, T] or (inputs, targets) pairs, already on the model's device or not.
- `forward`: the method that returns logits (default: `forward_logits` when the module has one, else `forward`),
  its name, or any callable batch -> logits or loss. `autocast`: e.g. torch.bfloat16, as the script trains.
- Under torch.distributed (torchrun) every rank calls export with its own batches: Hessians and sensitivities are
  summed across ranks (N GPUs see N× the tokens in the same time), GPTQ and the budget's grid pricing are split
  across ranks by tensor and gathered; every rank gets the same artifact and rank 0 writes it, atomically.
- `time_limit` (seconds): calibration stops after the batch that reaches it, with what it has, and says so.
- `sensitivities` (with a budget): "fisher" (default: one backward of the first sequence of every calibrated
  batch, gathered across ranks and summed in a canonical order, so that N ranks give the bits one process gives on
  the same batches) or "probe" (two forwards per tensor on each rank's first batch, averaged over ranks). A forward
  that returns a loss instead of logits can only be probed: export does that and says so.
- `code`: files whose bytes count against `budget` as the challenge counts them (your script, the decoder you
  paste), or ints (bytes reserved for code written after export). Without a budget, export warns when artifact +
  code exceed 16,000,000 bytes.
"""
import dataclasses
import os
import time
from pathlib import Path

import torch
from torch import nn

from . import calibrate, compiler, measured, parallel
from .budget import budget_names, compile_to_budget
from .errors import SqueezeError
from .recipe import Recipe

CHALLENGE_LIMIT = 16_000_000  # Parameter Golf: artifact + code bytes


@dataclasses.dataclass
class ExportResult:
    blob: bytes
    path: str | None            # where rank 0 wrote it (None: not written)
    code_bytes: int             # the counted bytes of `code`
    calibration: calibrate.Calibration
    matrices: list              # compiler.methods_of: each quantized matrix's method (gptq/rtn) and why
    seconds: dict               # calibration, sensitivities, compile
    warnings: list              # one line each: early stop, over the limit, fallbacks
    state: object = None        # the compiler's final State
    is_main: bool = True        # rank 0 (or a single process)
    measured: tuple = ()        # a budget's coarse grids priced on their measured loss (CompileResult.measured)

    @property
    def total_bytes(self) -> int:
        return len(self.blob) + self.code_bytes

    def summary(self) -> str:
        gptq = sum(m["method"] == "gptq" for m in self.matrices)
        t = self.seconds
        lines = [f"squeeze: {len(self.blob):,} B artifact + {self.code_bytes:,} B code = {self.total_bytes:,} B; "
                 f"gptq {gptq} of {len(self.matrices)} quantized matrices; calibration {self.calibration.source}; "
                 f"{t.get('calibration', 0):.1f} s calibration, {t.get('sensitivities', 0):.1f} s sensitivities, "
                 f"{t.get('compile', 0):.1f} s compile"]
        lines += [f"squeeze: measured {m['name']} {m['grid']}: ΔL {m['measured']:+.2e}, quadratic model "
                  f"{m['predicted']:.2e}" for m in self.measured]
        return "\n".join(lines + [f"squeeze: warning: {w}" for w in self.warnings])


def export(model: nn.Module, batches, path: str | os.PathLike | None = None, *, recipe: Recipe | None = None,
           budget: int | None = None, code=(), time_limit: float | None = None, forward=None, autocast=None,
           strict_calib: bool = False, progress: bool = True, sensitivities: str = "fisher") -> ExportResult:
    """Calibrate the live `model` on `batches`, compile it (to `budget` bytes with code, when given) and, on rank 0,
    write the artifact to `path` atomically. See the module docstring."""
    rank, world = parallel.group_size()
    model = _unwrapped(model)
    code_bytes = sum(_file_size(f) for f in code)
    names = list(model.state_dict())
    warnings, seconds = [], {}
    was_training = model.training
    model.eval()
    try:
        t0 = time.perf_counter()
        run = _runner(model, forward, autocast)
        cal, stopped = _calibrate(model, batches, run, names, time_limit, progress and rank == 0)
        seconds["calibration"] = time.perf_counter() - t0
        if stopped:
            warnings.append(stopped)
        warnings += cal.warnings()
        sens = {}
        if budget is not None:
            t0 = time.perf_counter()
            targets = budget_names(model.state_dict(), recipe or Recipe())
            sens, fallback = _sensitivities(model, cal.batches, run, names, targets, progress and rank == 0,
                                            sensitivities)
            if fallback:
                warnings.append(fallback)
            seconds["sensitivities"] = time.perf_counter() - t0
        state_dict = {k: v.detach() for k, v in model.state_dict().items()}
        t0 = time.perf_counter()
        common = dict(hessians=cal.hessians, device=_device_of(model), calibration_skips=cal.skipped,
                      strict_calib=strict_calib)
        recipe = recipe or Recipe()
        if budget is not None:
            log = (lambda line: print(f"squeeze: {line}", flush=True)) if progress and rank == 0 else None
            # the model stays in eval mode here: the budget measures its coarse grids' loss with it
            result = compile_to_budget(state_dict, recipe, budget, sensitivities=sens, code_bytes=code_bytes,
                                       progress=log, even_loss=_even_loss(model, cal.batches, run, names), **common)
            warnings += result.warnings
        else:
            result = compiler.compile_state_dict(state_dict, recipe, **common)
    finally:
        model.train(was_training)
    seconds["compile"] = time.perf_counter() - t0
    matrices = compiler.methods_of(result.state)
    fallbacks = [m for m in matrices if m["method"] != "gptq"]
    if fallbacks:
        warnings.append(f"round-to-nearest for {len(fallbacks)} of {len(matrices)} quantized matrices: " +
                        "; ".join(f"{m['name']} ({m['why']})" for m in fallbacks))
    total = len(result.blob) + code_bytes
    if budget is None and total > CHALLENGE_LIMIT:
        warnings.append(f"artifact {len(result.blob):,} B + code {code_bytes:,} B = {total:,} B exceeds the "
                        f"challenge's {CHALLENGE_LIMIT:,} B; pass budget={CHALLENGE_LIMIT:_}")
    written = None
    if path is not None:
        if rank == 0:
            from .files import write_atomically
            from .loader import load
            write_atomically(str(path), result.blob, check=load)
        written = str(path)
        if world > 1:
            torch.distributed.barrier()  # the file exists for every rank when export returns
    return ExportResult(blob=result.blob, path=written, code_bytes=code_bytes, calibration=cal, matrices=matrices,
                        measured=result.measured,
                        seconds=seconds, warnings=warnings, state=result.state, is_main=rank == 0)


@dataclasses.dataclass(frozen=True)
class _Calibration(calibrate.Calibration):
    batches: list = dataclasses.field(default_factory=list)  # this rank's calibrated batches (sensitivities)


def _unwrapped(model: nn.Module) -> nn.Module:
    """The module whose state_dict names are the checkpoint's: through DDP (.module) and torch.compile (_orig_mod)."""
    while True:
        inner = getattr(model, "_orig_mod", None) or (getattr(model, "module", None)
                                                      if type(model).__name__ in ("DistributedDataParallel",
                                                                                  "DataParallel") else None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def _file_size(f) -> int:
    """A file's bytes, or an int taken as a byte count (room reserved for code written later, e.g. the decoder)."""
    if isinstance(f, int) and not isinstance(f, bool):
        return f
    try:
        return Path(f).stat().st_size
    except OSError as e:
        raise SqueezeError(f"{f}: cannot count code bytes ({e.strerror or e})") from None


def _device_of(model: nn.Module) -> str:
    p = next(model.parameters(), None)
    return str(p.device) if p is not None else "cpu"


def _inputs(batch):
    return batch[0] if isinstance(batch, (tuple, list)) else batch


def _runner(model: nn.Module, forward, autocast):
    """batch -> model output (logits or a loss), on the model's device, under autocast when asked."""
    if callable(forward) and not isinstance(forward, str):
        call = forward
    else:
        from .verify.models import logits_fn
        logits = logits_fn(model, forward, type(model).__name__)
        call = lambda batch: logits(_inputs(batch))  # noqa: E731
    device = torch.device(_device_of(model))

    def run(batch):
        batch = _to(batch, device)
        if autocast is None:
            return call(batch)
        with torch.autocast(device.type, dtype=autocast):
            return call(batch)
    return run


def _to(batch, device):
    if isinstance(batch, (tuple, list)):
        return type(batch)(_to(b, device) for b in batch)
    return batch.to(device, non_blocking=True) if isinstance(batch, torch.Tensor) else batch


@torch.no_grad()
def _calibrate(model, batches, run, names, time_limit, show) -> tuple:
    """(calibration, why it stopped early or None): Gram sums over this rank's batches, summed across ranks."""
    from .verify.progress import ProgressBar

    batches = list(batches)
    if not batches:
        raise SqueezeError("export: no calibration batches")
    sums, done, tokens, start = calibrate.GramSums(), 0, 0, time.perf_counter()
    bar = ProgressBar("calibrate", len(batches), enabled=show, unit="batches")
    stopped = None
    with calibrate.tracking(model, sums, names):
        for batch in batches:
            run(batch)
            done += 1
            tokens += _inputs(batch).numel()
            bar.advance(1)
            if time_limit is not None and time.perf_counter() - start >= time_limit and done < len(batches):
                stopped = (f"calibration stopped at its time limit ({time_limit:g} s) after {done} of "
                           f"{len(batches)} batches on this rank")
                break
    bar.close()
    sums.all_reduce()
    counts = torch.tensor([done, tokens], dtype=torch.float64)
    rank, world = parallel.group_size()
    if world > 1:
        counts = counts.to(calibrate.collective_device())
        torch.distributed.all_reduce(counts)
    done_all, tokens_all = (int(v) for v in counts.tolist())
    if not sums.sums:
        raise SqueezeError("export: the forward multiplied by none of the model's parameters, so GPTQ has nothing "
                           "to work on (is `forward` the method that runs the model?)")
    source = f"{tokens_all:,} tokens in {done_all} batches" + (f" on {world} ranks" if world > 1 else "")
    return _Calibration(hessians=sums.hessians(), sensitivities={}, sequences=done_all, tokens=tokens_all,
                        source=source, skipped=sums.unattributed(), thin=sums.thin(),
                        batches=batches[:done]), stopped


class _ReturnsLoss(Exception):
    """The forward returned a scalar loss, so there are no logits to draw the Fisher's labels from."""


def _sensitivities(model, batches, run, names, targets, show, method) -> tuple[dict, str | None]:
    """(loss increase per unit weight noise of each of `targets` (what the budget decides); a warning when the
    method asked for could not be used). The Fisher takes the first sequence of each of this rank's `batches` and
    gathers every rank's terms before summing them (calibrate.fisher_total: the same bits for any dealing of the
    batches to ranks); the probe measures this rank's first batch and averages over ranks."""
    from .verify.progress import ProgressBar

    if method not in calibrate.SENSITIVITY_METHODS:
        raise SqueezeError(f"export: sensitivities={method!r}: expected one of "
                           f"{', '.join(calibrate.SENSITIVITY_METHODS)}")
    params = calibrate.checkpoint_parameters(model, names)
    raw, fallback = None, None
    if method == "fisher":
        def logits_of(unit):
            out = run(unit)
            if out.dim() == 0:
                raise _ReturnsLoss
            return out
        units = [calibrate.rows_of(b)[0] for b in batches]
        bar = ProgressBar("sensitivities", len(units), enabled=show, unit="sequences")
        try:
            terms = calibrate.fisher_terms(params, targets, units, logits_of, progress=bar.advance)
            raw = calibrate.fisher_total(calibrate.FisherTerms.joined(parallel.gather(terms)))
        except _ReturnsLoss:
            fallback = ("sensitivities: the forward returns a loss, not logits, so they were probed (2 forwards per "
                        "tensor) instead of taken from one backward; pass forward= the method that returns logits")
        bar.close()
    if raw is None:
        def loss() -> float:
            return _loss(run(batches[0]), batches[0])

        bar = ProgressBar("probe", len(targets), enabled=show, unit="tensors")
        with torch.no_grad():
            raw = calibrate.probe(params, targets, loss, progress=bar.advance)
        bar.close()
    rank, world = parallel.group_size()
    if world > 1 and (method == "probe" or fallback is not None):  # probed: each rank its own first batch
        values = torch.tensor([raw[n] for n in targets], dtype=torch.float64, device=calibrate.collective_device())
        torch.distributed.all_reduce(values)
        raw = dict(zip(targets, (values / world).tolist()))
    return calibrate.floored(raw), fallback


def _loss(out, batch) -> float:
    """The model's loss on `batch`: its output when that is a scalar (a record's forward(ids, targets)), else the
    cross-entropy of the logits against the targets (the pair's second item, or the inputs shifted by one)."""
    total, tokens = _summed_loss(out, batch)
    return total / tokens


def _summed_loss(out, batch) -> tuple[float, int]:
    """(`_loss` × its tokens, tokens): the sum measured.EvenLoss adds up over units of different lengths."""
    if isinstance(batch, (tuple, list)) and len(batch) > 1:
        targets = batch[1]
        logits = out if out.dim() else None
    else:
        ids = _inputs(batch)
        targets = ids[:, 1:]
        logits = out[:, :-1] if out.dim() else None
    tokens = targets.numel()
    if logits is None:  # a forward that returns its own (mean) loss
        return float(out) * tokens, tokens
    targets = targets.to(logits.device)
    return float(nn.functional.cross_entropy(logits.double().flatten(0, 1), targets.flatten(), reduction="sum")), tokens


def _even_loss(model, batches, run, names) -> measured.EvenLoss:
    """The budget's measure of coarse grids (squeeze/measured.py) on the first sequence of each of this rank's
    calibrated batches (the Fisher's units), gathered across ranks as the Fisher's terms are."""
    units = [calibrate.rows_of(b)[0] for b in batches]
    return measured.EvenLoss(calibrate.checkpoint_parameters(model, names), units,
                             lambda unit: _summed_loss(run(unit), unit))
