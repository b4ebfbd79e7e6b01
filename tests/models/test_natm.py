"""NATM on tiny configs: shapes, the NCE formula by hand, MLM masking, learning a planted graph."""
import math

import pytest
import torch

from ml.models.natm import (NATM, NATMConfig, PAD, bucketize_weights, build_neighbor_table, mlm_cross_entropy,
                            nce_loss)


def _toy_table(V=20, N=3, cats=True):
    # ring graph: item i's neighbours are i+1, i+2, i+3 (mod V), weights 8, 4, 2
    items = torch.arange(1, V + 1).repeat_interleave(N)
    rank = torch.arange(1, N + 1).repeat(V)
    nbr = (items - 1 + rank) % V + 1
    weight = (2.0 ** (4 - rank)).float()
    categories = torch.cat([torch.zeros(1), (torch.arange(1, V + 1) % 3) + 1]).long() if cats else None
    return build_neighbor_table(V, items, nbr, weight, rank, N, 16, categories)


def test_shapes_and_normalised_embeddings():
    cfg = NATMConfig(num_items=20, num_neighbors=3, num_categories=3, dim=16, layers=2, heads=2)
    model = NATM(cfg, _toy_table())
    rel = model(torch.tensor([1, 2]), torch.tensor([[3, 4, 5], [6, 7, 8]]))
    assert rel.shape == (2, 3) and rel.abs().max() <= 1.0 + 1e-5
    emb = model.encode(torch.arange(1, 21))
    assert emb.shape == (20, 16) and torch.allclose(emb.norm(dim=-1), torch.ones(20), atol=1e-5)


@pytest.mark.parametrize("layers,neighbors", [(0, 3), (1, 0), (0, 0)])
def test_ablation_switches_run(layers, neighbors):
    cfg = NATMConfig(num_items=20, num_neighbors=neighbors, dim=8, layers=layers, heads=2)
    table = _toy_table(N=3) if neighbors else build_neighbor_table(20, torch.tensor([]), torch.tensor([]),
                                                                   torch.tensor([]), torch.tensor([]), 0, 16)
    model = NATM(cfg, table)
    assert model(torch.tensor([1]), torch.tensor([[2, 3]])).shape == (1, 2)


def test_nce_loss_matches_hand_computation():
    R = torch.tensor([[0.5, -0.2, 0.1]])
    q = torch.tensor([[0.01, 0.02, 0.05]])
    k, g = 2, 10.0
    p1 = math.exp(g * 0.5) / (math.exp(g * 0.5) + k * 0.01)
    p0a = k * 0.02 / (math.exp(g * -0.2) + k * 0.02)
    p0b = k * 0.05 / (math.exp(g * 0.1) + k * 0.05)
    expected = -(math.log(p1) + math.log(p0a) + math.log(p0b))
    assert nce_loss(R, q, k, g).item() == pytest.approx(expected, rel=1e-5)


def test_nce_loss_with_an_offset_matches_hand_computation():
    # p(y=1) = exp(gR - c) / (exp(gR - c) + k q): the normaliser c lowers the data side's log-odds
    R = torch.tensor([[0.5, -0.2, 0.1], [0.1, 0.3, -0.4]])
    q = torch.tensor([[0.01, 0.02, 0.05], [0.1, 0.03, 0.2]])
    k, g, c = 2, 10.0, 2.0
    expected = 0.0
    for r, qq in zip(R.tolist(), q.tolist()):
        e = [math.exp(g * x - c) for x in r]
        expected -= math.log(e[0] / (e[0] + k * qq[0]))
        expected -= sum(math.log(k * qn / (en + k * qn)) for en, qn in zip(e[1:], qq[1:]))
    assert nce_loss(R, q, k, g, offset=c).item() == pytest.approx(expected / 2, rel=1e-5)
    assert nce_loss(R, q, k, g, offset=torch.tensor(c)).item() == pytest.approx(expected / 2, rel=1e-5)
    assert abs(nce_loss(R, q, k, g).item() - expected / 2) > 0.1  # the offset matters at these values


@pytest.mark.parametrize("gamma", [10.0, 6.0])
def test_learned_nce_offset_starts_at_half_gamma(gamma):
    # c = gamma/2 puts the data/noise boundary near R = 0.5 at init; c = 0 left positives without gradient
    model = NATM(NATMConfig(num_items=20, num_neighbors=3, dim=8, layers=0, gamma=gamma), _toy_table(cats=False))
    assert model.cfg.learn_nce_offset and model.nce_offset.requires_grad
    assert model.nce_offset.item() == pytest.approx(gamma / 2)


