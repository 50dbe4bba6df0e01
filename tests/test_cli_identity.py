"""``secagg-peer`` under the active threat model: ``keygen``, ``--identity``,
``--trust`` and ``--threat-model``.

Real processes on 127.0.0.1 through the stderr-reading harnesses of
``test_processes`` and ``test_cli``: the identity files are made by ``keygen``,
an active round of CLI peers survives SIGKILLed peers with an exact sum, and a
server that runs honest-but-curious is declined by peers that hold identities.
"""

from __future__ import annotations

import base64
import re
import stat
import subprocess
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from test_cli import diagnostics, finish, spawn_tool, start_server
from test_processes import (
    Cluster,
    Process,
    assert_one_line_error,
    check_ok,
    kill_on,
    run_cli,
)

from peers.cli import main as peer_main
from peers.identity import load_trusted_identities
from secagg.cli_support import ExitStatus
from secagg.crypto.signing import load_signing_key_pem, sign, verify

IDENTITY_LINE = re.compile(r"^(\S+) ([0-9a-f]{64})$")


def keygen(directory: Path, name: str) -> tuple[Path, str]:
    """An identity key made in this process by ``secagg-peer keygen``: (key file, line)."""
    key, public = directory / f"{name}.key", directory / f"{name}.pub"
    assert peer_main(["keygen", "--out", str(key), "--public-out", str(public)]) == 0
    return key, public.read_text().strip()


# ------------------------------------------------------------------ keygen


def test_keygen_writes_a_usable_private_key_readable_by_its_owner_only(
        tmp_path: Path) -> None:
    key, public = tmp_path / "alice.key", tmp_path / "alice.pub"
    proc = run_cli("-m", "peers", "keygen", "--out", str(key), "--public-out", str(public))
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    match = IDENTITY_LINE.match(proc.stdout.strip())
    assert match is not None and match.group(1) == "alice", proc.stdout
    assert public.read_text() == proc.stdout
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    # The private key is nowhere but in its file.
    private = load_signing_key_pem(key.read_bytes())
    assert private.private_bytes.hex() not in proc.stdout + public.read_text()
    public_key = bytes.fromhex(match.group(2))
    assert private.public_bytes == public_key
    verify(public_key, b"message", sign(private, b"message"))


def test_keygen_never_overwrites_a_key(tmp_path: Path) -> None:
    key = tmp_path / "alice.key"
    key.write_text("precious")
    proc = run_cli("-m", "peers", "keygen", "--out", str(key))
    assert proc.returncode == ExitStatus.BAD_ARGUMENTS
    assert_one_line_error(proc, "--out", "exists")
    assert key.read_text() == "precious"


def test_keygen_names_the_peer_with_id(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                       ) -> None:
    assert peer_main(["keygen", "--out", str(tmp_path / "k.pem"), "--id", "peer-7"]) == 0
    match = IDENTITY_LINE.match(capsys.readouterr().out.strip())
    assert match is not None and match.group(1) == "peer-7"


# ------------------------------------------------------------------ bad files


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    """An input, a key and a trust file listing it, as keygen makes them."""
    np.save(tmp_path / "x.npy", np.zeros(4))
    key, line = keygen(tmp_path, "alice")
    other_key, other_line = keygen(tmp_path, "bob")
    trust = tmp_path / "trusted.txt"
    trust.write_text(f"# the round's peers\n{line}\n{other_line}  # bob\n")
    return {"input": tmp_path / "x.npy", "key": key, "other_key": other_key, "trust": trust}


def run_peer(files: dict[str, Path], *args: str) -> subprocess.CompletedProcess[str]:
    return run_cli("-m", "peers", "--server", "ws://127.0.0.1:9", "--id", "alice",
                   "--input", str(files["input"]), *args)


BAD_TRUST_FILES = {
    "one-field": ("alice\n", "line 1", "ID PUBLIC-KEY"),
    "bad-key": ("# ok\n\nalice zz!z\n", "line 3", "neither hex nor base64"),
    "short-key": (f"alice {'ab' * 16}\n", "line 1", "32 hex digits"),
    "short-base64": ("alice QUJD\n", "line 1", "3 bytes"),
    "bad-name": (f"ali/ce {'ab' * 32}\n", "line 1", "peer name"),
    "twice": (f"bob {'ab' * 32}\nbob {'cd' * 32}\n", "line 2", "twice"),
    "empty": ("# nobody\n", "no identities", ""),
    "binary": ("\udcff", "UTF-8", ""),
}


@pytest.mark.parametrize("case", sorted(BAD_TRUST_FILES))
def test_malformed_trust_file_is_a_one_line_error(files: dict[str, Path], case: str) -> None:
    content, *fragments = BAD_TRUST_FILES[case]
    trust = files["trust"].with_name("bad.txt")
    trust.write_bytes(content.encode("utf-8", "surrogateescape"))
    proc = run_peer(files, "--identity", str(files["key"]), "--trust", str(trust))
    assert proc.returncode == ExitStatus.BAD_ARGUMENTS, proc.stderr
    assert_one_line_error(proc, "--trust", str(trust), *[f for f in fragments if f])


