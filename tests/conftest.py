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


# ---------------------------------------------------------------------------------------------------------------
# Test tiers: plain `pytest -q` runs the fast tier (minutes); `pytest -q --slow` runs every test, as .ci/run does.
# A test is slow when it compiles the whole fixture to a budget, trains, or starts processes: mark it
# `@pytest.mark.slow` (or list its module in SLOW_MODULES when all of it is).

def pytest_addoption(parser):
    parser.addoption("--slow", action="store_true", help="also run the slow tier (what .ci/run runs)")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: in the slow tier, run with --slow (CI runs every tier)")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--slow"):
        return
    fast, slow = [], []
    for item in items:
        (slow if item.get_closest_marker("slow") else fast).append(item)
    if slow:
        config.hook.pytest_deselected(items=slow)
        items[:] = fast
