import numpy as np
import pytest

from tpusim.kernels.amx import BLOCK_ROWS, TILE_BYTES, tile_config


def _shapes(config):
    """(bytes per row, rows) of each of the eight tiles a config describes."""
    return [(int(config[16 + 2 * t]) | int(config[17 + 2 * t]) << 8, int(config[48 + t])) for t in range(8)]


def test_a_full_block_configures_all_eight_tiles_as_16_rows_of_64_bytes():
    config = tile_config(BLOCK_ROWS)
    assert config.dtype == np.uint8 and config.shape == (64,) and config[0] == 1
    assert _shapes(config) == [(TILE_BYTES, 16)] * 8
    assert not config[1:16].any() and not config[32:48].any() and not config[56:].any()


def test_a_partial_block_loads_and_stores_only_its_own_pixels():
    # 20 pixels: C0, C1 and A0 hold 16 of them, C2, C3 and A1 the other 4; the B tiles always hold 16 quads.
    assert _shapes(tile_config(20)) == [(64, 16), (64, 16), (64, 4), (64, 4), (64, 16), (64, 4), (64, 16), (64, 16)]


def test_a_block_of_at_most_16_pixels_leaves_the_second_row_of_tiles_unconfigured():
    assert _shapes(tile_config(7)) == [(64, 7), (64, 7), (0, 0), (0, 0), (64, 7), (0, 0), (64, 16), (64, 16)]
    assert _shapes(tile_config(16))[2:6] == [(0, 0), (0, 0), (64, 16), (0, 0)]


@pytest.mark.parametrize("rows", [0, BLOCK_ROWS + 1])
def test_a_block_holds_1_to_32_pixels(rows):
    with pytest.raises(ValueError, match="1 to 32 pixels"):
        tile_config(rows)
