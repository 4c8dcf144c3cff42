"""MatMul of two activations (attention): every stage, exact integers on both grids, the engines, the
stationary operand's two weight paths (host round trip, direct), and the exporter patterns it folds."""
import dataclasses

import numpy as np
import pytest
from onnx_graphs import GraphBuilder
from op_checks import CONFIG, check_all_stages, check_reference

from tpusim.config import load_config
from tpusim.energy.model import LayerEnergy, layer_energy
from tpusim.energy.table import load_energy_table
from tpusim.errors import ModelError
from tpusim.frontend import lower_model
from tpusim.ir import LayerCounts
from tpusim.mapping import compile_program
from tpusim.mapping.isa import (Activate, MatrixMultiply, ReadWeights, ReadWeightsFromUb, WriteHostMemory,
                                WriteWeightMemory)
from tpusim.ops import ExecOptions, op
from tpusim.ops.matmul import gemm_view
from tpusim.quant.arithmetic import activation_qparams, quantize
from tpusim.quant.stage import _PeArrayUnit
from tpusim.sim.engine import simulate, transfer_cycles

SHAPE = (1, 2, 8, 16)  # batch, heads, tokens, head dim


def _attention(shape=SHAPE, scale: float | None = 0.25):
    """softmax(q k^T [* scale]) v on per-head projections of the input."""
    g = GraphBuilder(shape, seed=1)
    d = shape[-1]
    q = g.node("MatMul", [g.input_name, g.weight((d, d), 0.4)])
    if scale is not None:
        q = g.node("Mul", [q, g.const(np.array(scale, np.float32))])
    k = g.node("MatMul", [g.input_name, g.weight((d, d), 0.4)])
    kt = g.node("Transpose", [k], perm=[0, 1, 3, 2])
    p = g.node("Softmax", [g.node("MatMul", [q, kt])], axis=-1)
    v = g.node("MatMul", [g.input_name, g.weight((d, d), 0.4)])
    return g.model(g.node("MatMul", [p, v]))


# The softmax is a float step: ORT's exp and ours round a couple of its 128 outputs differently.
SOFTMAX_OFF = 0.03


def test_attention_through_every_stage():
    graph = check_all_stages(_attention(), SHAPE, {"matmul"}, max_off_fraction=SOFTMAX_OFF)
    ops = [layer.op for layer in graph.layers]
    assert ops.count("matmul") == 2 and "unary" not in ops  # the scalar on q joined the matmul's requant
    scores, context = (layer for layer in graph.layers if layer.op == "matmul")
    assert scores.attr("scale") == 0.25 and context.attr("scale") is None
    assert gemm_view(scores) == dataclasses.replace(gemm_view(scores), m=8, k=16, n=8, groups=2)
    assert scores.output_shape == (1, 2, 8, 8) and context.output_shape == SHAPE


def test_a_broadcast_operand_through_every_stage():
    # One head's keys for both heads: B of shape (1, 1, 16, 8) against A of (1, 2, 8, 16).
    g = GraphBuilder(SHAPE, seed=2)
    k = g.node("MatMul", [g.input_name, g.weight((16, 16), 0.4)])
    k0 = g.node("Slice", [k] + [g.const(np.array([v], np.int64)) for v in (0, 1, 1)])
    scores = g.node("MatMul", [g.input_name, g.node("Transpose", [k0], perm=[0, 1, 3, 2])])
    graph = check_all_stages(g.model(scores), SHAPE, {"matmul"})
    product = graph.layers[-1]
    assert product.input_shapes[1] == (1, 1, 16, 8) and product.output_shape == (1, 2, 8, 8)


def _matmul_layer():
    g = GraphBuilder(SHAPE)
    kt = g.node("Transpose", [g.node("MatMul", [g.input_name, g.weight((16, 16))])], perm=[0, 1, 3, 2])
    graph = lower_model(g.model(g.node("MatMul", [g.input_name, kt])), "m.onnx")
    return graph, graph.layers[-1]


@pytest.mark.parametrize("a_scheme,b_scheme", [("asymmetric-uint8", "asymmetric-uint8"),
                                               ("symmetric-int8", "asymmetric-uint8"),
                                               ("asymmetric-uint8", "symmetric-int8")])
