"""The cluster recipe, run for real: wheel + venv-pack'ed environment + spark-submit.

One submit: ``jobs/submit.py pipeline`` on tiny synthetic data, as a cluster's client-mode driver
would run it; submit.py then prints which Python and which copy of ``ml`` the executors ran. They
must be the packed environment's (``--archives env.zip#environment``) and the wheel's
(``--py-files``, under a .zip name), not this checkout's. The pipeline is the default one (NATM, with
the cooc lists it is compared with), so the executors also run torch from the packed environment
(the embed job's UDF). submit.py runs the job's ``__main__`` as ``python -m jobs.pipeline`` does, so
this also checks what the CLI prints; the session there is the submitter's, not one started from
the config's ``spark.*`` keys (tests/data/test_session.py starts those).

The master is ``local-cluster[1,2,1024]``: one standalone worker with its own executor JVM and
working directory, on this machine. Under ``local[N]`` the executor shares the driver's working
directory, so the ``./environment/bin/python`` every cluster recipe uses cannot resolve there (and
local mode needs no packed environment). The archive is a zip because Spark's tar unpacking drops
the executable bits and misplaces a venv's relative symlinks; venv-pack's zip stores the files
the links point to, with their modes.
"""
import glob
import os
import shutil
import subprocess
import sys

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.slow

TINY = ["generate.num_users=200", "generate.num_items=300", "generate.actions_per_user=15", "generate.partitions=2",
        "spark.driver_memory=1g"]

@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    import time

    start = time.time() - 1
    out = tmp_path_factory.mktemp("submit")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(out / "dist"), str(ROOT)], check=True, timeout=300)
    wheel = glob.glob(str(out / "dist" / "spark_i2i-*.whl"))
    assert len(wheel) == 1
    # --py-files puts .zip/.egg/.py files on the executors' PYTHONPATH, not .whl: a pure-Python wheel
    # is a zip of the packages, so the same bytes under a .zip name import as they are
    code_zip = str(out / "dist" / "spark_i2i.zip")
    shutil.copyfile(wheel[0], code_zip)
    env_zip = out / "env.zip"
    # the test environment minus this checkout's editable install (the code must come from the wheel),
    # packed as the README's recipe packs it: without the lib64 link (followed, it stores every file a
    # second time) and pyspark's jars (the executors run the cluster's Spark, here this checkout's)
    subprocess.run([os.path.join(sys.prefix, "bin", "venv-pack"), "-p", sys.prefix, "-o", str(env_zip),
                    "--quiet", "--exclude", "*__editable__*", "--exclude", "*spark_i2i-*.dist-info*",
                    "--exclude", "lib64", "--exclude", "lib/python*/site-packages/pyspark/jars/*"],
                   check=True, timeout=900)
    import zipfile

    names = zipfile.ZipFile(env_zip).namelist()
    assert not [n for n in names if n.startswith("lib64/") or "/pyspark/jars/" in n]
    assert any(n.endswith("/site-packages/torch/__init__.py") for n in names)
    yield out, code_zip, env_zip
    import pyspark

    # local-cluster workers unpack the archive under $SPARK_HOME/work: clean up
    for app in glob.glob(os.path.join(os.path.dirname(pyspark.__file__), "work", "app-*")):
        if os.path.getmtime(app) >= start:
            shutil.rmtree(app, ignore_errors=True)


def _submit(out, wheel, env_tar, *args):
    cmd = [os.path.join(sys.prefix, "bin", "spark-submit"), "--master", "local-cluster[1,2,1024]",
           "--archives", f"{env_tar}#environment", "--py-files", wheel,
           "--conf", "spark.pyspark.python=./environment/bin/python",
           "--conf", f"spark.pyspark.driver.python={sys.executable}",
           "--conf", "spark.sql.shuffle.partitions=2", *args]  # tiny data
    import pyspark

    env = {k: v for k, v in os.environ.items() if not k.startswith("PYSPARK_")}
    env["SPARK_HOME"] = os.path.dirname(pyspark.__file__)  # pip's pyspark is the Spark distribution
    env["PATH"] = os.path.join(sys.prefix, "bin") + os.pathsep + env.get("PATH", "")
    return subprocess.run(cmd, cwd=out, capture_output=True, text=True, timeout=900, env=env)


def test_pipeline_runs_through_spark_submit(packed):
    out, wheel, env_tar = packed
    wh = out / "wh"
    args = [str(ROOT / "jobs" / "submit.py"), "pipeline", "--conf", str(ROOT / "conf" / "synthetic.yaml"),
            "--set", f"warehouse={wh}", *[x for s in TINY for x in ("--set", s)]]
    res = _submit(out, wheel, env_tar, *args)
    assert res.returncode == 0, res.stderr[-3000:]
    # what the CLI prints: where the tables are, the counts, the metrics and the paired comparison with
    # the cooc lists the pipeline builds beside NATM's
    for table in ("sequences", "actions_rejected", "item_embeddings", "i2i_topk", "metrics"):
        assert f"{wh}/{table}" in res.stdout, (table, res.stdout[-3000:])
    assert "training actions" in res.stdout and "Pre@10" in res.stdout
    assert "natm vs cooc, paired over" in res.stdout
    # the executors ran the packed environment's Python and the code shipped in the zip
    executors = [l for l in res.stdout.splitlines() if l.startswith("executors: ")]
    assert executors and all("environment/bin/python" in l and "spark_i2i.zip/ml" in l for l in executors), executors
    assert not any(str(ROOT / "ml") in l for l in executors)
    assert any(l.startswith("driver: ") for l in res.stdout.splitlines())  # the driver's own, printed beside
    # the submitter's shuffle partitions and the cluster's UI, not the laptop defaults (8, UI off)
    assert "session: spark.sql.shuffle.partitions=2, spark.ui.enabled=true" in res.stdout, res.stdout[-2000:]
    from deltalake import DeltaTable

    topk = DeltaTable(str(wh / "i2i_topk")).to_pyarrow_table()
    assert topk.num_rows > 0 and set(topk.column("model").to_pylist()) == {"natm", "cooc"}
    emb = DeltaTable(str(wh / "item_embeddings")).to_pyarrow_table()
    assert emb.num_rows > 0  # embedded on the executor, by the packed environment's torch
