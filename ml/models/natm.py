"""NATM — Neighbor-Augmented Transformer-based embedding for retrieval (Alibaba), §2.2–2.4.

An item is encoded together with its top-N co-occurrence neighbours as a "quasi-sequence"
``[item, n_1, ..., n_N]``. Token embedding = item id embedding (+ category embedding: the paper's
"multimodal fusion" of side features) + position embedding (neighbour order) + weight embedding
(bucketised co-occurrence count). A transformer encoder mixes the tokens; the item's output vector
is its embedding r. Trigger and candidate go through the same encoder (twin) unless
``separate_encoders``; relevance R = cos(r_trigger, r_candidate). With a shared encoder R is
symmetric, R(a, b) = R(b, a), while "b follows a" is not; ``trigger_projection`` adds a learned
D x D map on the trigger side only (identity at init), so R(a, b) = cos(W r_a, r_b) can be
directed at the cost of D^2 parameters instead of a second encoder.

Items are contiguous indices 1..V (0 = padding); :class:`NeighborTable` holds the graph lookups.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ml.config import check_natm_combinations
from ml.errors import InvalidInput

PAD = 0
MLM_NEGATIVES_AT_SCALE = 8192  # the MLM's sampled negatives above natm.full_softmax_max items (NATMConfig.mlm_sampled)


@dataclass(frozen=True)
class NATMConfig:
    num_items: int  # V: item indices are 1..V, 0 is padding
    num_neighbors: int = 9  # N (0 = no neighbour augmentation)
    num_categories: int = 0  # 0: no category embedding
    dim: int = 64  # embedding / model width
    layers: int = 2  # transformer layers (0 = MLP only, the paper's ablation)
    heads: int = 4
    ffn_mult: int = 2
    dropout: float = 0.1
    weight_buckets: int = 16  # log2 buckets of the co-occurrence count
    gamma: float = 10.0  # smoothing factor of the NCE relevance exp(gamma * R)
    mlm_prob: float = 0.15  # share of neighbour tokens masked for the item-level MLM loss
    mlm_weight: float = 0.1  # lambda of the MLM term (off with layers=0: see uses_mlm)
    mlm_negatives: Optional[int] = None  # None: full softmax over items; else sampled softmax size
    separate_encoders: bool = False  # different encoders for trigger and candidate (directed graph)
    trigger_projection: bool = False  # a learned D x D map on the trigger side only (directed R)
    # A per-item popularity term carried inside unit vectors, so cosine / inner-product search
    # serves it: candidate c' = [c / cosh(b_c), tanh(b_c)], trigger t' = [t cos(a), sin(a)], both of
    # norm 1, R = cos(a) cos(t, c) / cosh(b_c) + sin(a) tanh(b_c): a bias b_c per item, a learned
    # global angle a. The vectors get one more dimension (dim + 1).
    item_bias: bool = False
    # layers = 0 only: r = x_item + MLP(x_item, mean of the neighbours) instead of the MLP alone, so
    # the item's own vector reaches r directly (as the transformer's residual stream carries it) and
    # the neighbours add a correction; with the MLP at zero, each tower is a plain id embedding.
    residual: bool = False
    # The trigger's vector also points at its neighbours' candidate-side vectors:
    # r_t = unit(u_t + sum_j alpha_j c_(n_j)), alpha_j = softplus(b + p_rank(j) + p_bucket(j)) learned
    # (rank j and weight bucket of neighbour j in the trigger's top-N). cos(r_t, c_k) then carries
    # alpha_k for every listed neighbour k, so the graph's own ranking reaches the score directly
    # and the id vectors need not re-learn it; the trigger and candidate sides differ (asymmetric).
    neighbor_pointer: bool = False
    # NCE normaliser c in exp(gamma*R - c), learned (Mnih & Teh). The paper writes exp(gamma*R):
    # with unigram q, -log(k q) ~ 5 makes p(y=1) ~ 1 for any R >= 0, so positives give no gradient.
    learn_nce_offset: bool = True
    # "nce": the paper's loss over (positive, k sampled negatives). "softmax": a sampled softmax over
    # every candidate in the batch (all rows' positives and negatives, corrected by each one's chance
    # of being in the batch, the trigger itself masked): the same samples, B*(1+k) negatives per row
    # instead of k. "full": an
    # exact softmax over the whole catalogue (every item encoded each step; for catalogues up to
    # ``full_softmax_max`` items), no sampling and no logQ correction.
    loss: str = "nce"
    full_softmax_max: int = 100_000

    def __post_init__(self) -> None:
        if self.loss not in ("nce", "softmax", "full"):
            raise InvalidInput(f"natm.loss={self.loss!r}; expected nce, softmax or full")
        if self.loss == "full" and self.num_items > self.full_softmax_max:
            raise InvalidInput(f"natm.loss=full encodes all {self.num_items} items every step, more than "
                               f"natm.full_softmax_max={self.full_softmax_max}; use natm.loss=softmax (sampled)")
        if self.num_items <= 0:
            raise InvalidInput(f"natm.num_items={self.num_items} must be > 0")
        if self.layers < 0 or self.num_neighbors < 0:
            raise InvalidInput("natm.layers and natm.num_neighbors must be >= 0")
        check_natm_combinations(self)  # the checks the config runs when it is read (a ValueError)

    @property
    def mlm_sampled(self) -> Optional[int]:
        """Negatives of the MLM's sampled softmax; None: a full softmax over the items. ``mlm_negatives``
        when set; unset, full up to ``full_softmax_max`` items and :data:`MLM_NEGATIVES_AT_SCALE`
        beyond: the full softmax's (masked tokens x items) logits are about 14 bytes each at the
        backward's peak, 9 GiB at 10^6 items and a batch of 256 (some 690 masked tokens)."""
        if self.mlm_negatives is not None or self.num_items <= self.full_softmax_max:
            return self.mlm_negatives
        return MLM_NEGATIVES_AT_SCALE

    @property
    def uses_mlm(self) -> bool:
        """Whether the MLM term is trained: it needs neighbours to mask and a transformer to predict them
        from their context (the MLP's token states are its inputs; ``natm.layers=0`` with MLM is refused
        when the config is read)."""
        return self.mlm_weight > 0 and self.mlm_prob > 0 and self.num_neighbors > 0 and self.layers > 0


