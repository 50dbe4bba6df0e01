"""The wire codec: round trips for every message type and strict rejection of bad frames.

The central property: :func:`secagg.wire.decode` either returns a valid
:class:`~secagg.wire.Envelope` or raises :class:`~secagg.errors.WireError`,
whatever bytes it is given.
"""

from __future__ import annotations

import dataclasses
import math
import tracemalloc
import typing
from typing import Annotated, Any, get_args, get_origin

import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from secagg import wire
from secagg.errors import WireError
from secagg.wire import SERVER, Envelope, Limits

SESSION = bytes(range(16))
DIM = 7


def key(tag: int) -> bytes:
    return bytes((tag + i) % 256 for i in range(32))


ENTRY = wire.PeerEntry(index=3, name="peer-00003", address="ws://10.0.0.3:8765",
                       channel_key=key(1), mask_key=key(2), identity_key=key(3),
                       signature=bytes(range(64)))
ENTRY_PLAIN = wire.PeerEntry(index=0, name="alice@lab.example:1", address="",
                             channel_key=key(4), mask_key=key(5))
U32 = np.array([0, 1, 2**31, 2**32 - 1, 12345, 7, 99], dtype=np.uint32)
U64 = np.array([0, 1, 2**63, 2**64 - 1, 2**40 + 3, 5, 6], dtype=np.uint64)


def _samples() -> dict[str, wire.Message]:
    """One realistic instance of every message type, built by hand."""
    samples: list[wire.Message] = [
        wire.AdvertiseKeys(address="ws://127.0.0.1:9001", channel_key=key(10),
                           mask_key=key(11)),
        wire.Roster(your_index=2, size=10, threshold=6, dim=DIM, modulus_bits=32, clip=1.0,
                    scale=float(2**20), weighted=False, max_weight=1.0,
                    threat_model="honest-but-curious", graph_kind="complete",
                    graph_seed=key(12), degree=9, share_threshold=6, fan_in=8,
                    phase_timeout=30.0, neighbours=[ENTRY_PLAIN, ENTRY]),
        wire.EncryptedShares(ciphertext=bytes(range(12 + 80 + 16))),
        wire.ShareReport(missing_from=[0, 1, 2, 5, 9]),
        wire.MaskingStart(survivors=[0, 2, 3], total_survivors=8, tree_seed=key(13),
                          ancestors=[4, 0], descendants=[5, 6, 7], descendant_parents=[2, 2, 5],
                          contacts=[ENTRY, ENTRY_PLAIN], forward_after=2.5),
        wire.EncryptedPartialSum(ciphertext=bytes(300)),
        wire.PartialSum(payload=U32.astype("<u4").tobytes(), contributors=[1, 2, 8]),
        wire.AncestorsUnreachable(tried=[4, 0]),
        wire.NewRoot(root=ENTRY, expected=[1, 2], contacts=[ENTRY_PLAIN],
                     forward_after=1.25),
        wire.RootAggregate(payload=U64.astype("<u8").tobytes(), contributors=[0, 1, 2, 3, 4, 5]),
        wire.RootAbort(contributor_count=2),
        wire.ConsistencyRequest(contributors=[0, 1, 3, 4]),
        wire.ConsistencySignature(signature=bytes(range(64, 128))),
        wire.UnmaskRequest(contributors=[0, 1, 3], dropped=[2],
                           total_contributors=3,
                           signatures=[wire.SignedIndex(index=1, signature=bytes(64))],
                           self_mask_wanted=[0, 3], secret_key_wanted=[2]),
        wire.UnmaskShares(self_mask_shares=bytes(range(66)), secret_key_shares=bytes(range(33))),
        wire.PeerDropped(peer=4),
        wire.Refusal(reason="asked for both shares of peer 3"),
        wire.RoundOutcome(status="ok", contributor_count=2, included=True,
                          contributors=["peer-00000", "peer-00001"], reason=""),
        wire.RoundOpen(dim=DIM, weighted=True, max_peers=10, mode="hybrid",
                       paillier_key_bits=3072, phase_timeout=30.0),
        wire.Rejected(reason="registration for this round is closed"),
        wire.Withdraw(reason="input has 3 coordinates, the round expects 4"),
        wire.Forward(recipient="peer-00004", frame=b"\x00\x01" * 40),
    ]
    return {sample.TYPE: sample for sample in samples}


