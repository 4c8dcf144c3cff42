"""Sub: the difference of two activations (numpy broadcasting), or of an activation and a constant.

Lowering as Add's (:mod:`tpusim.ops._binary`): ``x - c`` after a Conv/Gemm/MatMul folds into its
bias, a per-channel ``x - c`` or ``c - x`` elsewhere is an ``affine`` layer (scale +-1), a scalar one a
step of a table, ``x - f(x)`` one table.

Integers: Add's common fixed-point domain with the second input's rescaled value negated
(round-half-away-from-zero rescaling is odd, so this is the rescale of ``-(q_b - z_b)``); one pass per
input vector, every input element requantized once, as Add.
"""
from __future__ import annotations

from tpusim.ops import register
from tpusim.ops.add import Add


@register
class Sub(Add):
    name = "sub"
    onnx_types = ("Sub",)
    signs = (1, -1)