def test_batch_softmax_loss_matches_hand_computation():
    torch.manual_seed(0)
    cfg = NATMConfig(num_items=20, num_neighbors=3, dim=8, layers=0, dropout=0.0, loss="softmax")
    model = NATM(cfg, _toy_table(cats=False)).eval()
    trigger = torch.tensor([1, 2])
    cands = torch.tensor([[2, 3], [3, 1]])  # row 0: positive 2, negative 3; row 1: positive 3, negative 1
    q = torch.tensor([[0.2, 0.3], [0.3, 0.5]])
    r = model.encode(torch.tensor([1, 2, 3]))
    R = (r @ r.T).tolist()
    g = cfg.gamma
    # candidates of the batch: items 1, 2, 3 with q 0.5, 0.2, 0.3; each row's trigger item is masked.
    # Correction: log of the chance the item is in the batch, 1 - (1 - p)^B (1 - q)^(B k), B = 2, k = 1
    for p_of in (None, {1: 0.1, 2: 0.6, 3: 0.3}):  # positives' distribution: q where not given
        def log_pi(item, qv):
            pv = qv if p_of is None else p_of[item]
            return math.log(1 - (1 - pv) ** 2 * (1 - qv) ** 2)

        row0 = [g * R[0][1] - log_pi(2, 0.2), g * R[0][2] - log_pi(3, 0.3)]  # trigger 1, target item 2
        row1 = [g * R[1][0] - log_pi(1, 0.5), g * R[1][2] - log_pi(3, 0.3)]  # trigger 2, target item 3
        expected = (-(row0[0] - math.log(sum(math.exp(x) for x in row0)))
                    - (row1[1] - math.log(sum(math.exp(x) for x in row1)))) / 2
        p = None if p_of is None else torch.tensor([[p_of[c] for c in row] for row in cands.tolist()])
        assert model.batch_softmax_loss(trigger, cands, q, p).item() == pytest.approx(expected, rel=1e-5)


def test_sampled_softmax_learns_the_true_next_item_distribution():
    # One trigger, a Zipf next-item distribution p, negatives from the pipeline's q ~ count^0.75. With
    # logits corrected by log q (the positives are not drawn from q, and the batch holds each item once)
    # the learned softmax was 1.7x as steep as p (popular items over-predicted); corrected by the
    # chance of being in the batch it is calibrated.
    torch.manual_seed(0)
    V, B, k = 60, 256, 9
    none = torch.tensor([])
    cnt = 1.0 / torch.arange(1, V).float() ** 1.1  # items 2..V
    p = cnt / cnt.sum()
    q = cnt ** 0.75 / (cnt ** 0.75).sum()
    model = NATM(NATMConfig(num_items=V, num_neighbors=0, dim=16, layers=0, dropout=0.0, loss="softmax",
                            separate_encoders=True), build_neighbor_table(V, none, none, none, none, 0, 16))
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    trigger = torch.ones(B, dtype=torch.long)
    for _ in range(400):
        cands = torch.cat([torch.multinomial(p, B, replacement=True)[:, None],
                           torch.multinomial(q, B * k, replacement=True).view(B, k)], 1) + 2
        loss = model.batch_softmax_loss(trigger, cands, q[cands - 2], p[cands - 2])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        s = model.cfg.gamma * (model.encode(torch.tensor([1]), "trigger") @ model.encode(torch.arange(2, V + 1),
                                                                                      "candidate").T)[0]
        learned, true = torch.log_softmax(s, 0), torch.log(p)
        x, y = true - true.mean(), learned - learned.mean()
        slope = ((x * y).sum() / (x * x).sum()).item()
    assert 0.85 < slope < 1.15, slope


@pytest.mark.parametrize("separate", [False, True])
def test_full_softmax_loss_matches_hand_computation(separate):
    torch.manual_seed(0)
    V = 6
    cfg = NATMConfig(num_items=V, num_neighbors=3, dim=8, layers=0, dropout=0.0, loss="full",
                     separate_encoders=separate)
    model = NATM(cfg, _toy_table(V=V, cats=False)).eval()
    trigger, positive = torch.tensor([1, 4]), torch.tensor([2, 6])
    t = model.encode(torch.arange(1, V + 1), "trigger").tolist()
    c = model.encode(torch.arange(1, V + 1), "candidate").tolist()
    g = cfg.gamma
    expected = 0.0
    for a, b in zip(trigger.tolist(), positive.tolist()):  # every item but the trigger is a class
        logit = {j: g * sum(x * y for x, y in zip(t[a - 1], c[j - 1])) for j in range(1, V + 1) if j != a}
        expected += -(logit[b] - math.log(sum(math.exp(v) for v in logit.values()))) / 2
    assert model.full_softmax_loss(trigger, positive).item() == pytest.approx(expected, rel=1e-5)


def test_separate_encoders_have_their_own_id_tables():
    cfg = NATMConfig(num_items=20, num_neighbors=3, dim=8, layers=1, heads=2, separate_encoders=True)
    model = NATM(cfg, _toy_table(cats=False))
    assert model.candidate_encoder.item_emb is model.candidate_item_emb is not model.item_emb
    assert not torch.equal(model.item_emb.weight, model.candidate_item_emb.weight)
    loss = model.full_softmax_loss(torch.tensor([1, 2]), torch.tensor([3, 4]))
    loss.backward()
    assert model.item_emb.weight.grad[[1, 2]].abs().sum() > 0  # triggers reach the trigger table
    assert model.candidate_item_emb.weight.grad[1:21].abs().sum() > 0  # every candidate the other
    with pytest.raises(ValueError, match="only used with separate_encoders"):
        NATM(NATMConfig(num_items=20, num_neighbors=3, dim=8, layers=0), _toy_table(cats=False),
             candidate_item_emb=torch.nn.Embedding(22, 8))


def test_id_tables_passed_in_are_initialised_by_the_model():
    """The job hands NATM allocated-only (uninitialised) id tables; the model's init fills them."""
    cfg = NATMConfig(num_items=20, num_neighbors=3, dim=8, layers=0, separate_encoders=True)
    garbage = [torch.nn.Embedding(22, 8) for _ in range(2)]
    for e in garbage:
        torch.nn.init.constant_(e.weight, float("nan"))
    model = NATM(cfg, _toy_table(cats=False), item_emb=garbage[0], candidate_item_emb=garbage[1])
    for e in (model.item_emb, model.candidate_item_emb):
        assert torch.isfinite(e.weight).all() and e.weight[0].abs().sum() == 0  # padding row zero
        assert 0.05 < e.weight[1:].std().item() < 0.2


