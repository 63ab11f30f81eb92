"""The chunk loop of linear_ppo_policy_loss (see ppokernels/ops/linear_ppo_loss.py for the
algorithm and the exactness argument): an autograd Function whose forward makes the loss, the
metrics and the gradients of hidden, weight and bias, and whose backward scales them."""

from __future__ import annotations

import torch

from ppokernels._dtypes import acc_dtype
from ppokernels.ops.linear_logprobs import linear_logprobs
from ppokernels.ops.logprobs import token_logprobs
from ppokernels.ops.ppo_loss import ppo_policy_loss

PAD_LABEL = -1  # label of the zero rows that pad a chunk to a multiple of 16 (no work, no grad)
ROW_ALIGN = 16  # chunks are zero-padded to a multiple: MKL gives a row the same bits for any M


class _FusedHead(torch.autograd.Function):
    """``(hidden, weight, bias, plan) -> (loss, metrics[5])``; metrics = (clipfrac, approx_kl,
    dual_clipfrac, kl, entropy) of the whole batch (not differentiable)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, plan):
        need = (
            ctx.needs_input_grad[0],
            ctx.needs_input_grad[1],
            bias is not None and ctx.needs_input_grad[2],
        )
        head = _Head(hidden, weight, bias, plan, need)
        for seg in plan.segments():
            head.run(*seg)
        loss, metrics, grads = head.result()
        # kept as attributes, not saved tensors, so that backward can hand them over without
        # keeping a reference (autograd then stores them as .grad without a copy)
        ctx.grads = grads
        ctx.mark_non_differentiable(metrics)
        return loss, metrics

    @staticmethod
    def backward(ctx, g_loss, g_metrics):
        if ctx.grads is None:
            raise RuntimeError(
                "linear_ppo_policy_loss: the gradients made in the forward were handed to an "
                "earlier backward (upstream gradient 1); run the op again to backward again"
            )
        gh, gw, gb = ctx.grads
        # loss.backward() sends 1: hand out the stored gradients themselves, no [V, H] copy (the
        # check costs one host sync on CUDA, as Liger's); any other upstream value scales a copy
        one = bool(torch.equal(g_loss, torch.ones_like(g_loss)))
        if one:
            ctx.grads = None

        def scaled(g, i):
            if not ctx.needs_input_grad[i]:
                return None
            return g if one else g * g_loss.to(g.dtype)

        return scaled(gh, 0), scaled(gw, 1), scaled(gb, 2), None


class _Head:
    """State of one call: accumulated loss, metric sums and gradients."""

    def __init__(self, hidden, weight, bias, plan, need):
        self.plan, self.need = plan, need
        self.hidden, self.weight, self.bias = hidden, weight, bias
        B, T, H = hidden.shape
        V = weight.shape[0]
        self.acc = acc = acc_dtype(hidden)
        self.h = hidden.reshape(B * T, H)
        self.y = plan.y.reshape(-1)
        self.valid = plan.rows["mask"].reshape(-1)
        # CPU: the GEMMs in the accumulation dtype (a bf16 weight is cast once per call). CUDA:
        # cuBLAS in the input dtype with fp32 outputs (torch.mm out_dtype).
        self.half_gemm = hidden.is_cuda and hidden.dtype in (torch.float16, torch.bfloat16)
        self.w = weight if self.half_gemm else weight.to(acc)
        self.b = None if bias is None else bias.to(acc)
        opts = dict(dtype=acc, device=hidden.device)
        self.gh = torch.zeros(B * T, H, **opts) if need[0] else None
        self.gw = torch.zeros(V, H, **opts) if need[1] else None
        self.gb = torch.zeros(V, **opts) if need[2] else None
        self.loss = torch.zeros((), **opts)
        self.sums = torch.zeros(5, **opts)  # clipfrac, approx_kl, dual_clipfrac (x count), kl, ent
        self.zbuf = None

    # ------------------------------------------------------------------------ one chunk
    def run(self, r0, r1, t0, t1):
        plan, T = self.plan, self.plan.T
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
        with torch.enable_grad():
            z.requires_grad_(any(self.need))
            lp, ent = token_logprobs(z, yc, temperature=plan.temperature,
                                     with_entropy=plan.ent_on, ignore_index=PAD_LABEL,
                                     inplace_backward=True, backend=plan.backend)  # fmt: skip
            out, scale = self._score(r0, r1, t0, idx, lp[:cnt], None if ent is None else ent[:cnt])
            loss = out.loss * scale
            dz = torch.autograd.grad(loss, z)[0] if any(self.need) else None
        self._add(out, loss, scale, cnt)
        if dz is None:
            return
        if self.need[0]:
            self.gh.index_copy_(0, idx, self._mm(dz, self.w)[:cnt])
        if self.need[1]:
            self._add_mm(self.gw, dz.t(), hc)
        if self.need[2]:
            self.gb.add_(dz.sum(0))

    def _logits(self, hc, rp):
        """``hc @ W^T + b`` into a reused fp32 buffer (no page faults per chunk)."""
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
        return z.detach()

    def _add_mm(self, out, a, b):
        """``out += a @ b`` (addmm_: no [V, H] temporary, one pass over out)."""
        if self.half_gemm:
            out.add_(self._mm(a, b))
        else:
            out.addmm_(a, b)

    def _mm(self, a, b):
        if self.half_gemm:  # dlogits rounded to the input dtype for cuBLAS, fp32 accumulation
            return torch.mm(a.to(b.dtype), b.to(a.dtype) if b.dtype == self.acc else b,
                            out_dtype=self.acc)  # fmt: skip
        return torch.mm(a, b)

    def _score(self, r0, r1, t0, idx, lp, ent):
        """The chunk's share of the loss: ``(ppo_policy_loss output, scale)``."""
        plan, T = self.plan, self.plan.T
        rows = plan.row_slice(r0, r1)
        if t0 is None:  # whole rows: the real aggregation with the global normalisers
            k = r1 - r0
            local = idx - r0 * T

            def place(v):
                return v.new_zeros(k * T).index_copy(0, local, v).view(k, T)

            kw = dict(agg=plan.agg, num_tokens=plan.num_tokens, num_seqs=plan.num_seqs)
            scale = 1.0
        else:  # a segment of one long row: a token sum times the row's aggregation weight
            local = idx - r0 * T

            def place(v):
                return v.view(1, -1)

            rows = {k: _take(v, local) for k, v in rows.items()}
            kw = dict(agg="token-sum")
            scale = plan.row_weight(r0)
        options = {k: v for k, v in plan.options.items() if k != "agg"}
        out = ppo_policy_loss(place(lp), **rows, entropy=None if ent is None else place(ent),
                              **options, **kw, backend=plan.backend)  # fmt: skip
        return out, scale

    def _add(self, out, loss, scale, cnt):
        self.loss += loss.detach()
        s = self.sums
        s[0] += out.clipfrac * cnt
        s[1] += out.approx_kl * cnt
        s[2] += out.dual_clipfrac * cnt
        if out.kl is not None:
            s[3] += out.kl * scale
        if out.entropy is not None:
            s[4] += out.entropy * scale

    def _unfused_row(self, r, idx):
        """A sequence-mode row longer than a chunk: linear_logprobs (which recomputes the logits
        in its backward) and ppo_policy_loss on the whole row, gradients by autograd."""
        plan = self.plan
        with torch.enable_grad():
            hs = self.h[idx].detach().requires_grad_(self.need[0])
            w = self.weight.detach().requires_grad_(self.need[1])
            b = None if self.bias is None else self.bias.detach().requires_grad_(self.need[2])
            lp, ent = linear_logprobs(hs, w, self.y[idx], bias=b, temperature=plan.temperature,
                                      with_entropy=plan.ent_on, backend=plan.backend)  # fmt: skip
            out, scale = self._score(r, r + 1, None, idx, lp, ent)
            wrt = [t for t, n in zip((hs, w, b), self.need, strict=True) if n]
            grads = list(torch.autograd.grad(out.loss, wrt)) if wrt else []
        self._add(out, out.loss, scale, idx.numel())
        if self.need[0]:
            self.gh.index_copy_(0, idx, grads.pop(0).to(self.acc))
        if self.need[1]:
            self.gw.add_(grads.pop(0).to(self.acc))
        if self.need[2]:
            self.gb.add_(grads.pop(0).to(self.acc))

    # ------------------------------------------------------------------------ the result
    def result(self):
        n = self.plan.total
        s = self.sums
        if n > 0:
            s[:3] /= n
        opts = self.options_dtype()
        gh = self.gh.view_as(self.hidden).to(self.hidden.dtype) if self.need[0] else opts
        gw = self.gw.to(self.weight.dtype) if self.need[1] else opts
        gb = self.gb.to(self.bias.dtype) if self.need[2] else opts
        return self.loss, s, (gh, gw, gb)

    def options_dtype(self):
        return torch.empty(0, dtype=self.acc, device=self.h.device)


def _take(v, local):
    """A row tensor's entries at the segment's positions, as [1, n] (a [1] per-row value as is)."""
    if v is None or v.dim() == 1:
        return v
    return v.reshape(-1)[local].view(1, -1)
