"""Max and Min of two inputs: a clamp with a scalar constant, else an elementwise layer.

Lowering (:mod:`tpusim.ops._binary`): with a scalar constant, a clamp fused into the producer exactly
like Relu/Clip (Relu6 exported as ``Max(x, 0)`` then ``Min(x, 6)`` becomes one [0, 6] clamp of the
conv; a second clamp intersects the first, :mod:`tpusim.ops.activation`); of two functions of one
tensor (``Max(x, 0.1 x)``, a LeakyRelu), one table; of two activations, the ``max``/``min`` layer with
numpy broadcasting.

Integers: both inputs are requantized to the output's grid (an input already on it is copied), then
the integer max/min is taken: quantization is monotonic, so this is the quantized max/min of the two
dequantized inputs. Vector unit: one pass per input vector (each operand read once and requantized),
one compare per output element.
"""
from __future__ import annotations

import numpy as np

from tpusim.ops import register
from tpusim.ops._binary import binary_passes, lower_binary
from tpusim.ops.base import Op, VectorCost
from tpusim.quant.qlayer import Requant, centered, clamp_output, plain_qlayer, rescale, scalar


def _same_grid(a, b) -> bool:
    return scalar(a.scale) == scalar(b.scale) and int(a.zero_point) == int(b.zero_point) and a.qmin == b.qmin


class _Extremum(Op):
    in_place = True
    fusable = True
    pick = staticmethod(np.maximum)

    def lower(self, ctx, node):
        lower_binary(ctx, node, self.name, self.name)

    def reference(self, layer, inputs):
        return self.pick(inputs[0], inputs[1])

    def quantize(self, layer, in_qps, y_qp, quant, input_mean):
        rescales = tuple(None if _same_grid(qp, y_qp) else Requant.of(scalar(qp.scale) / scalar(y_qp.scale))
                         for qp in in_qps)
        return plain_qlayer(layer, in_qps, y_qp, input_rescales=rescales)

    def execute(self, ql, inputs, options):
        y_qp = ql.output_qparams
        on_grid = []
        for q, qp, r in zip(inputs, ql.input_qparams, ql.input_rescales):
            if r is None:
                on_grid.append(q.astype(np.int32))
            else:
                on_grid.append(rescale(centered(q, qp.zero_point), r, int(y_qp.zero_point), y_qp.qmin, y_qp.qmax)
                               .astype(np.int32))
        return clamp_output(ql, self.pick(on_grid[0], on_grid[1])), 0

    def vector_cost(self, layer, in_elements, out_elements, lanes, int8):
        passes = binary_passes(in_elements, out_elements, lanes)
        return VectorCost(f"{layer.op}+{layer.activation.label}", "none", passes,
                          activation_ops=out_elements, requant_ops=sum(in_elements) if int8 else 0)

    def export(self, b, layer, inputs, weight, bias, y):
        b.node(self.onnx_types[0], inputs, y, layer.name)


@register
class Max(_Extremum):
    name = "max"
    onnx_types = ("Max",)
    pick = staticmethod(np.maximum)


@register
class Min(_Extremum):
    name = "min"
    onnx_types = ("Min",)
    pick = staticmethod(np.minimum)
