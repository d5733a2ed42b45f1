"""Is the allocator's price of an artifact's error optimistic because GPTQ fitted the calibration sample? Each
matrix's output error tr(E H Eᵀ)/(R·tr H) (what the allocator prices, lowrank.output_error) under the Hessian of
the calibration tokens, against the same error under Hessians of more training tokens and of the validation text.

    python bench/hessian_holdout.py --ckpt CKPT --calib TRAIN_SHARD ARTIFACT [ARTIFACT ...]
        [--calib-tokens 16384] [--more-tokens 262144] [--val fixtures/val_000000.bin] [--model SPEC --model-config F]

A ratio above 1 is error GPTQ (and a correction) put in directions the calibration sample barely excites but other
text does; the allocator, pricing on the calibration Hessian, does not see it. Compare artifacts compiled on the
same calibration (squeeze --budget against an anchor) to tell a pipeline-specific bias from a shared one.
"""
import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import torch  # noqa: E402

import squeeze  # noqa: E402
from squeeze import calibrate, quant  # noqa: E402
from squeeze.checkpoint import load_checkpoint  # noqa: E402
from squeeze.passes import lowrank  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("artifacts", nargs="+")
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--calib", required=True)
    ap.add_argument("--calib-tokens", type=int, default=16384, help="what the artifacts were calibrated on")
    ap.add_argument("--more-tokens", type=int, default=262144)
    ap.add_argument("--val", default=str(ROOT / "fixtures/val_000000.bin"))
    ap.add_argument("--val-tokens", type=int, default=65536)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--model", default="pgolf")
    ap.add_argument("--model-config", default=None)
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("THREADS", "2")))
    sd = load_checkpoint(args.ckpt)

    def hessians(source: str, n: int) -> dict:
        return calibrate.calibration_for(sd, calib=source, seq_len=args.seq_len, n_tokens=n, device="cpu",
                                         model=args.model, model_config=args.model_config).hessians

    calib, more, val = (hessians(args.calib, args.calib_tokens), hessians(args.calib, args.more_tokens),
                        hessians(args.val, args.val_tokens))
    for path in args.artifacts:
        decoded = squeeze.load(path)
        print(f"{path}: output error under the calibration Hessian ({args.calib_tokens:,} tokens), and its ratio "
              f"under {args.more_tokens:,} training tokens' and the validation text's")
        for name in sorted(calib):
            error = quant.as_matrix(calibrate.tensor_of(sd, name).float() - calibrate.tensor_of(decoded, name).float())
            c, m, v = (lowrank.output_error(error, h[name]) for h in (calib, more, val))
            print(f"  {name:<30} {c:.3e}   more/calib {m / c:5.2f}   val/calib {v / c:5.2f}")


if __name__ == "__main__":
    main()