def bucketize_weights(weights: torch.Tensor, buckets: int) -> torch.Tensor:
    """Co-occurrence weights -> log2 buckets 1..buckets-1 (0 is reserved for 'no weight')."""
    b = torch.floor(torch.log2(weights.clamp(min=1.0))).long() + 1
    return torch.where(weights > 0, b.clamp(1, buckets - 1), torch.zeros_like(b))


class NeighborTable(nn.Module):
    """Per-item top-N neighbours, weight buckets and category, as non-trainable buffers."""

    def __init__(self, neighbors: torch.Tensor, weight_buckets: torch.Tensor, categories: Optional[torch.Tensor]):
        super().__init__()
        self.register_buffer("neighbors", neighbors.long(), persistent=True)  # (V+2, N)
        self.register_buffer("weight_buckets", weight_buckets.long(), persistent=True)  # (V+2, N)
        if categories is not None:
            self.register_buffer("categories", categories.long(), persistent=True)  # (V+2,)
        else:
            self.categories = None

    def quasi_sequence(self, items: torch.Tensor):
        """(B,) item indices -> tokens (B, 1+N), weight buckets (B, 1+N)."""
        nb = self.neighbors[items]  # (B, N)
        wb = self.weight_buckets[items]  # (B, N)
        tokens = torch.cat([items[:, None], nb], dim=1)
        buckets = torch.cat([torch.zeros_like(items)[:, None], wb], dim=1)
        return tokens, buckets


