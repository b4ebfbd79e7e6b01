"""Faiss top-K: exact inner product vs IVF on clustered vectors, in the same run.

    python -m bench.topk_ann --sizes 1e6 1e7 [--dim 64] [--queries 2000] [--nprobe 8 16 32 64]

For each size: n random-but-clustered unit vectors (n/1000 Gaussian clusters, noise 0.1 per dimension, around random
centres, the shape of item embeddings), the exact ``IndexFlatIP`` and the IVF index the top-K job
builds for large catalogues (``ml.index.topk.build_index(kind="ivf")``: nlist = 4*sqrt(n), trained
on a seeded sample). Prints build time, query throughput (queries/s, all cores, k=50 with the query
item excluded as in the job), recall@50 against exact, and the speed ratio to exact. Beside the
exact search, Faiss's flat search alone (k + 1 hits, its own float32 scores, the self hit dropped):
what the job's rescoring (``search_topk``: candidates rescored in float64, ties by position) costs,
and how many of Faiss's own lists differ from the exact ones.
"""
from __future__ import annotations

import argparse
import time

import faiss
import numpy as np

from bench._machine import describe
from ml.index.topk import build_index, search_topk


NOISE = 0.1  # default per-dimension noise: norm ~0.8 around a unit centre (--noise)


def clustered(n: int, dim: int, seed: int, noise: float = NOISE) -> np.ndarray:
    rng = np.random.default_rng(seed)
    n_clusters = max(1, n // 1000)
    centres = rng.standard_normal((n_clusters, dim), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    x = np.empty((n, dim), dtype=np.float32)
    step = 1_000_000
    for s in range(0, n, step):  # in chunks: the noise for 10M x 64 at once would double the memory
        m = min(step, n - s)
        x[s:s + m] = centres[rng.integers(0, n_clusters, m)] + noise * rng.standard_normal((m, dim), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def timed_search(index, q, pos, k):
    t = time.perf_counter()
    res, _ = search_topk(index, q, pos, k)
    return res, time.perf_counter() - t


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", nargs="+", type=float, default=[1e6, 1e7])
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--queries", type=int, default=2000)
    p.add_argument("--k", type=int, default=50)
    p.add_argument("--nprobe", nargs="+", type=int, default=[8, 16, 32, 64])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--noise", type=float, default=NOISE, help="per-dimension noise around the cluster centres")
    a = p.parse_args()
    print(f"machine: {describe()}; faiss {faiss.__version__}, {faiss.omp_get_max_threads()} threads", flush=True)
    rows = []
    for size in a.sizes:
        n = int(size)
        t = time.perf_counter()
        x = clustered(n, a.dim, a.seed, a.noise)
        print(f"\nn={n:,} d={a.dim} noise={a.noise}: vectors generated in {time.perf_counter() - t:.1f}s", flush=True)
        qpos = np.random.default_rng(a.seed + 1).choice(n, size=a.queries, replace=False)
        q = x[qpos]

        t = time.perf_counter()
        flat = build_index(x, kind="flat", use_gpu=False)
        flat_build = time.perf_counter() - t
        exact, flat_secs = timed_search(flat, q, qpos, a.k)
        flat_qps = a.queries / flat_secs
        rows.append((n, "exact (flat)", flat_build, flat_qps, 1.0, 1.0))
        print(f"  exact: build {flat_build:.1f}s, {flat_qps:,.0f} queries/s", flush=True)
        t = time.perf_counter()
        _, alone = flat.search(q, a.k + 1)
        alone_qps = a.queries / (time.perf_counter() - t)
        alone = np.array([[h for h in row if h != p][:a.k] for row, p in zip(alone, qpos)])
        differ = int((alone != exact).any(axis=1).sum())
        recall = np.mean([len(set(g) & set(e)) / a.k for g, e in zip(alone, exact)])
        rows.append((n, "faiss flat alone", flat_build, alone_qps, recall, alone_qps / flat_qps))
        print(f"  faiss flat alone: {alone_qps:,.0f} queries/s ({alone_qps / flat_qps:.2f}x exact); "
              f"{differ} of {a.queries} lists differ from the exact ones (set or order)", flush=True)
        del flat

        t = time.perf_counter()
        ivf = build_index(x, kind="ivf", seed=a.seed, use_gpu=False)
        ivf_build = time.perf_counter() - t
        print(f"  ivf nlist={ivf.nlist}: build {ivf_build:.1f}s", flush=True)
        for nprobe in a.nprobe:
            ivf.nprobe = nprobe
            got, secs = timed_search(ivf, q, qpos, a.k)
            recall = np.mean([len(set(g[g >= 0]) & set(e)) / a.k for g, e in zip(got, exact)])
            qps = a.queries / secs
            rows.append((n, f"ivf{ivf.nlist} nprobe={nprobe}", ivf_build, qps, recall, qps / flat_qps))
            print(f"  nprobe={nprobe}: {qps:,.0f} queries/s, recall@{a.k} {recall:.4f}, "
                  f"{qps / flat_qps:.1f}x exact", flush=True)
        del ivf, x

    print(f"\n| n | index | build s | queries/s | recall@{a.k} | speed vs exact |")
    print("|---|---|---|---|---|---|")
    for n, name, build, qps, recall, ratio in rows:
        print(f"| {n:,} | {name} | {build:.1f} | {qps:,.0f} | {recall:.4f} | {ratio:.1f}x |")


if __name__ == "__main__":
    main()
