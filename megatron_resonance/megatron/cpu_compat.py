"""What megatron-core needs to run on CPU with gloo, and nothing for speed (that is ``cpu_speed``).

megatron-core has no CPU path: it allocates on ``torch.cuda.current_device()``, calls ``.cuda()``,
checks ``param.type() == 'torch.cuda.FloatTensor'``, synchronizes streams and tracks CUDA RNG states.
``enable()`` makes the *unchanged* megatron code run on CPU:

* a ``TorchFunctionMode`` rewrites any CUDA ``device=`` argument (``"cuda"``, ``0``, ``torch.device('cuda')``)
  of tensor factories and ``Tensor.to`` to ``cpu``, and drops ``pin_memory=True``;
* ``Tensor.cuda()`` returns the tensor itself; ``Tensor.type()`` (no argument) reports the CUDA type name
  of a CPU tensor, which is what megatron's optimizer and grad-clipping asserts expect;
* ``torch.cuda.current_device`` returns 0; ``synchronize``/``empty_cache`` do nothing; streams and events
  are inert stand-ins; the CUDA RNG API (``get_rng_state``, ``set_rng_state``, ``manual_seed``) and
  ``tensor_parallel.random._get/_set_cuda_rng_state`` act on the CPU default generator, so megatron's
  RNG tracker (``get_cuda_rng_tracker().fork()``) forks and restores the generator CPU ops really use;
* autograd runs backward without torch-function modes (the mode sees ``Tensor.backward`` as one call and
  runs it with itself popped, as every mode does with what it intercepts), yet megatron's linear Function
  and its region mappings' gathers and reduce-scatters allocate on the device in backward (sequence
  parallelism): those run under the mode wherever they are called.

It does nothing when CUDA is available (``enable()`` returns False). Process-wide and idempotent.
``intercept`` lets ``cpu_speed`` run calls the mode sees in its own way (one-rank collectives).
"""

from __future__ import annotations

import contextlib
import functools

import torch
from torch.overrides import TorchFunctionMode

# megatron.core (seconds to import) is imported inside the functions that use it: the tools' --help and input checks
# run without it.

_ENABLED = False
_MODE = None


def _is_cuda_device(device) -> bool:
    if device is None:
        return False
    if isinstance(device, int) and not isinstance(device, bool):
        return True
    if isinstance(device, str):
        return device.startswith("cuda")
    if isinstance(device, torch.device):
        return device.type == "cuda"
    return False


def _call(func, args, kwargs):
    """``func`` with its CUDA ``device=`` keyword on the CPU and without pinned memory."""
    if not kwargs:
        return func(*args)
    if "device" in kwargs and _is_cuda_device(kwargs["device"]):
        kwargs = dict(kwargs, device="cpu")
    if kwargs.get("pin_memory"):  # no pinned allocator without an accelerator (CP's rotary slicing)
        kwargs = dict(kwargs, pin_memory=False)
    return func(*args, **kwargs)


def _call_to(func, args, kwargs):
    """``Tensor.to``/``.cuda`` with a positional CUDA device on the CPU."""
    return _call(func, tuple("cpu" if (i > 0 and _is_cuda_device(a)) else a for i, a in enumerate(args)), kwargs)


#: func -> how the mode runs it: ``_call``, ``_call_to``, or what ``intercept`` registered. The mode sees
#: every torch call: one dict lookup decides.
_RUN: dict = {}


def _how_to_run(func):
    if func in (torch.Tensor.to, torch.Tensor.cuda) or getattr(func, "__name__", "") == "to":
        return _call_to
    return _call