def test_initial_weights_do_not_depend_on_where_the_encoders_sit_in_memory():
    """Same seed, same weights, build after build (the two encoders were once initialised in the
    order of a set of the two, i.e. of their memory addresses)."""
    cfg = NATMConfig(num_items=20, num_neighbors=3, dim=8, layers=0, separate_encoders=True)
    states = []
    for _ in range(12):
        keep = [torch.empty(1000) for _ in range(len(states) * 7 % 5)]  # shift the allocator about
        torch.manual_seed(0)
        states.append(NATM(cfg, _toy_table(cats=False)).state_dict())
        del keep
    for other in states[1:]:
        assert all(torch.equal(states[0][k], other[k]) for k in other)


def test_residual_mlp_encoder_passes_the_item_vector_through():
    """natm.residual: r = x_item + MLP(...); with the MLP's output layer at zero, r is the item's own
    (normalised) token vector through the output map, whatever its neighbours."""
    cfg = NATMConfig(num_items=20, num_neighbors=3, dim=8, layers=0, residual=True, dropout=0.0)
    model = NATM(cfg, _toy_table(cats=False)).eval()
    enc = model.trigger_encoder
    torch.nn.init.zeros_(enc.mlp[-1].weight)
    torch.nn.init.zeros_(enc.mlp[-1].bias)
    items = torch.tensor([1, 5, 9])
    tokens, buckets, _ = model._inputs(items)
    x0 = enc.norm(enc.item_emb(tokens[:, 0]) + enc.pos_emb.weight[0] + enc.weight_emb(buckets[:, 0]))
    r, _ = enc(tokens, buckets, None)
    assert torch.allclose(r, enc.out(x0), atol=1e-6)
    plain = NATM(NATMConfig(num_items=20, num_neighbors=3, dim=8, layers=0, dropout=0.0), _toy_table(cats=False))
    torch.nn.init.zeros_(plain.trigger_encoder.mlp[-1].weight)
    torch.nn.init.zeros_(plain.trigger_encoder.mlp[-1].bias)
    r_plain, _ = plain.trigger_encoder(tokens, buckets, None)
    assert torch.allclose(r_plain, plain.trigger_encoder.out.bias.expand_as(r_plain))  # without it: one vector
    with pytest.raises(ValueError, match="natm.residual is for natm.layers=0"):
        NATMConfig(num_items=20, num_neighbors=3, dim=8, layers=1, residual=True)


