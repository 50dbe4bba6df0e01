"""Dropout study: how rounds fare as peers drop, by peer count, dropout rate and phase.

For every cell (n peers, dropout rate r, phase p) and every seed, ``round(r * n)``
peers chosen at random drop at phase p, and one round is run with the threshold
``floor(n/2) + 1``. Phases: ``share_keys``, ``masked_input``, ``relay``,
``unmasking`` (= ``consistency_check`` without R3), and ``random``, where each
dropped peer gets one of those four at random. Rate 0 is run once per n and seed
(phase ``none``) and serves as every phase's baseline.

Rates: by default a coarse grid (0, 0.25, 0.6 over the simulator) plus, at each
n, the two rates either side of the cliff where rounds stop succeeding: (n - t)/n,
the most drops a round survives, and (n - t + 1)/n (:func:`rate_grid`). The cliff
is a single drop wide, so a uniform grid would either miss it or cost many rounds.
``--rates`` sweeps exactly the given rates at every n.

Transports:

* ``--transport sim`` (default): the in-memory simulator :mod:`secagg.sim`, for
  large n. Its ``relay`` kills the chosen peers when they send their partial sum
  (a chosen leaf dies before sending its own; a chosen relay dies holding its
  children's sums).
* ``--transport websockets``: a real coordinator and real peers on 127.0.0.1 in one
  event loop per cell (keep n small, <= 30). Kills: ``share_keys`` on peer state
  ``sharing``, ``masked_input`` on ``reported``, ``relay`` the first k peers to
  reach ``masking`` (only relays do; the tree fan-in defaults to 3 so that there are
  many), ``unmasking`` when the coordinator enters ``unmasking``. Cells that must
  wait for a deadline take ``--phase-timeout`` seconds longer.

Modes (``--mode``): ``masking`` (default), ``hybrid`` (masked vectors, also
Paillier-encrypted; the same phases) and ``paillier`` (inputs Paillier-encrypted
under the server's key; complete graph only). Paillier rounds have no share
exchange and no unmasking: ``share_keys`` peers die when the roster arrives (they
never contribute) and ``unmasking`` / ``consistency_check`` peers are not killed
at all; the study says so, and counts only the drops that happen ("effective")
when it predicts ok or abort. Encryption costs tens of milliseconds per peer and
round: keep n and dim small in the paillier and hybrid modes.

Every run records: status (ok / aborted / error), whether the aggregate is exact
(max abs error against ``inputs[contributors].sum(0)`` within ``n / scale``), wall
time, bytes (most sent by one peer; received by the server), and the set sizes.
"expect" in the table is ``ok`` when ``n - drops >= t`` (enough peers survive to
unmask), else ``abort``; a cell that aborts although ``ok`` was expected is flagged.

Outputs in ``--out`` (default ``results/dropouts``): ``report.json`` (configuration,
one entry per cell and per run), ``success_vs_rate.png`` (success rate against the
fraction of peers dropped, drawn as steps: drops are whole peers), ``time_vs_n.png``
and ``bytes_vs_n.png`` (means over the ok rounds at every rate > 0, per phase, and
over the rounds without drops); a summary table on the terminal, whose notes give
each cell's abort reasons (runs that differ only in numbers merged into ranges).
Exit status 1 if an ok round was not exact, a peer scripted to die before sending
its input was counted, or a run failed with an error; aborted rounds are outcomes,
not failures.

    python -m scenarios.dropouts                         # sim: n = 20, 50, 100
    python -m scenarios.dropouts --transport websockets  # n = 10, 20, 30 on loopback
    python -m scenarios.dropouts --quick                 # a few seconds
    python -m scenarios.dropouts --quick --mode hybrid   # (smallest n only)
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import multiprocessing
import os
import platform
import re
import sys
import time
import traceback
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from scenarios.common import (
    MODES,
    STUDY_PHASES,
    Mode,
    check_mode,
    default_threshold,
    inapplicable_phases,
    make_inputs,
    phase_applies,
    run_network_rounds,
    run_sim_round,
)
from secagg.cli_support import HelpFormatter
from secagg.graph import GraphKind
from secagg.sim import PHASES

RANDOM = "random"
BASELINE = "none"
PHASE_CHOICES = (*PHASES, RANDOM)
TRANSPORTS = ("sim", "websockets")
GRAPHS = ("complete", "sparse")

# "rates" are swept at every n; with "cliff", each n also gets the two rates either
# side of its success cliff, (n - t)/n and (n - t + 1)/n (see rate_grid).
DEFAULTS: dict[str, dict[str, Any]] = {
    "sim": {"peers": [20, 50, 100], "rates": [0.0, 0.25, 0.6], "cliff": True,
            "seeds": 2, "dim": 100, "fan_in": 8, "phase_timeout": 10.0},
    "websockets": {"peers": [10, 20, 30], "rates": [0.0, 0.2], "cliff": True, "seeds": 2,
                   "dim": 100, "fan_in": 3, "phase_timeout": 5.0},
}
QUICK: dict[str, dict[str, Any]] = {
    "sim": {"peers": [10, 20], "rates": [0.0], "cliff": True, "seeds": 1, "dim": 16},
    "websockets": {"peers": [8], "rates": [0.0, 0.25], "cliff": False, "seeds": 1, "dim": 8,
                   "phase_timeout": 3.0},
}
WEBSOCKET_SOFT_LIMIT = 30


@dataclass(frozen=True)
class Job:
    """One round to run: a cell (n, rate, phase) and a seed."""

    transport: str
    n: int
    rate: float
    phase: str
    seed: int
    graph: str
    dim: int
    fan_in: int
    phase_timeout: float
    mode: str = "masking"

    @property
    def drops(self) -> int:
        return drop_count(self.rate, self.n)

    @property
    def threshold(self) -> int:
        return default_threshold(self.n)


def drop_count(rate: float, n: int) -> int:
    """How many of n peers a dropout rate drops: round(rate * n), halves rounded up."""
    return math.floor(rate * n + 0.5)


def rate_grid(n: int, rates: Sequence[float], cliff: bool) -> list[float]:
    """The dropout rates swept at n peers.

    With ``cliff``, ``rates`` plus the two rates either side of the cliff where
    rounds stop succeeding: (n - t)/n, the most drops a round survives, and
    (n - t + 1)/n, the fewest it does not; one rate per distinct drop count.
    Without, ``rates`` as given.
    """
    if not cliff:
        return sorted(set(rates))
    survivable = n - default_threshold(n)
    by_drops: dict[int, float] = {}
    for rate in sorted({*rates, survivable / n, (survivable + 1) / n}):
        by_drops.setdefault(drop_count(rate, n), rate)
    return sorted(by_drops.values())


def schedule(job: Job) -> tuple[dict[int, str], int]:
    """The drop script of a job: (peer -> phase, number of dynamic relay kills).

    The simulator takes every phase per peer. Over websockets a ``relay`` drop is a
    dynamic kill of the first relays to reach R2 (who the relays are is not known
    in advance), so those are counted instead of assigned to peers.
    """
    k = job.drops
    if k == 0 or job.phase == BASELINE:
        return {}, 0
    phase_index = PHASE_CHOICES.index(job.phase)
    rng = np.random.default_rng([job.seed, job.n, round(job.rate * 1000), phase_index])
    victims = sorted(int(v) for v in rng.choice(job.n, size=k, replace=False))
    if job.phase == RANDOM:
        phases = [STUDY_PHASES[int(i)] for i in rng.integers(0, len(STUDY_PHASES), size=k)]
    else:
        phases = [job.phase] * k
    script = dict(zip(victims, phases, strict=True))
    if job.transport == "websockets":
        relays = sum(1 for phase in script.values() if phase == "relay")
        return {u: p for u, p in script.items() if p != "relay"}, relays
    return script, 0


def run_job(job: Job) -> dict[str, Any]:
    """Run one job; never raises (a failure is recorded as status "error")."""
    silenced = logging.root.manager.disable
    logging.disable(logging.CRITICAL)  # the library logs every abort at WARNING
    try:
        return _run_job(job)
    finally:
        logging.disable(silenced)


def _run_job(job: Job) -> dict[str, Any]:
    script, relay_kills = schedule(job)
    inputs = make_inputs(job.n, job.dim, job.seed)
    effective = relay_kills + sum(phase_applies(p, job.mode) for p in script.values())
    record: dict[str, Any] = {**asdict(job), "drops": job.drops, "threshold": job.threshold,
                              "relay_kills": relay_kills, "effective_drops": effective,
                              "expected": _expected(job.n, effective, job.threshold)}
    graph = cast(GraphKind, job.graph)
    mode = cast(Mode, job.mode)
    started = time.perf_counter()
    try:
        if job.transport == "sim":
            report = run_sim_round(inputs, job.threshold, script, graph=graph,
                                   seed=job.seed, fan_in=job.fan_in,
                                   phase_timeout=job.phase_timeout, mode=mode)
        else:
            report = run_network_rounds([inputs], job.threshold, [script], graph=graph,
                                        fan_in=job.fan_in, phase_timeout=job.phase_timeout,
                                        relay_kills=[relay_kills], mode=mode)[0]
        record.update(report.to_json())
    except Exception as exc:  # recorded, the sweep goes on
        record.update(status="error", reason=f"{type(exc).__name__}: {exc}",
                      traceback=traceback.format_exc(), exact=None, wall_seconds=None,
                      contributors=[], dropped={}, unexpected_contributors=[])
    record["elapsed_seconds"] = time.perf_counter() - started
    return record


# ------------------------------------------------------------------- sweep


def _expected(n: int, drops: int, threshold: int) -> str:
    """"ok" when enough peers survive the drops to reach the threshold, else "abort"."""
    return "ok" if n - drops >= threshold else "abort"


def make_jobs(transport: str, peers: Sequence[int],
              rates: Sequence[float] | Mapping[int, Sequence[float]],
              phases: Sequence[str], seeds: int, graph: str, dim: int, fan_in: int,
              phase_timeout: float, mode: str = "masking") -> list[Job]:
    """Every (n, rate, phase, seed); ``rates`` is one list for every n, or one per n."""
    jobs: list[Job] = []
    for n in peers:
        for rate in (rates[n] if isinstance(rates, Mapping) else rates):
            cell_phases = [BASELINE] if drop_count(rate, n) == 0 else list(phases)
            for phase in cell_phases:
                for seed in range(seeds):
                    jobs.append(Job(transport=transport, n=n, rate=rate, phase=phase,
                                    seed=seed, graph=graph, dim=dim, fan_in=fan_in,
                                    phase_timeout=phase_timeout, mode=mode))
    return jobs


def run_jobs(jobs: Sequence[Job], workers: int, console: Console,
             progress_enabled: bool) -> list[dict[str, Any]]:
    """Run the jobs (largest first) in ``workers`` processes, with a progress bar."""
    ordered = sorted(jobs, key=lambda job: (-job.n, -job.drops))
    records: list[dict[str, Any]] = []
    columns = (TextColumn("[progress.description]{task.description}"), BarColumn(),
               MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, disable=not progress_enabled,
                  transient=False) as progress:
        task = progress.add_task(f"{len(ordered)} rounds", total=len(ordered))

        def done(record: dict[str, Any]) -> None:
            records.append(record)
            progress.update(task, advance=1,
                            description=f"n={record['n']} rate={record['rate']:.3g} "
                                        f"{record['phase']}")

        if workers <= 1:
            for job in ordered:
                done(run_job(job))
        else:
            context = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
                futures: list[Future[dict[str, Any]]] = [pool.submit(run_job, job)
                                                         for job in ordered]
                for future in as_completed(futures):
                    done(future.result())
    return sorted(records, key=_record_order)


PHASE_ORDER = {phase: i for i, phase in enumerate((BASELINE, *PHASE_CHOICES))}


def _record_order(record: dict[str, Any]) -> tuple[int, float, int, int]:
    return record["n"], record["rate"], PHASE_ORDER.get(record["phase"], 99), record["seed"]


def _mean(values: Sequence[float | int | None]) -> float | None:
    present = [float(v) for v in values if v is not None]
    return sum(present) / len(present) if present else None


def summarize(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One entry per cell (n, rate, phase), aggregated over seeds."""
    cells: dict[tuple[int, float, str], list[dict[str, Any]]] = {}
    for record in records:
        cells.setdefault((record["n"], record["rate"], record["phase"]), []).append(record)
    summary: list[dict[str, Any]] = []
    for (n, rate, phase), runs in cells.items():
        first = runs[0]
        drops, threshold = first["drops"], first["threshold"]
        # Per run: in paillier mode some scripted drops never happen (and with phase
        # "random" how many differs by seed).
        run_expected = [r.get("expected", _expected(n, drops, threshold)) for r in runs]
        expected = run_expected[0] if len(set(run_expected)) == 1 else "mixed"
        mode = first.get("mode", "masking")
        ok_runs = [r for r in runs if r["status"] == "ok"]
        errors = [r for r in runs if r["status"] == "error"]
        reasons = merge_reasons([r["reason"] for r in runs
                                 if r["status"] != "ok" and r.get("reason")])
        killed = [len(r["killed"]) if r.get("killed") is not None
                  else r.get("effective_drops", r["drops"])
                  for r in runs if r["status"] != "error"]
        summary.append({
            "n": n, "rate": rate, "phase": phase, "drops": drops, "threshold": threshold,
            "expected": expected, "seeds": len(runs), "ok": len(ok_runs),
            "aborted": sum(1 for r in runs if r["status"] == "aborted"),
            "errors": len(errors), "success_rate": len(ok_runs) / len(runs),
            "exact": all(r["exact"] is True for r in ok_runs) if ok_runs else None,
            "max_error": max((r["max_error"] for r in ok_runs if r.get("max_error") is not None),
                             default=None),
            "tolerance": first.get("tolerance"),
            "unexpected_contributors": sorted({u for r in runs
                                               for u in r.get("unexpected_contributors", [])}),
            "killed_mean": _mean(killed),
            "contributors_mean": _mean([len(r["contributors"]) for r in ok_runs]),
            "wall_seconds_mean": _mean([r["wall_seconds"] for r in runs]),
            "wall_seconds_ok_mean": _mean([r["wall_seconds"] for r in ok_runs]),
            "max_peer_bytes_sent_mean": _mean([r.get("max_peer_bytes_sent") for r in runs]),
            "server_bytes_in_mean": _mean([r.get("server_bytes_in") for r in runs]),
            "abort_reasons": reasons,
            "surprise": any(e == "ok" and r["status"] != "ok"
                            for e, r in zip(run_expected, runs, strict=True)),
            "effective_drops_mean": _mean([r.get("effective_drops", drops) for r in runs]),
            "mode": mode,
            "phase_applies": phase in (BASELINE, RANDOM) or phase_applies(phase, mode),
        })
    return summary


