"""Pipeline schedules as data: construction, checking, simulated bubbles and memory, text, bad input.

Pure Python, no processes: the schedules are checked and timed by the simulator in
autoshard.runtime.schedules, under its model (a rank runs its list in order, communication is free).
"""

from __future__ import annotations

import json

import pytest

from autoshard.runtime.errors import AutoshardError, ScheduleError
from autoshard.runtime.schedules import SCHEDULES, Action, Schedule, build_schedule


def _grid():
    """(name, pp, m, v) for every schedule over sizes it accepts, edge cases (pp=1, m=pp) included."""
    for pp in (1, 2, 3, 4, 8):
        for m in sorted({1, 2, 3, pp, pp + 1, 2 * pp, 4 * pp, 9}):
            yield "gpipe", pp, m, 1
            if m >= pp:
                yield "1f1b", pp, m, 1
                yield "zero_bubble", pp, m, 1
            if m % pp == 0:
                for v in (2, 3, 4):
                    yield "interleaved_1f1b", pp, m, v


GRID = list(_grid())


# =============================================================================== validity
@pytest.mark.parametrize("name,pp,m,v", GRID, ids=[f"{n}-pp{p}-m{m}-v{v}" for n, p, m, v in GRID])
def test_built_schedules_are_complete_and_deadlock_free(name, pp, m, v):
    s = build_schedule(name, pp, m, virtual_stages=v)
    s.check()
    assert (s.name, s.pp, s.virtual_stages, s.microbatches, s.num_stages) == (name, pp, v, m, pp * v)
    assert s.split_backward == (name == "zero_bubble")
    kinds = ("F", "B", "W") if s.split_backward else ("F", "B")
    seen = [(a.kind, a.stage, a.microbatch) for row in s.actions for a in row]
    expected = [(k, st, mb) for k in kinds for st in range(pp * v) for mb in range(m)]
    assert sorted(seen) == sorted(expected)  # every (stage, mb) exactly once per kind
    for r, row in enumerate(s.actions):
        assert all(s.rank_of(a.stage) == r and a.stage % pp == r for a in row)
    sim = s.simulate(1.0, 1.0, 1.0 if s.split_backward else 0.0)
    assert all(start < stop for row in sim.timeline for start, stop, _ in row)
    assert [len(row) for row in sim.timeline] == [len(row) for row in s.actions]


@pytest.mark.parametrize("name,pp,m,v", GRID, ids=[f"{n}-pp{p}-m{m}-v{v}" for n, p, m, v in GRID])
def test_messages_on_each_link_arrive_in_send_order(name, pp, m, v):
    # the executor (runtime/pipeline.py) matches untagged messages between two ranks by order: every
    # built schedule must receive on each (src, dst) link in the order the sender sends
    s = build_schedule(name, pp, m, virtual_stages=v)
    assert s.link_messages(sending=True) == s.link_messages(sending=False)


