"""Test helpers: which backends can run here, tolerances, and the "error relative to eager
PyTorch" rule for low-precision dtypes (flash-attention's convention)."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Sequence
from typing import Any

import torch

from ppokernels import _backend


def available_backends(device_type: str) -> list[str]:
    """Backends that can run ops on tensors of ``device_type`` in this process."""
    out = ["reference"]
    if _backend.has_cpp(device_type):
        out.append("cpp")
    if _backend.has_triton(device_type):
        out.append("triton")
    return out


# The reason of every skip for a missing binary module: the pure-Python wheel's CI job
# (PPOKERNELS_PURE=1, tests/conftest.py) allows exactly these skips, every other job fails on them.
NO_BINARY = "needs the binary module ppokernels._C"


def binary_skip_reason() -> str | None:
    """Why the binary module's tests cannot run here (NO_BINARY and the load reason), or None."""
    if _backend.has_cpp("cpu"):
        return None
    return f"{NO_BINARY} ({_backend.info()['binary_cpu_reason']})"


def devices() -> list[str]:
    return ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]


def backend_params() -> list[tuple[str, str]]:
    """(device, backend) pairs that can run here, for ``pytest.mark.parametrize``."""
    return [(d, b) for d in devices() for b in available_backends(d)]


# Tolerances for float32 kernels against a float64 reference (torch's defaults, slightly relaxed
# because kernels and reference sum in different orders).
TOL = {
    torch.float64: dict(rtol=1e-8, atol=1e-10),
    torch.float32: dict(rtol=2e-5, atol=2e-6),
}


def max_abs_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def assert_close_to_reference(out, ref64, eager, *, factor: float = 2.0, atol: float = 1e-6):
    """``out``'s error against ``ref64`` is at most ``factor`` x the error of ``eager`` (the same
    computation in plain PyTorch at the input's low precision), plus ``atol``."""
    err = max_abs_err(out, ref64)
    eager_err = max_abs_err(eager, ref64)
    assert err <= factor * eager_err + atol, (
        f"kernel error {err:.3e} > {factor} x eager error {eager_err:.3e} + {atol:.1e}"
    )


# ------------------------------------------------------------------------------------------------
# The op conformance harness. A per-op test file describes its op once, as an ``OpSpec`` (the
# public function, its fp64 reference, a list of sample calls, the bad calls and the registered
# op to ``opcheck``), and installs the standard blocks with
#
#     SPEC = OpSpec(name="kl_penalty", fn=ppokernels.kl_penalty, reference=..., samples=...)
#     globals().update(conformance_tests(SPEC))
#
# which generates, parametrised with readable ids (``test_forward_backward[cpu-cpp-float32-k3]``):
#
#   test_forward_backward  every backend here, fp32 and fp64, against the reference run in fp64:
#                          the outputs (and their dtypes), then the gradients of the
#                          differentiable arguments for a random upstream gradient
#   test_gradcheck         torch.autograd.gradcheck in fp64 on every backend
#   test_opcheck           torch.library.opcheck of the registered C++ op (CPU), and of the C++
#                          and ``_triton`` ops on CUDA
#   test_compile           torch.compile(fullgraph=True) of the public function (cpp backend) ==
#                          eager, outputs and gradients
#   test_all_masked        a sample with all-masked rows, NaN written at its masked positions:
#                          outputs and gradients equal those of the clean sample (no NaN spreads),
#                          finite, and equal to the reference's
#   test_bad_input         each bad call raises its exception with its message
#
# The file then keeps only what is special to the op. tests/test_testing.py checks that the
# generated tests fail on a wrong op.


@dataclasses.dataclass
class Sample:
    """One call of an op: ``fn(*args, backend=..., **kwargs)`` (tensors positional, options by
    keyword); ``name`` is its part of the test id and must be unique among an op's samples."""

    args: tuple
    kwargs: dict = dataclasses.field(default_factory=dict)
    name: str = "sample"