def test_integers_are_the_exact_centred_products_requantized(a_scheme, b_scheme):
    _, layer = _matmul_layer()
    module = op("matmul")
    a_qp = activation_qparams(-1.3, 3.1, a_scheme)
    b_qp = activation_qparams(-2.2, 0.7, b_scheme)  # a zero point far from 128
    y_qp = activation_qparams(-20.0, 25.0, "asymmetric-uint8")
    ql = module.quantize(layer, (a_qp, b_qp), y_qp, CONFIG.quant, None)
    rng = np.random.default_rng(5)
    qa = quantize(rng.uniform(-1.3, 3.1, layer.input_shapes[0]).astype(np.float32), a_qp)
    qb = quantize(rng.uniform(-2.2, 0.7, layer.input_shapes[1]).astype(np.float32), b_qp)
    out, wrapped = module.execute(ql, [qa, qb], ExecOptions())
    exact = np.matmul(qa.astype(np.int64) - int(a_qp.zero_point), qb.astype(np.int64) - int(b_qp.zero_point))
    real = exact * (float(a_qp.scale) * float(b_qp.scale) / float(y_qp.scale)) + int(y_qp.zero_point)
    assert wrapped == 0 and out.shape == layer.output_shape and out.dtype == np.uint8
    assert np.max(np.abs(out - np.clip(real, 0, 255))) <= 0.5 + 1e-6
    # The same integers from BLAS and from the PE-level cycle-stepped array.
    for engine in ("exact-blas", _PeArrayUnit(32, 32, weight_double_buffering=True)):
        np.testing.assert_array_equal(module.execute(ql, [qa, qb], ExecOptions(engine=engine))[0], out)


def test_a_vector_operand_is_a_one_line_error():
    g = GraphBuilder(SHAPE)
    vector = g.node("ReduceMean", [g.input_name], axes=[0, 1, 2], keepdims=0)  # (16,), in a one-sample graph
    with pytest.raises(ModelError, match=r"MatMul.*both need rank >= 2"):
        lower_model(g.model(g.node("MatMul", [g.input_name, vector]), batch_dim=1), "m.onnx")


# -- the stationary operand's path -------------------------------------------------------------------


def _matmul_instructions(program, layer_name):
    """The layer's instructions before its output (a graph output here) goes back to the host."""
    index = program.layer_names.index(layer_name)
    return [ins for ins in program.instructions if ins.layer == index][:-2]


def test_host_round_trip_and_direct_path_programs_and_counts():
    graph, layer = _matmul_layer()
    g = gemm_view(layer)
    stationary = g.groups * g.k * g.n  # 2 heads of 16 x 8, packed into one tile
    host = load_config("configs/tpu_v1.yaml")
    direct = host.replace(**{"computed_weights.path": "direct"})
    kinds = [type(i) for i in _matmul_instructions(compile_program(graph, host), layer.name)]
    assert kinds == [WriteHostMemory, WriteWeightMemory, ReadWeights, MatrixMultiply, Activate]
    kinds = [type(i) for i in _matmul_instructions(compile_program(graph, direct), layer.name)]
    assert kinds == [ReadWeightsFromUb, MatrixMultiply, Activate]
    (by_host,), (by_direct,) = ([t for t in simulate(graph, c).layers if t.name == layer.name] for c in (host, direct))
    assert by_host.counts.host_weight_bytes == stationary and by_host.counts.weight_dram_bytes == 2 * stationary
    output = int(np.prod(layer.output_shape))  # the graph output goes to the host too
    assert by_host.counts.host_out_bytes == stationary + output and by_host.counts.weight_fifo_bytes == stationary
    assert by_direct.counts.host_weight_bytes == by_direct.counts.weight_dram_bytes == 0
    assert by_direct.counts.weight_fifo_bytes == stationary and by_host.macs == by_direct.macs == g.macs


