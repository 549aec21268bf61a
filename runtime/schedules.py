"""Pipeline-parallel schedules as data: which rank runs which forward/backward, in what order.

A :class:`Schedule` is plain data: for each pipeline rank, the ordered list of :class:`Action` s it
executes (``F`` forward, ``B`` backward, ``W`` weight gradients when backward is split). Keeping the
order as data, instead of as control flow inside an executor, lets us check it before any rank starts
(:meth:`Schedule.check` finds missing or duplicated work and orders that deadlock), cost it
(:meth:`Schedule.simulate` gives the makespan, the bubble and the activation memory per rank), show it
(:meth:`Schedule.render`) and store it next to a plan (:meth:`Schedule.to_dict`). The executor then
only walks its rank's list.

Model of execution, shared by :meth:`Schedule.check` and :meth:`Schedule.simulate`: stage ``s`` of
``S = pp * virtual_stages`` runs on rank ``s % pp`` as chunk ``s // pp``; a rank runs its list strictly
in order, one action at a time; an action starts when its rank is free and its dependencies are done;
communication is free and sends never block. Dependencies:

- ``F(s, mb)`` needs ``F(s-1, mb)`` (activations from the previous stage),
- ``B(s, mb)`` needs ``F(s, mb)`` and ``B(s+1, mb)`` (the output gradient from the next stage),
- ``W(s, mb)`` needs ``B(s, mb)``.

:func:`build_schedule` makes the schedules named in :data:`SCHEDULES` and checks them before
returning them.
"""

from __future__ import annotations

import math
import re
from collections import Counter, deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from .errors import ScheduleError

SCHEDULES: tuple[str, ...] = ("gpipe", "1f1b", "interleaved_1f1b", "zero_bubble")

KINDS = ("F", "B", "W")

# (kind, stage, microbatch): the identity of an action, used as a dictionary key
_Key = tuple[str, int, int]

_ACTION_RE = re.compile(r"([FBW])(\d+)(?:\.(\d+))?")


@dataclass(frozen=True)
class Action:
    """One unit of pipeline work: ``kind`` ("F", "B" or "W") of global ``stage`` on ``microbatch``.

    ``chunk`` only affects the text: ``None`` prints ``F3`` (one chunk per rank), an int prints ``F3.1``
    (microbatch 3, chunk 1). :class:`Schedule` fills it in from its ``pp`` and ``virtual_stages``, so
    actions built by hand need not set it. It takes no part in equality or hashing: the identity of an
    action is ``(kind, stage, microbatch)``.
    """

    kind: str
    stage: int
    microbatch: int
    chunk: int | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ScheduleError(f"action kind {self.kind!r} is not one of {', '.join(KINDS)}: "
                                "use 'F' (forward), 'B' (backward) or 'W' (weight gradients)")

    def __str__(self) -> str:
        if self.chunk is None:
            return f"{self.kind}{self.microbatch}"
        return f"{self.kind}{self.microbatch}.{self.chunk}"

    @property
    def key(self) -> _Key:
        return (self.kind, self.stage, self.microbatch)


@dataclass
class SimResult:
    """What :meth:`Schedule.simulate` found. Lists are indexed by pipeline rank.

    ``peak_inflight`` counts (stage, microbatch) pairs whose activations a rank holds: from the end of
    its ``F`` until its ``B`` (until its ``W`` when backward is split, since weight gradients still need
    the saved inputs). With virtual stages each pair is one chunk's activations.
    """

    makespan: float
    busy: list[float]
    bubble_fraction: float
    peak_inflight: list[int]
    timeline: list[list[tuple[float, float, Action]]]


def _deps(a: Action, num_stages: int) -> list[_Key]:
    """The actions ``a`` waits for (see the module docstring)."""
    s, mb = a.stage, a.microbatch
    if a.kind == "F":
        return [("F", s - 1, mb)] if s > 0 else []
    if a.kind == "B":
        return [("F", s, mb)] + ([("B", s + 1, mb)] if s < num_stages - 1 else [])
    return [("B", s, mb)]


