"""Files beside the tables (model folder, report) under a local path or a URI (ml.data.files)."""
import os

import pytest

from ml.data import files
from ml.errors import InvalidInput, MissingInput


def test_a_uri_folder_is_written_locally_and_copied_on_success_only(tmp_path):
    uri = f"file://{tmp_path}/wh/models/natm"
    with files.staged_dir(uri) as local:
        assert not local.startswith(str(tmp_path))
        (open(os.path.join(local, "run.json"), "w")).write('{"steps": 3}')
        assert not (tmp_path / "wh").exists()  # nothing at the URI until the block is done
    assert not os.path.exists(local)  # a temporary folder: removed
    assert files.read_text(f"{uri}/run.json") == '{"steps": 3}' and files.exists(f"{uri}/run.json")
    with pytest.raises(RuntimeError, match="crashed"):
        with files.staged_dir(uri) as local:
            open(os.path.join(local, "run.json"), "w").write("half")
            raise RuntimeError("crashed")
    assert files.read_text(f"{uri}/run.json") == '{"steps": 3}'  # the last complete copy stays
    # a kept local folder (a resumed run appends to its files there)
    keep = tmp_path / "state"
    with files.staged_dir(uri, local_dir=str(keep)) as local:
        open(os.path.join(local, "train_metrics.jsonl"), "a").write("{}\n")
    assert keep.is_dir() and files.read_text(f"{uri}/train_metrics.jsonl") == "{}\n"
    files.copy_to_local(f"{uri}/run.json", str(tmp_path / "copy.json"))
    assert (tmp_path / "copy.json").read_text() == '{"steps": 3}'
    with pytest.raises(MissingInput):
        files.read_text(f"{uri}/model.pt")
    # a local path is written in place
    with files.staged_dir(str(tmp_path / "local")) as local:
        assert local == str(tmp_path / "local")


def test_paths_arrow_cannot_open_are_named_and_dbfs_is_its_mount():
    with pytest.raises(InvalidInput, match=r"wasbs://c@a.blob.core.windows.net/wh/models/natm: .*cannot open it"):
        files.check_reachable("wasbs://c@a.blob.core.windows.net/wh/models/natm")
    assert files.local_path("dbfs:/wh/models/natm") == "/dbfs/wh/models/natm"
    assert files.local_path("/tmp/wh") == "/tmp/wh" and files.local_path("s3a://b/wh") is None


def test_the_report_survives_a_warehouse_arrow_cannot_open(tmp_path, monkeypatch, caplog):
    # Spark may reach a scheme Arrow has no filesystem for: the metrics are in their table already,
    # so the report goes to a local folder with a warning instead of failing the evaluation
    import tempfile

    from ml.eval.report import read_loss_curve, write_report

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    assert read_loss_curve("wasbs://c@a.blob.core.windows.net/wh/models/pop/train_metrics.jsonl") == []
    rows = [{"model": "pop", "metric": "pre", "k": 1, "value": 0.1, "category_id": None, "n_users": 10}]
    path = write_report("wasbs://c@a.blob.core.windows.net/wh/report", rows, [1], "table")
    assert path.startswith(str(tmp_path)) and os.path.exists(path)
    assert "written to" in caplog.text
