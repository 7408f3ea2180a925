"""The served graph with fewer ONNX Runtime kernels: PSAD's UPN + student rewritten for inference.

FusedScorer computes the function of PSAD.serving_module() (the parity gate compares the two) in
fewer, larger operations. ONNX Runtime's own fusions (and its transformer optimizer) find nothing
more in the plain graph: its attention is not the pattern they match (age decay, an always-visible
slot). Each rewrite is exact algebra on the trained weights, folded once at export:

- user: the base vector folded into the first categorical's rows, standardisation into the
  projections; the user vector stays [B,1,d], so it broadcasts against candidates without reshapes;
- memory: the history's item vectors get one zero slot in front (which a layer norm maps to its
  bias) and its actions one extra row of the action table (no_history minus that bias), so the
  always-visible no-history slot is one pad, not a vector expanded and concatenated;
- attention without head reshapes: each head's query is projected into the full width with the
  other heads' dimensions zero (the softmax scale and the gate's factor 2 folded in), plus two
  dimensions, 1 and -softplus(decay), which meet the keys' padding bias and log-age: one MatMul
  gives the masked, age-decayed logits of every head. The out projection is folded into per-head
  values, so the read-out is two MatMuls and a sum over heads;
- both gates in one projection; the student's masked mean as a MatMul, its output layer a vector.

- items: an "id" model gathers from its item table; a "sid" model gathers from the sum of every
  code combination (TokenTable, rebuilt from the codebooks when ONNX Runtime loads the graph) while
  K^L <= MAX_TABLE_ROWS, and beyond that decodes each token in float64 arithmetic (a handful of
  kernels where the integer floor division of the plain graph takes a dozen) and sums one codebook
  vector per level (TokenDecode).

Only PSAD has a fused form (baselines export their own serving module).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from export.contract.bundle import MAX_TABLE_ROWS
from export.contract.schema import N_RESERVED, OOV, ModelInputs
from training.models.embeddings import MASKED_LOGIT, TableLookup
from training.models.psad import PSAD
from training.models.sid import TokenLookup
from training.models.student import PAD_SCORE
from training.models.upn import TimeAwareAttention


def fused_serving_module(model: nn.Module) -> nn.Module:
    """FusedScorer for a PSAD model, the model's own serving module otherwise (both in eval mode)."""
    if isinstance(model, PSAD):
        return FusedScorer(model).eval()
    return model.serving_module().eval()  # type: ignore[operator]


def _const(t: torch.Tensor | nn.Module) -> torch.Tensor:
    """A float32 copy of a trained tensor (a parameter or a buffer) to fold into the graph."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"expected a tensor to fold, got {type(t).__name__}")
    return t.detach().clone().float()


def _layer_norm(norm: nn.LayerNorm, scale: float = 1.0) -> nn.LayerNorm:
    """A copy of `norm` whose output is `scale` times the original's."""
    copy = nn.LayerNorm(norm.normalized_shape, eps=norm.eps)
    copy.weight.copy_(norm.weight * scale)
    copy.bias.copy_(norm.bias * scale)
    return copy


