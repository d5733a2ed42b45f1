"""measured: the even part of the loss change a tensor's quantization error makes, measured on calibration text.

The budget allocator prices a grid with a quadratic model: the tensor's sensitivity (½·tr F per token,
squeeze/calibrate.py) × the output-weighted error tr(E H Eᵀ)/(R·tr H). On the benchmark checkpoints that model holds
within ~1.2× for every grid but the coarsest on the inputs of a squared ReLU: there int2 (+ a rank-1 correction)
cost 11.6× its prediction on the 04-27 layout and 5.3× on the baseline one, and white noise of the same size only
~3× (BENCHMARKS.md, issue 15; bench/coarse_noise.py). At int2's errors the loss is far from quadratic, and how far
depends on the error's own pattern, so no factor fitted on noise prices it. The budget measures instead, before it
keeps a coarse grid (squeeze/budget.py), that grid's own error E as it will be stored:

    ΔL_even(E) = [L(W + E) + L(W − E)] / 2 − L(W)      (nats per token, on a fixed calibration batch)

The antithetic pair cancels every odd-order term, the gradient's g·E above all: a small, imperfectly trained model's
g is not zero, its sign against one error pattern is a coin toss, and it would make one batch's figure rank nothing
(BENCHMARKS.md, "the even part of the drift"). What is left is what the quadratic model means to predict.

Under torch.distributed each rank measures its own units and the per-unit terms are gathered and summed in a
canonical order (calibrate.fisher_total's way), so N ranks get the bits one process gets on the same units.
"""
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from . import calibrate, parallel
from .errors import SqueezeError


@dataclass(eq=False)  # compared by identity: it holds the model's tensors
class EvenLoss:
    """Measures ΔL_even of weight errors on `units` (this rank's calibration batches), `loss_of(unit)` giving the
    model's (summed cross-entropy in nats, tokens) on one. `params`: the model's tensors by checkpoint name
    (calibrate.checkpoint_parameters); they are changed in place while a unit runs and restored bit for bit."""
    params: dict
    units: list
    loss_of: Callable
    seconds: float = 0.0        # spent measuring, for the log
    calls: int = 0              # errors measured
    _base: list = field(default=None, repr=False)  # loss_of of each unit at the trained weights

    def __call__(self, errors: dict) -> dict:
        """{name: ΔL_even per token} for `errors` {name: [(tensor name, E), ...]}: each name's errors are applied
        together (a tensor, then its aliases: copies of it the model may also use), E shaped like its tensor. A
        tensor name is a checkpoint name or `bank[i]`, slice i of an N-D one."""
        t0 = time.perf_counter()
        names = sorted(errors)
        with torch.no_grad():
            if self._base is None:
                self._base = [self.loss_of(u) for u in self.units]
            rows = [[0.0] * len(names) for _ in self.units]
            for j, name in enumerate(names):
                targets = self._targets(errors[name])
                saved = [view.clone() for view, _ in targets]
                try:
                    for sign in (1.0, -1.0):
                        for (view, e), s in zip(targets, saved):
                            view.copy_((s.float() + sign * e.to(s.device).reshape(s.shape).float()).to(s.dtype))
                        for u, unit in enumerate(self.units):
                            rows[u][j] += self.loss_of(unit)[0]
                finally:
                    for (view, _), s in zip(targets, saved):
                        view.copy_(s)  # exactly the trained values again
                for u in range(len(self.units)):
                    rows[u][j] -= 2 * self._base[u][0]
        terms = calibrate.FisherTerms(names, np.array(rows, dtype=np.float64).reshape(len(self.units), len(names)),
                                      np.array([b[1] for b in self._base], dtype=np.int64))
        out = calibrate.fisher_total(calibrate.FisherTerms.joined(parallel.gather(terms)))  # ½·Σ terms / Σ tokens
        self.seconds += time.perf_counter() - t0
        self.calls += len(names)
        return out

    def _targets(self, pairs: list) -> list:
        """[(the model's tensor, E)] of `pairs`: the first must exist; a later one (an alias of the first, which a
        model may hold as a separate copy) is skipped where the model lacks it or it is the first's own memory."""
        out = []
        for i, (name, e) in enumerate(pairs):
            view = calibrate.tensor_of(self.params, name)
            if view is None and i == 0:
                raise SqueezeError(f"{name}: the calibration model has no such tensor to measure a grid's loss on")
            if view is not None and not any(v.data_ptr() == view.data_ptr() for v, _ in out):
                out.append((view, e))
        return out


def of_logits(model: torch.nn.Module, run: Callable, tokens: torch.Tensor, names=None, device="cpu") -> EvenLoss:
    """EvenLoss of a model whose `run(ids)` returns logits [B, T, V], on the token windows `tokens` [n, T+1] (one
    unit: they run as one batch)."""
    tokens = tokens.to(device)

    def loss_of(unit):
        x, y = unit[:, :-1], unit[:, 1:]
        logits = run(x).double()  # a float32 sum over the batch would round at ~1e-7 of it: the effect is ~1e-5
        return float(torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum")), y.numel()

    return EvenLoss(calibrate.checkpoint_parameters(model, names), [tokens], loss_of)
