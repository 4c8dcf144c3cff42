"""Per-layer cycle agreement between tpusim and SCALE-Sim 3.0 (weight stationary), and the PE-level array.

    python3 benchmarks/compare_scalesim.py --model resnet50 --pe-array
    python3 benchmarks/compare_scalesim.py --model mobilenet_v2 --pe-array --record
    python3 benchmarks/compare_scalesim.py --model mobilenet_v2 --tiles scalesim

SCALE-Sim's weight-stationary model has no shadow weight registers: a fold's weights load only after
the previous fold has drained, so each fold takes 2R + C + T - 2 cycles on its own. tpusim models
that array with ``array.weight_double_buffering: false``. For every matrix layer of a built-in model
this prints, with the same tiles on both sides:

* ``scalesim``  -- SCALE-Sim's "Total Cycles" of the layer (``InterfaceBandwidth: CALC``: no stalls,
  so compute cycles), summed over the SCALE-Sim layers it was given (``ss layers``);
* ``closed``    -- tpusim's systolic closed form without double buffering over the tiles tpusim's
  tiler emits, ``sum over tiles of 2R + C + M - 2``;
* ``PE array``  -- (``--pe-array``) the cycle-stepped array (``pe_array_run``,
  ``weight_double_buffering=False``) stepping those tiles one after another, random operands;
* ``timeline``  -- tpusim's timeline engine with ``array.weight_double_buffering=false`` and unlimited
  memory bandwidth: the layer's MXU span, from its first weight shift (the R cycles before its first
  stream) to its last output. A layer whose input comes from a vector layer (a pool or an add) shifts
  its first tile's weights while it waits for that input; SCALE-Sim has no vector unit to wait for,
  so the wait is left out;
* ``agree``     -- whether each of those equals ``scalesim + ss layers`` (SCALE-Sim counts the index
  of the last cycle, one less than the number of cycles, per layer it simulates);
* ``tpusim DB`` -- tpusim's closed form as TPU v1 is built (double-buffered weights), for contrast.

Same tiles: by default (``--tiles tpusim``) SCALE-Sim is given layers whose folds are exactly
tpusim's tiles. Where tpusim's tiler and SCALE-Sim's own folding agree (most layers) that is the
layer's own conv row; where they differ it is one SCALE-Sim layer per tpusim M chunk (tpusim
streams M in accumulator-sized chunks, re-streaming every K fold per chunk) or one per packed
depthwise tile (tpusim packs several groups block-diagonally into one tile). ``ss own`` is the
fold count SCALE-Sim's own mapping of the layer would use; ``--tiles scalesim`` simulates that
instead, and ``agree`` then reads ``folds`` where the tiles differ.

SCALE-Sim runs in its own virtual environment (never a dependency of tpusim) as a subprocess. Its
layers are simulated independently with fresh memories, so identical layers give identical results:
each distinct layer is simulated once and its result reused (``--no-dedupe`` simulates all of
them), and the wall time of simulating every layer is projected from the per-layer times.
``--record`` writes SCALE-Sim's per-layer numbers to ``tests/data/scalesim/MODEL.json``, which
``tests/kernels/test_scalesim_agreement.py`` checks tpusim against without SCALE-Sim installed.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tpusim.config import HardwareConfig, load_config
from tpusim.frontend import load_onnx
from tpusim.ir import Graph, Layer
from tpusim.kernels.systolic import pe_array_run, stream_starts, tile_sequence_cycles
from tpusim.mapping import MatrixMultiply, Program, compile_program
from tpusim.pipeline import resolve_model
from tpusim.sim import simulate_program

REPO = Path(__file__).resolve().parent.parent
RECORD_DIR = REPO / "tests" / "data" / "scalesim"
DEFAULT_SCALESIM_PYTHON = Path("/work/venvs/scalesim/bin/python")
SETUP_HINT = """\
SCALE-Sim is not installed where --scalesim-python points ({python}).
Create its own virtual environment outside the repository (it is never a dependency of tpusim):

    python3 -m venv /work/venvs/scalesim
    /work/venvs/scalesim/bin/pip install scalesim "numpy<2.4"

