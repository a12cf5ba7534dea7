"""cuflash as a drop-in for torch's scaled_dot_product_attention, with autograd.

    python examples/torch_drop_in.py

``CuflashAttentionFunction`` (a ``torch.autograd.Function``) runs
``cuflash.attention_forward`` in its forward, keeps the returned ``AttentionContext`` on
the autograd ctx, and hands it to ``cuflash.attention_backward`` in its backward.
``cuflash_sdpa`` and the ``CuflashAttention`` module take and return SDPA's layout,
q (B, H, Sq, D) and k, v (B, Hk, Sk, D); cuflash's own layout is (B, S, H, D). The
transposes between the two are views, which cuflash takes as they are (any strides,
contiguous last dim), and tensors cross between torch and CuPy through DLPack without a
copy. The only copy made is of a dout whose last dimension is not contiguous (for
example the expanded ones that ``out.sum().backward()`` sends).

Every cuflash call runs on torch's current stream (``cuflash.as_cupy_stream``), so it is
ordered with the torch work around it exactly as a torch kernel would be.

When run (needs torch with CUDA), this
1. checks values and gradients against ``scaled_dot_product_attention`` at p = 0, fp16
   and bf16, causal and not (FlashAttention-2's rule: error against a float64 reference
   at most 2x SDPA's for the output, 3x for gradients), and prints the max errors;
2. runs dropout p = 0.1 (with grouped kv heads), checks it against a float64 reference
   given the same mask (``cuflash.dropout_mask``), and shows that a fixed seed
   reproduces the output and gradients bit for bit while another offset changes them.
"""

from __future__ import annotations

import contextlib
import math
import sys

try:
    import torch
    import torch.nn.functional as F
except ImportError:  # the example needs torch; cuflash itself never imports it
    torch = None

import cuflash
from cuflash.mask import drop_threshold, keep_probability


@contextlib.contextmanager
def _on_torch_stream(t):
    """Make t's device and torch's current stream on it CuPy's current device and stream."""
    import cupy

    with cupy.cuda.Device(t.device.index), cuflash.as_cupy_stream(torch.cuda.current_stream(t.device)):
        yield


def _bshd(t):
    """(B, H, S, D) -> (B, S, H, D) view, detached (torch does not export tensors that require grad)."""
    return t.detach().transpose(1, 2)


def _bhsd(a):
    """A CuPy (B, S, H, D) result -> torch (B, H, S, D) view of the same memory."""
    return torch.from_dlpack(a).transpose(1, 2)


if torch is not None:

    class CuflashAttentionFunction(torch.autograd.Function):
        """out = attention(q, k, v) in SDPA's layout; the backward is cuflash's, with the
        forward's dropout mask regenerated from the saved AttentionContext."""

        @staticmethod
        def forward(ctx, q, k, v, dropout_p, causal, scale, seed, offset, deterministic):
            # q: (B, H, Sq, D); k, v: (B, Hk, Sk, D) -> out (B, H, Sq, D)
            with _on_torch_stream(q):
                out, attn_ctx = cuflash.attention_forward(
                    _bshd(q), _bshd(k), _bshd(v), dropout_p=dropout_p, causal=causal, softmax_scale=scale,
                    seed=seed, offset=offset, deterministic=deterministic,
                )
                out = _bhsd(out)
            ctx.attn_ctx = attn_ctx  # holds q, k, v (views of torch's memory), out, lse, seed, offset
            ctx.save_for_backward(q, k, v)  # only so that torch flags in-place edits before the backward
            return out

        @staticmethod
        def backward(ctx, dout):
            # dout: (B, H, Sq, D) -> dq (B, H, Sq, D), dk and dv (B, Hk, Sk, D)
            _ = ctx.saved_tensors  # raises if q, k or v were modified in place since the forward
            d = dout.detach().transpose(1, 2)
            if d.stride(-1) != 1:
                d = d.contiguous()  # cuflash needs a contiguous last dim; e.g. sum()'s expanded ones
            with _on_torch_stream(dout):
                dq, dk, dv = (_bhsd(g) for g in cuflash.attention_backward(d, ctx.attn_ctx))
            return dq, dk, dv, None, None, None, None, None, None

    def cuflash_sdpa(q, k, v, *, dropout_p: float = 0.0, is_causal: bool = False, scale: float | None = None,
                     seed: int | None = None, offset: int | None = None, deterministic: bool = False):
        """scaled_dot_product_attention's signature (no attn_mask), computed by cuflash.

        q: (B, H, Sq, D); k, v: (B, Hk, Sk, D), H % Hk == 0 (GQA without enable_gqa), fp16
        or bf16 CUDA tensors. Returns (B, H, Sq, D). Causal masking is aligned
        bottom-right (row i sees key j iff j <= i + Sk - Sq); SDPA aligns it top-left, the
        same when Sq == Sk. With seed=None the mask comes from cuflash's global generator
        (cuflash.manual_seed), not torch's.
        """
        return CuflashAttentionFunction.apply(q, k, v, dropout_p, is_causal, scale, seed, offset, deterministic)

    class CuflashAttention(torch.nn.Module):
        """The attention core of a layer: (B, H, S, D) q, k, v -> (B, H, S, D).
        Dropout applies in training mode only, like torch.nn.Dropout."""

        def __init__(self, dropout_p: float = 0.0, causal: bool = False, deterministic: bool = False):
            super().__init__()
            self.dropout_p, self.causal, self.deterministic = dropout_p, causal, deterministic

        def forward(self, q, k, v):
            p = self.dropout_p if self.training else 0.0
            return cuflash_sdpa(q, k, v, dropout_p=p, is_causal=self.causal, deterministic=self.deterministic)


