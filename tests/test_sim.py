"""The deterministic simulator: a short run of seeded histories, exact replay, and its teeth.

The long run is ``make sim``. Here: a few hundred short histories must hold
every invariant; a seed must replay identically (in this process and in a new
one); each deliberately broken variant must be caught within the short run;
and the seeds that found real faults stay here as regressions.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys

import pytest

from phantom_sim import buggify
from phantom_sim.history import run_history
from phantom_sim.run import report, run_many

SHORT_SEEDS = 200
SHORT_STEPS = 5


def _explain(summary, steps: int, variants=()) -> str:  # type: ignore[no-untyped-def]
    out = io.StringIO()
    report(summary, steps, variants, out=out)
    return out.getvalue()


@pytest.mark.timeout(900)  # ~12 s on an idle 2-core machine; generous for a shared one
def test_short_run_holds_every_invariant() -> None:
    summary = run_many(range(SHORT_SEEDS), SHORT_STEPS, workers=2)
    assert summary.seeds == SHORT_SEEDS
    assert not summary.failed, _explain(summary, SHORT_STEPS)
    # The run exercised what the invariants judge.
    for name in ("one_primary_per_epoch", "planned_move_keeps_replicas", "epochs_never_go_back",
                 "writes_go_to_the_primary", "no_false_dead_on_observer_pause", "live_nodes_healthy_again"):
        assert summary.checks[name] > 0, name
    for kind in ("crash", "pause", "partition", "clock_jump", "disk_fail", "pubsub_loss", "observer_pause"):
        assert summary.faults.get(kind, 0) > 0, kind


def test_histories_with_shardings_current_epoch_hold_every_invariant() -> None:
    # The default runs without shardmap.current (the followers' polls alone); with it
    # on, the followers confirm their epoch from it and every invariant still holds.
    from phantom_sim.history import History
    from phantom_sim.shells import Params
    from services.sharding.service import CURRENT_EVERY

    params = Params()
    params.current_every = CURRENT_EVERY
    confirmed = 0
    for seed in range(12):
        h = History(seed, SHORT_STEPS, params)
        outcome = h.run()
        assert not outcome.violations, (seed, outcome.violations[:3], outcome.fault_log)
        confirmed += sum(p.follower.core.counters["confirmed"] for procs in h.world.services.values()
                         for p in procs if getattr(p, "follower", None) is not None)
    assert confirmed > 0


def test_a_seed_replays_identically_in_one_process() -> None:
    buggify.enable("promote_unconfirmed")
    try:
        a = run_history(3, SHORT_STEPS, trace=True)
        b = run_history(3, SHORT_STEPS, trace=True)
    finally:
        buggify.enable()
    assert a.violations, "the broken variant should fail this seed"
    assert a.digest == b.digest
    assert [str(v) for v in a.violations] == [str(v) for v in b.violations]
    assert a.fault_log == b.fault_log and a.events == b.events


def test_a_failing_seed_replays_identically_from_the_command_line() -> None:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONHASHSEED"}  # the CLI pins it itself
    cmd = [sys.executable, "-m", "phantom_sim", "--seed", "3", "--seeds", "1", "--steps", str(SHORT_STEPS),
           "--buggify", "promote_unconfirmed", "--workers", "1"]
    first = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert first.returncode == 1, first.stdout + first.stderr
    replay = [line.split("replay: ", 1)[1] for line in first.stdout.splitlines() if "replay: " in line]
    assert replay and replay[0].startswith("python -m phantom_sim --seed 3 --seeds 1 --steps ")
    again = subprocess.run([sys.executable, *replay[0].split()[1:], "--workers", "1"],
                           capture_output=True, text=True, env=env, timeout=120)
    assert again.returncode == 1

    def violations(text: str) -> list[str]:
        return [line for line in text.splitlines() if " at step " in line]

    assert violations(again.stdout) and violations(again.stdout)[0] in violations(first.stdout)


@pytest.mark.parametrize("variant", [
    "promote_unconfirmed",
    "step_down_late",
    "ignore_observer_lag",
    "skip_fencing",
    "confirm_any_round",
    "older_state_wins",
])
@pytest.mark.timeout(600)
def test_broken_variant_is_caught_within_the_short_run(variant: str) -> None:
    summary = run_many(range(SHORT_SEEDS), SHORT_STEPS, workers=2, variants=[variant], stop_on_failure=True)
    assert summary.failed, f"{variant} survived {summary.seeds} histories"


def test_replay_is_the_same_with_any_number_of_workers() -> None:
    one = run_many(range(6), SHORT_STEPS, workers=1)
    two = run_many(range(6), SHORT_STEPS, workers=2)
    assert one.events == two.events and one.faults == two.faults and one.checks == two.checks


# Seeds that found real faults (see docs/simulation.md, "What it found").
REGRESSIONS = [
    # A confirmation of a copy made for a cancelled assignment promoted the next assignment
    # of the same node before it had copied anything.
    pytest.param(97, 5, "confirm_any_round", id="confirm-names-its-assignment"),
    # Membership instances count state changes each for itself: after a leader change the
    # balancer, holding alive at (incarnation, 3) from the old leader, refused the new
    # leader's dead at (incarnation, 2) and kept routing to the dead node.
    pytest.param(24, 5, "per_instance_change", id="newest-membership-leader-verdict-wins"),
    # A membership leader that never heard a lost node declared it dead at incarnation 0:
    # the balancer, holding an earlier leader's suspect at the node's real incarnation,
    # refused the verdict as older and kept the node suspect (still routed to) for good.
    pytest.param(186, 5, "silent_at_zero", id="silent-verdict-at-the-announced-incarnation"),
    # A node lost while the store was cut off, then membership's leader and discovery both
    # restarted: discovery forgot the node, so the new leader never admitted nor judged it
    # and it was never failed over. The manager now admits every registered node it lacks.
    pytest.param(6218, 5, "registry_not_readmitted", id="registered-nodes-are-always-judged"),
]


def test_wire_change_orders_verdicts_by_leader_term_first() -> None:
    from services.membership.service import wire_change, wire_members

    assert wire_change(37, 2) > wire_change(36, 3) > wire_change(0, 10**6)
    assert wire_change(5, 1) < wire_change(5, 2)
    rows = wire_members([{"id": "n1", "change": 3}, {"id": "n2"}], 7)
    assert rows[0]["change"] == wire_change(7, 3) and "change" not in rows[1]


@pytest.mark.parametrize(("seed", "steps", "old_behaviour"), REGRESSIONS)
def test_regression_seed(seed: int, steps: int, old_behaviour: str) -> None:
    fixed = run_many([seed], steps)
    assert not fixed.failed, _explain(fixed, steps)
    broken = run_many([seed], steps, variants=[old_behaviour])
    assert broken.failed, f"seed {seed} no longer shows the fault it found; pick a new regression seed"