(scalesim 3.0.0 calls int() on one-element arrays, which numpy >= 2.4 rejects.)
Then run this script again, or pass --scalesim-python /path/to/that/venv/bin/python."""

# Memories that never stall: the timeline then charges the MXU only what the array itself costs.
UNLIMITED_BANDWIDTH = {
    "weight_memory.bandwidth_gb_s": 1e12, "weight_memory.latency_cycles": 0,
    "host.bandwidth_gb_s": 1e12, "host.latency_cycles": 0,
}

# Runs inside SCALE-Sim's venv: SCALE-Sim parses the topology (expanding depthwise 'DP' rows into one
# layer per channel), then each layer is simulated with SCALE-Sim's own single-layer simulator, the
# way its simulator.run() does, minus trace files and reports; one JSON line per SCALE-Sim layer.
DRIVER = r'''
import json, sys, time
from importlib.metadata import version
from scalesim.scale_sim import scalesim
from scalesim.single_layer_sim import single_layer_sim

config, topology, layout, dedupe = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] == "1"
print(json.dumps({"scalesim_version": version("scalesim")}), flush=True)
sim = scalesim(save_disk_space=True, verbose=False, config=config, topology=topology, layout=layout,
               input_type_gemm=False)
done = {}
for index, entry in enumerate(sim.topo.topo_arrays):
    shape = tuple(entry[1:])
    simulated = not (dedupe and shape in done)
    if simulated:
        start = time.perf_counter()
        layer = single_layer_sim()
        layer.set_params(layer_id=index, config_obj=sim.config, topology_obj=sim.topo, layout_obj=sim.layout,
                         verbose=False)
        layer.run()
        items = layer.get_compute_report_items()
        done[shape] = (int(items[1]), int(items[2]), time.perf_counter() - start)
    total, stall, wall = done[shape]
    print(json.dumps({"name": entry[0], "total_cycles": total, "stall_cycles": stall,
                      "wall_s": wall, "simulated": simulated}), flush=True)
'''

CONFIG_TEMPLATE = """\
[general]
run_name = tpusim_compare

[architecture_presets]
ArrayHeight: {rows}
ArrayWidth: {cols}
IfmapSramSzkB: {ifmap_kb}
FilterSramSzkB: {filter_kb}
OfmapSramSzkB: {ofmap_kb}
IfmapOffset: 0
FilterOffset: 10000000
OfmapOffset: 20000000
Dataflow: ws
Bandwidth: 10
ReadRequestBuffer: 128
WriteRequestBuffer: 128

[layout]
IfmapCustomLayout: False
IfmapSRAMBankBandwidth: 10
IfmapSRAMBankNum: 10
IfmapSRAMBankPort: 2
FilterCustomLayout: False
FilterSRAMBankBandwidth: 10
FilterSRAMBankNum: 10
FilterSRAMBankPort: 2

[sparsity]
SparsitySupport: false
SparseRep: ellpack_block
OptimizedMapping: false
BlockSize: 8
RandomNumberGeneratorSeed: 40

