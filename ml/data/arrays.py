"""Arrow list columns built from flat numpy arrays: one buffer under equal-length offsets, no Python
object per row (the Arrow UDFs of the samples, embed and top-K jobs)."""
from __future__ import annotations

import numpy as np
import pyarrow as pa


def fixed_lists(values, width: int) -> pa.ListArray:
    """``values`` (n·width of them, an Arrow array or a 1-d numpy array) as n lists of ``width``."""
    values = values if isinstance(values, pa.Array) else pa.array(values)
    return pa.ListArray.from_arrays(pa.array(np.arange(0, len(values) + 1, width, dtype=np.int32)), values)
