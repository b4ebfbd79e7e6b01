"""bench.ml1m_natm_ablation: every variant is a valid config that differs from the chosen one in what it names."""
from __future__ import annotations

from pathlib import Path

import pytest

from bench.ml1m_natm_ablation import CHOSEN, GROUPS
from ml.config import load_config
from ml.models.natm import NATMConfig
from ml.train.natm_task import natm_config

CONF = Path(__file__).resolve().parents[2] / "conf" / "ml1m_natm.yaml"
VARIANTS = [(g, name, over) for g, rows in GROUPS.items() for name, over in rows]


@pytest.mark.parametrize("group,name,over", VARIANTS, ids=[f"{g}: {n}" for g, n, _ in VARIANTS])
def test_each_variant_builds_a_model_config(group, name, over):
    cfg = load_config(CONF, ["warehouse=/nonexistent", "train.max_steps=240", *over])
    model_cfg = natm_config(cfg, num_items=50, num_categories=0)  # the model's own checks run here
    assert isinstance(model_cfg, NATMConfig)
    chosen = natm_config(load_config(CONF, ["warehouse=/nonexistent"]), num_items=50, num_categories=0)
    assert (model_cfg == chosen) == (over == CHOSEN[1])


def test_the_ablations_change_what_their_rows_say():
    by_name = {name: load_config(CONF, over).natm for _, name, over in VARIANTS}
    assert [by_name[f"layers {n} (transformer, no natm.residual)"].layers for n in (1, 2)] == [1, 2]
    assert by_name["neighbours 0 (id embedding only, so no pointer)"].num_neighbors == 0
    assert by_name["neighbours 3"].num_neighbors == 3 and by_name["neighbours 3"].neighbor_pointer
    assert not by_name["no neighbour pointer (9 neighbours in the MLP only)"].neighbor_pointer
    assert [(by_name[f"NCE, {k} negative{'s' * (k > 1)}"].loss, by_name[f"NCE, {k} negative{'s' * (k > 1)}"].negatives)
            for k in (1, 4, 9)] == [("nce", 1), ("nce", 4), ("nce", 9)]
    assert by_name["sampled softmax over the batch"].loss == "softmax"
    assert by_name[CHOSEN[0]].loss == "full" and by_name[CHOSEN[0]].neighbor_pointer
