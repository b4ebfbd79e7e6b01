"""bench.ml1m_natm_inmemory builds NATM's neighbour table from raw sequences: direction, decay, ties."""
import numpy as np
import torch

from bench.ml1m_i2i_ceiling import Split
from bench.ml1m_natm_inmemory import neighbour_table


def test_neighbour_table_is_the_directed_decayed_window_top_n():
    # holdout 1: the last item of each line is the target and never makes an edge
    seqs = [np.array([1, 2, 3, 4, 9]), np.array([1, 3, 2, 9]), np.array([4, 1, 2, 9])]
    sp = Split(seqs, 1)
    table = neighbour_table(sp, "dir5", 3)
    # item 1 -> 2: 1 + 1/2 + 1 = 2.5; -> 3: 1/2 + 1 = 1.5; -> 4: 1/3; 9 (a target) never
    assert table.neighbors[1].tolist() == [2, 3, 4]
    # item 2 -> 3: 1, -> 4: 1/2 ; nothing else follows 2 in training
    assert table.neighbors[2].tolist() == [3, 4, 0]
    # item 3 -> 4 (1) and -> 2 (1): equal weight, smaller id first; never itself
    assert table.neighbors[3].tolist() == [2, 4, 0]
    assert table.neighbors[4].tolist() == [1, 2, 0]  # 4 -> 1 (1), 4 -> 2 (1/2); 4 is last of line 1
    assert (table.neighbors[1:] != torch.arange(1, len(table.neighbors))[:, None]).all()  # never itself
    # symmetric window 3 without decay: 3 <-> 2 counts both ways
    sym = neighbour_table(sp, "sym3", 2)
    assert sym.neighbors[3].tolist() == [1, 2]  # 3-1: 0 + 2, 3-2: 1 + 1 (a tie: smaller id), 3-4: 1
