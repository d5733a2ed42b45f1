"""Scale: compile, load and inspect a ~100M-parameter checkpoint with Parameter Golf GPT shapes on the CPU, each step
in a fresh subprocess, reporting its wall time and peak resident memory (ru_maxrss).

    python bench/scale.py [--layers 15 --dim 1024 --vocab 1024 --heads 16 --kv-heads 4 --mlp-mult 2] [--keep DIR]

The weights are Gaussian (std 0.02, the usual init) in fp32, named and shaped as the challenge's baseline GPT
(squeeze/models/pgolf.py); the recipe is the built-in default (squeeze.Recipe()). Steps:
  baseline  import squeeze (and torch): the floor under every other step's peak
  make      build the state dict and torch.save it (the reference: the fp32 checkpoint's size)
  compile   what `squeeze compile ckpt.pt -o model.sqz` does: read, compile, write, re-read and check
  load      squeeze.load(model.sqz)
  inspect   squeeze.inspect(model.sqz) and its table
"""
import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

STEPS = ("baseline", "make", "compile", "load", "inspect")


def synthetic_state_dict(layers: int, dim: int, vocab: int, heads: int, kv_heads: int, mlp_mult: int) -> dict:
    """Parameter Golf baseline GPT names and shapes, N(0, 0.02) matrices, control tensors at their usual values."""
    import torch
    g = torch.Generator().manual_seed(0)
    kv_dim, hidden = kv_heads * (dim // heads), mlp_mult * dim

    def gaussian(*shape):
        return torch.randn(*shape, generator=g) * 0.02

    sd = {"skip_weights": torch.ones(layers // 2, dim), "tok_emb.weight": gaussian(vocab, dim)}
    for i in range(layers):
        p = f"blocks.{i}."
        sd.update({p + "attn_scale": torch.ones(dim), p + "mlp_scale": torch.ones(dim),
                   p + "resid_mix": torch.stack([torch.ones(dim), torch.zeros(dim)]),
                   p + "attn.q_gain": torch.full((heads,), 1.5),
                   p + "attn.c_q.weight": gaussian(dim, dim), p + "attn.c_k.weight": gaussian(kv_dim, dim),
                   p + "attn.c_v.weight": gaussian(kv_dim, dim), p + "attn.proj.weight": gaussian(dim, dim),
                   p + "mlp.fc.weight": gaussian(hidden, dim), p + "mlp.proj.weight": gaussian(dim, hidden)})
    return sd


def run_step(step: str, workdir: Path, shape: dict) -> dict:
    """One step, in this process; returns what it measured besides time and memory."""
    ckpt, artifact = workdir / "ckpt.pt", workdir / "model.sqz"
    if step == "baseline":
        import squeeze  # noqa: F401
        return {}
    if step == "make":
        import torch
        sd = synthetic_state_dict(**shape)
        torch.save(sd, ckpt)
        return {"params": sum(t.numel() for t in sd.values()), "bytes": ckpt.stat().st_size}
    if step == "compile":
        from squeeze import cli
        cli.main(["compile", str(ckpt), "-o", str(artifact), "--verbose"], standalone_mode=False)
        return {"bytes": artifact.stat().st_size}
    if step == "load":
        import squeeze
        tensors = squeeze.load(artifact)
        return {"tensors": len(tensors), "bytes": sum(t.numel() * t.element_size() for t in tensors.values())}
    import squeeze
    from squeeze.inspect import render
    table = render(squeeze.inspect(artifact))
    return {"lines": len(table.splitlines())}


def measure_in_subprocess(step: str, workdir: Path, shape: dict) -> dict:
    """Run one step in a fresh interpreter, so that its peak RSS is its own."""
    cmd = [sys.executable, __file__, "--run-step", step, "--workdir", str(workdir), "--shape", json.dumps(shape)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"step {step} failed:\n{done.stderr}")
    sys.stderr.write(done.stderr)  # the compile step's --verbose pass log
    return json.loads(done.stdout.strip().splitlines()[-1])


def child(step: str, workdir: str, shape: str):
    start = time.perf_counter()
    result = run_step(step, Path(workdir), json.loads(shape))
    result["seconds"] = time.perf_counter() - start
    result["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: kilobytes
    print(json.dumps(result))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=15)
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--vocab", type=int, default=1024)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--mlp-mult", type=int, default=2)
    ap.add_argument("--keep", metavar="DIR", help="work in DIR and keep the checkpoint and artifact there")
    ap.add_argument("--run-step", choices=STEPS, help=argparse.SUPPRESS)
    ap.add_argument("--workdir", help=argparse.SUPPRESS)
    ap.add_argument("--shape", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.run_step:
        child(args.run_step, args.workdir, args.shape)
        return
    shape = {"layers": args.layers, "dim": args.dim, "vocab": args.vocab, "heads": args.heads,
             "kv_heads": args.kv_heads, "mlp_mult": args.mlp_mult}
    workdir = Path(args.keep or tempfile.mkdtemp(prefix="squeeze-scale-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        results = {step: measure_in_subprocess(step, workdir, shape) for step in STEPS}
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    report(shape, results)


def report(shape: dict, results: dict):
    made = results["make"]
    fp32 = made["bytes"]
    print(f"synthetic Parameter Golf GPT {shape}: {made['params']:,} parameters, fp32 checkpoint {fp32:,} bytes")
    print(f"artifact {results['compile']['bytes']:,} bytes (default recipe), "
          f"{8 * results['compile']['bytes'] / made['params']:.3f} bits/param")
    print(f"{'step':<8} {'seconds':>9} {'peak RSS':>14} {'x fp32 ckpt':>12}")
    for step, r in results.items():
        print(f"{step:<8} {r['seconds']:>9.1f} {r['peak_rss_bytes']:>14,} {r['peak_rss_bytes'] / fp32:>12.2f}")


if __name__ == "__main__":
    main()
