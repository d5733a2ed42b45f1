"""Operand tracking: which parameter, or slice of one, each matrix product of a forward multiplies by.

GPTQ needs, for every matrix W the model multiplies by, the Gram matrix of the rows that meet it: H = mean x xᵀ over
the inputs of y = x Wᵀ. Hooks on nn.Linear see only some of them. Real models also write `F.linear(x, tok_emb.weight)`
(a tied head), `F.linear(x, qo_bank[i])` (3-D parameter banks), `x @ W.T`, and cast first (`W.to(x.dtype)`). This
module sees them all without knowing the architecture: a TorchFunctionMode intercepts every torch call of the forward,
follows parameters through value-preserving views and casts (index a leading dim, transpose, .to, .float, contiguous,
detach), and at each product whose weight operand it has followed back to a parameter, reports the other operand's
rows under the weight's key: the parameter's name, or `name[i]` for slice i of a stack of matrices (squeeze's naming
of an N-D weight's slices, squeeze/passes/stack.py). A layer run several times per forward (loops) reports every pass.

Products that touch a tracked weight in a way GPTQ cannot use (einsum, a weight contracted over its rows, a batched
product over a whole bank) are recorded as skips with the reason, so calibration can say why a tensor got no Hessian;
so is a weight read as a lookup table (F.embedding: a bigram-hash or value-embedding table, an untied input
embedding), which no product meets. A name that also got a Hessian elsewhere (a tied embedding, looked up and used as
the head) keeps it: calibration drops the skips of names with Hessians.
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils.weak import WeakIdKeyDictionary


@dataclass(frozen=True)
class Origin:
    """Where a tensor's values come from: parameter `name`, leading indices `index` taken so far, and whether the
    last two dims are swapped relative to the parameter's."""
    name: str
    shape: tuple                # the parameter's shape
    index: tuple = ()
    transposed: bool = False

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def key(self) -> str:
        """The name calibration reports: the parameter's, or its slice's (numbered flat, as the stack pass does)."""
        if not self.index:
            return self.name
        flat = 0
        for i, n in zip(self.index, self.shape):
            flat = flat * n + i
        return slice_name(self.name, flat)

    def is_matrix(self) -> bool:
        return self.ndim - len(self.index) == 2

    def indexed(self, more: tuple) -> "Origin":
        """The origin of self[i, j, ...] (leading dims; negative indices count from the end)."""
        dims = self.shape[len(self.index):]
        return Origin(self.name, self.shape, self.index + tuple(i % n for i, n in zip(more, dims)), self.transposed)


def slice_name(name: str, i: int) -> str:
    """The name of slice i of a stack of matrices (an N-D weight's leading dims, flattened row-major)."""
    return f"{name}[{i}]"


_CASTS = {torch.Tensor.to, torch.Tensor.type, torch.Tensor.float, torch.Tensor.half, torch.Tensor.bfloat16,
          torch.Tensor.double, torch.Tensor.contiguous, torch.Tensor.detach, torch.Tensor.clone, torch.clone,
          torch.Tensor.cpu, torch.Tensor.cuda, torch.Tensor.requires_grad_, torch.Tensor.view_as,
          torch.Tensor.type_as}
_TRANSPOSES = {torch.Tensor.t, torch.t, torch.Tensor.T.__get__, torch.Tensor.mT.__get__}
_TRANSPOSE_CALLS = {torch.Tensor.transpose, torch.transpose, torch.Tensor.swapaxes, torch.swapaxes,
                    torch.Tensor.swapdims, torch.swapdims}
_SELECTS = {torch.Tensor.select, torch.select}
_MATMULS = {torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.mm, torch.Tensor.mm, torch.bmm,
            torch.Tensor.bmm}
_OPAQUE = {torch.einsum, torch.tensordot, torch.bilinear, F.bilinear, torch.baddbmm, torch.addbmm}