class Encoder(nn.Module):
    """Quasi-sequence -> item embedding r (and token states for the MLM head)."""

    def __init__(self, cfg: NATMConfig, item_emb: nn.Embedding):
        super().__init__()
        self.cfg = cfg
        self.item_emb = item_emb  # the id table (the trigger side's is tied to the MLM output)
        self.pos_emb = nn.Embedding(cfg.num_neighbors + 1, cfg.dim)
        self.weight_emb = nn.Embedding(cfg.weight_buckets, cfg.dim)
        self.cat_emb = nn.Embedding(cfg.num_categories + 1, cfg.dim, padding_idx=0) if cfg.num_categories else None
        self.norm = nn.LayerNorm(cfg.dim)
        self.drop = nn.Dropout(cfg.dropout)
        if cfg.layers:
            layer = nn.TransformerEncoderLayer(cfg.dim, cfg.heads, cfg.ffn_mult * cfg.dim, cfg.dropout,
                                               batch_first=True, norm_first=True, activation="gelu")
            self.transformer = nn.TransformerEncoder(layer, cfg.layers, enable_nested_tensor=False)
            self.mlp = None
        else:
            self.transformer = None
            self.mlp = nn.Sequential(nn.Linear(2 * cfg.dim, cfg.dim), nn.GELU(), nn.Linear(cfg.dim, cfg.dim))
        self.out = nn.Linear(cfg.dim, cfg.dim)

    def forward(self, tokens: torch.Tensor, buckets: torch.Tensor, categories: Optional[torch.Tensor],
                states: bool = True):
        """tokens, buckets: (B, T) with T = 1+N. Returns r (B, D) and token states (B, T, D);
        ``states=False``: r only (None for the states), which the MLP (``layers=0``) computes without
        building and slicing the (B, T, D) states (the same values; faster backward)."""
        T = tokens.shape[1]
        if not states and self.transformer is None:
            return self._mlp_only(tokens, buckets, categories), None
        pos = torch.arange(T, device=tokens.device)
        x = self.item_emb(tokens) + self.pos_emb(pos)[None] + self.weight_emb(buckets)  # (B, T, D)
        if self.cat_emb is not None and categories is not None:
            x = x + self.cat_emb(categories)
        x = self.drop(self.norm(x))
        pad = tokens == PAD  # (B, T); the item itself (t=0) is a real item: callers never encode PAD
        if self.transformer is not None:
            h = self.transformer(x, src_key_padding_mask=pad)  # (B, T, D)
            r = h[:, 0]
        else:
            keep = (~pad[:, 1:]).float()[..., None]  # (B, N, 1)
            mean_nb = (x[:, 1:] * keep).sum(1) / keep.sum(1).clamp(min=1.0) if T > 1 else torch.zeros_like(x[:, 0])
            h = x
            r = self.mlp(torch.cat([x[:, 0], mean_nb], dim=-1))
            if self.cfg.residual:
                r = x[:, 0] + r
        return self.out(r), h

    def _mlp_only(self, tokens: torch.Tensor, buckets: torch.Tensor, categories: Optional[torch.Tensor]):
        """forward's MLP branch, the item token and the neighbour tokens built apart (LayerNorm and
        dropout act per token, so each is what forward's slice of the full states would be)."""
        T = tokens.shape[1]

        def tokens_in(t: slice) -> torch.Tensor:
            x = self.item_emb(tokens[:, t]) + self.pos_emb.weight[t] + self.weight_emb(buckets[:, t])
            if self.cat_emb is not None and categories is not None:
                x = x + self.cat_emb(categories[:, t])
            return self.drop(self.norm(x))

        x0 = tokens_in(slice(0, 1))[:, 0]  # (B, D)
        if T > 1:
            xn = tokens_in(slice(1, T))  # (B, N, D)
            keep = (tokens[:, 1:] != PAD).float()[..., None]
            mean_nb = (xn * keep).sum(1) / keep.sum(1).clamp(min=1.0)
        else:
            mean_nb = torch.zeros_like(x0)
        r = self.mlp(torch.cat([x0, mean_nb], dim=-1))
        if self.cfg.residual:
            r = x0 + r
        return self.out(r)


