"""gptq: choose each quantized matrix's codes with GPTQ, on the grid its scales already define.

Round-to-nearest rounds every weight on its own. GPTQ (Frantar et al., 2022) rounds one input column at a time and
spreads the rounding error over the columns not yet rounded, weighted by the layer's input Hessian H = E[x xᵀ]
(squeeze/calibrate.py), so that the layer's *outputs* on real inputs move least. The scales come from the quantize
pass (the recipe's clip rule) and stay as they are: only codes change, so the format, the loader and the decoders are
untouched, and any grid the recipe defines (bits, per-row or per-group scales, any clip) works.

Per tensor the pass keeps whichever of GPTQ and round-to-nearest has the smaller layer loss tr(ΔW H ΔWᵀ), so it is
never worse than round-to-nearest on the calibration data; the note on each entry says by how much it was better.
"""
import dataclasses
from dataclasses import dataclass, field

import torch

from .. import parallel, quant
from ..errors import SqueezeError
from ..state import State


@dataclass(frozen=True)
class GPTQConfig:
    block_size: int = 128
    damp: float = 0.01
    act_order: bool = True
    device: str = "cpu"     # where the float64 work runs (compile's --device: cuda makes it seconds, not minutes)
    # (tensor, grid, config) -> (codes, method, note) already computed: a budget compile (squeeze/budget.py) fills it
    # while pricing grids and shares it across its rounds, so no grid is refined twice. Not part of the config's
    # identity (compare=False): it only saves work.
    memo: dict | None = field(default=None, compare=False, repr=False)

    @staticmethod
    def from_recipe(recipe, device: str = "cpu") -> "GPTQConfig":
        """The recipe's [gptq] table, computing on `device`."""
        g = recipe.gptq
        return GPTQConfig(block_size=g.block_size, damp=g.damp, act_order=g.act_order, device=device)


def layer_loss(w: torch.Tensor, w_hat: torch.Tensor, hessian: torch.Tensor) -> float:
    """tr((W − Ŵ) H (W − Ŵ)ᵀ): the summed squared change of the layer's outputs over the calibration inputs. The
    product in float32 (~1e-6 relative; GPTQ and round-to-nearest differ by far more), the sum in float64."""
    delta = (w - w_hat).float()
    return float(((delta @ hessian.float()) * delta).sum(dtype=torch.float64))


SUB = 16  # columns rounded one by one between two products (see gptq_codes)


@dataclass(frozen=True)
class RateTerm:
    """Rate-aware rounding (RDOQ, as DeepCABAC/NNCodec do): each weight's code is the one of {floor, ceil, 0} with
    the least distortion + lam × code length, instead of the nearest. Distortion is GPTQ's own: the layer loss the
    choice adds once the later columns compensate it, ((w − q·s) / U_ii)²; the code length of code c is
    `code_bits[c + qmax]` (bits, e.g. −log2 of its frequency in the plain GPTQ codes). lam: layer loss per bit.
    Measured by bench/rdoq.py (BENCHMARKS.md): 0.2% fewer bytes at equal layer loss near 3.5 bits/weight, so the
    allocator does not offer it."""
    code_bits: torch.Tensor  # [2·qmax + 1]
    lam: float