class OperandTracker(TorchFunctionMode):
    """Within `with OperandTracker(params, on_rows, on_skip):` every product whose weight is (a cast, transposed or
    indexed view of) one of `params` ({name: tensor}) calls `on_rows(key, rows)` with the rows x [N, in] that meet it;
    a product it cannot attribute calls `on_skip(name, reason)`."""

    def __init__(self, params: dict, on_rows, on_skip):
        super().__init__()
        self.on_rows, self.on_skip = on_rows, on_skip
        self.origin = WeakIdKeyDictionary()
        for name, p in params.items():
            self.origin[p] = Origin(name=name, shape=tuple(p.shape))

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            self._linear(*args, **kwargs)
        elif func in _MATMULS:
            self._matmul(*args[:2])
        elif func is torch.Tensor.__rmatmul__:
            self._matmul(args[1], args[0])
        elif func is torch.addmm or func is torch.Tensor.addmm:
            self._matmul(args[1], args[2])
        elif func is F.embedding:
            o = self._origin(args[1] if len(args) > 1 else kwargs.get("weight"))
            if o is not None:
                self.on_skip(o.name, "a lookup table (F.embedding): token ids select its rows, nothing is "
                                     "multiplied by it, so it has no input Hessian")
        elif func in _OPAQUE:
            for a in list(args) + [x for a in args if isinstance(a, (list, tuple)) for x in a]:
                o = self._origin(a)
                if o is not None:
                    self.on_skip(o.name, f"multiplied through {getattr(func, '__name__', func)}, which calibration "
                                         f"does not attribute")
        out = func(*args, **kwargs)
        self._follow(func, args, kwargs, out)
        return out

    def _origin(self, t):
        return self.origin.get(t) if isinstance(t, torch.Tensor) else None

    def _follow(self, func, args, kwargs, out):
        """Give `out` the origin of its source when `func` only casts, transposes or indexes a leading dim."""
        src = self._origin(args[0]) if args else None
        if src is None:
            return
        if func in _CASTS and isinstance(out, torch.Tensor) and out.shape == args[0].shape:
            self.origin[out] = src
        elif func in _TRANSPOSES or (func in _TRANSPOSE_CALLS and _swaps_last_two(args, kwargs)):
            if isinstance(out, torch.Tensor) and src.ndim - len(src.index) >= 2:
                self.origin[out] = Origin(src.name, src.shape, src.index, not src.transposed)
        elif func is torch.Tensor.__getitem__:
            index = args[1] if isinstance(args[1], tuple) else (args[1],)
            if all(_is_int(i) for i in index) and not src.transposed and \
                    src.ndim - len(src.index) - len(index) >= 2:
                self.origin[out] = src.indexed(tuple(int(i) for i in index))
        elif func in _SELECTS:
            dim = kwargs.get("dim", args[1] if len(args) > 1 else None)
            i = kwargs.get("index", args[2] if len(args) > 2 else None)
            if dim == 0 and _is_int(i) and not src.transposed and src.ndim - len(src.index) >= 3:
                self.origin[out] = src.indexed((int(i),))
        elif func in (torch.unbind, torch.Tensor.unbind):
            dim = kwargs.get("dim", args[1] if len(args) > 1 else 0)
            if dim == 0 and not src.transposed and src.ndim - len(src.index) >= 3:
                for i, t in enumerate(out):
                    self.origin[t] = src.indexed((i,))

    def _linear(self, x, weight, bias=None):
        """y = x Wᵀ: W's last dim meets x's last dim."""
        o = self._origin(weight)
        if o is None:
            return
        if not o.is_matrix():
            self.on_skip(o.name, "F.linear on more than a matrix of it")
        elif o.transposed:
            self.on_skip(o.name, "used transposed (F.linear(x, W.T)): its rows, not its columns, meet the input")
        else:
            self.on_rows(o.key, x.detach().reshape(-1, x.shape[-1]))

    def _matmul(self, a, b):
        """a @ b: b's second-to-last dim (or a's last) meets the other operand."""
        ob, oa = self._origin(b), self._origin(a)
        if ob is not None and isinstance(a, torch.Tensor):
            if not ob.is_matrix() or b.dim() != 2:
                self.on_skip(ob.name, "a batched product over the whole stack (index its slices to calibrate them)")
            elif not ob.transposed:
                self.on_skip(ob.name, "used as x @ W: its rows, not its columns, meet the input")
            else:  # x @ W.T
                self.on_rows(ob.key, a.detach().reshape(-1, a.shape[-1]))
        elif oa is not None and isinstance(b, torch.Tensor):
            if not oa.is_matrix() or a.dim() != 2:
                self.on_skip(oa.name, "a batched product over the whole stack (index its slices to calibrate them)")
            elif oa.transposed:
                self.on_skip(oa.name, "used as W.T @ x: its rows, not its columns, meet the input")
            else:  # W @ x: the columns of x meet W's columns
                x = b.detach()
                self.on_rows(oa.key, x.movedim(-2, -1).reshape(-1, x.shape[-2]) if x.dim() > 1 else x[None])


def _is_int(i) -> bool:
    return isinstance(i, int) and not isinstance(i, bool) or (isinstance(i, torch.Tensor) and i.dim() == 0 and
                                                                not i.is_floating_point() and i.dtype != torch.bool)


def _swaps_last_two(args, kwargs) -> bool:
    t = args[0]
    dims = [kwargs.get(k) for k in ("dim0", "dim1") if k in kwargs] or list(args[1:3])
    if len(dims) != 2 or not all(isinstance(d, int) for d in dims):
        return False
    n = t.dim()
    return sorted(d % n for d in dims) == [n - 2, n - 1]