[run_presets]
InterfaceBandwidth: CALC
UseRamulatorTrace: False
"""


@dataclass(frozen=True)
class WeightTile:
    """One weight tile as the array sees it: ``m_rows`` vectors streamed through ``k_rows`` x ``n_cols``.

    Consecutive multiplies that keep the array's weights (M chunks of a one-fold layer) form one tile:
    the array streams their rows back to back without a shift in between.
    """

    m_rows: int
    k_rows: int
    n_cols: int


@dataclass(frozen=True)
class ScaleSimRow:
    """One row of a SCALE-Sim conv topology (no padding: the IFMAP is given pre-padded)."""

    name: str
    ifmap_h: int
    ifmap_w: int
    filter_h: int
    filter_w: int
    channels: int
    filters: int
    stride: int

    @property
    def depthwise(self) -> bool:
        return "DP" in self.name

    def csv(self) -> str:
        return (f"{self.name},{self.ifmap_h},{self.ifmap_w},{self.filter_h},{self.filter_w},"
                f"{self.channels},{self.filters},{self.stride},")

    def runs(self) -> list[tuple[int, int, int]]:
        """(T, K, N) of each SCALE-Sim layer this row becomes (a 'DP' row: one per channel)."""
        t = ((self.ifmap_h - self.filter_h) // self.stride + 1) * ((self.ifmap_w - self.filter_w) // self.stride + 1)
        if self.depthwise:
            return [(t, self.filter_h * self.filter_w, self.filters)] * self.channels
        return [(t, self.filter_h * self.filter_w * self.channels, self.filters)]


def gemm_row(name: str, t_rows: int, k: int, n: int) -> ScaleSimRow:
    """A SCALE-Sim layer streaming T rows through a K x N weight matrix: a 1x1 conv over a 1 x T IFMAP."""
    return ScaleSimRow(name, 1, t_rows, 1, 1, k, n, 1)


def fold_shapes(runs: list[tuple[int, int, int]], rows: int, cols: int) -> Counter[tuple[int, int, int]]:
    """SCALE-Sim's WS folds of these layers: ceil(K/R) x ceil(N/C) per layer, each streaming all T rows."""
    folds: Counter[tuple[int, int, int]] = Counter()
    for t_rows, k, n in runs:
        for k0 in range(0, k, rows):
            for n0 in range(0, n, cols):
                folds[(t_rows, min(rows, k - k0), min(cols, n - n0))] += 1
    return folds


def tile_shapes(tiles: tuple[WeightTile, ...]) -> Counter[tuple[int, int, int]]:
    return Counter((t.m_rows, t.k_rows, t.n_cols) for t in tiles)


@dataclass(frozen=True)
class LayerComparison:
    name: str
    gemm: str
    tiles: tuple[WeightTile, ...]
    scalesim_rows: tuple[ScaleSimRow, ...]
    given_as: str  # how SCALE-Sim was given the layer: its own row, per M chunk, per packed tile
    own_folds: int  # folds of SCALE-Sim's own mapping of the layer
    own_folds_are_tiles: bool  # SCALE-Sim's own mapping has exactly tpusim's tiles
    closed: int  # no double buffering, tpusim's tiles
    timeline: int  # the engine's MXU span of the layer, no double buffering, unlimited bandwidth
    closed_double_buffered: int
    scalesim: int = 0
    scalesim_stall: int = 0
    pe_array: int | None = None

    @property
    def scalesim_runs(self) -> list[tuple[int, int, int]]:
        return [run for row in self.scalesim_rows for run in row.runs()]

    @property
    def expected(self) -> int:
        """SCALE-Sim's count as a number of cycles: one more per SCALE-Sim layer."""
        return self.scalesim + len(self.scalesim_runs)

    def agrees(self) -> bool:
        ours = [self.closed, self.timeline] + ([] if self.pe_array is None else [self.pe_array])
        return all(v == self.expected for v in ours)


def layer_tiles(program: Program, layer_index: int) -> tuple[WeightTile, ...]:
    """The weight tiles of one layer in issue order, from the compiled instruction stream."""
    tiles: list[WeightTile] = []
    for ins in program.instructions:
        if isinstance(ins, MatrixMultiply) and ins.layer == layer_index:
            if ins.load_weights or not tiles:
                tiles.append(WeightTile(ins.m_rows, ins.k_rows, ins.n_cols))
            else:
                last = tiles[-1]
                tiles[-1] = WeightTile(last.m_rows + ins.m_rows, last.k_rows, last.n_cols)
    return tuple(tiles)


def serial_cycles(tiles: tuple[WeightTile, ...], rows: int, cols: int) -> int:
    """Closed form without double buffering: every tile shifts, streams and drains alone."""
    return sum(tile_sequence_cycles(t.m_rows, 1, rows, cols, weight_double_buffering=False) for t in tiles)


def double_buffered_cycles(tiles: tuple[WeightTile, ...], rows: int, cols: int) -> int:
    """Closed form with double-buffered weights (tiles back to back, the first shift exposed)."""
    m_rows = [t.m_rows for t in tiles]
    return int(stream_starts(m_rows, rows)[-1]) + m_rows[-1] + rows + cols - 2


