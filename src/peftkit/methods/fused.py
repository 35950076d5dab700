"""One autograd function for a linear layer plus its low-rank path, optionally DoRA-rescaled.

``out = g * (x W^T) + b + (s * g) * (dropout(x) A^T) B^T`` with ``W: (out, in)`` frozen, ``A: (r, in)``,
``B: (out, r)``, ``g: (out,)`` (DoRA's ``m / n``; all ones, i.e. plain LoRA, when None), ``b`` the
base bias. It is what LoRA/DoRA layers compute when theirs is the only active adapter: the same
matrix products as separate modules, but

* ``g`` is folded into ``W`` and ``B`` (weight-sized work) instead of rescaling the ``(tokens, out)``
  output in forward and its gradient in backward (activation-sized work);
* the two input gradients ``grad W_g + grad_z A`` are accumulated into one buffer; and when the
  batch has enough rows (:func:`_fold_pays`) and no dropout, ``s g B A`` is folded into the weight for
  the output and the input gradient, which replaces two low-rank GEMMs over the tokens by one
  weight-sized product (the frozen base weight itself is never written); the folded weight is kept
  for the backward rather than folded a second time;
* DoRA's magnitude gradient ``sum_t grad * (out - b) / g`` reads the output, which exists anyway,
  instead of keeping a second ``(tokens, out)`` tensor;
* the rank-``r`` products over the tokens are laid out as ``(r, tokens)`` (``z^T = A x^T``, B's
  gradient as ``z^T grad``), the layouts in which CPU GEMMs with one dimension of 8 run fastest.

Shapes: ``x, xd: (..., in)``, output ``(..., out)``. The base weight must not require grad.
"""

from __future__ import annotations

import torch
from torch import Tensor

from peftkit.ops import transforms_or_forward_ad_active


class _LowRankLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, xd: Tensor | None, weight: Tensor, bias: Tensor | None, a: Tensor, b: Tensor,
                g: Tensor | None, scaling: float, m: Tensor | None, spare: SpareBuffer | None) -> Tensor:
        # the backward needs z^T = A x^T for A's, B's and g's (or m's) gradients
        need_z = any(ctx.needs_input_grad[4:7]) or ctx.needs_input_grad[8]
        out, zt, folded, g_used, n = _output(x, xd, weight, bias, a, b, g, scaling, need_z=need_z, m=m, spare=spare)
        ctx.scaling = scaling
        # the folded weight (when there is one) is kept for the input gradient: not folding twice a step
        # costs one weight-sized buffer until the backward (+8 to +18 MiB peak on the benchmark models)
        keep = folded if ctx.needs_input_grad[0] else None
        ctx.spare = spare
        if keep is None and folded is not None and spare is not None:
            spare.give(folded)  # no input gradient (the first layer): the fold is free again now
        ctx.save_for_backward(x, xd, weight, bias, a, b, g_used, zt, out if g_used is not None else None,
                              keep, m, n)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, xd, weight, bias, a, b, g, zt, out, folded, m, n = ctx.saved_tensors
        need_x, need_xd, _, need_bias, need_a, need_b, need_g, _, need_m, _ = ctx.needs_input_grad
        if m is not None:
            need_g = need_m  # g = m / n, n detached: m's gradient is g's divided by n
            if torch.is_grad_enabled():  # a double backward: g with its history (the forward's has none)
                g = m / n
        grad2 = grad.reshape(-1, grad.shape[-1])
        if torch.is_grad_enabled() and zt is not None:
            # a double backward (create_graph) needs B's and g's gradients to depend on A and the input:
            # the forward's z^T has no history, so it is formed again from them
            zt = a @ (x if xd is None else xd).reshape(-1, a.shape[1]).T
        b_eff = _effective_b(b, g, ctx.scaling)
        grad_z = grad2 @ b_eff if need_a or need_xd or (need_x and xd is None) else None
        grad_x = grad_xd = grad_bias = grad_a = grad_b = grad_g = None
        if need_x:
            if folded is not None:  # the input gradient of both paths in one GEMM
                # the forward's folded weight has no history: a double backward (create_graph) needs the
                # fold rebuilt from A, B and g so that grad_x depends on them
                grad_x = grad2 @ (_folded(weight, a, b, g, ctx.scaling) if torch.is_grad_enabled() else folded)
                if ctx.spare is not None:  # its last use: the next step's forward may fold into it
                    ctx.spare.give(folded)
            else:
                grad_x = grad2 @ _effective_w(weight, g)
                if xd is None:
                    grad_x.addmm_(grad_z, a)
            grad_x = grad_x.view(x.shape)
        if need_xd:
            grad_xd = (grad_z @ a).view(xd.shape)
        if need_a:
            grad_a = grad_z.T @ (x if xd is None else xd).reshape(-1, a.shape[1])
        if need_b:
            # computed as (r, out) = z^T grad: twice as fast on CPU as grad^T z (0.22 vs 0.47 ms, 1024 x 1376)
            grad_b = zt @ grad2
            grad_b = grad_b.mul_(ctx.scaling if g is None else (ctx.scaling * g)[None, :]).T
        total = grad2.sum(0) if bias is not None and (need_bias or need_g) else None
        if need_bias:
            grad_bias = total
        if need_g:
            grad_g = _magnitude_grad(grad2, out.reshape(-1, out.shape[-1]), x, zt, weight, bias, b, g, ctx.scaling,
                                     total)
        if m is not None:
            return (grad_x, grad_xd, None, grad_bias, grad_a, grad_b, None, None, None if grad_g is None else grad_g / n,
                    None)
        return grad_x, grad_xd, None, grad_bias, grad_a, grad_b, grad_g, None, None, None


