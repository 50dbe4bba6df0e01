"""secagg.torch_state: state_dict <-> flat float64 vector, deltas, and the torch-missing hint."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
import torch
from torch import nn

from secagg.torch_state import (
    StateSpec,
    apply_delta,
    flatten_state,
    state_delta,
    state_spec,
    unflatten_state,
)

ROOT = Path(__file__).resolve().parents[1]


class Mixed(nn.Module):
    """Conv2d, BatchNorm (int64 counter), Linear, float16 and float64 parameters, odd buffers."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, kernel_size=3)
        self.bn = nn.BatchNorm2d(3)
        self.fc = nn.Linear(12, 5)
        self.w16 = nn.Parameter(torch.randn(4, 2).to(torch.float16))
        self.w64 = nn.Parameter(torch.randn(3, dtype=torch.float64))
        self.register_buffer("brain", torch.randn(2, 3).to(torch.bfloat16))
        self.register_buffer("mask", torch.tensor([True, False, True]))
        self.register_buffer("scalar", torch.tensor(7, dtype=torch.int32))
        self.register_buffer("empty", torch.zeros(0, 4))


def mixed_state(seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    model = Mixed()
    with torch.no_grad():
        assert model.bn.running_mean is not None and model.bn.running_var is not None
        assert model.bn.num_batches_tracked is not None
        model.bn.running_mean.normal_()
        model.bn.running_var.uniform_(0.5, 2.0)
        model.bn.num_batches_tracked.fill_(123456789)
    return model.state_dict()


def assert_same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert list(a) == list(b)
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        assert a[name].shape == b[name].shape, name
        assert torch.equal(a[name], b[name]), name


def test_round_trip_is_exact_for_mixed_shapes_and_dtypes() -> None:
    state = mixed_state()
    vector, spec = flatten_state(state)
    assert vector.dtype == np.float64 and vector.ndim == 1
    assert spec.size == vector.shape[0] == sum(t.numel() for t in state.values())
    assert spec.names == tuple(state)
    dtypes = {e.name: e.dtype for e in spec}
    assert dtypes["bn.num_batches_tracked"] == torch.int64
    assert dtypes["w16"] == torch.float16 and dtypes["w64"] == torch.float64
    assert dtypes["brain"] == torch.bfloat16 and dtypes["mask"] == torch.bool
    back = unflatten_state(vector, spec)
    assert_same_state(back, state)
    assert back["bn.num_batches_tracked"].shape == ()
    assert int(back["bn.num_batches_tracked"]) == 123456789
    # Loads into a fresh model and gives back the very same state.
    model = Mixed()
    model.load_state_dict(back)
    assert_same_state(model.state_dict(), state)


def test_returned_tensors_do_not_alias_the_vector() -> None:
    state = mixed_state()
    vector, spec = flatten_state(state)
    back = unflatten_state(vector, spec)
    vector[:] = 0.0
    assert_same_state(back, state)


def test_spec_serializes_to_json_and_back() -> None:
    _, spec = flatten_state(mixed_state())
    again = StateSpec.from_dict(json.loads(json.dumps(spec.to_dict())))
    assert again == spec
    with pytest.raises(ValueError, match="unknown torch dtype"):
        StateSpec.from_dict({"entries": [{"name": "w", "shape": [2], "dtype": "float99"}]})


def test_floating_only_leaves_out_integer_and_bool_entries() -> None:
    state = mixed_state()
    vector, spec = flatten_state(state, floating_only=True)
    assert "bn.num_batches_tracked" not in spec.names
    assert "mask" not in spec.names and "scalar" not in spec.names
    assert all(e.is_floating for e in spec)
    assert state_spec(state, floating_only=True) == spec
    back = unflatten_state(vector, spec)
    for name, tensor in back.items():
        assert torch.equal(tensor, state[name])


def test_integers_beyond_2_53_are_refused_and_2_53_round_trips() -> None:
    exact = {"n": torch.tensor([2**53, -(2**53)], dtype=torch.int64)}
    vector, spec = flatten_state(exact)
    assert torch.equal(unflatten_state(vector, spec)["n"], exact["n"])
    with pytest.raises(ValueError, match="2\\^53"):
        flatten_state({"n": torch.tensor([2**53 + 1], dtype=torch.int64)})


def test_integer_entries_are_rounded_and_range_checked() -> None:
    spec = state_spec({"u": torch.zeros(3, dtype=torch.uint8),
                       "b": torch.zeros(2, dtype=torch.bool)})
    out = unflatten_state(np.array([1.4, 2.6, 255.0, 0.2, 0.7]), spec)
    assert out["u"].tolist() == [1, 3, 255] and out["u"].dtype == torch.uint8
    assert out["b"].tolist() == [False, True]
    with pytest.raises(ValueError, match="does not fit"):
        unflatten_state(np.array([0.0, 256.0, 0.0, 0.0, 0.0]), spec)
    with pytest.raises(ValueError, match="does not fit"):
        unflatten_state(np.array([np.nan, 0.0, 0.0, 0.0, 0.0]), spec)


def test_wrong_vector_length_or_shape_is_a_clear_error() -> None:
    vector, spec = flatten_state(mixed_state())
    with pytest.raises(ValueError, match=f"{spec.size - 1} coordinates but the spec describes "
                                         f"{spec.size}"):
        unflatten_state(vector[:-1], spec)
    with pytest.raises(ValueError, match=f"{spec.size + 1} coordinates"):
        unflatten_state(np.append(vector, 0.0), spec)
    with pytest.raises(ValueError, match="1-D"):
        unflatten_state(vector.reshape(1, -1), spec)


def test_unsupported_values_are_refused() -> None:
    with pytest.raises(TypeError, match=r"torch\.Tensor"):
        flatten_state({"w": np.zeros(3)})  # type: ignore[dict-item]
    with pytest.raises(ValueError, match="complex"):
        flatten_state({"w": torch.zeros(2, dtype=torch.complex64)})
    with pytest.raises(ValueError, match="dense"):
        flatten_state({"w": torch.eye(3).to_sparse()})


def test_delta_and_apply_delta() -> None:
    torch.manual_seed(1)
    model = Mixed()
    old = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    x = torch.randn(8, 2, 4, 4)
    out = model.bn(model.conv(x)).flatten(1)
    loss = model.fc(out).square().mean() + model.w16.float().sum() + model.w64.sum()
    loss.backward()
    optimizer.step()
    new = model.state_dict()
    assert int(new["bn.num_batches_tracked"]) == 1

    delta = state_delta(new, old)
    assert set(delta) == {k for k, v in old.items() if v.dtype.is_floating_point}
    assert all(d.dtype == torch.float64 for d in delta.values())
    assert float(delta["fc.weight"].abs().max()) > 0  # something moved
    applied = apply_delta(old, delta)
    # float32, float16 and bfloat16 entries come back exactly (the float64 difference
    # of nearby values is exact); float64 ones to within float64 rounding. Integer
    # counters (not in the delta) keep the base state's value.
    for name in delta:
        assert applied[name].dtype == old[name].dtype
        if old[name].dtype == torch.float64:
            torch.testing.assert_close(applied[name], new[name], rtol=1e-15, atol=1e-15)
        else:
            assert torch.equal(applied[name], new[name]), name
    assert int(applied["bn.num_batches_tracked"]) == 0
    assert list(applied) == list(old)

    # Through the flat vector and back, as secure aggregation carries it.
    vector, spec = flatten_state(delta)
    assert_same_state(unflatten_state(vector, spec), delta)

    # Bool entries have no delta; integer ones do, on request.
    with pytest.raises(ValueError, match="bool"):
        state_delta(new, old, floating_only=False)
    no_bool_new = {k: v for k, v in new.items() if v.dtype != torch.bool}
    no_bool_old = {k: v for k, v in old.items() if v.dtype != torch.bool}
    with_ints = state_delta(no_bool_new, no_bool_old, floating_only=False)
    assert int(with_ints["bn.num_batches_tracked"]) == 1
    assert int(apply_delta(no_bool_old, with_ints)["bn.num_batches_tracked"]) == 1


def test_delta_mismatches_are_refused() -> None:
    a = {"w": torch.zeros(2, 3), "b": torch.zeros(3)}
    with pytest.raises(ValueError, match="different entries"):
        state_delta(a, {"w": torch.zeros(2, 3)})
    with pytest.raises(ValueError, match="shape"):
        state_delta(a, {"w": torch.zeros(3, 2), "b": torch.zeros(3)})
    with pytest.raises(ValueError, match="dtype"):
        state_delta(a, {"w": torch.zeros(2, 3, dtype=torch.float64), "b": torch.zeros(3)})
    with pytest.raises(ValueError, match="lacks"):
        apply_delta(a, {"v": torch.zeros(1)})
    with pytest.raises(ValueError, match="shape"):
        apply_delta(a, {"w": torch.zeros(6)})


def run_without_torch(code: str) -> subprocess.CompletedProcess[str]:
    prelude = "import sys\nsys.modules['torch'] = None  # as if PyTorch were not installed\n"
    return subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code)], cwd=ROOT,
                          capture_output=True, text=True, timeout=60, check=False)


def test_missing_torch_gives_an_install_hint() -> None:
    result = run_without_torch("""
        try:
            import secagg.torch_state
        except ImportError as exc:
            print("MESSAGE:", exc)
        # peers.fedavg imports without torch, and says what to install when used.
        import peers.fedavg
        try:
            peers.fedavg.update_spec({})
        except ImportError as exc:
            print("FEDAVG:", exc)
    """)
    assert result.returncode == 0, result.stderr
    assert ("MESSAGE: secagg.torch_state needs PyTorch: pip install torch==2.13.0 (CPU build) "
            "or the project's 'torch' extra") in result.stdout
    assert "FEDAVG: peers.fedavg needs PyTorch: pip install torch==2.13.0" in result.stdout