# The parts of an abort reason that vary between runs of one cell: quoted peer names
# and numbers (a quoted name first, so that its digits stay inside it).
_VARYING = re.compile(r"('[^']*'|\d+)")


def merge_reasons(reasons: Sequence[str]) -> list[str]:
    """The distinct abort reasons of a cell, in order, each one written out in full.

    Reasons that differ only in their numbers or quoted peer names are merged: the
    numbers become a range (``only 9–10 masked inputs reached the root``), the names
    ``'a' or 'b'`` (or ``'a' and k others``).
    """
    groups: dict[str, list[list[str]]] = {}
    for reason in reasons:
        parts = _VARYING.split(reason)
        template = "#".join(parts[0::2])
        groups.setdefault(template, []).append(parts)
    merged: list[str] = []
    for members in groups.values():
        text: list[str] = []
        for index, values in enumerate(zip(*members, strict=True)):
            distinct = list(dict.fromkeys(values))
            if index % 2 == 0 or len(distinct) == 1:
                text.append(distinct[0])
            elif all(value.isdigit() for value in distinct):
                numbers = sorted(int(value) for value in distinct)
                text.append(f"{numbers[0]}–{numbers[-1]}")
            elif len(distinct) == 2:
                text.append(f"{distinct[0]} or {distinct[1]}")
            else:
                text.append(f"{distinct[0]} and {len(distinct) - 1} others")
        merged.append("".join(text))
    return merged