@dataclasses.dataclass
class OpSpec:
    """What the harness needs to know about one public op.

    name           the op's public name (test ids, messages)
    fn             the public function, called ``fn(*args, backend=backend, **kwargs)``
    reference      the specification, called ``reference(*args_in_fp64, **kwargs)``
    samples        ``samples(device, dtype) -> list[Sample]``; floating tensors in ``dtype``
                   (called with the global seed set to 0, so the same names every time)
    differentiable the arguments that take gradients: indices of ``args``, or names of keyword
                   tensors (``"ref_logprobs"``; an absent or None one takes none)
    outputs        picks the tensors to compare from a return value (of ``fn`` and of
                   ``reference`` alike); default: a Tensor, or the tensors of a tuple/NamedTuple
    masked_sample  ``masked_sample(device, dtype) -> Sample`` (or a list of them) whose mask
                   (``args[mask_arg]``) is all zero in some rows or entirely; None: no mask
    mask_arg       index of the mask among ``args``
    masked_finite  the outputs of the masked sample must be finite (False where an all-masked
                   statistic is NaN by definition, e.g. masked_mean)
    nan_padding_against
                   what the call with NaN at masked positions must equal: "clean" (the same call
                   with the sample's own values there) or "reference" (the reference on the NaN
                   input, where values at masked positions still reach the gradient, as the
                   whitened padding does in masked_whiten)
    bad_inputs     ``[(call, exception type, message regex), ...]``; ``call()`` makes the bad call;
                   the regex names the op and the argument
    opcheck        ``opcheck(sample) -> [(OpOverload, args), ...]``: the registered C++ op(s) for
                   this sample; on CUDA the ``<op>_triton`` twin of each is checked too
    dtypes         floating dtypes of the forward/backward test
    tolerances     ``{dtype: dict(rtol=, atol=)}`` or ``f(dtype, backend) -> dict``; either may
                   give a tuple of dicts instead, one per output (the gradients take the first)
    fixed_dtypes   ``{output index: dtype}`` for outputs whose dtype is not the accumulation
                   dtype of the inputs (e.g. fp64 metrics of fp32 data)
    compile        True: torch.compile the public function (outputs and gradients); or
                   ``compile(sample) -> (fn, args)`` where the public function cannot be one
                   graph (data-dependent shapes; outputs only)
    gradcheck_samples / opcheck_samples / compile_samples
                   names of the samples each block runs on (None: all of them); opcheck and
                   compile default to the first sample (each call compiles)
    interpreter_samples
                   names of the samples test_forward_backward runs on the Triton interpreter
                   (backend "triton" on CPU tensors, slow where an op launches many kernels);
                   None: all. On a GPU Triton runs every sample.
    """

    name: str
    fn: Callable
    reference: Callable
    samples: Callable[[str, torch.dtype], list[Sample]]
    differentiable: Sequence[int | str] = (0,)
    outputs: Callable[[Any], Sequence[torch.Tensor | None]] | None = None
    masked_sample: Callable[[str, torch.dtype], Sample | list[Sample]] | None = None
    mask_arg: int | None = None
    masked_finite: bool = True
    nan_padding_against: str = "clean"
    bad_inputs: Sequence[tuple[Callable[[], Any], type, str]] = ()
    opcheck: Callable[[Sample], list[tuple[Any, tuple]]] | None = None
    dtypes: Sequence[torch.dtype] = (torch.float32, torch.float64)
    tolerances: dict | Callable[[torch.dtype, str], dict | tuple] = dataclasses.field(
        default_factory=lambda: dict(TOL)
    )
    fixed_dtypes: dict[int, torch.dtype] = dataclasses.field(default_factory=dict)
    compile: bool | Callable[[Sample], tuple[Callable, tuple]] = True
    gradcheck_samples: Sequence[str] | None = None
    opcheck_samples: Sequence[str] | None = None
    compile_samples: Sequence[str] | None = None
    interpreter_samples: Sequence[str] | None = None