def _positive_int(value: Any, what: str, fix: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ScheduleError(f"{what} must be an int, got {value!r} ({type(value).__name__}): {fix}")
    if value < 1:
        raise ScheduleError(f"{what} must be >= 1, got {value}: {fix}")
    return value


@dataclass
class Schedule:
    """Per-rank action lists for ``pp`` ranks, ``virtual_stages`` chunks per rank and ``microbatches``.

    ``actions[r]`` is what rank ``r`` runs, in order. ``split_backward`` says whether backward is split
    into ``B`` (input gradients) and ``W`` (weight gradients); when it is not, ``B`` does both.
    """

    name: str
    pp: int
    virtual_stages: int
    microbatches: int
    actions: list[list[Action]]
    split_backward: bool = False

    def __post_init__(self) -> None:
        _positive_int(self.pp, "pp", "pass the number of pipeline ranks")
        _positive_int(self.virtual_stages, "virtual_stages", "pass the number of model chunks per rank (1 for none)")
        _positive_int(self.microbatches, "microbatches", "pass how many microbatches one step splits its batch into")
        if not isinstance(self.actions, Sequence) or isinstance(self.actions, str):
            raise ScheduleError(f"actions must be a list of per-rank action lists, got {type(self.actions).__name__}")
        # copy, and give every action the chunk its text needs (F3 or F3.1)
        self.actions = [[self._labelled(a) for a in row] for row in self.actions]

    def _labelled(self, a: Any) -> Any:
        if not isinstance(a, Action):
            return a  # check() reports it
        chunk = a.stage // self.pp if self.virtual_stages > 1 else None
        return a if a.chunk == chunk else Action(a.kind, a.stage, a.microbatch, chunk)

    # ------------------------------------------------------------------ queries
    @property
    def num_stages(self) -> int:
        """``S = pp * virtual_stages``: how many pieces the model is cut into."""
        return self.pp * self.virtual_stages

    def rank_of(self, stage: int) -> int:
        """The pipeline rank that runs global ``stage``: stages go round-robin over ranks."""
        return stage % self.pp

    def _deps(self, a: Action) -> list[_Key]:
        return _deps(a, self.num_stages)

    # ------------------------------------------------------------------ checking
    def _check_coverage(self) -> None:
        """Every (stage, mb) has exactly one F and B (and W when split), each on the rank of its stage."""
        if len(self.actions) != self.pp:
            raise ScheduleError(f"schedule {self.name!r} has action lists for {len(self.actions)} ranks but pp={self.pp}: "
                                "give exactly one list per pipeline rank")
        kinds = ("F", "B", "W") if self.split_backward else ("F", "B")
        S, m = self.num_stages, self.microbatches
        problems: list[str] = []
        seen: Counter[_Key] = Counter()
        for r, row in enumerate(self.actions):
            for i, a in enumerate(row):
                where = f"rank {r} action {i}"
                if not isinstance(a, Action):
                    problems.append(f"{where} is {a!r}, not an Action")
                    continue
                if not 0 <= a.stage < S:
                    problems.append(f"{where} ({a}) has stage {a.stage}, outside 0..{S - 1}")
                    continue
                if not 0 <= a.microbatch < m:
                    problems.append(f"{where} ({a}) has microbatch {a.microbatch}, outside 0..{m - 1}")
                    continue
                if a.kind == "W" and not self.split_backward:
                    problems.append(f"{where} is {a}, a W action, but split_backward is False "
                                    "(set split_backward=True, or drop the W: B then computes weight gradients)")
                    continue
                if self.rank_of(a.stage) != r:
                    problems.append(f"{where} ({a}) is stage {a.stage}, which runs on rank {self.rank_of(a.stage)}")
                seen[a.key] += 1
        for kind in kinds:
            for s in range(S):
                for mb in range(m):
                    n = seen[(kind, s, mb)]
                    if n != 1:
                        what = "missing" if n == 0 else f"present {n} times"
                        problems.append(f"{kind} of stage {s} microbatch {mb} is {what}")
        if problems:
            shown = "; ".join(problems[:8]) + (f"; and {len(problems) - 8} more" if len(problems) > 8 else "")
            raise ScheduleError(f"schedule {self.name!r} is malformed: {shown}. Each (stage, microbatch) needs exactly "
                                f"one {', '.join(kinds)}, listed on rank stage % pp; build_schedule() makes valid ones")

    def _execute(self, duration: dict[str, list[float]]) -> list[list[tuple[float, float, Action]]]:
        """Run the lists in order under the dependency model; raise ScheduleError if they deadlock.

        The result does not depend on the order ranks are visited: an action's start is
        max(its rank's free time, its dependencies' ends), a fixed point of the lists.
        """
        end: dict[_Key, float] = {}
        pos = [0] * self.pp
        free = [0.0] * self.pp
        timeline: list[list[tuple[float, float, Action]]] = [[] for _ in range(self.pp)]
        progress = True
        while progress:
            progress = False
            for r, row in enumerate(self.actions):
                while pos[r] < len(row):
                    a = row[pos[r]]
                    deps = self._deps(a)
                    if any(d not in end for d in deps):
                        break
                    start = max([free[r], *(end[d] for d in deps)])
                    stop = start + duration[a.kind][a.stage]
                    end[a.key] = free[r] = stop
                    timeline[r].append((start, stop, a))
                    pos[r] += 1
                    progress = True
        stuck = [r for r in range(self.pp) if pos[r] < len(self.actions[r])]
        if stuck:
            where = {a.key: (r, i) for r, row in enumerate(self.actions) for i, a in enumerate(row)}
            lines = []
            for r in stuck:
                a = self.actions[r][pos[r]]
                waits = [d for d in self._deps(a) if d not in end]
                lines.append(f"rank {r} waits at action {pos[r]} ({a}, stage {a.stage}) for "
                             + ", ".join(f"{k}(stage {s}, mb {mb}) listed on rank {where[(k, s, mb)][0]} "
                                         f"as action {where[(k, s, mb)][1]}" for k, s, mb in waits))
            raise ScheduleError(f"schedule {self.name!r} deadlocks: " + "; ".join(lines)
                                + ". Reorder so that every action comes after the actions it depends on "
                                "(F after the previous stage's F, B after its F and the next stage's B, W after its B)")
        return timeline

    def check(self) -> None:
        """Raise :class:`ScheduleError` unless the schedule is complete, on the right ranks and deadlock-free."""
        self._check_coverage()
        self._execute({k: [1.0] * self.num_stages for k in KINDS})
        self._check_link_order()

    def link_messages(self, sending: bool) -> dict[tuple[int, int], list[tuple[str, int, int]]]:
        """Per (src rank, dst rank) link: the messages in the order the sender sends them
        (``sending=True``) or the receiver receives them (``False``): ("act"|"grad", stage, mb)."""
        last = self.num_stages - 1
        out: dict[tuple[int, int], list[tuple[str, int, int]]] = {}
        for r, row in enumerate(self.actions):
            for a in row:
                st, mb = a.stage, a.microbatch
                if a.kind == "F" and (st < last if sending else st > 0):
                    peer, to = (st + 1, st + 1) if sending else (st - 1, st)
                    link = (r, self.rank_of(peer)) if sending else (self.rank_of(peer), r)
                    out.setdefault(link, []).append(("act", to, mb))
                if a.kind == "B" and (st > 0 if sending else st < last):
                    peer, to = (st - 1, st - 1) if sending else (st + 1, st)
                    link = (r, self.rank_of(peer)) if sending else (self.rank_of(peer), r)
                    out.setdefault(link, []).append(("grad", to, mb))
        return out

    def _check_link_order(self) -> None:
        """The executor matches messages between two ranks by order: receivers must expect them in send order."""
        sent, received = self.link_messages(True), self.link_messages(False)
        for link in sorted(set(sent) | set(received)):
            a, b = sent.get(link, []), received.get(link, [])
            if a != b:
                i = next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
                raise ScheduleError(
                    f"rank {link[0]} sends to rank {link[1]} in an order the receiver does not expect (first "
                    f"difference at message {i}: sent {a[i] if i < len(a) else None}, expected "
                    f"{b[i] if i < len(b) else None}); reorder the actions so both sides agree")

    # ------------------------------------------------------------------ costing
    def _costs(self, value: float | Sequence[float], what: str) -> list[float]:
        S = self.num_stages
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            costs = [float(value)] * S
        elif isinstance(value, Sequence) and not isinstance(value, str):
            costs = [float(c) for c in value]
            if len(costs) != S:
                raise ScheduleError(f"{what} has {len(costs)} per-stage costs but the schedule has {S} stages "
                                    f"(pp={self.pp} x virtual_stages={self.virtual_stages}): give one per stage or a scalar")
        else:
            raise ScheduleError(f"{what} must be a number or a list of per-stage numbers, got {value!r}")
        bad = [c for c in costs if not math.isfinite(c) or c < 0]
        if bad:
            raise ScheduleError(f"{what} costs must be finite and >= 0, got {bad[0]!r}: pass times in any one unit")
        return costs

    def simulate(self, f: float | Sequence[float] = 1.0, b: float | Sequence[float] = 1.0,
                 w: float | Sequence[float] = 0.0) -> SimResult:
        """Time the schedule with per-stage costs ``f``, ``b``, ``w`` (a scalar means every stage).

        When backward is not split a B costs ``b + w``: the same total work either way, so schedules
        with and without split backward compare fairly.
        """
        self._check_coverage()
        fc, bc, wc = self._costs(f, "f"), self._costs(b, "b"), self._costs(w, "w")
        bfull = bc if self.split_backward else [x + y for x, y in zip(bc, wc)]
        timeline = self._execute({"F": fc, "B": bfull, "W": wc})
        makespan = max((stop for row in timeline for _, stop, _ in row), default=0.0)
        busy = [sum(stop - start for start, stop, _ in row) for row in timeline]
        bubble = 1.0 - sum(busy) / (self.pp * makespan) if makespan > 0 else 0.0
        release = "W" if self.split_backward else "B"
        peaks = []
        for row in self.actions:
            held = peak = 0
            for a in row:
                if a.kind == "F":
                    held += 1
                    peak = max(peak, held)
                elif a.kind == release:
                    held -= 1
            peaks.append(peak)
        return SimResult(makespan, busy, bubble, peaks, timeline)

    # ------------------------------------------------------------------ text and data
    def render(self, f: float | Sequence[float] = 1.0, b: float | Sequence[float] = 1.0,
               w: float | Sequence[float] = 0.0) -> str:
        """A per-rank text timeline of :meth:`simulate` (same cost arguments).

        Time is cut into slots as long as the shortest action; an action prints its name (``F3``, or
        ``F3.1`` for microbatch 3 of chunk 1) in its first slot and ``-`` in any further ones; ``.``
        is an idle slot. Costs that are not multiples of the shortest one are rounded to whole slots;
        actions that take no time (e.g. ``W`` with ``w=0``) are not drawn.
        """
        sim = self.simulate(f, b, w)
        durations = [stop - start for row in sim.timeline for start, stop, _ in row if stop > start]
        slot = min(durations, default=1.0)
        width = max((len(str(a)) for row in self.actions for a in row), default=2) + 1
        lines = [f"{self.name}: pp={self.pp} v={self.virtual_stages} m={self.microbatches} "
                 f"bubble={sim.bubble_fraction:.3f} makespan={sim.makespan:g} "
                 f"(one slot = {slot:g}; '.' idle, '-' the action to the left goes on)"]
        rw = len(str(self.pp - 1))
        for r, row in enumerate(sim.timeline):
            cells: list[str] = []
            for start, stop, a in row:
                if stop <= start:
                    continue
                first = round(start / slot)
                cells += ["."] * (first - len(cells))
                n = max(1, round(stop / slot) - max(first, len(cells)))
                cells += [str(a)] + ["-"] * (n - 1)
            total = round(sim.makespan / slot)
            cells += ["."] * (total - len(cells))
            lines.append(f"rank {r:>{rw}} | " + "".join(c.ljust(width) for c in cells).rstrip())
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """JSON-compatible: sizes, ``split_backward`` and per-rank actions as strings (``"F3"``, ``"B3.1"``)."""
        return {
            "name": self.name,
            "pp": self.pp,
            "virtual_stages": self.virtual_stages,
            "microbatches": self.microbatches,
            "split_backward": self.split_backward,
            "actions": [[str(self._labelled(a)) for a in row] for row in self.actions],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Schedule:
        """Inverse of :meth:`to_dict`; the stage of ``"B3.1"`` on rank ``r`` is ``1 * pp + r``. Checks the result."""
        try:
            pp, v = d["pp"], d["virtual_stages"]
            rows = d["actions"]
            actions = []
            for r, row in enumerate(rows):
                out = []
                for text in row:
                    mt = _ACTION_RE.fullmatch(text)
                    if mt is None or (mt.group(3) is None) != (v == 1):
                        form = "F3" if v == 1 else "F3.1 (microbatch 3, chunk 1)"
                        raise ScheduleError(f"rank {r} action {text!r} is not of the form {form}")
                    chunk = int(mt.group(3) or 0)
                    out.append(Action(mt.group(1), chunk * pp + r, int(mt.group(2))))
                actions.append(out)
            sched = cls(d["name"], pp, v, d["microbatches"], actions, bool(d["split_backward"]))
        except (KeyError, TypeError) as e:
            raise ScheduleError(f"not a schedule dict ({e!r}): expected the keys Schedule.to_dict() writes") from None
        sched.check()
        return sched


# ====================================================================================== builders
def _one_f_one_b(r: int, pp: int, m: int) -> list[tuple[str, int]]:
    """Rank r's 1F1B order as (kind, microbatch): warm-up forwards, (F, B) pairs, cool-down backwards."""
    warm = min(pp - r - 1, m)
    order = [("F", i) for i in range(warm)]
    for i in range(m - warm):
        order += [("F", warm + i), ("B", i)]
    order += [("B", i) for i in range(m - warm, m)]
    return order


def _interleaved(r: int, pp: int, m: int, v: int) -> list[Action]:
    """Rank r's order in Megatron-LM's interleaved 1F1B (forward_backward_pipelining_with_interleaving).

    The k-th forward (k = 0 .. m*v-1) takes microbatches in groups of pp and cycles the chunks: chunk
    (k mod pp*v) // pp, microbatch (k // (pp*v)) * pp + k mod pp. The k-th backward does the same with
    the chunks reversed (v-1 first). Warm-up runs (pp-r-1)*2 + (v-1)*pp forwards (at most m*v), then
    the steady state pairs forward k+warm-up with backward k, then the remaining backwards.
    """
    total = m * v

    def nth(k: int, forward: bool) -> tuple[int, int]:
        chunk = (k % (pp * v)) // pp
        if not forward:
            chunk = v - 1 - chunk
        return chunk, (k // (pp * v)) * pp + k % pp

    def act(kind: str, k: int) -> Action:
        chunk, mb = nth(k, kind == "F")
        return Action(kind, chunk * pp + r, mb)

    warm = min((pp - r - 1) * 2 + (v - 1) * pp, total)
    order = [act("F", k) for k in range(warm)]
    for k in range(total - warm):
        order += [act("F", k + warm), act("B", k)]
    order += [act("B", k) for k in range(total - warm, total)]
    return order


def _zero_bubble(pp: int, m: int) -> list[list[Action]]:
    """ZB-H1-like orders: 1F1B's F/B order per rank, W actions placed by a greedy list scheduler.

    The scheduler simulates with unit costs (F = B = W = 1, as ZB-H1 assumes) and, whenever a rank is
    free, runs its next F/B in 1F1B order if that action's dependencies are done, otherwise its oldest
    pending W (one whose B has run), otherwise waits for the F/B; leftover Ws run at the end. A rank
    never starts an F while it holds pp microbatches (F done, W not yet), which keeps the activation
    memory of every rank within 1F1B's worst rank (pp); it then runs a pending W first (one always
    exists: 1F1B itself never has more than pp - r forwards without their backward).
    """
    fb = [[Action(k, r, mb) for k, mb in _one_f_one_b(r, pp, m)] for r in range(pp)]
    end: dict[_Key, float] = {}
    free = [0.0] * pp
    pos = [0] * pp
    held = [0] * pp
    pending: list[deque[Action]] = [deque() for _ in range(pp)]
    out: list[list[Action]] = [[] for _ in range(pp)]
    blocked: set[int] = set()

    def run(r: int, a: Action, start: float) -> None:
        end[a.key] = free[r] = start + 1.0
        out[r].append(a)
        blocked.clear()  # new ends may unblock a waiting rank

    while True:
        ready = [r for r in range(pp) if r not in blocked and (pos[r] < len(fb[r]) or pending[r])]
        if not ready:
            break
        r = min(ready, key=lambda q: (free[q], q))
        t = free[r]
        nxt = fb[r][pos[r]] if pos[r] < len(fb[r]) else None
        deps_at = None
        if nxt is not None and not (nxt.kind == "F" and held[r] >= pp):
            deps = _deps(nxt, pp)
            if all(d in end for d in deps):
                deps_at = max([0.0, *(end[d] for d in deps)])
        if deps_at is not None and deps_at <= t:
            pass  # run the F/B now
        elif pending[r]:
            run(r, pending[r].popleft(), t)
            held[r] -= 1
            continue
        elif deps_at is not None:
            t = deps_at  # nothing to fill the wait with
        else:
            blocked.add(r)  # its F/B waits on an action no rank has run yet
            continue
        assert nxt is not None
        run(r, nxt, t)
        pos[r] += 1
        if nxt.kind == "F":
            held[r] += 1
        else:
            pending[r].append(Action("W", nxt.stage, nxt.microbatch))
    if any(pos[r] < len(fb[r]) or pending[r] for r in range(pp)):  # pragma: no cover - would be a bug here
        raise ScheduleError(f"zero_bubble construction stalled for pp={pp}, microbatches={m}: please report this")
    return out


def build_schedule(name: str, pp: int, microbatches: int, virtual_stages: int = 1) -> Schedule:
    """Build the schedule ``name`` (one of :data:`SCHEDULES`) and :meth:`~Schedule.check` it.

    - ``gpipe``: every rank runs all its forwards (microbatch 0..m-1), then all its backwards in the
      same order 0..m-1. Activations of all m microbatches are held at once.
    - ``1f1b``: rank r runs min(pp-r-1, m) warm-up forwards, then (F, B) pairs, then the remaining
      backwards: at most pp - r microbatches in flight. Needs microbatches >= pp.
    - ``interleaved_1f1b``: Megatron-LM's interleaved schedule, ``virtual_stages`` >= 2 chunks per rank
      (stage = chunk * pp + rank); shrinks the bubble by about 1/virtual_stages. Needs
      microbatches % pp == 0.
    - ``zero_bubble``: ZB-H1-like; backward split into B and W, 1F1B's F/B order, each rank's W
      actions placed greedily into the idle time (see :func:`_zero_bubble`). Needs microbatches >= pp.
    """
    if not isinstance(name, str) or name not in SCHEDULES:
        raise ScheduleError(f"unknown pipeline schedule {name!r}: use one of {', '.join(SCHEDULES)}")
    _positive_int(pp, "pp", "pass the number of pipeline ranks (1 or more)")
    m = _positive_int(microbatches, "microbatches", "split the batch into 1 or more microbatches")
    v = _positive_int(virtual_stages, "virtual_stages", "pass the number of model chunks per rank (1 for none)")
    if name != "interleaved_1f1b" and v != 1:
        raise ScheduleError(f"schedule {name!r} runs one chunk per rank but virtual_stages={v}: "
                            "use virtual_stages=1, or the 'interleaved_1f1b' schedule for several chunks per rank")
    if name in ("1f1b", "zero_bubble") and m < pp:
        raise ScheduleError(f"schedule {name!r} needs microbatches >= pp, got microbatches={m} < pp={pp}: "
                            f"use at least {pp} microbatches, fewer pipeline ranks, or 'gpipe'")
    if name == "interleaved_1f1b":
        if v < 2:
            raise ScheduleError(f"'interleaved_1f1b' needs virtual_stages >= 2 chunks per rank, got {v}: "
                                "pass virtual_stages=2 or more, or use '1f1b' for one chunk per rank")
        if m % pp:
            raise ScheduleError(f"'interleaved_1f1b' needs microbatches divisible by pp, got microbatches={m}, "
                                f"pp={pp}: use a multiple of {pp} microbatches (e.g. {(m // pp + 1) * pp})")

    split = False
    if name == "gpipe":
        actions = [[Action(k, r, mb) for k in ("F", "B") for mb in range(m)] for r in range(pp)]
    elif name == "1f1b":
        actions = [[Action(k, r, mb) for k, mb in _one_f_one_b(r, pp, m)] for r in range(pp)]
    elif name == "interleaved_1f1b":
        actions = [_interleaved(r, pp, m, v) for r in range(pp)]
    else:
        actions, split = _zero_bubble(pp, m), True
    sched = Schedule(name, pp, v, m, actions, split)
    sched.check()
    return sched
