"""Evaluation report: metrics table + plots (PNG) in one self-contained HTML page.

Plots: Pre@K curves per model, Pre@50 per target category for each model, training loss curves
(from each model's ``train_metrics.jsonl``), and each model's difference from its baselines with
the 95 % interval (``metrics_paired``). Inputs are small: metric rows (models × K × categories),
paired rows (models × baselines × K) and per-step loss records.
"""
from __future__ import annotations

import base64
import html
import io
import json
import logging
import math
import os
import tempfile
from typing import Dict, List, Optional, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from ml.data import files  # noqa: E402
from ml.errors import InvalidInput  # noqa: E402
from ml.eval.metrics import display_name, metric_order  # noqa: E402

log = logging.getLogger(__name__)


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


HITS = ("pre", "u2i_hr")  # Pre@K of i2i lists, HR@K of u2i lists (the same targets)
MAX_CATEGORIES = 25  # the per-category plot: the categories with the most eval users


def category_k(ks: Sequence[int]) -> int:
    """The K of the per-category plot: Pre@50 where it is reported, else the largest K."""
    return 50 if 50 in ks else max(ks)


def _series(rows: Sequence[dict]) -> Dict[str, List[dict]]:
    """Hit-rate rows (i2i and u2i) by the name the text table shows them under ("dat", "dat u2i")."""
    out: Dict[str, List[dict]] = {}
    for r in rows:
        if r["metric"] in HITS:
            out.setdefault(display_name(r["model"], r["metric"], r["k"])[0], []).append(r)
    return out


def plot_pre_at_k(rows: Sequence[dict]) -> bytes:
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, series in sorted(_series(rows).items()):
        pts = sorted((r["k"], r["value"]) for r in series if r["category_id"] is None)
        ax.plot([k for k, _ in pts], [v for _, v in pts], marker="o", label=name)
    ax.set_xscale("log")
    ax.set_xlabel("K")
    ax.set_ylabel("Pre@K (HitRate@K), all eval users")
    ax.grid(True, alpha=0.3)
    ax.legend()
    return _png(fig)


def plot_per_category(rows: Sequence[dict], k: int, names: Optional[Dict[int, str]] = None,
                      max_categories: int = MAX_CATEGORIES) -> Optional[bytes]:
    by_name = {name: [r for r in series if r["category_id"] is not None and r["k"] == k]
               for name, series in _series(rows).items()}
    by_name = {name: series for name, series in by_name.items() if series}
    if not by_name:
        return None
    users = {r["category_id"]: r["n_users"] for series in by_name.values() for r in series}
    cats = sorted(users, key=lambda c: (-users[c], c))[:max_categories]
    models = sorted(by_name)
    val = {(name, r["category_id"]): r["value"] for name, series in by_name.items() for r in series}
    fig, ax = plt.subplots(figsize=(max(6, 0.45 * len(cats) * max(1, len(models)) / 2), 4))
    width = 0.8 / len(models)
    for i, m in enumerate(models):
        ax.bar([j + i * width for j in range(len(cats))], [val.get((m, c), math.nan) for c in cats], width, label=m)
    labels = [f"{(names or {}).get(c, c)}\n({users[c]})" for c in cats]
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(cats))], labels, rotation=60, fontsize=7)
    ax.set_ylabel(f"Pre@{k}")
    ax.set_title(f"Pre@{k} by target category (eval users in brackets)")
    ax.legend()
    return _png(fig)


def plot_losses(curves: Dict[str, List[dict]]) -> Optional[bytes]:
    curves = {m: c for m, c in curves.items() if c}
    if not curves:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for m, recs in curves.items():
        ax.plot([r["step"] for r in recs], [r["loss"] for r in recs], label=m)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.grid(True, alpha=0.3)
    ax.legend()
    return _png(fig)


def read_loss_curve(path: str) -> List[dict]:
    """The loss records of a training metrics file (local or URI); [] when there is none, or when
    Arrow's filesystems cannot open the URI (the report then has no loss plot for it)."""
    try:
        if not files.exists(path):
            return []
    except InvalidInput as e:
        log.warning("no loss curve from %s: %s", path, e)
        return []
    out = []
    for line in files.read_text(path).splitlines():
        rec = json.loads(line)
        if "loss" in rec and "step" in rec:
            out.append(rec)
    return out


