"""Flatten a PyTorch ``state_dict`` (or a parameter delta) into one float64 vector and back.

Secure aggregation works on flat float vectors; a model is a mapping of named
tensors of assorted shapes and dtypes. This module is the bridge, with no I/O::

    vector, spec = flatten_state(model.state_dict())      # float64, shape (spec.size,)
    state = unflatten_state(vector, spec)                  # same names, shapes, dtypes

    delta = state_delta(new_state, old_state)              # floating entries, float64
    vector, spec = flatten_state(delta)
    ...                                                    # aggregate the vectors
    model.load_state_dict(apply_delta(model.state_dict(), unflatten_state(mean, spec)))

:class:`StateSpec` is the ordered list of ``(name, shape, dtype)`` entries; the
vector is the concatenation of every entry flattened in row-major order.

Exactness
    Every floating dtype PyTorch has (float16, bfloat16, float32, float64, the
    float8 types) converts to float64 exactly, so floating tensors round-trip
    bit for bit (NaN payloads aside). Integer and bool tensors (BatchNorm's
    ``num_batches_tracked`` is int64) are included by default and restored with
    their dtype; they round-trip exactly only while ``|value| <= 2^53``, the
    largest range in which float64 holds every integer, and :func:`flatten_state`
    refuses a larger value rather than round it silently. When a vector is turned
    back into an integer or bool tensor its values are rounded to the nearest
    integer (ties to even: an aggregated *mean* is rarely integral), a value
    outside the dtype's range raises :class:`ValueError`, and bool entries are
    ``True`` where the rounded value is non-zero.

Deltas
    :func:`state_delta` keeps only floating entries by default
    (``floating_only=True``): a weighted mean of integer counters such as
    ``num_batches_tracked`` is not meaningful. The delta is computed in float64
    (the flat vector is float64 anyway), so for float32/float16/bfloat16 models
    ``apply_delta(old, state_delta(new, old))`` reproduces ``new`` exactly
    whenever the float64 difference is exact (always the case for nearby values);
    :func:`apply_delta` adds in float64 and rounds once to the state's dtype.

Tensors are moved to the CPU; complex, quantized and sparse tensors are refused.
Returned tensors never share memory with the vector or the inputs.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

try:
    import torch
except ImportError as exc:  # pragma: no cover - exercised in a subprocess by the tests
    raise ImportError(
        "secagg.torch_state needs PyTorch: pip install torch==2.13.0 (CPU build) "
        "or the project's 'torch' extra"
    ) from exc

__all__ = [
    "StateEntry",
    "StateSpec",
    "apply_delta",
    "flatten_state",
    "state_delta",
    "state_spec",
    "unflatten_state",
]

# float64 holds every integer of magnitude <= 2^53 exactly (and not 2^53 + 1).
MAX_EXACT_INTEGER = 2**53

StateDict = Mapping[str, torch.Tensor]


@dataclass(frozen=True)
class StateEntry:
    """One tensor of a state: its name, shape and dtype; ``numel`` coordinates."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"entry name must be a non-empty string, got {self.name!r}")
        if not isinstance(self.dtype, torch.dtype):
            raise ValueError(f"{self.name}: dtype must be a torch.dtype, got {self.dtype!r}")
        shape = tuple(self.shape)
        if any(isinstance(d, bool) or not isinstance(d, int) or d < 0 for d in shape):
            raise ValueError(f"{self.name}: shape must be non-negative integers, got {shape}")
        object.__setattr__(self, "shape", shape)
        _check_dtype(self.name, self.dtype)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def is_floating(self) -> bool:
        return self.dtype.is_floating_point