def gptq_codes(w: torch.Tensor, scale_full: torch.Tensor, qmax, hessian: torch.Tensor,
               config: GPTQConfig = GPTQConfig(), rate: RateTerm | None = None) -> torch.Tensor:
    """Codes [R, C] (int8) for weights w [R, C] on the fixed grid scale_full [R, C] (each weight's scale); `qmax` an
    int or one per row [R]. Rows are independent given H, so several grids of one tensor (or tensors sharing a
    Hessian) go through one call as stacked rows: the per-column loop is paid once. `rate`: rate-aware rounding
    (RateTerm; one int qmax)."""
    if rate is not None:
        if isinstance(qmax, torch.Tensor) or rate.code_bits.numel() != 2 * qmax + 1:
            raise SqueezeError(f"gptq: a rate term needs one int qmax and 2·qmax + 1 code lengths, got qmax {qmax} "
                               f"and {rate.code_bits.numel()}")
        code_bits = rate.code_bits.to(config.device, torch.float64)
    if isinstance(qmax, torch.Tensor):
        qmax = qmax.to(config.device, torch.float64)
    w = w.to(config.device, torch.float64, copy=True)
    h = hessian.to(config.device, torch.float64, copy=True)
    scale = scale_full.to(config.device, torch.float64)
    cols = w.shape[1]
    dead = torch.diag(h) == 0          # inputs that are always zero: any code works, choose 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    perm = (torch.argsort(torch.diag(h), descending=True, stable=True) if config.act_order
            else torch.arange(cols, device=h.device))
    h = h[perm][:, perm]
    # Columns of W are rows here ([C, R], contiguous): each step reads and updates whole rows, not strided columns.
    w_t, scale_t = w[:, perm].T.contiguous(), scale[:, perm].T.contiguous()
    h += config.damp * torch.mean(torch.diag(h)) * torch.eye(cols, dtype=h.dtype, device=h.device)
    # The upper Cholesky factor of H⁻¹ holds, row by row, how an error in one column is best compensated by the next.
    h_inv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    codes_t = torch.zeros_like(w_t)
    for a in range(0, cols, config.block_size):
        b = min(a + config.block_size, cols)
        block, errors, h_block = w_t[a:b].clone(), torch.empty_like(w_t[a:b]), h_inv[a:b, a:b]
        # Within a block, columns are rounded in runs of SUB: one column's error reaches the rest of its run at
        # once (rank-1 updates on SUB columns, not on the block's remaining ones), and a finished run's errors
        # reach the block's later columns in one product, as the block's reach the later blocks. The same
        # arithmetic as GPTQ's column-by-column updates, summed in another order.
        for s in range(0, b - a, SUB):
            e = min(s + SUB, b - a)
            for i in range(s, e):
                if rate is None:
                    q = torch.clamp(torch.round(block[i] / scale_t[a + i]), -qmax, qmax)  # qmax: int or [R]
                else:
                    q = _rate_aware(block[i], scale_t[a + i], h_block[i, i], qmax, code_bits, rate.lam)
                codes_t[a + i] = q
                err = (block[i] - q * scale_t[a + i]) / h_block[i, i]
                block[i + 1:e] -= h_block[i, i + 1:e, None] * err[None, :]
                errors[i] = err
            block[e:] -= h_block[s:e, e:].T @ errors[s:e]
        w_t[b:] -= h_inv[a:b, b:].T @ errors
    codes = codes_t.T
    return codes[:, torch.argsort(perm)].to("cpu", torch.int8)


def _rate_aware(w: torch.Tensor, scale: torch.Tensor, u: torch.Tensor, qmax: int, code_bits: torch.Tensor,
                lam: float) -> torch.Tensor:
    """One column's codes under a RateTerm: the cheapest of floor, ceil and 0 in distortion + lam × bits."""
    x = w / scale
    low = torch.clamp(torch.floor(x), -qmax, qmax)
    candidates = torch.stack([low, torch.clamp(low + 1, -qmax, qmax), torch.zeros_like(low)])
    cost = ((w - candidates * scale) / u).square() + lam * code_bits[(candidates + qmax).long()]
    return candidates.gather(0, cost.argmin(0, keepdim=True))[0]


def refine(e, hessian: torch.Tensor, config: GPTQConfig):
    """The entry with GPTQ codes if they lower the layer loss, else unchanged; its note says which and by how much."""
    codes, method, note = refined_codes(e.tensor, e.plan.quant, e.codes, e.scales, hessian, config)
    return dataclasses.replace(e, codes=codes, method_used=method, note=note)


