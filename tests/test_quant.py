"""The quantizer on the fixture's real weight matrices."""
import pytest
import torch

from squeeze import quant
from squeeze.quant import QuantSpec

MATRIX = "blocks.1.mlp.fc.weight"


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("clip,value", [("absmax", 0), ("percentile", 99.9), ("std", 4.0), ("mse", 0)])
def test_codes_in_range_and_reconstruction_bounded(fixture_sd, bits, clip, value):
    w = fixture_sd[MATRIX]
    spec = QuantSpec(bits=bits, clip=clip, clip_value=value)
    codes, scales = quant.quantize(w, spec)
    assert codes.dtype == torch.int8 and codes.shape == w.shape
    assert codes.abs().max() <= spec.qmax and scales.shape == (w.shape[0], 1) and scales.dtype == torch.float16
    w_hat = quant.dequantize(codes, scales, 0, torch.float32, w.shape)
    # inside the clip range the error is at most half a step
    s = scales.float()
    inside = w.abs() <= s * spec.qmax
    assert ((w_hat - w).abs() <= s / 2 * (1 + 1e-3))[inside].all()


def test_absmax_clips_nothing_and_mse_is_never_worse(fixture_sd):
    w = fixture_sd[MATRIX]
    errs = {}
    for clip in ("absmax", "mse"):
        spec = QuantSpec(bits=4, clip=clip)
        codes, scales = quant.quantize(w, spec)
        errs[clip] = (quant.dequantize(codes, scales, 0, torch.float32, w.shape) - w).square().sum(1)
    assert (errs["mse"] <= errs["absmax"] * (1 + 1e-6)).all()
    assert errs["mse"].sum() < 0.9 * errs["absmax"].sum()  # at 4 bits clipping pays on real weights


def test_std_clip_sets_the_step_from_the_row_spread(fixture_sd):
    w = fixture_sd[MATRIX]
    spec = QuantSpec(bits=6, clip="std", clip_value=12.0)
    _, scales = quant.quantize(w, spec)
    expected = 12.0 * w.std(dim=1, correction=0) / 31
    assert torch.allclose(scales.float()[:, 0], expected, rtol=1e-3)


@pytest.mark.parametrize("group", [64, 100, 256])
def test_groups_including_a_short_last_group(fixture_sd, group):
    w = fixture_sd[MATRIX]  # 256 columns: group 100 leaves a last group of 56
    spec = QuantSpec(bits=5, group=group, clip="absmax")
    codes, scales = quant.quantize(w, spec)
    assert scales.shape == (w.shape[0], -(-w.shape[1] // group))
    w_hat = quant.dequantize(codes, scales, group, torch.float32, w.shape)
    # absmax per group: every element within half a step of its group's scale
    step = scales.float().repeat_interleave(group, 1)[:, : w.shape[1]]
    assert ((w_hat - w).abs() <= step / 2 * (1 + 1e-3)).all()
    # finer groups never reconstruct worse than per-row scales
    row_codes, row_scales = quant.quantize(w, QuantSpec(bits=5))
    row_err = (quant.dequantize(row_codes, row_scales, 0, torch.float32, w.shape) - w).square().sum()
    assert (w_hat - w).square().sum() <= row_err


def test_all_zero_rows_and_scale_floor():
    w = torch.zeros(4, 16)
    w[1] = 1e-4
    codes, scales = quant.quantize(w, QuantSpec(bits=8))
    assert codes[0].eq(0).all() and scales[0] == 1  # no NaN from a zero scale
    codes, scales = quant.quantize(w, QuantSpec(bits=8, scale_min=1 / 127))
    assert torch.allclose(scales.float()[1], torch.tensor(1 / 127), rtol=1e-3) and codes[1].eq(0).all()


def test_scale_overflow_is_reported_by_name():
    with pytest.raises(ValueError, match="big.weight: a scale exceeds the range of f16"):
        quant.quantize(torch.full((2, 4), 1e9), QuantSpec(bits=8), "big.weight")


def test_matrix_shape():
    assert quant.matrix_shape((3, 4, 5)) == (3, 20)
    assert quant.matrix_shape((7,)) == (1, 7)
    assert quant.matrix_shape(()) == (1, 1)
