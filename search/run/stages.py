"""The life of one trial, stage by stage, in the order it happens.

    ask -> pre-screen -> dispatch -> started -> measured -> rungs -> result -> finish

Each stage is a function over the trial in flight and the shared context
(:mod:`search.run.pipeline`); it writes its stage record (:mod:`search.storage.record`) once, asks the pruner
where the stage has a decision, and lets the hooks (:class:`search.run.pipeline.Hook`: hardware,
evolution, adaptation) amend what it does. :mod:`search.run.coordinator` is the loop that
feeds completions to these stages and keeps every worker busy.

A trial ends in one of Optuna's states, with its reason recorded: COMPLETE (finite
values), PRUNED (a pruner's or adaptation's decision, or an invalid config) or FAIL (the
candidate failed, or its retries ran out). A crashed attempt is retried on another worker.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import replace

import optuna
from optuna.trial import TrialState

from engine.config import Config
from engine.model.cost import flops, param_count
from search.pruning.base import Cost, constraint_values, proxy_group, stage0_values, stage1_values
from search.run.pipeline import Context, Current, Flight, Phase
from search.run.pool import Worker
from search.storage import artifacts
from search.storage import lineage as lin
from search.storage import record as rec
from workers.records import (
    LATENCY_TARGET,
    OBJECTIVES,
    Decision,
    Measurement,
    Outcome,
    RungReport,
    TrialOutcome,
    TrialRequest,
)

MAX_INVALID_IN_A_ROW = 200


class InvalidSpaceError(ValueError):
    """The sampler keeps proposing parameters that decode to no valid config."""


# -- 1. ask and pre-screen (no device time) ------------------------------------------------


def ask(ctx: Context, may_ask: Callable[[], bool]) -> Flight | None:
    """The next candidate that passes the pre-screen (None: the target was reached first).

    Raises:
        InvalidSpaceError: the last :data:`MAX_INVALID_IN_A_ROW` proposals were all invalid.
    """
    for _ in range(MAX_INVALID_IN_A_ROW):
        start = time.perf_counter()
        ctx.hooks.before_ask(ctx)
        trial = ctx.study.ask(fixed_distributions=ctx.distributions)
        try:
            config = ctx.space.decode(trial.params, ctx.channels)
        except ValueError as err:
            _tell_invalid(ctx, trial, str(err))
        else:
            flight = prescreen(ctx, trial, config, start)
            if flight is not None:
                return flight
        if not may_ask():
            return None
    raise InvalidSpaceError(f"the last {MAX_INVALID_IN_A_ROW} proposals were all invalid "
                            "configs; check the search space")


def prescreen(ctx: Context, trial: optuna.Trial, config: Config, start: float
              ) -> Flight | None:
    """Stage 0: the analytic cost (and the hooks' prediction) against the pruner; a trial
    stopped here is PRUNED with what is known, so the sampler learns the infeasible region."""
    rec.write(trial, config)
    cost = ctx.hooks.on_asked(ctx, trial, config,
                              Cost(param_count(config.unet), flops(config.unet),
                                   config.train.steps, proxy_group=proxy_group(config)))
    flight = Flight(trial, config, cost)
    flight.overhead_s += time.perf_counter() - start
    decision = ctx.pruner.prescreen(trial.number, cost)
    rec.write(trial, rec.prescreen(cost, decision))
    if not decision.proceed:
        tell(ctx, flight, TrialState.PRUNED, decision.reason, feasible=_constrain(ctx, flight))
        return None
    ctx.flights[trial.number] = flight
    return flight


def _tell_invalid(ctx: Context, trial: optuna.Trial, reason: str) -> None:
    """An impossible combination: PRUNED and infeasible, so the sampler avoids it."""
    rec.write(trial, rec.Finished(reason=f"invalid config: {reason}", feasible=False))
    trial.set_constraint("valid_config", 1.0)
    ctx.study.tell(trial, state=TrialState.PRUNED)
    ctx.told += 1
    ctx.tally.pruned += 1
    ctx.say(f"trial {trial.number} pruned: invalid config: {reason}")


# -- 2. dispatch ---------------------------------------------------------------------------


def dispatch(ctx: Context, flight: Flight, worker: Worker) -> None:
    """Send the trial's current attempt to an idle worker."""
    assert flight.current is None, f"trial {flight.number} already runs on {flight.current}"
    start = time.perf_counter()
    ev = ctx.space.evaluate
    request = TrialRequest(flight.number, flight.attempt, flight.config.to_dict(),
                           ctx.space.rungs.steps(flight.config.train.steps),
                           fid_samples=ev.fid_samples, grid_images=ev.grid_images,
                           latency_runs=ev.latency_runs, latency_rounds=ev.latency_rounds,
                           memory=ev.memory, eval_seed=ev.seed,
                           memory_limit_mb=ctx.space.constraints.max_trial_memory_mb,
                           latency_target_ms=ctx.latency_target_ms)
    request = replace(ctx.hooks.on_dispatch(ctx, flight, worker, request), sent_at=time.time())
    ctx.pool.dispatch(worker, request, ctx.data_ref)
    flight.current, flight.phase = Current(worker.name, time.time()), Phase.STARTING
    flight.overhead_s += time.perf_counter() - start


# -- 3. reports while it runs ----------------------------------------------------------------


def on_started(flight: Flight, pid: int) -> None:
    assert flight.current is not None
    flight.current, flight.phase = replace(flight.current, pid=pid), Phase.MEASURING


def on_measured(ctx: Context, flight: Flight, worker: Worker, m: Measurement) -> Decision:
    """Stage 1: latency and memory are known (the hooks put them in target-device terms)."""
    if m.budget is not None:  # the worker chose the schedule for the latency target
        budget = rec.StepBudget(m.budget)
        rec.write(flight.trial, budget)
        flight.config = replace(flight.config, schedule=budget.schedule)
    flight.measurement = ctx.hooks.on_measured(ctx, flight, worker, m)
    decision = ctx.pruner.on_measured(flight.number, flight.measurement)
    rec.write(flight.trial, rec.measured(flight.measurement, decision, flight.conversion))
    flight.phase = Phase.TRAINING
    return decision


def on_rung(ctx: Context, flight: Flight, rung: RungReport) -> Decision:
    """Stage 2: the quality proxy at a rung, answered by the pruner (then the hooks)."""
    decision = ctx.pruner.on_rung(flight.number, rung, flight.measurement)
    last = rung.step >= flight.cost.train_steps
    if decision.proceed and not last:
        decision = ctx.hooks.on_rung(ctx, flight, rung, decision)
    answer = "continue" if decision.proceed else "adapt" if decision.keep_weights else "prune"
    since = max((r.step for r in flight.rungs if r.attempt == flight.attempt), default=0)
    history = tuple((s, v) for s, v in rung.val_history if since < s <= rung.step)
    flight.rungs += (rec.Rung(rung.step, rung.val_loss, rung.train_loss, rung.elapsed_s,
                              flight.attempt, answer, decision.reason, history),)
    rec.write(flight.trial, rec.Rungs(flight.rungs))
    flight.phase = Phase.EVALUATING if last and decision.proceed else Phase.TRAINING
    return decision


# -- 4. the attempt ends ---------------------------------------------------------------------


def on_result(ctx: Context, flight: Flight, outcome: TrialOutcome) -> None:
    """An attempt ended: complete it, retry a crash, or stop it (PRUNED or FAIL)."""
    flight.result_at = time.perf_counter()
    worker = ctx.pool.find(outcome.worker)
    ctx.hooks.on_result(ctx, flight, outcome, worker)
    _end_attempt(flight, outcome.status.value, outcome.reason, outcome.worker)
    if outcome.status is Outcome.CRASHED:
        retry_or_fail(ctx, flight, outcome.reason)
    elif outcome.status is Outcome.COMPLETED:
        complete(ctx, flight, outcome)
    else:
        stop(ctx, flight, outcome)


def on_death(ctx: Context, flight: Flight, worker: str, reason: str) -> None:
    """The worker running the trial died: the attempt crashed."""
    _end_attempt(flight, "worker died", reason, worker)
    retry_or_fail(ctx, flight, reason)


def _end_attempt(flight: Flight, status: str, reason: str, worker: str) -> None:
    assert flight.current is not None
    flight.attempts += (rec.Attempt(flight.attempt, worker, status, reason,
                                    flight.current.started, time.time()),)
    rec.write(flight.trial, rec.Attempts(flight.attempts))
    flight.current = None


def retry_or_fail(ctx: Context, flight: Flight, reason: str) -> None:
    """Queue another attempt (on another worker if there is one), up to ``max_retries``."""
    if flight.attempt >= ctx.max_retries:
        tell(ctx, flight, TrialState.FAIL,
             f"gave up after {flight.attempt + 1} attempts; last: {reason}")
        return
    flight.avoid |= {flight.attempts[-1].worker}
    flight.attempt += 1
    flight.phase = Phase.QUEUED
    ctx.hooks.on_retry(ctx, flight)
    ctx.queue.appendleft(flight)
    ctx.say(f"trial {flight.number} retried (attempt {flight.attempt + 1}): {reason}")


# -- 5. finish -------------------------------------------------------------------------------


def complete(ctx: Context, flight: Flight, outcome: TrialOutcome) -> None:
    """COMPLETE with the objectives in target-device terms (FAIL if any is not finite)."""
    start = time.perf_counter()
    values = [_target_value(flight, name, outcome.values[name]) for name in OBJECTIVES]
    if not all(math.isfinite(v) for v in values):
        tell(ctx, flight, TrialState.FAIL, f"non-finite objective values {values}",
             outcome=outcome, feasible=_constrain(ctx, flight, outcome))
        return
    _remeasured(flight, outcome)
    files = _keep_artifacts(ctx, flight, outcome)
    feasible = _constrain(ctx, flight, outcome)
    flight.overhead_s += time.perf_counter() - start
    tell(ctx, flight, TrialState.COMPLETE, "", values, outcome, files, feasible)


def _remeasured(flight: Flight, outcome: TrialOutcome) -> None:
    """A disturbed latency the worker measured again at the end: the measured record (and
    the conversion to the target class) is written again with both attempts, and the
    constraints see the kept latency."""
    m = outcome.measurement
    stored = flight.trial.user_attrs.get(rec.MEASURED)
    if m is None or not m.latency_attempts or stored is None:
        return
    scale = _target_value(flight, "latency_ms", 1.0)
    flight.measurement = replace(m, latency_ms=m.latency_ms * scale)
    rec.write(flight.trial, rec.remeasured(rec.Measured.from_doc(stored), m, scale))
    if flight.conversion is not None:  # the conversion names the latency that was kept
        flight.conversion = replace(flight.conversion, measured_ms=m.latency_ms,
                                    latency_ms=m.latency_ms * scale)
        rec.write(flight.trial, flight.conversion)


def stop(ctx: Context, flight: Flight, outcome: TrialOutcome) -> None:
    """PRUNED (a decision stopped it) or FAIL (the candidate failed); a stopped trial that
    sent its weights back keeps them, and the hooks may add to its reason."""
    files = _keep_artifacts(ctx, flight, outcome) if outcome.artifacts else None
    reason = outcome.reason + ctx.hooks.on_stopped(ctx, flight, outcome)
    state = TrialState.PRUNED if outcome.status is Outcome.PRUNED else TrialState.FAIL
    tell(ctx, flight, state, reason, outcome=outcome, files=files,
         feasible=_constrain(ctx, flight, outcome))


def _keep_artifacts(ctx: Context, flight: Flight, outcome: TrialOutcome
                    ) -> tuple[dict[str, str], dict[str, str]]:
    """Write the attempt's files under the results folder and register them with Optuna."""
    folder = artifacts.trial_dir(ctx.results, ctx.study.study_name, flight.number)
    paths = artifacts.write_trial(folder, outcome.artifacts)
    return paths, artifacts.register(flight.trial, ctx.store, paths)


def _target_value(flight: Flight, name: str, value: float) -> float:
    """A latency the worker measured on its device, in target-device terms."""
    if name in ("latency_ms", LATENCY_TARGET) and flight.conversion is not None:
        return value * (flight.conversion.ratio or 1.0)
    return value


def _constrain(ctx: Context, flight: Flight, outcome: TrialOutcome | None = None) -> bool:
    """Record the constraint values of every limit whose value is known (the pre-screen,
    the measurement, and what the worker reported for the limits it enforces); returns
    whether the trial is feasible."""
    known = stage0_values(flight.cost)
    if flight.measurement is not None:
        known.update(stage1_values(flight.measurement, ctx.space.evaluate.memory))
    if outcome is not None:
        known.update({name: _target_value(flight, name, value)
                      for name, value in outcome.constraint_values.items()})
    violations = constraint_values(known, ctx.limits)
    for name, value in violations.items():
        flight.trial.set_constraint(name, value)
    return all(v <= 0 for v in violations.values())


def tell(ctx: Context, flight: Flight, state: TrialState, reason: str,
         values: list[float] | None = None, outcome: TrialOutcome | None = None,
         files: tuple[dict[str, str], dict[str, str]] | None = None,
         feasible: bool | None = None) -> None:
    """Write the finished record (and the flat headline numbers), then tell Optuna."""
    start = time.perf_counter()
    if outcome is not None and outcome.walltime is not None:  # up to now: within wall_s below
        written_s = time.perf_counter() - flight.result_at  # the coordinator's part of it
        rec.write(flight.trial, outcome.walltime.plus(write_s=written_s))
    finished = _finished(ctx, flight, reason, outcome, files,
                         feasible if ctx.limits else None)
    rec.write(flight.trial, finished)
    if values is not None:
        rec.write(flight.trial, rec.headline(values, finished, lin.lineage_of(flight.trial).parent))
    ctx.study.tell(flight.trial, values=values, state=state)
    ctx.told += 1
    flight.overhead_s += time.perf_counter() - start
    ctx.flights.pop(flight.number, None)
    _count(ctx, flight, state, reason, values)


def _finished(ctx: Context, flight: Flight, reason: str, outcome: TrialOutcome | None,
              files: tuple[dict[str, str], dict[str, str]] | None, feasible: bool | None
              ) -> rec.Finished:
    timings = {**(outcome.timings if outcome else {}),
               "wall_s": time.time() - flight.asked_at, "coordinator_s": flight.overhead_s}
    if outcome is None:
        return rec.Finished(reason=reason, feasible=feasible, timings=timings)
    worker = ctx.pool.find(outcome.worker)
    profile = worker.profile if worker is not None else {}
    return rec.Finished(
        reason=reason, feasible=feasible, worker=outcome.worker,
        node={"id": profile.get("node_id", ""), "host": profile.get("host", "")}
        if worker is not None else None,
        device=outcome.device or None, device_class=str(profile.get("device_class", "")),
        quality=outcome.metrics.get("quality") or None, timings=timings,
        artifacts=files[0] if files else None, artifact_ids=files[1] if files else None)


def _count(ctx: Context, flight: Flight, state: TrialState, reason: str,
           values: list[float] | None) -> None:
    tally = ctx.tally
    if state is TrialState.COMPLETE:
        tally.complete += 1
        tally.durations.append(time.time() - flight.asked_at)
        tally.overheads.append(flight.overhead_s)
        shown = ", ".join(f"{n} {v:.4g}" for n, v in zip(OBJECTIVES, values or []))
        ctx.say(f"trial {flight.number} complete: {shown}")
    elif state is TrialState.PRUNED:
        tally.pruned += 1
        ctx.say(f"trial {flight.number} pruned: {reason}")
    else:
        tally.failed += 1
        ctx.say(f"trial {flight.number} failed: {reason}")
