"""Energy: a cited per-operation table (built once) times the simulator's event counts."""
from tpusim.energy.model import (
    ActionPrices,
    LayerEnergy,
    RunEnergy,
    action_prices,
    layer_energy,
    priced_layer_energy,
    run_energy,
)
from tpusim.energy.table import EnergyTable, SramAnchor, load_energy_table

__all__ = [
    "ActionPrices",
    "EnergyTable",
    "LayerEnergy",
    "RunEnergy",
    "SramAnchor",
    "action_prices",
    "layer_energy",
    "load_energy_table",
    "priced_layer_energy",
    "run_energy",
]
