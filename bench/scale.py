"""Scale: compile, load and inspect a ~100M-parameter checkpoint with Parameter Golf GPT shapes on the CPU, each step
in a fresh subprocess, reporting its wall time and peak resident memory (ru_maxrss).

    python bench/scale.py [--layers 15 --dim 1024 --vocab 1024 --heads 16 --kv-heads 4 --mlp-mult 2] [--keep DIR]
                          [--safetensors] [--recipe FILE | --rans-only] [--steps compile,load]
    python bench/scale.py --1b      # 1.06B parameters: --layers 24 --dim 2048 --mlp-mult 4 --safetensors --rans-only

The weights are Gaussian (std 0.02, the usual init) in fp32, named and shaped as the challenge's baseline GPT
(squeeze/models/pgolf.py); the recipe is the built-in default (squeeze.Recipe()), or `--recipe FILE`, or with
`--rans-only` the built-in default with rans as its only codec (brotli-11 on a 1B-parameter model takes hours).
`--safetensors` saves the checkpoint as .safetensors instead of torch.save's .pt. Steps:
  baseline  import squeeze (and torch): the floor under every other step's peak
  make      build the state dict and save it (the reference: the fp32 checkpoint's size)
  compile   what `squeeze compile ckpt.pt -o model.sqz` does: read, compile, write, re-read and check
  load      squeeze.load(model.sqz)
  inspect   squeeze.inspect(model.sqz) and its table
load and inspect lift the reader's 1 GiB bound on decoded bytes (max_decoded_bytes), which a 1B model exceeds.
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
NO_BOUND = 1 << 62  # max_decoded_bytes for the bench's own artifacts (the reader's default is 1 GiB)
# squeeze.Recipe() with rans as the only codec: the same plans, no brotli-11 (hours on a 1B-parameter model)
RANS_ONLY = """name = "default-rans"
description = "the built-in default recipe with rans as the only codec (bench/scale.py --rans-only)"

[defaults]
bits = 6
clip = "std"
clip_std_k = 6.425

[keep_float]
control_dtype = "fp16"

[encode]
candidates = ["rans"]