@dataclass(frozen=True)
class StateSpec:
    """The layout of a flattened state: ordered ``(name, shape, dtype)`` entries."""

    entries: tuple[StateEntry, ...]

    def __post_init__(self) -> None:
        entries = tuple(self.entries)
        for entry in entries:
            if not isinstance(entry, StateEntry):
                raise ValueError(f"spec entries must be StateEntry, got {type(entry).__name__}")
        names = [entry.name for entry in entries]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"duplicate entry names in the spec: {duplicates}")
        object.__setattr__(self, "entries", entries)

    @property
    def size(self) -> int:
        """Length of the flat vector: the total number of elements."""
        return sum(entry.numel for entry in self.entries)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(entry.name for entry in self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    def __iter__(self) -> Iterator[StateEntry]:
        return iter(self.entries)

    def slices(self) -> dict[str, slice]:
        """Where each entry lives in the flat vector."""
        out: dict[str, slice] = {}
        offset = 0
        for entry in self.entries:
            out[entry.name] = slice(offset, offset + entry.numel)
            offset += entry.numel
        return out

    def to_dict(self) -> dict[str, list[dict[str, Any]]]:
        """A JSON-ready description (dtypes by name, e.g. ``"float32"``)."""
        return {"entries": [{"name": e.name, "shape": list(e.shape),
                             "dtype": str(e.dtype).removeprefix("torch.")}
                            for e in self.entries]}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> StateSpec:
        """Inverse of :meth:`to_dict`; validates every field."""
        raw = data.get("entries") if isinstance(data, Mapping) else None
        if not isinstance(raw, Sequence) or isinstance(raw, str):
            raise ValueError("a state spec must be a mapping with a list of 'entries'")
        entries: list[StateEntry] = []
        for item in raw:
            if not isinstance(item, Mapping) or set(item) != {"name", "shape", "dtype"}:
                raise ValueError(f"each spec entry needs exactly name, shape and dtype; "
                                 f"got {item!r}")
            dtype = getattr(torch, str(item["dtype"]), None)
            if not isinstance(dtype, torch.dtype):
                raise ValueError(f"{item['name']}: unknown torch dtype {item['dtype']!r}")
            shape = item["shape"]
            if not isinstance(shape, Sequence) or isinstance(shape, str):
                raise ValueError(f"{item['name']}: shape must be a list, got {shape!r}")
            entries.append(StateEntry(name=item["name"], shape=tuple(shape), dtype=dtype))
        return cls(entries=tuple(entries))


# ------------------------------------------------------------------ helpers


def _check_dtype(name: str, dtype: torch.dtype) -> None:
    if dtype.is_complex:
        raise ValueError(f"{name}: complex tensors ({dtype}) cannot be flattened into a real "
                         "vector")
    if dtype in (torch.qint8, torch.quint8, torch.qint32, torch.quint4x2, torch.quint2x4):
        raise ValueError(f"{name}: quantized tensors ({dtype}) are not supported; "
                         "dequantize them first")


def _numpy_dtype(dtype: torch.dtype) -> np.dtype[Any]:
    return torch.empty(0, dtype=dtype).numpy().dtype


def _checked_tensor(name: object, value: object) -> torch.Tensor:
    if not isinstance(name, str):
        raise TypeError(f"state keys must be strings, got {name!r}")
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(value).__name__}")
    if value.layout != torch.strided:
        raise ValueError(f"{name}: only dense tensors are supported, got layout {value.layout}")
    if value.is_quantized:
        raise ValueError(f"{name}: quantized tensors are not supported; dequantize them first")
    if value.is_meta:
        raise ValueError(f"{name}: a meta tensor has no data to flatten")
    _check_dtype(name, value.dtype)
    return value


def _items(state: StateDict, what: str = "state") -> list[tuple[str, torch.Tensor]]:
    if not isinstance(state, Mapping):
        raise TypeError(f"{what} must be a mapping of names to tensors (a state_dict), "
                        f"got {type(state).__name__}")
    return [(name, _checked_tensor(name, value)) for name, value in state.items()]


