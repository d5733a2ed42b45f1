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
from dataclasses import dataclass

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

    @staticmethod
    def from_recipe(recipe, device: str = "cpu") -> "GPTQConfig":
        """The recipe's [gptq] table, computing on `device`."""
        g = recipe.gptq
        return GPTQConfig(block_size=g.block_size, damp=g.damp, act_order=g.act_order, device=device)


def layer_loss(w: torch.Tensor, w_hat: torch.Tensor, hessian: torch.Tensor) -> float:
    """tr((W − Ŵ) H (W − Ŵ)ᵀ): the summed squared change of the layer's outputs over the calibration inputs."""
    delta = (w - w_hat).double()
    return float(((delta @ hessian.double()) * delta).sum())


def gptq_codes(w: torch.Tensor, scale_full: torch.Tensor, qmax: int, hessian: torch.Tensor,
               config: GPTQConfig = GPTQConfig()) -> torch.Tensor:
    """Codes [R, C] (int8) for weights w [R, C] on the fixed grid scale_full [R, C] (each weight's scale)."""
    w = w.to(config.device, torch.float64, copy=True)
    h = hessian.to(config.device, torch.float64, copy=True)
    scale = scale_full.to(config.device, torch.float64)
    cols = w.shape[1]
    dead = torch.diag(h) == 0          # inputs that are always zero: any code works, choose 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    perm = (torch.argsort(torch.diag(h), descending=True, stable=True) if config.act_order
            else torch.arange(cols, device=h.device))
    w, h, scale = w[:, perm], h[perm][:, perm], scale[:, perm]
    h += config.damp * torch.mean(torch.diag(h)) * torch.eye(cols, dtype=h.dtype, device=h.device)
    # The upper Cholesky factor of H⁻¹ holds, row by row, how an error in one column is best compensated by the next.
    h_inv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    codes = torch.zeros_like(w)
    for a in range(0, cols, config.block_size):
        b = min(a + config.block_size, cols)
        block, errors, h_block = w[:, a:b].clone(), torch.zeros_like(w[:, a:b]), h_inv[a:b, a:b]
        for i in range(b - a):
            q = torch.clamp(torch.round(block[:, i] / scale[:, a + i]), -qmax, qmax)
            codes[:, a + i] = q
            err = (block[:, i] - q * scale[:, a + i]) / h_block[i, i]
            block[:, i:] -= err[:, None] * h_block[i, i:][None, :]
            errors[:, i] = err
        w[:, b:] -= errors @ h_inv[a:b, b:]
    return codes[:, torch.argsort(perm)].to("cpu", torch.int8)


def refine(e, hessian: torch.Tensor, config: GPTQConfig):
    """The entry with GPTQ codes if they lower the layer loss, else unchanged; its note says which and by how much."""
    spec = e.plan.quant
    rows, cols = quant.matrix_shape(e.shape)
    w = e.tensor.detach().reshape(rows, cols).float()
    scale_full = quant.expand_scales(e.scales.reshape(rows, -1), spec.group, cols).expand(rows, cols)
    rtn_loss = layer_loss(w, e.codes.float() * scale_full, hessian)
    codes = gptq_codes(w, scale_full, spec.qmax, hessian, config)
    gptq_loss = layer_loss(w, codes.float() * scale_full, hessian)
    if gptq_loss >= rtn_loss:
        return dataclasses.replace(e, method_used="rtn", note=f"round-to-nearest: GPTQ was not better on the layer "
                                                               f"loss ({gptq_loss:.4g} ≥ {rtn_loss:.4g})")
    return dataclasses.replace(e, codes=codes, method_used="gptq",
                               note=f"gptq: layer loss {gptq_loss / rtn_loss:.3f}× round-to-nearest")


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
    # A budget compile re-runs this pass every round on mostly the same grids: its memo (State.gptq_memo, one per
    # compile_to_budget call, so the tensor and its Hessian are fixed) keeps each (tensor, grid)'s result.
    memo = state.gptq_memo if state.gptq_memo is not None else {}
    key = {e.name: (e.name, e.plan.quant, config) for e in state.entries if e.name in hessians}
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
    r = refine(e, hessian, config)
    return r.codes, r.method_used, r.note