def reference(q, k, v, *, causal, scale, keep=None, keep_prob=1.0):
    """Attention in the inputs' dtype with plain torch ops (float64 inputs: the reference).
    q (B, H, Sq, D); k, v (B, Hk, Sk, D); keep: bool (B, H, Sq, Sk), True = kept."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)  # query head h uses kv head h // group
    s = (q @ k.transpose(-1, -2)) * scale
    if causal:
        sq, sk = s.shape[-2:]
        visible = torch.ones(sq, sk, dtype=torch.bool, device=s.device).tril(diagonal=sk - sq)
        s = s.masked_fill(~visible, float("-inf"))
    p = torch.softmax(s, dim=-1)
    if keep is not None:
        p = p * keep / keep_prob
    return p @ v


def _grads(fn, inputs, dout):
    inputs = [x.detach().requires_grad_() for x in inputs]
    out = fn(*inputs)
    return [out.detach(), *torch.autograd.grad(out, inputs, dout)]


def _maxerr(a, b) -> float:
    return (a.double() - b.double()).abs().max().item()


def check_against_sdpa(dtype, causal: bool, B=2, H=4, S=257, D=64) -> bool:
    """p = 0: cuflash and SDPA against a float64 reference, values and gradients."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v, dout = (torch.randn(B, H, S, D, device="cuda", dtype=dtype, generator=gen) for _ in range(4))
    scale = 1.0 / math.sqrt(D)
    ours = _grads(lambda *x: cuflash_sdpa(*x, is_causal=causal), (q, k, v), dout)
    sdpa = _grads(lambda *x: F.scaled_dot_product_attention(*x, is_causal=causal), (q, k, v), dout)
    ref = _grads(lambda *x: reference(*x, causal=causal, scale=scale), (q.double(), k.double(), v.double()),
                 dout.double())
    ok = True
    line = []
    for name, a, s, r, mult in zip(("out", "dq", "dk", "dv"), ours, sdpa, ref, (2, 3, 3, 3)):
        e, e_sdpa = _maxerr(a, r), _maxerr(s, r)
        ok &= e <= mult * e_sdpa + 1e-4
        line.append(f"{name} {e:.1e} (sdpa {e_sdpa:.1e}, vs sdpa {_maxerr(a, s):.1e})")
    print(f"  {str(dtype):15s} causal={causal!s:5s}  " + "  ".join(line) + ("" if ok else "  FAILED"))
    return ok