def own_rows(layer: Layer, tag: str) -> list[ScaleSimRow]:
    """The layer as SCALE-Sim maps it itself: one conv row (pre-padded IFMAP, so T = tpusim's M)."""
    if layer.op == "gemm":
        shape = layer.gemm
        return [ScaleSimRow(tag, 1, 1, 1, 1, shape.k, shape.n, 1)]
    conv = layer.conv
    assert conv is not None and layer.weight is not None
    if conv.dilations != (1, 1) or conv.strides[0] != conv.strides[1]:
        raise SystemExit(f"layer {layer.name!r}: dilated or non-square-stride convs have no SCALE-Sim topology row")
    _, _, h_out, w_out = layer.output_shape
    (kh, kw), stride = conv.kernel, conv.strides[0]
    ifmap_h, ifmap_w = (h_out - 1) * stride + kh, (w_out - 1) * stride + kw
    c_out, c_in_g, _, _ = layer.weight.shape
    groups, n_g = conv.groups, c_out // conv.groups
    if groups == 1:
        return [ScaleSimRow(tag, ifmap_h, ifmap_w, kh, kw, c_in_g, c_out, stride)]
    if c_in_g == 1 and n_g == 1:
        return [ScaleSimRow(f"{tag}_DP", ifmap_h, ifmap_w, kh, kw, groups, 1, stride)]  # SCALE-Sim's own expansion
    return [ScaleSimRow(f"{tag}_g{g}", ifmap_h, ifmap_w, kh, kw, c_in_g, n_g, stride) for g in range(groups)]


