"""QAT: fake-quantize a model's parameters in the forward pass exactly as squeeze.compile will store them.

    opt = ...                                            # optimizers may be built before: Parameters are kept
    handle = squeeze.qat.prepare(model, recipe)          # or prepare(model, recipe, only=["re:mlp"], enabled=False)
    handle.set_schedule(lambda step: step >= 800)        # optional: QAT for the last part of training
    for step in range(steps):
        loss = model.loss(x, y); loss.backward(); opt.step(); opt.zero_grad()
        handle.step()
    blob = squeeze.compile(model.state_dict(), recipe)   # fixed scales; with learned scales: handle.compile()

What: each parameter is routed as the compiler routes it (classify's `role_of`, then `plan_for` of
squeeze/passes/plan.py). One the plan quantizes gets a parametrization whose forward value is
`quant.fake_quantize(w, spec)`: the same `choose_scales`, `codes_for` and `dequantize` that the `quantize` pass and
the loader use, so with QAT on the model computes with exactly the weights `squeeze.load` will return (tested bit
for bit for every scheme a recipe can write). The gradient is straight-through (identity). Float-routed tensors
stored in another float dtype (fp16 control tensors, say) get the same round trip (`cast_float`); integer tensors
are stored as they are and left alone. Parameters only: a persistent float buffer the recipe quantizes is not
fake-quantized (the baseline GPT has none).

How: parametrizations (torch.nn.utils.parametrize), not forward hooks. They act on every read of the attribute, so
a weight read by two code paths (tok_emb as the LM head), or held by two modules, goes through one parametrization
(evaluated at each read; wrap a step in `parametrize.cached()` to evaluate it once). torch.compile traces them
without graph breaks, and enable/disable flip a module attribute that dynamo guards, so a compiled model recompiles
instead of keeping a stale branch. The rounding steps run as custom ops (squeeze::fake_quantize, ...): inductor
otherwise drops an fp16/bf16 round trip inside a fused kernel, and the compiled forward would leave the artifact.

State dicts: while prepared, `model.state_dict()` keeps the plain names and order (`tok_emb.weight`, not
`tok_emb.parametrizations.weight.original`) and holds the raw trained weights, which is what squeeze.compile
quantizes; `load_state_dict` accepts plain names too. Prepare the bare module (not a DDP wrapper), before or after
torch.compile.

Learned scales (`learn_scales=True`, LSQ): each quantized tensor gets a 1-D float32 parameter of its scales,
initialised from the quantizer's choice; the forward uses them rounded to the recipe's scale dtype. They are not in
`model.state_dict()` (`handle.learned_scales()` and `load_learned_scales()` carry them across a restart), and
squeeze.compile would choose scales from the weights again: export with `handle.compile()`, which runs the
compiler's passes with them.

Mirrors `squeeze.compile(state_dict, recipe)`: round-to-nearest codes. A rule with method = "gptq" chooses other
codes by design (prepare refuses it), and a byte budget's per-tensor bit allocation (compile_to_budget) is decided
at export, so neither is mirrored.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils import parametrize

from . import compiler, pipeline, quant
from .dtypes import FLOAT_CODES, code_of, torch_dtype
from .passes import stack
from .passes.classify import ClassifyConfig, role_of
from .passes.plan import plan_for
from .recipe import Recipe, Rule
from .state import Plan, State, TensorEntry

__all__ = ["QATConfig", "QATHandle", "QATTarget", "prepare", "straight_through"]


@dataclass(frozen=True)
class QATConfig:
    """Options of `prepare`.

    only: which tensors get fake-quant: None (all the recipe stores lossily), patterns as in recipes (globs or
        "re:<regex>" searched in the name, e.g. ["re:mlp"]), or a callable(name) -> bool.
    learn_scales: LSQ-style learnable scales (one per row or group), initialised from the quantizer's; exported by
        `handle.compile()`.
    cast_float: float-routed tensors stored in another dtype than the parameter's (fp16 control tensors) see the
        same cast in the forward, so the forward equals the decoded model's; False leaves them untouched.
    enabled: whether fake-quant starts on (`handle.enable()`/`disable()`/`set_schedule()` change it later).
    """
    only: Sequence[str] | Callable[[str], bool] | None = None
    learn_scales: bool = False
    cast_float: bool = True
    enabled: bool = True


@dataclass(frozen=True)
class QATTarget:
    """One parameter that `prepare` fake-quantizes (or fake-casts)."""
    name: str            # its state-dict name (the first one when several modules share the parameter)
    places: tuple        # ((module path, attribute), ...): every module that holds the parameter
    plan: Plan           # the compiler's plan for it: scheme "int" (quant spec) or "float" (store dtype)


def straight_through(value: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """`value` in the forward, identity gradient to `source`. `source - source.detach()` is exactly +0, so the
    result is `value` bit for bit (unlike `source + (value - source).detach()`, which rounds)."""
    return value.detach() + (source - source.detach())


# ---------------------------------------------------------------------------------------------------------------
# Opaque ops: torch.compile's inductor drops a cast to fp16/bf16 that is followed by a cast back to fp32 inside one
# fused kernel (unless torch._inductor.config.emulate_precision_casts), which would leave scales and fp16-stored
# tensors unrounded and the compiled forward off the artifact. As custom ops, the rounding steps run as the eager
# code, in one graph node each (no graph break); the arithmetic around them (x + 0, exact upcasts) is exact anyway.

def _spec_args(spec: quant.QuantSpec) -> tuple:
    return (spec.bits, spec.group, spec.clip, spec.clip_value, spec.mse_grid, spec.mse_min_ratio, spec.scale_dtype,
            spec.scale_min)


def _spec(bits, group, clip, clip_value, mse_grid, mse_min_ratio, scale_dtype, scale_min) -> quant.QuantSpec:
    return quant.QuantSpec(bits=bits, group=group, clip=clip, clip_value=clip_value, mse_grid=mse_grid,
                           mse_min_ratio=mse_min_ratio, scale_dtype=scale_dtype, scale_min=scale_min)


@torch.library.custom_op("squeeze::fake_quantize", mutates_args=())
def _fake_quantize_op(w: torch.Tensor, bits: int, group: int, clip: str, clip_value: float, mse_grid: int,
                      mse_min_ratio: float, scale_dtype: str, scale_min: float) -> torch.Tensor:
    spec = _spec(bits, group, clip, clip_value, mse_grid, mse_min_ratio, scale_dtype, scale_min)
    return quant.fake_quantize(w, spec)


@_fake_quantize_op.register_fake
def _(w, *spec_args):
    return torch.empty_like(w)


def _stored_scales(scale: torch.Tensor, spec: quant.QuantSpec) -> torch.Tensor:
    """Learned scales [R, n_groups] as the artifact stores them (one trained to <= 0 is held at the smallest
    positive float32, which the stored dtype then floors further)."""
    return quant.store_scales(scale.clamp(min=torch.finfo(torch.float32).tiny), spec)


@torch.library.custom_op("squeeze::codes_for_scales", mutates_args=())
def _codes_for_scales_op(w: torch.Tensor, scale: torch.Tensor, bits: int, group: int, clip: str, clip_value: float,
                         mse_grid: int, mse_min_ratio: float, scale_dtype: str,
                         scale_min: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes [R, C], stored scales [R, n_groups]), both as float32 values: what the artifact holds."""
    spec = _spec(bits, group, clip, clip_value, mse_grid, mse_min_ratio, scale_dtype, scale_min)
    stored = _stored_scales(scale, spec)
    codes = quant.codes_for(quant.as_matrix(w), stored, spec).to(torch.int8)  # through int8: -0.0 codes become 0
    return codes.to(torch.float32), stored.to(torch.float32)


