"""The report's plots show every list the text table shows: i2i Pre@K and u2i HR@K, by the same names."""
import os

import matplotlib.axes

from ml.eval import report


def _rows():
    rows = []
    for model, metric, base in (("cooc", "pre", 0.1), ("dat", "u2i_hr", 0.05), ("natm_recent", "u2i_hr", 0.2)):
        for k in (1, 10, 50):
            rows.append({"model": model, "metric": metric, "k": k, "category_id": None, "value": base * k ** 0.3,
                         "n_users": 100})
            for cat, n in ((1, 60), (2, 40)):
                rows.append({"model": model, "metric": metric, "k": k, "category_id": cat, "value": base / cat,
                             "n_users": n})
        rows.append({"model": model, "metric": metric.replace("pre", "mrr").replace("hr", "mrr"), "k": None,
                     "category_id": None, "value": 0.01, "n_users": 100})
    return rows


def test_plots_show_u2i_lists_under_the_text_tables_names(monkeypatch):
    # natm_recent (u2i only) was a legend entry with no points, and DAT's u2i rows were left out
    lines, bars = {}, {}
    plot, bar = matplotlib.axes.Axes.plot, matplotlib.axes.Axes.bar

    def record_plot(self, xs, ys, *a, label=None, **kw):
        lines[label] = list(ys)
        return plot(self, xs, ys, *a, label=label, **kw)

    def record_bar(self, xs, ys, *a, label=None, **kw):
        bars[label] = list(ys)
        return bar(self, xs, ys, *a, label=label, **kw)

    monkeypatch.setattr(matplotlib.axes.Axes, "plot", record_plot)
    monkeypatch.setattr(matplotlib.axes.Axes, "bar", record_bar)
    assert report.plot_pre_at_k(_rows())[:4] == b"\x89PNG"
    assert set(lines) == {"cooc", "dat u2i", "natm_recent u2i"} and all(len(v) == 3 for v in lines.values())
    assert lines["dat u2i"] == [0.05 * k ** 0.3 for k in (1, 10, 50)]
    assert report.plot_per_category(_rows(), 10) is not None
    assert bars == {"cooc": [0.1, 0.05], "dat u2i": [0.05, 0.025], "natm_recent u2i": [0.2, 0.1]}


def test_a_report_write_that_dies_leaves_the_previous_report_whole(tmp_path, monkeypatch):
    # before: report.html was opened over the old one and written in place, so a run killed in the
    # middle left half a page where the last good report was
    out = str(tmp_path / "report")
    path = report.write_report(out, _rows(), [1, 10, 50], "first table")
    before = open(path, "rb").read()
    assert b"first table" in before and before.rstrip().endswith(b"</html>")
    replace = report.os.replace

    def killed(src, dst):
        if dst.endswith("report.html"):
            raise KeyboardInterrupt  # the run stops just before the page would be in place
        replace(src, dst)

    monkeypatch.setattr(report.os, "replace", killed)
    try:
        report.write_report(out, _rows(), [1, 10, 50], "second table")
        raise AssertionError("the write should have been interrupted")
    except KeyboardInterrupt:
        pass
    assert open(path, "rb").read() == before
    assert sorted(os.listdir(out)) == ["per_category.png", "pre_at_k.png", "report.html"]  # no half-written file left
    monkeypatch.setattr(report.os, "replace", replace)
    assert b"second table" in open(report.write_report(out, _rows(), [1, 10, 50], "second table"), "rb").read()