[[rules]]
match = "*"
role = "embedding"
bits = 8
clip = "std"
clip_std_k = 10.0
"""
ONE_B = {"layers": 24, "dim": 2048, "mlp_mult": 4}  # 1,059,283,328 parameters (heads 16, kv heads 4, vocab 1024)


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


def run_step(step: str, workdir: Path, shape: dict, options: dict) -> dict:
    """One step, in this process; returns what it measured besides time and memory. `options`: {"safetensors":
    bool, "recipe": path or None}."""
    ckpt = workdir / ("ckpt.safetensors" if options.get("safetensors") else "ckpt.pt")
    artifact = workdir / "model.sqz"
    if step == "baseline":
        import squeeze  # noqa: F401
        return {}
    if step == "make":
        import torch
        sd = synthetic_state_dict(**shape)
        if options.get("safetensors"):
            from safetensors.torch import save_file
            save_file(sd, str(ckpt))
        else:
            torch.save(sd, ckpt)
        return {"params": sum(t.numel() for t in sd.values()), "bytes": ckpt.stat().st_size}
    if step == "compile":
        from squeeze import cli
        recipe = ["--recipe", options["recipe"]] if options.get("recipe") else []
        cli.main(["compile", str(ckpt), "-o", str(artifact), "--verbose", *recipe], standalone_mode=False)
        return {"bytes": artifact.stat().st_size}
    if step == "load":
        import squeeze
        tensors = squeeze.load(artifact, max_decoded_bytes=NO_BOUND)
        return {"tensors": len(tensors), "bytes": sum(t.numel() * t.element_size() for t in tensors.values())}
    import squeeze
    from squeeze.inspect import render
    table = render(squeeze.inspect(artifact, max_decoded_bytes=NO_BOUND))
    return {"lines": len(table.splitlines())}


def measure_in_subprocess(step: str, workdir: Path, shape: dict, options: dict) -> dict:
    """Run one step in a fresh interpreter, so that its peak RSS is its own."""
    cmd = [sys.executable, __file__, "--run-step", step, "--workdir", str(workdir), "--shape", json.dumps(shape),
           "--options", json.dumps(options)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"step {step} failed:\n{done.stderr}")
    sys.stderr.write(done.stderr)  # the compile step's --verbose pass log
    return json.loads(done.stdout.strip().splitlines()[-1])


def child(step: str, workdir: str, shape: str, options: str):
    start = time.perf_counter()
    result = run_step(step, Path(workdir), json.loads(shape), json.loads(options or "{}"))
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
    ap.add_argument("--safetensors", action="store_true", help="save the checkpoint as .safetensors")
    which = ap.add_mutually_exclusive_group()
    which.add_argument("--recipe", metavar="FILE", help="compile with this recipe (default: the built-in one)")
    which.add_argument("--rans-only", action="store_true", help="the built-in recipe with rans as its only codec")
    ap.add_argument("--1b", dest="one_b", action="store_true",
                    help="1B parameters: --layers 24 --dim 2048 --mlp-mult 4 --safetensors --rans-only")
    ap.add_argument("--steps", default=",".join(STEPS[2:]),
                    help=f"comma-separated steps after baseline and make, of {', '.join(STEPS[2:])} (default: all)")
    ap.add_argument("--keep", metavar="DIR", help="work in DIR and keep the checkpoint and artifact there")
    ap.add_argument("--run-step", choices=STEPS, help=argparse.SUPPRESS)
    ap.add_argument("--workdir", help=argparse.SUPPRESS)
    ap.add_argument("--shape", help=argparse.SUPPRESS)
    ap.add_argument("--options", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.run_step:
        child(args.run_step, args.workdir, args.shape, args.options)
        return
    if args.one_b:
        if args.recipe:
            ap.error("--1b compiles with --rans-only; give --layers 24 --dim 2048 --mlp-mult 4 --safetensors "
                     "--recipe FILE instead")
        args.layers, args.dim, args.mlp_mult = ONE_B["layers"], ONE_B["dim"], ONE_B["mlp_mult"]
        args.safetensors = args.rans_only = True
    steps = ("baseline", "make", *[s for s in STEPS[2:] if s in args.steps.split(",")])
    shape = {"layers": args.layers, "dim": args.dim, "vocab": args.vocab, "heads": args.heads,
             "kv_heads": args.kv_heads, "mlp_mult": args.mlp_mult}
    workdir = Path(args.keep or tempfile.mkdtemp(prefix="squeeze-scale-"))
    workdir.mkdir(parents=True, exist_ok=True)
    options = {"safetensors": args.safetensors, "recipe": str(Path(args.recipe).resolve()) if args.recipe else None}
    if args.rans_only:
        (workdir / "rans-only.toml").write_text(RANS_ONLY)
        options["recipe"] = str(workdir / "rans-only.toml")
    try:
        results = {}
        for step in steps:
            results[step] = measure_in_subprocess(step, workdir, shape, options)
            sys.stderr.write(f"  [{step}: {results[step]['seconds']:.1f} s, peak RSS "
                             f"{results[step]['peak_rss_bytes']:,} B]\n")
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    report(shape, results, options)


def report(shape: dict, results: dict, options: dict):
    made = results["make"]
    fp32 = made["bytes"]
    kind = "safetensors" if options.get("safetensors") else "torch.save"
    print(f"synthetic Parameter Golf GPT {shape}: {made['params']:,} parameters, fp32 checkpoint ({kind}) "
          f"{fp32:,} bytes")
    recipe = Path(options["recipe"]).stem if options.get("recipe") else "default"
    if "compile" in results:
        print(f"artifact {results['compile']['bytes']:,} bytes (recipe {recipe}), "
              f"{8 * results['compile']['bytes'] / made['params']:.3f} bits/param")
    print(f"{'step':<8} {'seconds':>9} {'peak RSS':>14} {'x fp32 ckpt':>12}")
    for step, r in results.items():
        print(f"{step:<8} {r['seconds']:>9.1f} {r['peak_rss_bytes']:>14,} {r['peak_rss_bytes'] / fp32:>12.2f}")


if __name__ == "__main__":
    main()
