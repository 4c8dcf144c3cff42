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


class _Extremum(Op):
    in_place = True
    fusable = True
    pick = staticmethod(np.maximum)

    def lower(self, ctx, node):
        lower_binary(ctx, node, self.name, self.name)

    def reference(self, layer, inputs):
        return self.pick(inputs[0], inputs[1])

    def quantize(self, layer, in_qps, y_qp, quant, input_mean):
        from tpusim.quant.qlayer import plain_qlayer, rescales_to
        return plain_qlayer(layer, in_qps, y_qp, input_rescales=rescales_to(in_qps, y_qp))

    def execute(self, ql, inputs, options):
        from tpusim.quant.qlayer import clamp_output, on_output_grid
        a, b = (q.astype(np.int32) for q in on_output_grid(ql, inputs))
        return clamp_output(ql, self.pick(a, b)), 0

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
