"""The chunk loop of linear_ppo_policy_loss (the algorithm and why a chunk's share of the loss is
exact: ppokernels/ops/linear_ppo_policy_loss.py). It is the implementation of the registered op
``ppokernels::linear_ppo_policy_loss`` and runs below autograd, so every step calls the forward
and backward kernel ops of token_logprobs, ppo_policy_loss and linear_logprobs explicitly:

    z = h_c W^T + b                 GEMM 1 (fp32 [R, V] buffer, reused)
    lp, ent, lse = token_logprobs   fused row pass
    loss_c = ppo_policy_loss        the chunk's share; its backward gives g_lp, g_ent
    token_logprobs_backward_        dz written over z
    grad_h[c] = dz W                GEMM 2
    grad_W += dz^T h_c              GEMM 3 (addmm_, one pass over grad_W per chunk)
"""

from __future__ import annotations

import torch

from ppokernels._dtypes import acc_dtype
from ppokernels.losses import LOSS_SPECS
from ppokernels.ops._register import kernel, op
from ppokernels.ops.linear_logprobs import CACHE_BYTES, default_chunk_size
from ppokernels.ops.ppo_policy_loss import PolicyOptions

PAD_LABEL = -1  # label of the zero rows that pad a chunk (no work, no gradient)
ROW_ALIGN = 16  # chunks are zero-padded to a multiple: MKL gives a row the same bits for any M


class Plan:
    """The chunks of one call. ``segments()`` yields ``(row0, row1, tok0, tok1)``: rows
    [row0, row1) whole when ``tok0 is None``; tokens [tok0, tok1) of row row0's valid tokens (a
    row longer than a chunk, token modes); ``tok1 is None``: row row0 by the unfused path (a long
    row of a sequence mode)."""

    def __init__(self, valid, R, agg, num_tokens, num_seqs, loss_mode):
        B, T = valid.shape
        self.B, self.T, self.R, self.agg = B, T, R, agg
        self.counts = valid.sum(1).tolist()
        self.total = sum(self.counts)
        self.num_tokens = num_tokens if num_tokens is not None else float(max(self.total, 1))
        self.num_seqs = num_seqs if num_seqs is not None else float(max(B, 1))
        # a token's gradient depends on its whole row
        self.sequence_mode = LOSS_SPECS[loss_mode].row_level

    def row_weight(self, r: int) -> float:
        """The aggregation weight of every token of row r (the segment path's scale)."""
        if self.agg == "token-mean":
            return 1.0 / self.num_tokens
        if self.agg == "token-sum":
            return 1.0
        if self.agg == "seq-mean-token-mean":
            return 1.0 / (self.counts[r] * self.num_seqs)
        if self.agg == "seq-mean-token-sum":
            return 1.0 / self.num_seqs
        return 1.0 / (self.num_seqs * max(self.T, 1))  # seq-mean-token-sum-norm

    def segments(self):
        r, R = 0, self.R
        while r < self.B:
            if self.counts[r] > R:  # a long row: segments, or the unfused path
                if self.sequence_mode:
                    yield r, r + 1, 0, None
                else:
                    for t0 in range(0, self.counts[r], R):
                        yield r, r + 1, t0, min(t0 + R, self.counts[r])
                r += 1
                continue
            r1, n = r, 0
            while r1 < self.B and self.counts[r1] <= R and n + self.counts[r1] <= R:
                n += self.counts[r1]
                r1 += 1
            yield r, r1, None, None
            r = r1


