"""The Parameter Golf baseline's export, re-implemented from its description (../shared/research/pgolf-quant.md §1):
per-row int8 with a 99.99984th-percentile clip and a 1/127 scale floor, fp16 row scales, tensors of <= 65,536
elements kept float (control tensors fp32, others fp16), everything in a dict pickled by torch.save, then zlib-9.

Used by bench/size_vs_baseline.py and by the tests, as the yardstick for recipes/int8-baseline.toml.
"""
import io
import zlib

import torch

CONTROL_PATTERNS = ("attn_scale", "attn_scales", "mlp_scale", "mlp_scales", "resid_mix", "resid_mixes", "q_gain",
                    "skip_weight", "skip_weights")
KEEP_FLOAT_MAX_NUMEL = 65_536
CLIP_Q = 99.99984 / 100.0


def quantize_state_dict_int8(state_dict: dict) -> dict:
    quantized, scales, dtypes, passthrough, orig_dtypes, qmeta = {}, {}, {}, {}, {}, {}
    for name, t in state_dict.items():
        t = t.detach().cpu()
        if not t.is_floating_point():
            passthrough[name] = t
            continue
        if t.numel() <= KEEP_FLOAT_MAX_NUMEL:
            if any(p in name for p in CONTROL_PATTERNS):
                passthrough[name] = t.float()
            else:
                orig_dtypes[name] = str(t.dtype).removeprefix("torch.")
                passthrough[name] = t.to(torch.float16)
            continue
        t32 = t.float()
        if t32.ndim == 2:
            clip = torch.quantile(t32.abs(), CLIP_Q, dim=1)
            clipped = torch.maximum(torch.minimum(t32, clip[:, None]), -clip[:, None])
            scale = (clip / 127.0).clamp_min(1.0 / 127.0)
            quantized[name] = torch.clamp(torch.round(clipped / scale[:, None]), -127, 127).to(torch.int8)
            scales[name] = scale.to(torch.float16)
            qmeta[name] = {"scheme": "per_row", "axis": 0}
        else:
            clip = float(torch.quantile(t32.abs().flatten(), CLIP_Q)) if t32.numel() else 0.0
            scale = torch.tensor(clip / 127.0 if clip > 0 else 1.0, dtype=torch.float32)
            quantized[name] = torch.clamp(torch.round(t32.clamp(-clip, clip) / scale), -127, 127).to(torch.int8)
            scales[name] = scale
        dtypes[name] = str(t.dtype).removeprefix("torch.")
    return {"__quant_format__": "int8_clean_per_row_v1", "quantized": quantized, "scales": scales,
            "dtypes": dtypes, "passthrough": passthrough, "qmeta": qmeta, "passthrough_orig_dtypes": orig_dtypes}


def baseline_artifact(state_dict: dict) -> bytes:
    """The bytes the challenge's baseline writes to final_model.int8.ptz."""
    buf = io.BytesIO()
    torch.save(quantize_state_dict_int8(state_dict), buf)
    return zlib.compress(buf.getvalue(), 9)


def dequantize_state_dict_int8(obj: dict) -> dict:
    out = {}
    for name, q in obj["quantized"].items():
        s = obj["scales"][name]
        dtype = getattr(torch, obj["dtypes"][name])
        w = q.float() * (s.float()[:, None] if s.ndim > 0 else s.float())
        out[name] = w.to(dtype)
    for name, t in obj["passthrough"].items():
        orig = obj["passthrough_orig_dtypes"].get(name)
        out[name] = t.to(getattr(torch, orig)) if orig else t
    return out