@pytest.mark.parametrize("residual", [False, True])
def test_mlp_encoder_without_states_gives_the_same_vectors_and_gradients(residual):
    """The MLP encoder's r-only path (training and serving) equals the path that builds the token
    states (the MLM head's), padding and categories included, in values and in gradients."""
    torch.manual_seed(0)
    table = _toy_table()
    table.neighbors[3, 1:] = PAD  # item 3 has one neighbour
    table.weight_buckets[3, 1:] = 0
    cfg = NATMConfig(num_items=20, num_neighbors=3, num_categories=3, dim=8, layers=0, residual=residual,
                     dropout=0.0)
    model = NATM(cfg, table)
    enc = model.trigger_encoder
    inputs = model._inputs(torch.tensor([1, 3, 3, 7]))
    grads = []
    for states in (True, False):
        model.zero_grad()
        r, h = enc(*inputs, states=states)
        assert (h is None) != states
        (r * torch.arange(8.0)).sum().backward()
        grads.append((r.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (r1, g1), (r2, g2) = grads
    assert torch.allclose(r1, r2, atol=1e-6) and g1.keys() == g2.keys() and len(g1) >= 8
    assert all(torch.allclose(g1[n], g2[n], atol=1e-6) for n in g1)


def test_full_softmax_refuses_a_catalogue_above_its_limit():
    with pytest.raises(ValueError, match="full_softmax_max"):
        NATMConfig(num_items=1000, loss="full", full_softmax_max=999)


def test_weight_buckets_are_log2():
    assert bucketize_weights(torch.tensor([0.0, 1.0, 2.0, 3.0, 8.0, 1e9]), 16).tolist() == [0, 1, 2, 2, 4, 15]


def test_mlm_masks_only_real_neighbours_and_predicts_them():
    V = 20
    table = _toy_table(V)
    table.neighbors[5, 2] = PAD  # item 5 has only two neighbours
    cfg = NATMConfig(num_items=V, num_neighbors=3, dim=8, layers=1, heads=2, mlm_prob=0.99)
    model = NATM(cfg, table)
    seen = {}
    orig = model.trigger_encoder.forward

    def spy(tokens, buckets, cats):
        seen["tokens"], seen["cats"] = tokens.clone(), cats.clone()
        return orig(tokens, buckets, cats)

    model.trigger_encoder.forward = spy
    g = torch.Generator().manual_seed(0)
    loss = model.mlm_loss(torch.tensor([5, 6]), generator=g)
    tok = seen["tokens"]
    assert (tok[:, 0] == torch.tensor([5, 6])).all()  # the item itself is never masked
    assert tok[0, 3] == PAD  # padding stays padding
    assert (tok[:, 1:3] == model.mask_id).all()  # real neighbours were masked (p=0.99)
    # a masked token shows no category (its item's would give part of the answer away); the item's own stays
    assert (seen["cats"][:, 1:3] == 0).all()
    assert torch.equal(seen["cats"][:, 0], table.categories[torch.tensor([5, 6])]) and (seen["cats"][:, 0] > 0).all()
    assert loss.item() > 0
    # full softmax vs sampled softmax give finite losses; sampled ignores accidental hits
    s = torch.randn(4, 8)
    w = torch.randn(V + 1, 8)
    t = torch.tensor([1, 2, 3, 1])
    assert torch.isfinite(mlm_cross_entropy(s, t, w, None)) and torch.isfinite(mlm_cross_entropy(s, t, w, 16))


def test_mlm_predicts_the_neighbour_ids_at_the_masked_positions(monkeypatch):
    # the targets are the masked slots' own neighbour ids, in the order of the states predicting them
    import ml.models.natm as natm

    V = 20
    model = NATM(NATMConfig(num_items=V, num_neighbors=3, dim=8, layers=1, heads=2, dropout=0.0, mlm_prob=0.5),
                 _toy_table(V))
    seen = {}

    def spy(states, targets, out_weight, num_sampled, generator=None):
        seen.update(states=states, targets=targets, out_weight=out_weight, num_sampled=num_sampled)
        return mlm_cross_entropy(states, targets, out_weight, num_sampled, generator)

    monkeypatch.setattr(natm, "mlm_cross_entropy", spy)
    items = torch.tensor([5, 6, 11, 17])
    loss = model.mlm_loss(items, generator=torch.Generator().manual_seed(0))
    masked = torch.rand(4, 3, generator=torch.Generator().manual_seed(0)) < 0.5  # the same draw
    want = model.table.neighbors[items][masked]
    assert 3 <= len(want) < 12 and not torch.equal(want, want.roll(1))  # a shuffle of the targets would show
    assert torch.equal(seen["targets"], want)
    assert seen["num_sampled"] is None and torch.equal(seen["out_weight"], model.item_emb.weight[: V + 1])
    # full softmax over the items 1..V (the tied id table), PAD not a class
    by_hand = torch.nn.functional.cross_entropy(seen["states"] @ model.item_emb.weight[1: V + 1].T, want - 1)
    assert loss.item() == pytest.approx(by_hand.item(), rel=1e-5)


def test_mlm_samples_its_negatives_beyond_the_full_softmax_bound(monkeypatch):
    # the full MLM softmax's logits are masked tokens x items (9 GiB at 10^6 items, batch 256): unset,
    # natm.mlm_negatives is full up to natm.full_softmax_max items and sampled beyond
    import ml.models.natm as natm

    V = 20
    kw = dict(num_items=V, num_neighbors=3, dim=8, layers=1, heads=2, dropout=0.0, mlm_prob=0.5)
    assert NATMConfig(**kw).mlm_sampled is None and NATMConfig(**kw, mlm_negatives=5).mlm_sampled == 5
    cfg = NATMConfig(**kw, full_softmax_max=V - 1)
    assert cfg.mlm_sampled == natm.MLM_NEGATIVES_AT_SCALE
    assert NATMConfig(**kw, full_softmax_max=V - 1, mlm_negatives=5).mlm_sampled == 5
    seen = {}

    def spy(states, targets, out_weight, num_sampled, generator=None):
        seen["num_sampled"] = num_sampled
        return mlm_cross_entropy(states, targets, out_weight, num_sampled, generator)

    monkeypatch.setattr(natm, "mlm_cross_entropy", spy)
    loss = NATM(cfg, _toy_table(V)).mlm_loss(torch.tensor([5, 6, 11, 17]), generator=torch.Generator().manual_seed(0))
    assert seen["num_sampled"] == natm.MLM_NEGATIVES_AT_SCALE and torch.isfinite(loss)


def test_mlm_full_softmax_never_predicts_padding():
    # cross-entropy over the item classes 1..V only: the PAD row of the id table is no class
    g = torch.Generator().manual_seed(0)
    s, w = torch.randn(5, 8, generator=g), torch.randn(11, 8, generator=g)
    w[0] = 2.0 * s.mean(0)  # a PAD logit large enough to matter if it were left in
    t = torch.tensor([1, 4, 10, 4, 7])
    expected = torch.nn.functional.cross_entropy(s @ w[1:].T, t - 1)
    assert mlm_cross_entropy(s, t, w, None).item() == pytest.approx(expected.item(), rel=1e-5)


def test_mlm_sampled_softmax_leaves_out_accidental_hits():
    # targets + S uniform negatives as classes; a negative (or another row's target) with the row's own
    # id is not a competing class: its column is dropped from that row, the row's own column stays
    V, S = 6, 8
    g = torch.Generator().manual_seed(0)
    s, w = torch.randn(4, 8, generator=g), torch.randn(V + 1, 8, generator=g)
    t = torch.tensor([1, 2, 3, 1])
    neg = torch.randint(1, V + 1, (S,), generator=torch.Generator().manual_seed(1))  # what the call draws
    cand = torch.cat([t, neg]).tolist()
    assert any(c in t.tolist() for c in neg.tolist())  # the draw repeats a target
    expected = 0.0
    for m, (row, target) in enumerate(zip(s, t.tolist())):
        logits = [(row @ w[c]).item() for j, c in enumerate(cand) if j == m or c != target]
        own = (row @ w[target]).item()
        expected -= (own - math.log(sum(math.exp(x) for x in logits))) / len(t)
    got = mlm_cross_entropy(s, t, w, S, torch.Generator().manual_seed(1))
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_learns_planted_graph_far_above_popularity():
    """Items 1..V in a ring; the positive of i is i+1. After training, i's nearest item is i+1."""
    torch.manual_seed(0)
    V = 30
    table = _toy_table(V, cats=False)
    cfg = NATMConfig(num_items=V, num_neighbors=3, dim=16, layers=1, heads=2, dropout=0.0, gamma=10.0)
    model = NATM(cfg, table)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    k = 5
    q = torch.full((64, 1 + k), 1.0 / V)
    for _ in range(300):
        trig = torch.randint(1, V + 1, (64,))
        pos = trig % V + 1
        negs = torch.randint(1, V + 1, (64, k))
        rel = model(trig, torch.cat([pos[:, None], negs], dim=1))
        loss = nce_loss(rel, q, k, cfg.gamma) + 0.1 * model.mlm_loss(trig)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        emb = model.encode(torch.arange(1, V + 1))
        cand = model.encode(torch.arange(1, V + 1), "candidate")
        sims = emb @ cand.T
        sims.fill_diagonal_(-2)
        top5 = sims.topk(5, dim=1).indices + 1
    hit5 = sum(int((i % V + 1) in top5[i - 1].tolist()) for i in range(1, V + 1)) / V
    assert hit5 > 0.5  # popularity (uniform here) hits 5/29 = 0.17


def test_trigger_projection_makes_relevance_directed():
    """R(a, b) = cos(W r_a, r_b): identity (the symmetric twin) at init, directed once W moves."""
    torch.manual_seed(0)
    cfg = NATMConfig(num_items=20, num_neighbors=3, dim=8, layers=0, dropout=0.0, trigger_projection=True)
    model = NATM(cfg, _toy_table(cats=False)).eval()
    items = torch.arange(1, 21)
    assert torch.allclose(model.encode(items, "trigger"), model.encode(items, "candidate"))
    with torch.no_grad():
        model.trigger_proj.weight.add_(0.5 * torch.randn(8, 8))
    t, c = model.encode(items, "trigger"), model.encode(items, "candidate")
    R = model(torch.tensor([1, 2]), torch.tensor([[2, 3], [1, 3]]))
    assert torch.allclose(R, torch.stack([t[0] @ c[[1, 2]].T, t[1] @ c[[0, 2]].T]), atol=1e-6)
    assert abs(R[0, 0].item() - R[1, 0].item()) > 1e-3  # R(1, 2) != R(2, 1)
    assert model.asymmetric
    with pytest.raises(ValueError, match="alternatives"):
        NATMConfig(num_items=20, separate_encoders=True, trigger_projection=True)


@pytest.mark.parametrize("mode", ["twin", "projection", "separate"])
def test_directed_ring_needs_a_directed_relevance(mode):
    """Positive of i is i+1 only. A symmetric R cannot rank i+1 above i-1; the trigger projection and
    separate encoders (two id tables) can."""
    torch.manual_seed(0)
    V = 30
    cfg = NATMConfig(num_items=V, num_neighbors=0, dim=16, layers=0, dropout=0.0, loss="softmax",
                     trigger_projection=mode == "projection", separate_encoders=mode == "separate")
    empty = torch.tensor([])
    model = NATM(cfg, build_neighbor_table(V, empty, empty, empty, empty, 0, 16))
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    for _ in range(300):
        trig = torch.randint(1, V + 1, (64,))
        cands = torch.cat([(trig % V + 1)[:, None], torch.randint(1, V + 1, (64, 4))], dim=1)
        loss = model.batch_softmax_loss(trig, cands, torch.full(cands.shape, 1.0 / V))
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        sims = model.encode(torch.arange(1, V + 1), "trigger") @ model.encode(torch.arange(1, V + 1), "candidate").T
        sims.fill_diagonal_(-2)
        top1 = sims.argmax(dim=1) + 1
    hit1 = (top1 == torch.arange(1, V + 1) % V + 1).float().mean().item()
    assert hit1 > 0.9 if mode != "twin" else hit1 < 0.7


def test_trainer_with_full_loss_needs_no_stored_negatives():
    from ml.train.natm_task import NATMTrainer

    cfg = NATMConfig(num_items=20, num_neighbors=3, dim=8, layers=0, dropout=0.0, loss="full", mlm_weight=0.0)
    model = NATM(cfg, _toy_table(cats=False)).eval()
    batch = {"trigger": torch.tensor([1, 5]), "positive": torch.tensor([2, 7])}  # no negatives, no q
    loss, metrics = NATMTrainer(model, k=9)(batch)
    assert loss.item() == pytest.approx(model.full_softmax_loss(batch["trigger"], batch["positive"]).item())
    assert set(metrics) == {"softmax"}


@pytest.mark.parametrize("loss,mlm_weight", [("full", 0.0), ("softmax", 0.0), ("nce", 0.1), ("full", 0.1)])
def test_every_trainable_parameter_gets_a_gradient_as_ddp_requires(loss, mlm_weight):
    """DDP (find_unused_parameters off) fails on its second step if a trainable parameter gets no
    gradient: the MLM head without the MLM term, the NCE offset with a softmax loss, are frozen."""
    from ml.train.natm_task import NATMTrainer

    mlp = mlm_weight == 0  # the MLM term needs a transformer layer (natm.layers >= 1)
    cfg = NATMConfig(num_items=20, num_neighbors=3, num_categories=3, dim=8, layers=0 if mlp else 1, heads=2,
                     dropout=0.0, loss=loss, mlm_weight=mlm_weight, separate_encoders=True, residual=mlp,
                     neighbor_pointer=True)
    model = NATM(cfg, _toy_table())
    batch = {"trigger": torch.tensor([1, 5, 9]), "positive": torch.tensor([2, 7, 11]),
             "negatives": torch.tensor([[3, 4], [8, 9], [1, 2]]), "q_positive": torch.full((3,), 0.05),
             "q_negatives": torch.full((3, 2), 0.05)}
    loss_value, _ = NATMTrainer(model, k=2)(batch)
    loss_value.backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == []
    assert model.nce_offset.requires_grad == (loss == "nce")
    assert model.mlm_head[0].weight.requires_grad == (mlm_weight > 0)


@pytest.mark.parametrize("case", ["nothing_masked", "no_neighbours", "mlm_prob_0"])
def test_a_batch_without_masked_tokens_still_gives_the_mlm_head_a_gradient(case):
    # Before, a batch whose draw masked nothing (or whose items had no neighbours) returned a zero
    # without a graph: the head got no gradient and 2-process DDP failed on its next step.
    from ml.train.natm_task import NATMTrainer

    cfg = NATMConfig(num_items=20, num_neighbors=3, dim=8, layers=1, heads=2, dropout=0.0, loss="nce",
                     mlm_weight=0.1, mlm_prob=0.0 if case == "mlm_prob_0" else 1e-9)
    none = torch.zeros(0, dtype=torch.long)
    table = (build_neighbor_table(20, none, none, none.float(), none, 3, 16, None) if case == "no_neighbours"
             else _toy_table(cats=False))
    model = NATM(cfg, table)
    batch = {"trigger": torch.tensor([1, 5, 9]), "positive": torch.tensor([2, 7, 11]),
             "negatives": torch.tensor([[3, 4], [8, 9], [1, 2]]), "q_positive": torch.full((3,), 0.05),
             "q_negatives": torch.full((3, 2), 0.05)}
    assert model.mlm_loss(torch.tensor([1, 5, 9])).item() == 0.0
    NATMTrainer(model, k=2)(batch)[0].backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == []
    assert model.mlm_head[0].weight.requires_grad == (case != "mlm_prob_0")


@pytest.mark.parametrize("separate", [False, True])
def test_item_bias_is_a_unit_vector_coordinate_every_loss_agrees_with(separate):
    torch.manual_seed(0)
    V, D = 6, 8
    cfg = NATMConfig(num_items=V, num_neighbors=3, dim=D, layers=0, dropout=0.0, loss="full",
                     separate_encoders=separate, item_bias=True)
    model = NATM(cfg, _toy_table(V=V, cats=False)).eval()
    with torch.no_grad():
        model.bias_emb.weight[1:V + 1, 0] = torch.linspace(-1.0, 2.0, V)
    items = torch.arange(1, V + 1)
    t, c = model.encode(items, "trigger"), model.encode(items, "candidate")
    assert model.asymmetric and model.out_dim == D + 1 and t.shape == c.shape == (V, D + 1)
    assert torch.allclose(t.norm(dim=-1), torch.ones(V), atol=1e-5)
    assert torch.allclose(c.norm(dim=-1), torch.ones(V), atol=1e-5)
    # R = cos(a) cos(t, c) / cosh(b_c) + sin(a) tanh(b_c), by hand from the unit encoder outputs
    a, b = model.bias_angle.item(), model.bias_emb.weight[1:V + 1, 0]
    ut, uc = model._unit(items, "trigger"), model._unit(items, "candidate")
    expected = math.cos(a) * (ut @ uc.T) / torch.cosh(b)[None, :] + math.sin(a) * torch.tanh(b)[None, :]
    assert torch.allclose(t @ c.T, expected, atol=1e-5)
    # the three losses score with the same vectors as encode (what the top-K job searches)
    trigger, cands = torch.tensor([1, 4]), torch.tensor([[2, 3], [6, 1]])
    R = model(trigger, cands)
    assert torch.allclose(R, torch.stack([t[0] @ c[[1, 2]].T, t[3] @ c[[5, 0]].T]), atol=1e-5)
    g = cfg.gamma
    full = 0.0
    for row, (x, y) in enumerate([(1, 2), (4, 6)]):
        logit = {j: g * (t[x - 1] @ c[j - 1]).item() for j in range(1, V + 1) if j != x}
        full += -(logit[y] - math.log(sum(math.exp(v) for v in logit.values()))) / 2
    assert model.full_softmax_loss(trigger, torch.tensor([2, 6])).item() == pytest.approx(full, rel=1e-5)


def test_item_bias_learns_the_popular_item():
    # Every trigger is followed by item 1 half the time, else by a uniform draw: the best list puts
    # item 1 first for every trigger, and the bias coordinate is where that popularity goes.
    torch.manual_seed(0)
    V = 30
    g = torch.Generator().manual_seed(0)
    trig = torch.randint(2, V + 1, (4096,), generator=g)
    pos = torch.where(torch.rand(4096, generator=g) < 0.5, torch.ones_like(trig),
                      torch.randint(2, V + 1, (4096,), generator=g))
    pos = torch.where(pos == trig, torch.ones_like(pos), pos)
    empty = build_neighbor_table(V, *(torch.tensor([]),) * 4, 0, 16)
    cfg = NATMConfig(num_items=V, num_neighbors=0, dim=8, layers=0, dropout=0.0, loss="full",
                     separate_encoders=True, item_bias=True)
    model = NATM(cfg, empty)
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    for _ in range(150):
        loss = model.full_softmax_loss(trig, pos)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        items = torch.arange(1, V + 1)
        score = model.encode(items, "trigger") @ model.encode(items, "candidate").T
        score.fill_diagonal_(-float("inf"))
    top1 = score.argmax(1) + 1
    assert (top1[1:] == 1).float().mean() > 0.95  # item 1 first for (nearly) every other trigger
    assert model.bias_emb.weight[1, 0] > model.bias_emb.weight[2:V + 1, 0].max()


@pytest.mark.parametrize("separate", [False, True])
def test_neighbor_pointer_adds_the_neighbours_candidate_vectors(separate):
    """natm.neighbor_pointer: r_t = unit(u_t + sum_j alpha_j c_(n_j)), by hand; padding weighs 0; the
    losses score with the vectors encode gives the top-K job."""
    torch.manual_seed(0)
    V, D = 6, 8
    table = _toy_table(V=V, cats=False)
    table.neighbors[2, 2] = PAD  # item 2 has two neighbours
    table.weight_buckets[2, 2] = 0
    cfg = NATMConfig(num_items=V, num_neighbors=3, dim=D, layers=0, dropout=0.0, loss="full",
                     separate_encoders=separate, neighbor_pointer=True)
    model = NATM(cfg, table).eval()
    with torch.no_grad():
        model.pointer_rank.copy_(torch.tensor([1.0, 0.0, -1.0]))
    items = torch.arange(1, V + 1)
    alpha = model.pointer_weights(items)
    assert alpha[1, 2] == 0 and (alpha[[0, 2, 3, 4, 5]] > 0).all() and (alpha[0, 0] > alpha[0, 1] > alpha[0, 2])
    uc, ut = model._unit(items, "candidate"), model._unit(items, "trigger")
    nb = table.neighbors[items]
    by_hand = torch.nn.functional.normalize(ut + (alpha[..., None] * uc[(nb - 1).clamp(min=0)]).sum(1), dim=-1)
    t, c = model.encode(items, "trigger"), model.encode(items, "candidate")
    assert torch.allclose(t, by_hand, atol=1e-6) and torch.allclose(c, uc, atol=1e-6)
    assert model.asymmetric and not torch.allclose(t, c, atol=1e-3)
    trigger, cands = torch.tensor([1, 4]), torch.tensor([[2, 3], [6, 1]])
    assert torch.allclose(model(trigger, cands), torch.stack([t[0] @ c[[1, 2]].T, t[3] @ c[[5, 0]].T]), atol=1e-5)
    g = cfg.gamma
    full = 0.0
    for x, y in [(1, 2), (4, 6), (1, 5)]:  # a repeated trigger (encoded once) is still one row per pair
        logit = {j: g * (t[x - 1] @ c[j - 1]).item() for j in range(1, V + 1) if j != x}
        full += -(logit[y] - math.log(sum(math.exp(v) for v in logit.values()))) / 3
    loss = model.full_softmax_loss(torch.tensor([1, 4, 1]), torch.tensor([2, 6, 5]))
    assert loss.item() == pytest.approx(full, rel=1e-5)
    q = torch.full(cands.shape, 0.25)
    model.batch_softmax_loss(trigger, cands, q).backward()  # the sampled path runs and trains the weights
    assert model.pointer_rank.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="natm.neighbor_pointer"):
        NATMConfig(num_items=V, num_neighbors=0, neighbor_pointer=True)


def test_neighbor_pointer_serves_the_graph_ranking_untrained():
    """With large pointer weights falling with the rank, an untrained model's nearest candidates of
    every item are its graph neighbours in rank order: the ranking reaches the score directly. (The
    candidate tower is set to its id vectors, random and near-orthogonal at dim 256.)"""
    torch.manual_seed(0)
    V = 30
    cfg = NATMConfig(num_items=V, num_neighbors=3, dim=256, layers=0, dropout=0.0, separate_encoders=True,
                     residual=True, neighbor_pointer=True)
    model = NATM(cfg, _toy_table(V, cats=False)).eval()
    enc = model.candidate_encoder
    with torch.no_grad():
        for w in (enc.mlp[-1].weight, enc.mlp[-1].bias, enc.pos_emb.weight, enc.weight_emb.weight, enc.out.bias):
            w.zero_()
        enc.out.weight.copy_(torch.eye(256))
        model.pointer_bias.fill_(3.0)
        model.pointer_rank.copy_(torch.tensor([6.0, 3.0, 0.0]))
        items = torch.arange(1, V + 1)
        sims = model.encode(items, "trigger") @ model.encode(items, "candidate").T
        sims.fill_diagonal_(-2)
        top3 = sims.topk(3, dim=1).indices + 1
    assert torch.equal(top3, model.table.neighbors[items])


def test_neighbor_pointer_with_a_transformer_embeds_items_with_short_neighbour_lists():
    """Items with fewer than N neighbours (padding in their lists) get finite trigger vectors at embed
    time (eval, no grad): the padding slots were encoded as item 0, a sequence of padding only, which
    the transformer's inference fast path turns into NaN, and 0 x NaN made the whole vector NaN."""
    from ml.train.natm_task import embed_items

    torch.manual_seed(0)
    V, N = 6, 3
    item, nbr = torch.tensor([1, 1, 2, 2, 2]), torch.tensor([2, 3, 1, 3, 4])
    table = build_neighbor_table(V, item, nbr, torch.tensor([5.0, 3, 5, 2, 1]), torch.tensor([1, 2, 1, 2, 3]), N, 16)
    cfg = NATMConfig(num_items=V, num_neighbors=N, dim=8, layers=2, heads=2, separate_encoders=True,
                     neighbor_pointer=True)
    model = NATM(cfg, table)
    trigger, candidate = embed_items(model, torch.arange(1, V + 1))
    assert torch.isfinite(trigger).all() and torch.isfinite(candidate).all()
    assert torch.allclose(trigger.norm(dim=-1), torch.ones(V), atol=1e-5)
    with torch.no_grad():  # the same vectors as the full softmax's path (neighbours gathered from all rows)
        model.eval()
        items = torch.arange(1, V + 1)
        gathered = model._as_trigger(model._trigger_unit(items, model._unit(items, "candidate")))
    assert torch.allclose(trigger, gathered, atol=1e-5)


def test_mlm_needs_a_transformer():
    """The MLP encoder's token states are its inputs, so a masked slot has no context to be predicted
    from: the config refuses natm.mlm_weight > 0 with natm.layers=0, and the model leaves the term off."""
    from ml.config import ConfigError, NATMSection

    with pytest.raises(ConfigError, match=r"natm.mlm_weight=0.1 .*natm.layers=0"):
        NATMSection(layers=0, mlm_weight=0.1)
    NATMSection(layers=0, mlm_weight=0.0)  # the MLP without MLM
    NATMSection(layers=0, num_neighbors=0, mlm_weight=0.1)  # nothing to mask: the term is off anyway
    assert NATMConfig(num_items=20, num_neighbors=3, layers=1, heads=2).uses_mlm
    model = NATM(NATMConfig(num_items=20, num_neighbors=3, layers=0, mlm_weight=0.1), _toy_table())
    assert not model.cfg.uses_mlm and not model.mlm_head[0].weight.requires_grad


def test_full_softmax_loss_is_fp32_under_bf16_autocast():
    # the catalogue-wide log-sum-exp ran in bf16 under autocast (a logged 8.50 for fp32's 8.5256)
    torch.manual_seed(0)
    cfg = NATMConfig(num_items=20, num_neighbors=3, dim=8, layers=0, dropout=0.0, loss="full",
                     separate_encoders=True, residual=True, neighbor_pointer=True)
    model = NATM(cfg, _toy_table(cats=False))
    trig, pos = torch.tensor([1, 5, 9, 5]), torch.tensor([2, 7, 11, 3])
    exact = model.full_softmax_loss(trig, pos)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = model.full_softmax_loss(trig, pos)
    assert mixed.dtype == torch.float32 and mixed.item() == pytest.approx(exact.item(), rel=2e-2)


def test_transformer_ignores_the_padding_of_a_short_neighbour_list():
    # item 1 has one neighbour, so slots 2 and 3 of its quasi-sequence are padding: what the padding
    # slots hold (their position embeddings here) must not reach its vector through attention
    torch.manual_seed(0)
    items, nbr = torch.tensor([1, 2, 2, 2]), torch.tensor([2, 3, 4, 5])
    weight, rank = torch.tensor([8.0, 8.0, 4.0, 2.0]), torch.tensor([1, 1, 2, 3])
    table = build_neighbor_table(20, items, nbr, weight, rank, 3, 16, None)
    model = NATM(NATMConfig(num_items=20, num_neighbors=3, dim=16, layers=1, heads=2, dropout=0.0), table).eval()
    with torch.no_grad():
        before = model.encode(torch.tensor([1, 2]))
        # slots 2-3: padding for item 1, real for item 2 (not a constant: the LayerNorm would remove it)
        model.trigger_encoder.pos_emb.weight[2:] += 3.0 * torch.randn(2, 16)
        after = model.encode(torch.tensor([1, 2]))
    assert torch.allclose(before[0], after[0], atol=1e-6)
    assert not torch.allclose(before[1], after[1], atol=1e-3)  # the perturbation is large enough to show


def test_nce_without_a_learned_offset_is_the_papers_formula():
    from ml.train.natm_task import NATMTrainer

    torch.manual_seed(0)
    cfg = NATMConfig(num_items=20, num_neighbors=3, dim=8, layers=0, dropout=0.0, loss="nce", learn_nce_offset=False)
    model = NATM(cfg, _toy_table(cats=False)).eval()
    batch = {"trigger": torch.tensor([1, 5]), "positive": torch.tensor([2, 7]),
             "negatives": torch.tensor([[3, 4], [8, 9]]), "q_positive": torch.tensor([0.05, 0.1]),
             "q_negatives": torch.tensor([[0.02, 0.2], [0.05, 0.01]])}
    loss, _ = NATMTrainer(model, k=2)(batch)
    R = model(batch["trigger"], torch.cat([batch["positive"][:, None], batch["negatives"]], 1)).tolist()
    q = torch.cat([batch["q_positive"][:, None], batch["q_negatives"]], 1).tolist()
    g, k, total = cfg.gamma, 2, 0.0
    for r, qq in zip(R, q):  # p(y=1) = exp(gR) / (exp(gR) + k q), p(y=0) = k q / (exp(gR) + k q)
        total -= math.log(math.exp(g * r[0]) / (math.exp(g * r[0]) + k * qq[0]))
        total -= sum(math.log(k * qn / (math.exp(g * rn) + k * qn)) for rn, qn in zip(r[1:], qq[1:]))
    assert loss.item() == pytest.approx(total / 2, rel=1e-5)
    assert model.nce_offset.item() == 0.0 and not model.nce_offset.requires_grad