# ------------------------------------------------------------------- output


def _fmt_bytes(value: float | None) -> str:
    if value is None:
        return "-"
    for unit, size in (("MB", 1e6), ("kB", 1e3)):
        if value >= size:
            return f"{value / size:.1f} {unit}"
    return f"{value:.0f} B"


def render_table(summary: Sequence[dict[str, Any]], title: str) -> Table:
    table = Table(title=title, show_lines=False)
    for name, justify in (("n", "right"), ("rate", "right"), ("phase", "left"),
                          ("drops", "right"), ("expect", "left"), ("ok", "right"),
                          ("exact", "left"), ("contrib", "right"), ("wall s", "right"),
                          ("max B/peer", "right"), ("server B in", "right"),
                          ("notes", "left")):
        table.add_column(name, justify=justify, no_wrap=name != "notes")  # type: ignore[arg-type]
    previous_n = None
    for cell in summary:
        if previous_n is not None and cell["n"] != previous_n:
            table.add_section()
        previous_n = cell["n"]
        exact = "-" if cell["exact"] is None else ("yes" if cell["exact"] else "[red]NO[/]")
        ok = f"{cell['ok']}/{cell['seeds']}"
        if cell["surprise"]:
            ok = f"[yellow]{ok}[/]"
        notes: list[str] = []
        if not cell.get("phase_applies", True):
            notes.append(f"no such phase in {cell['mode']} mode: nobody killed")
        elif (cell.get("effective_drops_mean") or 0) < cell["drops"] - 1e-9:
            notes.append(f"{cell['effective_drops_mean']:.1f} drops happen on average")
        if cell["surprise"]:
            notes.append("aborted although enough peers survive")
        if cell["errors"]:
            notes.append(f"{cell['errors']} error(s)")
        if cell["unexpected_contributors"]:
            notes.append(f"dead peers counted: {cell['unexpected_contributors'][:5]}")
        killed = cell["killed_mean"]
        happen = cell.get("effective_drops_mean")
        if killed is not None and abs(killed - (cell["drops"] if happen is None else happen)) \
                > 1e-9:
            notes.append(f"killed {killed:.1f} on average")
        notes += cell["abort_reasons"]
        contributors = cell["contributors_mean"]
        wall = cell["wall_seconds_mean"]
        table.add_row(str(cell["n"]), f"{cell['rate']:.3g}", cell["phase"], str(cell["drops"]),
                      cell["expected"], ok, exact,
                      "-" if contributors is None else f"{contributors:.1f}",
                      "-" if wall is None else f"{wall:.3f}",
                      _fmt_bytes(cell["max_peer_bytes_sent_mean"]),
                      _fmt_bytes(cell["server_bytes_in_mean"]), "; ".join(notes))
    return table