@_codes_for_scales_op.register_fake
def _(w, scale, *spec_args):
    rows, cols = quant.matrix_shape(w.shape)
    return w.new_empty((rows, cols), dtype=torch.float32), torch.empty_like(scale, dtype=torch.float32)


@torch.library.custom_op("squeeze::cast", mutates_args=())
def _cast_op(x: torch.Tensor, dtype_code: str) -> torch.Tensor:
    return x.to(torch_dtype(dtype_code), copy=True)


@_cast_op.register_fake
def _(x, dtype_code):
    return torch.empty_like(x, dtype=torch_dtype(dtype_code))


def _cast_exactly(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x.to(dtype), rounded even inside a compiled graph, straight-through gradient."""
    if x.dtype == dtype:
        return x
    return straight_through(_cast_op(x.detach(), code_of(dtype)), x.to(dtype))


# ---------------------------------------------------------------------------------------------------------------
# The parametrizations

class FakeQuantize(nn.Module):
    """Parametrization: the weight the artifact will decode to (fixed scales, chosen from the current weight each
    forward by the recipe's clip method, `quant.fake_quantize`), straight-through gradient."""

    def __init__(self, spec: quant.QuantSpec, enabled: bool = True, stacked: bool = False):
        super().__init__()
        self.spec, self.enabled = spec, enabled
        # a stack of matrices (squeeze/passes/stack.py): compile quantizes each slice, so scales go per slice row,
        # which are the rows of the [slices·R, C] view
        self.stacked = stacked

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return w
        rows = w.detach().reshape(-1, w.shape[-1]) if self.stacked else w.detach()
        return straight_through(_fake_quantize_op(rows, *_spec_args(self.spec)).reshape(w.shape), w)


class LearnedScaleFakeQuantize(nn.Module):
    """Parametrization with LSQ-style learned scales: w_hat = s · clamp(round(w / s), ±qmax), round straight-through,
    so w gets gradient 1 inside the clip range and 0 outside, and s gets (round(w/s) - w/s) inside and ±qmax outside.
    The forward uses s rounded to the stored scale dtype (straight-through), the value `handle.compile()` stores.
    (LSQ's gradient scale factor is left out: Adam, the optimizer to give these, is invariant to it.)"""

    def __init__(self, spec: quant.QuantSpec, w: torch.Tensor, enabled: bool = True):
        super().__init__()
        self.spec, self.enabled = spec, enabled
        initial = quant.choose_scales(quant.as_matrix(w.detach()), spec)
        self.shape = tuple(initial.shape)  # [R, n_groups]
        # 1-D so that training scripts which route ndim < 2 parameters to Adam (not Muon) do so here too
        self.scale = nn.Parameter(initial.to(torch.float32).reshape(-1))

    def stored_scales(self) -> torch.Tensor:
        """The scales as the artifact stores them, [R, n_groups] in the recipe's scale dtype."""
        return _stored_scales(self.scale.detach().reshape(self.shape), self.spec)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return w
        spec, w2, scale = self.spec, quant.as_matrix(w), self.scale.reshape(self.shape)
        codes, stored = _codes_for_scales_op(w.detach(), scale.detach(), *_spec_args(spec))
        scales = straight_through(stored, scale)
        ratio = (w2 / quant.expand_scales(scales, spec.group, w2.shape[1])).clamp(-spec.qmax, spec.qmax)
        w_hat = quant.dequantize(straight_through(codes, ratio), scales, spec.group, torch.float32, w.shape)
        return _cast_exactly(w_hat, w.dtype)


class FakeCast(nn.Module):
    """Parametrization: the round trip through the stored float dtype (fp16 control tensors), straight-through."""

    def __init__(self, store: str, enabled: bool = True):
        super().__init__()
        self.store, self.enabled = store, enabled

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return w
        return straight_through(_cast_op(w.detach(), self.store).to(w.dtype), w)


# ---------------------------------------------------------------------------------------------------------------
# Which parameters, routed as the compiler routes them


def _parameter_places(model: nn.Module) -> dict:
    """{parameter: (state-dict name, ((module path, attribute), ...))} in state-dict order; a parameter held by
    several modules (tied) appears once, under its first name, which is the one the compiler's `tie` pass keeps."""
    found = {}
    for path, module in model.named_modules(remove_duplicate=False):
        for attr, p in module._parameters.items():
            if p is None:
                continue
            name = f"{path}.{attr}" if path else attr
            first_name, places = found.get(p, (name, ()))
            if (path, attr) not in places:
                found[p] = (first_name, places + ((path, attr),))
    return found


def _dtype_code(p: torch.Tensor) -> str | None:
    try:
        return code_of(p.dtype)
    except KeyError:  # a dtype the format cannot hold: the compiler refuses it, QAT leaves it alone
        return None


def _selector(only) -> Callable[[str], bool]:
    if only is None:
        return lambda name: True
    if callable(only):
        return only
    patterns = (only,) if isinstance(only, str) else tuple(only)
    rule = Rule(match=patterns)  # the recipe's own matching: globs, or "re:" regexes searched in the name
    return lambda name: rule.matches(name, "")


def plan_of(name: str, p: torch.Tensor, recipe: Recipe) -> Plan:
    """The compiler's plan for one tensor: classify's role, then the stack and plan passes' routing. A tensor the
    stack pass splits gets its slices' plan (QAT mirrors one plan for all of them)."""
    role = role_of(name, p.shape, ClassifyConfig(control_patterns=recipe.keep_float.control_patterns, recipe=recipe))
    code = code_of(p.dtype)
    entry = TensorEntry(name=name, dtype=code, shape=tuple(p.shape), role=role)
    if not stack.splits(entry, stack.StackConfig(max_float_numel=recipe.keep_float.max_numel)):
        return plan_for(name, code, role, p.numel(), recipe)
    rows, cols = p.shape[-2:]
    plans = {plan_for(s, code, role, rows * cols, recipe, parent=name) for s in stack.slice_names(name, p.shape)}
    if len(plans) > 1:
        raise ValueError(f"{name}: the recipe gives its slices different plans; QAT mirrors one plan per stack")
    return dataclasses.replace(plans.pop(), reason=STACKED)


STACKED = "stack"  # the plan reason QAT gives a stack's shared slice plan


def find_targets(model: nn.Module, recipe: Recipe, config: QATConfig = QATConfig()) -> list[QATTarget]:
    """The parameters `prepare` would fake-quantize or fake-cast, with their plans."""
    selected = _selector(config.only)
    targets = []
    for p, (name, places) in _parameter_places(model).items():
        if _dtype_code(p) not in FLOAT_CODES or p.numel() == 0 or not selected(name):
            continue  # integer tensors are stored as they are; empty ones have nothing to round
        plan = plan_of(name, p, recipe)
        lossy_float = plan.scheme == "float" and config.cast_float and plan.store != code_of(p.dtype)
        if plan.scheme == "int" or lossy_float:
            targets.append(QATTarget(name=name, places=places, plan=plan))
    return targets


def _parametrization_for(target: QATTarget, p: torch.Tensor, config: QATConfig) -> nn.Module:
    plan = target.plan
    if plan.scheme == "float":
        return FakeCast(plan.store, config.enabled)
    if getattr(plan, "method", "rtn") == "gptq":
        raise ValueError(f"{target.name}: the recipe asks for GPTQ, whose codes depend on calibration data; "
                         "QAT mirrors round-to-nearest only (set method = \"rtn\" for this tensor)")
    if plan.lowrank_rank:
        raise ValueError(f"{target.name}: the recipe adds a low-rank correction, which compile fits to the final "
                         "quantization error; QAT does not mirror it (set lowrank_rank = 0 for this tensor)")
    stacked = plan.reason == STACKED
    rows = p.detach().reshape(-1, p.shape[-1]) if stacked else p
    quant.quantize(rows, plan.quant, target.name)  # reports a scale outside the stored dtype now, by name
    if config.learn_scales:
        if stacked:
            raise ValueError(f"{target.name}: learned scales are not mirrored for a stack of matrices yet (compile "
                             f"stores its slices apart); use fixed scales (learn_scales=False)")
        return LearnedScaleFakeQuantize(plan.quant, p, config.enabled)
    return FakeQuantize(plan.quant, config.enabled, stacked=stacked)


def _module_at(model: nn.Module, path: str) -> nn.Module:
    return model.get_submodule(path) if path else model


# ---------------------------------------------------------------------------------------------------------------
# Plain state-dict names while parametrized

def _parametrized_key(path: str, attr: str) -> str:
    return f"{path}.parametrizations.{attr}" if path else f"parametrizations.{attr}"


class _PlainStateDict:
    """State-dict hooks: parametrize stores `x.weight` as `x.parametrizations.weight.original` (and learned scales
    beside it); these hooks show the plain names, in the unprepared model's order (the artifact's tensor order
    follows it), without the scales, and accept plain names when loading."""

    def __init__(self, model: nn.Module, plain_order: list, targets: tuple, fakes: dict):
        self.order = {k: i for i, k in enumerate(plain_order)}
        self.to_plain, self.owned, self.scale_keys = {}, [], {}
        for t in targets:
            for path, attr in t.places:
                key = _parametrized_key(path, attr)
                self.to_plain[key + ".original"] = f"{path}.{attr}" if path else attr
                self.owned.append(key + ".")
                if isinstance(fakes[t.name], LearnedScaleFakeQuantize):
                    self.scale_keys[key + ".0.scale"] = fakes[t.name]
        self.to_parametrized = {v: k for k, v in self.to_plain.items()}
        # torch tags hook objects with attributes, which bound methods refuse: pass plain functions
        self.handles = [model.register_state_dict_post_hook(lambda *args: self.after_state_dict(*args)),
                        model.register_load_state_dict_pre_hook(lambda *args: self.before_load(*args))]

    def after_state_dict(self, module, state_dict, prefix, local_metadata) -> None:
        entries = {}
        for key in [k for k in state_dict if k.startswith(prefix)]:
            value, local = state_dict.pop(key), key[len(prefix):]
            if local in self.to_plain:
                entries[self.to_plain[local]] = value
            elif not local.startswith(tuple(self.owned)):  # learned scales stay out of the checkpoint's tensors
                entries[local] = value
        for local in sorted(entries, key=lambda k: self.order.get(k, len(self.order))):
            state_dict[prefix + local] = entries[local]

    def before_load(self, module, state_dict, prefix, local_metadata, strict, missing, unexpected, errors) -> None:
        for plain, parametrized in self.to_parametrized.items():
            if prefix + plain in state_dict:
                state_dict[prefix + parametrized] = state_dict.pop(prefix + plain)
        for key, fake in self.scale_keys.items():  # a plain checkpoint has no learned scales: keep the current ones
            state_dict.setdefault(prefix + key, fake.scale.detach().clone())

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


# ---------------------------------------------------------------------------------------------------------------
# The handle


class QATHandle:
    """What `prepare` returns: switch fake-quant on and off, schedule it, export learned scales, undo it."""

    def __init__(self, model: nn.Module, recipe: Recipe, config: QATConfig, targets: list[QATTarget]):
        self.model, self.recipe, self.config, self.targets = model, recipe, config, tuple(targets)
        plain_order = list(model.state_dict().keys())
        self._parameter_order = {path: list(m._parameters) for path, m in model.named_modules(remove_duplicate=False)}
        params = {name: p for p, (name, _) in _parameter_places(model).items()}
        self.fakes = {}        # tensor name -> its parametrization module (one per parameter, however many holders)
        for t in self.targets:
            fake = _parametrization_for(t, params[t.name], config)
            for path, attr in t.places:  # every holder of a tied parameter shares the one parametrization
                parametrize.register_parametrization(_module_at(model, path), attr, fake)
            self.fakes[t.name] = fake
        self._state_dict_hooks = _PlainStateDict(model, plain_order, self.targets, self.fakes)
        self._schedule = None
        self.step_count = 0
        self.removed = False

    # switching -----------------------------------------------------------------------------------------------
    @property
    def enabled(self) -> bool:
        return any(f.enabled for f in self.fakes.values())

    def enable(self) -> None:
        self._set_enabled(True)

    def disable(self) -> None:
        self._set_enabled(False)

    def _set_enabled(self, on: bool) -> None:
        self._check_not_removed()
        for f in self.fakes.values():
            f.enabled = on

    def set_schedule(self, schedule: Callable[[int], bool] | None) -> None:
        """`schedule(step) -> bool`: whether fake-quant is on at training step `step` (applied now for the current
        step, then by every `step()`); None stops scheduling and leaves the current state."""
        self._schedule = schedule
        if schedule is not None:
            self._set_enabled(bool(schedule(self.step_count)))

    def step(self, step: int | None = None) -> bool:
        """Advance to the next training step (or to `step`) and apply the schedule; returns whether QAT is on.
        Call once per optimizer step."""
        self.step_count = self.step_count + 1 if step is None else step
        if self._schedule is not None:
            self._set_enabled(bool(self._schedule(self.step_count)))
        return self.enabled

    # learned scales and export -------------------------------------------------------------------------------
    def scale_parameters(self) -> list[nn.Parameter]:
        """The learned scales (empty with fixed scales): give them to Adam, not Muon (they are 1-D)."""
        return [f.scale for f in self.fakes.values() if isinstance(f, LearnedScaleFakeQuantize)]

    def learned_scales(self) -> dict[str, torch.Tensor]:
        """{tensor name: scales [R, n_groups] in the stored dtype}, as `compile()` stores them."""
        return {name: f.stored_scales() for name, f in self.fakes.items() if isinstance(f, LearnedScaleFakeQuantize)}

    def load_learned_scales(self, scales: dict) -> None:
        """Restore scales saved from `learned_scales()` (e.g. when resuming training)."""
        for name, stored in scales.items():
            with torch.no_grad():
                self.fakes[name].scale.copy_(stored.to(torch.float32).reshape(-1))

    def state_dict(self) -> dict:
        """The model's tensors under their plain names (what squeeze.compile takes)."""
        return self.model.state_dict()

    def compile(self) -> bytes:
        """Artifact bytes of the model with this handle's recipe: with fixed scales the same bytes as
        `squeeze.compile(model.state_dict(), recipe)`; with learned scales the quantized tensors keep their learned
        scales and their codes are chosen against them (exactly what the forward computes)."""
        self._check_not_removed()
        learned = {name: s.cpu() for name, s in self.learned_scales().items()}
        state = State(entries=compiler.entries_from_state_dict(self.state_dict()), recipe=self.recipe)
        for pass_name, run_pass, pass_config in pipeline.passes_for(self.recipe):
            state = run_pass(state, pass_config)
            if pass_name == "quantize" and learned:
                state = _with_scales(state, learned)
        return compiler.write(state)

    # undo ------------------------------------------------------------------------------------------------------
    def remove(self) -> None:
        """Take the parametrizations off: the modules hold their original Parameter objects again (so optimizers
        keep working), with the trained values, in their original order; learned scales are dropped (export them
        with `compile()` first)."""
        self._check_not_removed()
        for t in self.targets:
            for path, attr in t.places:
                module = _module_at(self.model, path)
                parametrize.remove_parametrizations(module, attr, leave_parametrized=False)
                _restore_order(module, self._parameter_order[path])
        self._state_dict_hooks.remove()
        self.removed = True

    def _check_not_removed(self) -> None:
        if self.removed:
            raise RuntimeError("squeeze.qat: this handle's parametrizations were removed")

    def __repr__(self) -> str:
        kinds = {}
        for f in self.fakes.values():
            kinds[type(f).__name__] = kinds.get(type(f).__name__, 0) + 1
        parts = ", ".join(f"{n} {k}" for k, n in kinds.items())
        return f"QATHandle(recipe {self.recipe.name!r}: {parts}; {'on' if self.enabled else 'off'})"


def _restore_order(module: nn.Module, names: list) -> None:
    """remove_parametrizations re-registers a parameter last; put the module's parameters back in their order
    (state_dict, and so the artifact's tensor order, follows it)."""
    rank = {n: i for i, n in enumerate(names)}
    ordered = sorted(module._parameters.items(), key=lambda item: rank.get(item[0], len(rank)))
    module._parameters.clear()
    module._parameters.update(ordered)


def _with_scales(state: State, scales: dict) -> State:
    """The quantize pass's output with given scales for some tensors and their round-to-nearest codes."""
    out = []
    for e in state.entries:
        if e.name in scales and e.plan is not None and e.plan.scheme == "int":
            stored = scales[e.name]
            quant.check_scales(stored, e.plan.quant, e.name)
            codes = quant.codes_for(quant.as_matrix(e.tensor), stored, e.plan.quant).to(torch.int8)
            e = dataclasses.replace(e, codes=codes, scales=stored)
        out.append(e)
    return dataclasses.replace(state, entries=tuple(out))


def prepare(model: nn.Module, recipe: Recipe | None = None, config: QATConfig | None = None, **options) -> QATHandle:
    """Fake-quantize `model`'s parameters as `recipe` (default: Recipe()) will store them. `options` override
    fields of `config` (QATConfig): prepare(model, recipe, only=["re:mlp"], learn_scales=True, enabled=False)."""
    recipe = recipe or Recipe()
    config = dataclasses.replace(config or QATConfig(), **options)
    model = getattr(model, "_orig_mod", model)  # a torch.compile'd wrapper: its names carry "_orig_mod."
    for path, module in model.named_modules():
        if parametrize.is_parametrized(module):
            raise ValueError(f"squeeze.qat.prepare: {path or 'the model'} is already parametrized (prepared twice, "
                             "or a parametrization of your own); remove it first")
    return QATHandle(model, recipe, config, find_targets(model, recipe, config))
