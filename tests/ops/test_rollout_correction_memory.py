"""rollout_correction allocates no [B, T] tensor besides its outputs (weights and rejection mask;
the row statistics and the metrics are [B, K] and [M]).

Measured as the process's peak resident set (VmHWM, reset through /proc/self/clear_refs) above
its resident set before the call, in a fresh interpreter whose malloc maps every block of 64 KiB
or more on its own (MALLOC_MMAP_THRESHOLD_ fixed: no reuse of freed heap pages, and a freed
block leaves the resident set), so that every [B, T] temporary the call writes shows in the peak.
At B x T = 2^21 tokens the smallest such temporary (bool, 2 MiB) is far above the measurement's
noise. A non-contiguous input, which the op must copy, is the control: the same measurement
sees that [B, T] copy.
"""

import json
import os
import subprocess
import sys

import pytest

from ppokernels.testing import binary_skip_reason

B, T = 512, 4096

SCRIPT = r"""
import gc, json, math, sys
import torch
import ppokernels

torch.set_num_threads(1)
B, T = int(sys.argv[1]), int(sys.argv[2])
g = torch.Generator().manual_seed(0)
lp = -torch.rand(B, T, generator=g) * 3
rlp = lp + 0.1 * torch.randn(B, T, generator=g)
mask = torch.rand(B, T, generator=g) > 0.1
lp_strided = lp.t().contiguous().t()  # the control: not contiguous, the op copies it
CASES = {
    "token": (lp, mask, dict()),
    "token_no_clamp_two_sided": (lp, mask, dict(bounds=(0.5, 5.0), logratio_clamp=None)),
    "sequence_criteria_batch_norm": (
        lp,
        mask,
        dict(
            level="sequence",
            mode="mask",
            bounds=(0.5, 2.0),
            batch_normalize=True,
            criteria={"token_k3": 0.2, "seq_mean_k1": (math.log(0.8), math.log(1.25))},
        ),
    ),
    "float_mask": (lp, mask.float(), dict(level="sequence_sum")),
    "control_strided": (lp_strided, mask, dict()),
}


def rss(key):
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith(key))


result = {}
for name, (a, m, kw) in CASES.items():
    ppokernels.rollout_correction(a, rlp, m, backend="cpp", **kw)  # warm: imports, caches
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = rss("VmRSS:")
    out = ppokernels.rollout_correction(a, rlp, m, backend="cpp", **kw)
    peak = rss("VmHWM:") - base
    outputs = sum(t.numel() * t.element_size() for t in (out.weights, out.mask, out.row_stats))
    result[name] = {"peak": peak, "outputs": outputs}
    del out
print(json.dumps(result))
"""


@pytest.fixture(scope="module")
def peaks():
    if binary_skip_reason():
        pytest.skip(binary_skip_reason())
    if not os.path.exists("/proc/self/clear_refs"):
        pytest.skip("needs Linux /proc/self/clear_refs (peak resident set reset)")
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    r = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(B), str(T)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-4000:]
    return json.loads(r.stdout.splitlines()[-1])


@pytest.mark.parametrize(
    "case", ["token", "token_no_clamp_two_sided", "sequence_criteria_batch_norm", "float_mask"]
)
def test_no_temporary_of_batch_size(peaks, case):
    p = peaks[case]
    extra = p["peak"] - p["outputs"]
    # half a byte per token: below the smallest [B, T] tensor (bool), above the noise (row
    # buffers of one thread, the [B, K] statistics' reductions, Python objects)
    assert extra < B * T // 2, (case, p)


def test_the_measurement_sees_a_temporary(peaks):
    p = peaks["control_strided"]
    assert p["peak"] - p["outputs"] >= 0.9 * B * T * 4, p  # the fp32 contiguous copy
