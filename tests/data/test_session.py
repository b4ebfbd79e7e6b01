"""Files shipped to executors (models, Faiss indexes) must not pile up on the driver's disk."""
import os
import subprocess
import sys

from ml.data.session import ship_path


def test_ship_paths_are_unique_and_keep_the_extension():
    a, b = ship_path("natm.faiss"), ship_path("natm.faiss")
    assert a != b and os.path.dirname(a) == os.path.dirname(b)
    assert os.path.basename(a).startswith("natm-") and a.endswith(".faiss")


def test_shipped_files_are_removed_when_the_driver_exits():
    code = ("from ml.data.session import ship_path\n"
            "p = ship_path('model.pt'); open(p, 'wb').write(b'x' * 1000); print(p)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    path = out.stdout.strip()
    assert path.endswith(".pt")
    assert not os.path.exists(path) and not os.path.exists(os.path.dirname(path))


def test_a_killed_drivers_ship_directory_is_swept_by_the_next(tmp_path):
    from ml.data import session

    code = ("import os, signal\nfrom ml.data.session import ship_path\n"
            "p = ship_path('index.faiss'); open(p, 'wb').write(b'x'); print(p, flush=True)\n"
            "os.kill(os.getpid(), signal.SIGKILL)")
    env = dict(os.environ, TMPDIR=str(tmp_path))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == -9
    left = os.path.dirname(out.stdout.strip())
    assert os.path.exists(left)  # SIGKILL skips atexit
    live = tmp_path / f"{session.SHIP_PREFIX}{session._host()}-{os.getpid()}-abc"  # this live process
    live.mkdir()
    assert session.sweep_stale_ship_dirs(str(tmp_path)) == []  # too recent to be sure
    old = 2 * session.STALE_SHIP_DIR_SECONDS
    for d in (left, live):
        os.utime(d, (os.path.getmtime(d) - old,) * 2)
    assert session.sweep_stale_ship_dirs(str(tmp_path)) == [left]
    assert not os.path.exists(left) and live.exists()


def test_under_spark_submit_the_cluster_keeps_its_ui_and_shuffle_partitions():
    from ml.config import SparkConfig
    from ml.data.session import session_settings

    local = session_settings(SparkConfig(), submitted=False, given=set())
    assert local["spark.ui.enabled"] == "false" and local["spark.sql.shuffle.partitions"] == "8"
    # submitted: no UI setting, and the laptop default of 8 partitions is not imposed on a cluster
    cluster = session_settings(SparkConfig(), submitted=True, given=set())
    assert "spark.ui.enabled" not in cluster and "spark.sql.shuffle.partitions" not in cluster
    assert cluster["spark.sql.session.timeZone"] == "UTC"
    # a number the config names is kept, unless the submitter set one
    named = SparkConfig(shuffle_partitions=400)
    assert session_settings(named, True, set())["spark.sql.shuffle.partitions"] == "400"
    assert "spark.sql.shuffle.partitions" not in session_settings(named, True, {"spark.sql.shuffle.partitions"})


def test_a_local_session_starts_without_spark_notices_about_itself_or_its_sketches():
    # before: "Using Spark's default log4j profile" (twice), "Setting default log level to WARN" and
    # its hint, and the missing native Hadoop library's WARN, on every job's first lines
    from ml.config import SparkConfig
    from ml.data.session import session_settings

    opts = session_settings(SparkConfig(), submitted=False, given=set())["spark.driver.extraJavaOptions"]
    path = opts.split("=", 1)[1]
    assert opts.startswith("-Dlog4j2.configurationFile=") and "rootLogger.level = warn" in open(path).read()
    assert "spark.driver.extraJavaOptions" not in session_settings(SparkConfig(), submitted=True, given=set())
    own = SparkConfig(conf={"spark.driver.extraJavaOptions": "-Dx=1"})  # the user's options replace ours
    assert session_settings(own, submitted=False, given=set())["spark.driver.extraJavaOptions"] == "-Dx=1"
    # and ingest's HLL sketches no longer print DataSketches' "Java versions > Java 11" line to stderr
    code = ("from ml.config import SparkConfig\nfrom ml.data.session import get_spark\n"
            "from pyspark.sql import functions as F\n"
            "s = get_spark(SparkConfig(log_level='ERROR')); assert s.range(3).count() == 3\n"
            "assert s.range(3).agg(F.hll_sketch_estimate(F.hll_sketch_agg('id', 14))).first()[0] == 3\n"
            "s.sparkContext._jvm.java.lang.System.err.println('stderr after the sketches')")
    err = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stderr
    for notice in ("default log4j profile", "Setting default log level", "NativeCodeLoader", "Java versions > Java 11"):
        assert notice not in err, err
    assert "stderr after the sketches" in err  # the JVM's stderr is back once the class is loaded
