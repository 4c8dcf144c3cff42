"""Instruction-level timeline engine: a :class:`Program` -> cycles, stalls by cause, and event counts.

Timeline model. Six units run concurrently, each executing its own instructions in program order
(decoupled access/execute), and wait for one another only through data:

* DRAM (``ReadWeights``): each tile is one request into a weight FIFO of ``depth_tiles`` slots; a
  slot frees when its tile has been shifted into the array, so fetches run ahead of the MXU -- across
  layer boundaries too -- by up to the FIFO depth. Requests issue in program order, at most
  ``requests_in_flight`` unfinished at a time (a request may issue once the one that many places
  before it has finished and its FIFO slot is free); a request's data streams at the memory's
  bandwidth, ``ceil(bytes / bytes-per-cycle)`` cycles, from ``latency_cycles`` after its issue or from
  the end of the previous request's data, whichever is later: latencies overlap, the bandwidth is
  shared. With one request in flight a tile takes ``latency + ceil(bytes / bytes-per-cycle)`` in
  series. A ``WriteWeightMemory`` holds the memory alone (later requests issue after it).
* MXU (``MatrixMultiply``): a new tile shifts in over R cycles into shadow registers; the shift may
  start once the previous tile has started streaming and the new tile is in the FIFO. A multiply
  streams its M input vectors one per cycle, starting when the MXU is free, its weights are shifted
  in, its input bytes in the unified buffer have been written (RAW on addresses) and its accumulator
  rows are free; its last output reaches the accumulators M + R + C - 2 cycles after its first input.
  With weights always ready T tiles take R + (T-1) max(M, R) + M + R + C - 2 cycles. Without weight
  double buffering (``array.weight_double_buffering: false``, no shadow registers) a shift may start
  only once the array has drained the previous multiply's last output, so each fold takes
  2R + C + M - 2 cycles alone. Both equal the PE-level array (``tpusim.kernels.systolic``) stepped on
  the same tiles, cycle for cycle (tested over random layers and arrays).
* Accumulators: an overwriting multiply's output vector j first reaches its accumulator row at
  start + j + R - 1, which must be no earlier than the cycle after the activation unit last read what
  the row held (with double-buffered accumulators; single-buffered, the whole previous chunk must
  have drained before the next one starts).
* Activation unit (``Activate``): one ``lanes``-wide vector per cycle plus ``pipeline_latency_cycles``;
  it drains accumulator rows as the last K fold's multiply delivers them (from its first output,
  R + C - 1 cycles after that multiply's first input; at least one pass per row, so it never overtakes
  the array), or waits for all of its unified-buffer operands. An ``Activate`` that needs new
  requantization scales (5 bytes per output channel per column tile with per-channel weights, 5 per
  layer per-tensor) first loads them over ``scale_path_bytes_per_cycle``, after the previous
  ``Activate`` is done with the registers they replace: hidden when the unit would wait for the
  array's drain anyway, exposed when drains follow each other closely.
* Host link in / out (``ReadHostMemory`` / ``WriteHostMemory``): PCIe, ``latency + bytes / bandwidth``.
* Operands computed on the chip as weights (attention's K and V): ``WriteWeightMemory`` moves bytes the
  host holds (after a ``WriteHostMemory`` of them) into the weight memory, occupying the host link in
  and the weight memory for the slower of the two transfers; a ``ReadWeights`` of those addresses waits
  for it. ``ReadWeightsFromUb`` fills a FIFO slot straight from the unified buffer (a direct path of
  ``computed_weights.direct_bytes_per_cycle``) once the operand's bytes are written.
* Unified buffer ports: ``unified_buffer.read_ports`` and ``write_ports`` ports of ``port_bytes_per_cycle``
  each. Every transfer into or out of the buffer holds one port of its direction for ceil(bytes /
  bytes-per-cycle) consecutive cycles. Transfers reserve their cycles in program order: each takes the
  first run of free cycles at or after the time it could start, on the port that offers the earliest
  (the lowest-numbered of equals); a later transfer may fill a gap an earlier one left, never move it.
  Readers: a multiply's M x K input bytes (from its stream's start; if the port is slower than the
  stream, the MXU waits for the reads to end), the activation unit's buffer operands (from its start;
  it is busy at least until they are read) and host DMA out (then the PCIe transfer); the direct
  weight path (a later TPU's) has its own, ``direct_bytes_per_cycle`` wide. Writers: the activation
  unit's results (its last cycles before they land; a busy port makes them land later and holds the
  unit as long) and host DMA in (as the data arrive: the transfer's last cycles at the earliest; the
  link is busy until they are written). Enough ports for every user at once (3 read, 2 write) wide
  enough to move any transfer in one cycle leave every cycle as it is without a buffer limit.

Cycle categories (the TPU v1 paper's, Jouppi et al. 2017 Table 3) are the MXU's point of view: every
cycle of the run is exactly one of *active* (streaming), *weight_stall* (waiting for weights from the
weight memory), *weight_shift* (shifting weights into the array, not overlapped with computation) or
*non_matrix*. Each idle cycle before a multiply is charged to its cause, in time order: first the
cycles spent waiting for its input data (``input_stall`` if the bytes come over PCIe, else
``raw_stall``; both are non-matrix); then, for a multiply that loads a tile, the cycles before the
tile arrives in the FIFO when its late arrival is what holds the shift back (``weight_stall``); then
the cycles until its shift is done (``weight_shift``, the part of the shift the previous tile's
streaming did not cover: R - M when M < R and the tile was in the FIFO when the previous tile started
streaming, the whole R cycles when it arrived after that stream had ended; without double buffering
also the wait for the array to drain); then waiting for the activation unit to free accumulator
rows (non-matrix); the rest is waiting for a unified-buffer read port (``ub_stall``, non-matrix; so
are the cycles after a stream whose reads a narrow port has not finished). Another unit's wait for a
port reaches the MXU through what it delays (a later input is a RAW stall, a later weight round trip
a weight stall), as any late producer's does. Cycles after the last multiply are non-matrix. A
layer's span runs from the end of the previous layer to the end of its own work (its last multiply's
streaming for a matrix layer, its last activation-unit or host-write result otherwise; the last layer
ends the run), so spans tile the run and per-layer totals sum to the run's cycles. Active cycles split into
useful/unused MAC cycles by the fraction of the array's MAC slots doing real work (floor of the
useful MAC count over R x C; the remainder is unused).

Counting conventions: ``ub_read_bytes`` counts what the MXU input path reads (M x K bytes per column
tile pass, im2col re-reads included), activation-unit operand reads and host writes' reads;
``ub_write_bytes`` counts activation-unit results and host reads into the buffer; accumulator
bytes use ``accumulators.bits``; ``weight_shift_bytes`` counts byte-hops of the used columns over the
full R-row shift. Accumulator wrap-around needs values: the integer executor counts it
(``tpusim.quant.fidelity.FidelityReport.wrapped``).
"""
from __future__ import annotations

