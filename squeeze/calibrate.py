"""Calibration: each linear layer's input Hessian H = E[x xᵀ], from the model run on calibration tokens.

GPTQ (squeeze/passes/gptq.py) needs to know which directions of a layer's input space real inputs use. Two sources:
token shards (`--calib 'train_*.bin'`: training data, never the validation set, which would leak into the score) or
sequences the model samples itself (`--calib-self N`: no data needed, what some Parameter Golf records do).

The model comes from the same loader verify uses (squeeze/verify/models.py), so a user's own architecture works as
long as its matrices are the weights of nn.Linear modules (their `.weight` names are the Hessians' keys).
"""
from dataclasses import dataclass

import torch
from torch import nn

from .errors import SqueezeError


@dataclass(frozen=True)
class Calibration:
    hessians: dict          # parameter name ("blocks.0.attn.c_q.weight") -> float64 [in, in], mean of x xᵀ
    sequences: int
    tokens: int
    source: str             # what the tokens were, for the log


def windows_of(stream: torch.Tensor, seq_len: int, n_tokens: int) -> torch.Tensor:
    """Non-overlapping [n, seq_len] windows from the start of a token stream, about n_tokens tokens in all."""
    n = min(max(1, n_tokens // seq_len), (stream.numel()) // seq_len)
    if n == 0:
        raise SqueezeError(f"calibration stream holds {stream.numel()} tokens, fewer than one window of {seq_len}")
    return stream[: n * seq_len].reshape(n, seq_len).long()


@torch.no_grad()
def sample_sequences(model: nn.Module, n: int, seq_len: int, vocab: int, bos: int = 1, seed: int = 0,
                     device="cpu") -> torch.Tensor:
    """n sequences the model writes itself (temperature 1, from BOS), for calibration without data. Seeded, so
    compile stays deterministic."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    seqs = torch.full((n, 1), bos, dtype=torch.long, device=device)
    for _ in range(seq_len - 1):
        logits = model(seqs)[:, -1, :vocab].float().cpu()
        nxt = torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=g)
        seqs = torch.cat([seqs, nxt.to(device)], dim=1)
    return seqs


@torch.no_grad()
def collect_hessians(model: nn.Module, batches, device="cpu") -> dict:
    """{weight name: mean x xᵀ} over every input row each nn.Linear sees while the model runs on `batches`."""
    sums, counts, hooks = {}, {}, []

    def hook_for(name):
        def hook(module, inputs, output):
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).double()
            sums[name] = sums.get(name, 0) + x.T @ x
            counts[name] = counts.get(name, 0) + x.shape[0]
        return hook

    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            hooks.append(module.register_forward_hook(hook_for(f"{name}.weight")))
    try:
        for batch in batches:
            model(batch.to(device))
    finally:
        for h in hooks:
            h.remove()
    return {name: (sums[name] / counts[name]).cpu() for name in sums}


def calibrate(model: nn.Module, tokens: torch.Tensor, batch_size: int = 8, device="cpu", source: str = "") -> \
        Calibration:
    """Hessians of `model` on token windows `tokens` [n, seq_len]."""
    model = model.to(device).eval()
    batches = [tokens[i:i + batch_size] for i in range(0, tokens.shape[0], batch_size)]
    hessians = collect_hessians(model, batches, device)
    if not hessians:
        raise SqueezeError("calibration: the model has no nn.Linear layers, so GPTQ has nothing to work on")
    return Calibration(hessians=hessians, sequences=tokens.shape[0], tokens=tokens.numel(), source=source)


def calibration_for(state_dict: dict, *, calib: str | None = None, calib_self: int = 0, model: str = "pgolf",
                    model_config=None, seq_len: int = 1024, n_tokens: int = 131072, batch_size: int = 8,
                    device: str | None = None, seed: int = 0) -> Calibration:
    """What `squeeze compile --calib/--calib-self` runs: the model (as verify loads it) and its Hessians on
    ~n_tokens calibration tokens from the shards matching `calib`, or on `calib_self` sequences it samples."""
    from .verify import models
    from .verify.stream import load_stream

    if (calib is None) == (not calib_self):
        raise SqueezeError("calibration: give either --calib SHARDS or --calib-self N, not both or neither")
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    config = models.load_model_config(model_config) if isinstance(model_config, str) else dict(model_config or {})
    net = models.resolve(model, config, "--model-config")(state_dict, "checkpoint").to(device).eval()
    vocab = models.vocab_of(net, torch.device(device), model)
    if calib is not None:
        tokens = windows_of(load_stream(calib, vocab, n_tokens), seq_len, n_tokens)
        source = f"{tokens.numel():,} tokens of {calib}"
    else:
        tokens = sample_sequences(net, calib_self, seq_len, vocab, seed=seed, device=device).cpu()
        source = f"{calib_self} sequences of {seq_len} tokens sampled from the model"
    return calibrate(net, tokens, batch_size=batch_size, device=device, source=source)
