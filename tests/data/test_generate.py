"""The synthetic log has the promised shape, is deterministic, and carries a learnable signal."""
from pyspark.sql import Window
from pyspark.sql import functions as F

from ml import schemas as S
from ml.config import GenerateConfig
from ml.data.generate import generate_actions

CFG = GenerateConfig(num_users=400, num_items=600, num_categories=8, actions_per_user=30, cluster_size=20,
                     partitions=3)


def test_deterministic_and_partitioning_independent(spark):
    a = generate_actions(spark, CFG, seed=1)
    b = generate_actions(spark, GenerateConfig(**{**CFG.__dict__, "partitions": 5}), seed=1)
    assert a.exceptAll(b).count() == 0 and b.exceptAll(a).count() == 0
    c = generate_actions(spark, CFG, seed=2)
    assert a.exceptAll(c).count() > 0


def test_shape_power_law_users_skewed_categories(spark):
    df = generate_actions(spark, CFG, seed=3).cache()
    per_user = sorted(r["count"] for r in df.groupBy(S.USER_ID).count().collect())
    median, top = per_user[len(per_user) // 2], per_user[-1]
    assert top > 8 * median, (median, top)  # heavy tail of user activity
    items = df.select(S.ITEM_ID).distinct().collect()
    assert all(1 <= r.item_id <= CFG.num_items for r in items)
    item_cat = df.groupBy(S.ITEM_ID).agg(F.countDistinct(S.CATEGORY_ID).alias("n"))
    assert item_cat.where("n > 1").count() == 0  # one category per item
    cat_sizes = sorted(r["count"] for r in df.select(S.ITEM_ID, S.CATEGORY_ID).distinct().groupBy(S.CATEGORY_ID).count().collect())
    assert cat_sizes[-1] >= 3 * cat_sizes[0]
    pop = sorted((r["count"] for r in df.groupBy(S.ITEM_ID).count().collect()), reverse=True)
    assert sum(pop[: len(pop) // 10]) > 0.35 * sum(pop)  # top 10% of items take > 35% of actions
    df.unpersist()


def test_planted_structure_beats_popularity(spark):
    """Next-item hit rate of 'most frequent follower' (top 10) is far above the 10 most popular items."""
    df = generate_actions(spark, CFG, seed=4)
    w = Window.partitionBy(S.USER_ID).orderBy(S.TS, S.ITEM_ID)
    pairs = df.select(S.USER_ID, F.col(S.ITEM_ID).alias("a"), F.lead(S.ITEM_ID).over(w).alias("b")).where("b is not null")
    follow = pairs.groupBy("a", "b").count()
    top_follow = follow.withColumn("r", F.row_number().over(Window.partitionBy("a").orderBy(F.desc("count"), "b"))).where("r <= 10")
    hit_follow = pairs.join(top_follow.select("a", "b"), ["a", "b"]).count() / pairs.count()
    top_pop = [r.item_id for r in df.groupBy(S.ITEM_ID).count().orderBy(F.desc("count"), S.ITEM_ID).limit(10).collect()]
    hit_pop = pairs.where(F.col("b").isin(top_pop)).count() / pairs.count()
    assert hit_follow > 3 * hit_pop, (hit_follow, hit_pop)


def test_defects_are_injected_on_request(spark):
    cfg = GenerateConfig(**{**CFG.__dict__, "bad_row_fraction": 0.05, "duplicate_fraction": 0.05})
    df = generate_actions(spark, cfg, seed=5)
    assert df.where(F.col(S.ITEM_ID).isNull()).count() > 0
    assert df.where(F.col(S.BEHAVIOR) == "unknown").count() > 0
    assert df.count() > df.distinct().count()