def _pick(spec: OpSpec, result) -> tuple:
    if spec.outputs is not None:
        return tuple(spec.outputs(result))
    if isinstance(result, torch.Tensor):
        return (result,)
    return tuple(x for x in result if x is None or isinstance(x, torch.Tensor))


def _tol(spec: OpSpec, dtype: torch.dtype, backend: str, output: int = 0) -> dict:
    """The tolerance of output ``output`` (and, for output 0, of the gradients)."""
    tol = spec.tolerances(dtype, backend) if callable(spec.tolerances) else spec.tolerances[dtype]
    return tol[output] if isinstance(tol, (tuple, list)) else tol


def _sample(spec: OpSpec, device: str, dtype: torch.dtype, name: str) -> Sample:
    torch.manual_seed(0)
    found = [s for s in spec.samples(device, dtype) if s.name == name]
    assert len(found) == 1, f"{spec.name}: no single sample named {name!r}"
    return found[0]


def _sample_names(spec: OpSpec) -> list[str]:
    torch.manual_seed(0)
    names = [s.name for s in spec.samples("cpu", torch.float64)]
    assert len(set(names)) == len(names), f"{spec.name}: sample names repeat: {names}"
    return names


def _to64(x):
    if isinstance(x, torch.Tensor) and x.is_floating_point():
        return x.detach().to(torch.float64)
    return x


def _arg(args: list, kwargs: dict, key: int | str):
    """The argument ``key`` names: an index of ``args`` or a keyword of ``kwargs``."""
    return kwargs.get(key) if isinstance(key, str) else args[key]


def _set_arg(args: list, kwargs: dict, key: int | str, value) -> None:
    if isinstance(key, str):
        kwargs[key] = value
    else:
        args[key] = value


def _what(key: int | str) -> str:
    return f"argument {key}" if isinstance(key, int) else key


def _leaves(sample: Sample, diff: Sequence[int | str], cast=None) -> tuple[list, dict, list]:
    """``sample``'s arguments with the differentiable tensors replaced by fresh leaves; (args,
    kwargs, leaves)."""
    keep = lambda x: x  # noqa: E731
    cast = cast or keep
    args = [cast(a) for a in sample.args]
    kwargs = {k: cast(v) for k, v in sample.kwargs.items()}
    leaves = []
    for key in diff:
        x = _arg(args, kwargs, key)
        if x is not None:
            x = x.detach().clone().requires_grad_(True)
            _set_arg(args, kwargs, key, x)
        leaves.append(x)  # None where the optional argument is not given
    return args, kwargs, leaves


def _run(spec: OpSpec, sample: Sample, backend: str, *, to64=False, diff=True):
    """Outputs and gradient leaves of one call of the op (or of the reference, ``backend=None``)."""
    args, kwargs, leaves = _leaves(
        sample, spec.differentiable if diff else (), _to64 if to64 else None
    )
    if backend is None:
        result = spec.reference(*args, **kwargs)
    else:
        result = spec.fn(*args, backend=backend, **kwargs)
    return _pick(spec, result), leaves


def _close(got, want, what: str, **tol) -> None:
    if want is None or got is None:
        assert got is None and want is None, f"{what}: {got!r} vs {want!r}"
        return
    if not want.is_floating_point():
        assert torch.equal(got.cpu(), want.cpu().to(got.dtype)), f"{what}: {got} != {want}"
        return
    torch.testing.assert_close(
        got.detach().cpu().double(),
        want.detach().cpu().double(),
        equal_nan=True,
        msg=lambda m: f"{what}: {m}",
        **tol,
    )


