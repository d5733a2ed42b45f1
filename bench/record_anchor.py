"""The top record's export (2026-04-27 SP8192_LQER, brotli form), re-implemented as an anchor for the benches
(issue 15). Facts from ../shared/research/pgolf-quant.md §3 (read off the record's train_gpt.py and logs):

- GPTQ on every matrix, per-row scales k·std(row)/qmax from the unquantized row: int6 k = 13 attention, int6
  k = 11.5 MLP, int7 k = 14 tied embedding (its Hessian: the final-norm output's Gram); act-order, 1% damping,
  128-column blocks. squeeze's gptq pass does the same arithmetic, so a recipe expresses it (`recipe`).
- LQER: of the GPTQ matrices, the 3 with the largest ‖W − Ŵ‖_F get a rank-4 correction A·B from the SVD of the
  error (A = U_r·S_r, B = V_rᵀ); A is stored int2 in [−2, 1] with one fp16 scale max|A|/1.5, B int4 in [−8, 7]
  with one fp16 scale per 64 consecutive elements (max|group|/7.5). squeeze's format has no int2/int4 factors, so
  `lqer` computes them here: the corrected weights go into a float artifact for `verify` to score, and the
  factors' bytes are counted packed (2 and 4 bits per value plus fp16 scales: what they take before compression;
  the record then brotli-compresses them with the rest, which this bench does not measure).
- Compressor: brotli-11 with a 16 MB window on every section (the record's PR #1851 family; the lrzip
  per-group form saves ~1.8% more there, at 75 s of serialize time, and is not re-implemented).
"""
import re

import torch

import squeeze
from squeeze import quant
from squeeze.recipe import parse

LQER_RANK, LQER_TOP = 4, 3


def recipe(small_float: str, attn_k: float = 13.0, mlp_k: float = 11.5, emb_k: float = 14.0,
           emb_bits: int = 7) -> str:
    """The record's quantizer as a squeeze recipe (no LQER: see `lqer`). `small_float`: the [keep_float] table."""
    return (f'[defaults]\nbits = 6\nclip = "std"\nclip_std_k = {mlp_k}\nmethod = "gptq"\n' + small_float +
            '[encode]\ncodec = "brotli"\nbrotli_quality = 11\nbrotli_window = 24\n'
            f'[[rules]]\nmatch = "tok_emb.weight"\nbits = {emb_bits}\nclip_std_k = {emb_k}\nmethod = "gptq"\n'
            f'[[rules]]\nmatch = "*"\nrole = "attention"\nclip_std_k = {attn_k}\n')


def _int2_per_matrix(a: torch.Tensor) -> tuple[torch.Tensor, int]:
    """A in int2 [−2, 1] with one fp16 scale max|A|/1.5: (dequantized A, packed bytes)."""
    scale = torch.tensor(float(a.abs().max()) / 1.5).half().float()
    q = torch.clamp(torch.round(a / scale), -2, 1) if scale > 0 else torch.zeros_like(a)
    return q * scale, (a.numel() * 2 + 7) // 8 + 2


def _int4_per_64(b: torch.Tensor) -> tuple[torch.Tensor, int]:
    """B in int4 [−8, 7] with one fp16 scale per 64 consecutive elements (max|group|/7.5): (dequantized, bytes)."""
    flat = b.reshape(-1)
    pad = (-flat.numel()) % 64
    groups = torch.cat([flat, flat.new_zeros(pad)]).reshape(-1, 64)
    scale = (groups.abs().amax(dim=1, keepdim=True) / 7.5).half().float()
    q = torch.clamp(torch.round(groups / torch.where(scale > 0, scale, torch.ones_like(scale))), -8, 7)
    out = (q * scale).reshape(-1)[:flat.numel()].reshape(b.shape)
    return out, (flat.numel() * 4 + 7) // 8 + 2 * groups.shape[0]


def lqer(original: dict, decoded: dict, gptq_names: list) -> tuple[dict, int, list]:
    """(decoded weights with the record's LQER corrections added, the factors' packed bytes, the corrected names):
    rank LQER_RANK on the LQER_TOP GPTQ matrices with the largest Frobenius error. A name `bank[i]` is slice i of an
    N-D parameter (a record's parameter bank), corrected in place of that slice."""
    errors = {n: (_matrix(original, n).float() - _matrix(decoded, n).float()) for n in gptq_names}
    top = sorted(errors, key=lambda n: -float(errors[n].norm()))[:LQER_TOP]
    out, total = {k: v.clone() for k, v in decoded.items()}, 0
    for n in top:
        u, s, vh = torch.linalg.svd(errors[n].double(), full_matrices=False)
        a, b = (u[:, :LQER_RANK] * s[:LQER_RANK]).float(), vh[:LQER_RANK].float()
        a_q, a_bytes = _int2_per_matrix(a)
        b_q, b_bytes = _int4_per_64(b)
        total += a_bytes + b_bytes
        target = _matrix(out, n)
        target.copy_((target.float() + a_q @ b_q).reshape(target.shape).to(target.dtype))
    return out, total, top


def _matrix(state_dict: dict, name: str) -> torch.Tensor:
    """The matrix `name` of a state dict as a view: a 2-D tensor as [R, C], or slice i of an N-D one for `name[i]`."""
    m = re.fullmatch(r"(.+)\[(\d+)\]", name)
    if m and name not in state_dict:
        bank = state_dict[m.group(1)]
        return bank.reshape(-1, *bank.shape[-2:])[int(m.group(2))]
    t = state_dict[name]
    return t.view(quant.matrix_shape(t.shape))


FLOAT_EXACT = ('[defaults]\nbits = 8\n[keep_float]\nmax_numel = 1000000000000\ncontrol_dtype = "f32"\n'
               'small_dtype = "f32"\n[encode]\ncodec = "zlib"\nzlib_level = 1\n')


def exact_artifact(state_dict: dict) -> bytes:
    """An artifact that decodes to exactly these tensors (every one kept in its own float dtype or f32), so verify
    scores them."""
    blob = squeeze.compile(state_dict, parse(FLOAT_EXACT, "float-exact"))
    back = squeeze.load(blob)
    assert all(torch.equal(back[k].float(), v.float()) for k, v in state_dict.items())
    return blob


def gptq_names_of(state) -> list:
    """The matrices the gptq pass refined (kept GPTQ's codes) in a compile's final state."""
    return [e.name for e in state.entries if e.method_used == "gptq"]
