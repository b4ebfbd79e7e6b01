# Databricks notebook source
# MAGIC %md
# MAGIC # spark-i2i quickstart
# MAGIC Generate (or point to) an action log, run the stages, and look at a few items' neighbours.
# MAGIC Every stage reads and writes Delta tables under `WAREHOUSE`; on Databricks the active
# MAGIC session and native Delta are used, locally Delta tables are committed with delta-rs.

# COMMAND ----------

# Parameters
WAREHOUSE = "/tmp/i2i_quickstart"
CONF = "conf/synthetic.yaml"  # or conf/ml1m_natm.yaml, conf/taobao.yaml
OVERRIDES = ["generate.num_users=2000", "generate.num_items=1000"]
MODEL = "cooc"  # pop | cooc

# COMMAND ----------

import os

# CONF, and the paths in it (ingest.path), are relative to the project root: Jupyter and Databricks
# Repos run a notebook in its own folder, one below it
if not os.path.exists(CONF) and os.path.exists(os.path.join("..", CONF)):
    os.chdir("..")

from jobs import pipeline
from ml.config import load_config
from ml.data.session import get_spark

cfg = load_config(CONF, [f"warehouse={WAREHOUSE}", f"model={MODEL}", *OVERRIDES])
spark = get_spark(cfg.spark)
results = pipeline.run(cfg, spark)
print(results["evaluate"]["table"])

# COMMAND ----------

# MAGIC %md
# MAGIC ## A few items and their neighbours

# COMMAND ----------

from pyspark.sql import functions as F

from ml.data import io

topk = io.read_table(spark, cfg.table_path("i2i_topk"), partitions={"model": [MODEL]})  # its files only
items = io.read_table(spark, cfg.table_path("items")).select("item_id", "title", "category_id")
popular = io.read_table(spark, cfg.table_path("item_counts")).orderBy(F.desc("count"), "item_id").limit(3)
sample = (popular.select("item_id").join(topk, "item_id").where("rank <= 5")
          .join(items.withColumnRenamed("item_id", "neighbor_id").withColumnRenamed("title", "neighbor_title")
                .withColumnRenamed("category_id", "neighbor_category"), "neighbor_id", "left")
          .orderBy("item_id", "rank"))
neighbours = sample.select("item_id", "rank", "neighbor_id", "neighbor_title", "neighbor_category", "score").collect()
for r in neighbours:
    print(r.item_id, r.rank, r.neighbor_id, r.neighbor_title or "", r.neighbor_category, round(r.score, 3))
