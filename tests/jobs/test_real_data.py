"""The real datasets in ../shared/data ingest to their documented counts, and ML-1M's popularity lists score
what the NATM paper reports for POP (skipped when absent)."""
import pytest

from jobs import ingest, sequences
from ml import schemas as S
from ml.config import load_config
from ml.data import io
from tests.conftest import ROOT, shared_data

pytestmark = pytest.mark.slow


def test_ml1m_sasrec_ingest_and_protocol(spark, warehouse):
    train = shared_data("ml-1m", "train_input.txt")
    cfg = load_config(ROOT / "conf" / "ml1m_natm.yaml", [f"warehouse={warehouse}", f"ingest.path={train}"])
    out = ingest.run(cfg, spark)
    lines = [l.split() for l in train.read_text().splitlines()]
    assert (out["users"], out["items"]) == (pytest.approx(6040, rel=0.03), pytest.approx(3416, rel=0.03))  # about
    assert out["actions"] == sum(len(l) for l in lines) == 987_019
    assert out["rejected"] == {}
    items = io.read_table(spark, cfg.table_path(S.T_ITEMS))
    assert items.count() == 3416 and items.where("category_id is null").count() == 0
    assert io.read_table(spark, cfg.table_path(S.T_USERS)).count() == 6040

    seq = sequences.run(cfg, spark)
    assert seq["users"] == 6040 and seq["train_actions"] == 987_019 - 6040
    targets = {r.user_id: (r.trigger_item, r.target_item)
               for r in io.read_table(spark, cfg.table_path(S.T_EVAL_TARGETS)).collect()}
    # the protocol of ../shared/data/README.md: target = last item of line n, trigger = the one before
    assert all(targets[n + 1] == (int(l[-2]), int(l[-1])) for n, l in enumerate(lines))

    # The protocol checked against a number that is not ours: popularity lists scored by the evaluation
    # job must land on the NATM paper's POP (Table 2, Pre@50 0.1035) over all 6,040 users
    from jobs import baseline, evaluate

    baseline.run(cfg, spark, "pop")
    rows = evaluate.run(cfg, spark, ["pop"], compare_to=[])["rows"]
    pre50 = [r for r in rows if r["metric"] == "pre" and r["k"] == 50]
    assert len(pre50) == 1 and pre50[0]["n_users"] == 6040
    assert pre50[0]["value"] == pytest.approx(0.1035, abs=0.005), pre50


@pytest.mark.parametrize("name,actions,rejected", [
    ("UserBehavior_sample10k.csv", 9_996, {"ts_out_of_range": 4}),
    ("UserBehavior_timeslice.csv", 71_777, {}),
])
def test_taobao_samples(spark, warehouse, name, actions, rejected):
    path = shared_data("taobao-userbehavior", name)
    cfg = load_config(ROOT / "conf" / "taobao.yaml", [f"warehouse={warehouse}", f"ingest.path={path}"])
    out = ingest.run(cfg, spark)
    assert out["input_rows"] == sum(1 for _ in path.open()) == actions + sum(rejected.values())
    assert (out["actions"], out["rejected"]) == (actions, rejected)
    bad = io.read_table(spark, cfg.table_path(S.T_ACTIONS_REJECTED)).collect()
    assert all(r.ts is not None and r.user_id is not None for r in bad)  # the raw values are kept