class NATM(nn.Module):
    """Twin transformer encoder over quasi-sequences, NCE + item-level MLM training."""

    def __init__(self, cfg: NATMConfig, table: NeighborTable, item_emb: Optional[nn.Embedding] = None,
                 candidate_item_emb: Optional[nn.Embedding] = None):
        """``item_emb`` (V+2, D) may be passed in already built, e.g. with deferred init for huge V;
        ``candidate_item_emb`` likewise, the candidate encoder's own id table (``separate_encoders``
        only: a trigger and a candidate are then two vectors per id, as word2vec's input and output
        vectors, and "b follows a" need not mean "a follows b")."""
        super().__init__()
        self.cfg = cfg
        self.table = table
        # two extra rows: 0 = padding, V+1 = [MASK]
        self.item_emb = self._id_table(item_emb, "item_emb")
        self.mask_id = cfg.num_items + 1
        self.trigger_encoder = Encoder(cfg, self.item_emb)
        if cfg.separate_encoders:
            self.candidate_item_emb = self._id_table(candidate_item_emb, "candidate_item_emb")
            self.candidate_encoder = Encoder(cfg, self.candidate_item_emb)
        else:
            if candidate_item_emb is not None:
                raise ValueError("candidate_item_emb is only used with separate_encoders")
            self.candidate_item_emb = None
            self.candidate_encoder = self.trigger_encoder
        self.trigger_proj = nn.Linear(cfg.dim, cfg.dim, bias=False) if cfg.trigger_projection else None
        # item_bias: b per id (zero at init), angle a = 0.5 at init: at a = 0 and b = 0 neither moves
        self.bias_emb = nn.Embedding(cfg.num_items + 2, 1) if cfg.item_bias else None
        self.bias_angle = nn.Parameter(torch.tensor(0.5)) if cfg.item_bias else None
        # neighbor_pointer: alpha_j = softplus(b + rank term + weight-bucket term); values in reset_parameters
        if cfg.neighbor_pointer:
            self.pointer_bias = nn.Parameter(torch.empty(()))
            self.pointer_rank = nn.Parameter(torch.empty(cfg.num_neighbors))
            self.pointer_bucket = nn.Parameter(torch.empty(cfg.weight_buckets))
        else:
            self.pointer_bias = self.pointer_rank = self.pointer_bucket = None
        self.mlm_head = nn.Sequential(nn.Linear(cfg.dim, cfg.dim), nn.GELU(), nn.LayerNorm(cfg.dim))
        # learned, it starts at gamma/2: the data/noise boundary near R = 0.5 instead of R ~ -0.5; not
        # learned, it is the paper's formula, c = 0
        self.nce_offset = nn.Parameter(torch.tensor(cfg.gamma / 2 if cfg.learn_nce_offset else 0.0),
                                       requires_grad=cfg.learn_nce_offset)
        # Parameters the configured loss never reaches are frozen: DDP (find_unused_parameters off)
        # waits for a gradient of every trainable parameter and fails on the second step without one.
        if not cfg.uses_mlm:
            self.mlm_head.requires_grad_(False)
        if cfg.loss != "nce":
            self.nce_offset.requires_grad_(False)
        self.reset_parameters()

    def _id_table(self, emb: Optional[nn.Embedding], name: str) -> nn.Embedding:
        shape = (self.cfg.num_items + 2, self.cfg.dim)
        emb = emb if emb is not None else nn.Embedding(*shape, padding_idx=PAD)
        if tuple(emb.weight.shape) != shape:
            raise ValueError(f"{name} must be {shape}, got {tuple(emb.weight.shape)}")
        return emb

    def reset_parameters(self) -> None:
        # Same scale for every token embedding: N(0,1) position/weight embeddings would swamp the
        # item ids and make every item look alike at init (cosine ~1, saturated NCE).
        # trigger first, then the candidate encoder if it is another module: a fixed order (a set of the
        # two would order them by memory address, so the draws could swap between runs)
        for enc in dict.fromkeys((self.trigger_encoder, self.candidate_encoder)):
            for emb in (enc.pos_emb, enc.weight_emb, enc.cat_emb):
                if emb is not None:
                    nn.init.normal_(emb.weight, std=0.1)
        for emb in (self.item_emb, self.candidate_item_emb):
            if emb is not None:
                nn.init.normal_(emb.weight, std=0.1)
                with torch.no_grad():
                    emb.weight[PAD].zero_()
        if self.trigger_proj is not None:
            nn.init.eye_(self.trigger_proj.weight)  # starts as the symmetric twin
        if self.bias_emb is not None:
            nn.init.zeros_(self.bias_emb.weight)
        if self.pointer_bias is not None:  # alpha_j = softplus(-1) ~ 0.31 for every neighbour at init
            nn.init.constant_(self.pointer_bias, -1.0)
            nn.init.zeros_(self.pointer_rank)
            nn.init.zeros_(self.pointer_bucket)

    @property
    def asymmetric(self) -> bool:
        """Whether trigger-side and candidate-side vectors of an item differ."""
        return (self.cfg.separate_encoders or self.cfg.trigger_projection or self.cfg.item_bias
                or self.cfg.neighbor_pointer)

    @property
    def _own_trigger_pass(self) -> bool:
        """Whether trigger vectors need their own pass (not the candidate pass's rows, mapped)."""
        return self.cfg.separate_encoders or self.cfg.neighbor_pointer

    @property
    def out_dim(self) -> int:
        """Width of the vectors :meth:`encode` returns."""
        return self.cfg.dim + int(self.cfg.item_bias)

    def _project(self, r: torch.Tensor) -> torch.Tensor:
        """Candidate-side (normalised) vectors -> trigger side: identity unless ``trigger_projection``."""
        return r if self.trigger_proj is None else F.normalize(self.trigger_proj(r), dim=-1)

    def _inputs(self, items: torch.Tensor):
        tokens, buckets = self.table.quasi_sequence(items)
        cats = self.table.categories[tokens] if self.table.categories is not None else None
        return tokens, buckets, cats

    def _as_trigger(self, r: torch.Tensor) -> torch.Tensor:
        """Unit encoder outputs -> trigger-side vectors (projection, then the bias coordinate)."""
        r = self._project(r)
        if self.bias_angle is None:
            return r
        a = self.bias_angle
        return torch.cat([r * torch.cos(a), torch.sin(a).expand(len(r), 1)], dim=-1)

    def _as_candidate(self, r: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """Unit encoder outputs of ``items`` -> candidate-side vectors (with the bias coordinate)."""
        if self.bias_emb is None:
            return r
        b = self.bias_emb(items)  # (B, 1)
        return torch.cat([r / torch.cosh(b), torch.tanh(b)], dim=-1)  # norm 1: sech^2 + tanh^2 = 1

    def _unit(self, items: torch.Tensor, side: str) -> torch.Tensor:
        enc = self.trigger_encoder if side == "trigger" else self.candidate_encoder
        r, _ = enc(*self._inputs(items), states=False)
        return F.normalize(r, dim=-1)

    def pointer_weights(self, items: torch.Tensor) -> torch.Tensor:
        """(B,) items -> (B, N) weights alpha_j of their neighbours' candidate vectors (0 at padding)."""
        nb, wb = self.table.neighbors[items], self.table.weight_buckets[items]
        logit = self.pointer_bias + self.pointer_rank[None, :] + self.pointer_bucket[wb]
        return F.softplus(logit) * (nb != PAD)

    def _trigger_unit(self, items: torch.Tensor, cand_unit: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Unit trigger-side vectors before the side's map; with ``neighbor_pointer`` the
        neighbours' unit candidate vectors are added in (``cand_unit`` (V, D): all items' rows,
        item i at row i - 1, when already encoded; else the neighbours are encoded here)."""
        u = self._unit(items, "trigger")
        if not self.cfg.neighbor_pointer:
            return u
        nb = self.table.neighbors[items]  # (B, N)
        if cand_unit is not None:
            c = cand_unit[(nb - 1).clamp(min=0)]
        else:
            # Padding slots weigh 0 but must still be finite: encoding PAD itself (a sequence of
            # padding only) gives NaN on the transformer's inference fast path, and 0 * NaN is NaN.
            c = self._encode_unique(nb.clamp(min=1).reshape(-1), "candidate", unit=True).view(*nb.shape, -1)
        return F.normalize(u + (self.pointer_weights(items)[..., None] * c).sum(1), dim=-1)

    def encode(self, items: torch.Tensor, side: str = "trigger") -> torch.Tensor:
        """(B,) item indices -> L2-normalised embeddings (B, :attr:`out_dim`)."""
        if side == "trigger":
            return self._as_trigger(self._trigger_unit(items))
        return self._as_candidate(self._unit(items, side), items)

    def forward(self, trigger: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        """trigger (B,), candidates (B, C) -> cosine relevance R (B, C).

        Each distinct item in the batch is encoded once (popular items recur across rows), then
        gathered back: same result and gradients as encoding every row, several times cheaper.
        """
        B, C = candidates.shape
        if self._own_trigger_pass:
            r_t = self._encode_unique(trigger, "trigger")  # (B, D)
            r_c = self._encode_unique(candidates.reshape(-1), "candidate").view(B, C, -1)  # (B, C, D)
        else:  # one encoder pass for both sides; the trigger rows then go through the projection
            flat = candidates.reshape(-1)
            r_all = self._encode_unique(torch.cat([trigger, flat]), "candidate", unit=True)  # (B + B*C, D)
            r_t, r_c = self._as_trigger(r_all[:B]), self._as_candidate(r_all[B:], flat).view(B, C, -1)
        return torch.einsum("bd,bcd->bc", r_t, r_c)

    def batch_softmax_loss(self, trigger: torch.Tensor, candidates: torch.Tensor, q: torch.Tensor,
                           p: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Sampled softmax: each trigger vs every distinct candidate of the batch; column 0 of
        ``candidates`` (B, C) is the row's positive, the other C - 1 its negatives drawn from q.
        Logits γ·R - log π(c), π(c) the chance that c is among the batch's distinct candidates:
        π(c) = 1 - (1 - p(c))^B (1 - q(c))^(B(C-1)), with p (B, C) the probability of each candidate
        under the positives' distribution (the items' shares of the training data; q where not given).
        Not log q(c): the positives are not drawn from q, and a popular item is in the batch once
        however often it is drawn, so log q over-corrected popular items (a learned softmax 1.7x as
        steep as the true one on a toy Zipf catalogue; calibrated with π). The trigger's own item
        is masked; accidental hits are impossible (distinct ids).
        """
        B, C = candidates.shape
        uniq, inv = torch.unique(candidates.reshape(-1), return_inverse=True)
        q_u = torch.zeros(len(uniq), dtype=torch.float64, device=q.device).scatter_(0, inv, q.reshape(-1).double())
        p_u = q_u if p is None else torch.zeros_like(q_u).scatter_(0, inv, p.reshape(-1).double())
        # log π in float64: for a rare item, π ~ B p + B (C-1) q is far below float32's 1 - x resolution
        log_miss = B * torch.log1p(-p_u.clamp(max=1 - 1e-12)) + B * (C - 1) * torch.log1p(-q_u.clamp(max=1 - 1e-12))
        log_pi = torch.log((-torch.expm1(log_miss)).clamp(min=1e-300)).float()
        if self._own_trigger_pass:
            r_t, r_c = self._encode_unique(trigger, "trigger"), self.encode(uniq, "candidate")
        else:
            r_all = self._encode_unique(torch.cat([trigger, uniq]), "candidate", unit=True)
            r_t, r_c = self._as_trigger(r_all[:B]), self._as_candidate(r_all[B:], uniq)
        # the matmul may run in bf16 under autocast; the logits and the softmax in fp32
        logits = self.cfg.gamma * (r_t @ r_c.T).float() - log_pi[None, :]
        logits = logits.masked_fill(uniq[None, :] == trigger[:, None], float("-inf"))
        return F.cross_entropy(logits, inv.view(B, -1)[:, 0])

    def full_softmax_loss(self, trigger: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
        """Exact softmax: each trigger vs every item of the catalogue (indices 1..V), logits γ·R, the
        trigger's own item masked; the positive is the target class. Every item is encoded once per
        step on the candidate side, so the cost is V encodings whatever the batch size.
        """
        items = torch.arange(1, self.cfg.num_items + 1, device=trigger.device)
        unit_c = self._unit(items, "candidate")  # (V, D)
        r_c = self._as_candidate(unit_c, items)
        # each distinct trigger is encoded and scored once (U <= B rows), its rows gathered back
        uniq, inverse = torch.unique(trigger, return_inverse=True)
        if self.cfg.neighbor_pointer:  # the neighbours' candidate rows are already in unit_c
            r_t = self._as_trigger(self._trigger_unit(uniq, unit_c))
        elif self.cfg.separate_encoders:
            r_t = self.encode(uniq, "trigger")
        else:  # the trigger rows are among the candidates: reuse them, then the trigger-side map
            r_t = self._as_trigger(unit_c[uniq - 1])
        # (U, V): column j is item j + 1. The matmul may run in bf16 under autocast; the softmax is
        # taken in fp32 (in bf16, log-sum-exp over the catalogue lost a percent of the gradient).
        logits = self.cfg.gamma * (r_t @ r_c.T).float()
        logits = logits.masked_fill(items[None, :] == uniq[:, None], float("-inf"))
        # cross-entropy of each (trigger, positive) row: log-sum-exp of its trigger's row - the positive's logit
        return (torch.logsumexp(logits, dim=1)[inverse] - logits[inverse, positive - 1]).mean()

    def _encode_unique(self, items: torch.Tensor, side: str, unit: bool = False) -> torch.Tensor:
        """Each distinct item encoded once, gathered back; ``unit``: the encoder's unit output,
        before the side's map (the shared encoder's one pass for both sides)."""
        uniq, inverse = torch.unique(items, return_inverse=True)
        return (self._unit(uniq, side) if unit else self.encode(uniq, side))[inverse]

    def _no_mlm(self) -> torch.Tensor:
        """A zero loss for a batch with nothing masked, still connected to the MLM head: DDP waits for
        a gradient of every trainable parameter, and failed on the next step without one."""
        return sum(p.sum() for p in self.mlm_head.parameters()).float() * 0.0

    def mlm_loss(self, items: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Mask neighbour tokens of the items' quasi-sequences and predict their ids (tied output)."""
        tokens, buckets, cats = self._inputs(items)
        maskable = tokens[:, 1:] != PAD  # (B, N): only real neighbours
        if not maskable.any() or self.cfg.mlm_prob == 0:
            return self._no_mlm()
        draw = torch.rand(maskable.shape, device=tokens.device, generator=generator)
        masked = maskable & (draw < self.cfg.mlm_prob)
        if not masked.any():
            return self._no_mlm()
        inp = tokens.clone()
        inp[:, 1:][masked] = self.mask_id
        if cats is not None:  # a masked token must not show its item's category (part of the label)
            cats = cats.clone()
            cats[:, 1:][masked] = 0
        _, h = self.trigger_encoder(inp, buckets, cats)
        states = self.mlm_head(h[:, 1:][masked])  # (M, D)
        targets = tokens[:, 1:][masked]  # (M,)
        return mlm_cross_entropy(states, targets, self.item_emb.weight[: self.cfg.num_items + 1],
                                 self.cfg.mlm_sampled, generator)


def mlm_cross_entropy(states: torch.Tensor, targets: torch.Tensor, out_weight: torch.Tensor,
                      num_sampled: Optional[int], generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Full softmax over items, or sampled softmax: targets + ``num_sampled`` uniform negatives."""
    if num_sampled is None:
        logits = (states @ out_weight.T).float()  # (M, V+1); the matmul may run in bf16, the softmax in fp32
        logits[:, PAD] = float("-inf")
        return F.cross_entropy(logits, targets)
    V = out_weight.shape[0] - 1
    neg = torch.randint(1, V + 1, (num_sampled,), device=states.device, generator=generator)
    cand = torch.cat([targets, neg])  # (M + S,)
    logits = (states @ out_weight[cand].T).float()  # (M, M + S)
    same = targets[:, None] == cand[None, :]
    eye = torch.zeros_like(same)
    eye[:, : len(targets)] = torch.eye(len(targets), dtype=torch.bool, device=states.device)
    logits = logits.masked_fill(same & ~eye, float("-inf"))  # accidental hits of the true id
    return F.cross_entropy(logits, torch.arange(len(targets), device=states.device))


def nce_loss(relevance: torch.Tensor, q: torch.Tensor, k: int, gamma: float,
             offset: torch.Tensor | float = 0.0) -> torch.Tensor:
    """NATM's NCE loss. relevance R (B, 1+k): column 0 the positive; q (B, 1+k) noise probabilities.

    p(y=1|s,s_c) = exp(γR - c) / (exp(γR - c) + k·q(s_c)); p(y=0|s,s_c) = k·q(s_c) / (exp(γR - c) + k·q(s_c))
    with the normaliser c = ``offset`` (0 = the paper's formula).
    Loss = -mean_b [ log p(y=1|s,s+) + Σ_negatives log p(y=0|s,s-) ], computed stably as softplus.
    """
    # log-odds of "data" vs "noise", in fp32 (R may come from bf16 matmuls under autocast, and a bf16
    # gamma*R - c quantised the learned offset's gradient)
    z = gamma * relevance.float() - offset - torch.log(k * q.float().clamp(min=1e-30))
    pos = F.softplus(-z[:, 0])  # -log sigmoid(z)
    neg = F.softplus(z[:, 1:]).sum(dim=1)  # -log (1 - sigmoid(z))
    return (pos + neg).mean()


def build_neighbor_table(num_items: int, item_idx: torch.Tensor, neighbor_idx: torch.Tensor, weight: torch.Tensor,
                         rank: torch.Tensor, n: int, buckets: int, categories: Optional[torch.Tensor] = None,
                         ) -> NeighborTable:
    """Dense (V+2, N) lookup from graph rows (item index, neighbour index, weight, rank 1..)."""
    nb = torch.zeros(num_items + 2, max(n, 0), dtype=torch.long)
    wb = torch.zeros_like(nb)
    if n > 0 and len(item_idx):
        keep = rank <= n
        i, j = item_idx[keep].long(), (rank[keep] - 1).long()
        nb[i, j] = neighbor_idx[keep].long()
        wb[i, j] = bucketize_weights(weight[keep].float(), buckets)
    cats = None
    if categories is not None:
        cats = torch.zeros(num_items + 2, dtype=torch.long)
        cats[: len(categories)] = categories.long()
    return NeighborTable(nb, wb, cats)