def _to_float64(name: str, tensor: torch.Tensor) -> np.ndarray:
    """The tensor's values as a fresh 1-D float64 array, exactly (or an error)."""
    t = tensor.detach().cpu()
    if t.dtype.is_floating_point:
        out: np.ndarray = t.to(torch.float64).reshape(-1).numpy().copy()
        return out
    values = t.reshape(-1).numpy()  # integers and bool: check in the integer domain
    if values.dtype != np.bool_ and values.size and (
            values.max() > MAX_EXACT_INTEGER or values.min() < -MAX_EXACT_INTEGER):
        bad = values[(values > MAX_EXACT_INTEGER) | (values < -MAX_EXACT_INTEGER)][0]
        raise ValueError(f"{name}: integer value {int(bad)} exceeds 2^53 in magnitude and "
                         "would not round-trip exactly through float64")
    converted: np.ndarray = values.astype(np.float64)
    return converted


def _from_float64(entry: StateEntry, values: np.ndarray) -> torch.Tensor:
    """A fresh tensor of ``entry``'s dtype and shape from float64 ``values``."""
    if entry.is_floating:
        flat = torch.from_numpy(np.array(values, dtype=np.float64, copy=True))
        return flat.to(entry.dtype).reshape(entry.shape)
    if entry.dtype == torch.bool:
        rounded = np.rint(values)
        if not np.all(np.isfinite(rounded)):
            raise ValueError(f"{entry.name}: non-finite value for a bool tensor")
        return torch.from_numpy(rounded != 0).reshape(entry.shape).clone()
    info = torch.iinfo(entry.dtype)
    rounded = np.rint(values)
    lower, upper = float(info.min), float(info.max + 1)  # both powers of two (or 0): exact
    bad = ~np.isfinite(rounded) | (rounded < lower) | (rounded >= upper)
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        raise ValueError(f"{entry.name}: value {values[first]!r} at element {first} does not "
                         f"fit {entry.dtype} [{info.min}, {info.max}]")
    return torch.from_numpy(rounded.astype(_numpy_dtype(entry.dtype))).reshape(entry.shape)


# --------------------------------------------------------------------- API


def state_spec(state: StateDict, *, floating_only: bool = False) -> StateSpec:
    """The :class:`StateSpec` of ``state`` (only its floating entries if ``floating_only``)."""
    return StateSpec(entries=tuple(
        StateEntry(name=name, shape=tuple(t.shape), dtype=t.dtype)
        for name, t in _items(state)
        if not floating_only or t.dtype.is_floating_point))


def flatten_state(state: StateDict, *,
                  floating_only: bool = False) -> tuple[np.ndarray, StateSpec]:
    """Flatten ``state`` into ``(vector, spec)``: a fresh float64 ``(spec.size,)`` array.

    Entries keep the mapping's order. With ``floating_only`` the non-floating
    entries (integer counters, bool masks) are left out of both. Raises
    :class:`ValueError` for an integer beyond 2^53 in magnitude, a complex,
    quantized, sparse or meta tensor, and :class:`TypeError` for a non-tensor.
    """
    spec = state_spec(state, floating_only=floating_only)
    wanted = set(spec.names)
    parts = [_to_float64(name, t) for name, t in state.items() if name in wanted]
    vector = np.concatenate(parts) if parts else np.zeros(0, dtype=np.float64)
    return vector, spec


def unflatten_state(vector: np.ndarray | Sequence[float],
                    spec: StateSpec) -> dict[str, torch.Tensor]:
    """Rebuild the named tensors that ``spec`` describes from a flat vector.

    The vector must be 1-D with exactly ``spec.size`` entries (any real dtype;
    it is read as float64). Floating entries are rounded to their dtype (exact
    for a vector made by :func:`flatten_state`); integer and bool entries are
    rounded to the nearest integer and range-checked (see the module docstring).
    """
    if not isinstance(spec, StateSpec):
        raise TypeError(f"spec must be a StateSpec, got {type(spec).__name__}")
    try:
        arr = np.asarray(vector, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"vector must be real numbers: {exc}") from exc
    if arr.ndim != 1:
        raise ValueError(f"vector must be 1-D, got shape {arr.shape}")
    if arr.shape[0] != spec.size:
        raise ValueError(f"vector has {arr.shape[0]} coordinates but the spec describes "
                         f"{spec.size} ({len(spec)} tensors): it was flattened from a "
                         "different model or with a different floating_only setting")
    return {entry.name: _from_float64(entry, arr[where])
            for entry, where in zip(spec.entries, spec.slices().values(), strict=True)}


