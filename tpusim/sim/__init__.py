"""Simulation: run a compiled program on the TPU's concurrent units and count cycles and events."""
from tpusim.mapping.tiler import compile_program
from tpusim.sim.engine import LayerTiming, SimResult, Trace, simulate, simulate_program, transfer_cycles

__all__ = ["LayerTiming", "SimResult", "Trace", "compile_program", "simulate", "simulate_program",
           "transfer_cycles"]
