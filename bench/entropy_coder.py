"""The entropy coder against byte compressors, on the same quantized codes (issue 3).

    python bench/entropy_coder.py [--ckpt fixtures/pgolf_4x256.pt ...] [--timing-params 36000000]

For each checkpoint: quantize once with the record-style recipe (int6 k=12.85 matrices, int8 k=20 embedding, fp16
small/control tensors), then write the same sections with each codec: brotli-11 (lgwin 24), lzma-9e, zstd-22, rans,
and auto (smallest per section). Reports artifact bytes, codes-only bytes, the order-0 entropy of the codes under
rans's chosen contexts with its tables (the 1.005 target), and lrzip -z -L 9 (ZPAQ, what the best record used) on the
same codes sections when the lrzip program is installed.

Timing: a synthetic checkpoint of the record's size (--timing-params; Gaussian weights with log-normal column
spreads, real shapes) compiled to ~16 MB; encode time of rans, and decode time of the emitted tiny decoder on one
core for the rans artifact vs the brotli one. Figures go to BENCHMARKS.md with the command and machine.
"""
import argparse
import dataclasses
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

import squeeze  # noqa: E402
from squeeze import codecs, compiler, decoder, format, pipeline  # noqa: E402
from squeeze.codecs import rans  # noqa: E402
from squeeze.recipe import parse  # noqa: E402
from squeeze.state import State  # noqa: E402

RECORD_STYLE = """name = "record-style"
[defaults]
bits = 6
clip = "std"
clip_std_k = 12.85
[keep_float]
max_numel = 65536
[encode]
codec = "{codec}"
brotli_quality = 11
brotli_window = 24
zstd_level = 22
lzma_preset = 9
lzma_extreme = true
[[rules]]
match = "re:emb"
bits = 8
clip_std_k = 20.0
"""
CODECS = ("brotli", "lzma", "zstd", "rans", "auto")


def recipe_for(codec: str):
    return parse(RECORD_STYLE.format(codec=codec), "record-style.toml")


def packed_state(sd: dict) -> State:
    """Everything up to (not including) the encode pass, shared by every codec so the codes are identical."""
    state = State(entries=compiler.entries_from_state_dict(sd), recipe=recipe_for("brotli"))
    for name, fn, config in pipeline.passes_for(state.recipe)[:-1]:
        state = fn(state, config)
    return state


def encode_with(state: State, codec: str) -> tuple[bytes, float]:
    recipe = recipe_for(codec)
    entries = tuple(e if e.plan is None else dataclasses.replace(e, plan=dataclasses.replace(e.plan, codec=codec))
                    for e in state.entries)
    s = dataclasses.replace(state, recipe=recipe, entries=entries)
    name, fn, config = pipeline.passes_for(recipe)[-1]
    t0 = time.perf_counter()
    s = fn(s, config)
    seconds = time.perf_counter() - t0
    return compiler.write(s), seconds


def context_entropy_bytes(art: format.Artifact, i: int) -> float:
    """Order-0 entropy of the section's symbols under rans's chosen contexts, plus its model (tables) bytes."""
    sym = np.frombuffer(art.section(i), np.uint8)
    tables, _, ctx, coded = rans.choose_model(sym, art.layouts[i])
    h = sum(rans.entropy_bits(np.bincount(coded[ctx == t], minlength=256)) for t in range(len(tables))) / 8
    stored = art.blob[art.offsets[i]: art.offsets[i] + art.sections[i]["size"]]
    return h + int.from_bytes(stored[4:8], "little")


def lrzip_bytes(data: bytes) -> int | None:
    exe = shutil.which("lrzip")
    if exe is None:
        return None
    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / "codes.bin"
        src.write_bytes(data)
        subprocess.run([exe, "-z", "-L", "9", "-q", "-f", "-o", str(src) + ".lrz", str(src)], check=True,
                       capture_output=True)
        return (Path(d) / "codes.bin.lrz").stat().st_size


