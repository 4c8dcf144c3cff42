import numpy as np

from tpusim.ir import Layer
from tpusim.ops import op
from tpusim.quant.arithmetic import activation_qparams
from op_checks import CONFIG


def test_softmax_integers_do_not_depend_on_the_input_layout():
    # Attention scores whose last two axes are swapped in memory give the integers of C-contiguous ones: numpy's
    # float sums run in memory order (summed that way, about fifty of these differ on a grid this fine).
    shape = (12, 197, 197)
    layer = Layer(name="s", op="softmax", inputs=("x",), output="y", input_shapes=(shape,), output_shape=shape,
                  axis=2)
    module = op("softmax")
    ql = module.quantize(layer, (activation_qparams(-12.0, 3.0, "asymmetric-uint8"),),
                         activation_qparams(0.0, 0.001, "asymmetric-uint8"), CONFIG.quant, None)
    q = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    swapped = np.ascontiguousarray(q.transpose(0, 2, 1)).transpose(0, 2, 1)
    np.testing.assert_array_equal(module.execute(ql, [swapped], None)[0], module.execute(ql, [q], None)[0])
