"""Graph job scale: windowed pairs (ours) vs a naive user self-join (the SARplus way), same run.

    python -m bench.graph_scale --sizes 1e6 1e7 1e8 [--naive-max 1e7] [--timeout 1200] [--self-joins naive sarplus]

For each size: generate a synthetic log (timed separately), build sequences, then build the top-N
graph (window 3, top 9) in fresh Spark processes three ways: ours (windowed pairs, user cap), a
self-join with the same cap (same output), and an uncapped self-join (the SARplus way: every pair
of a user's items, filtered to the window). Prints wall time, actions/s, the peak RSS of the whole
process tree (JVM included), and the self-join/ours ratios.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from bench._machine import watch_peak_rss

ROOT = Path(__file__).resolve().parents[1]


def run_child(args: list, timeout: float) -> dict:  # args: step, warehouse, size, per-user
    """Run a child step; return its JSON result plus wall time and peak tree RSS (or timeout)."""
    t = time.time()
    proc = subprocess.Popen([sys.executable, "-m", "bench.graph_scale", "--child", *args], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    peak, th = watch_peak_rss(proc)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        subprocess.run(["pkill", "-9", "-P", str(proc.pid)])
        proc.kill()
        return {"timeout": True, "seconds": time.time() - t, "peak_gb": peak[0] / 2**30}
    th.join(1)
    res = json.loads(out.strip().splitlines()[-1]) if proc.returncode == 0 else {"error": proc.returncode}
    res.update(seconds=time.time() - t, peak_gb=peak[0] / 2**30)
    return res


def child(step: str, wh: str, size: int, per_user: float) -> None:
    from ml.config import load_config
    from ml.data import io
    from ml.data.session import get_spark

    users = max(1000, int(size // per_user))
    cfg = load_config(ROOT / "conf" / "synthetic.yaml", [
        f"warehouse={wh}", f"generate.num_users={users}", f"generate.num_items={max(5000, size // 200)}",
        f"generate.partitions={max(2, size // 2_000_000)}", f"generate.actions_per_user={per_user}", "generate.bad_row_fraction=0",
        "generate.duplicate_fraction=0", f"spark.shuffle_partitions={max(8, size // 1_000_000)}",
        "spark.driver_memory=12g", "graph.window=3", "graph.decay=false", "graph.top_n=9",
        "graph.max_user_length=5000"])  # counts, as the self-join's
    spark = get_spark(cfg.spark)
    t = time.time()
    if step == "prepare":
        from ml.data.generate import generate_actions
        from ml.data.sequences import build_sequences

        io.write_table(spark, generate_actions(spark, cfg.generate, cfg.seed), cfg.table_path("actions"))
        seqs, _ = build_sequences(io.read_table(spark, cfg.table_path("actions")), cfg.sequences)
        io.write_table(spark, seqs, cfg.table_path("sequences"))
        n = io.read_table(spark, cfg.table_path("actions")).count()
        print(json.dumps({"actions": n, "inner_seconds": time.time() - t}))
        return
    from ml.data.graph import build_cooccurrence_graph, cap_sequences, top_n_neighbours

    seqs = io.read_table(spark, cfg.table_path("sequences"))
    if step == "ours":
        graph = build_cooccurrence_graph(seqs, cfg.graph)
    else:  # naive: explode with positions, self-join on user, filter the window: O(length^2) per user
        from pyspark.sql import functions as F

        # "naive": same user cap as ours (same output); "sarplus": no cap, as a user self-join job has
        capped = cap_sequences(seqs, cfg.graph.max_user_length) if step == "naive" else seqs
        pos = capped.select("user_id", F.posexplode("items").alias("p", "i"))
        a, b = pos.alias("a"), pos.alias("b")
        pairs = a.join(b, "user_id").where((F.col("b.p") > F.col("a.p")) & (F.col("b.p") - F.col("a.p") <= cfg.graph.window)
                                           & (F.col("a.i") != F.col("b.i")))
        edges = pairs.groupBy(F.col("a.i").alias("item_id"), F.col("b.i").alias("neighbor_id")).agg(
            F.count(F.lit(1)).cast("double").alias("weight"), F.count(F.lit(1)).alias("count"))
        graph = top_n_neighbours(edges, cfg.graph.top_n)
    io.write_table(spark, graph, cfg.table_path(f"graph_{step}"), mode="overwrite", overwrite_schema=True)
    edges = io.read_table(spark, cfg.table_path(f"graph_{step}")).count()
    print(json.dumps({"edges": edges, "inner_seconds": time.time() - t}))


def _vs(name: str, res: dict, ours: dict) -> str:
    if res.get("skipped"):
        return f"{name} skipped"
    ratio = res["seconds"] / ours["seconds"]
    if res.get("timeout"):
        return f"{name} TIMEOUT after {res['seconds']:.0f}s -> ratio > {ratio:.1f}x"
    if "error" in res:
        return f"{name} FAILED (exit {res['error']}) after {res['seconds']:.0f}s"
    return f"{name} {res['seconds']:.0f}s (peak {res['peak_gb']:.1f} GB) -> ratio {ratio:.1f}x"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", nargs="+", type=float, default=[1e6, 1e7, 1e8])
    p.add_argument("--naive-max", type=float, default=1e7, help="largest size the self-join is tried on")
    p.add_argument("--timeout", type=float, default=1200)
    p.add_argument("--warehouse", default="/tmp/bench_graph")
    p.add_argument("--actions-per-user", type=float, default=50.0,
                   help="mean sequence length (50: short e-commerce sessions; 160: ML-1M-like histories)")
    p.add_argument("--self-joins", nargs="+", choices=["naive", "sarplus"], default=["naive", "sarplus"],
                   help="which self-joins to time: naive = capped like ours, sarplus = uncapped")
    p.add_argument("--child", nargs=4, metavar=("STEP", "WH", "SIZE", "PER_USER"))
    a = p.parse_args()
    if a.child:
        child(a.child[0], a.child[1], int(a.child[2]), float(a.child[3]))
        return
    from bench._machine import describe

    print(f"machine: {describe()}; mean actions per user {a.actions_per_user:g}")
    rows = []
    for size in [int(s) for s in a.sizes]:
        wh = f"{a.warehouse}/{size}"
        subprocess.run(["rm", "-rf", wh])
        pu = str(a.actions_per_user)
        prep = run_child(["prepare", wh, str(size), pu], a.timeout)
        n = prep.get("actions", size)
        ours = run_child(["ours", wh, str(size), pu], a.timeout)
        naive, sarplus = (run_child([step, wh, str(size), pu], a.timeout)
                          if size <= a.naive_max and step in a.self_joins else {"skipped": True}
                          for step in ("naive", "sarplus"))
        rows.append((n, prep, ours, naive))
        print(f"{n:>12,} actions: generate+sequences {prep['seconds']:.0f}s | ours {ours['seconds']:.0f}s "
              f"({n / ours['seconds']:,.0f} actions/s, peak {ours['peak_gb']:.1f} GB, {ours.get('edges', 0):,} edges) | "
              f"{_vs('self-join', naive, ours)} | {_vs('uncapped self-join', sarplus, ours)}", flush=True)
    if len(rows) > 1:
        for (n0, _, o0, _), (n1, _, o1, _) in zip(rows, rows[1:]):
            print(f"scaling {n0:,} -> {n1:,} actions ({n1 / n0:.1f}x data): {o1['seconds'] / o0['seconds']:.1f}x time")


if __name__ == "__main__":
    main()
