# Databricks notebook source
# MAGIC %md
# MAGIC # spark-i2i: evaluate models side by side
# MAGIC Runs the pipeline for each model in `MODELS` on the same warehouse (shared stages run once:
# MAGIC the pipeline skips stages whose config and inputs are unchanged), then compares them on the
# MAGIC same eval targets: Pre@K (= HitRate@K) and MRR over all eval users, per-category Pre@K, and
# MAGIC the training loss curves. The HTML report with the same plots is written under the warehouse.

# COMMAND ----------

# Parameters
WAREHOUSE = "/tmp/i2i_evaluate"
CONF = "conf/synthetic.yaml"  # or conf/ml1m_natm.yaml (then MODELS may add "dat", "two_tower")
OVERRIDES = ["generate.num_users=2000", "generate.num_items=1000", "train.epochs=1"]
MODELS = ["cooc", "pop", "natm"]  # cooc first: the others are compared with it (eval.compare_to)
K = 10  # the cut-off for the per-category bars

# COMMAND ----------

import os

# CONF, and the paths in it (ingest.path), are relative to the project root: Jupyter and Databricks
# Repos run a notebook in its own folder, one below it
if not os.path.exists(CONF) and os.path.exists(os.path.join("..", CONF)):
    os.chdir("..")

from jobs import evaluate, pipeline
from ml.config import load_config
from ml.data.session import get_spark

configs = {m: load_config(CONF, [f"warehouse={WAREHOUSE}", f"model={m}", *OVERRIDES]) for m in MODELS}
spark = get_spark(configs[MODELS[0]].spark)
for m, c in configs.items():
    res = pipeline.run(c, spark)
    print(f"{m}: ran {[s for s in res if s != 'skipped']}, skipped {res['skipped']}")
out = evaluate.run(configs[MODELS[0]], spark, MODELS)
print(out["table"])
print("report:", out["report"])

# COMMAND ----------

# MAGIC %md
# MAGIC ## Metrics table (one row per model)

# COMMAND ----------

from pyspark.sql import functions as F

from ml.data import io
from ml.eval.metrics import display_name

cfg = configs[MODELS[0]]
# the pipeline also wrote "<model>_recent": each user's list fused from the lists of their last items (u2i,
# HR@K against the same targets). As in the job's table, u2i lists get their own row, "<model> u2i".
metrics = io.read_table(spark, cfg.table_path("metrics"), partitions={"model": MODELS + [m + "_recent" for m in MODELS]})
overall = metrics.where(F.col("category_id").isNull()).toPandas()  # models x metrics: a few dozen rows
overall[["row", "name"]] = overall.apply(lambda r: display_name(r.model, r.metric, r.k), axis=1, result_type="expand")
summary = overall.pivot_table(index="row", columns="name", values="value")[[f"Pre@{k}" for k in cfg.eval.ks] + ["MRR"]]
print(summary.round(4).to_string())

# COMMAND ----------

# MAGIC %md
# MAGIC ## Pre@K curves and per-category Pre@K

# COMMAND ----------

import os

import matplotlib

if not hasattr(matplotlib, "_called_from_notebook"):  # headless outside a notebook UI
    matplotlib.use("Agg")
import matplotlib.pyplot as plt

pre = overall[overall.metric == "pre"].sort_values("k")
fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4))
for m, g in pre.groupby("model"):
    ax1.plot(g.k, g.value, marker="o", label=m)
ax1.set_xscale("log")
ax1.set_xlabel("K")
ax1.set_ylabel("Pre@K")
ax1.legend()
by_cat = (metrics.where((F.col("metric") == "pre") & (F.col("k") == K) & F.col("category_id").isNotNull())
          .select("model", "category_id", "value").toPandas())  # models x categories
per_cat = by_cat.pivot_table(index="category_id", columns="model", values="value")
per_cat.plot.bar(ax=ax2)
ax2.set_ylabel(f"Pre@{K}")
fig.tight_layout()
if "display" in globals():
    display(fig)  # noqa: F821
else:  # beside the evaluation report (a local path or a URI)
    from ml.data import files

    with files.staged_dir(cfg.table_path("report")) as report_dir:
        fig.savefig(os.path.join(report_dir, "notebook_02.png"))