def refined_codes(tensor: torch.Tensor, spec, rtn_codes: torch.Tensor, scales: torch.Tensor, hessian: torch.Tensor,
                  config: GPTQConfig, codes: torch.Tensor | None = None) -> tuple:
    """(codes, method, note): GPTQ's codes on the grid of `scales` where they lower the layer loss, else the
    round-to-nearest ones. `codes`: GPTQ's, when already computed (the budget's batched pricing)."""
    return refined_with_loss(tensor, spec, rtn_codes, scales, hessian, config, codes)[:3]


def refined_with_loss(tensor: torch.Tensor, spec, rtn_codes: torch.Tensor, scales: torch.Tensor,
                      hessian: torch.Tensor, config: GPTQConfig, codes: torch.Tensor | None = None) -> tuple:
    """refined_codes' (codes, method, note) and the layer loss of the codes it keeps (the budget's price)."""
    rows, cols = quant.matrix_shape(tensor.shape)
    w = tensor.detach().reshape(rows, cols).float()
    scale_full = quant.expand_scales(scales.reshape(rows, -1), spec.group, cols).expand(rows, cols)
    rtn_loss = layer_loss(w, rtn_codes.float() * scale_full, hessian)
    if codes is None:
        codes = gptq_codes(w, scale_full, spec.qmax, hessian, config)
    gptq_loss = layer_loss(w, codes.float() * scale_full, hessian)
    if gptq_loss >= rtn_loss:
        return rtn_codes, "rtn", f"round-to-nearest: GPTQ was not better on the layer loss ({gptq_loss:.4g} ≥ " \
                                 f"{rtn_loss:.4g})", rtn_loss
    return codes, "gptq", f"gptq: layer loss {gptq_loss / rtn_loss:.3f}× round-to-nearest", gptq_loss


def run(state: State, config: GPTQConfig = GPTQConfig()) -> State:
    wanted = [e.name for e in state.entries
              if e.plan is not None and e.plan.scheme == "int" and e.plan.method == "gptq"]
    if wanted and not state.hessians:
        raise SqueezeError(f"{wanted[0]}: the recipe asks for GPTQ but compile has no calibration data "
                           f"(pass --calib 'train_*.bin' or --calib-self N)")
    hessians, refined = {}, {}
    for e in state.entries:
        if e.name in wanted:
            h, why = state.hessian_of(e)
            if h is not None:
                hessians[e.name] = h
            elif state.strict_calib:
                raise SqueezeError(f"{e.name}: {why} (--strict-calib)")
            else:
                refined[e.name] = dataclasses.replace(e, method_used="rtn", note=f"round-to-nearest: {why}")
    # A budget compile re-runs this pass every round on grids it priced: its memo (one per budget compile, so the
    # tensor and its Hessian are fixed) holds each (tensor, grid)'s result.
    memo = config.memo if config.memo is not None else {}
    key = {e.name: memo_key(e.name, e.plan.quant, config) for e in state.entries if e.name in hessians}
    todo = [e for e in state.entries if e.name in hessians and key[e.name] not in memo]
    # under torchrun each rank runs GPTQ on its share of the matrices and all gather the codes
    results = parallel.map_items(lambda e: _refined_codes(e, hessians[e.name], config), todo)
    memo.update((key[e.name], r) for e, r in zip(todo, results))
    for e in state.entries:
        if e.name in hessians:
            codes, method, note = memo[key[e.name]]
            refined[e.name] = dataclasses.replace(e, codes=codes, method_used=method, note=note)
    return dataclasses.replace(state, entries=tuple(refined.get(e.name, e) for e in state.entries))


def _refined_codes(e, hessian: torch.Tensor, config: GPTQConfig) -> tuple:
    """(codes, method, note) of `refine`: what a rank sends the others (not the whole entry and its tensor)."""
    return refined_codes(e.tensor, e.plan.quant, e.codes, e.scales, hessian, config)


def memo_key(name: str, spec, config: GPTQConfig) -> tuple:
    """What a GPTQ result depends on within one compile: the tensor, its grid, the GPTQ knobs."""
    return name, spec, config