PLOT_NAMES = ("success_vs_rate", "time_vs_n", "bytes_vs_n")
CLIFF_LABEL = "(n − t)/n: the most drops\na round survives"
AVERAGED = "mean over the ok rounds at every dropout rate > 0"


def plot(summary: Sequence[dict[str, Any]], records: Sequence[dict[str, Any]],
         phases: Sequence[str], out: Path, title: str) -> list[Path]:
    """Write the three PNG plots; return their paths."""
    import matplotlib.pyplot as plt

    figures = {"success_vs_rate": plot_success(summary, phases, title),
               "time_vs_n": plot_time(records, phases, title),
               "bytes_vs_n": plot_bytes(records, phases, title)}
    written: list[Path] = []
    for name in PLOT_NAMES:
        written.append(_save(figures[name], out / f"{name}.png"))
        plt.close(figures[name])
    return written


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _markers(phases: Sequence[str]) -> dict[str, str]:
    return dict(zip([BASELINE, *phases], "osD^vx*P", strict=False))


def plot_success(summary: Sequence[dict[str, Any]], phases: Sequence[str],
                 title: str) -> Any:
    """Success rate against the fraction of peers dropped: one panel per n, one step
    curve per phase (every phase has the same curve when the study holds, so the
    curves are drawn as nested bands, widest first), and the cliff at (n - t)/n."""
    plt = _pyplot()
    peers = sorted({cell["n"] for cell in summary})
    by_cell = {(c["n"], c["rate"], c["phase"]): c for c in summary}
    markers = _markers(phases)
    fig, axes = plt.subplots(1, len(peers), figsize=(max(6.4, 4.2 * len(peers)), 4.0),
                             squeeze=False, sharey=True)
    for ax, n in zip(axes[0], peers, strict=True):
        rates = sorted({c["rate"] for c in summary if c["n"] == n})
        for j, phase in enumerate(phases):
            xs, ys = [], []
            for rate in rates:
                cell = by_cell.get((n, rate, phase)) or by_cell.get((n, rate, BASELINE))
                if cell is not None:
                    # Drops are whole peers: plot the fraction actually dropped.
                    xs.append(cell["drops"] / n)
                    ys.append(cell["success_rate"])
            width = len(phases) - 1 - j
            ax.step(xs, ys, where="post", marker=markers.get(phase, "o"), label=phase,
                    linewidth=1 + 0.9 * width, markersize=3.5 + 1.4 * width, alpha=0.7)
        threshold = default_threshold(n)
        cliff = (n - threshold) / n
        ax.axvline(cliff, color="grey", linestyle="--", linewidth=1, label=CLIFF_LABEL)
        ax.set_title(f"n = {n}, t = {threshold}")
        ax.set_xlabel("dropout rate (drops / n)")
        most = max(c["drops"] for c in summary if c["n"] == n) / n
        ax.set_xlim(-0.03, max(most, cliff) + 0.05)
        ax.set_ylim(-0.05, 1.05)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("success rate (round ok)")
    axes[0][0].legend(fontsize=8, loc="lower left", title="drop phase", title_fontsize=8)
    separator = ": " if len(peers) > 1 else "\n"  # one panel is too narrow for one line
    fig.suptitle(f"{title}{separator}success rate vs dropout rate")
    fig.tight_layout()
    return fig