def plot_paired(paired: Sequence[dict]) -> Optional[bytes]:
    """``metrics_paired`` rows: each model's difference from its baseline per metric, in % of the
    baseline's value, with the 95 % interval; one panel per (model, baseline) pair."""
    groups: Dict[tuple, List[dict]] = {}
    for r in paired:
        base = r["baseline"] + (" u2i" if r["baseline_kind"] == "u2i" else "")
        groups.setdefault((display_name(r["model"], r["metric"], r["k"])[0], base), []).append(r)
    if not groups:
        return None
    cols = min(3, len(groups))
    rows_n = -(-len(groups) // cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(4.6 * cols, 3.0 * rows_n), squeeze=False)
    for ax in axes.flat[len(groups):]:
        ax.set_visible(False)
    for ax, ((m, b), rs) in zip(axes.flat, sorted(groups.items())):
        rs = sorted((r for r in rs if r["baseline_value"] and math.isfinite(r["ci_low"])),  # no %: baseline 0
                    key=metric_order)
        names = [display_name(r["model"], r["metric"], r["k"])[1] for r in rs]
        rel = [100 * r["diff"] / r["baseline_value"] for r in rs]  # no interval: one user
        lo = [100 * (r["diff"] - r["ci_low"]) / r["baseline_value"] for r in rs]
        hi = [100 * (r["ci_high"] - r["diff"]) / r["baseline_value"] for r in rs]
        y = list(range(len(rs)))[::-1]
        ax.errorbar(rel, y, xerr=[lo, hi], fmt="o", capsize=3)
        ax.axvline(0, color="grey", lw=1)
        ax.set_yticks(y, names)
        ax.set_title(f"{m} vs {b}", fontsize=10)
        ax.set_xlabel(f"difference, % of {b}")
    fig.tight_layout()
    return _png(fig)


def write_report(out_dir: str, rows: Sequence[dict], ks: Sequence[int], table_text: str,
                 loss_curves: Optional[Dict[str, List[dict]]] = None,
                 category_names: Optional[Dict[int, str]] = None, title: str = "spark-i2i evaluation",
                 paired: Sequence[dict] = (), paired_text: str = "") -> str:
    """Write PNGs and ``report.html`` under ``out_dir`` (a local path or a URI); return the HTML path.
    A URI that Arrow's filesystems cannot open gets a warning, and the report goes to a local
    temporary folder instead (the metrics are in their table already)."""
    try:
        files.check_reachable(out_dir)
    except InvalidInput as e:
        fallback = tempfile.mkdtemp(prefix="spark-i2i-report-")
        log.warning("report: %s; written to %s instead", e, fallback)
        out_dir = fallback
    k_cat = category_k(ks)
    figures = [("pre_at_k.png", "Pre@K by model", plot_pre_at_k(rows)),
               ("per_category.png", f"Pre@{k_cat} by target category", plot_per_category(rows, k_cat, category_names)),
               ("training_loss.png", "Training loss", plot_losses(loss_curves or {}))]
    parts = [f"<html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
             "<style>body{font-family:sans-serif;margin:2em;max-width:1100px} pre{background:#f6f6f6;padding:1em}"
             " img{max-width:100%;border:1px solid #ddd;margin:0.5em 0}</style></head><body>",
             f"<h1>{html.escape(title)}</h1>", "<h2>Metrics over all eval users</h2>",
             f"<pre>{html.escape(table_text)}</pre>"]
    if paired_text:
        parts += ["<h2>Against the baselines, user by user</h2>", f"<pre>{html.escape(paired_text)}</pre>"]
        figures.insert(0, ("paired.png", "Difference from the baseline, with its 95 % interval", plot_paired(paired)))
    with files.staged_dir(out_dir) as local:
        for name, caption, png in figures:
            if png is None:
                continue
            _replace(os.path.join(local, name), png)
            data = base64.b64encode(png).decode()
            parts.append(f"<h2>{html.escape(caption)}</h2><img alt='{html.escape(caption)}' src='data:image/png;base64,{data}'>")
        parts.append("</body></html>")
        _replace(os.path.join(local, "report.html"), "\n".join(parts).encode())
    return os.path.join(out_dir, "report.html")


def _replace(path: str, data: bytes) -> None:
    """Write ``path`` whole or not at all: a killed run leaves the previous file, not half a new one
    (written beside it, then renamed over it, which is atomic on one file system)."""
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