def test_trust_file_accepts_base64_keys(files: dict[str, Path]) -> None:
    key = load_signing_key_pem(files["key"].read_bytes()).public_bytes
    trust = files["trust"].with_name("b64.txt")
    trust.write_text(f"alice {base64.b64encode(key).decode()}\n")
    assert load_trusted_identities(trust) == {"alice": key}


@pytest.mark.parametrize(("args", "fragments"), [
    (["--trust", "{trust}"], ("--trust needs --identity",)),
    (["--threat-model", "active"], ("--threat-model active needs --identity",)),
    (["--identity", "{other_key}", "--trust", "{trust}"], ("'alice'", "another key")),
    (["--identity", "{input}"], ("--identity", "PEM")),
    (["--identity", "{missing}"], ("--identity", "No such file")),
    (["--threat-model", "paranoid"], ("--threat-model",)),
], ids=["trust-without-identity", "active-without-identity", "own-key-mismatch",
        "not-a-key", "missing-key", "unknown-threat-model"])
def test_identity_arguments_that_do_not_fit_are_one_line_errors(
        files: dict[str, Path], args: list[str], fragments: tuple[str, ...]) -> None:
    files["input"].chmod(0o600)  # "not-a-key" must fail on its content, not its mode
    names = {**{k: str(v) for k, v in files.items()}, "missing": str(files["key"]) + ".gone"}
    proc = run_peer(files, *[arg.format(**names) for arg in args])
    assert proc.returncode == ExitStatus.BAD_ARGUMENTS, proc.stderr
    assert_one_line_error(proc, *fragments)


def test_identity_readable_by_others_is_refused(files: dict[str, Path]) -> None:
    files["key"].chmod(0o644)
    proc = run_peer(files, "--identity", str(files["key"]))
    assert proc.returncode == ExitStatus.BAD_ARGUMENTS, proc.stderr
    assert_one_line_error(proc, "--identity", "chmod 600")


# ------------------------------------------------------------------ rounds


N = 7
T = 5  # 3t > 2n under the active threat model: two of seven may die
SLOW_START = ("--phase-timeout", "30")
"""Registration stays open while the peer processes start on a busy machine (it closes
as soon as all registered; the dead are noticed by their connections, not deadlines)."""


@pytest.mark.slow
async def test_active_round_of_cli_peers_survives_killed_peers(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.mkdir()
    cluster = Cluster(tmp_path, n=N, threshold=T,
                      server_args=("--threat-model", "active", *SLOW_START))
    names = [f"p{i:03d}" for i in range(N)]
    made = {name: keygen(keys, name) for name in names}
    trust = keys / "trusted.txt"
    trust.write_text("".join(f"{line}\n" for _, line in made.values()))

    def identity_args(name: str) -> list[str]:
        return ["--identity", str(made[name][0]), "--trust", str(trust)]

    # One dies during the share exchange (its input is never summed), one after it
    # signed U3 (its input is in the sum; the others unmask it).
    victims = {"p001": "sharing", "p005": "signed"}
    hook: Callable[[Cluster, Process, str], None] = kill_on(victims)
    try:
        await cluster.start(hook, identity_args)
        try:
            await cluster.wait()
        except TimeoutError:
            pytest.fail("processes did not finish:\n" + cluster.diagnostics())
    finally:
        await cluster.stop()
    assert set(cluster.killed()) == set(victims), cluster.diagnostics()
    record = check_ok(cluster)  # the exact sum over the contributors, survivors exit 0
    assert set(record["contributors"]) >= set(names) - set(victims)
    assert "p001" not in record["contributors"]
    for name, peer in cluster.peers.items():
        if name not in victims:
            # The consistency check ran: the round was active end to end.
            assert "signed" in peer.states, (name, peer.states)


@pytest.mark.slow
async def test_peers_with_identities_decline_an_honest_but_curious_server(
        tmp_path: Path) -> None:
    server, url = await start_server(tmp_path, "--max-peers", "2", "--threshold", "2",
                                     *SLOW_START)
    np_input = tmp_path / "x.npy"
    np.save(np_input, np.zeros(4))
    peers = []
    for name in ("alice", "bob"):
        key, _ = keygen(tmp_path, name)
        peers.append(await spawn_tool("secagg-peer", [
            "--server", url, "--id", name, "--input", str(np_input),
            "--identity", str(key)], name=name))
    codes = await finish(server, *peers)
    assert codes == [ExitStatus.ROUND_ABORTED] * 3, diagnostics(server, *peers)
    for peer in peers:
        assert peer.lines == [
            f"secagg-peer {peer.name}: round 0: aborted (the round runs under the "
            "honest-but-curious threat model, this peer takes part only under active)"
        ], peer.lines
    assert (tmp_path / "out" / "round-0.json").exists()
    assert not (tmp_path / "out" / "round-0.npy").exists()