SAMPLES = _samples()
LIMITS = Limits(max_peers=10, dim=DIM)


def envelope(body: wire.Message, sender: str = "peer-00001", round: int = 4) -> Envelope:
    return Envelope(session=SESSION, round=round, sender=sender, body=body)


def raw_frame(body: wire.Message) -> list[Any]:
    raw = msgpack.unpackb(wire.encode(envelope(body)), raw=False)
    assert isinstance(raw, list)
    return raw


def pack(raw: Any) -> bytes:
    packed: bytes = msgpack.packb(raw, use_bin_type=True)
    return packed


def assert_same(a: Any, b: Any) -> None:
    """Deep equality that also compares numpy vectors by dtype and value."""
    if isinstance(a, np.ndarray):
        assert isinstance(b, np.ndarray)
        assert a.dtype == b.dtype and a.shape == b.shape
        assert np.array_equal(a, b)
    elif dataclasses.is_dataclass(a):
        assert type(a) is type(b)
        for f in dataclasses.fields(a):
            assert_same(getattr(a, f.name), getattr(b, f.name))
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            assert_same(x, y)
    else:
        assert type(a) is type(b) and a == b, (a, b)


def rejects(frame: bytes, limits: Limits | None = LIMITS, match: str | None = None) -> str:
    with pytest.raises(WireError, match=match) as info:
        wire.decode(frame, limits)
    return str(info.value)


# --------------------------------------------------------------------------
# Round trips


def test_every_registered_type_has_a_sample() -> None:
    assert set(SAMPLES) == set(wire.message_types())
    for name, cls in wire.message_types().items():
        assert name == cls.TYPE
        assert isinstance(SAMPLES[name], cls)


@pytest.mark.parametrize("type_name", sorted(SAMPLES))
@pytest.mark.parametrize("sender", ["peer-00001", SERVER])
def test_round_trip(type_name: str, sender: str) -> None:
    body = SAMPLES[type_name]
    env = envelope(body, sender=sender, round=2**32 - 1)
    frame = wire.encode(env)
    assert isinstance(frame, bytes)
    decoded = wire.decode(frame, LIMITS)
    assert decoded.type == type_name
    assert (decoded.session, decoded.round, decoded.sender) == (SESSION, 2**32 - 1, sender)
    assert_same(decoded.body, body)
    # Encoding is canonical: decoding and re-encoding gives the same bytes.
    assert wire.encode(decoded) == frame


def test_frame_layout() -> None:
    raw = raw_frame(wire.Refusal(reason="no"))
    assert raw == [wire.WIRE_VERSION, "refusal", SESSION, 4, "peer-00001", {"reason": "no"}]


def test_record_round_trip() -> None:
    pair = wire.SharePair(self_mask_share=bytes(range(33)), secret_key_share=bytes(33))
    assert wire.decode_record(wire.SharePair, wire.encode_record(pair)) == pair
    with pytest.raises(WireError):
        wire.decode_record(wire.SharePair, wire.encode_record(
            wire.SharePair(self_mask_share=bytes(32), secret_key_share=bytes(33))))


def test_decode_accepts_bytearray_and_memoryview() -> None:
    frame = wire.encode(envelope(SAMPLES["refusal"]))
    for view in (bytearray(frame), memoryview(frame)):
        assert wire.decode(view).body == SAMPLES["refusal"]  # type: ignore[arg-type]


def test_for_round_limits_fit_the_largest_legitimate_frames() -> None:
    n, dim = 50, 1000
    limits = Limits.for_round(max_peers=n, dim=dim, modulus_bits=64)
    entries = [dataclasses.replace(ENTRY, index=i, name=f"peer-{i:05d}") for i in range(n)]
    roster = dataclasses.replace(SAMPLES["roster"], size=n, dim=dim, neighbours=entries)
    aggregate = wire.RootAggregate(payload=np.arange(dim, dtype="<u8").tobytes(),
                                   contributors=list(range(n)))
    start = dataclasses.replace(SAMPLES["masking_start"], survivors=list(range(n)),
                                descendants=list(range(n)), descendant_parents=list(range(n)),
                                contacts=entries)
    for body in (roster, aggregate, start):
        decoded = wire.decode(wire.encode(envelope(body)), limits)
        assert decoded.type == body.TYPE
    with pytest.raises(WireError):
        wire.decode(wire.encode(envelope(wire.RootAggregate(
            payload=bytes(8 * dim), contributors=[0]))), dataclasses.replace(
                limits, payload_bytes=8 * dim - 8))