class _DeviceMode(TorchFunctionMode):
    """Rewrites CUDA device arguments to CPU for every torch function and tensor method call."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        run = _RUN.get(func)
        if run is None:
            run = _RUN[func] = _how_to_run(func)
        return run(func, args, kwargs)


def intercept(func, run) -> None:
    """Have the mode call ``run(func, args, kwargs)`` for ``func`` (``run=None``: the default again).
    ``run`` hands calls it does not take itself to ``call``. (``cpu_speed``'s one-rank collectives.)"""
    if run is None:
        _RUN.pop(func, None)
    else:
        _RUN[func] = run


def call(func, args, kwargs):
    """What the mode does with a call nothing intercepts."""
    return _how_to_run(func)(func, args, kwargs)


def process_mode():
    """The process-wide device mode (None before ``enable()``)."""
    return _MODE


def _under_device_mode(fn):
    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        with _DeviceMode():
            return fn(*args, **kwargs)

    return wrapped


def _install_backward_device_mode() -> None:
    """megatron's linear autograd Function (its backward under sequence parallelism: a gather buffer, the
    reduce-scattered input gradient) and its region mappings' gathers and reduce-scatters (the embedding's
    scatter, the row-parallel layers' reduce-scatter) allocate on ``torch.cuda.current_device()`` in
    backward, which runs without the process-wide mode."""
    from megatron.core.tensor_parallel import layers, mappings

    for name in (
        "_gather_along_first_dim",
        "_gather_along_last_dim",
        "_reduce_scatter_along_first_dim",
        "_reduce_scatter_along_last_dim",
    ):
        setattr(mappings, name, _under_device_mode(getattr(mappings, name)))
    linear = layers.LinearWithGradAccumulationAndAsyncCommunication
    linear.backward = staticmethod(_under_device_mode(linear.backward))


class _InertStream:
    """Stand-in for ``torch.cuda.Stream``/``Event``: every method is a no-op."""

    def __init__(self, *args, **kwargs):
        pass

    def __getattr__(self, name):
        return lambda *a, **k: None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


_TYPE_NAMES = {
    torch.float32: "torch.cuda.FloatTensor",
    torch.float16: "torch.cuda.HalfTensor",
    torch.bfloat16: "torch.cuda.BFloat16Tensor",
}


def enable() -> bool:
    """Make megatron-core run on CPU if CUDA is not available. Returns whether this is active."""
    global _ENABLED, _MODE
    if _ENABLED:
        return True
    if torch.cuda.is_available():
        return False

    cuda = torch.cuda
    cuda.current_device = lambda: 0
    cuda.device_count = lambda: 0
    cuda.set_device = lambda *a, **k: None
    cuda.synchronize = lambda *a, **k: None
    cuda.empty_cache = lambda: None
    cuda.Stream = _InertStream
    cuda.Event = _InertStream
    cuda.current_stream = lambda *a, **k: _InertStream()
    cuda.default_stream = lambda *a, **k: _InertStream()
    cuda.stream = lambda *a, **k: contextlib.nullcontext()
    cuda.memory_allocated = lambda *a, **k: 0
    cuda.max_memory_allocated = lambda *a, **k: 0
    cuda.memory_reserved = lambda *a, **k: 0
    # The "CUDA" RNG is the CPU default generator: megatron's tracker forks what CPU ops draw from.
    cuda.get_rng_state = lambda device="cuda": torch.get_rng_state()
    cuda.set_rng_state = lambda state, device="cuda": torch.set_rng_state(state)
    cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(int(seed))
    cuda.manual_seed_all = cuda.manual_seed
    cuda.random.get_rng_state = cuda.get_rng_state
    cuda.random.set_rng_state = cuda.set_rng_state

    from megatron.core.tensor_parallel import random as tp_random

    tp_random._get_cuda_rng_state = lambda device="cuda", clone=False, graph_safe=False: torch.get_rng_state()
    tp_random._set_cuda_rng_state = lambda new_state, device=-1, graph_safe=False: torch.set_rng_state(new_state)

    torch.Tensor.cuda = lambda self, *a, **k: self

    original_type = torch.Tensor.type

    @functools.wraps(original_type)
    def _type(self, dtype=None, non_blocking=False, **kwargs):
        if dtype is None and not kwargs and self.device.type == "cpu" and self.dtype in _TYPE_NAMES:
            return _TYPE_NAMES[self.dtype]
        if isinstance(dtype, str) and dtype.startswith("torch.cuda."):
            dtype = dtype.replace("torch.cuda.", "torch.")
        return original_type(self, dtype, non_blocking, **kwargs)

    torch.Tensor.type = _type

    _install_backward_device_mode()
    _MODE = _DeviceMode()
    _MODE.__enter__()
    _ENABLED = True
    return True


def is_enabled() -> bool:
    return _ENABLED
