"""Calibration: the input Hessian H = E[x xᵀ] of every matrix the model multiplies by, from the model run on
calibration tokens.

GPTQ (squeeze/passes/gptq.py) needs to know which directions of a layer's input space real inputs use. Two sources:
token shards (`--calib 'train_*.bin'`: training data, never the validation set, which would leak into the score) or
sequences the model samples itself (`--calib-self N`: no data needed, what some Parameter Golf records do).

The model comes from the same loader verify uses (squeeze/verify/models.py). Any architecture works: squeeze/operands.py
finds every product whose weight is a parameter or a slice of one (nn.Linear, a tied head's F.linear, `bank[i]` of a
3-D parameter bank, x @ W.T), keyed by the checkpoint's names (`bank[i]` for slices), and records why a parameter
that never met a product in a usable way got none (`Calibration.skipped`).
"""
import re
import zlib
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from . import operands
from .errors import SqueezeError


@dataclass(frozen=True)
class Calibration:
    hessians: dict          # parameter or slice name ("blocks.0.attn.c_q.weight", "qo_bank[3]") -> float64 [in, in]
    sensitivities: dict     # parameter name -> loss increase per unit mean squared error (empty unless asked)
    sequences: int
    tokens: int
    source: str             # what the tokens were, for the log
    skipped: dict = field(default_factory=dict)  # parameter name -> why no product gave it a Hessian (operands.py)
    thin: dict = field(default_factory=dict)  # key -> (rows, columns): Hessians of fewer rows than columns
    # measured.EvenLoss on the sensitivities' batch (with sensitivities): the budget measures its coarse grids with it
    even_loss: object = field(default=None, compare=False, repr=False)

    def warnings(self) -> list:
        """One line when some Hessians are rank-deficient (_thin_warning)."""
        line = _thin_warning(self.thin)
        return [line] if line else []


def _thin_warning(thin: dict) -> str | None:
    """The warning for Hessians built from fewer rows than their matrix has columns: rank-deficient, so GPTQ can fit
    the calibration rows closely and do worse on other text (measured on a record-style fixture: a tied embedding
    calibrated on 64 rows of 256 columns scored 0.055x round-to-nearest's layer loss on those rows and was worse
    held-out). Not an error: damping keeps GPTQ defined."""
    if not thin:
        return None
    name, (rows, cols) = min(thin.items(), key=lambda kv: (kv[1][0] / kv[1][1], kv[0]))
    return (f"calibration: {len(thin)} Hessian(s) from fewer rows than their matrix has columns (fewest: {name}, "
            f"{rows:,} rows for {cols:,} columns); GPTQ may fit the calibration text and lose elsewhere: calibrate "
            f"on more tokens")