def sizes(label: str, sd: dict):
    params = sum(t.numel() for t in sd.values())
    state = packed_state(sd)
    print(f"\n## {label}: {params:,} params")
    print(f"{'codec':<8} {'artifact B':>12} {'vs brotli':>9} {'bits/param':>10} {'codes B':>11} {'encode s':>9}")
    results = {}
    for codec in CODECS:
        blob, seconds = encode_with(state, codec)
        art = format.read(blob)
        codes = sum(s["size"] for s in art.sections if s["name"].endswith(".codes"))
        results[codec] = (blob, art, codes, seconds)
    base = len(results["brotli"][0])
    for codec, (blob, art, codes, seconds) in results.items():
        print(f"{codec:<8} {len(blob):>12,} {len(blob) / base:>9.4f} {8 * len(blob) / params:>10.4f} {codes:>11,} "
              f"{seconds:>9.2f}")
    blob, art, _, _ = results["rans"]
    print(f"\n{'rans section':<18} {'stored B':>10} {'ctx H0+tables B':>16} {'ratio':>7} {'brotli B':>10} "
          f"{'rans/brotli':>11} {'lrzip B':>10}")
    b_art = results["brotli"][1]
    for i, s in enumerate(art.sections):
        if not s["name"].endswith(".codes"):
            continue
        h = context_entropy_bytes(art, i)
        bro = next(x["size"] for x in b_art.sections if x["name"] == s["name"])
        lr = lrzip_bytes(art.section(i))
        print(f"{s['name']:<18} {s['size']:>10,} {h:>16,.0f} {s['size'] / h:>7.4f} {bro:>10,} {s['size'] / bro:>11.4f} "
              f"{'-' if lr is None else f'{lr:,}':>10}")


def synthetic_checkpoint(target_params: int, seed: int = 0) -> dict:
    """Record-sized shapes (dim 512, GQA 8/4 heads, MLP x4, vocab 8192, tied) with Gaussian weights whose columns
    have log-normal spreads, so the codes look like a trained model's to the coder (not to a language model)."""
    g = torch.Generator().manual_seed(seed)
    dim, vocab, kv = 512, 8192, 256
    per_layer = 2 * dim * dim + 2 * kv * dim + 2 * 4 * dim * dim
    layers = max(1, (target_params - vocab * dim) // per_layer)

    def mat(r, c):
        col = torch.exp(0.3 * torch.randn(c, generator=g))
        return (torch.randn(r, c, generator=g) * col * 0.02).float()

    sd = {"tok_emb.weight": mat(vocab, dim).bfloat16()}
    for i in range(layers):
        p = f"blocks.{i}."
        sd.update({p + "attn.c_q.weight": mat(dim, dim), p + "attn.c_k.weight": mat(kv, dim),
                   p + "attn.c_v.weight": mat(kv, dim), p + "attn.proj.weight": mat(dim, dim),
                   p + "mlp.fc.weight": mat(4 * dim, dim), p + "mlp.proj.weight": mat(dim, 4 * dim),
                   p + "attn_scale": torch.ones(dim), p + "mlp_scale": torch.ones(dim)})
    return sd


def load_emitted(blob: bytes, d: Path):
    (d / "model.sqz").write_bytes(blob)
    src = decoder.emit_for(blob)
    path = d / f"decode_{len(blob)}.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module, len(src.encode())


def timing(target_params: int):
    torch.set_num_threads(1)
    sd = synthetic_checkpoint(target_params)
    params = sum(t.numel() for t in sd.values())
    state = packed_state(sd)
    print(f"\n## timing: synthetic checkpoint, {params:,} params, one core (torch threads 1, OMP_NUM_THREADS=1)")
    # decode: the first call (its arrays' pages are new to the process, as in a real load) and the best of 3
    print(f"{'codec':<8} {'artifact B':>12} {'encode s':>9} {'decode 1st':>9} {'best of 3':>9} {'decoder B':>10}")
    with tempfile.TemporaryDirectory() as d:
        for codec in ("brotli", "rans"):
            blob, enc_s = encode_with(state, codec)
            module, src_bytes = load_emitted(blob, Path(d))
            seconds = []
            for _ in range(3):
                t0 = time.perf_counter()
                module.squeeze_load(str(Path(d) / "model.sqz"))
                seconds.append(time.perf_counter() - t0)
            print(f"{codec:<8} {len(blob):>12,} {enc_s:>9.2f} {seconds[0]:>9.2f} {min(seconds):>9.2f} "
                  f"{src_bytes:>10,}")
        blob, _ = encode_with(state, "rans")
        art = format.read(blob)
        t0 = time.perf_counter()
        for i, s in enumerate(art.sections):
            if s["codec"] == "rans":
                art.section(i)
        print(f"rans sections alone, library decoder: {time.perf_counter() - t0:.2f} s")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ckpt", nargs="*", default=[str(ROOT / "fixtures/pgolf_4x256.pt")])
    ap.add_argument("--timing-params", type=int, default=36_000_000, help="0 skips the timing run")
    args = ap.parse_args()
    for path in args.ckpt:
        sizes(Path(path).name, torch.load(path, map_location="cpu", weights_only=True))
    if args.timing_params:
        timing(args.timing_params)


if __name__ == "__main__":
    main()