# --------------------------------------------------------------------------
# Envelope-level rejection


@pytest.mark.parametrize("frame", [
    b"", b"\x00", b"\xc1", b"hello world", bytes(range(256)), b"\x96" + b"\x01" * 5,
    pack({"version": 1}), pack([1, "refusal", SESSION, 0, "peer-1"]),
    pack([1, "refusal", SESSION, 0, "peer-1", {"reason": "x"}, "extra"]),
    pack("refusal"), pack(None), pack(12),
])
def test_garbage_is_rejected(frame: bytes) -> None:
    rejects(frame)


def test_non_bytes_input_is_rejected() -> None:
    with pytest.raises(WireError):
        wire.decode("not bytes")  # type: ignore[arg-type]


def test_trailing_bytes_are_rejected() -> None:
    frame = wire.encode(envelope(SAMPLES["refusal"]))
    rejects(frame + b"\x00")
    rejects(frame + frame)


@pytest.mark.parametrize("type_name", sorted(SAMPLES))
def test_every_truncation_is_rejected(type_name: str) -> None:
    frame = wire.encode(envelope(SAMPLES[type_name]))
    step = max(1, len(frame) // 200)
    for cut in [*range(0, len(frame), step), len(frame) - 1]:
        with pytest.raises(WireError):
            wire.decode(frame[:cut], LIMITS)


@pytest.mark.parametrize("version", [0, 2, -1, 2**40, "1", b"\x01", None, [1]])
def test_wrong_version_is_rejected(version: object) -> None:
    raw = raw_frame(SAMPLES["refusal"])
    raw[0] = version
    rejects(pack(raw), match="version")


# Regression test (was a strict xfail documenting a bug, since fixed).
@pytest.mark.parametrize("version", [True, 1.0])
def test_version_must_be_an_integer(version: object) -> None:
    raw = raw_frame(SAMPLES["refusal"])
    raw[0] = version
    rejects(pack(raw), match="version")


@pytest.mark.parametrize("type_name", ["nope", "", "Refusal", "refusal ", 5, None, b"refusal"])
def test_unknown_type_is_rejected(type_name: object) -> None:
    raw = raw_frame(SAMPLES["refusal"])
    raw[1] = type_name
    rejects(pack(raw), match="unknown message type")


@pytest.mark.parametrize("session", [b"", bytes(15), bytes(17), "a" * 16, 16, None])
def test_wrong_session_is_rejected(session: object) -> None:
    raw = raw_frame(SAMPLES["refusal"])
    raw[2] = session
    rejects(pack(raw), match="session")


@pytest.mark.parametrize("round_number", [-1, -(2**63), 2**32, 2**64 - 1, True, False, 1.0,
                                          "1", None])
def test_bad_round_is_rejected(round_number: object) -> None:
    raw = raw_frame(SAMPLES["refusal"])
    raw[3] = round_number
    rejects(pack(raw), match="round")


@pytest.mark.parametrize("sender", ["", "a" * 65, "bad name", "peer/1", "peer\n", "pé",
                                    "peer-1\x00", 5, None, b"peer-1"])
def test_bad_sender_is_rejected(sender: object) -> None:
    raw = raw_frame(SAMPLES["refusal"])
    raw[4] = sender
    rejects(pack(raw), match="sender")


@pytest.mark.parametrize("sender", ["a", "a" * 64, "peer-00001", "x_y.z:1@host-2", SERVER])
def test_good_senders_are_accepted(sender: str) -> None:
    assert wire.decode(wire.encode(envelope(SAMPLES["refusal"], sender=sender))).sender == sender


def test_oversized_frame_is_rejected_before_parsing() -> None:
    frame = wire.encode(envelope(SAMPLES["refusal"]))
    assert wire.decode(frame, Limits(max_frame_bytes=len(frame))).type == "refusal"
    rejects(frame, Limits(max_frame_bytes=len(frame) - 1), match="exceeds")
    # Even garbage that long is refused by its size, not parsed.
    rejects(b"\xff" * 2048, Limits(max_frame_bytes=1024), match="exceeds")


def test_default_limits_bound_frames() -> None:
    assert Limits().max_frame_bytes == 64 << 20
    big = wire.EncryptedPartialSum(ciphertext=bytes((64 << 20) + 1))
    rejects(wire.encode(envelope(big)), None, match="exceeds")


# --------------------------------------------------------------------------
# Body-level rejection


def _required_fields() -> list[tuple[str, str]]:
    out = []
    for name, cls in sorted(wire.message_types().items()):
        for f in dataclasses.fields(cls):
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                out.append((name, f.name))
    return out


@pytest.mark.parametrize(("type_name", "field"), _required_fields())
def test_missing_field_is_rejected(type_name: str, field: str) -> None:
    raw = raw_frame(SAMPLES[type_name])
    del raw[5][field]
    message = rejects(pack(raw), match="missing field")
    assert field in message and type_name in message


def test_fields_at_their_default_are_omitted_and_restored() -> None:
    raw = raw_frame(SAMPLES["advertise_keys"])
    assert "identity_key" not in raw[5] and "signature" not in raw[5]
    body = wire.decode(pack(raw)).body
    assert isinstance(body, wire.AdvertiseKeys)
    assert (body.identity_key, body.signature) == (b"", b"")
    signed = wire.AdvertiseKeys(address="", channel_key=key(1), mask_key=key(2),
                                identity_key=key(3), signature=bytes(64))
    raw = raw_frame(signed)
    assert raw[5]["identity_key"] == key(3) and raw[5]["signature"] == bytes(64)
    assert wire.decode(pack(raw)).body == signed


@pytest.mark.parametrize("type_name", sorted(SAMPLES))
def test_unknown_extra_field_is_rejected(type_name: str) -> None:
    raw = raw_frame(SAMPLES[type_name])
    raw[5]["surprise"] = 1
    assert "surprise" in rejects(pack(raw), match="unknown field")


def test_unknown_field_in_nested_record_is_rejected() -> None:
    raw = raw_frame(SAMPLES["roster"])
    raw[5]["neighbours"][1]["admin"] = True
    rejects(pack(raw), match="unknown field")


def test_bytes_map_keys_are_not_field_names() -> None:
    raw = raw_frame(SAMPLES["refusal"])
    raw[5] = {b"reason": "x"}
    rejects(pack(raw))


@pytest.mark.parametrize("body", [None, [], "reason", 5, [["reason", "x"]]])
def test_body_must_be_a_map(body: object) -> None:
    raw = raw_frame(SAMPLES["refusal"])
    raw[5] = body
    rejects(pack(raw), match="map")


BAD_FIELDS: list[tuple[str, str, object, str]] = [
    # (type, field, bad value, what it shows)
    ("share_report", "missing_from", ["1"], "str where int"),
    ("share_report", "missing_from", [1.0], "float where int"),
    ("share_report", "missing_from", [True], "bool where int"),
    ("share_report", "missing_from", [None], "None where int"),
    ("share_report", "missing_from", 3, "int where list"),
    ("share_report", "missing_from", {"0": 1}, "map where list"),
    ("share_report", "missing_from", [-1], "negative index"),
    ("share_report", "missing_from", [10], "index == max_peers"),
    ("share_report", "missing_from", [2**64 - 1], "huge index"),
    ("root_abort", "contributor_count", True, "bool where count"),
    ("root_abort", "contributor_count", 11, "count > max_peers"),
    ("root_abort", "contributor_count", -1, "negative count"),
    ("root_abort", "contributor_count", "2", "str where count"),
    ("roster", "your_index", True, "bool where index"),
    ("roster", "your_index", 10, "index out of range"),
    ("roster", "dim", 0, "dim below range"),
    ("roster", "modulus_bits", 16, "modulus below range"),
    ("roster", "modulus_bits", 65, "modulus above range"),
    ("roster", "fan_in", 1, "fan-in below range"),
    ("roster", "weighted", 1, "int where bool"),
    ("roster", "weighted", "yes", "str where bool"),
    ("roster", "clip", math.nan, "NaN"),
    ("roster", "clip", math.inf, "inf"),
    ("roster", "scale", -math.inf, "-inf"),
    ("roster", "clip", -1.0, "negative real"),
    ("roster", "clip", "1.0", "str where float"),
    ("roster", "clip", True, "bool where float"),
    ("roster", "phase_timeout", 86_400.5, "seconds above range"),
    ("roster", "threat_model", "x" * 33, "string too long"),
    ("roster", "threat_model", 1, "int where str"),
    ("roster", "threat_model", b"active", "bytes where str"),
    ("roster", "graph_seed", key(1)[:31], "seed too short"),
    ("roster", "graph_seed", key(1) + b"\x00", "seed too long"),
    ("roster", "graph_seed", "s" * 32, "str where bytes"),
    ("roster", "neighbours", [1], "int where record"),
    ("roster", "neighbours", {"index": 0}, "record where list"),
    ("masking_start", "forward_after", math.nan, "NaN seconds"),
    ("masking_start", "forward_after", -0.5, "negative seconds"),
    ("masking_start", "forward_after", None, "None where float"),
    ("masking_start", "tree_seed", None, "None where bytes"),
    ("masking_start", "ancestors", [0, "1"], "mixed list"),
    ("new_root", "root", None, "None where record"),
    ("new_root", "root", [], "list where record"),
    ("consistency_signature", "signature", bytes(63), "signature too short"),
    ("consistency_signature", "signature", bytes(65), "signature too long"),
    ("encrypted_shares", "ciphertext", bytes(257), "shares ciphertext too long"),
    ("encrypted_shares", "ciphertext", "ct", "str where bytes"),
    ("refusal", "reason", "r" * 513, "reason too long"),
    ("refusal", "reason", 5, "int where str"),
    ("refusal", "reason", None, "None where str"),
    ("round_outcome", "contributors", ["bad name"], "invalid peer name in list"),
    ("round_outcome", "contributors", ["a" * 65], "peer name too long"),
    ("round_outcome", "status", "s" * 17, "status too long"),
    ("round_outcome", "included", 1, "int where bool"),
    ("round_outcome", "contributor_count", 11, "count above max_peers"),
    ("forward", "recipient", "", "empty peer name"),
    ("forward", "recipient", "../etc", "peer name with a slash"),
    ("advertise_keys", "channel_key", bytes(31), "key too short"),
    ("advertise_keys", "identity_key", bytes(33), "optional key too long"),
    ("advertise_keys", "signature", bytes(65), "optional signature too long"),
    ("advertise_keys", "address", "a" * 257, "address too long"),
    ("round_open", "max_peers", 11, "count above max_peers"),
    ("round_open", "weighted", 0, "int where bool"),
    ("unmask_request", "signatures", [{"index": 0, "signature": bytes(63)}],
     "nested signature too short"),
    ("unmask_request", "signatures", [{"index": 10, "signature": bytes(64)}],
     "nested index out of range"),
    ("unmask_request", "total_contributors", 11, "count above max_peers"),
]


@pytest.mark.parametrize(("type_name", "field", "value", "what"), BAD_FIELDS,
                         ids=[f"{t}.{f}:{w}" for t, f, _, w in BAD_FIELDS])
def test_bad_field_value_is_rejected(type_name: str, field: str, value: object,
                                     what: str) -> None:
    raw = raw_frame(SAMPLES[type_name])
    cls = wire.message_types()[type_name]
    assert field in {f.name for f in dataclasses.fields(cls)}, f"{type_name} has no {field}"
    raw[5][field] = value
    message = rejects(pack(raw))
    assert field in message, message


def test_peer_index_range_follows_the_limits() -> None:
    body = wire.ShareReport(missing_from=[0, 9])
    frame = wire.encode(envelope(body))
    assert wire.decode(frame, Limits(max_peers=10)).body == body
    rejects(frame, Limits(max_peers=9), match="peer index 9")
    count = wire.encode(envelope(wire.RootAbort(contributor_count=10)))
    assert wire.decode(count, Limits(max_peers=10)).type == "root_abort"
    rejects(count, Limits(max_peers=9), match="count")


def test_list_longer_than_max_peers_is_rejected() -> None:
    limits = Limits(max_peers=20)
    ok = wire.encode(envelope(wire.ShareReport(missing_from=list(range(20)))))
    assert wire.decode(ok, limits).type == "share_report"
    # 21 entries (each a valid index) exceed max_peers.
    long = wire.encode(envelope(wire.ShareReport(missing_from=[0] * 21)))
    rejects(long, limits, match="exceeds")
    # Names are not indices but their list is bounded the same way.
    names = wire.encode(envelope(wire.RoundOutcome(status="ok", contributor_count=20,
                                                   included=False, contributors=["a"] * 21,
                                                   reason="")))
    rejects(names, limits, match="exceeds")
    # Far longer arrays are refused by the unpacker before any allocation per item.
    huge = wire.encode(envelope(wire.ShareReport(missing_from=[0] * 1000)))
    rejects(huge, limits)


@pytest.mark.parametrize("payload", [None, [1, 2, 3], "x" * 28, {"dtype": "u4"}, 28, True])
def test_malformed_payload_is_rejected(payload: object) -> None:
    raw = raw_frame(SAMPLES["partial_sum"])
    raw[5]["payload"] = payload
    rejects(pack(raw), Limits(max_peers=10), match="bytes")


@pytest.mark.parametrize("length", [0, 4 * DIM - 1, 4 * DIM + 1, 8 * DIM])
def test_payload_length_must_match_the_round(length: int) -> None:
    limits = dataclasses.replace(LIMITS, payload_bytes=4 * DIM)
    for body in (wire.PartialSum(payload=bytes(length), contributors=[0]),
                 wire.RootAggregate(payload=bytes(length), contributors=[0])):
        frame = wire.encode(envelope(body))
        rejects(frame, limits, match="payload")
        assert wire.decode(frame, Limits(max_peers=10)).type == body.TYPE  # no length set
    exact = wire.encode(envelope(wire.PartialSum(payload=bytes(4 * DIM), contributors=[0])))
    assert wire.decode(exact, limits).type == "partial_sum"


# --------------------------------------------------------------------------
# Fuzzing: decode raises WireError and nothing else.


def _decode_or_wire_error(frame: bytes, limits: Limits | None) -> Envelope | None:
    try:
        env = wire.decode(frame, limits)
    except WireError:
        return None
    # Whatever decodes is a well-formed envelope that re-encodes and decodes the same.
    assert isinstance(env, Envelope)
    assert env.type in wire.message_types()
    again = wire.decode(wire.encode(env), limits)
    assert_same(again.body, env.body)
    return env


FRAMES = [wire.encode(envelope(body)) for _, body in sorted(SAMPLES.items())]
FUZZ = settings(max_examples=1000, deadline=None)


@FUZZ
@given(st.binary(max_size=512), st.sampled_from([None, LIMITS, Limits(max_peers=1, dim=1)]))
def test_random_bytes_never_raise_anything_but_wire_error(frame: bytes,
                                                          limits: Limits | None) -> None:
    _decode_or_wire_error(frame, limits)


@FUZZ
@given(st.sampled_from(FRAMES),
       st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255),
                          st.sampled_from(["set", "xor", "insert", "delete"])),
                min_size=1, max_size=6),
       st.sampled_from([None, LIMITS]))