def _series(records: Sequence[dict[str, Any]],
            phases: Sequence[str]) -> dict[str, list[dict[str, Any]]]:
    """Runs per curve: every run without drops, and each phase's ok runs with drops."""
    series = {BASELINE: [r for r in records if r["phase"] == BASELINE]}
    for phase in phases:
        series[phase] = [r for r in records if r["phase"] == phase and r["status"] == "ok"]
    return series


def _wide(values: Sequence[float]) -> bool:
    """Whether positive values span a decade or more: worth a log scale."""
    positive = [v for v in values if v > 0]
    return bool(positive) and max(positive) >= 10 * min(positive)


def _n_axis(ax: Any, peers: Sequence[int]) -> None:
    """An x axis of peer counts: a tick at each n swept, integers only."""
    from matplotlib.ticker import NullLocator

    ax.set_xlabel("peers n")
    if _wide(peers):
        ax.set_xscale("log")
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xticks(list(peers), labels=[str(n) for n in peers])


def _value_axis(ax: Any, values: Sequence[float], label: str) -> None:
    """A y axis, logarithmic when the values span a decade or more."""
    ax.set_ylabel(label)
    if _wide(values):
        ax.set_yscale("log")


def plot_time(records: Sequence[dict[str, Any]], phases: Sequence[str], title: str) -> Any:
    """Round wall time against n, per drop phase."""
    plt = _pyplot()
    peers = sorted({r["n"] for r in records})
    markers = _markers(phases)
    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    plotted: list[float] = []
    for name, runs in _series(records, phases).items():
        points = [(n, _mean([r["wall_seconds"] for r in runs if r["n"] == n])) for n in peers]
        xs = [n for n, v in points if v is not None]
        ys = [v for _, v in points if v is not None]
        if xs:
            label = "no drops" if name == BASELINE else name
            ax.plot(xs, ys, marker=markers.get(name, "o"), label=label)
            plotted += ys
    _n_axis(ax, peers)
    _value_axis(ax, plotted, "wall time per round (s)")
    ax.set_title(f"round time vs n\n({AVERAGED}; no drops: rate 0)", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, title="drop phase", title_fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_bytes(records: Sequence[dict[str, Any]], phases: Sequence[str], title: str) -> Any:
    """Traffic against n, per drop phase: most sent by one peer; server's intake per peer."""
    plt = _pyplot()
    peers = sorted({r["n"] for r in records})
    markers = _markers(phases)
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4.6))
    plotted: dict[Any, list[float]] = {left: [], right: []}
    for name, runs in _series(records, phases).items():
        label = "no drops" if name == BASELINE else name
        sent = [(n, _mean([r["max_peer_bytes_sent"] for r in runs if r["n"] == n]))
                for n in peers]
        server = [(n, _mean([r["server_bytes_in"] / n for r in runs if r["n"] == n]))
                  for n in peers]
        for ax, points in ((left, sent), (right, server)):
            xs = [n for n, v in points if v is not None]
            ys = [v for _, v in points if v is not None]
            if xs:
                ax.plot(xs, ys, marker=markers.get(name, "o"), label=label)
                plotted[ax] += ys
    left.set_title("most bytes sent by one peer")
    right.set_title("bytes received by the server, per peer")
    for ax in (left, right):
        _value_axis(ax, plotted[ax], "bytes")
        _n_axis(ax, peers)
        ax.grid(alpha=0.3, which="both")
    left.legend(fontsize=8, title="drop phase", title_fontsize=8)
    fig.suptitle(f"{title}: traffic vs n\n({AVERAGED}; no drops: rate 0)")
    fig.tight_layout()
    return fig


