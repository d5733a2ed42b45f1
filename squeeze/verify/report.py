"""The human-readable verify report (the JSON one is VerifyResult.to_dict)."""


def render(result) -> str:
    windows = "non-overlapping" if result.stride is None else f"sliding, stride {result.stride}"
    procs = "1 process" if result.world_size == 1 else f"{result.world_size} processes"
    lines = [
        f"{result.artifact} vs {result.checkpoint} on {result.val}: seq_len {result.seq_len}, {windows}; "
        f"{result.device} {result.precision}, {procs}",
        f"bytes: {result.byte_source.label}" + (" (found beside the token shards)" if result.byte_source.found else ""),
        f"{'weights':<9} {'val_loss':>10} {'val_bpb':>10} {'tokens':>12} {'bytes':>12} {'seconds':>9}",
    ]
    scores = (("original", result.original), ("decoded", result.decoded), ("mirrored", result.mirrored))
    for name, s in ((name, s) for name, s in scores if s is not None):
        lines.append(f"{name:<9} {s.val_loss:>10.6f} {s.val_bpb:>10.6f} {s.tokens:>12,} {s.bytes:>12,} "
                     f"{s.seconds:>9.2f}")
    lines.append(f"{'drift':<9} {result.drift_loss:>+10.6f} {result.drift_bpb:>+10.6f}")
    if result.mirrored is not None:
        lines.append(f"drift = even {result.drift_even_bpb:+.6f} (curvature) + odd {result.drift_odd_bpb:+.6f} "
                     f"(validation gradient along the error) bits/byte; mirrored = 2*W - decoded")
    lines.append(f"artifact {result.artifact}: {result.artifact_bytes:,} bytes, {result.params:,} params, "
                 f"{result.bits_per_param:.3f} bits/param")
    return "\n".join(lines)