def test_mutated_frames_never_raise_anything_but_wire_error(
        frame: bytes, edits: list[tuple[int, int, str]], limits: Limits | None) -> None:
    data = bytearray(frame)
    for position, value, op in edits:
        if not data:
            break
        i = position % len(data)
        if op == "set":
            data[i] = value
        elif op == "xor":
            data[i] ^= value or 0x80
        elif op == "insert":
            data.insert(i, value)
        else:
            del data[i]
    _decode_or_wire_error(bytes(data), limits)


@FUZZ
@given(st.sampled_from(FRAMES), st.integers(0, 10_000), st.integers(0, 7))
def test_single_bit_flips_never_raise_anything_but_wire_error(frame: bytes, position: int,
                                                              bit: int) -> None:
    data = bytearray(frame)
    data[position % len(data)] ^= 1 << bit
    _decode_or_wire_error(bytes(data), LIMITS)


msgpack_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=20)
    | st.binary(max_size=40),
    lambda children: st.lists(children, max_size=5)
    | st.dictionaries(st.text(max_size=12) | st.sampled_from(["reason", "vector", "dtype",
                                                              "data", "index", "name"]),
                      children, max_size=5),
    max_leaves=20,
)


@FUZZ
@given(st.sampled_from(sorted(SAMPLES)), st.data())
def test_structured_garbage_bodies_never_raise_anything_but_wire_error(
        type_name: str, data: st.DataObject) -> None:
    raw = raw_frame(SAMPLES[type_name])
    body = raw[5]
    # Replace some fields with arbitrary msgpack values, delete or add others.
    for field in data.draw(st.lists(st.sampled_from(sorted(body) or ["x"]), max_size=4)):
        if data.draw(st.booleans()):
            body[field] = data.draw(msgpack_values)
        else:
            body.pop(field, None)
    if data.draw(st.booleans()):
        raw[5] = data.draw(msgpack_values)
    _decode_or_wire_error(pack(raw), LIMITS)