def _save(fig: Any, path: Path) -> Path:
    fig.savefig(path, dpi=110)
    return path


# ------------------------------------------------------------------- CLI


def _int_list(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v < 2 for v in values):
        raise argparse.ArgumentTypeError("peer counts must be integers >= 2")
    return sorted(set(values))


def _rate_list(text: str) -> list[float]:
    try:
        values = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated numbers, got {text!r}") from None
    if not values or any(not 0.0 <= v <= 1.0 for v in values):
        raise argparse.ArgumentTypeError("dropout rates must be numbers in [0, 1]")
    return sorted(set(values))


def _phase_list(text: str) -> list[str]:
    values = [part.strip() for part in text.split(",") if part.strip()]
    unknown = [v for v in values if v not in PHASE_CHOICES]
    if not values or unknown:
        raise argparse.ArgumentTypeError(f"unknown phase(s) {unknown}; choose from "
                                         f"{', '.join(PHASE_CHOICES)}")
    return list(dict.fromkeys(values))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m scenarios.dropouts", formatter_class=HelpFormatter,
        description="secagg dropout study: success, exactness, time and bytes by peer "
                    "count, dropout rate and the phase at which peers drop")
    parser.add_argument("--peers", type=_int_list, default=None,
                        help="comma-separated peer counts (default: 20,50,100 over sim, "
                             "10,20,30 over websockets)")
    parser.add_argument("--rates", type=_rate_list, default=None,
                        help="comma-separated dropout rates, the same at every n (default: "
                             "0,0.25,0.6 over sim, 0,0.2 over websockets, plus at each n "
                             "the two rates either side of (n - t)/n)")
    parser.add_argument("--phases", type=_phase_list,
                        default=[*STUDY_PHASES, RANDOM],
                        help="comma-separated phases: " + ", ".join(PHASE_CHOICES) +
                             " (default: share_keys,masked_input,relay,unmasking,random)")
    parser.add_argument("--seeds", type=int, default=None,
                        help="rounds per cell (default: 2)")
    parser.add_argument("--graph", choices=GRAPHS, default="complete",
                        help="mask-sharing graph: every pair, or SecAgg+'s sparse graph")
    parser.add_argument("--mode", choices=MODES, default="masking",
                        help="paillier needs the complete graph; paillier and hybrid "
                             "encrypt, so keep n and dim small")
    parser.add_argument("--transport", choices=TRANSPORTS, default="sim",
                        help="the in-memory simulator, or a real coordinator and peers on "
                             "127.0.0.1")
    parser.add_argument("--dim", type=int, default=None,
                        help="vector length (default: 100)")
    parser.add_argument("--fan-in", type=int, default=None,
                        help="accumulation tree fan-in (default: 8 over sim, 3 over "
                             "websockets)")
    parser.add_argument("--phase-timeout", type=float, default=None,
                        help="phase deadline in seconds, virtual in the sim (default: 10 "
                             "over sim, 5 over websockets)")
    parser.add_argument("--jobs", type=int, default=None,
                        help="worker processes; 1 runs in-process (default: the number of "
                             "CPUs)")
    parser.add_argument("--out", type=Path, default=Path("results/dropouts"),
                        help="output directory")
    parser.add_argument("--quick", action="store_true",
                        help="a tiny sweep that finishes in a few seconds")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    settings = dict(DEFAULTS[args.transport])
    if args.quick:
        settings.update(QUICK[args.transport])
        if args.mode != "masking":  # encryption costs tens of ms per peer and round
            settings["peers"] = settings["peers"][:1]
    peers: list[int] = args.peers or settings["peers"]
    # Explicit --rates are swept as given; the default grid adds each n's cliff.
    rates = {n: rate_grid(n, args.rates or settings["rates"],
                          cliff=args.rates is None and settings["cliff"]) for n in peers}
    seeds: int = args.seeds if args.seeds is not None else settings["seeds"]
    dim: int = args.dim if args.dim is not None else settings["dim"]
    fan_in: int = args.fan_in if args.fan_in is not None else settings["fan_in"]
    timeout = args.phase_timeout if args.phase_timeout is not None else \
        settings["phase_timeout"]
    if seeds < 1:
        parser.error("--seeds must be at least 1")
    if dim < 1:
        parser.error("--dim must be at least 1")
    if fan_in < 2:
        parser.error("--fan-in must be at least 2")
    if timeout <= 0:
        parser.error("--phase-timeout must be positive")
    if args.jobs is not None and args.jobs < 1:
        parser.error("--jobs must be at least 1")
    phases: list[str] = args.phases
    try:
        check_mode(args.mode, args.graph)
    except ValueError as exc:
        print(f"{parser.prog}: error: --mode {args.mode} --graph {args.graph}: {exc}",
              file=sys.stderr)
        return 2

    stderr = Console(stderr=True)
    stdout = Console(width=None if sys.stdout.isatty() else 150)
    if args.transport == "websockets" and max(peers) > WEBSOCKET_SOFT_LIMIT:
        stderr.print(f"[yellow]note:[/] websocket cells above {WEBSOCKET_SOFT_LIMIT} peers "
                     "run every peer in this one process and get slow")
    skipped = [phase for phase in inapplicable_phases(args.mode) if phase in phases]
    if skipped or (inapplicable_phases(args.mode) and RANDOM in phases):
        stderr.print(f"[yellow]note:[/] {args.mode} mode has no share exchange and no "
                     f"unmasking: drops at {', '.join(inapplicable_phases(args.mode))} "
                     "do not apply (those peers contribute normally); share_keys peers "
                     "die when the roster arrives", soft_wrap=True)
    jobs = make_jobs(args.transport, peers, rates, phases, seeds, args.graph, dim, fan_in,
                     timeout, args.mode)
    workers = args.jobs if args.jobs is not None else min(os.cpu_count() or 1, len(jobs))
    if args.quick and args.jobs is None:
        workers = 1  # process start-up would cost more than the rounds
    args.out.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(level=logging.ERROR)

    started = time.perf_counter()
    records = run_jobs(jobs, workers, stderr,
                       progress_enabled=not args.no_progress and stderr.is_terminal)
    elapsed = time.perf_counter() - started
    summary = summarize(records)

    title = f"{args.transport}, {args.graph} graph, {args.mode} mode"
    files: list[Path] = []
    if not args.no_plots:
        files += plot(summary, records, phases, args.out, title)
    report_path = args.out / "report.json"
    files.insert(0, report_path)
    report = {
        "study": "secagg dropout study",
        "config": {"transport": args.transport, "graph": args.graph, "mode": args.mode,
                   "peers": peers, "rates": {str(n): grid for n, grid in rates.items()},
                   "phases": phases, "seeds": seeds, "dim": dim,
                   "fan_in": fan_in, "phase_timeout": timeout, "quick": args.quick,
                   "threshold": "floor(n/2) + 1", "workers": workers},
        "environment": {"python": platform.python_version(), "platform": platform.platform(),
                        "cpus": os.cpu_count()},
        "elapsed_seconds": elapsed,
        "files": [str(path) for path in files],
        "cells": summary,
        "runs": records,
    }
    report_path.write_text(json.dumps(report, indent=1, default=_json_default) + "\n")

    stdout.print(render_table(summary, f"secagg dropout study ({title}, {seeds} seed"
                                       f"{'s' if seeds != 1 else ''} per cell, t = "
                                       "floor(n/2)+1)"))
    failures = [r for r in records if r["status"] == "error" or
                (r["status"] == "ok" and r["exact"] is not True) or
                r.get("unexpected_contributors")]
    stdout.print(f"{len(records)} rounds in {elapsed:.1f} s with {workers} worker"
                 f"{'s' if workers != 1 else ''}; "
                 f"{sum(r['status'] == 'ok' for r in records)} ok, "
                 f"{sum(r['status'] == 'aborted' for r in records)} aborted, "
                 f"{sum(r['status'] == 'error' for r in records)} errors")
    for path in files:
        stdout.print(f"wrote {path}")
    for record in failures:
        stdout.print(f"[red]FAILED[/] n={record['n']} rate={record['rate']:.3g} "
                     f"phase={record['phase']} seed={record['seed']}: status "
                     f"{record['status']}, exact {record.get('exact')}, "
                     f"{record.get('reason', '')}")
    return 1 if failures else 0


def _json_default(value: Any) -> Any:
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


if __name__ == "__main__":
    sys.exit(main())
