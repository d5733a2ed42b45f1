"""squeeze --budget against the top record's own export at that export's bytes, on several checkpoints (issue 12's
0.5x target, with the noise floor issue 15 asks for).

    python bench/record_bytes_seeds.py --ckpt A.pt --ckpt B.pt ... [--model SPEC] [--calib TRAIN_SHARD]
        [--lowrank "1,2,4,8:4,4,64" ...]

For each checkpoint (a record-architecture one has OUT.config.json beside it, from bench/record_checkpoint.py, and
is scored with fixtures/record_gpt.py; a baseline one with verify's pgolf model): the record's export
(bench/record_anchor.py: GPTQ int6 k 13/11.5, int7 embedding k 14, brotli-11), the same + its LQER, then squeeze
--budget at the export's bytes with the default candidates and with each `--lowrank` variant ("RANKS:U,V,GROUP":
the ranks offered and the factors' U bits, V bits and V scale group; "none" for no corrections). Every drift is
`squeeze verify`'s on the validation shard.

Why several checkpoints: one checkpoint's drift has two noises. The paired bootstrap over validation windows
(printed per row) is what another text of the same kind could measure; it does not see the other, larger one:
which rounding errors a compile happens to make, whose first-order effect on a small, imperfectly trained model
(its validation gradient is not zero) is of either sign and about ±0.004 bpb here. Checkpoints trained from
different seeds are different error realisations, so the spread of a pipeline's drift across them, and the
spread of paired differences, are the honest noise floor. The summary gives mean ± sd per pipeline and each
squeeze pipeline's ratio to the record's mean drift.

Each artifact is also scored at the mirrored weights 2·W − Ŵ (verify's mirror=True; --no-mirror leaves it out),
and the summary repeats for the even part of the drift ((L(W+E) + L(W−E))/2 − L(W)), from which that first-order
term cancels: its spread across checkpoints is what is left of the noise.
"""
import argparse
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import torch  # noqa: E402

import squeeze  # noqa: E402
from squeeze import calibrate, compiler  # noqa: E402
from squeeze.passes import allocate  # noqa: E402
from squeeze.recipe import parse  # noqa: E402
from squeeze.verify import Verifier  # noqa: E402
import budget_vs_record  # noqa: E402
import record_anchor  # noqa: E402

SMALL_FLOAT = budget_vs_record.SMALL_FLOAT.replace("65536", "4096")  # --quantize-small: small models' matrices
BUDGET_RECIPE = budget_vs_record.BUDGET_RECIPE.replace(budget_vs_record.SMALL_FLOAT, SMALL_FLOAT)


