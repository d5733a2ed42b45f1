"""How far the allocator's quadratic loss model holds as the error grows (issue 15: "prices the coarsest grids
blind"): per matrix, the even part of the loss change under Gaussian noise of growing size, on calibration text,
over the Fisher sensitivity's prediction.

    python bench/coarse_noise.py --ckpt CKPT --calib TRAIN_SHARD [--model SPEC --model-config F]
        [--levels 0.1,0.25,0.5,0.7] [--tokens 8192]

For each matrix (and bank slice) the allocator prices: φ(r) = (L(W+N) + L(W−N))/2 − L(W) over sensitivity × σ²,
N Gaussian of std σ = r × the tensor's std (calibrate.probe: an antithetic pair, so the first-order term cancels),
on a fixed batch of calibration tokens. φ = 1 where the model holds; int3 grids err at r ≈ 0.2-0.35, int2 at
0.45-0.7 (allocate.MAX_NOISE = 0.8). A φ that grows with r marks a tensor whose coarse grids the allocator
underprices (bench/drift_attribution.py --mirror measures the same thing on validation text, one grid each).
"""
import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from squeeze import calibrate  # noqa: E402
from squeeze.checkpoint import load_checkpoint  # noqa: E402
from squeeze.verify import models  # noqa: E402
from squeeze.verify.stream import load_stream  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--calib", required=True)
    ap.add_argument("--calib-tokens", type=int, default=16384, help="for the Fisher sensitivities")
    ap.add_argument("--tokens", type=int, default=8192, help="the probes' batch")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--model", default="pgolf")
    ap.add_argument("--model-config", default=None)
    ap.add_argument("--levels", default="0.1,0.25,0.5,0.7")
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("THREADS", "2")))
    sd = load_checkpoint(args.ckpt)
    cal = calibrate.calibration_for(sd, calib=args.calib, seq_len=args.seq_len, n_tokens=args.calib_tokens,
                                    device="cpu", with_sensitivities=True, model=args.model,
                                    model_config=args.model_config)
    config = models.load_model_config(args.model_config) if args.model_config else {}
    net = models.resolve(args.model, config, args.model_config or "")({k: v.float() for k, v in sd.items()},
                                                                      args.ckpt).eval()
    run = models.logits_fn(net, None, args.model)
    vocab = models.vocab_of(run, torch.device("cpu"), args.model)
    # the probes' tokens: the calibration stream after the Fisher's (other text than the sensitivities saw)
    stream = load_stream(args.calib, vocab, args.calib_tokens + args.tokens + 1)[args.calib_tokens:]
    batch = calibrate.windows_of(stream, args.seq_len + 1, args.tokens)
    x, y = batch[:, :-1], batch[:, 1:]

    @torch.no_grad()
    def loss() -> float:
        return float(F.cross_entropy(run(x).float().flatten(0, 1), y.flatten()))

    params = calibrate.checkpoint_parameters(net, list(sd))
    names = sorted(cal.sensitivities)
    levels = [float(r) for r in args.levels.split(",")]
    phis = {}
    for r in levels:
        probed = calibrate.probe(params, names, loss, noise=r)  # ΔL per unit noise variance, unfloored
        phis[r] = {n: probed[n] / cal.sensitivities[n] for n in names if n in probed}
    print(f"{args.ckpt}: φ(r) = even ΔL / (Fisher sensitivity × σ²), σ = r × std; {x.numel():,} probe tokens")
    print(f"{'tensor':<34} " + " ".join(f"{'r=' + format(r, 'g'):>8}" for r in levels))
    for n in names:
        print(f"{n:<34} " + " ".join(f"{phis[r].get(n, float('nan')):>8.2f}" for r in levels))
    for r in levels:
        v = sorted(phis[r].values())
        print(f"r={r:g}: median φ {v[len(v) // 2]:.2f}, range {v[0]:.2f}-{v[-1]:.2f}")


if __name__ == "__main__":
    main()
