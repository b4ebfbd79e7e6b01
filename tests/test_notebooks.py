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
    monkeypatch.chdir(ROOT)
    ns: dict = {}
    for i, cell in enumerate(_cells(path)):
        if i == 1:  # parameters cell: tiny data in a temp warehouse
            cell += (f"\nWAREHOUSE = {str(tmp_path / 'wh')!r}\nOVERRIDES = ['generate.num_users=200', "
                     "'generate.num_items=300', 'generate.actions_per_user=15', 'generate.partitions=2']\n")
        exec(compile(cell, f"{path.name}[cell {i}]", "exec"), ns)
    assert ns.get("neighbours"), "the notebook showed no neighbours"
    assert all(r.item_id != r.neighbor_id for r in ns["neighbours"])
