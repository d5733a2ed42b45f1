"""Compile time at Parameter Golf sizes (issues 5 and 14): a GPT calibrated, compiled with GPTQ (a record-style
recipe) and compiled to a byte budget, each phase timed, on the CPU or CUDA.

    python bench/compile_time.py [--device cpu|cuda] [--ckpt CKPT | --shape baseline|record]
        [--calib 'train_*.bin' | --calib-self N] [--calib-tokens 32768] [--bits-per-param 3.5]
        [--lowrank-ranks "1,2,4,8" | ""]

Without --ckpt the weights have the --shape given, drawn as bench/scale.py draws them (Gaussian, the usual init):
compile time depends on the shapes, not on what the weights learned. `baseline`: the challenge baseline (9 layers,
dim 512, 8 heads, 4 KV heads, MLP x2, vocab 1024: 17,059,912 parameters); `record`: the top record's size (11
layers, dim 512, MLP x4, vocab 8192: 35,938,904 parameters, in the baseline's layout). Calibration tokens come
from --calib (default: the fixture's training shard if fixtures/train_fixture.py has left it in its cache) or from
the model itself (--calib-self).
Phases: calibration (input Hessians of every linear + per-tensor sensitivities), `compile` with GPTQ on every matrix,
and `compile --budget` (the allocator's candidate hulls, then the budget rounds), with the time of each pass.
"""
import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import torch  # noqa: E402

import squeeze  # noqa: E402
from squeeze import calibrate, compiler  # noqa: E402
from squeeze.recipe import parse  # noqa: E402
from scale import synthetic_state_dict  # noqa: E402

SHAPES = {"baseline": {"layers": 9, "dim": 512, "vocab": 1024, "heads": 8, "kv_heads": 4, "mlp_mult": 2},
          "record": {"layers": 11, "dim": 512, "vocab": 8192, "heads": 8, "kv_heads": 4, "mlp_mult": 4}}
DEFAULT_CALIB = Path(tempfile.gettempdir()) / "squeeze-fixture-cache/train/train_000000.bin"
GPTQ_RECIPE = ('[defaults]\nbits = 6\nclip = "std"\nclip_std_k = 12.85\nmethod = "gptq"\n'
               '[encode]\ncodec = "auto"\ncandidates = ["brotli", "rans"]\ncodes_candidates = ["rans"]\n')
BUDGET_RECIPE = ('[defaults]\nbits = 6\nclip = "std"\nclip_std_k = 8.0\n'
                 '[encode]\ncodec = "auto"\ncandidates = ["brotli", "rans"]\ncodes_candidates = ["rans"]\n')


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--ckpt", default=None)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="baseline")
    ap.add_argument("--calib", default=str(DEFAULT_CALIB) if DEFAULT_CALIB.exists() else None)
    ap.add_argument("--calib-self", type=int, default=0)
    ap.add_argument("--calib-tokens", type=int, default=32768)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--bits-per-param", type=float, default=3.5)
    ap.add_argument("--lowrank-ranks", default=None,
                    help='the budget\'s low-rank correction ranks, e.g. "1,2,4,8" or "" for none (default: the '
                         'recipe default)')
    args = ap.parse_args()
    if args.calib is None and not args.calib_self:
        ap.error("no calibration data: pass --calib 'train_*.bin' or --calib-self N")
    torch.set_num_threads(int(os.environ.get("THREADS", str(os.cpu_count()))))
    if args.ckpt:
        sd = torch.load(args.ckpt, map_location="cpu", weights_only=True)
    else:
        sd = synthetic_state_dict(**SHAPES[args.shape])
    params = sum(t.numel() for t in sd.values())
    print(f"{args.ckpt or args.shape + '-shaped Gaussian weights'}: {params:,} params; device {args.device}; "
          f"torch threads {torch.get_num_threads()}", flush=True)

    def log(r):
        print(f"    {r.name:<9} {r.seconds:8.2f} s", flush=True)

    t = time.perf_counter()
    cal = calibrate.calibration_for(sd, calib=args.calib, calib_self=args.calib_self, seq_len=args.seq_len,
                                    n_tokens=args.calib_tokens, device=args.device, with_sensitivities=True)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    timings = {"calibration": time.perf_counter() - t}
    print(f"calibration ({cal.source}): {timings['calibration']:.1f} s", flush=True)

    print("compile, GPTQ int6 on every matrix:", flush=True)
    t = time.perf_counter()
    blob = compiler.compile_state_dict(sd, parse(GPTQ_RECIPE, "gptq"), log=log, hessians=cal.hessians,
                                       device=args.device).blob
    timings["compile (GPTQ)"] = time.perf_counter() - t
    print(f"  {len(blob):,} bytes in {timings['compile (GPTQ)']:.1f} s", flush=True)

    budget = int(args.bits_per_param * params / 8)
    print(f"compile --budget {budget:,} ({args.bits_per_param} bits/param):", flush=True)
    t = time.perf_counter()
    budget_recipe = BUDGET_RECIPE if args.lowrank_ranks is None else \
        BUDGET_RECIPE + f"[budget]\nlowrank_ranks = [{args.lowrank_ranks}]\n"
    res = squeeze.compile_to_budget(sd, parse(budget_recipe, "budget"), budget, sensitivities=cal.sensitivities,
                                     hessians=cal.hessians, log=log, device=args.device,
                                     even_loss=cal.even_loss)
    timings["compile --budget"] = time.perf_counter() - t
    print(f"  {len(res.blob):,} bytes in {timings['compile --budget']:.1f} s (the passes above: one block per "
          f"budget round); {len(res.measured)} coarse grid(s) kept on a measured price"
          + (f", {cal.even_loss.calls} measured in {cal.even_loss.seconds:.1f} s" if cal.even_loss else ""),
          flush=True)

    print("\nphase                  seconds")
    for name, seconds in timings.items():
        print(f"{name:<22} {seconds:7.1f}")
    print(f"{'total':<22} {sum(timings.values()):7.1f}")
    squeeze.load(res.blob)  # the result decodes


if __name__ == "__main__":
    main()
