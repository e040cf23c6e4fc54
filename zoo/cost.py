"""What a build costs before anyone pays for it: estimated seconds of real FHE per image.

Estimate = Σ over bit widths of (PBS count at that width × seconds per PBS at that width).
The default table was measured on this project's reference machine (2 cores, default p_error,
concrete-python 2.10): 19 ms per 4-bit PBS, 70 ms per 6-bit, 530 ms per 8-bit; widths in between
are interpolated geometrically (log-linear), widths outside are extrapolated from the nearest pair.
"""

from __future__ import annotations

import math
from typing import Any

DEFAULT_SECONDS_PER_PBS = {4: 0.019, 6: 0.070, 8: 0.530}


def seconds_per_pbs(bit_width: int, table: dict[int, float] | None = None) -> float:
    """Seconds of one PBS of ``bit_width`` bits, interpolated log-linearly in ``table``."""
    table = dict(sorted((table or DEFAULT_SECONDS_PER_PBS).items()))
    if bit_width in table:
        return table[bit_width]
    widths = list(table)
    low = max([w for w in widths if w < bit_width], default=widths[0])
    high = min([w for w in widths if w > bit_width], default=widths[-1])
    if low == high:  # outside the table: extrapolate from the nearest pair
        low, high = (widths[0], widths[1]) if bit_width < widths[0] else (widths[-2], widths[-1])
    slope = (math.log(table[high]) - math.log(table[low])) / (high - low)
    return math.exp(math.log(table[low]) + slope * (bit_width - low))


def estimate_seconds(
    circuit: dict[str, Any], table: dict[int, float] | None = None
) -> float | None:
    """Estimated real-FHE seconds per image from a build's circuit statistics (None if unknown)."""
    by_width = circuit.get("pbs_count_by_bit_width")
    if not by_width:
        return None
    return sum(count * seconds_per_pbs(int(w), table) for w, count in by_width.items())