def test_round_trip_time_is_unified_buffer_to_host_then_host_to_weight_memory():
    graph, layer = _matmul_layer()
    cfg = load_config("configs/tpu_v1.yaml")
    nbytes = gemm_view(layer).groups * gemm_view(layer).k * gemm_view(layer).n
    pcie = transfer_cycles(nbytes, cfg.host.bandwidth_gb_s, cfg.array.clock_mhz, cfg.host.latency_cycles)
    wm = cfg.weight_memory
    dram = transfer_cycles(nbytes, wm.bandwidth_gb_s, cfg.array.clock_mhz, wm.latency_cycles)
    direct_cfg = cfg.replace(**{"computed_weights.path": "direct"})
    host, direct = simulate(graph, cfg), simulate(graph, direct_cfg)
    # The tile reaches the FIFO a Write_Host_Memory plus the slower of PCIe and the weight memory's write
    # after the operand is written, or ceil(bytes / 256) after it on the direct path.
    tile = len(host.trace.fetch_start) - 1
    round_trip = host.trace.fetch_start[tile] - direct.trace.fetch_start[tile]
    assert round_trip == pcie + max(pcie, dram)
    assert direct.trace.fetch_end[tile] - direct.trace.fetch_start[tile] == -(-nbytes // 256)
    # Nothing hides it in this graph: the run is longer by the round trip less the direct path's load.
    load_difference = (host.trace.fetch_end[tile] - host.trace.fetch_start[tile]) - (-(-nbytes // 256))
    assert abs((host.total_cycles - direct.total_cycles) - (round_trip + load_difference)) <= 1


def test_host_to_weight_memory_bytes_cost_the_pcie_link():
    cfg = load_config("configs/tpu_v1.yaml")
    table = load_energy_table(cfg.energy.table)
    link = layer_energy(LayerCounts(host_weight_bytes=3), cfg, table)
    assert link == LayerEnergy(host=3 * table.host_link_pj_per_byte)


def test_both_paths_in_the_whole_pipeline_and_the_direct_one_is_faster():
    graph = lower_model(_attention(), "a.onnx")
    cfg = load_config("configs/tpu_v1.yaml")
    host, direct = simulate(graph, cfg), simulate(graph, cfg.replace(**{"computed_weights.path": "direct"}))
    assert direct.total_cycles < host.total_cycles
    assert sum(t.counts.host_weight_bytes for t in host.layers) == 2 * 8 * 16 + 2 * 8 * 16  # K^T and V
    assert sum(t.counts.host_weight_bytes for t in direct.layers) == 0


# -- what exporters write around attention -----------------------------------------------------------


def test_torch_batched_transpose_of_k_is_one_transpose():
    # Reshape (1, 2, 8, 16) -> (2, 8, 16), Transpose(0, 2, 1), Reshape -> (1, 2, 16, 8): torch's k.transpose(-2, -1).
    g = GraphBuilder(SHAPE)
    k = g.node("MatMul", [g.input_name, g.weight((16, 16))])
    merged = g.node("Reshape", [k, g.const(np.array([2, 8, 16], np.int64))])
    kt = g.node("Reshape", [g.node("Transpose", [merged], perm=[0, 2, 1]), g.const(np.array([1, 2, 16, 8], np.int64))])
    model = g.model(g.node("MatMul", [g.input_name, kt]), batch_dim=1)
    graph = check_reference(model, np.random.default_rng(0).standard_normal(SHAPE).astype(np.float32))
    assert [(layer.op, layer.attr("perm")) for layer in graph.layers] == [
        ("gemm", None), ("transpose", (0, 1, 3, 2)), ("matmul", None)]


def test_softmax_nan_guard_and_all_zero_mask_are_dropped():
    # torch's scaled_dot_product_attention: Where(IsNaN(p), 0, p) after the softmax; an all-ones
    # attention_mask folds to an all-zero additive mask on the scores.
    g = GraphBuilder(SHAPE)
    kt = g.node("Transpose", [g.node("MatMul", [g.input_name, g.weight((16, 16))])], perm=[0, 1, 3, 2])
    scores = g.node("Add", [g.node("MatMul", [g.input_name, kt]), g.const(np.zeros((1, 1, 8, 8), np.float32))])
    p = g.node("Softmax", [scores], axis=-1)
    p = g.node("Where", [g.node("IsNaN", [p]), g.const(np.array(0.0, np.float32)), p])
    model = g.model(g.node("MatMul", [p, g.input_name]))
    x = np.random.default_rng(1).standard_normal(SHAPE).astype(np.float32)
    graph = check_reference(model, x)
    assert [layer.op for layer in graph.layers] == ["gemm", "transpose", "matmul", "softmax", "matmul"]


@pytest.mark.parametrize("k, a_range, b_range", [
    (40, (-1.3, 3.1), (-2.2, 0.7)),
    (60_000, (0.0, 3.0), (0.0, 2.0)),  # sums past int32 where the activation unit adds the rows' term: wrapped
])
def test_activation_unit_kernel_is_its_numpy_oracle(k, a_range, b_range):
    from tpusim.ir import Layer
    from tpusim.ops.matmul import matmul_reference

    layer = Layer(name="m", op="matmul", inputs=("a", "b"), output="y", input_shapes=((2, 3, k), (2, k, 5)),
                  output_shape=(2, 3, 5))
    a_qp, b_qp = activation_qparams(*a_range, "asymmetric-uint8"), activation_qparams(*b_range, "asymmetric-uint8")
    ql = op("matmul").quantize(layer, (a_qp, b_qp), activation_qparams(-9.0, 9.0, "asymmetric-uint8"), CONFIG.quant,
                               None)
    rng = np.random.default_rng(k)
    qa, qb = (rng.integers(200 if k > 1000 else 0, 256, shape).astype(np.uint8) for shape in layer.input_shapes)
    out, wrapped = op("matmul").execute(ql, [qa, qb], ExecOptions())
    expected, expected_wrapped = matmul_reference(ql, [qa, qb], ExecOptions())
    np.testing.assert_array_equal(out, expected)
    assert out.dtype == expected.dtype and wrapped == expected_wrapped
    assert (wrapped > 0) == (k > 1000)
