"""A small Parameter Golf-style training script that exports with squeeze at its end, inside its time budget.

    python examples/train_gpt_export.py                                   # ~1 min on 2 CPU cores
    torchrun --nproc_per_node=2 examples/train_gpt_export.py              # each rank its own batches (gloo/nccl)
    python examples/train_gpt_export.py --steps 30 --dim 64 --layers 2    # what CI runs

What a record's train_gpt.py does, at toy size:
1. trains a record-style GPT (3-D parameter banks used as F.linear(x, bank[i]), a tied head, a looped layer,
   forward(ids, targets) returning the loss; fixtures/banked_gpt.py) on the first 85% of the repo's token shard;
2. keeps the last training batches as calibration batches and calls `squeeze.export(...)` with a byte budget, its
   own source and the decoder's bytes counted as code, and a calibration time limit;
3. reloads the artifact through the lzma-wrapped emitted decoder exec'd in this script (as a record would paste
   it) and scores the round trip on the held-out 15%: loss and bits per byte, before and after.

Under torchrun every rank trains on its own batches (gradients all-reduced), calibrates on its own batches (the
Hessians are summed across ranks), and rank 0 writes the artifact.
"""
import argparse
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "fixtures"))

import squeeze  # noqa: E402
from banked_gpt import BankedGPT  # noqa: E402
from squeeze.data import read_shard  # noqa: E402
from squeeze.decoder import emit_for  # noqa: E402
from squeeze.models.pgolf import GPTConfig  # noqa: E402
from squeeze.verify.bpb import byte_table, load_tokenizer  # noqa: E402

DECODER_RESERVE = 4_000  # bytes of code the pasted decoder will take, counted before it exists
# The toy's matrices are small (the records keep tensors of <= 65,536 elements float at d = 512): quantize what is
# larger than 4,096 elements, and let the budget choose each matrix's grid.
RECIPE = squeeze.recipe.parse('name = "toy"\n[defaults]\nbits = 6\nclip = "std"\nclip_std_k = 8.0\n'
                              '[keep_float]\nmax_numel = 4096\n', "toy.toml")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch", type=int, default=16, help="sequences per step per rank")
    ap.add_argument("--calib-batches", type=int, default=8)
    ap.add_argument("--bits-per-param", type=float, default=5.0, help="the artifact's byte budget, per parameter")
    ap.add_argument("--time-limit", type=float, default=10.0, help="seconds calibration may take")
    ap.add_argument("--out", default="final_model.sqz")
    ap.add_argument("--data", default=str(ROOT / "fixtures/val_000000.bin"))
    ap.add_argument("--tokenizer", default=str(ROOT / "fixtures/tokenizer_1024_bpe.model"))
    args = ap.parse_args()

    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if torch.cuda.is_available() else \
        torch.device("cpu")
    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    torch.manual_seed(1234)  # the same initial weights on every rank

    tokens = torch.from_numpy(read_shard(args.data))
    split = int(tokens.numel() * 0.85)
    train, heldout = tokens[:split], tokens[split:]
    cfg = GPTConfig(vocab_size=1024, num_layers=args.layers, model_dim=args.dim, num_heads=4, num_kv_heads=2,
                    mlp_mult=2)
    loops = (0, 1, 2) if args.layers >= 2 else None  # layer 0 runs twice per pass, as the records' loops
    model = BankedGPT(cfg, loops=loops).to(device)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bank") or name == "tok_emb.weight":
                p.normal_(0, 0.02)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)

    def batch(step: int):
        """Sequences for this step on this rank (deterministic: ranks read different windows)."""
        g = torch.Generator().manual_seed(step * world + rank)
        starts = torch.randint(0, train.numel() - args.seq_len - 1, (args.batch,), generator=g)
        w = torch.stack([train[s:s + args.seq_len + 1] for s in starts.tolist()]).long()
        return w[:, :-1], w[:, 1:]

    t0 = time.perf_counter()
    model.train()
    for step in range(args.steps):
        x, y = batch(step)
        loss = model(x.to(device), y.to(device))  # the records' forward: (ids, targets) -> mean loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if world > 1:
            for p in model.parameters():
                dist.all_reduce(p.grad)
                p.grad /= world
        opt.step()
        if rank == 0 and (step % 100 == 0 or step == args.steps - 1):
            print(f"step {step:4d}  train loss {loss.item():.4f}  {time.perf_counter() - t0:.1f} s", flush=True)

    # --- export: the five lines a record adds at its end --------------------------------------------------------
    calib = [batch(args.steps + i) for i in range(args.calib_batches)]  # batches the script already makes
    params = sum(p.numel() for p in model.state_dict().values())
    code = [__file__, DECODER_RESERVE]  # what the challenge counts beside the artifact
    budget = int(args.bits_per_param * params / 8) + Path(__file__).stat().st_size + DECODER_RESERVE
    result = squeeze.export(model, calib, args.out, recipe=RECIPE, budget=budget, code=code,
                            time_limit=args.time_limit)
    if rank == 0:
        print(result.summary(), flush=True)

    # --- round trip through the decoder a record pastes into its script ---------------------------------------
    if rank == 0:
        wrapped = emit_for(args.out, wrap="lzma")
        assert len(wrapped.encode()) <= DECODER_RESERVE, f"decoder {len(wrapped.encode())} B > reserve"
        namespace = {}
        exec(wrapped, namespace)  # adds one name: the decoder's load function
        (load,) = [v for k, v in namespace.items() if k != "__builtins__"]
        decoded = BankedGPT(cfg, loops=loops).to(device)
        decoded.load_state_dict({k: v.to(device) for k, v in load(args.out).items()}, strict=True)
        table = byte_table(load_tokenizer(args.tokenizer))
        before, after = (heldout_score(m, heldout, table, args.seq_len, device) for m in (model, decoded))
        print(f"held-out: loss {before[0]:.4f} -> {after[0]:.4f} nats, bpb {before[1]:.4f} -> {after[1]:.4f} "
              f"(drift {after[1] - before[1]:+.4f}); artifact {len(result.blob):,} B + code {result.code_bytes:,} B "
              f"(decoder {len(wrapped.encode()):,} B of the {DECODER_RESERVE:,} reserved)", flush=True)
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


@torch.no_grad()
def heldout_score(model, tokens, table, seq_len: int, device) -> tuple[float, float]:
    """(mean loss in nats, bits per byte) over non-overlapping windows, bytes counted as the challenge does."""
    model.eval()
    n = (tokens.numel() - 1) // seq_len
    x = tokens[: n * seq_len].reshape(n, seq_len).long()
    y = tokens[1: n * seq_len + 1].reshape(n, seq_len).long()
    nats = n_bytes = 0.0
    for i in range(0, n, 16):
        xb, yb = x[i:i + 16].to(device), y[i:i + 16].to(device)
        logits = model.forward_logits(xb).float()
        nats += F.cross_entropy(logits.flatten(0, 1), yb.flatten(), reduction="sum").item()
        n_bytes += table.to(device).count(xb, yb).sum().item()
    return nats / (n * seq_len), nats / math.log(2) / n_bytes


if __name__ == "__main__":
    main()
