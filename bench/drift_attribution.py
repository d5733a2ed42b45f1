"""Where a budget compile's drift comes from: each tensor's predicted loss increase beside the one measured by
putting only that tensor's decoded weights into the model (issue 15's diagnosis of a mispriced allocation).

    python bench/drift_attribution.py --ckpt CKPT --calib TRAIN_SHARD --bytes N [--model SPEC --model-config F]
        [--val fixtures/val_000000.bin] [--calib-tokens 16384] [--top 40]

For each tensor (and bank slice) the budget decided: its grid (bits, clip k, group, GPTQ or round-to-nearest), the
allocator's predicted loss (sensitivity × tr(E H Eᵀ)/(R·tr H), what `allocate.predicted_loss` sums), the loss
increase measured on the validation text with only that tensor decoded (nats/token), and their ratio. The last
lines compare the sum of the single-tensor measurements with the whole artifact's (interactions between tensors).
A ratio far from the others marks a tensor the allocator misprices.

With --mirror each tensor is also scored at W − E (its error E = Ŵ − W with the sign flipped), which splits the
measured change into its even part ((L(W+E) + L(W−E))/2 − L(W): curvature, what the allocator prices) and its odd
part ((L(W+E) − L(W−E))/2: mostly the validation gradient along E, luck of the error pattern); the summary gives
the rank correlation of the prediction with each (verify --mirror does the same for a whole artifact).
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
from squeeze.data import read_shard  # noqa: E402
from squeeze.passes import lowrank  # noqa: E402
from squeeze.recipe import parse  # noqa: E402
from squeeze.verify import models  # noqa: E402
from squeeze.verify.weights import mirrored  # noqa: E402
import budget_vs_record  # noqa: E402


@torch.no_grad()
def mean_loss(run, windows: torch.Tensor, batch: int = 16) -> float:
    """Mean next-token cross-entropy (nats) of `run(ids) -> logits` over `windows` [n, T + 1]."""
    total, count = 0.0, 0
    for i in range(0, windows.shape[0], batch):
        w = windows[i:i + batch]
        logits = run(w[:, :-1]).float()
        total += float(torch.nn.functional.cross_entropy(logits.flatten(0, 1), w[:, 1:].flatten(), reduction="sum"))
        count += w[:, 1:].numel()
    return total / count


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--calib", required=True)
    ap.add_argument("--calib-tokens", type=int, default=131072,
                    help="calibration tokens (the library's default; with 16,384 GPTQ fits the sample and the "
                         "allocator's prices are optimistic unevenly: bench/hessian_holdout.py)")
    ap.add_argument("--bytes", type=int, required=True, help="the budget of the compile to attribute")
    ap.add_argument("--val", default=str(ROOT / "fixtures/val_000000.bin"))
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--model", default="pgolf")
    ap.add_argument("--model-config", default=None)
    ap.add_argument("--quantize-small", action="store_true")
    ap.add_argument("--top", type=int, default=60)
    ap.add_argument("--mirror", action="store_true", help="also score W - E: the even/odd split of each change")
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("THREADS", "2")))
    recipe = budget_vs_record.BUDGET_RECIPE
    if args.quantize_small:
        recipe = recipe.replace("65536", "4096")

    sd = torch.load(args.ckpt, map_location="cpu", weights_only=True)
    cal = calibrate.calibration_for(sd, calib=args.calib, seq_len=args.seq_len, n_tokens=args.calib_tokens,
                                    device="cpu", with_sensitivities=True, model=args.model,
                                    model_config=args.model_config)
    res = squeeze.compile_to_budget(sd, parse(recipe, "budget"), args.bytes, sensitivities=cal.sensitivities,
                                    hessians=cal.hessians, even_loss=cal.even_loss)
    decoded = squeeze.load(res.blob)
    state = res.state
    print(f"{args.ckpt}: budget {args.bytes:,} -> {len(res.blob):,} bytes; predicted loss "
          f"{state.predicted_loss:+.5f}")

    config = models.load_model_config(args.model_config) if args.model_config else {}
    build = models.resolve(args.model, config, args.model_config or "")
    model = build({k: v.float() for k, v in sd.items()}, args.ckpt).eval()
    run = models.logits_fn(model, None, args.model)
    params = dict(model.named_parameters())
    stream = torch.from_numpy(read_shard(args.val).astype("int64"))
    n = (stream.numel() - 1) // args.seq_len
    windows = torch.stack([stream[i * args.seq_len:(i + 1) * args.seq_len + 1] for i in range(n)]).long()
    base = mean_loss(run, windows)

    whole = {k: v.float() for k, v in decoded.items()}  # every tensor decoded, float32: once, not per tensor
    rows = []
    for e in state.entries:
        if e.plan is None or not e.plan.reason.startswith("budget") or e.name not in state.sensitivities:
            continue
        w = quant.as_matrix(e.tensor).float()
        p = calibrate.tensor_of(params, e.name)
        new = calibrate.tensor_of(whole, e.name)
        h = state.hessian_of(e)[0]
        error = w - quant.as_matrix(new)
        predicted = state.sensitivities[e.name] * (lowrank.output_error(error, h) if h is not None
                                                   else float(error.square().mean()))
        saved = p.detach().clone()
        with torch.no_grad():
            p.copy_(new.reshape(p.shape))
        measured = mean_loss(run, windows) - base
        even = float("nan")
        if args.mirror:
            with torch.no_grad():
                p.copy_((2 * saved.float() - new.float().reshape(p.shape)).to(p.dtype))
            even = (measured + mean_loss(run, windows) - base) / 2
        with torch.no_grad():
            p.copy_(saved)
        rel = float(error.square().mean() / w.square().mean())
        grid = ("f16" if e.plan.scheme == "float" else
                f"int{e.plan.quant.bits} k{e.plan.quant.clip_value:g} g{e.plan.quant.group} {e.method_used or ''}"
                + (f" +r{e.lowrank.rank}" if e.lowrank is not None else ""))
        rows.append((e.name, grid, e.tensor.numel(), rel, predicted, measured, even))
        print(f"  {e.name:<34} {grid:<22} rel.mse {rel:.2e} predicted {predicted:+.5f} measured {measured:+.5f}"
              + (f" even {even:+.5f}" if args.mirror else ""), flush=True)

    model_q = build(whole, "decoded").eval()
    total = mean_loss(models.logits_fn(model_q, None, args.model), windows) - base
    total_even = float("nan")
    if args.mirror:  # the whole artifact's even part: beside the single tensors' sum, the interactions' share
        model_m = build(mirrored(sd, whole), "mirrored").eval()
        total_even = (total + mean_loss(models.logits_fn(model_m, None, args.model), windows) - base) / 2
    print(f"\nbase val loss {base:.5f} nats/token")
    print(f"{'tensor':<34} {'grid':<22} {'numel':>8} {'rel mse':>9} {'predicted':>10} {'measured':>10} {'ratio':>7}"
          + (f" {'even':>10} {'odd':>10} {'even/pred':>9}" if args.mirror else ""))
    for name, grid, numel, rel, predicted, measured, even in sorted(rows, key=lambda r: -r[5])[:args.top]:
        ratio = measured / predicted if predicted > 0 else float("nan")
        print(f"{name:<34} {grid:<22} {numel:>8,} {rel:>9.2e} {predicted:>+10.5f} {measured:>+10.5f} {ratio:>7.2f}"
              + (f" {even:>+10.5f} {measured - even:>+10.5f} {even / predicted:>9.2f}" if args.mirror else ""))
    print(f"sum of single-tensor: predicted {sum(r[4] for r in rows):+.5f}, measured {sum(r[5] for r in rows):+.5f}"
          + (f", even {sum(r[6] for r in rows):+.5f}" if args.mirror else "")
          + f"; whole artifact measured {total:+.5f}" + (f", even {total_even:+.5f}" if args.mirror else "")
          + f" (allocator's prediction {state.predicted_loss:+.5f})")
    predicted = [r[4] for r in rows]
    print(f"rank correlation with the prediction over {len(rows)} tensors: measured "
          f"{spearman(predicted, [r[5] for r in rows]):+.2f}"
          + (f", even part {spearman(predicted, [r[6] for r in rows]):+.2f}" if args.mirror else ""))


def spearman(a: list, b: list) -> float:
    ra, rb = (torch.tensor(x).argsort().argsort().double() for x in (a, b))
    return float(torch.corrcoef(torch.stack([ra, rb]))[0, 1])


if __name__ == "__main__":
    main()
