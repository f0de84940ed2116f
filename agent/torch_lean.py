"""Keep torch's compiler stack out of the agent's memory.

torch wraps a few eager functions in `torch._disable_dynamo` (the optimizers' `zero_grad`,
`add_param_group`, `state_dict`, `load_state_dict` and their functional kernels), which imports
`torch._dynamo` on a wrapper's first call, only to exempt that function from compilation:
that import brings sympy and the rest of the compiler, about 70 MB resident, into every agent
(measured: 218 MiB after `import torch`, 290 MiB once an SGD optimizer exists).

Likewise the `step` of Adam (and other optimizers) is wrapped by
`_use_grad_for_differentiable`, which imports torch._dynamo on every call for two
`graph_break()`s, no-ops in eager mode.

The agent never compiles anything. Each lazy wrapper caches what it calls in its function's
`__dynamo_disable` attribute; `keep_compiler_out()` fills that cache with the function itself,
which is what the dynamo-disabled version runs when no compilation is active; and it replaces
each `_use_grad` step wrapper by the same wrapper without the graph breaks (grad mode set to
`defaults["differentiable"]` around the step, then restored). Eager results are bit-identical
(tests/test_agent_imports.py). It does nothing when torch._dynamo is
already imported (something here compiles), and nothing when a torch version wraps these
functions differently (the import test then reports torch._dynamo among the agent's modules).
"""

from __future__ import annotations

import functools
import sys
import types

import torch
import torch.optim
import torch.optim.optimizer

_CACHE = "__dynamo_disable"


def _lazy_wrapper_code() -> types.CodeType | None:
    make = getattr(torch, "_disable_dynamo", None)
    if make is None:
        return None
    probe = make(lambda: None)
    return getattr(probe, "__code__", None)


def _closure_functions(f: types.FunctionType) -> dict[str, object]:
    cells = f.__closure__ or ()
    out = {}
    for name, cell in zip(f.__code__.co_freevars, cells, strict=False):
        try:
            out[name] = cell.cell_contents
        except ValueError:  # an empty cell
            continue
    return out


def _mark(f: object, code: types.CodeType, depth: int = 0) -> int:
    """Pre-fill the cache of `f` if it is a lazy dynamo-disable wrapper; look one level into
    closures (the functional optimizers wrap one). Returns how many functions were marked."""
    if not isinstance(f, types.FunctionType) or depth > 1:
        return 0
    if f.__code__ is code:
        fn = _closure_functions(f).get("fn")
        if isinstance(fn, types.FunctionType) and getattr(fn, _CACHE, None) is None:
            setattr(fn, _CACHE, fn)
            return 1
        return 0
    return sum(_mark(v, code, depth + 1) for v in _closure_functions(f).values())


def _use_grad_code() -> types.CodeType | None:
    make = getattr(sys.modules.get("torch.optim.optimizer"), "_use_grad_for_differentiable", None)
    if make is None:
        return None
    return getattr(make(lambda self: None), "__code__", None)


def _eager_use_grad(func):
    """torch's `_use_grad_for_differentiable` without torch._dynamo's graph breaks."""
    def _use_grad(*args, **kwargs):
        self = args[0]
        prev_grad = torch.is_grad_enabled()
        try:
            torch.set_grad_enabled(self.defaults["differentiable"])
            return func(*args, **kwargs)
        finally:
            torch.set_grad_enabled(prev_grad)

    functools.update_wrapper(_use_grad, func)
    _use_grad.__fleetfl_eager__ = True
    return _use_grad


def keep_compiler_out() -> int:
    """Mark torch.optim's lazy dynamo-disable wrappers and make the optimizers' step wrappers
    eager-only; returns how many functions were changed."""
    if "torch._dynamo" in sys.modules:
        return 0
    code = _lazy_wrapper_code()
    grad_code = _use_grad_code()
    if code is None:
        return 0
    marked = 0
    for name, module in list(sys.modules.items()):
        if not (name == "torch.optim" or name.startswith("torch.optim.")) or module is None:
            continue
        for value in list(vars(module).values()):
            if isinstance(value, type) and value.__module__.startswith("torch.optim"):
                for key, attr in list(vars(value).items()):
                    marked += _mark(getattr(attr, "__func__", attr), code)
                    if (grad_code is not None and isinstance(attr, types.FunctionType)
                            and attr.__code__ is grad_code
                            and isinstance(getattr(attr, "__wrapped__", None),
                                           types.FunctionType)):
                        setattr(value, key, _eager_use_grad(attr.__wrapped__))
                        marked += 1
            else:
                marked += _mark(value, code)
    return marked
