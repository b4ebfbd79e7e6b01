"""Each Databricks source notebook runs end to end on tiny data (cells executed in order)."""
import re

import pytest

from tests.conftest import ROOT

NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.py"))


def _cells(path):
    text = path.read_text()
    assert text.startswith("# Databricks notebook source"), f"{path.name}: not a Databricks source notebook"
    return [c for c in re.split(r"\n# COMMAND -+\n", text)]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path, spark, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT / "notebooks")  # where Jupyter and Databricks Repos run them; CONF is the root's
    ns: dict = {}
    for i, cell in enumerate(_cells(path)):
        if i == 1:  # parameters cell: tiny data in a temp warehouse
            cell += f"\nWAREHOUSE = {str(tmp_path / 'wh')!r}\nOVERRIDES = {TINY!r}\n"
        exec(compile(cell, f"{path.name}[cell {i}]", "exec"), ns)
    CHECKS[path.stem](ns)


TINY = ["generate.num_users=200", "generate.num_items=300", "generate.actions_per_user=15", "generate.partitions=2",
        "natm.dim=16", "train.batch_size=64", "train.max_steps=6",
        "samples.num_negatives=4", "samples.dat_negatives=2"]


def _quickstart(ns):
    assert ns.get("neighbours"), "the notebook showed no neighbours"
    assert all(r.item_id != r.neighbor_id for r in ns["neighbours"])


def _evaluate(ns):
    # every model has its metrics row, and its fused recent-items lists (u2i) theirs
    assert set(ns["summary"].index) == set(ns["MODELS"]) | {f"{m}_recent u2i" for m in ns["MODELS"]}
    assert ns["summary"].notna().all().all()
    assert not ns["per_cat"].empty


def _cluster_run(ns):
    assert ns["run_info"]["world_size"] == ns["NUM_PROCESSES"] == 2  # trained by TorchDistributor, 2 DDP ranks
    assert ns["run_info"]["steps"] == 6
    assert len(ns["pinned"].limit(1).collect()) == 1


CHECKS = {"01_quickstart": _quickstart, "02_evaluate": _evaluate, "03_cluster_run": _cluster_run}
