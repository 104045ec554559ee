"""CUDA's bf16 autocast rules, run on the CPU: the test mode for the model paths only a GPU would take.

On CUDA, ``precision: bf16`` runs the models under ``torch.autocast("cuda", torch.bfloat16)``: matmuls
and convolutions in bf16, layer norms, softmaxes and sums in fp32, interpolation in fp32, ... The CPU has
its own autocast with DIFFERENT op lists (no fp32 list for layer_norm / softmax / sum, bf16 attention
kept, ``cat`` promoted, ...), so a CPU bf16 run says little about what a CUDA run meets: bf16 tensors
where the code expects fp32 (``.numpy()`` refuses bf16), dtype mismatches, heads that lose precision.

:func:`cuda_autocast_on_cpu` makes CPU autocast follow CUDA's rules, taken from the installed torch
itself rather than from a hand-copied list:

* every operator with a CUDA autocast kernel (121 of aten's in torch 2.14, and torchvision's) gets a Python kernel at the
  ``AutocastCPU`` dispatch key that casts the way CUDA's kernel would and redispatches below autocast;
  operators that only CPU autocast handles (``cat``, ``stack``, ``fft_*``, ...) pass through uncast,
  as on CUDA;
* which dtype CUDA's kernel casts to is asked of torch: the operator runs on fake CUDA tensors of
  the same shapes and dtypes (``FakeTensorMode``: no GPU, no memory) with CUDA autocast on, and
  every floating argument (but fp64) is cast to its output's dtype, as CUDA's ``cached_cast`` does
  for its lower-precision, fp32 and promote lists alike. Cached per operator and argument dtypes;
* ``torch.autocast("cuda", ...)`` / ``torch.cuda.amp.autocast(...)`` in library code (groundingdino
  switches it off around its decoder FFN) act on CPU autocast instead, as they would on CUDA.

The models then run with ``device="cpu", precision="bf16"``: the ``inference()`` context enables CPU
autocast and these kernels decide. What stays different from a GPU: the kernels themselves (CPU bf16
matmuls accumulate in fp32 as cuBLAS does, but rounding details differ), TF32 (off on the CPU), and
anything keyed on ``torch.cuda.is_available()``. Not thread-safe to nest; the registrations are
process-wide while inside (only CPU autocast regions see them).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

_AUTOCAST_CPU = torch._C.DispatchKeySet(torch._C.DispatchKey.AutocastCPU)
_UNKNOWN = object()  # the probe could not run the operator on fake CUDA tensors


@dataclass
class EmulationReport:
    """What one :func:`cuda_autocast_on_cpu` region saw: per operator, the dtypes it was cast to
    (``"as is"`` when CUDA leaves it alone), and the operators the probe could not decide."""

    casts: dict[str, set[str]] = field(default_factory=dict)
    undecided: set[str] = field(default_factory=set)

    def saw(self, op: str, dtype: torch.dtype | None) -> None:
        self.casts.setdefault(op, set()).add("as is" if dtype is None else str(dtype).removeprefix("torch."))


def autocast_operators() -> tuple[list[str], list[str]]:
    """(operators with a CUDA autocast kernel, operators with a CPU one only), by qualified name."""
    names = torch._C._dispatch_get_all_op_names()
    has = torch._C._dispatch_has_kernel_for_dispatch_key
    cuda = sorted(n for n in names if has(n, "AutocastCUDA"))
    cpu_only = sorted(n for n in names if has(n, "AutocastCPU") and n not in set(cuda))
    return cuda, cpu_only


def overload(name: str) -> torch._ops.OpOverload:
    """``"aten::sum.dim_IntList"`` -> ``torch.ops.aten.sum.dim_IntList`` (no overload: ``.default``)."""
    namespace, _, rest = name.partition("::")
    op, _, variant = rest.partition(".")
    return getattr(getattr(getattr(torch.ops, namespace), op), variant or "default")


def _signature(args: tuple, kwargs: dict) -> tuple:
    """What the cast decision depends on: the arguments' structure and their tensors' / dtypes' types."""
    leaves, spec = tree_flatten((args, kwargs))
    kinds = tuple(
        leaf.dtype if isinstance(leaf, torch.Tensor) else leaf if isinstance(leaf, torch.dtype) else None
        for leaf in leaves
    )
    return (len(args), tuple(sorted(kwargs)), len(leaves), kinds)


def _output_dtype(op: torch._ops.OpOverload, args: tuple, kwargs: dict) -> Any:
    """The first floating output's dtype (None: no floating output), or ``_UNKNOWN`` when it fails."""
    try:
        result = op(*args, **kwargs)
    except Exception:  # noqa: BLE001 (a probe: any failure means "cannot tell")
        return _UNKNOWN
    for leaf in tree_flatten(result)[0]:
        if isinstance(leaf, torch.Tensor) and leaf.is_floating_point():
            return leaf.dtype
    return None