def _output(x: Tensor, xd: Tensor | None, weight: Tensor, bias: Tensor | None, a: Tensor, b: Tensor,
            g: Tensor | None, scaling: float, need_z: bool, m: Tensor | None = None, spare: SpareBuffer | None = None
            ) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None, Tensor | None]:
    """``(out, zt, folded, g, n)``: the layer output ``(..., out)``; ``z^T = A xd^T`` as ``(r, rows)`` when the
    unfolded output uses it or ``need_z`` (else None); the folded weight ``g (W + s B A)`` ``(out, in)`` when
    the output used one, else None; the factor ``g`` used (given, or ``m / n`` from the magnitude ``m``) and,
    with ``m``, the row norms ``n`` of ``W + s B A`` (detached; else None)."""
    x2 = x.reshape(-1, x.shape[-1])
    fold = xd is None and _fold_pays(x2.shape[0], weight.shape)
    # z is kept as z^T = A x^T, (r, rows): both that product and B's gradient z^T grad run about twice as fast
    # on CPU as in the (rows, r) layout (0.06 vs 0.10 ms, 1024 x 512 -> 8)
    zt = a @ (x2 if xd is None else xd.reshape(-1, x.shape[-1])).T if need_z or not fold else None
    folded = n = None
    if m is not None and not fold:  # DoRA on few rows: the norms without forming W + s B A
        from peftkit.methods.dora import factored_norm

        n = factored_norm(weight, a.detach(), b.detach(), scaling).to(m.dtype)
        g = m.detach() / n
    buf = spare.take(weight) if fold and spare is not None else None
    if m is not None and fold:  # DoRA: the norms come from the fold itself, W + s B A, then rescaled in place
        with torch.no_grad():
            folded = torch.addmm(weight, b, a, alpha=scaling, out=buf)
            n = torch.linalg.vector_norm(folded, dim=1)
            g = m.detach() / n
            folded.mul_(g[:, None])
        out = _linear(x2, folded, bias)
    elif fold:  # one GEMM with the low-rank product folded into the (frozen) weight: g (W + s B A)
        folded = _folded(weight, a, b, g, scaling, out=buf)
        out = _linear(x2, folded, bias)
    else:
        out = _linear(x2, _effective_w(weight, g), bias)
        out.addmm_(zt.T, _effective_b(b, g, scaling).T)
    return out.view(*x.shape[:-1], out.shape[-1]), zt, folded, g, n


def _fold_pays(rows: int, shape: torch.Size) -> bool:
    """Whether folding ``s B A`` into the weight (``out * in * r`` multiply-adds per use, independent of the
    batch) costs less than the low-rank products it replaces (``rows * r * (in + out)``): true for training
    and prefill batches, false for token-by-token decoding."""
    out_f, in_f = shape
    return rows * (in_f + out_f) >= 2 * in_f * out_f


