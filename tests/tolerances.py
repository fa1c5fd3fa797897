"""One rule for comparing floating-point results in the tests, so that they hold on any CPU (x86 SSE/AVX2/
AVX-512, ARM NEON/SVE), any BLAS/oneDNN kernel and any thread count (issue 16).

Why relative: two runs of the same float32 computation differ only where their additions happen in another
order (kernels split and block reductions by SIMD width, thread count and batch shape). A reordered sum of K
terms moves by at most about K * eps * sum|terms| (eps = 2**-23, about 1.19e-7), so the difference grows with
the size of the values: a fixed ``atol=1e-5`` that held for logits of size 1 failed for logits of size 6.5 on
an AVX-512 machine (1.31e-5). Per-element relative checks (``rtol`` in ``allclose``) are no better: an
element near 0 gets no slack although its error comes from the large terms it was summed from.

So results are compared norm-wise, in float64: ``max|actual - expected| <= rtol * max|expected|``. Each call
site states its ``rtol`` and why, and checks that the bug it guards moves the result by much more.
Comparisons of deterministic code on identical inputs (same shapes, same process, same kernels) stay exact
(``torch.equal`` / ``np.array_equal``); float64 arithmetic checked with ``pytest.approx`` (relative 1e-6 by
default) is already relative and far above float64 noise. Text round trips (SlideChat's CSV at ``%.4f``) are
bounded by their rounding (``assert_rounded_to_decimals``), which is the same on every machine.

``SLIDECHAT_TOLERANCE_LOG=FILE`` appends each comparison's observed relative difference and its ``rtol`` to
FILE (how the margins in the comments were measured).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

FP32_EPS = float(np.finfo(np.float32).eps)  # 2**-23, about 1.19e-7

# A float32 result computed two ways (batched/padded vs alone, merged vs unmerged LoRA weights, fused vs reference
# kernels, another thread count): each reduction of K terms is within K * eps of the magnitude of its terms, and
# the reductions here are K <= 800 long (hidden sizes 32-768, sequences <= 785), so K * eps <= 1e-4 at worst
# (typical sqrt(K) * eps ~ 3e-6; observed <= 4.2e-6 in this suite with 1 and 2 threads). Norm-wise against
# max|expected|; the bugs these tests guard (a dropped adapter, another row's slide, a wrong mask or padding mode)
# move results by 0.2-1.5 of that scale where a test measures it (assert_differs_rel at 10 * FP32_RTOL).
FP32_RTOL = 1e-4


def _as_float64(x: Any) -> np.ndarray:
    """Tensors (any device, grad or not), arrays, lists and scalars as a float64 array."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=np.float64)


def max_abs(x: Any) -> float:
    """Largest magnitude in ``x`` (the scale a relative tolerance is taken of)."""
    a = _as_float64(x)
    return float(np.abs(a).max()) if a.size else 0.0


def max_rel_diff(actual: Any, expected: Any) -> float:
    """``max|actual - expected| / max|expected|`` in float64 (inf when they differ and ``expected`` is all
    zero; nan when either holds a nan). Shapes must match exactly: no broadcasting hides a missing row."""
    a, e = _as_float64(actual), _as_float64(expected)
    assert a.shape == e.shape, f"shapes differ: {a.shape} vs {e.shape}"
    if not a.size:
        return 0.0
    diff = float(np.abs(a - e).max())
    scale = float(np.abs(e).max())
    if diff == 0.0:
        return 0.0
    return diff / scale if scale > 0 else float("inf")


def _log(kind: str, what: str, rel: float, bound: float, expected: Any) -> None:
    log = os.environ.get("SLIDECHAT_TOLERANCE_LOG")
    if log:
        with open(log, "a") as f:
            f.write(f"{os.environ.get('PYTEST_CURRENT_TEST', '?').split(' ')[0]}\t{what}\t"
                    f"rel={rel:.3e}\t{kind}={bound:.0e}\tscale={max_abs(expected):.3g}\n")


def assert_close_rel(actual: Any, expected: Any, rtol: float, what: str = "") -> float:
    """Assert ``max|actual - expected| <= rtol * max|expected|`` (float64, NaN fails); return the ratio."""
    rel = max_rel_diff(actual, expected)
    _log("rtol", what, rel, rtol, expected)
    assert rel <= rtol, (f"{what + ': ' if what else ''}max|a-b| = {rel:.3e} x max|expected| "
                         f"(max|expected| = {max_abs(expected):.4g}), allowed {rtol:.1e}")
    return rel


def assert_differs_rel(actual: Any, expected: Any, min_rel: float, what: str = "") -> float:
    """Assert ``max|actual - expected| > min_rel * max|expected|``: a real change, not float noise (the
    counterpart that shows a tolerance still has the power to fail)."""
    rel = max_rel_diff(actual, expected)
    _log("min_rel", what, rel, min_rel, expected)
    assert rel > min_rel, (f"{what + ': ' if what else ''}max|a-b| = {rel:.3e} x max|expected|, "
                           f"expected a real difference (> {min_rel:.1e})")
    return rel


def assert_rounded_to_decimals(parsed: Any, exact: Any, decimals: int) -> None:
    """Values written as text with ``decimals`` decimals (``%.4f``) and read back: each is within half a unit
    of the last decimal, plus float32 rounding of the parsed value. Text formatting is exact and the same on
    every machine, so this bound is tight; a shifted column or row is off by O(1)."""
    p, e = _as_float64(parsed), _as_float64(exact)
    assert p.shape == e.shape, f"shapes differ: {p.shape} vs {e.shape}"
    bound = 0.5 * 10.0 ** -decimals + 2 * FP32_EPS * max_abs(e)
    worst = float(np.abs(p - e).max()) if p.size else 0.0
    assert worst <= bound, f"max|parsed - exact| = {worst:.3e} > {bound:.3e} ({decimals} decimals)"