import bisect
import dataclasses
import functools
from dataclasses import dataclass
from fractions import Fraction

import numpy as np

from tpusim.config import HardwareConfig
from tpusim.ir import CycleBreakdown, GemmShape, Graph, LayerCounts, field_values
from tpusim.mapping.isa import (
    Activate,
    MatrixMultiply,
    Program,
    ReadHostMemory,
    ReadWeights,
    ReadWeightsFromUb,
    Sync,
    UbRegion,
    WriteHostMemory,
    WriteWeightMemory,
)
from tpusim.mapping.tiler import compile_program

ACTIVE, WEIGHT_STALL, WEIGHT_SHIFT, RAW_STALL, INPUT_STALL, OTHER_NON_MATRIX, UB_STALL = range(7)
_highest = np.maximum.reduce  # ndarray.max() without its Python wrapper: 2.75 against 3.84 us on a row range
_N_CATEGORIES = 7


def transfer_cycles(nbytes: int, bandwidth_gb_s: float, clock_mhz: float, latency_cycles: int) -> int:
    """Cycles to move ``nbytes`` over a link: latency plus ceil(bytes / bytes-per-cycle), exactly."""
    return latency_cycles + _link_rate(bandwidth_gb_s, clock_mhz).cycles(nbytes)


class _Rate:
    """Bytes per cycle as an exact ratio of integers, so that a transfer's cycles are an integer ceiling
    (0.17 us; a Fraction per transfer took 2.5 us, and a batch-16 ResNet-50 program has thousands)."""

    __slots__ = ("bytes", "per_cycles")

    def __init__(self, bytes_per_cycle: Fraction | float):
        self.bytes, self.per_cycles = Fraction(bytes_per_cycle).as_integer_ratio()

    def cycles(self, nbytes: int) -> int:
        """ceil(nbytes / bytes-per-cycle)."""
        return -(-nbytes * self.per_cycles // self.bytes)


@functools.lru_cache(maxsize=64)
def _link_rate(bandwidth_gb_s: float, clock_mhz: float) -> _Rate:
    return _Rate(Fraction(bandwidth_gb_s) * 1000 / Fraction(clock_mhz))


@dataclass(frozen=True, eq=False)
class Trace:
    """Per-instruction times of the MXU and the weight memory, for plots and worked examples.

    ``shift_start`` is -1 for a multiply that keeps the array's weights.
    """

    mxu_layer: np.ndarray
    stream_start: np.ndarray
    stream_end: np.ndarray
    shift_start: np.ndarray
    last_output: np.ndarray
    fetch_start: np.ndarray
    fetch_end: np.ndarray


@dataclass(frozen=True)
class LayerTiming:
    name: str
    op: str
    gemm: GemmShape | None
    macs: int
    breakdown: CycleBreakdown
    counts: LayerCounts
    utilization: float

    @property
    def cycles(self) -> int:
        return self.breakdown.total


@dataclass(frozen=True, eq=False)
class SimResult:
    graph_name: str
    config_name: str
    layers: tuple[LayerTiming, ...]
    total_cycles: int
    latency_s: float
    tops: float
    inferences_per_s: float
    batch: int
    macs: int
    breakdown: CycleBreakdown
    counts: LayerCounts
    trace: Trace
    sub_batch: int  # inputs per pass of the program (``batch`` unless it ran in sub-batches)


class UbPorts:
    """Ports of one direction of the unified buffer (reads or writes), each a sorted list of disjoint
    reserved cycle intervals [start, end)."""

    def __init__(self, ports: int, bytes_per_cycle: float):
        self.rate = _Rate(bytes_per_cycle)
        self.starts: list[list[int]] = [[] for _ in range(ports)]
        self.ends: list[list[int]] = [[] for _ in range(ports)]

    def cycles(self, nbytes: int) -> int:
        """Cycles one port takes to move ``nbytes``: ceil(bytes / bytes-per-cycle)."""
        return self.rate.cycles(nbytes)

    def reserve(self, ready: int, nbytes: int) -> tuple[int, int]:
        """Reserve the first ``cycles(nbytes)`` consecutive free cycles at or after ``ready`` on the port
        where they start earliest (the lowest-numbered of equals); return (start, end)."""
        length = self.cycles(nbytes)
        if length == 0:
            return ready, ready
        best_start, best_port = -1, 0
        for port, (starts, ends) in enumerate(zip(self.starts, self.ends)):
            start = ready
            i = bisect.bisect_right(ends, start)  # the first interval still busy at ``start``
            while i < len(starts) and starts[i] < start + length:
                start = ends[i]
                i += 1
            if best_start < 0 or start < best_start:
                best_start, best_port = start, port
                if start == ready:
                    break
        self._insert(best_port, best_start, best_start + length)
        return best_start, best_start + length

    def _insert(self, port: int, start: int, end: int) -> None:
        starts, ends = self.starts[port], self.ends[port]
        i = bisect.bisect_left(starts, start)
        # merge with a neighbour the interval touches, so back-to-back users keep the lists short
        if i > 0 and ends[i - 1] == start:
            i -= 1
            ends[i] = end
        else:
            starts.insert(i, start)
            ends.insert(i, end)
        if i + 1 < len(starts) and starts[i + 1] == end:
            ends[i] = ends[i + 1]
            del starts[i + 1], ends[i + 1]


def _ub_rows(region: UbRegion, width: int) -> slice:
    return slice(region.addr // width, -(-(region.addr + region.nbytes) // width))


class _Timeline:
    """Runs the program once, recording per-layer end times, counts and MXU idle intervals."""

    def __init__(self, program: Program, cfg: HardwareConfig):
        self.program = program
        self.cfg = cfg
        n_layers = len(program.layer_names)
        self.counts = [dict.fromkeys((f.name for f in dataclasses.fields(LayerCounts)), 0) for _ in range(n_layers)]
        self.matrix_end = np.full(n_layers, -1, dtype=np.int64)
        self.other_end = np.full(n_layers, -1, dtype=np.int64)
        # Intervals of the MXU's time line: start, end, category, useful MACs per cycle.
        self.iv_start: list[int] = []
        self.iv_end: list[int] = []
        self.iv_cat: list[int] = []
        self.iv_rate: list[int] = []

    def _interval(self, start: int, end: int, category: int, rate: int = 0) -> None:
        if end > start:
            self.iv_start.append(start)
            self.iv_end.append(end)
            self.iv_cat.append(category)
            self.iv_rate.append(rate)

    def run(self) -> tuple[int, Trace]:
        cfg = self.cfg
        rows, cols = cfg.array.rows, cfg.array.cols
        width = cfg.unified_buffer.width_bytes
        acc_bytes = cfg.accumulators.bits // 8
        eb = cfg.array.element_bytes
        depth = cfg.weight_fifo.depth_tiles
        clock = cfg.array.clock_mhz
        wm, host, act = cfg.weight_memory, cfg.host, cfg.activation_unit
        scale_path = _Rate(act.scale_path_bytes_per_cycle)
        direct_path = _Rate(cfg.computed_weights.direct_bytes_per_cycle)
        ub = cfg.unified_buffer
        ub_reads = UbPorts(ub.read_ports, ub.port_bytes_per_cycle)
        ub_writes = UbPorts(ub.write_ports, ub.port_bytes_per_cycle)
        n_ub_rows = -(-cfg.unified_buffer.capacity_bytes // width)
        ub_ready = np.zeros(n_ub_rows, dtype=np.int64)       # time the last write of each row lands
        ub_from_host = np.zeros(n_ub_rows, dtype=bool)       # whether that write came over PCIe
        ub_read_done = np.zeros(n_ub_rows, dtype=np.int64)   # time the last read of each row ends
        # First row of each accumulator range final: the activation unit drains rows as they arrive
        # (one per cycle), so it may start then; it is never faster than that, so it cannot overtake.
        acc_first_row = np.zeros(cfg.accumulators.entries, dtype=np.int64)
        acc_free = np.zeros(cfg.accumulators.entries, dtype=np.int64)  # cycle after the drain's last read
        row_offset = np.arange(cfg.accumulators.entries, dtype=np.int64)
        acc_double_buffered = cfg.accumulators.double_buffered
        weight_double_buffering = cfg.array.weight_double_buffering
        fetch_start: list[int] = []
        fetch_end: list[int] = []
        shift_end_of_tile: list[int] = []
        trace_mxu: list[tuple[int, int, int, int, int]] = []
        # dram_free: when the weight memory's data bus is next free (the end of the latest request's data)
        dram_free = host_in_free = host_out_free = act_free = direct_free = 0
        in_flight = wm.requests_in_flight
        weight_path = _link_rate(wm.bandwidth_gb_s, clock)
        request_end: list[int] = []  # when each weight-memory request's last byte has arrived
        request_issue = 0            # issue time of the latest request (requests issue in order)
        host_ready: dict[int, int] = {}  # host address -> when a WriteHostMemory to it has landed
        # Weight-memory ranges the host wrote during the run (ascending start addresses) and when.
        written_start: list[int] = []
        written_end: list[int] = []
        written_at: list[int] = []
        mxu_free = 0
        tile_stream_start = 0  # when the weights now in the array were swapped in
        array_drained = 0      # when the last output of the latest multiply has left the array
        finish = 0
        for ins in self.program.instructions:
            c = self.counts[ins.layer]
            if isinstance(ins, MatrixMultiply):
                src = _ub_rows(ins.src, width)
                rows_ready = ub_ready[src]
                data_ready = int(_highest(rows_ready))
                # (what a wait for the data is charged to matters only where the MXU waits for it)
                from_host = data_ready > mxu_free and ub_from_host[src][int(rows_ready.argmax())]
                data_category = INPUT_STALL if from_host else RAW_STALL
                acc = slice(ins.acc_addr, ins.acc_addr + ins.m_rows)
                if ins.accumulate:
                    acc_wait = 0
                elif acc_double_buffered:
                    # row j is first written when output vector j leaves the array's bottom edge,
                    # start + j + R - 1, which must come after the drain of what the row held
                    acc_wait = int(_highest(acc_free[acc] - row_offset[:ins.m_rows])) - (rows - 1)
                else:  # one buffer: the fill starts only when the previous chunk has drained
                    acc_wait = int(_highest(acc_free[acc]))
                memory_wait = shift_end = 0
                shift_start = -1
                if ins.load_weights:
                    tile = len(shift_end_of_tile)
                    # when the array could take the tile: into the shadow registers once the weights in
                    # use have started streaming; without them, once the array has drained
                    gate = tile_stream_start if weight_double_buffering else array_drained
                    shift_start = max(gate, fetch_end[tile])
                    shift_end = shift_start + rows
                    memory_wait = fetch_end[tile] if fetch_end[tile] > gate else 0
                    shift_end_of_tile.append(shift_end)
                ready = max(mxu_free, data_ready, shift_end, acc_wait)
                start, read_end = ub_reads.reserve(ready, ins.input_bytes)
                level = mxu_free
                for bound, category in ((data_ready, data_category), (memory_wait, WEIGHT_STALL),
                                        (shift_end, WEIGHT_SHIFT), (ready, OTHER_NON_MATRIX), (start, UB_STALL)):
                    bound = min(max(bound, level), start)
                    self._interval(level, bound, category)
                    level = bound
                end = start + ins.m_rows
                self._interval(start, end, ACTIVE, ins.macs_per_row)
                self._interval(end, read_end, UB_STALL)  # the port is slower than the stream: the MXU waits
                if ins.load_weights:
                    tile_stream_start = start
                    c["weight_shift_bytes"] += ins.n_cols * eb * rows * (rows + 1) // 2
                last_output = start + ins.m_rows + rows + cols - 2
                array_drained = last_output
                mxu_free = max(end, read_end)
                acc_first_row[acc] = start + rows + cols - 1
                ub_read_done[src] = np.maximum(ub_read_done[src], end)
                trace_mxu.append((ins.layer, start, end, shift_start, last_output))
                self.matrix_end[ins.layer] = end
                finish = max(finish, last_output)
                c["macs"] += ins.m_rows * ins.macs_per_row
                c["ub_read_bytes"] += ins.input_bytes
                acc_traffic = ins.m_rows * ins.n_cols * acc_bytes
                c["acc_write_bytes"] += acc_traffic
                if ins.accumulate:
                    c["acc_read_bytes"] += acc_traffic
            elif isinstance(ins, ReadWeights):
                tile = len(fetch_end)
                request = len(request_end)
                start = max(request_issue, shift_end_of_tile[tile - depth] if tile >= depth else 0,
                            request_end[request - in_flight] if request >= in_flight else 0)
                if written_start:
                    w = bisect.bisect_right(written_start, ins.dram_addr) - 1
                    if w >= 0 and ins.dram_addr < written_end[w]:
                        start = max(start, written_at[w])
                request_issue = start
                dram_free = max(start + wm.latency_cycles, dram_free) + weight_path.cycles(ins.nbytes)
                request_end.append(dram_free)
                fetch_start.append(start)
                fetch_end.append(dram_free)
                c["weight_dram_bytes"] += ins.nbytes
                c["weight_fifo_bytes"] += ins.nbytes
            elif isinstance(ins, ReadWeightsFromUb):
                tile = len(fetch_end)
                src = _ub_rows(ins.src, width)
                start = max(direct_free, shift_end_of_tile[tile - depth] if tile >= depth else 0,
                            int(_highest(ub_ready[src])))
                direct_free = start + direct_path.cycles(ins.nbytes)
                ub_read_done[src] = np.maximum(ub_read_done[src], direct_free)
                fetch_start.append(start)
                fetch_end.append(direct_free)
                c["ub_read_bytes"] += ins.nbytes
                c["weight_fifo_bytes"] += ins.nbytes
            elif isinstance(ins, WriteWeightMemory):
                start = max(host_in_free, dram_free, host_ready.get(ins.host_addr, 0))
                end = start + max(transfer_cycles(ins.nbytes, host.bandwidth_gb_s, clock, host.latency_cycles),
                                  transfer_cycles(ins.nbytes, wm.bandwidth_gb_s, clock, wm.latency_cycles))
                host_in_free = dram_free = request_issue = end
                at = bisect.bisect_left(written_start, ins.dram_addr)
                if at < len(written_start) and written_start[at] == ins.dram_addr:  # a later pass rewrites it
                    written_end[at], written_at[at] = ins.dram_addr + ins.nbytes, end
                else:
                    written_start.insert(at, ins.dram_addr)
                    written_end.insert(at, ins.dram_addr + ins.nbytes)
                    written_at.insert(at, end)
                self.other_end[ins.layer] = max(self.other_end[ins.layer], end)
                finish = max(finish, end)
                c["host_weight_bytes"] += ins.nbytes
                c["weight_dram_bytes"] += ins.nbytes
            elif isinstance(ins, Activate):
                # One set of per-lane multiplier/shift registers: new scale vectors load once the unit has
                # finished with the previous ones, hidden if the unit would wait for its data anyway.
                start = act_free + scale_path.cycles(ins.requant_scale_bytes)
                if ins.acc_rows:
                    acc = slice(ins.acc_addr, ins.acc_addr + ins.acc_rows)
                    start = max(start, int(_highest(acc_first_row[acc])))
                for region in ins.sources:
                    start = max(start, int(_highest(ub_ready[_ub_rows(region, width)])))
                dst = _ub_rows(ins.dst, width)
                start, read_end = ub_reads.reserve(max(start, int(_highest(ub_read_done[dst]))),
                                                   sum(region.nbytes for region in ins.sources))
                act_free = max(start + ins.vector_passes, read_end)
                done = act_free + act.pipeline_latency_cycles
                # results are written in the unit's last cycles; a busy write port holds the unit
                write_cycles = ub_writes.cycles(ins.out_bytes)
                _, write_end = ub_writes.reserve(done - write_cycles, ins.out_bytes)
                act_free += write_end - done
                done = write_end
                if ins.acc_rows:
                    # whatever the order of its passes, the unit's last pass over row i is at the latest
                    # in cycle act_free - acc_rows + i (one row per cycle at the end)
                    acc_free[acc] = act_free - ins.acc_rows + 1 + row_offset[:ins.acc_rows]
                    acc_traffic = ins.acc_rows * ins.cols * acc_bytes
                    c["acc_read_bytes"] += acc_traffic * (2 if ins.extra_requant_pass else 1)
                    c["acc_write_bytes"] += acc_traffic if ins.extra_requant_pass else 0
                for region in ins.sources:
                    rows_read = _ub_rows(region, width)
                    ub_read_done[rows_read] = np.maximum(ub_read_done[rows_read], act_free)
                    c["ub_read_bytes"] += region.nbytes
                ub_ready[dst] = done
                ub_from_host[dst] = False
                self.other_end[ins.layer] = max(self.other_end[ins.layer], done)
                finish = max(finish, done)
                c["ub_write_bytes"] += ins.out_bytes
                c["requant_ops"] += ins.requant_ops
                c["requant_scale_bytes"] += ins.requant_scale_bytes
                c["activation_ops"] += ins.activation_ops
                c["pool_ops"] += ins.pool_ops
            elif isinstance(ins, ReadHostMemory):
                dst = _ub_rows(ins.dst, width)
                start = max(host_in_free, int(_highest(ub_read_done[dst])), int(_highest(ub_ready[dst])))
                arrived = start + transfer_cycles(ins.dst.nbytes, host.bandwidth_gb_s, clock, host.latency_cycles)
                # the DMA writes the buffer as the data arrive, its last access in the transfer's last cycle at
                # the earliest; the link stays busy until the write is done
                write_cycles = ub_writes.cycles(ins.dst.nbytes)
                _, host_in_free = ub_writes.reserve(max(start, arrived - write_cycles), ins.dst.nbytes)
                host_in_free = max(host_in_free, arrived)
                ub_ready[dst] = host_in_free
                ub_from_host[dst] = True
                self.other_end[ins.layer] = max(self.other_end[ins.layer], host_in_free)
                finish = max(finish, host_in_free)
                c["host_in_bytes"] += ins.dst.nbytes
                c["ub_write_bytes"] += ins.dst.nbytes
                c["spill_bytes"] += ins.dst.nbytes if ins.spill else 0
            elif isinstance(ins, WriteHostMemory):
                src = _ub_rows(ins.src, width)
                start, read_end = ub_reads.reserve(max(host_out_free, int(_highest(ub_ready[src]))), ins.src.nbytes)
                host_out_free = max(read_end, start + transfer_cycles(ins.src.nbytes, host.bandwidth_gb_s, clock,
                                                                      host.latency_cycles))
                ub_read_done[src] = np.maximum(ub_read_done[src], host_out_free)
                host_ready[ins.host_addr] = host_out_free
                self.other_end[ins.layer] = max(self.other_end[ins.layer], host_out_free)
                finish = max(finish, host_out_free)
                c["host_out_bytes"] += ins.src.nbytes
                c["ub_read_bytes"] += ins.src.nbytes
                c["spill_bytes"] += ins.src.nbytes if ins.spill else 0
            elif isinstance(ins, Sync):
                finish = max(finish, dram_free, host_in_free, host_out_free, act_free, mxu_free, direct_free)
        self._interval(mxu_free, finish, OTHER_NON_MATRIX)
        mxu = np.array(trace_mxu, dtype=np.int64).reshape(-1, 5)
        trace = Trace(mxu[:, 0], mxu[:, 1], mxu[:, 2], mxu[:, 3], mxu[:, 4],
                      np.array(fetch_start, dtype=np.int64), np.array(fetch_end, dtype=np.int64))
        return finish, trace

    def layer_ends(self, total: int) -> np.ndarray:
        """End of each layer's span: monotone, the last one the end of the run."""
        own = np.where([m.gemm is not None for m in self.program.mappings], self.matrix_end, self.other_end)
        ends = np.maximum.accumulate(np.maximum(own, 0))
        ends[-1] = total
        return np.minimum(ends, total)

    def split(self, ends: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Cycles per (layer, category) and useful MAC slots per layer, from the MXU intervals."""
        start = np.array(self.iv_start, dtype=np.int64)
        end = np.array(self.iv_end, dtype=np.int64)
        category = np.array(self.iv_cat, dtype=np.int64)
        rate = np.array(self.iv_rate, dtype=np.int64)
        bounds = np.concatenate(([0], ends))

        def cumulative(weight: np.ndarray) -> np.ndarray:
            """Integral of a piecewise-constant weight over [0, b) at every span bound b."""
            before = np.concatenate(([0], np.cumsum(weight * (end - start))))
            i = np.searchsorted(end, bounds, side="right")
            inside = np.clip(bounds - start[np.minimum(i, len(start) - 1)], 0, None) if len(start) else 0
            partial = np.where(i < len(start), weight[np.minimum(i, len(start) - 1)] * inside, 0) if len(start) else 0
            return np.diff(before[i] + partial)

        per_category = np.stack([cumulative((category == k).astype(np.int64)) for k in range(_N_CATEGORIES)], axis=1)
        useful_slots = cumulative(np.where(category == ACTIVE, rate, 0))
        return per_category, useful_slots


def simulate_program(program: Program, cfg: HardwareConfig, batch: int) -> SimResult:
    """Run ``program`` (compiled for ``cfg``) on the units of ``cfg``; ``batch`` inputs per inference."""
    timeline = _Timeline(program, cfg)
    total, trace = timeline.run()
    ends = timeline.layer_ends(total)
    per_category, useful_slots = timeline.split(ends)
    slots_per_cycle = cfg.array.rows * cfg.array.cols
    # A layer's MAC slots are its own streamed vectors; its span may also hold cycles of a neighbour's stream.
    streamed_rows = [0] * len(program.layer_names)
    for instruction in program.instructions:
        if isinstance(instruction, MatrixMultiply):
            streamed_rows[instruction.layer] += instruction.m_rows
    layers = []
    for i, name in enumerate(program.layer_names):
        cycles = per_category[i]
        active = int(cycles[ACTIVE])
        useful = min(active, int(useful_slots[i]) // slots_per_cycle)
        breakdown = CycleBreakdown(
            total=int(cycles.sum()),
            active=active,
            weight_stall=int(cycles[WEIGHT_STALL]),
            weight_shift=int(cycles[WEIGHT_SHIFT]),
            non_matrix=int(cycles[RAW_STALL] + cycles[INPUT_STALL] + cycles[OTHER_NON_MATRIX] + cycles[UB_STALL]),
            useful_mac=useful,
            unused_mac=active - useful,
            raw_stall=int(cycles[RAW_STALL]),
            input_stall=int(cycles[INPUT_STALL]),
            ub_stall=int(cycles[UB_STALL]),
        )
        counts = LayerCounts(**{**timeline.counts[i], "mac_slots": streamed_rows[i] * slots_per_cycle})
        gemm = program.mappings[i].gemm
        macs = counts.macs
        utilization = macs / (breakdown.total * slots_per_cycle) if breakdown.total else 0.0
        layers.append(LayerTiming(name, program.layer_ops[i], gemm, macs, breakdown, counts, utilization))
    if program.passes > 1:
        layers = _merge_passes(layers, program.layers_per_pass, slots_per_cycle)
        trace = dataclasses.replace(trace, mxu_layer=trace.mxu_layer % program.layers_per_pass)
    breakdown = sum((layer.breakdown for layer in layers), CycleBreakdown())
    counts = _sum_counts([layer.counts for layer in layers])
    macs = counts.macs
    latency = total / cfg.array.clock_hz
    return SimResult(
        graph_name=program.graph_name,
        config_name=program.config_name,
        layers=tuple(layers),
        total_cycles=total,
        latency_s=latency,
        tops=2 * macs / latency / 1e12 if latency else 0.0,
        inferences_per_s=batch / latency if latency else 0.0,
        batch=batch,
        macs=macs,
        breakdown=breakdown,
        counts=counts,
        trace=trace,
        sub_batch=program.sub_batch,
    )


def _sum_counts(counts: list[LayerCounts]) -> LayerCounts:
    return LayerCounts(*(sum(values) for values in zip(*(field_values(c) for c in counts))))


def _merge_passes(per_pass: list[LayerTiming], n_layers: int, slots_per_cycle: int) -> list[LayerTiming]:
    """One timing per graph layer from a sub-batched program's per-pass timings: cycles, counts and
    MACs summed over the passes, the GEMM's M summed too (it scales with the batch)."""
    merged = []
    for j in range(n_layers):
        passes = per_pass[j::n_layers]
        first = passes[0]
        breakdown = sum((t.breakdown for t in passes), CycleBreakdown())
        macs = sum(t.macs for t in passes)
        gemm = first.gemm
        if gemm is not None:
            gemm = dataclasses.replace(gemm, m=sum(t.gemm.m for t in passes if t.gemm is not None))
        utilization = macs / (breakdown.total * slots_per_cycle) if breakdown.total else 0.0
        merged.append(LayerTiming(first.name, first.op, gemm, macs, breakdown,
                                  _sum_counts([t.counts for t in passes]), utilization))
    return merged


def simulate(graph: Graph, cfg: HardwareConfig) -> SimResult:
    """Compile ``graph`` for ``cfg`` and run it on the timeline."""
    return simulate_program(compile_program(graph, cfg), cfg, graph.batch)