def cuda_cast(op: torch._ops.OpOverload, args: tuple, kwargs: dict, lower: torch.dtype) -> Any:
    """The dtype CUDA autocast (lower-precision dtype ``lower``) runs ``op`` in for these arguments: the
    dtype of its floating output when the autocast kernel runs on fake CUDA tensors (every floating
    argument is cast to it: its lower-precision, fp32 and promote policies alike); None without a
    floating output, ``_UNKNOWN`` when torch cannot run it on fake tensors."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    leaves, spec = tree_flatten((args, kwargs))
    was_enabled, previous = torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cuda")
    torch.set_autocast_enabled("cpu", False)
    try:
        with torch._C._ExcludeDispatchKeyGuard(_AUTOCAST_CPU), FakeTensorMode():
            fake = [
                torch.empty_strided(leaf.shape, leaf.stride(), dtype=leaf.dtype, device="cuda")
                if isinstance(leaf, torch.Tensor)
                else leaf
                for leaf in leaves
            ]
            fake_args, fake_kwargs = tree_unflatten(fake, spec)
            torch.set_autocast_dtype("cuda", lower)
            torch.set_autocast_enabled("cuda", True)
            try:
                return _output_dtype(op, fake_args, fake_kwargs)
            finally:
                torch.set_autocast_enabled("cuda", False)
    finally:
        torch.set_autocast_dtype("cuda", previous)
        torch.set_autocast_enabled("cpu", was_enabled)


def _cast(value: Any, dtype: torch.dtype) -> Any:
    """CUDA's ``cached_cast``: floating tensors other than fp64 to ``dtype``; anything else unchanged."""

    def one(leaf: Any) -> Any:
        if isinstance(leaf, torch.Tensor) and leaf.is_floating_point() and leaf.dtype != torch.float64:
            return leaf.to(dtype)
        return leaf

    return tree_map(one, value)


class _Emulation:
    def __init__(self) -> None:
        self.report = EmulationReport()
        self._decisions: dict[tuple, Any] = {}

    def kernel(self, name: str, op: torch._ops.OpOverload, on_cuda: bool) -> Any:
        def autocast_kernel(*args: Any, **kwargs: Any) -> Any:
            dtype = self._decide(name, op, args, kwargs) if on_cuda else None
            if dtype is not None:
                args, kwargs = _cast((args, kwargs), dtype)
            with torch._C._ExcludeDispatchKeyGuard(_AUTOCAST_CPU):
                return op(*args, **kwargs)

        return autocast_kernel

    def _decide(self, name: str, op: torch._ops.OpOverload, args: tuple, kwargs: dict) -> torch.dtype | None:
        lower = torch.get_autocast_dtype("cpu")
        key = (name, lower, _signature(args, kwargs))
        if key not in self._decisions:
            self._decisions[key] = cuda_cast(op, args, kwargs, lower)
        decision = self._decisions[key]
        if decision is _UNKNOWN:
            self.report.undecided.add(name)
            return None
        self.report.saw(name, decision)
        return decision


@contextlib.contextmanager
def _cuda_autocast_means_cpu() -> Iterator[None]:
    """``torch.autocast("cuda", ...)`` (and ``torch.cuda.amp.autocast``) act on CPU autocast."""
    from torch.amp import autocast_mode

    original = autocast_mode.autocast.__init__

    def init(self: Any, device_type: str, *args: Any, **kwargs: Any) -> None:
        original(self, "cpu" if device_type == "cuda" else device_type, *args, **kwargs)

    autocast_mode.autocast.__init__ = init
    try:
        yield
    finally:
        autocast_mode.autocast.__init__ = original


@contextlib.contextmanager
def cuda_autocast_on_cpu() -> Iterator[EmulationReport]:
    """While inside, CPU autocast casts as CUDA autocast does (see the module docstring). Yields the
    :class:`EmulationReport` of the region."""
    import warnings

    emulation = _Emulation()
    cuda, cpu_only = autocast_operators()
    libraries: dict[str, torch.library.Library] = {}
    try:
        with warnings.catch_warnings():  # "Overriding a previously registered kernel": that is the point
            warnings.simplefilter("ignore", UserWarning)
            for names, on_cuda in ((cuda, True), (cpu_only, False)):
                for name in names:
                    namespace = name.partition("::")[0]
                    if namespace not in libraries:
                        libraries[namespace] = torch.library.Library(namespace, "IMPL")  # noqa: TID251
                    op = overload(name)
                    libraries[namespace].impl(op, emulation.kernel(name, op, on_cuda), "AutocastCPU")
        with _cuda_autocast_means_cpu():
            yield emulation.report
    finally:
        for library in libraries.values():
            library._destroy()


# ---- where the bf16 tests run -------------------------------------------------------------------------

EMULATED, CUDA = "cpu-emulating-cuda", "cuda"
# The CPU under CUDA's rules always; a real GPU too where there is one (the same assertions, so a GPU
# run also checks the emulation against the real thing).
BF16_TARGETS = [EMULATED] + ([CUDA] if torch.cuda.is_available() else [])


@dataclass(frozen=True)
class Bf16Target:
    """One of :data:`BF16_TARGETS`: the device a ``precision="bf16"`` model runs on, and the context it
    must run in (:func:`cuda_autocast_on_cpu` for the emulation, nothing on a GPU)."""

    name: str

    @property
    def device(self) -> torch.device:
        return torch.device("cuda" if self.name == CUDA else "cpu")

    def running(self) -> contextlib.AbstractContextManager[EmulationReport]:
        return cuda_autocast_on_cpu() if self.name == EMULATED else contextlib.nullcontext(EmulationReport())


def bf16_exact(values: Any) -> bool:
    """Whether every value is exactly representable in bf16: what a head computed in bf16 (8
    significant bits) gives once cast to fp32. A fp32 head's scores or boxes almost never are."""
    array = np.ascontiguousarray(values, dtype=np.float32)
    return bool(np.array_equal(torch.from_numpy(array).bfloat16().float().numpy(), array, equal_nan=True))
