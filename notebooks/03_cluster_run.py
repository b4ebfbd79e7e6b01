# Databricks notebook source
# MAGIC %md
# MAGIC # spark-i2i on a cluster
# MAGIC The same pipeline on a cluster: native Delta through the cluster's Delta jars (Databricks
# MAGIC runtime, or `--packages io.delta:delta-spark_2.13:<version>`), training with pyspark's
# MAGIC `TorchDistributor` (one DDP process per GPU on the executors, gloo on CPU), embedding and
# MAGIC top-K in Spark tasks. Install the project's wheel on the cluster first (see README, "Running
# MAGIC on a cluster"). `WAREHOUSE` must be a path every node sees, with the model directory on a
# MAGIC shared file system (on Databricks: a `/dbfs/...` or Unity Catalog volume path).

# COMMAND ----------

# Parameters
WAREHOUSE = "/tmp/i2i_cluster"
CONF = "conf/synthetic.yaml"  # conf/ml1m_natm.yaml, conf/taobao.yaml, or your own
MODEL = "natm"
OVERRIDES = ["generate.num_users=2000", "generate.num_items=1000", "train.epochs=1"]
DELTA_MODE = "auto"  # auto: native Delta when the jars are there, delta-rs commits otherwise
LAUNCHER = "distributor"  # TorchDistributor; "local" trains in this driver process (set NUM_PROCESSES = 1)
NUM_PROCESSES = 2  # DDP world size: the number of GPUs to use, or CPU processes

# COMMAND ----------

import os

# CONF, and the paths in it (ingest.path), are relative to the project root: Jupyter and Databricks
# Repos run a notebook in its own folder, one below it
if not os.path.exists(CONF) and os.path.exists(os.path.join("..", CONF)):
    os.chdir("..")

from jobs import pipeline
from ml.config import load_config
from ml.data import io
from ml.data.session import get_spark

cfg = load_config(CONF, [f"warehouse={WAREHOUSE}", f"model={MODEL}", f"io.delta_mode={DELTA_MODE}",
                         f"train.launcher={LAUNCHER}", f"train.num_processes={NUM_PROCESSES}", *OVERRIDES])
spark = get_spark(cfg.spark)  # on Databricks: the cluster's session
print("Spark", spark.version, "| master", spark.sparkContext.master,
      "| native Delta:", io.use_native(spark, cfg.io.delta_mode))

# COMMAND ----------

results = pipeline.run(cfg, spark)
print(results["evaluate"]["table"])

# COMMAND ----------

# MAGIC %md
# MAGIC ## What the training run used, and the versions a downstream job should pin

# COMMAND ----------

import json
import os

from jobs.train import model_dir
from ml.data import files

run_info = json.loads(files.read_text(os.path.join(model_dir(cfg), "run.json")))  # a local path or a URI
print({k: run_info[k] for k in ("model", "world_size", "device", "steps", "samples_version")})
versions = {t: io.table_version(cfg.table_path(t)) for t in ("item_graph", "item_embeddings", "i2i_topk")}
print("pin these versions:", versions)
pinned = io.read_table(spark, cfg.table_path("i2i_topk"), version=versions["i2i_topk"], partitions={"model": [MODEL]})
print(pinned.orderBy("item_id", "rank").limit(5).toPandas().to_string())