def allocate_config(variant: str) -> allocate.AllocateConfig:
    """"none", "default", or "RANKS:U,V,GROUP"."""
    if variant == "default":
        return allocate.AllocateConfig()
    if variant == "none":
        return allocate.AllocateConfig(lowrank_ranks=())
    ranks, bits = variant.split(":")
    u, v, group = (int(x) for x in bits.split(","))
    return allocate.AllocateConfig(lowrank_ranks=tuple(int(r) for r in ranks.split(",")), lowrank_bits_u=u,
                                   lowrank_bits_v=v, lowrank_group=group)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ckpt", action="append", required=True)
    ap.add_argument("--calib", default=os.path.join(os.environ.get("TMPDIR", "/tmp"),
                                                    "squeeze-fixture-cache/train/train_000000.bin"))
    ap.add_argument("--calib-tokens", type=int, default=131072,
                    help="calibration tokens (the library's default; with 16,384 GPTQ fits the sample and the "
                         "allocator's prices are optimistic unevenly: bench/hessian_holdout.py)")
    ap.add_argument("--val", default=str(ROOT / "fixtures/val_000000.bin"))
    ap.add_argument("--tokenizer", default=str(ROOT / "fixtures/tokenizer_1024_bpe.model"))
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--lowrank", action="append", default=None,
                    help='extra budget variants: "none" or "RANKS:U,V,GROUP" (default: "none")')
    ap.add_argument("--no-mirror", action="store_true", help="score no mirrored weights (no even part)")
    args = ap.parse_args()
    mirror = not args.no_mirror
    torch.set_num_threads(int(os.environ.get("THREADS", "2")))
    variants = ["default"] + (args.lowrank if args.lowrank is not None else ["none"])
    drifts, evens = {}, {}  # label -> [drift per checkpoint], [its even part per checkpoint]
    print(f"{'checkpoint':<28} {'pipeline':<36} {'bytes':>9} {'drift':>9} {'95% bootstrap':>20} "
          + (f"{'even':>9} " if mirror else "") + f"{'s':>6}")
    for ckpt in args.ckpt:
        config_path = ckpt + ".config.json"
        model_config = config_path if os.path.exists(config_path) else None
        model = str(ROOT / "fixtures/record_gpt.py") + ":build" if model_config else "pgolf"
        sd = torch.load(ckpt, map_location="cpu", weights_only=True)
        cal = calibrate.calibration_for(sd, calib=args.calib, seq_len=args.seq_len, n_tokens=args.calib_tokens,
                                        device="cpu", with_sensitivities=True, model=model,
                                        model_config=model_config)
        scratch = Path(ckpt).with_suffix(".bench.sqz")
        name = "/".join(Path(ckpt).parts[-2:])[-28:]  # checkpoints of one script share a file name
        verifier = Verifier(ckpt, args.val, args.tokenizer, seq_len=args.seq_len, device="cpu", model=model,
                            model_config=model_config)

        def measure(label: str, blob: bytes, seconds: float, counted: int | None = None):
            scratch.write_bytes(blob)
            r = verifier.verify(scratch, mirror=mirror)
            lo, hi = r.drift_interval()
            drifts.setdefault(label, []).append(r.drift_bpb)
            if mirror:
                evens.setdefault(label, []).append(r.drift_even_bpb)
            print(f"{name:<28} {label:<36} {counted or len(blob):>9,} {r.drift_bpb:>+9.5f} "
                  f"[{lo:+.5f}, {hi:+.5f}] " + (f"{r.drift_even_bpb:>+9.5f} " if mirror else "")
                  + f"{seconds:>6.0f}", flush=True)

        t = time.perf_counter()
        res = compiler.compile_state_dict(sd, parse(record_anchor.recipe(SMALL_FLOAT), "record"),
                                          hessians=cal.hessians)
        measure("record 04-27", res.blob, time.perf_counter() - t)
        fixed, extra, _ = record_anchor.lqer(sd, squeeze.load(res.blob), record_anchor.gptq_names_of(res.state))
        measure("record 04-27 + LQER", record_anchor.exact_artifact(fixed), 0, counted=len(res.blob) + extra)
        for variant in variants:
            t = time.perf_counter()
            out = squeeze.compile_to_budget(sd, parse(BUDGET_RECIPE, "budget"), len(res.blob),
                                            sensitivities=cal.sensitivities, hessians=cal.hessians,
                                            even_loss=cal.even_loss, allocate_config=allocate_config(variant))
            measure(f"squeeze --budget ({variant})", out.blob, time.perf_counter() - t)
        scratch.unlink()

    summary("the drift (val_bpb)", drifts, len(args.ckpt))
    if mirror:
        summary("the even part of the drift", evens, len(args.ckpt))


def summary(what: str, per_label: dict, n: int) -> None:
    """Mean ± sd over the checkpoints of each pipeline's figure, its ratio to the record's mean, and each squeeze
    variant's paired difference from the default."""
    record = statistics.mean(per_label["record 04-27"])
    print(f"\nover {n} checkpoints: mean ± sd of {what}, and / the record's mean")
    for label, values in per_label.items():
        sd = statistics.stdev(values) if len(values) > 1 else float("nan")
        mean = statistics.mean(values)
        print(f"{label:<36} {mean:+.5f} ± {sd:.5f}   {mean / record:6.3f}x   "
              + " ".join(f"{v:+.5f}" for v in values))
    base = per_label["squeeze --budget (default)"]
    for label, values in per_label.items():
        if label.startswith("squeeze") and values is not base:
            diff = [b - a for a, b in zip(values, base)]
            sd = statistics.stdev(diff) if len(diff) > 1 else float("nan")
            print(f"default − {label}: {statistics.mean(diff):+.5f} ± {sd:.5f} (paired)")

if __name__ == "__main__":
    main()
