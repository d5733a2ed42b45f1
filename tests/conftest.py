"""Shared test fixtures: the bundled checkpoint (trained by fixtures/train_fixture.py on real English text)."""
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "fixtures"
CKPT = FIXTURES / "pgolf_4x256.pt"
RECIPES = ROOT / "recipes"
sys.path.insert(0, str(ROOT))  # for bench/ helpers used as yardsticks


@pytest.fixture(scope="session")
def fixture_sd() -> dict:
    """The fixture's state dict, loaded the safe way."""
    return torch.load(CKPT, map_location="cpu", weights_only=True)


@pytest.fixture(scope="session")
def fixture_small(fixture_sd) -> dict:
    """A cut of the fixture that compiles in well under a second: first block, embedding, control tensors."""
    keep = ("tok_emb.weight", "skip_weights", "blocks.0.")
    return {k: v for k, v in fixture_sd.items() if k.startswith(keep)}


def bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, shape and bits (NaN-safe, -0.0 distinct from 0.0)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.dtype == torch.bool:
        return torch.equal(a, b)
    return torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))