# --------------------------------------------------------------------------
# Schema-driven generation: any value the schema allows round-trips.


def _strategy(hint: Any, limits: Limits) -> st.SearchStrategy[Any]:
    markers: tuple[Any, ...] = ()
    if get_origin(hint) is Annotated:
        hint, *extra = get_args(hint)
        markers = tuple(extra)
    if hint is np.ndarray:
        dim = limits.dim or 4
        return st.sampled_from([np.uint32, np.uint64]).flatmap(
            lambda dt: st.lists(st.integers(0, int(np.iinfo(dt).max)), min_size=dim,
                                max_size=dim).map(lambda xs: np.array(xs, dtype=dt)))
    if hint is bool:
        return st.booleans()
    if hint is int:
        low, high = 0, 2**31 - 1
        for marker in markers:
            if isinstance(marker, wire.IntRange):
                low, high = marker.low, marker.high
            elif isinstance(marker, wire.PeerIndexMarker):
                low, high = 0, limits.max_peers - 1
            elif isinstance(marker, wire.CountMarker):
                low, high = 0, limits.max_peers
        return st.integers(low, high)
    if hint is float:
        (real,) = [m for m in markers if isinstance(m, wire.RealRange)]
        return st.floats(real.low, min(real.high, 1e12), allow_nan=False)
    if hint is str:
        (text,) = [m for m in markers if isinstance(m, wire.Text)]
        if text.pattern is not None:
            return st.from_regex(text.pattern.pattern.replace(r"\Z", ""), fullmatch=True)
        return st.text(max_size=min(text.max_len, 40))
    if hint is bytes:
        (blob,) = [m for m in markers if isinstance(m, wire.Blob)]
        if blob.exact is not None:
            return st.binary(min_size=blob.exact, max_size=blob.exact)
        return st.binary(max_size=min(blob.max_len, 100))
    if get_origin(hint) is list:
        (item,) = get_args(hint)
        return st.lists(_strategy(item, limits), max_size=min(limits.max_peers, 4))
    if dataclasses.is_dataclass(hint):
        hints = typing.get_type_hints(hint, include_extras=True)
        fields = {f.name: _strategy(hints[f.name], limits) for f in dataclasses.fields(hint)}
        return st.fixed_dictionaries(fields).map(lambda kw: hint(**kw))
    raise AssertionError(f"no strategy for {hint!r}")


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(sorted(SAMPLES)).flatmap(
    lambda name: _strategy(wire.message_types()[name], LIMITS)))