def _match(new: StateDict, old: StateDict, what: str) -> list[tuple[str, torch.Tensor,
                                                                    torch.Tensor]]:
    new_items, old_items = _items(new, what), dict(_items(old, what))
    missing = sorted(set(old_items) - {name for name, _ in new_items})
    extra = sorted({name for name, _ in new_items} - set(old_items))
    if missing or extra:
        raise ValueError(f"{what}: the two states have different entries; "
                         f"only in the first: {extra}, only in the second: {missing}")
    out = []
    for name, a in new_items:
        b = old_items[name]
        if a.shape != b.shape:
            raise ValueError(f"{name}: shape {tuple(a.shape)} vs {tuple(b.shape)}")
        if a.dtype != b.dtype:
            raise ValueError(f"{name}: dtype {a.dtype} vs {b.dtype}")
        out.append((name, a, b))
    return out


def state_delta(new: StateDict, old: StateDict, *,
                floating_only: bool = True) -> dict[str, torch.Tensor]:
    """``new - old`` entry by entry, in ``new``'s order; floating entries only by default.

    Floating differences are float64 tensors (computed in float64). With
    ``floating_only=False`` integer entries are included as int64 differences;
    a bool entry then raises :class:`ValueError` (a bool has no difference).
    Both states must have the same names, shapes and dtypes.
    """
    delta: dict[str, torch.Tensor] = {}
    for name, a, b in _match(new, old, "state_delta"):
        if a.dtype.is_floating_point:
            delta[name] = (a.detach().cpu().to(torch.float64)
                           - b.detach().cpu().to(torch.float64))
        elif floating_only:
            continue
        elif a.dtype == torch.bool:
            raise ValueError(f"{name}: bool tensors have no delta; use floating_only=True")
        else:
            delta[name] = a.detach().cpu().to(torch.int64) - b.detach().cpu().to(torch.int64)
    return delta


def apply_delta(state: StateDict, delta: StateDict) -> dict[str, torch.Tensor]:
    """``state + delta`` as a new state with ``state``'s names, order, shapes and dtypes.

    ``delta`` may cover a subset of the entries (e.g. floating only); the others
    are copied unchanged. Floating entries are added in float64 and rounded once
    to their dtype; integer entries get the delta rounded to the nearest integer
    (ties to even). A delta entry that ``state`` lacks, or of another shape, is a
    :class:`ValueError`.
    """
    items = _items(state)
    delta_items = dict(_items(delta, "delta"))
    unknown = sorted(set(delta_items) - {name for name, _ in items})
    if unknown:
        raise ValueError(f"apply_delta: the delta has entries the state lacks: {unknown}")
    out: dict[str, torch.Tensor] = {}
    for name, t in items:
        base = t.detach().cpu()
        d = delta_items.get(name)
        if d is None:
            out[name] = base.clone()
            continue
        if d.shape != t.shape:
            raise ValueError(f"{name}: delta shape {tuple(d.shape)} vs state shape "
                             f"{tuple(t.shape)}")
        d = d.detach().cpu().to(torch.float64)
        if t.dtype.is_floating_point:
            out[name] = (base.to(torch.float64) + d).to(t.dtype)
        elif t.dtype == torch.bool:
            raise ValueError(f"{name}: cannot add a delta to a bool tensor")
        else:
            entry = StateEntry(name=name, shape=tuple(t.shape), dtype=t.dtype)
            summed = _to_float64(name, base) + np.rint(d.reshape(-1).numpy())
            out[name] = _from_float64(entry, summed)
    return out