def rows_for_tiles(layer: Layer, tag: str, program: Program, layer_index: int, tiles: tuple[WeightTile, ...],
                   rows: int, cols: int) -> tuple[list[ScaleSimRow], str]:
    """SCALE-Sim layers whose folds are exactly tpusim's tiles, and how they were formed."""
    own = own_rows(layer, tag)
    if fold_shapes([r for row in own for r in row.runs()], rows, cols) == tile_shapes(tiles):
        return own, "own row"
    if layer.gemm.groups == 1:
        # tpusim streams each accumulator-sized M chunk through every K fold
        chunks = [ins.m_rows for ins in program.instructions
                  if isinstance(ins, MatrixMultiply) and ins.layer == layer_index and not ins.accumulate]
        n_blocks = -(-layer.gemm.n // cols)
        chunks = chunks[: len(chunks) // n_blocks]
        given = [gemm_row(f"{tag}_m{i}", m, layer.gemm.k, layer.gemm.n) for i, m in enumerate(chunks)], "per M chunk"
    else:
        given = [gemm_row(f"{tag}_t{i}", t.m_rows, t.k_rows, t.n_cols) for i, t in enumerate(tiles)], "per tile"
    if fold_shapes([r for row in given[0] for r in row.runs()], rows, cols) != tile_shapes(tiles):
        raise SystemExit(f"layer {layer.name!r}: no SCALE-Sim layers reproduce tpusim's tiles {tiles}")
    return given


def scalesim_available(python: Path) -> bool:
    if not python.exists():
        return False
    probe = subprocess.run([str(python), "-c", "import scalesim.scale_sim"], capture_output=True)
    return probe.returncode == 0


def scalesim_config(cfg: HardwareConfig) -> str:
    """SCALE-Sim's config for this array: SRAMs sized like the unified buffer, weight FIFO and accumulators."""
    kib = 1024
    return CONFIG_TEMPLATE.format(
        rows=cfg.array.rows, cols=cfg.array.cols,
        ifmap_kb=cfg.unified_buffer.capacity_bytes // kib,
        filter_kb=cfg.weight_fifo.depth_tiles * cfg.array.rows * cfg.array.cols * cfg.array.element_bytes // kib,
        ofmap_kb=cfg.accumulators.entries * cfg.array.cols * cfg.accumulators.bits // 8 // kib,
    )


def run_scalesim(python: Path, workdir: Path, rows: list[ScaleSimRow], cfg: HardwareConfig,
                 dedupe: bool) -> tuple[str, list[dict], float]:
    """Write config, topology and layout; run SCALE-Sim; its version, per-layer results and wall time."""
    (workdir / "scalesim.cfg").write_text(scalesim_config(cfg))
    header = "Layer name,IFMAP Height,IFMAP Width,Filter Height,Filter Width,Channels,Num Filter,Strides,"
    (workdir / "topology.csv").write_text("\n".join([header] + [r.csv() for r in rows]) + "\n")
    (workdir / "layout.csv").write_text("Layer name,\n")  # custom layouts are off; SCALE-Sim still opens one
    (workdir / "driver.py").write_text(DRIVER)
    start = time.perf_counter()
    proc = subprocess.run(
        [str(python), "driver.py", "scalesim.cfg", "topology.csv", "layout.csv", "1" if dedupe else "0"],
        cwd=workdir, capture_output=True, text=True,
    )
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        hint = ("\n(scalesim 3.0.0 needs numpy < 2.4 in its venv: pip install 'numpy<2.4')"
                if "0-dimensional arrays" in proc.stderr else "")
        raise SystemExit(f"SCALE-Sim failed (exit {proc.returncode}) in {workdir}:\n{proc.stderr[-3000:]}{hint}")
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    return lines[0]["scalesim_version"], lines[1:], wall


def pe_array_cycles(tiles: tuple[WeightTile, ...], rows: int, cols: int, seed: int = 0) -> int:
    """The stepped array without double buffering on these tiles, one after another, random operands."""
    rng = np.random.default_rng(seed)
    x_tiles = [rng.integers(0, 256, (t.m_rows, t.k_rows), dtype=np.uint8) for t in tiles]
    w_tiles = [rng.integers(-128, 128, (t.k_rows, t.n_cols), dtype=np.int8) for t in tiles]
    return pe_array_run(x_tiles, w_tiles, rows, cols, weight_double_buffering=False).cycles


def mxu_spans(program: Program, cfg: HardwareConfig, batch: int) -> tuple[dict[int, int], float]:
    """Per layer, the timeline's MXU span (R cycles before the first stream to the last output), and the
    engine's wall time."""
    start = time.perf_counter()
    sim = simulate_program(program, cfg, batch)
    wall = time.perf_counter() - start
    trace = sim.trace
    spans = {}
    for layer in np.unique(trace.mxu_layer):
        mine = trace.mxu_layer == layer
        spans[int(layer)] = int(trace.last_output[mine].max() - trace.stream_start[mine].min()) + cfg.array.rows
    return spans, wall


def compare(graph: Graph, cfg: HardwareConfig, tiles_from: str) -> tuple[list[LayerComparison], float, float]:
    """tpusim's side of every matrix layer and its SCALE-Sim rows; compile and timeline wall times."""
    rows, cols = cfg.array.rows, cfg.array.cols
    start = time.perf_counter()
    program = compile_program(graph, cfg)
    compile_wall = time.perf_counter() - start
    spans, timeline_wall = mxu_spans(program, cfg, graph.batch)
    layers = []
    for index, layer in enumerate(graph.layers):
        if not layer.is_matrix:
            continue
        tag = f"L{index:03d}"
        tiles = layer_tiles(program, index)
        own = own_rows(layer, tag)
        if tiles_from == "tpusim":
            given, given_as = rows_for_tiles(layer, tag, program, index, tiles, rows, cols)
        else:
            given, given_as = own, "own row"
        g = layer.gemm
        own_folds = fold_shapes([r for row in own for r in row.runs()], rows, cols)
        layers.append(LayerComparison(
            layer.name, f"{g.m}x{g.k}x{g.n}" + (f"/g{g.groups}" if g.groups > 1 else ""), tiles, tuple(given),
            given_as, sum(own_folds.values()), own_folds == tile_shapes(tiles),
            serial_cycles(tiles, rows, cols), spans[index], double_buffered_cycles(tiles, rows, cols),
        ))
    return layers, compile_wall, timeline_wall


def attach_scalesim(layers: list[LayerComparison], results: list[dict]) -> list[LayerComparison]:
    cycles: Counter[str] = Counter()
    stalls: Counter[str] = Counter()
    for r in results:
        tag = r["name"].split("_")[0]
        cycles[tag] += r["total_cycles"]
        stalls[tag] += r["stall_cycles"]
    out = []
    for layer in layers:
        tag = layer.scalesim_rows[0].name.split("_")[0]
        out.append(dataclasses.replace(layer, scalesim=cycles[tag], scalesim_stall=stalls[tag]))
    return out


def record(path: Path, model: str, config_path: str, cfg: HardwareConfig, version: str,
           layers: list[LayerComparison], results: list[dict]) -> None:
    """SCALE-Sim's per-layer numbers with what produced them, for the test that needs no SCALE-Sim."""
    by_name = {r["name"]: r for r in results}
    entries = []
    for c in layers:
        ss = []
        for row in c.scalesim_rows:
            (t_rows, k, n), = row.runs()
            r = by_name[row.name]
            ss.append({"name": row.name, "T": t_rows, "K": k, "N": n, "total_cycles": r["total_cycles"],
                       "stall_cycles": r["stall_cycles"]})
        entries.append({"layer": c.name, "gemm": c.gemm, "given_as": c.given_as, "scalesim_layers": ss})
    write_record(path, {
        "what": "SCALE-Sim's weight-stationary compute cycles ('Total Cycles', InterfaceBandwidth CALC) of every "
                f"matrix layer of tpusim's built-in {model}, given tpusim's own tiles (see benchmarks/README.md)",
        "command": f"python3 benchmarks/compare_scalesim.py --model {model} --record",
        "scalesim_version": version,
        "tpusim_config": str(Path(config_path).resolve().relative_to(REPO)),
        "array": {"rows": cfg.array.rows, "cols": cfg.array.cols},
        "scalesim_config": scalesim_config(cfg).splitlines(),
        "layers": entries,
    })


def write_record(path: Path, document: dict) -> None:
    """The record as JSON, one layer per line so that a diff shows which layers changed."""
    head = json.dumps({k: v for k, v in document.items() if k != "layers"}, indent=1)
    layers = ",\n".join("  " + json.dumps(entry) for entry in document["layers"])
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f'{head[:-2]},\n "layers": [\n{layers}\n ]\n}}\n')


def print_table(layers: list[LayerComparison], rows: int, cols: int, tiles_from: str) -> None:
    def show(v: int | None) -> str:
        return "-" if v is None else str(v)

    head = (f"{'layer':<24} {'M x K x N /g':>18} {'given as':>11} {'tiles':>5} {'ss own':>6} {'ss layers':>9} "
            f"{'scalesim':>9} {'closed':>9} {'PE array':>9} {'timeline':>9} {'agree':>5} {'tpusim DB':>9} "
            f"{'ss/DB':>6}")
    print(head)
    print("-" * len(head))
    for c in layers:
        if c.agrees():
            verdict = "yes"
        elif tiles_from == "scalesim" and not c.own_folds_are_tiles:
            verdict = "folds"
        else:
            verdict = "NO"
        print(f"{c.name[:24]:<24} {c.gemm:>18} {c.given_as:>11} {len(c.tiles):>5} {c.own_folds:>6} "
              f"{len(c.scalesim_runs):>9} {c.scalesim:>9} {c.closed:>9} {show(c.pe_array):>9} {c.timeline:>9} "
              f"{verdict:>5} {c.closed_double_buffered:>9} {c.scalesim / c.closed_double_buffered:>6.3f}")
    print("-" * len(head))

    def total(values: list[int | None]) -> str:
        return "-" if None in values else str(sum(values))

    scalesim = sum(c.scalesim for c in layers)
    double_buffered = sum(c.closed_double_buffered for c in layers)
    print(f"{'total (matrix layers)':<24} {'':>18} {'':>11} {sum(len(c.tiles) for c in layers):>5} "
          f"{sum(c.own_folds for c in layers):>6} {sum(len(c.scalesim_runs) for c in layers):>9} {scalesim:>9} "
          f"{sum(c.closed for c in layers):>9} {total([c.pe_array for c in layers]):>9} "
          f"{sum(c.timeline for c in layers):>9} {'':>5} {double_buffered:>9} {scalesim / double_buffered:>6.3f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnet50", choices=["resnet50", "mobilenet_v2", "tiny_cnn"])
    parser.add_argument("--config", default=str(REPO / "configs" / "tpu_v1.yaml"))
    parser.add_argument("--scalesim-python", type=Path, default=DEFAULT_SCALESIM_PYTHON,
                        help="python of the venv where scalesim is installed")
    parser.add_argument("--tiles", choices=["tpusim", "scalesim"], default="tpusim",
                        help="tpusim: give SCALE-Sim layers whose folds are tpusim's tiles; "
                             "scalesim: each layer as SCALE-Sim maps it itself (one 1-channel layer per "
                             "depthwise channel, all of M per fold)")
    parser.add_argument("--pe-array", action="store_true",
                        help="also step every layer's tiles on the PE-level array (about a minute for resnet50)")
    parser.add_argument("--no-dedupe", action="store_true",
                        help="simulate every SCALE-Sim layer, even identical ones")
    parser.add_argument("--record", action="store_true",
                        help="write SCALE-Sim's numbers to tests/data/scalesim/MODEL.json (needs --tiles tpusim)")
    parser.add_argument("--workdir", type=Path, help="keep SCALE-Sim's inputs here (default: a temp dir)")
    args = parser.parse_args(argv)
    if args.record and args.tiles != "tpusim":
        parser.error("--record keeps the same-tiles comparison only: drop --tiles scalesim")

    cfg = load_config(args.config, {"array.weight_double_buffering": False, **UNLIMITED_BANDWIDTH})
    graph = load_onnx(resolve_model(args.model))
    if graph.batch != 1:
        raise SystemExit(f"batch {graph.batch}: SCALE-Sim conv topologies have no batch dimension")
    layers, compile_wall, timeline_wall = compare(graph, cfg, args.tiles)
    rows, cols = cfg.array.rows, cfg.array.cols
    print(f"model {args.model}, array {rows}x{cols}, weight stationary without double buffering, "
          f"tiles from {args.tiles}, {len(layers)} matrix layers")

    if not scalesim_available(args.scalesim_python):
        print(SETUP_HINT.format(python=args.scalesim_python))
        print("Skipping the comparison: SCALE-Sim is not available.")
        return 0

    with tempfile.TemporaryDirectory(prefix="scalesim_") as tmp:
        workdir = args.workdir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        ss_rows = [row for c in layers for row in c.scalesim_rows]
        version, results, scalesim_wall = run_scalesim(args.scalesim_python, workdir, ss_rows, cfg,
                                                       not args.no_dedupe)
    layers = attach_scalesim(layers, results)

    pe_wall = 0.0
    if args.pe_array:
        start = time.perf_counter()
        layers = [dataclasses.replace(c, pe_array=pe_array_cycles(c.tiles, rows, cols)) for c in layers]
        pe_wall = time.perf_counter() - start

    print(f"SCALE-Sim {version}\n")
    print_table(layers, rows, cols, args.tiles)
    agree = sum(c.agrees() for c in layers)
    checked = "closed form" + (", PE array" if args.pe_array else "") + ", timeline"
    print(f"\n{checked} = SCALE-Sim + 1 per SCALE-Sim layer on {agree}/{len(layers)} layers; "
          f"SCALE-Sim stall cycles {sum(c.scalesim_stall for c in layers)}; "
          f"tpusim's tiles are SCALE-Sim's own folds on {sum(c.own_folds_are_tiles for c in layers)}/{len(layers)}")
    simulated = [r for r in results if r["simulated"]]
    projected = sum(r["wall_s"] for r in results)
    print(f"wall time: tpusim compile {compile_wall:.3f} s + timeline {timeline_wall:.3f} s; closed form negligible"
          + (f"; PE array {pe_wall:.1f} s" if args.pe_array else "")
          + f"; SCALE-Sim {scalesim_wall:.1f} s measured ({len(simulated)} distinct of {len(results)} SCALE-Sim "
            f"layers simulated), {projected:.0f} s projected for every layer")
    if args.record:
        path = RECORD_DIR / f"{args.model}.json"
        record(path, args.model, args.config, cfg, version, layers, results)
        print(f"recorded {path.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
