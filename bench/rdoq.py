"""Does rate-aware rounding pay (issue 15)? GPTQ whose rounding adds λ × the code's length (gptq.RateTerm, RDOQ as
DeepCABAC/NNCodec do) against plain GPTQ, per tensor, on the (bytes, layer loss) hulls the allocator chooses from.

    python bench/rdoq.py --ckpt CKPT --calib TRAIN_SHARD [--model SPEC --model-config F] [--tensors REGEX]
        [--bits 2,3,4,5,6] [--lams 0.1,0.2,0.4,0.8]

For each matrix (and bank slice) with a Hessian and each grid (width b, std clip k, one scale per row) the plain
GPTQ codes give a point (bytes: the codes' order-0 entropy + scales, `allocate.coded_bytes`, what rans reaches
within 0.5%; loss: the layer loss tr(E H Eᵀ)). RDOQ on the same grid, with code lengths −log2 of the plain codes'
frequencies and λ = t × (plain layer loss per weight) per bit for each t of --lams, gives more points (bytes from
its own codes' entropy). The allocator only ever uses a tensor's lower convex hull, so the measure is between
hulls: at each plain hull point from 1.5 to 6 bits/weight, the bytes the hull with the RDOQ points added needs for
the same loss (linear between hull points). Printed per tensor: the median and the largest saving; and overall,
the savings weighted by the tensor's bytes at about 3.5 bits/weight. Since the allocator's price is sensitivity ×
layer loss / (R·tr H), a tensor's hull is the allocator's up to a scale, and a byte saving at equal layer loss on
every tensor is the same saving for the whole artifact at equal predicted loss.
"""
import argparse
import os
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from squeeze import calibrate, quant  # noqa: E402
from squeeze.checkpoint import load_checkpoint  # noqa: E402
from squeeze.passes import allocate, gptq  # noqa: E402
from squeeze.passes.stack import slice_names  # noqa: E402

CLIPS = {2: (1.5, 2.0, 2.5), 3: (2.0, 2.5, 3.5), 4: (2.5, 3.5, 5.0), 5: (3.5, 5.0, 7.0), 6: (5.0, 7.0, 10.0),
         7: (7.0, 10.0, 14.0)}  # the allocator's clips where each width's best ones lie


def points(w: torch.Tensor, hessian: torch.Tensor, bits: int, k: float, lams: list) -> list:
    """[(label, bytes, layer loss)] of plain GPTQ and of RDOQ at each λ factor on the grid (bits, std clip k)."""
    spec = quant.QuantSpec(bits=bits, clip="std", clip_value=k)
    _, scales = quant.quantize(w, spec, "w")
    scale_full = quant.expand_scales(scales.reshape(w.shape[0], -1), 0, w.shape[1]).expand(*w.shape)
    plain = gptq.gptq_codes(w, scale_full, spec.qmax, hessian)
    loss = gptq.layer_loss(w, plain.float() * scale_full, hessian)
    out = [("plain", allocate.coded_bytes(plain, scales), loss)]
    counts = torch.bincount((plain.long() + spec.qmax).reshape(-1), minlength=2 * spec.qmax + 1).double()
    code_bits = -torch.log2((counts + 0.5) / (counts + 0.5).sum())
    for t in lams:
        rate = gptq.RateTerm(code_bits, t * loss / w.numel())
        codes = gptq.gptq_codes(w, scale_full, spec.qmax, hessian, rate=rate)
        out.append((f"rdoq {t:g}", allocate.coded_bytes(codes, scales),
                    gptq.layer_loss(w, codes.float() * scale_full, hessian)))
    return out


def bytes_at(hull: list, loss: float) -> float:
    """The bytes a lower convex hull [(bytes, loss)], cheapest first, needs to reach `loss` (linear between its
    points); inf when it never does."""
    for (b0, l0), (b1, l1) in zip(hull, hull[1:]):
        if l1 <= loss <= l0:
            return b0 + (b1 - b0) * (l0 - loss) / (l0 - l1) if l0 > l1 else b0
    return hull[0][0] if loss >= hull[0][1] else float("inf")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--calib", required=True)
    ap.add_argument("--calib-tokens", type=int, default=16384)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--model", default="pgolf")
    ap.add_argument("--model-config", default=None)
    ap.add_argument("--tensors", default=".", help="a regex: only the matrices whose name it finds")
    ap.add_argument("--bits", default="2,3,4,5,6")
    ap.add_argument("--lams", default="0.5,1,2,4,8", help="λ per bit, in units of the plain layer loss per weight")
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("THREADS", "2")))
    sd = load_checkpoint(args.ckpt)
    cal = calibrate.calibration_for(sd, calib=args.calib, seq_len=args.seq_len, n_tokens=args.calib_tokens,
                                    device="cpu", model=args.model, model_config=args.model_config)
    lams = [float(x) for x in args.lams.split(",")]
    widths = [int(x) for x in args.bits.split(",")]
    matrices = {}
    for name, t in sd.items():
        subs = (list(zip(slice_names(name, t.shape), t.reshape(-1, *t.shape[-2:]))) if t.dim() > 2
                else [(name, t)])
        for sub, w in subs:
            if w.dim() == 2 and w.numel() > 4096 and sub in cal.hessians and re.search(args.tensors, sub):
                matrices[sub] = w.float()
    print(f"{args.ckpt}: {len(matrices)} matrices; RDOQ λ factors {lams}; widths {widths}")
    print(f"{'tensor':<30} {'weights':>8} {'median saving':>14} {'max':>7} {'at ~3.5 b/w':>12} {'best t':>7}")
    weighted, total = 0.0, 0.0
    for name, w in matrices.items():
        h = cal.hessians[name].float()
        pts = [allocate.Option(b, k, size, loss, group=i) for b in widths for k in CLIPS[b]
               for i, (label, size, loss) in enumerate(points(w, h, b, k, lams))]  # group: 0 plain, i: lams[i-1]
        plain = [(o.bytes, o.loss) for o in allocate.lower_hull([o for o in pts if o.group == 0])]
        hull = allocate.lower_hull(pts)
        both = [(o.bytes, o.loss) for o in hull]
        n = w.numel()
        mid = [(b, l) for b, l in plain if 1.5 <= 8 * b / n <= 6.0]
        savings = [1 - bytes_at(both, l) / b for b, l in mid]
        if not savings:
            continue
        near = min(mid, key=lambda p: abs(8 * p[0] / n - 3.5))
        at_mid = 1 - bytes_at(both, near[1]) / near[0]
        used = [lams[o.group - 1] for o in hull if o.group > 0]
        best = f"{max(set(used), key=used.count):g}" if used else "-"
        weighted += at_mid * near[0]
        total += near[0]
        print(f"{name:<30} {n:>8,} {np.median(savings):>13.2%} {max(savings):>6.2%} {at_mid:>11.2%} {best:>7}",
              flush=True)
    print(f"bytes saved at equal layer loss near 3.5 bits/weight, weighted by bytes: {weighted / max(total, 1):.2%}")


if __name__ == "__main__":
    main()
