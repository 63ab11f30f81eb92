"""Registration helpers shared by every ``ops/<stem>.py``: the built variants of an op, the one
rule that picks the C++ or the Triton op, and fake kernels of the C++ ops."""

from __future__ import annotations

import torch

from ppokernels import _backend


def variants(name: str, backward: str | None = None) -> list[tuple[str, str | None]]:
    """``(forward, backward)`` qualified op names of each built backend of ``name``.

    The C++ ops exist when ``_C`` is loaded; the ``_triton`` ops when triton is importable (the
    caller imports its ``ppokernels.triton.<stem>`` module first).
    """
    out = []
    if _backend._C is not None:
        out.append((f"ppokernels::{name}", backward and f"ppokernels::{backward}"))
    if _backend.HAS_TRITON:
        out.append((f"ppokernels::{name}_triton", backward and f"ppokernels::{backward}_triton"))
    return out


def op(qualname: str):
    """The OpOverloadPacket of ``ppokernels::<name>``."""
    return getattr(torch.ops.ppokernels, qualname.split("::")[1])


def kernel(name: str, backend: str):
    """The registered op that runs ``name`` on ``backend`` ("cpp" or "triton", as returned by
    :func:`ppokernels._backend.choose`): ``ppokernels::<name>`` or ``ppokernels::<name>_triton``.

    Outside torch.compile a C++ op with a Python autograd formula comes as its direct call
    (:func:`register_autograd`): the same kernels and formula without the dispatcher's round trip
    through Python. Traced by torch.compile, the public functions call the registered op itself.
    """
    if backend not in ("cpp", "triton"):
        raise ValueError(f"{name}: no registered op for backend {backend!r}")
    if backend == "cpp":
        direct = _DIRECT.get(name)
        if direct is not None and not torch.compiler.is_compiling():
            return direct
        return getattr(torch.ops.ppokernels, name)
    return getattr(torch.ops.ppokernels, f"{name}_triton")


def register_fake_cpp(name: str, fn) -> None:
    """Fake (meta) kernel of a C++ op; Triton ops get theirs from tracing the triton_op body."""
    if _backend._C is not None:
        torch.library.register_fake(f"ppokernels::{name}")(fn)


def register_autograd(qualname: str, backward, *, setup_context) -> None:
    """The autograd formula of a ppokernels op, with ``torch.library.register_autograd``'s
    contract: ``setup_context(ctx, inputs, output)`` and ``backward(ctx, *grads)`` -> one
    gradient (or None) per input; the backward calls the registered backward op.

    For the C++ ops this registers the Autograd kernel itself, because torch's (2.11 to 2.15,
    torch/_library/autograd.py) re-adds the schema's default arguments on every call by walking
    ``op._schema.arguments`` once per argument (``fill_defaults``): quadratic in the argument
    count, about 50 us per call for ppo_policy_loss's 17 arguments on a quiet CPU, more than
    the whole eager formula at 4 x 64 tokens. Our schemas have no defaults and the wrappers pass
    every argument, so that walk has nothing to add. The Triton ops are torch.library custom
    ops that carry their own Autograd kernel: they keep torch's registration.

    A Python Autograd kernel still costs a round trip per call (the dispatcher boxes the
    arguments into Python, which redispatches them below autograd): about 9 us, a quarter of
    kl_penalty's whole forward + backward at 4 x 64. So the op also gets a direct call
    (:func:`kernel` hands it to the public functions outside torch.compile): an
    ``autograd.Function`` of the same ``setup_context`` and ``backward`` that dispatches below
    autograd itself, or with no gradient wanted that dispatch alone. Same kernels, same formula,
    same graph; the registered kernel stays for torch.compile, opcheck and callers of
    ``torch.ops.ppokernels.<name>``.
    """
    name = qualname.split("::")[1]
    if name.endswith("_triton"):
        torch.library.register_autograd(qualname, backward, setup_context=setup_context)
        return
    overload = op(qualname).default
    below = torch._C._after_autograd_keyset

    # the keyset rides last, as in torch's own: needs_input_grad[i] is input i in setup_context
    def forward(ctx, *args_keyset):
        *args, keyset = args_keyset
        with torch._C._AutoDispatchBelowAutograd():
            out = overload.redispatch(keyset & below, *args)
        setup_context(ctx, args, out)
        return out

    def backward_with_keyset(ctx, *grads):
        need = ctx.needs_input_grad
        ctx.needs_input_grad = need[:-1]  # as the inputs the formula sees (no keyset)
        try:
            grads_in = backward(ctx, *grads)
        finally:
            ctx.needs_input_grad = need
        return (*grads_in, None)

    function = type(
        f"{name}_autograd",
        (torch.autograd.Function,),
        {"forward": staticmethod(forward), "backward": staticmethod(backward_with_keyset)},
    )

    def autograd_kernel(keyset, *args):
        if torch.is_grad_enabled() and torch._C._any_requires_grad(*args):
            return function.apply(*args, keyset)
        with torch._C._AutoDispatchBelowAutograd():
            return overload.redispatch(keyset & below, *args)

    # The direct call: no keyset (a fresh dispatch below autograd: no key above it was handled
    # yet), so the formula's backward is the Function's own. An old-style Function (ctx in
    # forward): setup_context as a separate staticmethod costs about 10 us more per call.
    def direct_forward(ctx, *args):
        with torch._C._AutoDispatchBelowAutograd():
            out = overload(*args)
        setup_context(ctx, args, out)
        return out

    direct_function = type(
        f"{name}_direct",
        (torch.autograd.Function,),
        {"forward": staticmethod(direct_forward), "backward": staticmethod(backward)},
    )

    def direct(*args):
        if torch.is_grad_enabled() and torch._C._any_requires_grad(*args):
            return direct_function.apply(*args)
        with torch._C._AutoDispatchBelowAutograd():
            return overload(*args)

    _impl_library().impl(name, autograd_kernel, "Autograd", with_keyset=True)
    _DIRECT[name] = direct


def register_first_input_autograd(name: str, n_tensors: int, *, save_output: bool) -> None:
    """The autograd of every built variant of an op that differentiates its first input only
    (masked_moments, masked_whiten, group_advantages: masks and group ids take no gradient).

    The op's inputs are ``n_tensors`` tensors, then scalars; its backward op
    ``<name>_backward`` takes ``(grad, *tensors, *[output if save_output], *scalars)``.
    """

    def setup_context(ctx, inputs, output):
        ctx.scalars = inputs[n_tensors:]
        if ctx.needs_input_grad[0]:
            ctx.save_for_backward(*inputs[:n_tensors], *((output,) if save_output else ()))

    def make_backward(backward_op):
        def backward(ctx, grad):
            dx = None
            if ctx.needs_input_grad[0]:
                dx = backward_op(grad, *ctx.saved_tensors, *ctx.scalars)
            return dx, *([None] * (n_tensors - 1 + len(ctx.scalars)))

        return backward

    for fwd, bwd in variants(name, f"{name}_backward"):
        register_autograd(fwd, make_backward(op(bwd)), setup_context=setup_context)


_LIBRARY: list = []
# C++ op name -> its direct call (register_autograd)
_DIRECT: dict = {}


def _impl_library() -> torch.library.Library:
    """The one ``IMPL`` library of the ppokernels namespace (kept alive: dropping it would
    deregister its kernels)."""
    if not _LIBRARY:
        _LIBRARY.append(torch.library.Library("ppokernels", "IMPL"))
    return _LIBRARY[0]
