"""Run by tests/test_export.py under torchrun (gloo): each rank exports the banked fixture model on its half of the
calibration batches; rank 0 writes the artifact and saves the Hessians for the test to compare; then once more to a
budget low enough for int2 grids, which the budget measures (squeeze/measured.py) on each rank's units."""
import sys
from pathlib import Path

import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import squeeze  # noqa: E402
from test_export import BUDGET, CODE, LOW_BUDGET, RECIPE, calibration_batches, banked_model  # noqa: E402


def main(out: str):
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    model, sd = banked_model()
    batches = calibration_batches()[rank::world]
    result = squeeze.export(model, batches, out, recipe=RECIPE, budget=BUDGET, code=CODE, progress=False)
    if rank == 0:
        torch.save({"hessians": result.calibration.hessians, "tokens": result.calibration.tokens}, out + ".pt")
    low = squeeze.export(model, batches, out + ".low", recipe=RECIPE, budget=LOW_BUDGET, code=CODE, progress=False)
    if rank == 0:
        torch.save({"measured": list(low.measured)}, out + ".low.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
