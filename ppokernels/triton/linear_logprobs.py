"""Triton ops of the linear_logprobs family (host side): ``ppokernels::linear_logprobs_triton``
and its backward, launching the kernels of :mod:`ppokernels.triton._linear_logprobs_kernels`
(algorithm described there), and their ahead-of-time compile specs.
"""

from __future__ import annotations

import torch
import triton
from torch.library import triton_op

from ppokernels._backend import interpreting
from ppokernels._dtypes import acc_dtype
from ppokernels.triton._common import aot_table, dtype_name, launch
from ppokernels.triton._linear_logprobs_kernels import (
    CONFIGS,
    _linear_logprobs_dz_cached_kernel,
    _linear_logprobs_dz_kernel,
    _linear_logprobs_fwd_kernel,
    _linear_logprobs_grad_hidden_kernel,
    _linear_logprobs_grad_weight_kernel,
)

# The constexprs each kernel role takes from its dtype's CONFIGS entry.
_TILES = {
    "logits": ("BLOCK_N", "BLOCK_V", "BLOCK_K", "IEEE"),
    "grad": ("BLOCK_N", "BLOCK_V", "BLOCK_H", "IEEE"),
    "cached": ("BLOCK_N", "BLOCK_V"),
}


def _config(dt: str, role: str) -> dict:
    """Launch options of a ``role`` kernel for input dtype ``dt``: tiles, IEEE, warps, stages."""
    cfg = CONFIGS[dt][role]
    return {k: cfg[k] for k in (*_TILES[role], "num_warps", "num_stages")}


def _launch(kernel, grid, args, dtype, role, **constexprs):
    """Launches ``kernel`` with the launch options of (``dtype``, ``role``) and ``constexprs``."""
    launch(kernel)[grid](*args, **_config(dtype_name(dtype), role), **constexprs)


_ACC_BYTES = {torch.float32: 4, torch.float64: 8}


def _compact(hidden, weight, labels, bias, ignore_index, vocab_start):
    """Valid rows (one device sync), their hidden states and shard-local labels."""
    rows = torch.nonzero(labels != ignore_index).squeeze(1)
    acc = acc_dtype(hidden)
    b = bias.to(acc).contiguous() if bias is not None else hidden.new_empty(0, dtype=acc)
    h, w = hidden[rows].contiguous(), weight.contiguous()
    if interpreting() and h.dtype in (torch.bfloat16, torch.float16):
        # the interpreter's tl.dot gives garbage for 16-bit floats (numpy has no bfloat16):
        # run the same kernels on the upcast values there
        h, w = h.float(), w.float()
    return rows, h, w, (labels[rows] - vocab_start), b


