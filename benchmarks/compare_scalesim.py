"""Per-layer cycle agreement between tpusim and SCALE-Sim (weight stationary), refereed by the PE-level array.

    python3 benchmarks/compare_scalesim.py --model resnet50
    python3 benchmarks/compare_scalesim.py --model mobilenet_v2 --depthwise packed --referee auto

For every matrix layer of a built-in model this prints

* ``closed``   -- tpusim's MXU-only cycles with weights always ready: the systolic closed form
  (first shift exposed, each later tile streaming ``max(M, R)`` after the previous one, the last
  one draining in ``M + R + C - 2``) over the exact tiles tpusim's tiler emits for the layer;
* ``timeline`` -- tpusim's full timeline span of the layer (DRAM weight stalls, activation unit,
  overlap with its neighbours), ``tpusim.sim.simulate_program``;
* ``scalesim`` -- SCALE-Sim's "Total Cycles" of the same layer (its compute cycles; the
  ``CALC`` bandwidth mode gives no stalls), summed over the SCALE-Sim layers the layer became;
* ``formula``  -- whether that number equals ``sum over SCALE-Sim layers of F * (2R + C + T - 2) - 1``
  (F folds of T streamed rows, each fold run alone), the accounting this benchmark attributes to it.

SCALE-Sim runs in its own virtual environment (never a dependency of tpusim) as a subprocess. Its
layers are simulated independently with fresh memories, so identical layers give identical
results: by default each distinct layer is simulated once and its result reused, and the wall time
of simulating every layer as written is projected from the per-layer times (``--no-dedupe``
simulates every layer; a depthwise layer expands into one SCALE-Sim layer per channel).

``--referee`` steps the PE-level array (``tpusim.kernels.systolic.pe_array_run``) on a layer's tiles
twice: as tpusim schedules them (double-buffered weights, back to back) and one fold at a time as
SCALE-Sim schedules them (shift, stream, drain, then the next fold), and prints both counts.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tpusim.config import HardwareConfig, load_config
from tpusim.frontend import lower_model
from tpusim.ir import Graph, Layer
from tpusim.kernels.systolic import pe_array_run, stream_starts, tile_sequence_cycles
from tpusim.mapping import MatrixMultiply, Program, compile_program
from tpusim.sim import simulate_program
from tpusim.workloads import build_model

REPO = Path(__file__).resolve().parent.parent
DEFAULT_SCALESIM_PYTHON = Path("/work/venvs/scalesim/bin/python")
SETUP_HINT = """\
SCALE-Sim is not installed where --scalesim-python points ({python}).
Create its own virtual environment outside the repository (it is never a dependency of tpusim):

    python3 -m venv /work/venvs/scalesim
    /work/venvs/scalesim/bin/pip install scalesim "numpy<2.4"

