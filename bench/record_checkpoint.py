"""A benchmark checkpoint in a record's architecture: the baseline checkpoint in fixtures/record_gpt.py's layout,
its new tensors trained (issue 15's second benchmark checkpoint).

    python bench/record_checkpoint.py --ckpt BASELINE.pt --train TRAIN_SHARD --out OUT.pt [--record 04-27]

record_gpt.record_state_dict puts the baseline's weights into the record's layout (parameter banks) and adds the
record's tensors (gates, lanes, ...), seeded; this script then trains the whole model for --steps steps (AdamW, linear
warmup and decay) on windows of the training shard, so that the new structure is used as training would use it, and
writes OUT.pt (a state dict, every tensor float32 except tok_emb.weight in bf16 as the fixture has it) and OUT.json
(the command's settings and the loss on the fixture's validation shard before and after). Deterministic for a seed
on one machine and thread count.

The model config to pass with it (verify's and compile's --model-config) is written to OUT.config.json.
"""
import argparse
import json
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "fixtures"))

import torch  # noqa: E402

from squeeze.data import read_shard  # noqa: E402

import record_gpt  # noqa: E402


@torch.no_grad()
def val_loss(model, tokens: torch.Tensor, seq_len: int) -> float:
    n = (tokens.numel() - 1) // seq_len
    x = tokens[:n * seq_len].reshape(n, seq_len).long()
    y = tokens[1:n * seq_len + 1].reshape(n, seq_len).long()
    return float(sum(model(x[i:i + 16], y[i:i + 16]) * len(x[i:i + 16]) for i in range(0, n, 16)) / n)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ckpt", required=True, help="a baseline-layout checkpoint (e.g. train_fixture.py's)")
    ap.add_argument("--train", required=True, help="a training token shard")
    ap.add_argument("--val", default=str(ROOT / "fixtures/val_000000.bin"))
    ap.add_argument("--out", required=True)
    ap.add_argument("--record", default="04-27", choices=sorted(record_gpt.RECORDS))
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--batch-seqs", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    config = {"record": args.record}
    baseline = torch.load(args.ckpt, map_location="cpu", weights_only=True)
    model = record_gpt.build(record_gpt.record_state_dict(baseline, config, seed=args.seed), config).float()
    train = torch.from_numpy(read_shard(args.train).astype("int64"))
    val = torch.from_numpy(read_shard(args.val).astype("int64"))
    before = val_loss(model.eval(), val, args.seq_len)
    print(f"{args.record} from {args.ckpt}: val loss {before:.4f} before training", flush=True)

    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    warmup = max(1, args.steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warmup, max(0.0, (args.steps - s) / max(1, args.steps - warmup))))
    g = torch.Generator().manual_seed(args.seed)
    t0 = time.perf_counter()
    model.train()
    for step in range(args.steps):
        starts = torch.randint(0, train.numel() - args.seq_len - 1, (args.batch_seqs,), generator=g)
        at = starts[:, None] + torch.arange(args.seq_len + 1)
        chunk = train[at]
        loss = model(chunk[:, :-1], chunk[:, 1:])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 20 == 0 or step == args.steps - 1:
            print(f"step {step}/{args.steps} loss {loss.item():.4f} {time.perf_counter() - t0:.0f} s", flush=True)
    after = val_loss(model.eval(), val, args.seq_len)
    print(f"val loss {after:.4f} after {args.steps} steps", flush=True)

    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    sd["tok_emb.weight"] = sd["tok_emb.weight"].to(torch.bfloat16)
    out = Path(args.out)
    torch.save(sd, out)
    Path(str(out) + ".config.json").write_text(json.dumps(config) + "\n")
    Path(out.with_suffix(".json")).write_text(json.dumps({
        "record": args.record, "baseline": str(args.ckpt), "train": str(args.train), "steps": args.steps,
        "batch_seqs": args.batch_seqs, "seq_len": args.seq_len, "lr": args.lr, "seed": args.seed,
        "threads": args.threads, "params": sum(v.numel() for v in sd.values()),
        "val_loss_before": before, "val_loss_after": after, "train_seconds": round(time.perf_counter() - t0, 1),
        "torch": torch.__version__, "nan_free": all(math.isfinite(float(v.float().abs().sum())) for v in sd.values()),
    }, indent=1) + "\n")
    print(f"wrote {out}, {out.with_suffix('.json')}, {out}.config.json")


if __name__ == "__main__":
    main()
