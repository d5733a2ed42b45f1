"""The emitted decoder as shipped: its counted bytes in each form, and a bit-exact load of real artifacts (issue 13).

    python bench/decoder_size.py

A record pastes the decoder into its train_gpt.py, where its bytes count against the 16,000,000-byte limit, in the
self-extracting form (`squeeze emit-decoder --wrap lzma|brotli`: one line that exec's the compressed source,
base85). For artifacts of the fixture that use each format feature (1.1 plain, 1.2 low-rank corrections, 1.3 stacks
of a banked checkpoint), this prints the decoder's bytes plain, lzma-wrapped and brotli-wrapped, and checks that
each form, exec'd into a fresh namespace, loads the artifact with every tensor bit-identical to squeeze.load.
"""
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "fixtures"))

import torch  # noqa: E402

import squeeze  # noqa: E402
from squeeze import decoder  # noqa: E402
from squeeze.recipe import parse  # noqa: E402

import banked_gpt  # noqa: E402

CKPT = ROOT / "fixtures" / "pgolf_4x256.pt"


def artifacts() -> dict:
    """{label: artifact bytes}: the default recipe (rans codes, brotli floats), with rank-4 corrections (1.2), and
    the banked layout (1.3 stacks)."""
    sd = torch.load(CKPT, map_location="cpu", weights_only=True)
    lowrank = parse("[defaults]\nlowrank_rank = 4\n", "lowrank.toml")
    return {"1.1 default recipe (brotli + rans)": squeeze.compile(sd),
            "1.2 low-rank corrections (brotli + rans)": squeeze.compile(sd, lowrank),
            "1.3 banked stacks (brotli + rans)": squeeze.compile(banked_gpt.bank_state_dict(sd))}


def same(a: dict, b: dict) -> bool:
    return list(a) == list(b) and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


def main():
    print(f"{'artifact':42} {'minor':>5} {'plain B':>8} {'lzma B':>7} {'brotli B':>8}  bit-exact")
    for label, blob in artifacts().items():
        reference = squeeze.load(blob)
        sizes, exact = [], []
        for how in ("none", "lzma", "brotli"):
            text = decoder.emit_for(blob, wrap=how)
            namespace = {}
            exec(text, namespace)
            sizes.append(len(text.encode("utf-8")))
            exact.append(same(namespace[decoder.NAME](blob), reference))
        minor = squeeze.format.read(blob).minor
        print(f"{label:42} {'1.' + str(minor):>5} {sizes[0]:>8,} {sizes[1]:>7,} {sizes[2]:>8,}  "
              f"{'yes' if all(exact) else 'NO'}")
        if not all(exact):
            raise SystemExit(f"{label}: a decoder form did not load the artifact bit-exactly")


if __name__ == "__main__":
    main()