(scalesim 3.0.0 calls int() on one-element arrays, which numpy >= 2.4 rejects.)
Then run this script again, or pass --scalesim-python /path/to/that/venv/bin/python."""

# Runs inside SCALE-Sim's venv: SCALE-Sim parses the topology (expanding depthwise 'DP' rows into one
# layer per channel), then each layer is simulated with SCALE-Sim's own single-layer simulator, the
# way its simulator.run() does, minus trace files and reports; one JSON line per SCALE-Sim layer.
DRIVER = r'''
import json, sys, time
from scalesim.scale_sim import scalesim
from scalesim.single_layer_sim import single_layer_sim

config, topology, layout, dedupe = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] == "1"
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


@dataclass(frozen=True)
class LayerComparison:
    name: str
    gemm: str
    tiles: tuple[WeightTile, ...]
    scalesim_rows: tuple[ScaleSimRow, ...]
    closed: int
    timeline: int
    active: int
    scalesim: int
    scalesim_stall: int
    formula: int

    @property
    def scalesim_runs(self) -> list[tuple[int, int, int]]:
        return [run for row in self.scalesim_rows for run in row.runs()]


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


def mxu_only_cycles(tiles: tuple[WeightTile, ...], rows: int, cols: int) -> int:
    """Closed form of the stepped array for these tiles back to back, weights always ready."""
    m_rows = [t.m_rows for t in tiles]
    if len(set(m_rows)) == 1:
        return tile_sequence_cycles(m_rows[0], len(tiles), rows, cols)
    return int(stream_starts(m_rows, rows)[-1]) + m_rows[-1] + rows + cols - 2


def scalesim_fold_cycles(t_rows: int, k: int, n: int, rows: int, cols: int) -> int:
    """SCALE-Sim WS accounting of one layer: each of its folds alone, 2R + C + T - 2 rows, reported 0-based."""
    folds = math.ceil(k / rows) * math.ceil(n / cols)
    return folds * (2 * rows + cols + t_rows - 2) - 1


def scalesim_rows_for(layer: Layer, tag: str, tiles: tuple[WeightTile, ...], groups_per_tile: int,
                      depthwise: str) -> list[ScaleSimRow]:
    """SCALE-Sim topology rows computing the same GEMM(s) with the same M (pre-padded IFMAP).

    A grouped conv becomes SCALE-Sim's own 'DP' row (depthwise) or one row per group; with
    ``depthwise="packed"`` and groups packed by tpusim's tiler, one dense row per packed tile instead
    (g groups as a conv of g*Cin/G channels and g*Cout/G filters: the tile's footprint, one K fold).
    """
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
    if depthwise == "packed" and groups_per_tile > 1:
        return [ScaleSimRow(f"{tag}_t{i}", ifmap_h, ifmap_w, kh, kw, (t.n_cols // n_g) * c_in_g, t.n_cols, stride)
                for i, t in enumerate(tiles)]
    if c_in_g == 1 and n_g == 1:
        return [ScaleSimRow(f"{tag}_DP", ifmap_h, ifmap_w, kh, kw, groups, 1, stride)]  # SCALE-Sim's own expansion
    return [ScaleSimRow(f"{tag}_g{g}", ifmap_h, ifmap_w, kh, kw, c_in_g, n_g, stride) for g in range(groups)]


def scalesim_available(python: Path) -> bool:
    if not python.exists():
        return False
    probe = subprocess.run([str(python), "-c", "import scalesim.scale_sim"], capture_output=True)
    return probe.returncode == 0


def run_scalesim(python: Path, workdir: Path, rows: list[ScaleSimRow], cfg: HardwareConfig,
                 dedupe: bool) -> tuple[list[dict], float]:
    """Write config, topology and layout; run SCALE-Sim; its per-layer results and the wall time."""
    kib = 1024
    (workdir / "scalesim.cfg").write_text(CONFIG_TEMPLATE.format(
        rows=cfg.array.rows, cols=cfg.array.cols,
        ifmap_kb=cfg.unified_buffer.capacity_bytes // kib,
        filter_kb=cfg.weight_fifo.depth_tiles * cfg.array.rows * cfg.array.cols * cfg.array.element_bytes // kib,
        ofmap_kb=cfg.accumulators.entries * cfg.array.cols * cfg.accumulators.bits // 8 // kib,
    ))
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
    results = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    return results, wall


def referee(tiles: tuple[WeightTile, ...], scalesim_runs: list[tuple[int, int, int]], rows: int, cols: int,
            seed: int = 0) -> tuple[int, int]:
    """PE-level cycles of (tpusim's tiles back to back, SCALE-Sim's folds one at a time).

    The array's timing does not depend on the values, so each distinct fold shape of the serial
    schedule is stepped once and counted as often as it occurs.
    """
    rng = np.random.default_rng(seed)

    def operands(m: int, k: int, n: int) -> tuple[np.ndarray, np.ndarray]:
        return (rng.integers(0, 256, (m, k), dtype=np.uint8), rng.integers(-128, 128, (k, n), dtype=np.int8))

    pairs = [operands(t.m_rows, t.k_rows, t.n_cols) for t in tiles]
    back_to_back = pe_array_run([x for x, _ in pairs], [w for _, w in pairs], rows, cols).cycles
    folds: Counter[tuple[int, int, int]] = Counter()
    for t_rows, k, n in scalesim_runs:
        for k0 in range(0, k, rows):
            for n0 in range(0, n, cols):
                folds[(t_rows, min(rows, k - k0), min(cols, n - n0))] += 1
    serial = 0
    for (m, k, n), count in folds.items():
        x, w = operands(m, k, n)
        serial += count * pe_array_run([x], [w], rows, cols).cycles
    return back_to_back, serial


def compare(graph: Graph, cfg: HardwareConfig,
            depthwise: str) -> tuple[list[LayerComparison], list[ScaleSimRow], float, int]:
    """tpusim's side of every matrix layer, its SCALE-Sim rows, tpusim's wall time and total run cycles."""
    start = time.perf_counter()
    program = compile_program(graph, cfg)
    sim = simulate_program(program, cfg, graph.batch)
    tpusim_wall = time.perf_counter() - start
    timing = {lt.name: lt for lt in sim.layers}
    rows, cols = cfg.array.rows, cfg.array.cols
    layers = []
    all_rows: list[ScaleSimRow] = []
    for index, layer in enumerate(graph.layers):
        if not layer.is_matrix:
            continue
        tiles = layer_tiles(program, index)
        ss_rows = scalesim_rows_for(layer, f"L{index:03d}", tiles, program.mappings[index].groups_per_tile, depthwise)
        all_rows += ss_rows
        g = layer.gemm
        lt = timing[layer.name]
        formula = sum(scalesim_fold_cycles(t, k, n, rows, cols) for row in ss_rows for t, k, n in row.runs())
        layers.append(LayerComparison(
            layer.name, f"{g.m}x{g.k}x{g.n}" + (f"/g{g.groups}" if g.groups > 1 else ""), tiles, tuple(ss_rows),
            mxu_only_cycles(tiles, rows, cols), lt.cycles, lt.breakdown.active, 0, 0, formula,
        ))
    return layers, all_rows, tpusim_wall, sim.total_cycles


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


def print_table(layers: list[LayerComparison], rows: int, cols: int) -> None:
    head = (f"{'layer':<24} {'M x K x N /g':>18} {'tiles':>5} {'ss runs':>7} {'ss folds':>8} {'closed':>9} "
            f"{'timeline':>9} {'scalesim':>10} {'ss/closed':>9} {'ss/timeline':>11} {'formula':>7}")
    print(head)
    print("-" * len(head))
    for c in layers:
        runs = c.scalesim_runs
        folds = sum(math.ceil(k / rows) * math.ceil(n / cols) for _, k, n in runs)
        print(f"{c.name[:24]:<24} {c.gemm:>18} {len(c.tiles):>5} {len(runs):>7} {folds:>8} {c.closed:>9} "
              f"{c.timeline:>9} {c.scalesim:>10} {c.scalesim / c.closed:>9.3f} {c.scalesim / c.timeline:>11.3f} "
              f"{'ok' if c.scalesim == c.formula else 'DIFF':>7}")
    closed = sum(c.closed for c in layers)
    timeline = sum(c.timeline for c in layers)
    scalesim = sum(c.scalesim for c in layers)
    print("-" * len(head))
    print(f"{'total (matrix layers)':<24} {'':>18} {sum(len(c.tiles) for c in layers):>5} "
          f"{sum(len(c.scalesim_runs) for c in layers):>7} {'':>8} {closed:>9} {timeline:>9} {scalesim:>10} "
          f"{scalesim / closed:>9.3f} {scalesim / timeline:>11.3f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnet50", choices=["resnet50", "mobilenet_v2", "tiny_cnn"])
    parser.add_argument("--config", default=str(REPO / "configs" / "tpu_v1.yaml"))
    parser.add_argument("--scalesim-python", type=Path, default=DEFAULT_SCALESIM_PYTHON,
                        help="python of the venv where scalesim is installed")
    parser.add_argument("--depthwise", choices=["native", "packed"], default="native",
                        help="native: SCALE-Sim's own 'DP' rows (one 1-channel layer per channel); "
                             "packed: tpusim's block-diagonal tiles as dense SCALE-Sim layers")
    parser.add_argument("--no-dedupe", action="store_true",
                        help="simulate every SCALE-Sim layer, even identical ones (hours for mobilenet_v2)")
    parser.add_argument("--referee", default="",
                        help="comma-separated layer names to step on the PE-level array, or 'auto'")
    parser.add_argument("--workdir", type=Path, help="keep SCALE-Sim's inputs here (default: a temp dir)")
    args = parser.parse_args(argv)

    cfg = load_config(args.config)
    graph = lower_model(build_model(args.model), args.model)
    if graph.batch != 1:
        raise SystemExit(f"batch {graph.batch}: SCALE-Sim conv topologies have no batch dimension")
    layers, ss_rows, tpusim_wall, run_cycles = compare(graph, cfg, args.depthwise)
    rows, cols = cfg.array.rows, cfg.array.cols
    print(f"model {args.model}, array {rows}x{cols}, weight stationary, depthwise={args.depthwise}, "
          f"{len(layers)} matrix layers")

    if not scalesim_available(args.scalesim_python):
        print(SETUP_HINT.format(python=args.scalesim_python))
        print("Skipping the comparison: SCALE-Sim is not available.")
        return 0

    with tempfile.TemporaryDirectory(prefix="scalesim_") as tmp:
        workdir = args.workdir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        results, scalesim_wall = run_scalesim(args.scalesim_python, workdir, ss_rows, cfg, not args.no_dedupe)
    layers = attach_scalesim(layers, results)
    print_table(layers, rows, cols)

    agree = sum(c.scalesim == c.formula for c in layers)
    single = [c for c in layers if len(c.scalesim_runs) == 1 and len(c.tiles) == 1]
    print(f"\nSCALE-Sim = sum over its layers of F*(2R+C+T-2) - 1 on {agree}/{len(layers)} layers; "
          f"stall cycles {sum(c.scalesim_stall for c in layers)}.")
    print(f"whole inference: tpusim timeline {run_cycles} cycles (all layers, overlapped); "
          f"SCALE-Sim {sum(c.scalesim for c in layers)} (matrix layers one after another, compute only)")
    print(f"one-tile layers (same decomposition, no fold overlap possible): {len(single)}, "
          f"scalesim - closed = {sorted({c.scalesim - c.closed for c in single})}")
    simulated = [r for r in results if r["simulated"]]
    projected = sum(r["wall_s"] for r in results)
    print(f"\nwall time: tpusim compile+timeline {tpusim_wall:.3f} s (closed form: negligible); "
          f"SCALE-Sim {scalesim_wall:.1f} s measured ({len(simulated)} distinct of {len(results)} SCALE-Sim layers "
          f"simulated), {projected:.0f} s projected for every layer as written")

    if args.referee:
        names = [n for n in args.referee.split(",") if n]
        if names == ["auto"]:
            dense = [c for c in layers if "/g" not in c.gemm]
            grouped = [c for c in layers if "/g" in c.gemm]
            names = [max(dense, key=lambda c: c.scalesim / c.closed).name]
            names += [min(dense, key=lambda c: (c.scalesim - c.closed, len(c.tiles))).name]
            if grouped:
                names.append(max(grouped, key=lambda c: c.scalesim / c.closed).name)
            names = list(dict.fromkeys(names))
        by_name = {c.name: c for c in layers}
        print("\nPE-level referee (tpusim.kernels.systolic.pe_array_run, cycle-stepped):")
        for name in names:
            if name not in by_name:
                raise SystemExit(f"--referee: no matrix layer {name!r} in {args.model}")
            c = by_name[name]
            start = time.perf_counter()
            back_to_back, serial = referee(c.tiles, c.scalesim_runs, rows, cols)
            print(f"  {name} ({c.gemm}, {len(c.tiles)} tpusim tiles, {len(c.scalesim_runs)} SCALE-Sim layer(s)): "
                  f"array back to back {back_to_back} vs tpusim closed {c.closed}; "
                  f"array one fold at a time {serial} vs SCALE-Sim {c.scalesim} "
                  f"(+{serial - c.scalesim} = one per SCALE-Sim layer, its 0-based last cycle) "
                  f"[{time.perf_counter() - start:.1f} s]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
