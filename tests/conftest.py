"""One local Spark session for the whole test run, and a fresh warehouse per test."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def spark():
    from ml.config import SparkConfig
    from ml.data.session import get_spark

    os.environ["PYSPARK_PYTHON"] = sys.executable
    session = get_spark(SparkConfig(master="local[2]", shuffle_partitions=2, driver_memory="2g",
                                    log_level="ERROR"))
    yield session
    session.stop()


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """One intra-op torch thread for the whole run, whatever order the tests run in. The tensors are
    tiny: on a 2-core machine two spinning threads beside Spark's JVM made training tests 25x slower,
    and a test that set one thread and left it set gave every later test another setting than it has
    alone. (The DDP test's processes set their own.)"""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def warehouse(tmp_path) -> str:
    return str(tmp_path / "wh")


def shared_data(*parts: str) -> Path:
    """Path under ../shared/data, or skip the test with the reason when it is absent."""
    p = SHARED_DATA.joinpath(*parts)
    if not p.exists():
        pytest.skip(f"real dataset not available: {p} (the team's ../shared/data is not beside this clone)")
    return p