@triton_op("ppokernels::linear_logprobs_triton", mutates_args=())
def linear_logprobs_triton(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None,
    temperature: float,
    ignore_index: int,
    vocab_start: int,
    chunk_size: int,
    cache_bytes: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (label_logit, lse, entropy, logits cache): the cache is the raw logits of the
    first valid rows, [n_cache, V] flattened, as many rows as fit ``cache_bytes``."""
    acc = acc_dtype(hidden)
    N, H = hidden.shape
    V = weight.shape[0]
    outs = [torch.zeros(N, dtype=acc, device=hidden.device) for _ in range(3)]
    rows, h, w, y, b = _compact(hidden, weight, labels, bias, ignore_index, vocab_start)
    n = rows.numel()
    n_cache = min(n, cache_bytes // (V * _ACC_BYTES[acc])) if V > 0 else 0
    cache = torch.empty(n_cache * V, dtype=acc, device=hidden.device)
    if n == 0 or V == 0:
        return (*outs, cache)
    part = [torch.empty(n, dtype=acc, device=hidden.device) for _ in range(3)]
    grid = (triton.cdiv(n, CONFIGS[dtype_name(hidden.dtype)]["logits"]["BLOCK_N"]),)
    _launch(
        _linear_logprobs_fwd_kernel,
        grid,
        (h, w, b, y, *part, cache, n, n_cache, V, H, 1.0 / temperature),
        hidden.dtype,
        "logits",
        HAS_BIAS=bias is not None,
        HAS_CACHE=n_cache > 0,
    )
    for out, val in zip(outs, part, strict=True):
        out.index_copy_(0, rows, val)
    return (*outs, cache)


@triton_op("ppokernels::linear_logprobs_backward_triton", mutates_args=())
def linear_logprobs_backward_triton(
    grad_label_logit: torch.Tensor,
    grad_lse: torch.Tensor,
    grad_entropy: torch.Tensor,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None,
    lse: torch.Tensor,
    entropy: torch.Tensor,
    logits_cache: torch.Tensor,
    temperature: float,
    ignore_index: int,
    vocab_start: int,
    chunk_size: int,
    output_mask: list[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    acc, dev, dt = acc_dtype(hidden), hidden.device, hidden.dtype
    N, H = hidden.shape
    V = weight.shape[0]
    need_h, need_w = output_mask[0], output_mask[1]
    need_b = output_mask[2] and bias is not None
    gh = torch.zeros_like(hidden) if need_h else hidden.new_empty(0)
    gw = torch.zeros(V, H, dtype=acc, device=dev) if need_w else hidden.new_empty(0, dtype=acc)
    gb = torch.zeros(V, dtype=acc, device=dev) if need_b else hidden.new_empty(0, dtype=acc)
    rows, h, w, y, b = _compact(hidden, weight, labels, bias, ignore_index, vocab_start)
    n = rows.numel()
    n_cache = logits_cache.numel() // V if V > 0 else 0
    torch._check(
        logits_cache.numel() == n_cache * V and n_cache <= n and logits_cache.dtype == acc,
        lambda: (
            "linear_logprobs_backward: logits_cache does not match these rows and vocabulary "
            "(pass the forward's own cache, or an empty tensor)"
        ),
    )
    if n > 0 and V > 0 and (need_h or need_w or need_b):
        coef = torch.stack([grad_label_logit[rows], grad_lse[rows], -grad_entropy[rows]])
        coef = coef.to(acc).contiguous()
        lse_c, ent_c = lse[rows].to(acc).contiguous(), entropy[rows].to(acc).contiguous()
        gh_c = torch.empty(n, H, dtype=acc, device=dev) if need_h else None
        gw_k = gw if need_w else torch.empty(V, H, dtype=acc, device=dev)  # bias-only case
        R = max(1, min(chunk_size if chunk_size > 0 else n, n))
        dz = torch.empty(R, V, dtype=h.dtype, device=dev)  # dlogits workspace of one row chunk
        cfg, gcfg = CONFIGS[dtype_name(dt)]["logits"], CONFIGS[dtype_name(dt)]["grad"]
        for r0 in range(0, n, R):
            cnt = min(R, n - r0)
            # rows [r0, cut) read their logits from the cache, [cut, r0 + cnt) recompute them;
            # each part writes its own rows of the chunk's workspace
            cut = min(max(n_cache, r0), r0 + cnt)
            if cut > r0:
                ccfg = CONFIGS[dtype_name(dt)]["cached"]
                grid = (triton.cdiv(cut - r0, ccfg["BLOCK_N"]), triton.cdiv(V, ccfg["BLOCK_V"]))
                _launch(
                    _linear_logprobs_dz_cached_kernel,
                    grid,
                    (logits_cache, b, y, lse_c, ent_c, coef, dz, r0, cut, n, V, 1.0 / temperature),
                    dt,
                    "cached",
                    HAS_BIAS=bias is not None,
                )
            if r0 + cnt > cut:
                grid = (triton.cdiv(r0 + cnt - cut, cfg["BLOCK_N"]), triton.cdiv(V, cfg["BLOCK_V"]))
                args = (h, w, b, y, lse_c, ent_c, coef, dz[cut - r0 :], cut, r0 + cnt)
                _launch(
                    _linear_logprobs_dz_kernel,
                    grid,
                    (*args, n, V, H, 1.0 / temperature),
                    dt,
                    "logits",
                    HAS_BIAS=bias is not None,
                )
            if need_h:
                grid = (triton.cdiv(cnt, gcfg["BLOCK_N"]), triton.cdiv(H, gcfg["BLOCK_H"]))
                _launch(
                    _linear_logprobs_grad_hidden_kernel,
                    grid,
                    (dz, w, gh_c, r0, cnt, V, H),
                    dt,
                    "grad",
                )
            if need_w or need_b:
                grid = (triton.cdiv(V, gcfg["BLOCK_V"]), triton.cdiv(H, gcfg["BLOCK_H"]))
                _launch(
                    _linear_logprobs_grad_weight_kernel,
                    grid,
                    (dz, h, gw_k, gb, r0, cnt, V, H),
                    dt,
                    "grad",
                    HAS_BIAS=need_b,
                )
        if need_h:
            gh.index_copy_(0, rows, gh_c.to(dt))
    gw = gw.to(weight.dtype) if need_w else gw
    gb = gb.to(bias.dtype) if need_b else gb
    return gh, gw, gb


# ------------------------------------------------------------ ahead-of-time compile table
_IO = {"hidden_ptr": "*T", "weight_ptr": "*T", "bias_ptr": "*A", "labels_ptr": "*i64"}
_NVH = {"n": "i64", "V": "i64", "H": "i64"}
_CHUNK = {"r0": "i64", "cnt": "i64", "V": "i64", "H": "i64"}
AOT = (
    aot_table(
        _linear_logprobs_fwd_kernel,
        {
            **_IO,
            "label_logit_ptr": "*A",
            "lse_ptr": "*A",
            "ent_ptr": "*A",
            "cache_ptr": "*A",
            "n": "i64",
            "n_cache": "i64",
            "V": "i64",
            "H": "i64",
            "inv_t": "fp32",
        },
        lambda dt: _config(dt, "logits"),
        variants=[
            dict(HAS_BIAS=True, HAS_CACHE=False),
            dict(HAS_BIAS=False, HAS_CACHE=False),
            dict(HAS_BIAS=False, HAS_CACHE=True),
        ],
    )
    + aot_table(
        _linear_logprobs_dz_kernel,
        {
            **_IO,
            "lse_ptr": "*A",
            "ent_ptr": "*A",
            "coef_ptr": "*A",
            "dz_ptr": "*T",
            "r0": "i64",
            "r1": "i64",
            **_NVH,
            "inv_t": "fp32",
        },
        lambda dt: _config(dt, "logits"),
        variants=[dict(HAS_BIAS=True), dict(HAS_BIAS=False)],
    )
    + aot_table(
        _linear_logprobs_dz_cached_kernel,
        {
            "cache_ptr": "*A",
            "bias_ptr": "*A",
            "labels_ptr": "*i64",
            "lse_ptr": "*A",
            "ent_ptr": "*A",
            "coef_ptr": "*A",
            "dz_ptr": "*T",
            "r0": "i64",
            "r1": "i64",
            "n": "i64",
            "V": "i64",
            "inv_t": "fp32",
        },
        lambda dt: _config(dt, "cached"),
        variants=[dict(HAS_BIAS=True), dict(HAS_BIAS=False)],
    )
    + aot_table(
        _linear_logprobs_grad_hidden_kernel,
        {"dz_ptr": "*T", "weight_ptr": "*T", "grad_ptr": "*A", **_CHUNK},
        lambda dt: _config(dt, "grad"),
    )
    + aot_table(
        _linear_logprobs_grad_weight_kernel,
        {"dz_ptr": "*T", "hidden_ptr": "*T", "grad_w_ptr": "*A", "grad_b_ptr": "*A", **_CHUNK},
        lambda dt: _config(dt, "grad"),
        variants=[dict(HAS_BIAS=True), dict(HAS_BIAS=False)],
    )
)