def windows_of(stream: torch.Tensor, seq_len: int, n_tokens: int) -> torch.Tensor:
    """Non-overlapping [n, seq_len] windows from the start of a token stream, about n_tokens tokens in all."""
    n = min(max(1, n_tokens // seq_len), (stream.numel()) // seq_len)
    if n == 0:
        raise SqueezeError(f"calibration stream holds {stream.numel()} tokens, fewer than one window of {seq_len}")
    return stream[: n * seq_len].reshape(n, seq_len).long()


@torch.no_grad()
def sample_sequences(model: nn.Module, n: int, seq_len: int, vocab: int, bos: int = 1, seed: int = 0,
                     device="cpu") -> torch.Tensor:
    """n sequences the model writes itself (temperature 1, from BOS), for calibration without data. Seeded, so
    compile stays deterministic."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    seqs = torch.full((n, 1), bos, dtype=torch.long, device=device)
    for _ in range(seq_len - 1):
        logits = model(seqs)[:, -1, :vocab].float().cpu()
        nxt = torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=g)
        seqs = torch.cat([seqs, nxt.to(device)], dim=1)
    return seqs


def checkpoint_parameters(model: nn.Module, names=None) -> dict:
    """{checkpoint name: the model's tensor} for every parameter (and buffer) of `model`.

    The model's own names are used where `names` (the checkpoint's, e.g. a state dict's keys) has them; a model that
    wraps the checkpoint's (its names carry a prefix, "model.blocks.0...", or lack one) is matched by the unique name
    that ends with the other, so Hessians are keyed by what the compiler sees. Tied parameters appear once, under the
    first name torch gives them."""
    own = dict(model.named_parameters())
    own.update((n, b) for n, b in model.named_buffers() if n not in own)
    if names is None:
        return own
    names = list(names)
    known = set(names)
    out = {}
    for n, p in own.items():
        if n not in known:
            fits = [k for k in names if n.endswith("." + k) or k.endswith("." + n)]
            if len(fits) != 1:
                continue
            n = fits[0]
        if n not in out:
            out[n] = p
    return out


class GramSums:
    """Running Σ x xᵀ (summed in float64, on the rows' device) and row counts per key, plus what could not be
    attributed; `all_reduce` sums them over the processes of a torch.distributed group, so each rank calibrates its
    own batches and all end with the Hessians of every rank's tokens."""

    def __init__(self):
        self.sums, self.counts, self.skipped = {}, {}, {}
        self._last = None  # (rows, their Gram): q, k and v of a block meet the same rows, one Gram serves all three

    def add(self, key: str, x: torch.Tensor):
        gram = self._gram(x)
        self.sums[key] = self.sums[key] + gram if key in self.sums else gram.clone()
        self.counts[key] = self.counts.get(key, 0) + x.shape[0]

    def _gram(self, x: torch.Tensor) -> torch.Tensor:
        """xᵀx as float64, reused when the rows are the very ones of the last call (same memory, shape, strides
        and version; the reference held to them keeps their memory from being reused meanwhile)."""
        last = self._last
        if last is not None:
            y = last[0]
            if (y.data_ptr() == x.data_ptr() and y.shape == x.shape and y.stride() == x.stride()
                    and y.dtype == x.dtype and y.device == x.device and y._version == x._version):
                return last[1]
        # One batch's Gram in float32 (half the time of float64 on a CPU, and a GPU's fast path), summed over
        # batches in float64: a batch's rows add up to ~1e-6 relative error at most, far inside GPTQ's 1% damping.
        # Never under the caller's autocast, which would make it a bf16 product (not even positive definite).
        x32 = x if x.dtype == torch.float64 else x.float()
        with torch.autocast(x.device.type, enabled=False):
            gram = (x32.T @ x32).double()
        self._last = (x, gram)
        return gram

    def skip(self, name: str, reason: str):
        self.skipped.setdefault(name, reason)

    def all_reduce(self):
        import torch.distributed as dist
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return
        shapes = [None] * dist.get_world_size()  # a rank whose batches never reached a layer still takes part
        dist.all_gather_object(shapes, {k: tuple(v.shape) for k, v in self.sums.items()})
        skipped = [None] * dist.get_world_size()
        dist.all_gather_object(skipped, self.skipped)
        device = next(iter(self.sums.values())).device if self.sums else collective_device()
        for key, shape in sorted({k: s for r in shapes for k, s in r.items()}.items()):
            total = self.sums.get(key, torch.zeros(shape, dtype=torch.float64, device=device))
            count = torch.tensor([self.counts.get(key, 0)], dtype=torch.float64, device=total.device)
            dist.all_reduce(total)
            dist.all_reduce(count)
            self.sums[key], self.counts[key] = total, int(count.item())
        for r in skipped:
            for name, reason in r.items():
                self.skipped.setdefault(name, reason)

    def thin(self) -> dict:
        """{key: (rows, columns)} of the Gram sums over fewer rows than columns."""
        return {k: (self.counts[k], v.shape[0]) for k, v in sorted(self.sums.items()) if self.counts[k] < v.shape[0]}

    def unattributed(self) -> dict:
        """{name: why}: the skips of names with no Hessian at all (a tied embedding is looked up, a skip, and used
        as the head, a Hessian: it keeps the Hessian and no skip)."""
        return {n: r for n, r in self.skipped.items() if not _has_any(self.sums, n)}

    def hessians(self) -> dict:
        """{key: mean x xᵀ}, its values rounded to float32 (kept as float64): sums of the same batches in another
        order (ranks adding their halves) differ in the last bits of a float64, and that must not change a code
        of the artifact. float32 keeps ~1e-7 of the Hessian, far inside GPTQ's 1% damping."""
        return {key: (self.sums[key] / self.counts[key]).float().double().cpu() for key in sorted(self.sums)}


def collective_device():
    """Where a collective's tensors must live: the current CUDA device under NCCL, else the CPU."""
    import torch.distributed as dist
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def tracking(model: nn.Module, sums: GramSums, names=None) -> operands.OperandTracker:
    """The operand tracker that adds every product's rows of `model`'s weights to `sums`."""
    return operands.OperandTracker(checkpoint_parameters(model, names), sums.add, sums.skip)


def collect_hessians(model: nn.Module, batches, device="cpu", forward=None, names=None,
                     progress: bool = False) -> tuple[dict, dict]:
    """({key: mean x xᵀ}, {parameter name: why it got no Hessian}) over every row each weight meets while the model
    runs on `batches`: nn.Linear, F.linear on any parameter (tied heads), slices of N-D parameters (`bank[i]`, key
    "bank[i]"), x @ W.T. A weight used several times per forward (loops) sums over its uses.

    `forward`: the callable that runs the model on a batch (default: the module itself); `names`: the checkpoint's
    tensor names, which the keys follow (squeeze.calibrate.checkpoint_parameters)."""
    sums = gram_sums(model, batches, device, forward, names, progress)
    return sums.hessians(), sums.unattributed()


@torch.no_grad()
def gram_sums(model: nn.Module, batches, device="cpu", forward=None, names=None, progress: bool = False) -> GramSums:
    """collect_hessians' sums, with their row counts."""
    from .verify.progress import ProgressBar

    sums = GramSums()
    run = forward or model
    batches = list(batches)
    bar = ProgressBar("calibrate", len(batches), enabled=progress, unit="batches")
    with tracking(model, sums, names):
        for batch in batches:
            run(batch.to(device))
            bar.advance(1)
    bar.close()
    return sums


def calibrate(model: nn.Module, tokens: torch.Tensor, batch_size: int = 8, device="cpu", source: str = "",
              sensitivity_names: list = (), forward=None, names=None, progress: bool = False,
              sensitivity_method: str = "fisher") -> Calibration:
    """Hessians of `model` on token windows `tokens` [n, seq_len]; sensitivities of `sensitivity_names` too (by
    `sensitivity_method`, on the first FISHER_SEQUENCES windows).
    `forward`: what turns a batch of ids into logits (default: the module); `names`: the checkpoint's tensor names
    (default: the model's own), which Hessians and sensitivities are keyed by."""
    from . import measured

    model = model.to(device).eval()
    batches = [tokens[i:i + batch_size] for i in range(0, tokens.shape[0], batch_size)]
    sums = gram_sums(model, batches, device, forward=forward, names=names, progress=progress)
    hessians, skipped = sums.hessians(), sums.unattributed()
    if not hessians:
        raise SqueezeError("calibration: the forward multiplied by none of the model's parameters (no nn.Linear, "
                           "F.linear or matmul on a weight), so GPTQ has nothing to work on")
    probe = tokens[: max(1, min(tokens.shape[0], FISHER_SEQUENCES))]  # a fixed batch: the same for every tensor
    sens = sensitivities(model, probe, list(sensitivity_names), device=device, forward=forward,
                         checkpoint_names=names, progress=progress,
                         method=sensitivity_method) if sensitivity_names else {}
    even = measured.of_logits(model, forward or model, probe, names, device) if sensitivity_names else None
    return Calibration(hessians=hessians, sensitivities=sens, sequences=tokens.shape[0], tokens=tokens.numel(),
                       source=source, skipped=skipped, thin=sums.thin(), even_loss=even)


def _has_any(hessians: dict, name: str) -> bool:
    """Whether `name` or one of its slices got a Hessian (a skip elsewhere does not undo those)."""
    return name in hessians or any(k.startswith(name + "[") for k in hessians)


def matrix_names(state_dict: dict) -> list:
    """What a budget needs sensitivities for: every 2-D float tensor, and each matrix slice of an N-D one (the
    stack pass's naming, squeeze/passes/stack.py)."""
    from .passes import stack

    out = []
    for name, t in state_dict.items():
        if not t.is_floating_point():
            continue
        if t.dim() == 2:
            out.append(name)
        elif stack.is_stack(t.shape):
            out.extend(stack.slice_names(name, t.shape))
    return out


def calibration_for(state_dict: dict, *, calib: str | None = None, calib_self: int = 0, model: str = "pgolf",
                    model_config=None, seq_len: int = 1024, n_tokens: int = 131072, batch_size: int = 8,
                    device: str | None = None, seed: int = 0, with_sensitivities: bool = False,
                    forward: str | None = None, sensitivity_names=None, progress: bool = False,
                    sensitivity_method: str = "fisher") -> Calibration:
    """What `squeeze compile --calib/--calib-self` runs: the model (as verify loads it) and its Hessians on
    ~n_tokens calibration tokens from the shards matching `calib`, or on `calib_self` sequences it samples.
    `forward`: the name of the model's method that returns logits (verify's --forward). With `with_sensitivities`,
    sensitivities of `sensitivity_names` (default: every matrix, `matrix_names`); `progress`: bars on a terminal."""
    from .verify import models
    from .verify.stream import load_stream

    if (calib is None) == (not calib_self):
        raise SqueezeError("calibration: give either --calib SHARDS or --calib-self N, not both or neither")
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    config = models.load_model_config(model_config) if isinstance(model_config, str) else dict(model_config or {})
    net = models.resolve(model, config, "--model-config")(state_dict, "checkpoint").to(device).eval()
    run = models.logits_fn(net, forward, model)
    vocab = models.vocab_of(run, torch.device(device), model)
    if calib is not None:
        tokens = windows_of(load_stream(calib, vocab, n_tokens), seq_len, n_tokens)
        source = f"{tokens.numel():,} tokens of {calib}"
    else:
        tokens = sample_sequences(run, calib_self, seq_len, vocab, seed=seed, device=device).cpu()
        source = f"{calib_self} sequences of {seq_len} tokens sampled from the model"
    probed = (matrix_names(state_dict) if sensitivity_names is None else list(sensitivity_names)) \
        if with_sensitivities else []
    return calibrate(net, tokens, batch_size=batch_size, device=device, source=source, sensitivity_names=probed,
                     forward=run, names=list(state_dict), progress=progress, sensitivity_method=sensitivity_method)


PROBE_NOISE = 0.25  # relative std of the probe's noise: about what int3-int4 does to a weight
SENSITIVITY_METHODS = ("fisher", "probe")
FISHER_SEQUENCES = 16  # sequences of the fixed batch both methods measure on


def fisher(params: dict, names: list, units, logits_of, seed: int = 0, progress=None) -> dict:
    """{name: ½·tr F} (unfloored) for each of `names` (params' keys or their slices `p[i]`): the trace of the Fisher
    information of the model's next-token distributions over the weights of that tensor, per token, from one
    backward pass per unit of `units` (`logits_of(unit)` -> logits [..., vocab]).

    Why it is the probe's figure: noise of variance v on a tensor raises the loss by ½·v·tr(∇²L) on average, and for
    a cross-entropy the expected Hessian is the Fisher F = E_y[∇ℓ(y) ∇ℓ(y)ᵀ] over labels y drawn from the model's
    own distribution (the Gauss-Newton matrix: positive, so no floor is needed where the loss is bent). Drawing one
    label per token and taking ‖∇ Σ_t ℓ_t‖² estimates Σ_t tr F_t without bias: the cross terms of two tokens
    vanish in expectation, each label being drawn independently given the forward. Gradients are taken with
    torch.autograd.grad: the model's `.grad` fields are never touched."""
    return fisher_total(fisher_terms(params, names, units, logits_of, seed, progress))


@dataclass
class FisherTerms:
    """Each unit's ‖∇‖² per tensor (`squares[u, j]` for `names[j]`) and its token count: what ranks gather, so that
    the total is the same however the units were dealt (`fisher_total` sums them in a canonical order)."""
    names: list
    squares: np.ndarray  # float64 [units, names]
    tokens: np.ndarray   # int64 [units]

    @staticmethod
    def joined(parts: list) -> "FisherTerms":
        """One FisherTerms of every unit of `parts` (each rank's terms, the same names)."""
        if any(p.names != parts[0].names for p in parts):
            raise SqueezeError("sensitivities: ranks measured different tensors")
        return FisherTerms(parts[0].names, np.concatenate([p.squares for p in parts]),
                           np.concatenate([p.tokens for p in parts]))


def fisher_terms(params: dict, names: list, units, logits_of, seed: int = 0, progress=None) -> FisherTerms:
    """`fisher`'s per-unit terms. Each unit draws its labels from a CPU generator seeded by `seed` and the unit's own
    contents, so a unit's term does not depend on which units came before it (nor on which rank measured it), and
    compile stays deterministic."""
    slots, leaves = {}, {}  # name -> (parameter key, slice index or None); parameter key -> tensor
    for name in names:
        key, index = name, None
        if name not in params:
            m = re.fullmatch(r"(.+)\[(\d+)\]", name)
            p = params.get(m.group(1)) if m else None
            if p is None or p.dim() < 3 or int(m.group(2)) >= p.shape[:-2].numel():
                continue
            key, index = m.group(1), int(m.group(2))
        if params[key].is_floating_point():
            slots[name] = (key, index)
            leaves[key] = params[key]
    keys = sorted(leaves)
    was = {k: leaves[k].requires_grad for k in keys}
    rows, tokens = [], []
    try:
        for k in keys:
            leaves[k].requires_grad_(True)
        for unit in units:
            g = torch.Generator(device="cpu").manual_seed(_unit_seed(seed, unit))
            with torch.enable_grad():
                logits = logits_of(unit).float()
                logits = logits.reshape(-1, logits.shape[-1])
                probs = torch.softmax(logits.detach(), dim=-1).cpu()
                labels = torch.multinomial(probs, 1, generator=g).squeeze(1).to(logits.device)
                loss = nn.functional.cross_entropy(logits, labels, reduction="sum")
                grads = torch.autograd.grad(loss, [leaves[k] for k in keys], allow_unused=True)
            squares = {}
            for k, grad in zip(keys, grads):
                if grad is not None:
                    sq = grad.detach().double().square()
                    per_slice = sq.reshape(-1, *sq.shape[-2:]).sum((1, 2)) if sq.dim() >= 3 else sq.sum().reshape(1)
                    squares[k] = per_slice.cpu()
            rows.append([float(squares[key][index or 0]) if key in squares else 0.0
                         for key, index in slots.values()])
            tokens.append(logits.shape[0])
            if progress is not None:
                progress(1)
    finally:
        for k in keys:
            leaves[k].requires_grad_(was[k])
    return FisherTerms(list(slots), np.array(rows, dtype=np.float64).reshape(len(rows), len(slots)),
                       np.array(tokens, dtype=np.int64))


def fisher_total(terms: FisherTerms) -> dict:
    """{name: ½·Σ‖∇‖² / Σ tokens} over all units, summed in the order of the sorted rows: the same bits whatever
    order the units arrived in (floating-point sums are not associative)."""
    total = int(terms.tokens.sum())
    if total == 0:
        raise SqueezeError("sensitivities: no calibration tokens to measure them on")
    squares = terms.squares[np.lexsort(terms.squares.T[::-1])] if len(terms.squares) else terms.squares
    sums = squares.sum(axis=0)
    return {name: 0.5 * float(sums[j]) / total for j, name in enumerate(terms.names)}


def _unit_seed(seed: int, unit) -> int:
    """A label seed from `seed` and the unit's bytes (a tensor, or a tuple/list of them)."""
    crc = zlib.crc32(seed.to_bytes(8, "little", signed=True))
    for t in unit if isinstance(unit, (tuple, list)) else (unit,):
        if isinstance(t, torch.Tensor):
            crc = zlib.crc32(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes(), crc)
    return crc


def rows_of(batch) -> list:
    """A batch (a tensor [B, ...] or a tuple of them) as B one-row batches: the Fisher's units."""
    if isinstance(batch, (tuple, list)):
        return [type(batch)(b[i:i + 1] for b in batch) for i in range(len(batch[0]))]
    return [batch[i:i + 1] for i in range(batch.shape[0])]


def sensitivities(model: nn.Module, tokens: torch.Tensor, names: list, noise: float = PROBE_NOISE,
                  device="cpu", forward=None, checkpoint_names=None, progress: bool = False,
                  method: str = "fisher") -> dict:
    """{parameter or slice name: loss increase per unit of added weight-noise variance}, measured on `tokens`
    [n, T+1]. `name[i]` is slice i of an N-D parameter (its leading dims flattened).

    method "fisher" (the default): ½·tr F per token from one backward pass per sequence (`fisher`), the expected
    curvature the probe measures along its noise, for all tensors at once: about 3 forwards per sequence instead
    of 2 per tensor. method "probe": each tensor gets zero-mean Gaussian noise of std noise·std(tensor), added and
    then subtracted (an antithetic pair cancels the first-order term exactly), so ΔL ≈ ½·tr(∇²L)·σ². Either way a
    quantization error of mean square m costs about sensitivity·m: the budget allocator's exchange rate between
    bytes and loss. It does not extrapolate past the probe's noise (the allocator offers no grid with more error
    than that). Small probes drown in the loss's own nonlinearity, and a tensor that measures nothing (≤ 0) is
    floored at 1% of the median, so no tensor looks free.
    """
    if method not in SENSITIVITY_METHODS:
        raise SqueezeError(f"sensitivities: method {method!r}: expected one of {', '.join(SENSITIVITY_METHODS)}")
    model = model.to(device).eval()
    run = forward or model
    params = checkpoint_parameters(model, checkpoint_names)
    from .verify.progress import ProgressBar

    if method == "fisher":
        bar = ProgressBar("sensitivities", tokens.shape[0], enabled=progress, unit="sequences")
        raw = fisher(params, names, [t[:, :-1].to(device) for t in rows_of(tokens)], run, progress=bar.advance)
        bar.close()
        return floored(raw)
    with torch.no_grad():
        return _probed(params, run, tokens.to(device), names, noise, progress)


def _probed(params, run, tokens, names, noise, progress) -> dict:
    """The probe method of `sensitivities` on the fixed batch `tokens`."""
    from .verify.progress import ProgressBar

    x, y = tokens[:, :-1], tokens[:, 1:]

    def loss() -> float:
        logits = run(x)
        return float(nn.functional.cross_entropy(logits.float().flatten(0, 1), y.flatten()))

    bar = ProgressBar("probe", len(names), enabled=progress, unit="tensors")
    raw = probe(params, names, loss, noise, progress=bar.advance)
    bar.close()
    return floored(raw)


@torch.no_grad()
def probe(params: dict, names: list, loss, noise: float = PROBE_NOISE, progress=None) -> dict:
    """{name: ΔL per unit noise variance} (unfloored) of each of `names` (params' keys or their slices `p[i]`),
    `loss()` being the model's loss on a fixed batch. `progress(n)`: called after each tensor."""
    base = loss()
    g = torch.Generator(device="cpu").manual_seed(0)
    out = {}
    for name in names:
        p = tensor_of(params, name)
        if p is None:
            continue
        sigma = noise * float(p.detach().float().std())
        if sigma == 0:
            out[name] = 0.0
            continue
        delta = (torch.randn(p.shape, generator=g) * sigma).to(p.device, p.dtype)
        total, saved = 0.0, p.clone()
        for sign in (1, -1):
            p.add_(sign * delta)
            total += loss() - base
            p.copy_(saved)  # exactly the trained values again (adding and subtracting can round)
        out[name] = max(total / 2, 0.0) / sigma ** 2  # ΔL per unit of mean squared error of the tensor
        if progress is not None:
            progress(1)
    return out


def floored(raw: dict) -> dict:
    """A probe that measured nothing (≤ 0) becomes 1% of the median, so no tensor looks free."""
    positive = sorted(v for v in raw.values() if v > 0)
    floor = 0.01 * positive[len(positive) // 2] if positive else 0.0
    return {name: max(v, floor) for name, v in raw.items()}


def tensor_of(params: dict, name: str):
    """The parameter `name`, or for `bank[i]` a view of slice i of parameter `bank` (in-place edits reach it)."""
    if name in params:
        return params[name].data
    m = re.fullmatch(r"(.+)\[(\d+)\]", name)
    p = params.get(m.group(1)) if m else None
    if p is None or p.dim() < 3 or int(m.group(2)) >= p.shape[:-2].numel():
        return None
    return p.data.view(-1, *p.shape[-2:])[int(m.group(2))]