class Head:
    """One call's state: the loss, metric sums and gradients accumulated chunk by chunk.

    ``rows``: the [B, T] (or [B]) per-row tensors old_logprobs, advantages, mask (the valid
    tokens), ref_logprobs, is_weights. ``options``: ppo_policy_loss's op scalars
    (ppokernels/ops/ppo_policy_loss.py PolicyOptions). ``kernels``: the backends ("cpp" or
    "triton") of
    token_logprobs, ppo_policy_loss and linear_logprobs."""

    def __init__(
        self, hidden, weight, labels, bias, rows, temperature, ent_on, R, kernels, options, need
    ):
        B, T, H = hidden.shape
        V = weight.shape[0]
        self.need, self.rows, self.temperature, self.ent_on = need, rows, temperature, ent_on
        self.options = PolicyOptions(*options)
        b_tok, b_loss, b_lin = kernels
        self.tok_fwd = kernel("token_logprobs", b_tok)
        # the in-place backward: the forward op's backward name + "_"
        # (ppokernels/ops/token_logprobs.py)
        self.tok_bwd_ = op("ppokernels::" + kernel("token_logprobs_backward", b_tok).__name__ + "_")
        self.loss_fwd = kernel("ppo_policy_loss", b_loss)
        self.loss_bwd = kernel("ppo_policy_loss_backward", b_loss)
        self.b_lin = b_lin
        self.hidden, self.weight, self.bias = hidden, weight, bias
        self.acc = acc = acc_dtype(hidden)
        self.h, self.y = hidden.reshape(B * T, H), labels.reshape(-1)
        self.valid = rows["mask"].reshape(-1)
        # CPU: GEMMs in the accumulation dtype (a bf16 weight is cast once per call). CUDA half:
        # cuBLAS in the input dtype with fp32 outputs (mm out_dtype).
        self.half_gemm = hidden.is_cuda and hidden.dtype in (torch.float16, torch.bfloat16)
        self.w = weight if self.half_gemm else weight.to(acc)
        self.b = None if bias is None else bias.to(acc)
        opts = dict(dtype=acc, device=hidden.device)
        self.gh = torch.zeros(B * T, H, **opts) if need[0] else None
        self.gw = torch.zeros(V, H, **opts) if need[1] else None
        self.gb = torch.zeros(V, **opts) if need[2] else None
        self.loss = torch.zeros((), **opts)
        self.sums = torch.zeros(5, **opts)  # clipfrac, approx_kl, dual_clipfrac (x count), kl, ent
        o = self.options
        self.plan = Plan(rows["mask"], R, o.agg, o.num_tokens, o.num_seqs, o.loss_mode)
        self.zbuf = None

    def run(self):
        for seg in self.plan.segments():
            self._chunk(*seg)
        return self._result()

    # ------------------------------------------------------------------------ one chunk
    def _chunk(self, r0, r1, t0, t1):
        T = self.plan.T
        idx = self.valid[r0 * T : r1 * T].nonzero().squeeze(1) + r0 * T
        if t0 is not None and t1 is not None:
            idx = idx[t0:t1]
        if idx.numel() == 0:
            return
        if t0 is not None and t1 is None:
            return self._unfused_row(r0, idx)
        cnt = idx.numel()
        rp = -(-cnt // ROW_ALIGN) * ROW_ALIGN
        hc = self.h.new_zeros(rp, self.h.shape[1], dtype=self.w.dtype)
        hc[:cnt] = self.h[idx]
        yc = self.y.new_full((rp,), PAD_LABEL)
        yc[:cnt] = self.y[idx]
        z = self._logits(hc, rp)
        lp, ent, lse = self.tok_fwd(z, yc, self.temperature, self.ent_on, PAD_LABEL, True)
        g = self._score(r0, r1, t0, idx, lp[:cnt], ent[:cnt] if self.ent_on else None)
        if g is None:
            return
        g_lp, g_ent = (torch.cat([x, x.new_zeros(rp - cnt)]) if x is not None else None for x in g)
        self.tok_bwd_(
            g_lp, g_ent, z, yc, lse, ent if self.ent_on else None, self.temperature, PAD_LABEL
        )  # z now holds dz
        if self.need[0]:
            self.gh.index_copy_(0, idx, self._mm(z, self.w)[:cnt])
        if self.need[1]:
            if self.half_gemm:
                self.gw.add_(self._mm(z.t(), hc))
            else:
                self.gw.addmm_(z.t(), hc)
        if self.need[2]:
            self.gb.add_(z.sum(0))

    def _logits(self, hc, rp):
        """``hc @ W^T + b`` into the reused fp32 buffer (no page faults per chunk)."""
        V = self.w.shape[0]
        if self.zbuf is None or self.zbuf.numel() < rp * V:
            self.zbuf = torch.empty(rp * V, dtype=self.acc, device=hc.device)
        z = self.zbuf[: rp * V].view(rp, V)
        if self.half_gemm:
            z.copy_(torch.mm(hc, self.w.t(), out_dtype=self.acc))
        else:
            torch.mm(hc, self.w.t(), out=z)
        if self.b is not None:
            z.add_(self.b)
        return z

    def _mm(self, a, b):
        if self.half_gemm:  # dlogits rounded to the input dtype for cuBLAS, fp32 accumulation
            return torch.mm(a.to(self.weight.dtype), b.to(self.weight.dtype), out_dtype=self.acc)
        return torch.mm(a, b)

    def _score(self, r0, r1, t0, idx, lp, ent):
        """Adds the chunk's share of the loss and metrics; returns the gradients (g_lp, g_ent) of
        that share at the chunk's tokens, or None when no gradient is needed."""
        plan, T = self.plan, self.plan.T
        local = idx - r0 * T
        rows = {k: (None if v is None else v[r0:r1]) for k, v in self.rows.items()}
        if t0 is None:  # whole rows: the real aggregation with the global normalisers
            k = r1 - r0

            def place(v):
                return v.new_zeros(k * T).index_copy(0, local, v).view(k, T)

            def take(v):
                return v.reshape(-1)[local]

            opts = self.options._replace(num_tokens=plan.num_tokens, num_seqs=plan.num_seqs)
            scale = 1.0
        else:  # a segment of one long row: a token sum times the row's aggregation weight

            def place(v):
                return v.view(1, -1)

            def take(v):
                return v.reshape(-1)

            rows = {k: _segment(v, local) for k, v in rows.items()}
            opts = self.options._replace(agg="token-sum", num_tokens=None, num_seqs=None)
            scale = plan.row_weight(r0)
        ent = None if ent is None else place(ent)
        tensors = [
            place(lp),
            rows["old_logprobs"],
            rows["advantages"],
            rows["mask"],
            rows["ref_logprobs"],
            ent,
            rows["is_weights"],
        ]
        loss, metrics, row_stats = self.loss_fwd(*tensors, *opts)
        self.loss += loss * scale
        w = metrics.new_tensor([idx.numel()] * 3 + [scale] * 2)
        self.sums += metrics * w
        if not any(self.need):
            return None
        grad = loss.new_tensor(scale)
        g_lp, _, g_ent = self.loss_bwd(
            grad,
            *tensors,
            row_stats,
            opts.loss_mode,
            opts.loss_params,
            opts.logratio_clamp,
            opts.kl_coef,
            opts.kl_estimator,
            opts.kl_clamp,
            opts.entropy_coef,
        )
        return take(g_lp), (take(g_ent) if ent is not None else None)

    def _unfused_row(self, r, idx):
        """A sequence-mode row longer than a chunk: linear_logprobs forward (one GEMM) and, with
        the loss's gradients, its backward (which reuses the logits that fit linear_logprobs'
        cache budget and recomputes the rest): three to four GEMMs."""
        fwd = kernel("linear_logprobs", self.b_lin)
        bwd = kernel("linear_logprobs_backward", self.b_lin)
        hs, y = self.h[idx], self.y[idx]
        chunk = default_chunk_size(hs.shape[0], self.weight.shape[0], hs.device)
        args = (self.temperature, -100, 0, chunk)
        cache_bytes = CACHE_BYTES if any(self.need) else 0
        zy, lse, ent, cache = fwd(hs, self.weight, y, self.bias, *args, cache_bytes)
        g = self._score(r, r + 1, None, idx, zy - lse, ent if self.ent_on else None)
        if g is None:
            return
        g_lp, g_ent = g
        g_ent = torch.zeros_like(g_lp) if g_ent is None else g_ent
        mask = list(self.need)
        gh, gw, gb = bwd(
            g_lp, -g_lp, g_ent, hs, self.weight, y, self.bias, lse, ent, cache, *args, mask
        )
        if self.need[0]:
            self.gh.index_copy_(0, idx, gh.to(self.acc))
        if self.need[1]:
            self.gw.add_(gw.to(self.acc))
        if self.need[2]:
            self.gb.add_(gb.to(self.acc))

    # ------------------------------------------------------------------------ the result
    def _result(self):
        s = self.sums
        if self.plan.total > 0:
            s[:3] /= self.plan.total

        def empty():  # one per slot: a custom op's outputs may not alias each other
            return self.h.new_empty(0, dtype=self.acc)

        gh = self.gh.view_as(self.hidden).to(self.hidden.dtype) if self.need[0] else empty()
        gw = self.gw.to(self.weight.dtype) if self.need[1] else empty()
        gb = self.gb.to(self.bias.dtype) if self.need[2] else empty()
        return self.loss, s, gh, gw, gb


def _segment(v, local):
    """A row tensor's entries at a segment's positions, as [1, n] (a [1] per-row value as is)."""
    if v is None or v.dim() == 1:
        return v
    return v.reshape(-1)[local].view(1, -1)
