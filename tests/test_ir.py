import dataclasses

from tpusim.energy.model import LayerEnergy
from tpusim.ir import CycleBreakdown, LayerCounts, field_values


def test_field_values_are_astuple_of_a_flat_dataclass_in_field_order():
    for cls in (CycleBreakdown, LayerCounts, LayerEnergy):
        n = len(dataclasses.fields(cls))
        value = cls(*(0.5 * i + 1 if cls is LayerEnergy else 3 * i + 1 for i in range(n)))
        assert field_values(value) == dataclasses.astuple(value) and len(field_values(value)) == n


def test_field_values_of_a_one_field_dataclass_is_a_one_tuple():
    @dataclasses.dataclass(frozen=True)
    class One:
        only: int

    assert field_values(One(7)) == (7,)


def test_sums_add_field_by_field():
    a, b = CycleBreakdown(*range(1, 11)), CycleBreakdown(*range(100, 1100, 100))
    assert dataclasses.astuple(a + b) == tuple(x + y for x, y in zip(range(1, 11), range(100, 1100, 100)))
    e = LayerEnergy(mac=1.5, host=2.25) + LayerEnergy(mac=0.25, spill=4.0)
    assert (e.mac, e.host, e.spill, e.total) == (1.75, 2.25, 4.0, 8.0)
    assert e.as_dict() == {**dataclasses.asdict(e), "total": 8.0}
