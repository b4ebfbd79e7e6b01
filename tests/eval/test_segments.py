"""bench.ml1m_segments reads each query's list out of a real i2i_topk Delta table (written by delta-rs)."""
import numpy as np
import pytest
import pyarrow as pa
from deltalake import write_deltalake

from bench.ml1m_segments import lists
from ml.eval.offline import hit_metrics
from ml.train.tables import read_columns


def test_lists_follow_rank_for_repeated_and_unknown_triggers(tmp_path):
    rows = [("cooc", 10, 11, 1), ("cooc", 10, 12, 2), ("cooc", 20, 10, 2), ("cooc", 20, 13, 1),
            ("natm", 10, 99, 1)]
    write_deltalake(str(tmp_path / "i2i_topk"), pa.table({
        "model": [r[0] for r in rows], "item_id": pa.array([r[1] for r in rows], pa.int64()),
        "neighbor_id": pa.array([r[2] for r in rows], pa.int64()), "rank": pa.array([r[3] for r in rows], pa.int32())}))
    i2i = read_columns(str(tmp_path / "i2i_topk"), ["model", "item_id", "neighbor_id", "rank"])
    # several users share a trigger; trigger 30 has no list
    out = lists(i2i, "cooc", np.array([20, 10, 30, 10]), depth=3)
    assert out.tolist() == [[13, 10, -1], [11, 12, -1], [-1, -1, -1], [11, 12, -1]]
    m = hit_metrics(out, np.array([10, 12, 11, 11]), (1, 2))
    assert m == {"Pre@1": 0.25, "Pre@2": 0.75, "MRR": (0.5 + 0.5 + 0 + 1) / 4}  # trigger 30 is a miss
    with pytest.raises(SystemExit, match="'two_tower' has no rows in i2i_topk"):
        lists(i2i, "two_tower", np.array([10]))