class FusedRead(nn.Module):
    """One TimeAwareAttention with its heads laid side by side on the key axis.

    Key block k holds the history's keys with every dimension outside head k zeroed, so one
    query row meets each head's keys in its own block: q @ keys^T gives all heads' logits at once
    without splitting the query into heads. Two more dimensions carry the padding bias and the
    head's decay times log-age. Value block k is head k's values already through the out
    projection, so weights @ values sums the heads' read-outs in the MatMul's contraction.
    """

    q_weight: torch.Tensor
    q_bias: torch.Tensor
    key_scale: torch.Tensor
    v_weight: torch.Tensor
    out_bias: torch.Tensor

    def __init__(self, attn: TimeAwareAttention, query_scale: float):
        super().__init__()
        h = attn.n_heads
        d = attn.q.weight.shape[0]
        dh = d // h
        self.n_heads = h
        w_o = _const(attn.out.weight)
        key_scale = torch.zeros(h, 1, d + 2)
        v_weight = torch.zeros(h, d, d)
        for k in range(h):
            dims = slice(k * dh, (k + 1) * dh)
            key_scale[k, 0, dims] = 1.0
            v_weight[k, dims] = w_o[:, dims].T  # head k's values straight into the output space
        key_scale[:, 0, d] = 1.0  # the padding bias, as is
        key_scale[:, 0, d + 1] = -F.softplus(_const(attn.decay))  # log-age times the head's decay
        q_weight = torch.cat([_const(attn.q.weight).T * attn.scale / query_scale, torch.zeros(d, 2)], dim=1)
        self.register_buffer("q_weight", q_weight)  # [d, d+2]
        self.register_buffer("q_bias", torch.cat([_const(attn.q.bias) * attn.scale, torch.ones(2)]))
        self.register_buffer("key_scale", key_scale)
        self.register_buffer("v_weight", v_weight)
        self.register_buffer("out_bias", _const(attn.out.bias))

    def memory(self, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """keys [B,H+1,d+2] (padding bias and log-age last), values [B,H+1,d] -> this read's key and
        value blocks [B,h(H+1),d+2] and [B,h(H+1),d]."""
        blocks = (keys[:, None] * self.key_scale).flatten(1, 2)
        return blocks, (values[:, None] @ self.v_weight).flatten(1, 2)

    def forward(self, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """query [B,Q,d], key and value blocks from memory() -> [B,Q,d]."""
        logits = (query @ self.q_weight + self.q_bias) @ keys.transpose(1, 2)  # [B,Q,h(H+1)]
        weights = F.softmax(logits.unflatten(-1, (self.n_heads, -1)), dim=-1).flatten(-2)
        return weights @ values + self.out_bias


FLOAT64_EXACT = 2**53  # integers below this are exact in float64, and so is floor(n / K^j)


def _token_decode(lookup: nn.Module) -> nn.Module:
    """TokenTable for few code combinations, TokenDecode where float64 holds every token number
    exactly, the lookup itself otherwise."""
    if not isinstance(lookup, TokenLookup):
        raise TypeError(f"a sid model's served lookup is a TokenLookup, got {type(lookup).__name__}")
    combinations = lookup.codebook_size ** _const(lookup.offsets).numel()
    if combinations <= MAX_TABLE_ROWS:
        return TokenTable(lookup)
    return TokenDecode(lookup) if combinations <= FLOAT64_EXACT else lookup


class TokenTable(nn.Module):
    """Served sid tokens -> code sums in ONE gather, as the id graph reads its item table: the sum of
    every code combination, row = token (row 0 padding, row 1 OOV's codes; K^L rows after them, 4 MB
    at the defaults). The exporter replaces the table by its construction from the codebooks
    (exporter.name_codebooks), so the file holds the codebooks only and ONNX Runtime folds the
    construction into the table when it loads the graph."""

    table: torch.Tensor

    def __init__(self, lookup: TokenLookup):
        super().__init__()
        levels = _const(lookup.offsets).numel()
        tokens = torch.arange(N_RESERVED + lookup.codebook_size**levels)
        self.register_buffer("table", lookup(tokens))  # the lookup's own decoding: one source of truth

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return F.embedding(tokens, self.table)


class TokenDecode(nn.Module):
    """Served sid tokens -> code sums [..., d], as the sid lookup (sid.TokenLookup) reads them, in
    fewer kernels: OOV becomes the token of the missing-content codes, and each level's code is
    floor(number / K^(L-1-l)) mod K in float64 (exact below FLOAT64_EXACT). Padding (token 0) reads
    as some codes, not zeros: every padded slot is masked out, and the no-history slot is padded
    after the lookup."""

    flat: torch.Tensor
    divisors: torch.Tensor
    offsets: torch.Tensor
    oov_token: torch.Tensor

    def __init__(self, lookup: TokenLookup):
        super().__init__()
        radix = _const(lookup.radix).long()
        self.codebook_size = lookup.codebook_size
        self.register_buffer("flat", _const(lookup.flat))  # [L*K, d], level l's codes at rows l*K..
        self.register_buffer("divisors", radix.double())
        self.register_buffer("offsets", _const(lookup.offsets).long())
        self.register_buffer("oov_token", N_RESERVED + (_const(lookup.oov_codes).long() * radix).sum())

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        number = torch.where(tokens == OOV, self.oov_token, tokens) - N_RESERVED
        codes = torch.floor(number[..., None].double() / self.divisors).long() % self.codebook_size
        vectors = F.embedding(codes + self.offsets, self.flat)  # [..., L, d]
        total = vectors[..., 0, :]
        for level in range(1, vectors.shape[-2]):  # added level by level: ONNX Runtime's ReduceSum over
            total = total + vectors[..., level, :]  # a middle axis is slower than L - 1 Adds here
        return total


class FusedScorer(nn.Module):
    """PSAD's UPN + student as one lean graph: the model inputs, positionally -> scores [B,L]."""

    user_base: torch.Tensor
    user_cats: torch.Tensor | None
    user_offsets: torch.Tensor
    positions: torch.Tensor | None
    action_table: torch.Tensor
    kv_weight: torch.Tensor
    kv_bias: torch.Tensor
    gates_weight: torch.Tensor
    gates_bias: torch.Tensor
    student_w_x: torch.Tensor
    student_w_xu: torch.Tensor
    student_list: torch.Tensor
    student_bias: torch.Tensor
    student_out: torch.Tensor
    student_out_bias: torch.Tensor

    def __init__(self, model: PSAD):
        super().__init__()
        upn, student, cfg = model.upn, model.student, model.cfg
        items, user = upn.items, upn.user
        self.use_upn = cfg.use_upn
        gate_scale = 2.0 if cfg.use_upn else 1.0  # 2 sigmoid(.) of the gates, folded into what they scale
        with torch.no_grad():
            self.items = TableLookup(items.table()) if items.sid is None else _token_decode(items.served())
            self.item_norm = _layer_norm(items.norm, gate_scale)
            self.history_norm = _layer_norm(items.norm)
            self.cand_num = _folded_standardisation(
                items.cand_num_proj, _const(items.cand_num_mean), _const(items.cand_num_std)
            )
            # user: base folded into the first categorical's rows
            self.user_norm_in = _layer_norm(user.norm)
            self.register_buffer("user_base", _const(user.base))
            offsets = _const(user.cat_offsets).long()
            cats = None
            if user.cats is not None:
                cats = _const(user.cats.weight)
                first = int(offsets[1]) if len(offsets) > 1 else len(cats)
                cats[:first] += self.user_base
            self.register_buffer("user_cats", cats)
            self.register_buffer("user_offsets", offsets)
            self.user_num = _folded_standardisation(
                user.num_proj, _const(user.user_num_mean), _const(user.user_num_std)
            )
            positions = upn.positions
            self.register_buffer("positions", None if positions is None else _const(positions.weight) * gate_scale)
            self.max_list = upn.max_list
            if cfg.use_upn:
                self.n_actions = upn.actions.weight.shape[0]
                no_history = _const(upn.no_history) - self.history_norm.bias  # LN(zero row) = its bias
                self.register_buffer("action_table", torch.cat([_const(upn.actions.weight), no_history[None]]))
                self.register_buffer("kv_weight", _const(upn.memory_kv.weight).T)
                self.register_buffer("kv_bias", _const(upn.memory_kv.bias))
                self.user_read = FusedRead(upn.user_read, query_scale=1.0)
                self.cand_read = FusedRead(upn.cand_read, query_scale=gate_scale)
                self.user_norm_out = _layer_norm(upn.user_norm)
                gates = (upn.gate, upn.position_gate)  # one projection for both
                self.register_buffer("gates_weight", torch.cat([_const(g.weight) for g in gates]).T)
                self.register_buffer("gates_bias", torch.cat([_const(g.bias) for g in gates]))
            self.match = upn.match
            self.final_norm = _layer_norm(upn.norm)
            w_x, w_xu = _const(student.item_in.weight).chunk(2, dim=1)
            self.register_buffer("student_w_x", w_x)
            self.register_buffer("student_w_xu", w_xu)
            self.register_buffer("student_list", _const(student.list_in.weight).T)
            self.register_buffer("student_bias", _const(student.item_in.bias))
            linear_out = student.out[-1]
            assert isinstance(linear_out, nn.Linear)
            self.register_buffer("student_out", _const(linear_out.weight).T)  # [hidden, 1]: a matrix, not a vector
            self.register_buffer("student_out_bias", _const(linear_out.bias))

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
        inputs = ModelInputs(*tensors)
        u = self._user(inputs.user_cat, inputs.user_num)  # [B,1,d]
        x, history = self._items(inputs)
        if self.cand_num is not None:
            x = x + self.cand_num(inputs.cand_num)
        x = self.item_norm(x)  # times 2 when a gate follows
        position_scale: torch.Tensor | float = 1.0
        if self.use_upn:
            assert history is not None
            keys, values = self._memory(inputs, history)
            u = u + self.user_read(u, *self.user_read.memory(keys, values))
            u = self.user_norm_out(u)
            gate, position_scale = torch.sigmoid(u @ self.gates_weight + self.gates_bias).chunk(2, dim=-1)
            x = x * gate + self.cand_read(x, *self.cand_read.memory(keys, values))
            if self.match is not None:
                x = x + self.match(inputs)
        if self.positions is not None:
            index = torch.arange(inputs.cand_items.shape[1], device=x.device).clamp(max=self.max_list - 1)
            x = x + self.positions[index] * position_scale
        x = self.final_norm(x)
        return self._student(x, u, inputs.cand_mask)

    def _user(self, user_cat: torch.Tensor, user_num: torch.Tensor) -> torch.Tensor:
        if self.user_cats is not None:
            u = F.embedding(user_cat + self.user_offsets, self.user_cats).sum(1, keepdim=True)
        else:
            u = self.user_base.expand(user_cat.shape[0], 1, -1)
        if self.user_num is not None:
            u = u + self.user_num(user_num)[:, None]
        return self.user_norm_in(u)

    def _items(self, inputs: ModelInputs[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Item vectors of the candidates [B,L,d] and, with UPN, of the history [B,H,d]: for sid
        decoded in one pass (a decode is a dozen kernels, a gather one)."""
        if not self.use_upn:
            return self.items(inputs.cand_items), None
        if isinstance(self.items, TableLookup):
            return self.items(inputs.cand_items), self.items(inputs.hist_items)
        length = inputs.cand_items.shape[1]
        both = self.items(torch.cat([inputs.cand_items, inputs.hist_items], dim=1))
        return both[:, :length], both[:, length:]

    def _memory(self, inputs: ModelInputs[torch.Tensor], history: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys [B,H+1,d+2] (the padding bias and log-age as two more dimensions) and values [B,H+1,d]
        of the history (its item vectors [B,H,d]), slot 0 the no-history slot."""
        actions = F.pad(inputs.hist_actions, (1, 0), value=self.n_actions)
        slots = self.history_norm(F.pad(history, (0, 0, 1, 0)))
        slots = slots + F.embedding(actions, self.action_table)
        keys, values = (slots @ self.kv_weight + self.kv_bias).chunk(2, dim=-1)
        bias = torch.stack(
            [torch.where(inputs.hist_mask, 0.0, MASKED_LOGIT), torch.log1p(inputs.hist_age.clamp(min=0.0))], dim=-1
        )
        return torch.cat([keys, F.pad(bias, (0, 0, 1, 0))], dim=-1), values  # no-history slot: visible, age 0

    def _student(self, x: torch.Tensor, u: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        weight = mask.to(x.dtype)
        weight = (weight / weight.sum(1, keepdim=True).clamp(min=1.0))[:, None]  # [B,1,L]
        context = weight @ x  # [B,1,d]: the masked mean
        per_list = torch.cat([u, context], dim=-1) @ self.student_list + self.student_bias  # [B,1,hidden]
        per_user = self.student_w_x + self.student_w_xu * u  # [B,hidden,d]
        hidden = torch.relu(x @ per_user.transpose(1, 2) + per_list)
        return (hidden @ self.student_out + self.student_out_bias).squeeze(-1).masked_fill(~mask, PAD_SCORE)


class Affine(nn.Module):
    """v @ weight + bias, with constant weights."""

    weight: torch.Tensor
    bias: torch.Tensor

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor):
        super().__init__()
        self.register_buffer("weight", weight)
        self.register_buffer("bias", bias)

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        return v @ self.weight + self.bias


def _folded_standardisation(proj: nn.Linear | None, mean: torch.Tensor, std: torch.Tensor) -> Affine | None:
    """proj((v - mean) / std) as one affine map of v, or None without proj."""
    if proj is None:
        return None
    weight = _const(proj.weight) / std
    return Affine(weight.T.contiguous(), _const(proj.bias) - weight @ mean)
