"""DAT on tiny configs: AMM gradient flow, CAL, shapes, and learning a planted user->item structure."""
import numpy as np
import pytest
import torch

from ml.models.dat import DAT, DATConfig, category_alignment_loss, mimic_losses


def _model(**kw):
    cfg = DATConfig(num_users=10, num_items=20, num_categories=3, user_feature_sizes=(3, 4), id_dim=8,
                    feature_dim=4, hidden=(16, 8), **kw)
    feats = torch.randint(0, 3, (11, 2))
    cats = torch.cat([torch.zeros(1), torch.arange(20) % 3 + 1]).long()
    return DAT(cfg, feats, cats)


def test_shapes_and_normalised_outputs():
    m = _model()
    u, i = torch.tensor([1, 2, 3]), torch.tensor([4, 5, 6])
    assert m.user_vectors(u).shape == (3, 8) and torch.allclose(m.item_vectors(i).norm(dim=-1), torch.ones(3))
    loss, parts = m(u, i, torch.tensor([1.0, 0.0, 1.0]))
    assert loss.ndim == 0 and {"bce", "mimic_u", "mimic_v", "cal"} <= set(parts)


def test_mimic_gradient_reaches_only_augmented_vectors():
    torch.manual_seed(0)
    m = _model()
    u, i, y = torch.tensor([1, 2, 3]), torch.tensor([4, 5, 6]), torch.tensor([1.0, 0.0, 1.0])
    p_u, p_v = m.user_vectors(u), m.item_vectors(i)
    loss_u, loss_v = mimic_losses(m.a_u(u), m.a_v(i), p_u, p_v, y)
    (loss_u + loss_v).backward()
    towers = list(m.query.parameters()) + list(m.item.parameters())
    assert all(p.grad is None or torch.count_nonzero(p.grad) == 0 for p in towers)  # stop-gradient on p
    g_u, g_v = m.a_u.weight.grad, m.a_v.weight.grad
    assert torch.count_nonzero(g_u[1]) > 0 and torch.count_nonzero(g_u[3]) > 0  # positives' a_u move
    assert torch.count_nonzero(g_u[2]) == 0 and torch.count_nonzero(g_v[5]) == 0  # the negative's do not
    # and the mimic gradient is exactly 2(a_u - p_v)/n_pos: a_u is pulled towards p_v
    expected = 2 * (m.a_u.weight[1] - p_v[0].detach()) / 2
    assert torch.allclose(g_u[1], expected, atol=1e-6)


def test_main_loss_still_trains_the_towers():
    m = _model()
    loss, _ = m(torch.tensor([1, 2]), torch.tensor([4, 5]), torch.tensor([1.0, 0.0]))
    loss.backward()
    assert torch.count_nonzero(m.query.mlp[0].weight.grad) > 0 and torch.count_nonzero(m.item.mlp[0].weight.grad) > 0


def test_category_alignment_loss():
    torch.manual_seed(0)
    x = torch.randn(8, 4)
    same = torch.cat([x, x])  # category 1 and 2 hold identical vectors -> identical covariances
    cats = torch.tensor([1] * 8 + [2] * 8)
    assert category_alignment_loss(same, cats).item() == pytest.approx(0.0, abs=1e-6)
    other = torch.cat([x, 3 * torch.randn(8, 4)])
    assert category_alignment_loss(other, cats).item() > 0
    # a category with too few items is skipped; a single usable category gives zero
    assert category_alignment_loss(other[:10], torch.tensor([1] * 8 + [2] * 2), min_items=4).item() == 0.0
    # by hand: one minor category
    c1 = torch.cov(other[:8].T)
    c2 = torch.cov(other[8:].T)
    assert category_alignment_loss(other, cats).item() == pytest.approx(((c1 - c2) ** 2).sum().item(), rel=1e-5)
    # items of unknown category (index 0) are in none, however many: with 12 of them beside the two
    # categories the loss is the two categories' (as a group they were the major one)
    unknown = torch.cat([other, 5 * torch.randn(12, 4)])
    with_unknown = torch.cat([cats, torch.zeros(12, dtype=torch.long)])
    assert category_alignment_loss(unknown, with_unknown).item() == pytest.approx(
        category_alignment_loss(other, cats).item(), rel=1e-6)
    assert category_alignment_loss(unknown[8:], with_unknown[8:]).item() == 0.0  # one known category left