def test_any_schema_valid_body_round_trips(body: wire.Message) -> None:
    env = envelope(body)
    assert_same(wire.decode(wire.encode(env), LIMITS).body, body)


# --------------------------------------------------------------------------
# Bounded unpacking: no frame turns into much more memory than its own size.


def _nested_empty_arrays(size: int) -> bytes:
    # The shape of the reported frame (487 KB there): arrays of 1000 empty arrays, 1 byte
    # each in the frame and a 72-byte list each once unpacked.
    groups = size // 1003
    return b"\xdc" + groups.to_bytes(2, "big") + (b"\xdc\x03\xe8" + b"\x90" * 1000) * groups


HOSTILE_FRAMES = {
    "nested empty arrays": _nested_empty_arrays(100_000),
    "empty maps in a list field": pack([1, "share_report", SESSION, 0, "peer-1",
                                        {"missing_from": [{}] * 30_000}]),
    "empty arrays in a list field": pack([1, "share_report", SESSION, 0, "peer-1",
                                          {"missing_from": [[]] * 30_000}]),
    # Each header announces 65535 items: msgpack reserves room for them before reading.
    "stacked array headers": b"\x96" + b"\xdd\x00\x00\xff\xff" * 100,
    "deep nesting": b"\x91" * 1000 + b"\x00",
}


