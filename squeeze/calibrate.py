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
    sensitivities: dict     # parameter name -> loss increase per unit mean squared error (empty unless asked)
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


def calibrate(model: nn.Module, tokens: torch.Tensor, batch_size: int = 8, device="cpu", source: str = "",
              sensitivity_names: list = ()) -> Calibration:
    """Hessians of `model` on token windows `tokens` [n, seq_len]; sensitivities of `sensitivity_names` too."""
    model = model.to(device).eval()
    batches = [tokens[i:i + batch_size] for i in range(0, tokens.shape[0], batch_size)]
    hessians = collect_hessians(model, batches, device)
    if not hessians:
        raise SqueezeError("calibration: the model has no nn.Linear layers, so GPTQ has nothing to work on")
    probe = tokens[: max(1, min(tokens.shape[0], 16))]  # a fixed batch: the same for every tensor's probe
    sens = sensitivities(model, probe, list(sensitivity_names), device=device) if sensitivity_names else {}
    return Calibration(hessians=hessians, sensitivities=sens, sequences=tokens.shape[0], tokens=tokens.numel(),
                       source=source)


def calibration_for(state_dict: dict, *, calib: str | None = None, calib_self: int = 0, model: str = "pgolf",
                    model_config=None, seq_len: int = 1024, n_tokens: int = 131072, batch_size: int = 8,
                    device: str | None = None, seed: int = 0, with_sensitivities: bool = False) -> Calibration:
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
    names = [n for n, t in state_dict.items() if t.dim() == 2] if with_sensitivities else []
    return calibrate(net, tokens, batch_size=batch_size, device=device, source=source, sensitivity_names=names)


PROBE_NOISE = 0.25  # relative std of the probe's noise: about what int3-int4 does to a weight


@torch.no_grad()
def sensitivities(model: nn.Module, tokens: torch.Tensor, names: list, noise: float = PROBE_NOISE,
                  device="cpu") -> dict:
    """{parameter name: loss increase per unit of added weight-noise variance}, measured on `tokens` [n, T+1].

    Each tensor gets zero-mean Gaussian noise of std noise·std(tensor), added and then subtracted (an antithetic
    pair cancels the first-order term exactly), so ΔL ≈ ½·tr(∇²L)·σ² and a quantization error of mean square m
    costs about sensitivity·m. This is the budget allocator's exchange rate between bytes and loss; it does not
    extrapolate past the probe (the allocator offers no grid with more error than the probe's noise). Small probes
    drown in the loss's own nonlinearity, and a probe that measures nothing (≤ 0) is floored at 1% of the median,
    so no tensor looks free.
    """
    model = model.to(device).eval()
    params = dict(model.named_parameters())
    x, y = tokens[:, :-1].to(device), tokens[:, 1:].to(device)

    def loss() -> float:
        logits = model(x)
        return float(nn.functional.cross_entropy(logits.float().flatten(0, 1), y.flatten()))

    base = loss()
    g = torch.Generator(device="cpu").manual_seed(0)
    out = {}
    for name in names:
        p = params.get(name)
        if p is None:
            continue
        sigma = noise * float(p.detach().float().std())
        if sigma == 0:
            out[name] = 0.0
            continue
        delta = (torch.randn(p.shape, generator=g) * sigma).to(p.device, p.dtype)
        total = 0.0
        for sign in (1, -1):
            p.add_(sign * delta)
            total += loss() - base
            p.sub_(sign * delta)
        out[name] = max(total / 2, 0.0) / sigma ** 2  # ΔL per unit of mean squared error of the tensor
    positive = sorted(v for v in out.values() if v > 0)
    floor = 0.01 * positive[len(positive) // 2] if positive else 0.0
    return {name: max(v, floor) for name, v in out.items()}