def _grads(outs, leaves, upstream) -> list:
    pairs = [(o, g) for o, g in zip(outs, upstream, strict=True) if g is not None]
    given = [x for x in leaves if x is not None]
    if not pairs or not given:
        return [None if x is None else torch.zeros_like(x) for x in leaves]
    total = sum((o * g.to(o.dtype)).sum() for o, g in pairs)
    gs = iter(torch.autograd.grad(total, given, allow_unused=True))
    out = []
    for x in leaves:
        g = None if x is None else next(gs)
        out.append(None if x is None else torch.zeros_like(x) if g is None else g)
    return out


def _upstream(ref_outs, device) -> list:
    """A random upstream gradient per differentiable output of the reference (None elsewhere)."""
    return [
        torch.randn(o.shape, dtype=torch.float64).to(device)
        if o is not None and o.is_floating_point() and o.requires_grad
        else None
        for o in ref_outs
    ]


def _ids(values) -> list[str]:
    return [str(v).removeprefix("torch.") for v in values]


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_]+", "-", text).strip("-")[:60]


def conformance_tests(spec: OpSpec, prefix: str = "") -> dict[str, Callable]:
    """The standard test functions of ``spec``'s op, parametrised for pytest; install them in a
    test module with ``globals().update(conformance_tests(SPEC))``. A second op in the same
    module takes a ``prefix``: ``test_<prefix>_forward_backward``, ..."""
    import pytest

    names = _sample_names(spec)
    params = backend_params()
    ids = [f"{d}-{b}" for d, b in params]
    tests: dict[str, Callable] = {}
    # every (device, backend) x dtype x sample, but the samples the Triton interpreter skips
    interpreted = set(names if spec.interpreter_samples is None else spec.interpreter_samples)
    assert interpreted <= set(names), f"{spec.name}: unknown interpreter_samples"
    cases = [
        pytest.param(d, b, dtype, name, id=f"{d}-{b}-{_ids([dtype])[0]}-{name}")
        for d, b in params
        for dtype in spec.dtypes
        for name in names
        if not (d == "cpu" and b == "triton") or name in interpreted
    ]

    @pytest.mark.parametrize("device, backend, dtype, sample", cases)
    def test_forward_backward(device, backend, dtype, sample):
        s = _sample(spec, device, dtype, sample)
        tol = _tol(spec, dtype, backend)
        outs, leaves = _run(spec, s, backend)
        ref_outs, ref_leaves = _run(spec, s, None, to64=True)
        assert len(outs) == len(ref_outs), f"{spec.name}: {len(outs)} outputs vs {len(ref_outs)}"
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        for k, (o, r) in enumerate(zip(outs, ref_outs, strict=True)):
            if o is not None and o.is_floating_point():
                want = spec.fixed_dtypes.get(k, acc)
                assert o.dtype == want, f"{spec.name}: output {k} is {o.dtype}, expected {want}"
            if o is not None:
                assert o.shape == r.shape, f"{spec.name}: output {k} shape {o.shape} vs {r.shape}"
            _close(o, r, f"{spec.name}: output {k}", **_tol(spec, dtype, backend, k))
        upstream = _upstream(ref_outs, device)
        for k, (o, g) in enumerate(zip(outs, upstream, strict=True)):
            if g is not None:
                assert o.requires_grad, f"{spec.name}: output {k} has no gradient"
        got = _grads(outs, leaves, upstream)
        want = _grads(ref_outs, ref_leaves, upstream)
        for i, g, w in zip(spec.differentiable, got, want, strict=True):
            _close(g, w, f"{spec.name}: gradient of {_what(i)}", **tol)

    tests["test_forward_backward"] = test_forward_backward

    if spec.differentiable:
        gc_names = list(spec.gradcheck_samples) if spec.gradcheck_samples is not None else names

        @pytest.mark.parametrize("sample", gc_names, ids=gc_names)
        @pytest.mark.parametrize("device, backend", params, ids=ids)
        def test_gradcheck(device, backend, sample):
            s = _sample(spec, device, torch.float64, sample)
            args, kwargs = list(s.args), dict(s.kwargs)
            keys = [k for k in spec.differentiable if _arg(args, kwargs, k) is not None]
            inputs = tuple(
                _arg(args, kwargs, k).detach().clone().requires_grad_(True) for k in keys
            )

            def f(*xs):
                a, kw = list(args), dict(kwargs)
                for k, x in zip(keys, xs, strict=True):
                    _set_arg(a, kw, k, x)
                outs = _pick(spec, spec.fn(*a, backend=backend, **kw))
                return tuple(o for o in outs if o is not None and o.requires_grad)

            # the Triton interpreter is slow: random projections there
            fast = backend == "triton" and device == "cpu"
            assert torch.autograd.gradcheck(f, inputs, fast_mode=fast)

        tests["test_gradcheck"] = test_gradcheck

    if spec.opcheck is not None:
        oc_names = list(spec.opcheck_samples) if spec.opcheck_samples is not None else names[:1]
        devs = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]

        @pytest.mark.parametrize("sample", oc_names, ids=oc_names)
        @pytest.mark.parametrize("device", devs)
        def test_opcheck(device, sample):
            if device == "cpu" and binary_skip_reason():
                pytest.skip(binary_skip_reason())
            s = _sample(spec, device, torch.float32, sample)
            checks = list(spec.opcheck(s))
            assert checks, f"{spec.name}: no op to check for sample {sample!r}"
            for op, args in checks:
                ops = [op]
                if device == "cuda":
                    pkt = op._schema.name.split("::")[-1] + "_triton"
                    if hasattr(torch.ops.ppokernels, pkt):
                        ops.append(getattr(torch.ops.ppokernels, pkt).default)
                for o in ops:
                    torch.library.opcheck(o, args)

        tests["test_opcheck"] = test_opcheck

        cc_names = list(spec.compile_samples) if spec.compile_samples is not None else names[:1]
        cdevs = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]

        @pytest.mark.parametrize("sample", cc_names, ids=cc_names)
        @pytest.mark.parametrize("device", cdevs)
        def test_compile(device, sample):
            if binary_skip_reason():
                pytest.skip(binary_skip_reason())
            s = _sample(spec, device, torch.float32, sample)
            torch.compiler.reset()  # every op's f shares one code object: no recompile limit
            if callable(spec.compile):  # the op's own graph-friendly call: outputs only
                g, args = spec.compile(s)
                f = lambda *a: _pick(spec, g(*a))  # noqa: E731
                got, want = torch.compile(f, fullgraph=True)(*args), f(*args)
                for k, (o, w) in enumerate(zip(got, want, strict=True)):
                    _close(o, w, f"{spec.name}: compiled output {k}", **TOL[torch.float32])
                return

            def f(*a, **kw):
                return _pick(spec, spec.fn(*a, backend="cpp", **kw))

            # the compiled and the eager call each on their own leaves, every tensor an input
            args, kwargs, leaves = _leaves(s, spec.differentiable)
            e_args, e_kwargs, e_leaves = _leaves(s, spec.differentiable)
            got = torch.compile(f, fullgraph=True)(*args, **kwargs)
            want = f(*e_args, **e_kwargs)
            for k, (o, w) in enumerate(zip(got, want, strict=True)):
                _close(o, w, f"{spec.name}: compiled output {k}", **TOL[torch.float32])
            upstream = [
                torch.randn_like(w) if w is not None and w.requires_grad else None for w in want
            ]
            got_g = _grads(got, leaves, upstream)
            want_g = _grads(want, e_leaves, upstream)
            for i, a, b in zip(spec.differentiable, got_g, want_g, strict=True):
                _close(a, b, f"{spec.name}: compiled gradient of {_what(i)}", **TOL[torch.float32])

        tests["test_compile"] = test_compile

    if spec.masked_sample is not None:
        assert spec.mask_arg is not None, f"{spec.name}: masked_sample needs mask_arg"

        @pytest.mark.filterwarnings("ignore::RuntimeWarning")  # 0 / 0 in the Triton interpreter
        @pytest.mark.parametrize("dtype", list(spec.dtypes), ids=_ids(spec.dtypes))
        @pytest.mark.parametrize("device, backend", params, ids=ids)
        def test_all_masked(device, backend, dtype):
            torch.manual_seed(0)
            made = spec.masked_sample(device, dtype)
            for s in made if isinstance(made, list) else [made]:
                _check_masked(s, device, backend, dtype)

        def _check_masked(s, device, backend, dtype):
            mask = s.args[spec.mask_arg]
            valid = mask.bool()
            assert (~valid).any(), f"{spec.name}: the masked sample masks nothing"

            # NaN at the masked positions of every floating argument (positional or keyword)
            # shaped like the mask
            def nan_padded(a):
                if (
                    a is not mask
                    and isinstance(a, torch.Tensor)
                    and a.is_floating_point()
                    and a.shape == mask.shape
                ):
                    return a.masked_fill(~valid, float("nan"))
                return a

            d = Sample(
                tuple(nan_padded(a) for a in s.args),
                {k: nan_padded(v) for k, v in s.kwargs.items()},
                s.name,
            )
            tol = _tol(spec, dtype, backend)
            outs, leaves = _run(spec, s, backend)
            d_outs, d_leaves = _run(spec, d, backend)
            ref_outs, ref_leaves = _run(spec, s, None, to64=True)
            against_ref = spec.nan_padding_against == "reference"
            if against_ref:
                dref_outs, dref_leaves = _run(spec, d, None, to64=True)
            upstream = _upstream(ref_outs, device)
            for k, (o, do, r) in enumerate(zip(outs, d_outs, ref_outs, strict=True)):
                if o is None:
                    continue
                tol_k = _tol(spec, dtype, backend, k)
                _close(o, r, f"{spec.name}: all-masked output {k} vs the reference", **tol_k)
                want = dref_outs[k] if against_ref else o
                if o.shape == mask.shape:  # per-position output: its valid positions
                    o, do, want = o[valid], do[valid], want[valid]
                if spec.masked_finite and o.is_floating_point():
                    assert torch.isfinite(o).all(), f"{spec.name}: all-masked output {k}: {o}"
                _close(do, want, f"{spec.name}: output {k} with NaN at masked positions", **tol_k)
            got = _grads(outs, leaves, upstream)
            d_got = _grads(d_outs, d_leaves, upstream)
            want = _grads(ref_outs, ref_leaves, upstream)
            d_want = _grads(dref_outs, dref_leaves, upstream) if against_ref else got
            for i, g, dg, w, dw in zip(spec.differentiable, got, d_got, want, d_want, strict=True):
                if g is None:
                    continue
                what = f"{spec.name}: gradient of {_what(i)}"
                assert torch.isfinite(g).all(), f"{what} on all-masked rows: {g}"
                assert torch.isfinite(dg).all(), f"{what} with NaN at masked positions: {dg}"
                _close(g, w, f"{what} vs the reference", **tol)
                _close(dg, dw, f"{what} with NaN at masked positions", **tol)

        tests["test_all_masked"] = test_all_masked

    if spec.bad_inputs:
        bad = list(spec.bad_inputs)
        bad_ids = [
            f"{k}-{_slug(m.removeprefix(spec.name + ':'))}" for k, (_, _, m) in enumerate(bad)
        ]

        @pytest.mark.parametrize("case", range(len(bad)), ids=bad_ids)
        def test_bad_input(case):
            call, exc, match = bad[case]
            with pytest.raises(exc, match=match):
                call()

        tests["test_bad_input"] = test_bad_input

    if prefix:
        renamed = {}
        for key, fn in tests.items():
            fn.__name__ = fn.__qualname__ = key.replace("test_", f"test_{prefix}_", 1)
            renamed[fn.__name__] = fn
        tests = renamed
    return tests