@pytest.mark.parametrize("name", sorted(HOSTILE_FRAMES))
def test_hostile_frames_are_rejected_before_they_expand(name: str) -> None:
    frame = HOSTILE_FRAMES[name]
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        with pytest.raises(WireError, match="malformed msgpack"):
            wire.decode(frame, Limits())
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # Before the bounds, these cost 64x (empty containers) to 16,000x (headers) the
    # frame's size; the allowance covers the error's traceback.
    assert peak <= len(frame) // 2 + (64 << 10), f"{peak} bytes for a {len(frame)}-byte frame"


def test_large_valid_frames_fit_the_bounds() -> None:
    n = 2000
    limits = Limits.for_round(max_peers=n, dim=10)
    entries = [dataclasses.replace(ENTRY_PLAIN, index=i, name=f"p{i}", address="")
               for i in range(n)]
    signed = [wire.SignedIndex(index=i, signature=bytes(64)) for i in range(n)]
    sample: dict[str, Any] = dict(SAMPLES)  # untyped: replace() wants a dataclass type
    for body in (
        dataclasses.replace(sample["roster"], neighbours=entries, size=n),
        dataclasses.replace(sample["masking_start"], contacts=entries,
                            survivors=list(range(n)), ancestors=list(range(n))),
        dataclasses.replace(sample["unmask_request"], signatures=signed,
                            contributors=list(range(n)), dropped=list(range(n))),
        wire.AncestorsUnreachable(tried=[]),  # the cheapest container a message can hold
        wire.ShareReport(missing_from=list(range(n))),
    ):
        env = envelope(body)
        assert_same(wire.decode(wire.encode(env), limits).body, body)


