"""Artifact bytes of a checkpoint: the challenge's baseline export (bench/baseline_pipeline.py) vs squeeze recipes,
with the round-trip validation loss of each (the Parameter Golf baseline GPT rebuilt from the weights).

    python bench/size_vs_baseline.py [--ckpt fixtures/pgolf_4x256.pt] [--val fixtures/val_000000.bin]

Figures go to BENCHMARKS.md by hand, with this command and the machine.
"""
import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import squeeze  # noqa: E402
from bench.baseline_pipeline import baseline_artifact, dequantize_state_dict_int8  # noqa: E402
from squeeze.data import read_shard  # noqa: E402
from squeeze.models.pgolf import GPT  # noqa: E402


@torch.no_grad()
def val_loss(state_dict: dict, tokens: torch.Tensor, seq_len: int) -> float:
    """Mean next-token cross-entropy (nats) over non-overlapping windows of the shard."""
    model = GPT.from_state_dict({k: v.float() for k, v in state_dict.items()}).eval()
    n = (tokens.numel() - 1) // seq_len
    x = tokens[: n * seq_len].reshape(n, seq_len)
    y = tokens[1: n * seq_len + 1].reshape(n, seq_len)
    total = 0.0
    for i in range(0, n, 16):
        total += model.loss(x[i:i + 16], y[i:i + 16]).item() * x[i:i + 16].shape[0]
    return total / n


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ckpt", default=str(ROOT / "fixtures/pgolf_4x256.pt"))
    ap.add_argument("--val", default=str(ROOT / "fixtures/val_000000.bin"))
    ap.add_argument("--seq-len", type=int, default=256)
    args = ap.parse_args()
    sd = torch.load(args.ckpt, map_location="cpu", weights_only=True)
    tokens = torch.from_numpy(read_shard(args.val))
    params = sum(t.numel() for t in sd.values())
    ref = val_loss(sd, tokens, args.seq_len)
    print(f"checkpoint {args.ckpt}: {params:,} params; val loss {ref:.4f} nats/token "
          f"({tokens.numel():,} val tokens, seq_len {args.seq_len})")
    print(f"{'pipeline':<34} {'bytes':>11} {'vs baseline':>11} {'bits/param':>10} {'val loss':>9} {'drift':>8} "
          f"{'seconds':>8}")

    t0 = time.perf_counter()
    base = baseline_artifact(sd)
    seconds = time.perf_counter() - t0
    import io, zlib  # noqa: E401
    base_sd = dequantize_state_dict_int8(torch.load(io.BytesIO(zlib.decompress(base)), weights_only=True))
    loss = val_loss(base_sd, tokens, args.seq_len)
    row = lambda name, n, loss, s: print(  # noqa: E731
        f"{name:<34} {n:>11,} {n / len(base):>11.4f} {8 * n / params:>10.3f} {loss:>9.4f} {loss - ref:>+8.4f} "
        f"{s:>8.1f}")
    row("baseline int8 + torch.save + zlib-9", len(base), loss, seconds)
    for recipe_path in ("recipes/int8-baseline.toml", "recipes/int6-mixed.toml", None):
        recipe = squeeze.Recipe.load(ROOT / recipe_path) if recipe_path else squeeze.Recipe()
        t0 = time.perf_counter()
        blob = squeeze.compile(sd, recipe)
        seconds = time.perf_counter() - t0
        row(f"squeeze {recipe_path or '(default recipe)'}", len(blob), val_loss(squeeze.load(blob), tokens,
                                                                                  args.seq_len), seconds)


if __name__ == "__main__":
    main()
