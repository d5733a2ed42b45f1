"""The OpenAI Parameter Golf baseline GPT, rebuilt from a state dict.

This mirrors the model in the challenge's ``train_gpt.py`` (9x512 by default):
parameter names, shapes, initialisation and forward pass match, so a
``final_model.pt`` written by that script (or by ``fixtures/train_fixture.py``)
loads here with ``load_state_dict(strict=True)`` and gives the same logits.

Shape summary (all linears bias-free, weight ``[out, in]``)::

    tok_emb.weight                  [vocab, dim]   (also the LM head when tied)
    lm_head.weight                  [vocab, dim]   (only when untied)
    skip_weights                    [num_layers // 2, dim]
    blocks.{i}.attn.c_q.weight      [dim, dim]
    blocks.{i}.attn.c_k.weight      [kv_heads * head_dim, dim]
    blocks.{i}.attn.c_v.weight      [kv_heads * head_dim, dim]
    blocks.{i}.attn.proj.weight     [dim, dim]
    blocks.{i}.attn.q_gain          [num_heads]
    blocks.{i}.mlp.fc.weight        [mlp_mult * dim, dim]
    blocks.{i}.mlp.proj.weight      [dim, mlp_mult * dim]
    blocks.{i}.attn_scale           [dim]
    blocks.{i}.mlp_scale            [dim]
    blocks.{i}.resid_mix            [2, dim]
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# Init std of the tied embedding in the baseline (it doubles as the LM head,
# so it starts small to keep the initial logits near uniform).
TIED_EMBED_INIT_STD = 0.005


@dataclass
class GPTConfig:
    vocab_size: int = 1024
    num_layers: int = 9
    model_dim: int = 512
    num_heads: int = 8
    num_kv_heads: int = 4
    mlp_mult: int = 2
    rope_base: float = 10000.0
    logit_softcap: float = 30.0
    tie_embeddings: bool = True
    qk_gain_init: float = 1.5

    @property
    def head_dim(self) -> int:
        return self.model_dim // self.num_heads

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    def validate(self) -> None:
        if self.model_dim % self.num_heads:
            raise ValueError(f"model_dim {self.model_dim} not divisible by num_heads {self.num_heads}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} not divisible by num_kv_heads {self.num_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim {self.head_dim} must be even for RoPE")
        if self.logit_softcap <= 0:
            raise ValueError(f"logit_softcap must be positive, got {self.logit_softcap}")


def config_from_state_dict(sd: dict[str, Tensor], **overrides) -> GPTConfig:
    """Infer a GPTConfig from parameter names and shapes.

    Everything but the head count follows from shapes; the head count comes from
    ``q_gain`` (one gain per head).  Without ``q_gain`` pass ``num_heads=``.
    Non-shape settings (rope_base, logit_softcap, qk_gain_init) are not stored
    in the state dict and keep their baseline defaults unless overridden.
    """
    vocab_size, model_dim = sd["tok_emb.weight"].shape
    layer_ids = {int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))}
    num_layers = len(layer_ids)
    if layer_ids != set(range(num_layers)):
        raise ValueError(f"block indices are not 0..n-1: {sorted(layer_ids)}")
    if num_layers == 0:
        raise ValueError("state dict has no blocks.{i}.* parameters")
    kv_dim = sd["blocks.0.attn.c_k.weight"].shape[0]
    hidden = sd["blocks.0.mlp.fc.weight"].shape[0]
    if hidden % model_dim:
        raise ValueError(f"mlp hidden {hidden} is not a multiple of model_dim {model_dim}")

    num_heads = overrides.pop("num_heads", None)
    if num_heads is None:
        if "blocks.0.attn.q_gain" not in sd:
            raise ValueError("cannot infer num_heads without blocks.0.attn.q_gain; pass num_heads=")
        num_heads = sd["blocks.0.attn.q_gain"].numel()
    head_dim = model_dim // num_heads
    fields = dict(
        vocab_size=int(vocab_size),
        num_layers=num_layers,
        model_dim=int(model_dim),
        num_heads=int(num_heads),
        num_kv_heads=int(kv_dim // head_dim),
        mlp_mult=int(hidden // model_dim),
        tie_embeddings="lm_head.weight" not in sd,
    )
    fields.update(overrides)
    cfg = GPTConfig(**fields)
    cfg.validate()
    return cfg


def rms_norm(x: Tensor) -> Tensor:
    # Parameter-free RMSNorm over the last dim; eps=None means torch's default
    # (finfo(dtype).eps), exactly as the baseline.
    return F.rms_norm(x, (x.size(-1),))


class CastedLinear(nn.Linear):
    # Weights stay fp32 for the optimizer; the matmul runs in the input's dtype
    # (bf16 under autocast in the challenge, fp32 here by default).
    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight.to(x.dtype))


class Rotary(nn.Module):
    def __init__(self, head_dim: int, base: float):
        super().__init__()
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        # Derived from the config, so not saved in the state dict.
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, seq_len: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        t = torch.arange(seq_len, device=self.inv_freq.device, dtype=torch.float32)
        freqs = torch.outer(t, self.inv_freq.float())[None, None]  # [1, 1, T, hd/2]
        return freqs.cos().to(dtype), freqs.sin().to(dtype)


def apply_rotary_emb(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    # Half-split rotation (not interleaved pairs), as in the baseline.
    half = x.size(-1) // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat((x1 * cos + x2 * sin, -x1 * sin + x2 * cos), dim=-1)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.c_q = CastedLinear(cfg.model_dim, cfg.model_dim, bias=False)
        self.c_k = CastedLinear(cfg.model_dim, cfg.kv_dim, bias=False)
        self.c_v = CastedLinear(cfg.model_dim, cfg.kv_dim, bias=False)
        self.proj = CastedLinear(cfg.model_dim, cfg.model_dim, bias=False)
        self.proj._zero_init = True  # each block starts as the identity
        # q/k are RMS-normalised, so a learned per-head gain sets the attention temperature.
        self.q_gain = nn.Parameter(torch.full((cfg.num_heads,), cfg.qk_gain_init, dtype=torch.float32))
        self.rotary = Rotary(cfg.head_dim, cfg.rope_base)

    def forward(self, x: Tensor) -> Tensor:
        B, T, D = x.shape
        q = self.c_q(x).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.c_k(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.c_v(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = rms_norm(q), rms_norm(k)  # QK-norm over head_dim
        cos, sin = self.rotary(T, q.dtype)
        q, k = apply_rotary_emb(q, cos, sin), apply_rotary_emb(k, cos, sin)
        q = q * self.q_gain.to(q.dtype)[None, :, None, None]
        y = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, enable_gqa=self.num_kv_heads != self.num_heads
        )
        return self.proj(y.transpose(1, 2).reshape(B, T, D))


class MLP(nn.Module):
    # relu^2 MLP (from modded-nanogpt).
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        hidden = cfg.mlp_mult * cfg.model_dim
        self.fc = CastedLinear(cfg.model_dim, hidden, bias=False)
        self.proj = CastedLinear(hidden, cfg.model_dim, bias=False)
        self.proj._zero_init = True

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(torch.relu(self.fc(x)).square())


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        dim = cfg.model_dim
        self.attn = CausalSelfAttention(cfg)
        self.mlp = MLP(cfg)
        # Per-channel "control" vectors (kept fp32, trained with Adam, not Muon).
        self.attn_scale = nn.Parameter(torch.ones(dim, dtype=torch.float32))
        self.mlp_scale = nn.Parameter(torch.ones(dim, dtype=torch.float32))
        # Learned mix of the running residual and the block-0 input x0; starts as x.
        self.resid_mix = nn.Parameter(torch.stack((torch.ones(dim), torch.zeros(dim))).float())

    def forward(self, x: Tensor, x0: Tensor) -> Tensor:
        mix = self.resid_mix.to(x.dtype)
        x = mix[0] * x + mix[1] * x0
        x = x + self.attn_scale.to(x.dtype) * self.attn(rms_norm(x))
        x = x + self.mlp_scale.to(x.dtype) * self.mlp(rms_norm(x))
        return x


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        config.validate()
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.model_dim)
        # U-Net layout: the first half of the blocks are "encoder" layers whose
        # outputs are pushed on a stack; the rest pop them back (LIFO) through
        # learned per-channel skip weights.
        self.num_encoder_layers = config.num_layers // 2
        self.num_decoder_layers = config.num_layers - self.num_encoder_layers
        num_skips = min(self.num_encoder_layers, self.num_decoder_layers)
        self.skip_weights = nn.Parameter(torch.ones(num_skips, config.model_dim, dtype=torch.float32))
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.num_layers))
        self.lm_head = None
        if not config.tie_embeddings:
            self.lm_head = CastedLinear(config.model_dim, config.vocab_size, bias=False)
            self.lm_head._zero_init = True
        self._init_weights()

    def _init_weights(self) -> None:
        # Baseline init: small normal tied embedding, zero output projections
        # (so every residual branch starts at 0), torch defaults elsewhere.
        if self.config.tie_embeddings:
            nn.init.normal_(self.tok_emb.weight, mean=0.0, std=TIED_EMBED_INIT_STD)
        for m in self.modules():
            if isinstance(m, nn.Linear) and getattr(m, "_zero_init", False):
                nn.init.zeros_(m.weight)

    @classmethod
    def from_state_dict(cls, sd: dict[str, Tensor], **overrides) -> "GPT":
        """Build the model that fits ``sd`` and load it strictly (fp32 params)."""
        model = cls(config_from_state_dict(sd, **overrides))
        model.load_state_dict(sd, strict=True)  # copies bf16 tensors into fp32 params exactly
        return model

    def forward(self, input_ids: Tensor) -> Tensor:
        """input_ids [B, T] int64 -> soft-capped logits [B, T, vocab]."""
        x = rms_norm(self.tok_emb(input_ids))
        x0 = x
        skips: list[Tensor] = []
        for block in self.blocks[: self.num_encoder_layers]:
            x = block(x, x0)
            skips.append(x)
        for i, block in enumerate(self.blocks[self.num_encoder_layers :]):
            if skips:
                x = x + self.skip_weights[i].to(x.dtype) * skips.pop()
            x = block(x, x0)
        x = rms_norm(x)
        w = self.tok_emb.weight if self.lm_head is None else self.lm_head.weight
        logits = F.linear(x, w.to(x.dtype))
        c = self.config.logit_softcap
        return c * torch.tanh(logits / c)

    def loss(self, input_ids: Tensor, target_ids: Tensor) -> Tensor:
        """Mean next-token cross-entropy (nats), computed on fp32 logits."""
        logits = self(input_ids)
        return F.cross_entropy(logits.float().flatten(0, 1), target_ids.flatten())


__all__ = ["GPTConfig", "GPT", "config_from_state_dict", "TIED_EMBED_INIT_STD"]