def _linear(x2: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    return torch.addmm(bias, x2, weight.T) if bias is not None else x2 @ weight.T


def _effective_w(weight: Tensor, g: Tensor | None) -> Tensor:
    """``g * W`` (``W`` itself without ``g``), ``(out, in)``."""
    return weight if g is None else weight * g[:, None]


def _effective_b(b: Tensor, g: Tensor | None, scaling: float) -> Tensor:
    """``s * g * B`` (``s * B`` without ``g``), ``(out, r)``."""
    return b * scaling if g is None else b * (scaling * g)[:, None]


def _folded(weight: Tensor, a: Tensor, b: Tensor, g: Tensor | None, scaling: float, out: Tensor | None = None
            ) -> Tensor:
    """``g * (W + s B A)``, ``(out, in)``, in one new buffer, or in ``out`` when given (the frozen weight is
    never written): two weight-sized passes, the copy (``g W`` with DoRA, so the rescale costs no pass of
    its own) and the rank-``r`` update of it (``(s g B) A`` is added in place)."""
    if g is None:
        return torch.addmm(weight, b, a, alpha=scaling, out=out)
    return torch.mul(weight, g[:, None], out=out).addmm_(_effective_b(b, g, scaling), a)


def column_dots(p: Tensor, q: Tensor) -> Tensor:
    """``(p * q).sum(0)`` for ``p, q: (rows, cols)`` -> ``(cols,)``, accumulated over blocks of rows into a buffer
    of about 512 KiB, which stays in the CPU's cache: the product of the whole (an activation-sized tensor) is
    never written out. About 1.6x as fast as ``(p * q).sum(0)`` and ``linalg.vecdot`` on CPU for DoRA's
    magnitude gradient (0.43-0.46 vs 0.75 ms for 1024 x 1376, 2 threads; 0.64 vs 1.35 ms, 1 thread)."""
    block = max(16, (1 << 17) // max(1, p.shape[1]))
    rows = p.shape[0]
    if rows < 2 * block:
        return (p * q).sum(0)
    whole = rows - rows % block
    acc = torch.mul(p[:block], q[:block])
    for i in range(block, whole, block):
        acc.addcmul_(p[i:i + block], q[i:i + block])
    dot = acc.sum(0)
    if whole < rows:
        dot += (p[whole:] * q[whole:]).sum(0)
    return dot


def _magnitude_grad(grad: Tensor, out: Tensor, x: Tensor, zt: Tensor, weight: Tensor, bias: Tensor | None, b: Tensor,
                    g: Tensor, scaling: float, total: Tensor | None) -> Tensor:
    """``sum_t grad * y`` with ``y = x W^T + s z B^T = (out - bias) / g`` (``zt = z^T``); rows with ``g = 0``
    (where the output does not tell ``y``) are recomputed from ``x``."""
    dot = column_dots(grad, out)
    if total is not None:
        dot.sub_(bias * total)
    zero = g == 0
    if not bool(zero.any()):
        return dot.div_(g)
    rows = zero.nonzero().squeeze(1)
    dot.div_(torch.where(zero, torch.ones_like(g), g))
    y = x.reshape(-1, x.shape[-1]) @ weight[rows].T + scaling * (zt.T @ b[rows].T)
    dot[rows] = torch.linalg.vecdot(grad[:, rows], y, dim=0)
    return dot


def low_rank_linear(x: Tensor, xd: Tensor | None, weight: Tensor, bias: Tensor | None, a: Tensor, b: Tensor,
                    g: Tensor | None, scaling: float, m: Tensor | None = None, spare: SpareBuffer | None = None
                    ) -> Tensor:
    """``g * (x W^T) + b + (s * g) * (xd A^T) B^T`` in one autograd node (see the module docstring).

    Args:
        x: the layer input ``(..., in)``.
        xd: the input of the low-rank path (dropout applied), or None when it is ``x`` itself.
        weight: the base weight as ``(out, in)`` (a transposed view for GPT-2 ``Conv1D``), frozen.
        bias: the base bias ``(out,)`` or None.
        a, b: ``A: (r, in)``, ``B: (out, r)``.
        g: per-output factor ``(out,)`` (DoRA's ``m / n``, its gradient flows) or None (plain LoRA).
        scaling: ``s``.
        m: instead of ``g``, DoRA's magnitude ``(out,)``: ``g = m / n`` is formed here with ``n`` the row norms
            of ``W + s B A`` (detached), taken from the folded weight itself when the batch folds (one pass
            fewer over the weight than :func:`~peftkit.methods.dora.factored_norm` plus the fold); ``m``'s
            gradient flows. ``W`` must then be the layer's unmerged base weight.
        spare: the layer's :class:`SpareBuffer`, or None: in training on the CPU the folded weight is formed
            in the buffer the previous step's backward gave back (see :class:`SpareBuffer`).

    Returns:
        ``(..., out)`` in ``x``'s dtype.
    """
    if not torch.is_grad_enabled():  # inference: no autograd node, no tensors kept for a backward
        if spare is not None:
            spare.clear()  # no spare fold kept while serving
        return _output(x, xd, weight, bias, a, b, g, scaling, need_z=False, m=m)[0]
    return _LowRankLinear.apply(x, xd, weight, bias, a, b, g, scaling, m,
                                spare if spare is not None and weight.device.type == "cpu" else None)


class SpareBuffer:
    """One layer's folded-weight buffer, kept from one training step to the next on the CPU.

    The CPU has no caching allocator: each step's fold ``W + s B A`` (``(out, in)``) was a fresh allocation,
    and a fresh weight-sized buffer costs a page fault per 4 KiB page when first written (about 2 us each
    on the machines here; reusing the folds took the ~20M Llama benchmark's step from about 32,800 faults
    to 24,600, and from 444 to 436 ms). The backward gives the buffer
    back once it has used it (the forward does, for a layer with no input gradient), and the next
    forward folds into it. Peak memory is unchanged (every fold is alive between a forward and its
    backward anyway); between steps the layer holds one weight-sized buffer, which is dropped in
    ``eval()`` mode, in a forward without gradients, and when the adapter is copied or pickled.

    A given-back buffer is reused only while nothing else holds it (``Tensor._use_count() == 1`` and no
    view of its storage): a graph kept with ``retain_graph=True`` still holds its fold, and the next forward
    then allocates a new one instead.
    """

    __slots__ = ("_buf",)

    def __init__(self) -> None:
        self._buf: Tensor | None = None

    def give(self, t: Tensor) -> None:
        """Keep ``t`` for the next :meth:`take` (one buffer at most; a second is dropped)."""
        if self._buf is None:
            self._buf = t

    def take(self, like: Tensor) -> Tensor | None:
        """The kept buffer, emptied of it, if it has ``like``'s shape, dtype and device and nothing else
        holds it; else None (the buffer is dropped)."""
        buf, self._buf = self._buf, None
        if buf is None or buf.shape != like.shape or buf.dtype != like.dtype or buf.device != like.device:
            return None
        return buf if _unshared(buf) else None

    def clear(self) -> None:
        """Drop the kept buffer."""
        self._buf = None

    def __deepcopy__(self, memo: dict) -> SpareBuffer:
        return SpareBuffer()

    def __getstate__(self) -> dict:
        return {}

    def __setstate__(self, state: dict) -> None:
        self._buf = None


def _unshared(t: Tensor) -> bool:
    """Whether only the caller holds ``t`` (no autograd graph, no view of its storage); False when torch
    cannot tell."""
    try:
        return t._use_count() == 1 and torch._C._storage_Use_Count(t.untyped_storage()._cdata) <= 2
    except (AttributeError, RuntimeError):  # private helpers: without them, never reuse
        return False


def can_fuse(x: Tensor, weight: Tensor, a: Tensor) -> bool:
    """Whether :func:`low_rank_linear` applies: one dtype throughout, a frozen base weight, no autocast, no
    ``torch.func`` transform (``grad``, ``vmap``, ``jvp``, ...) running and no forward-AD level open
    (``torch.autograd.forward_ad.dual_level``): the fused node decides in its forward what the backward needs,
    which those transforms do not allow, and defines no ``jvp``, so under them the layer runs as plain ops. Nor
    while ``torch.compile`` traces: the node's data-dependent branches (DoRA's zero-magnitude check) break the
    graph, and the compiler fuses the plain ops itself."""
    return (x.dtype == weight.dtype == a.dtype and not weight.requires_grad
            and not torch.is_autocast_enabled(x.device.type) and not transforms_or_forward_ad_active()
            and not torch.compiler.is_compiling())