@pytest.mark.parametrize("pp,v,m", [(pp, v, k * pp) for pp in (2, 4) for v in (2, 3) for k in (1, 2, 4)])
def test_interleaved_follows_megatron(pp, v, m):
    s = build_schedule("interleaved_1f1b", pp, m, virtual_stages=v)
    for r, row in enumerate(s.actions):
        warm = min((pp - r - 1) * 2 + (v - 1) * pp, m * v)
        assert [a.kind for a in row[:warm]] == ["F"] * warm
        if warm < m * v:  # steady state: forward k + warm-up, then backward k
            assert (row[warm].kind, row[warm + 1].kind) == ("F", "B")
        fwd = [(a.stage // pp, a.microbatch) for a in row if a.kind == "F"]
        bwd = [(a.stage // pp, a.microbatch) for a in row if a.kind == "B"]
        # forwards: microbatches in groups of pp, chunks cycling 0..v-1; backwards: chunks reversed
        assert fwd[:pp * v] == [(c, i) for c in range(v) for i in range(pp)]
        assert bwd[:pp * v] == [(v - 1 - c, i) for c in range(v) for i in range(pp)]
    # Megatron's bubble: (pp - 1) chunk-sized slots of f + b, i.e. (pp - 1) / v of a whole stage
    sim = s.simulate(1 / v, 1 / v)
    assert sim.bubble_fraction == pytest.approx((pp - 1) / v / (m + (pp - 1) / v), abs=1e-9)


# =============================================================================== bubbles and memory
@pytest.mark.parametrize("pp", [2, 4])
@pytest.mark.parametrize("m", [4, 8, 16])
def test_1f1b_and_gpipe_bubble_and_memory(pp, m):
    ideal = (pp - 1) / (m + pp - 1)
    one = build_schedule("1f1b", pp, m).simulate(f=1.0, b=1.0)
    assert one.bubble_fraction == pytest.approx(ideal, abs=1e-9)
    assert one.makespan == pytest.approx(2 * (m + pp - 1))
    assert one.busy == pytest.approx([2.0 * m] * pp)
    assert one.peak_inflight == [min(pp - r, m) for r in range(pp)]
    assert max(one.peak_inflight) <= pp
    g = build_schedule("gpipe", pp, m).simulate(f=1.0, b=1.0)
    assert g.bubble_fraction == pytest.approx(ideal, abs=1e-9)
    assert g.peak_inflight[0] == m


@pytest.mark.parametrize("pp,m", [(2, 4), (2, 8), (4, 4), (4, 8), (4, 16)])
@pytest.mark.parametrize("v", [2, 3])
def test_interleaved_bubble_below_1f1b(pp, m, v):
    # per-chunk costs f/v, b/v: the same total work per rank as 1f1b with f = b = 1
    inter = build_schedule("interleaved_1f1b", pp, m, virtual_stages=v).simulate(f=1 / v, b=1 / v)
    one = build_schedule("1f1b", pp, m).simulate(f=1.0, b=1.0)
    assert sum(inter.busy) == pytest.approx(sum(one.busy))
    assert inter.bubble_fraction < one.bubble_fraction


def test_zero_bubble_beats_1f1b_at_equal_work():
    zb = build_schedule("zero_bubble", 4, 8).simulate(f=1.0, b=1.0, w=1.0)
    one = build_schedule("1f1b", 4, 8).simulate(f=1.0, b=2.0)
    assert sum(zb.busy) == pytest.approx(sum(one.busy))
    assert zb.bubble_fraction < one.bubble_fraction
    # ZB-H1's bubble: (pp - 1) * (f + b - w) = 3 time units over 24 of work per rank
    assert zb.makespan == pytest.approx(27.0)
    assert max(zb.peak_inflight) <= 4  # Ws do not push memory past 1F1B's worst rank


def test_zero_bubble_keeps_1f1b_order_of_f_and_b():
    zb = build_schedule("zero_bubble", 4, 8)
    one = build_schedule("1f1b", 4, 8)
    for zrow, orow in zip(zb.actions, one.actions):
        assert [a for a in zrow if a.kind != "W"] == orow
        assert sum(a.kind == "W" for a in zrow) == 8


def test_unsplit_backward_costs_b_plus_w():
    s = build_schedule("1f1b", 2, 4)
    assert s.simulate(1.0, 1.0, 1.0).makespan == pytest.approx(s.simulate(1.0, 2.0, 0.0).makespan)


def test_per_stage_costs():
    s = build_schedule("gpipe", 2, 2)
    sim = s.simulate(f=[1.0, 3.0], b=[1.0, 3.0])
    assert sim.busy == pytest.approx([4.0, 12.0])
    # rank 1 is the slow stage: F0 runs 1..4, F1 4..7, then B0 7..10, B1 10..13; rank 0's Bs follow
    assert sim.makespan == pytest.approx(14.0)


# =============================================================================== hand-made bad schedules
def A(kind: str, stage: int, mb: int) -> Action:
    return Action(kind, stage, mb)


def test_check_catches_backward_before_its_forward():
    s = Schedule("bad", 1, 1, 1, [[A("B", 0, 0), A("F", 0, 0)]])
    with pytest.raises(ScheduleError, match="deadlocks.*rank 0 waits at action 0"):
        s.check()


def test_check_catches_ranks_waiting_on_each_other():
    # rank 0 wants B0 (from rank 1) before it sends F1; rank 1 wants F1 before it runs B0
    s = Schedule("cycle", 2, 1, 2, [
        [A("F", 0, 0), A("B", 0, 0), A("F", 0, 1), A("B", 0, 1)],
        [A("F", 1, 1), A("B", 1, 1), A("F", 1, 0), A("B", 1, 0)],
    ])
    with pytest.raises(ScheduleError, match="deadlocks") as e:
        s.check()
    assert "rank 0" in str(e.value) and "rank 1" in str(e.value)
    with pytest.raises(ScheduleError, match="deadlocks"):
        s.simulate()


def test_check_catches_missing_duplicate_and_misplaced_actions():
    good = build_schedule("1f1b", 2, 4)
    missing = Schedule("missing", 2, 1, 4, [good.actions[0][:-1], good.actions[1]])
    with pytest.raises(ScheduleError, match="B of stage 0 microbatch 3 is missing"):
        missing.check()
    dup = Schedule("dup", 2, 1, 4, [good.actions[0] + [A("F", 0, 0)], good.actions[1]])
    with pytest.raises(ScheduleError, match="present 2 times"):
        dup.check()
    swapped = Schedule("swapped", 2, 1, 4, [good.actions[1], good.actions[0]])
    with pytest.raises(ScheduleError, match="runs on rank"):
        swapped.check()
    with pytest.raises(ScheduleError, match="outside"):
        Schedule("range", 2, 1, 4, [good.actions[0] + [A("F", 2, 0)], good.actions[1]]).check()
    with pytest.raises(ScheduleError, match="split_backward is False"):
        Schedule("w", 2, 1, 4, [good.actions[0] + [A("W", 0, 0)], good.actions[1]]).check()
    with pytest.raises(ScheduleError, match="W of stage"):
        Schedule("no-w", 2, 1, 4, good.actions, split_backward=True).check()
    with pytest.raises(ScheduleError, match="lists for 1 ranks but pp=2"):
        Schedule("short", 2, 1, 4, good.actions[:1]).check()
    with pytest.raises(ScheduleError, match="kind"):
        Action("X", 0, 0)


# =============================================================================== text and data
def test_action_text():
    assert str(A("F", 3, 0)) == "F0"
    s = build_schedule("interleaved_1f1b", 2, 4, virtual_stages=2)
    assert str(s.actions[1][2]) == "F0.1"  # rank 1's third forward: microbatch 0 of chunk 1 (stage 3)
    assert s.actions[1][2] == A("F", 3, 0)  # the chunk is text only, not identity
    assert str(build_schedule("1f1b", 2, 4).actions[0][0]) == "F0"


def test_render():
    s = build_schedule("1f1b", 4, 8)
    text = s.render()
    lines = text.splitlines()
    assert len(lines) == 1 + 4
    assert "1f1b" in lines[0] and "pp=4" in lines[0] and "m=8" in lines[0] and "bubble=0.273" in lines[0]
    assert [ln.split("|")[0].strip() for ln in lines[1:]] == [f"rank {r}" for r in range(4)]
    assert lines[1].split("|")[1].split()[:5] == ["F0", "F1", "F2", "F3", "."]
    assert "F0" in text and "." in text
    assert "-" in s.render(f=1.0, b=2.0)  # a two-slot B
    assert "F0.1" in build_schedule("interleaved_1f1b", 2, 4, virtual_stages=2).render(0.5, 0.5)


@pytest.mark.parametrize("name,v", [("gpipe", 1), ("1f1b", 1), ("interleaved_1f1b", 2), ("zero_bubble", 1)])
def test_to_dict_is_json_and_round_trips(name, v):
    s = build_schedule(name, 4, 8, virtual_stages=v)
    d = json.loads(json.dumps(s.to_dict()))
    assert set(d) == {"name", "pp", "virtual_stages", "microbatches", "split_backward", "actions"}
    assert d["actions"][0][0] == ("F0" if v == 1 else "F0.0")
    back = Schedule.from_dict(d)
    assert back.actions == s.actions and back.split_backward == s.split_backward
    assert back.to_dict() == s.to_dict()


def test_from_dict_rejects_bad_text():
    d = build_schedule("interleaved_1f1b", 2, 4, virtual_stages=2).to_dict()
    d["actions"][0][0] = "F0"  # chunk missing
    with pytest.raises(ScheduleError, match="F3.1"):
        Schedule.from_dict(d)
    with pytest.raises(ScheduleError, match="keys"):
        Schedule.from_dict({"pp": 2})


# =============================================================================== bad input
@pytest.mark.parametrize("args,kwargs,match", [
    (("pipedream", 2, 4), {}, "unknown pipeline schedule 'pipedream': use one of gpipe, 1f1b"),
    (("1f1b", 0, 4), {}, "pp must be >= 1, got 0"),
    (("1f1b", True, 4), {}, "pp must be an int"),
    (("gpipe", 2, 0), {}, "microbatches must be >= 1, got 0"),
    (("gpipe", 2, 2.0), {}, "microbatches must be an int"),
    (("gpipe", 2, 4), {"virtual_stages": 0}, "virtual_stages must be >= 1, got 0"),
    (("gpipe", 2, 4), {"virtual_stages": 2}, "virtual_stages=2.*use virtual_stages=1.*interleaved_1f1b"),
    (("1f1b", 2, 4), {"virtual_stages": 2}, "virtual_stages=2"),
    (("zero_bubble", 2, 4), {"virtual_stages": 3}, "virtual_stages=3"),
    (("1f1b", 4, 3), {}, "microbatches=3 < pp=4.*at least 4 microbatches"),
    (("zero_bubble", 4, 2), {}, "microbatches=2 < pp=4"),
    (("interleaved_1f1b", 4, 6), {"virtual_stages": 2}, "microbatches=6, pp=4: use a multiple of 4.*e.g. 8"),
    (("interleaved_1f1b", 4, 8), {}, "virtual_stages >= 2.*'1f1b'"),
])
def test_bad_input(args, kwargs, match):
    with pytest.raises(ScheduleError, match=match) as e:
        build_schedule(*args, **kwargs)
    assert isinstance(e.value, AutoshardError) and isinstance(e.value, ValueError)


def test_bad_costs():
    s = build_schedule("1f1b", 2, 4)
    with pytest.raises(ScheduleError, match="3 per-stage costs but the schedule has 2 stages"):
        s.simulate(f=[1.0, 1.0, 1.0])
    with pytest.raises(ScheduleError, match="finite and >= 0"):
        s.simulate(b=-1.0)
    with pytest.raises(ScheduleError, match="number or a list"):
        s.simulate(w="1")


def test_every_name_builds():
    assert SCHEDULES == ("gpipe", "1f1b", "interleaved_1f1b", "zero_bubble")
    for name in SCHEDULES:
        build_schedule(name, 2, 4, virtual_stages=2 if name == "interleaved_1f1b" else 1)