def check_dropout(dtype, causal=True, p=0.1, B=2, H=4, Hk=2, S=300, D=64) -> bool:
    """p > 0: against a float64 reference with the same mask; reproducible with a fixed seed."""
    import cupy

    gen = torch.Generator(device="cuda").manual_seed(1)
    q, dout = (torch.randn(B, H, S, D, device="cuda", dtype=dtype, generator=gen) for _ in range(2))
    k, v = (torch.randn(B, Hk, S, D, device="cuda", dtype=dtype, generator=gen) for _ in range(2))
    scale, seed = 1.0 / math.sqrt(D), 1234
    def run(offset):  # [out, dq, dk, dv] with the mask of (seed, offset)
        return _grads(lambda *x: cuflash_sdpa(*x, dropout_p=p, is_causal=causal, seed=seed, offset=offset,
                                              deterministic=True), (q, k, v), dout)

    first, again, other = run(0), run(0), run(1)
    same = all(torch.equal(a, b) for a, b in zip(first, again))
    differs = not torch.equal(first[0], other[0])

    with _on_torch_stream(q):
        keep = cuflash.dropout_mask(B, H, S, S, dropout_p=p, seed=seed, offset=0, xp=cupy)  # bool (B, H, S, S)
        keep = torch.from_dlpack(keep.view(cupy.uint8)).bool()
    kp = keep_probability(drop_threshold(p))
    ref = _grads(lambda *x: reference(*x, causal=causal, scale=scale, keep=keep, keep_prob=kp),
                 (q.double(), k.double(), v.double()), dout.double())
    naive = _grads(lambda *x: reference(*x, causal=causal, scale=scale, keep=keep, keep_prob=kp), (q, k, v), dout)
    ok = same and differs
    line = []
    for name, a, n, r, mult in zip(("out", "dq", "dk", "dv"), first, naive, ref, (2, 3, 3, 3)):
        e, e_naive = _maxerr(a, r), _maxerr(n, r)
        ok &= e <= mult * e_naive + 1e-4
        line.append(f"{name} {e:.1e} (naive {str(dtype)[6:]} {e_naive:.1e})")
    print(f"  p={p} GQA {H}/{Hk} causal={causal}: kept {keep.float().mean().item():.4f} (expect {kp:.4f})")
    print("  vs float64 with the same mask: " + "  ".join(line))
    print(f"  same seed and offset -> same bits: {same};  offset + 1 -> different output: {differs}")

    # the module, with cuflash's global generator: reseeding reproduces the step
    attn = CuflashAttention(dropout_p=p, causal=causal, deterministic=True).train()
    cuflash.manual_seed(7)
    y1 = attn(q, k, v)
    cuflash.manual_seed(7)
    y2 = attn(q, k, v)
    y3 = attn(q, k, v)
    eval_same = torch.equal(attn.eval()(q, k, v), cuflash_sdpa(q, k, v, is_causal=causal))
    module_ok = torch.equal(y1, y2) and not torch.equal(y2, y3) and eval_same
    print(f"  module: manual_seed(7) twice -> same output: {torch.equal(y1, y2)};  next call differs: "
          f"{not torch.equal(y2, y3)};  eval() == p=0: {eval_same}")
    return ok and module_ok


def show_no_copy() -> bool:
    q = torch.randn(1, 2, 64, 64, device="cuda", dtype=torch.float16)
    with _on_torch_stream(q):
        out, attn_ctx = cuflash.attention_forward(_bshd(q), _bshd(q), _bshd(q))
        same_out = torch.from_dlpack(out).data_ptr() == out.data.ptr
    same_in = attn_ctx.q.data.ptr == q.data_ptr()
    print(f"  q (B,H,S,D).transpose(1, 2) reaches the kernels without a copy: {same_in};"
          f"  torch.from_dlpack(out) shares out's memory: {same_out}")
    return same_in and same_out


def main() -> int:
    if torch is None or not torch.cuda.is_available():
        print("This example needs torch with CUDA; nothing to run here.")
        return 0
    print(f"cuflash {cuflash.__version__}, torch {torch.__version__} on {torch.cuda.get_device_name()}")
    ok = show_no_copy()
    print("p = 0 against scaled_dot_product_attention (max abs error vs float64):")
    for dtype in (torch.float16, torch.bfloat16):
        for causal in (False, True):
            ok &= check_against_sdpa(dtype, causal)
    print("dropout:")
    for dtype in (torch.float16, torch.bfloat16):
        ok &= check_dropout(dtype)
    print("all checks passed" if ok else "SOME CHECKS FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