def _cal_by_loop(p_v, categories, min_items):
    """The loss as the paper writes it, with torch.cov: one covariance per category against the major's."""
    cats, counts = torch.unique(categories, return_counts=True)
    cats, counts = cats[counts >= min_items], counts[counts >= min_items]
    if len(cats) < 2:
        return p_v.sum() * 0.0
    major = cats[torch.argmax(counts)]
    c_major = torch.cov(p_v[categories == major].T)
    return sum(((c_major - torch.cov(p_v[categories == c].T)) ** 2).sum() for c in cats if c != major)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_category_alignment_loss_equals_torch_cov_per_category_in_value_and_gradient(seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(300, 8, generator=g)
    cats = torch.randint(1, 12, (300,), generator=g)
    cats[:40] = 3  # a clear major category; some categories fall under min_items
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    ours, loop = category_alignment_loss(a, cats, min_items=25), _cal_by_loop(b, cats, min_items=25)
    assert ours.item() == pytest.approx(loop.item(), rel=1e-5)
    ours.backward()
    loop.backward()
    assert torch.allclose(a.grad, b.grad, rtol=1e-4, atol=1e-6)
    # two categories tied for the most items: the smaller id is the major, as the loop takes it
    tie = torch.tensor([5] * 10 + [2] * 10 + [7] * 6)
    v = torch.randn(26, 4, generator=g)
    assert category_alignment_loss(v, tie).item() == pytest.approx(_cal_by_loop(v, tie, 4).item(), rel=1e-5)


def test_category_alignment_loss_is_fp32_under_bf16_autocast():
    g = torch.Generator().manual_seed(0)
    x, cats = torch.randn(256, 32, generator=g), torch.randint(1, 5, (256,), generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = category_alignment_loss(x, cats)
    assert out.dtype == torch.float32 and out.item() == pytest.approx(category_alignment_loss(x, cats).item())


@pytest.mark.parametrize("amm,cal", [(True, True), (False, False)])
def test_learns_planted_user_item_structure(amm, cal):
    """User u likes items {u, u+10}; after training they rank far above popularity's 2/20."""
    torch.manual_seed(0)
    m = DAT(DATConfig(num_users=10, num_items=20, num_categories=2, id_dim=16, hidden=(32, 16), use_amm=amm,
                      use_cal=cal), item_categories=torch.cat([torch.zeros(1), torch.arange(20) % 2 + 1]).long())
    opt = torch.optim.Adam(m.parameters(), lr=0.01)
    for _ in range(300):
        u = torch.randint(1, 11, (64,))
        pos = torch.where(torch.rand(64) < 0.5, u, u + 10)
        neg = torch.randint(1, 21, (64,))
        users, items = torch.cat([u, u]), torch.cat([pos, neg])
        labels = torch.cat([torch.ones(64), (neg == u).float() + (neg == u + 10).float()])
        loss, _ = m(users, items, labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        scores = m.user_vectors(torch.arange(1, 11)) @ m.item_vectors(torch.arange(1, 21)).T
        top2 = scores.topk(2, dim=1).indices + 1
    hits = sum(len({u, u + 10} & set(top2[u - 1].tolist())) for u in range(1, 11)) / 20
    assert hits > 0.7


def test_query_vectors_are_unit_vectors_too():
    m = _model()
    assert torch.allclose(m.user_vectors(torch.tensor([1, 2, 3])).norm(dim=-1), torch.ones(3), atol=1e-6)


def test_the_models_mimic_terms_pull_each_augmented_vector_towards_the_other_towers_output():
    # through DAT.forward, not mimic_losses alone: the difference the lambda_u (lambda_v) term makes to
    # a_u's (a_v's) gradient is lambda * 2 (a_u - p_v) / n_pos on the positives, 0 on the negatives
    import dataclasses

    torch.manual_seed(0)
    m = _model()
    u, i, y = torch.tensor([1, 2, 3]), torch.tensor([4, 5, 6]), torch.tensor([1.0, 0.0, 1.0])

    def grads(**lambdas):
        m.cfg = dataclasses.replace(m.cfg, **lambdas)
        m.zero_grad()
        m(u, i, y)[0].backward()
        return m.a_u.weight.grad.clone(), m.a_v.weight.grad.clone()

    with_u, with_v = grads(lambda_u=0.5, lambda_v=0.25)
    without_u, without_v = grads(lambda_u=0.0, lambda_v=0.0)
    with torch.no_grad():
        p_u, p_v = m.user_vectors(u), m.item_vectors(i)
    for row, (uu, ii) in enumerate(zip(u.tolist(), i.tolist())):
        want_u = 0.5 * 2 * (m.a_u.weight[uu] - p_v[row]) / 2 if y[row] else torch.zeros(8)
        want_v = 0.25 * 2 * (m.a_v.weight[ii] - p_u[row]) / 2 if y[row] else torch.zeros(8)
        assert torch.allclose(with_u[uu] - without_u[uu], want_u.detach(), atol=1e-5)
        assert torch.allclose(with_v[ii] - without_v[ii], want_v.detach(), atol=1e-5)


def test_loss_parts_are_detached_tensors_and_a_batch_without_positives_has_no_mimic_loss():
    # floats were a device-to-host sync each step; the loop reads the parts every log_every steps
    m = _model()
    u, i = torch.tensor([1, 2, 3]), torch.tensor([4, 5, 6])
    loss, parts = m(u, i, torch.tensor([1.0, 0.0, 1.0]))
    assert all(torch.is_tensor(v) and v.dim() == 0 and not v.requires_grad for v in parts.values())
    _, none = m(u, i, torch.zeros(3))
    assert none["mimic_u"].item() == none["mimic_v"].item() == 0.0


def test_forward_loss_is_the_weighted_sum_of_its_parts_with_a_category_alignment_term():
    # items 1..12 fall in categories 2, 3, 1, 2, 3, 1, ...: three categories of 4 items each, all at
    # cal_min_items, so the CAL term is live (every other batch here has < 4 items per category)
    import torch.nn.functional as F

    torch.manual_seed(0)
    m = _model(lambda_u=0.5, lambda_v=0.25, lambda_ca=0.3)
    u, i = torch.arange(1, 13) % 10 + 1, torch.arange(1, 13)
    y = (torch.arange(12) % 2).float()
    loss, parts = m(u, i, y)
    with torch.no_grad():
        p_u, p_v = m.user_vectors(u), m.item_vectors(i)
        cats = m.item_categories[i]
        cal = category_alignment_loss(p_v, cats)  # on the item vectors (the query side has no categories)
        loss_u, loss_v = mimic_losses(m.a_u(u), m.a_v(i), p_u, p_v, y)
        logits = m.cfg.logit_scale * (p_u * p_v).sum(-1)  # the scale lets the sigmoid reach 0/1
        bce = -(y * F.logsigmoid(logits) + (1 - y) * F.logsigmoid(-logits)).mean()
    assert sorted(cats.unique(return_counts=True)[1].tolist()) == [4, 4, 4]
    assert cal.item() > 1e-3 and abs(cal - category_alignment_loss(p_u, cats)).item() > 1e-4
    assert parts["cal"].item() == pytest.approx(cal.item(), rel=1e-5)
    assert parts["bce"].item() == pytest.approx(bce.item(), rel=1e-5)
    assert parts["mimic_u"].item() == pytest.approx(loss_u.item(), rel=1e-5)
    assert parts["mimic_v"].item() == pytest.approx(loss_v.item(), rel=1e-5)
    # lambda_ca weighs the CAL term as the lambdas weigh the mimic terms
    want = bce + 0.5 * loss_u + 0.25 * loss_v + 0.3 * cal
    assert loss.item() == pytest.approx(want.item(), rel=1e-5)
    assert abs(loss - (bce + 0.5 * loss_u + 0.25 * loss_v + cal)).item() > 1e-4  # the weight shows


def test_item_categories_and_user_features_reach_the_vectors():
    # an item's category (a user's feature values) is an input of its tower: changing it moves the vector
    torch.manual_seed(0)
    m = _model()
    users, items = torch.tensor([1, 2, 3]), torch.tensor([4, 5, 6])
    with torch.no_grad():
        p_u, p_v = m.user_vectors(users), m.item_vectors(items)
        m.item_categories[items] = m.item_categories[items] % 3 + 1  # each of the three to another category
        m.user_features[users, 0] = (m.user_features[users, 0] + 1) % 3  # the first field only
        moved_v, moved_u = m.item_vectors(items), m.user_vectors(users)
        m.user_features[users, 0] = (m.user_features[users, 0] - 1) % 3  # the first field back
        m.user_features[users, 1] = (m.user_features[users, 1] + 1) % 4  # then the second field only
        moved_u2 = m.user_vectors(users)
    assert ((moved_v - p_v).norm(dim=-1) > 1e-3).all()
    assert ((moved_u - p_u).norm(dim=-1) > 1e-3).all()
    assert ((moved_u2 - p_u).norm(dim=-1) > 1e-3).all()


def test_user_features_are_coded_per_field_in_sorted_order(spark, warehouse):
    from ml.data import io
    from ml.train.dat_task import load_user_features
    from ml.train.tables import build_vocab

    rows = [(1, {"gender": "F", "age": "25"}), (2, {"gender": "M"}), (3, None), (4, {"age": "35", "occ": "7"}),
            (9, {"gender": "X"}), (10, {"zone": "7"})]  # 9, 10: not training users: no level of theirs
    path = f"{warehouse}/users_codes"
    io.write_table(spark, spark.createDataFrame(rows, "user_id long, features map<string,string>"), path)
    feats, sizes = load_user_features(path, build_vocab(np.array([1, 2, 3, 4, 5])), ["gender", "age", "occ"])
    assert sizes == (3, 3, 2)  # F, M / 25, 35 / 7, each + 1 for unknown (X only user 9 has: a row nothing trains)
    assert feats.tolist() == [[0, 0, 0], [1, 1, 0], [2, 0, 0], [0, 0, 0], [0, 2, 1], [0, 0, 0]]  # row 0: padding
    # a null user_id (a table not written by ingest) is named, not coded as some other user
    from ml.errors import InvalidInput

    bad = f"{warehouse}/users_null"
    io.write_table(spark, spark.createDataFrame([(1, {"gender": "F"}), (None, {"gender": "M"})],
                                                "user_id long, features map<string,string>"), bad)
    with pytest.raises(InvalidInput, match="1 rows with a null user_id"):
        load_user_features(bad, build_vocab(np.array([1])), ["gender"])
    # a field no user has (a misspelt dat.user_fields entry) is named, not trained as a feature always 0
    with pytest.raises(InvalidInput, match=r"dat.user_fields: 'gendre' has a value for no training user in "
                                           r".*users_codes \(their features are \['age', 'gender'\]\)"):
        load_user_features(path, build_vocab(np.array([1, 2])), ["gender", "gendre"])
    # nor is a field only other users have a feature of these
    with pytest.raises(InvalidInput, match=r"'zone' has a value for no training user"):
        load_user_features(path, build_vocab(np.array([1, 2, 3, 4, 5])), ["zone"])


def test_user_fields_without_a_users_table_train_on_ids_with_a_warning(tmp_path, caplog):
    # a source without users (Taobao) and the default MovieLens fields: ids only, and said (before: an
    # INFO line's "(0 feature fields)")
    from ml.train.dat_task import load_user_features
    from ml.train.tables import build_vocab

    with caplog.at_level("WARNING", logger="ml.train.dat_task"):
        feats, sizes = load_user_features(str(tmp_path / "users"), build_vocab(np.array([1, 2])), ["gender", "age"])
    assert tuple(feats.shape) == (3, 0) and sizes == ()
    assert [r.getMessage() for r in caplog.records] == [
        f"dat.user_fields=['gender', 'age']: {tmp_path / 'users'} has no users of the training sequences, so the "
        f"query tower has no user "
        "features (ids only); set dat.user_fields=[] to say so, or ingest a source with its users (ml1m's users.dat)"]


def test_one_sided_artifacts_give_the_same_vectors_without_the_other_sides_tables(tmp_path):
    from ml.train.dat_task import embed, load_dat_artifact, save_dat_artifact, side_artifact
    from ml.train.tables import build_vocab

    model = _model(use_amm=True)
    users, items = build_vocab(np.arange(10, 20)), build_vocab(np.arange(100, 120))
    path = str(tmp_path / "model.pt")
    save_dat_artifact(path, model, users, items, {"run_id": "r", "steps": 3})
    blob = torch.load(path, map_location="cpu", weights_only=False)
    full, _, _ = load_dat_artifact(path, blob)
    u_idx, i_idx = torch.arange(1, 11), torch.arange(1, 21)
    for side, idx, other_table in (("item", i_idx, "query.user_emb.weight"), ("user", u_idx, "item.item_emb.weight")):
        one = side_artifact(blob, side)
        assert one["state"][other_table].shape[0] == 1 and one["extra"] == {"run_id": "r", "steps": 3}
        m, u, i = load_dat_artifact(path, one)
        assert torch.equal(embed(m, idx, side), embed(full, idx, side))
        assert (u.size, i.size) == ((10, 0) if side == "user" else (0, 20))
