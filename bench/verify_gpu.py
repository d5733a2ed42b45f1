"""GPU check for `squeeze verify`: runs it on CUDA (bf16 autocast) and prints the scores and throughput (tokens/s).

    python bench/verify_gpu.py                                   # the fixture, its val shard tiled to 2M tokens
    python bench/verify_gpu.py --ckpt final_model.pt --val 'data/fineweb_val_*.bin' \\
        --tokenizer data/tokenizers/fineweb_1024_bpe.model --tile 0
    torchrun --nproc_per_node=8 bench/verify_gpu.py ...          # the same, split over 8 GPUs

It compiles the checkpoint with --recipe, warms the GPU up on one batch, then times verify (original and decoded
weights). The fixture's val shard is only 65,537 tokens, too few to keep a GPU busy, so by default it is repeated
into a temporary shard of --tile tokens; pass --tile 0 to score the shards as they are. Figures go to BENCHMARKS.md
by hand, with the command and the GPU.
"""
import argparse
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import squeeze  # noqa: E402
from squeeze.checkpoint import load_checkpoint  # noqa: E402
from squeeze.data import HEADER_INTS, SHARD_MAGIC, SHARD_VERSION  # noqa: E402
from squeeze.verify import verify  # noqa: E402
from squeeze.verify.stream import load_stream  # noqa: E402


def tiled_shard(pattern: str, n_tokens: int, directory: str) -> str:
    """A shard holding the matched shards' tokens repeated to n_tokens."""
    tokens = load_stream(pattern, vocab_size=1 << 16).numpy().astype("<u2")
    tiled = np.resize(tokens, n_tokens)
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[:3] = [SHARD_MAGIC, SHARD_VERSION, n_tokens]
    path = Path(directory) / "val_tiled.bin"
    path.write_bytes(header.tobytes() + tiled.tobytes())
    return str(path)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ckpt", default=str(ROOT / "fixtures/pgolf_4x256.pt"))
    ap.add_argument("--recipe", default=str(ROOT / "recipes/int8-baseline.toml"))
    ap.add_argument("--val", default=str(ROOT / "fixtures/val_000000.bin"))
    ap.add_argument("--tokenizer", default=str(ROOT / "fixtures/tokenizer_1024_bpe.model"))
    ap.add_argument("--model-config", default=None)
    ap.add_argument("--tile", type=int, default=2_097_153, help="repeat the val tokens to this many (0: don't)")
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--stride", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=None)
    args = ap.parse_args()
    main_rank = os.environ.get("RANK", "0") == "0"
    if not torch.cuda.is_available():
        print("verify_gpu: no CUDA device; nothing measured", file=sys.stderr)
        sys.exit(1)

    with tempfile.TemporaryDirectory(prefix="squeeze-verify-gpu-") as tmp:
        artifact = Path(tmp) / "model.sqz"
        artifact.write_bytes(squeeze.compile(load_checkpoint(args.ckpt), squeeze.Recipe.load(args.recipe)))
        val = tiled_shard(args.val, args.tile, tmp) if args.tile else args.val
        common = dict(model_config=args.model_config, seq_len=args.seq_len, stride=args.stride,
                      batch_size=args.batch_size, device="cuda")
        # Warm-up: CUDA context, kernels and allocator, so that the timed run measures steady throughput.
        verify(artifact, args.ckpt, val, args.tokenizer, max_tokens=args.seq_len * args.batch_size, **common)
        result = verify(artifact, args.ckpt, val, args.tokenizer, max_tokens=args.max_tokens,
                        progress=main_rank, **common)

    if main_rank:
        gpu = torch.cuda.get_device_name()
        windows = "non-overlapping" if args.stride is None else f"stride {args.stride}"
        print(f"{gpu} x{result.world_size}, torch {torch.__version__}, {result.precision}; seq_len {args.seq_len}, "
              f"{windows}, batch {args.batch_size}; recipe {Path(args.recipe).stem}")
        for name, s in (("original", result.original), ("decoded", result.decoded)):
            print(f"{name:<9} val_loss {s.val_loss:.6f}  val_bpb {s.val_bpb:.6f}  {s.tokens:,} tokens in "
                  f"{s.seconds:.2f} s = {s.tokens / s.seconds:,.0f} tokens/s")
        print(f"drift     val_bpb {result.drift_bpb:+.6f}; artifact {result.artifact_bytes:,} bytes, "
              f"{result.bits_per_param:.3f} bits/param")


if __name__ == "__main__":
    main()