def test_nesting_deeper_than_any_message_is_rejected() -> None:
    raw = raw_frame(SAMPLES["unmask_request"])
    raw[5]["signatures"] = [{"index": [0], "signature": bytes(64)}]
    rejects(pack(raw), match="nested deeper than 4")
    # One level less is a schema error about the field, as before.
    raw[5]["signatures"] = [[1]]
    rejects(pack(raw), match=r"signatures\[0\]: body must be a map")


def test_announced_items_must_fit_in_the_frame() -> None:
    raw = raw_frame(SAMPLES["share_report"])
    frame = pack(raw)
    # Announce 15 items for the 6-element envelope: there are not 9 more bytes.
    rejects(b"\x9f" + frame[1:], match="truncated")
    rejects(b"\x96\xdc\xff\xff", match="truncated")


@pytest.mark.parametrize("item", [b"\xc7\x01\x05\x00", b"\xd4\x05\x00", b"\xc1"])
def test_ext_and_reserved_types_are_rejected(item: bytes) -> None:
    rejects(b"\x96" + item + b"\x00" * 5, match="unsupported type byte")


msgpack_any = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False, width=32) | st.text(max_size=300) | st.binary(max_size=300)
    | st.sampled_from(["x" * 40_000, b"y" * 70_000]),  # 16- and 32-bit lengths
    lambda children: st.lists(children, max_size=20)
    | st.dictionaries(st.text(max_size=8), children, max_size=20),
    max_leaves=40,
)
PERMISSIVE = wire._Shape(max_depth=1000, min_container_bytes=1)


@settings(max_examples=150, deadline=None)
@given(msgpack_any, st.booleans())
def test_scan_walks_every_msgpack_type_like_msgpack(value: Any, single_float: bool) -> None:
    frame = msgpack.packb(value, use_bin_type=True, use_single_float=single_float)
    wire._scan(frame, PERMISSIVE, max_array=1 << 20)  # accepts what msgpack wrote
    for cut in {0, 1, len(frame) // 2, len(frame) - 1} - {len(frame)}:
        with pytest.raises(WireError):
            wire._scan(frame[:cut], PERMISSIVE, max_array=1 << 20)
    with pytest.raises(WireError, match="extra data"):
        wire._scan(frame + b"\x00", PERMISSIVE, max_array=1 << 20)


@pytest.mark.parametrize("indices", [[5] * 6, [200] * 6, [300] * 6, [5, 200, 300, 7, 7, 7]])
def test_cut_inside_a_run_of_integers_is_rejected(indices: list[int]) -> None:
    # The scanner skips runs of same-size integers at once; a cut token must end the
    # run as a truncation (it once made the scan loop forever).
    frame = wire.encode(envelope(wire.ShareReport(missing_from=indices)))
    limits = Limits(max_peers=1000)
    assert wire.decode(frame, limits).body == wire.ShareReport(missing_from=indices)
    for cut in range(len(frame)):
        rejects(frame[:cut], limits)
