"""Contract tests of statemachine/federated_training.asl.json on LocalStack.

The test is the activity worker (GetActivityTask / SendTaskSuccess /
SendTaskFailure), i.e. it plays the part fedstep-lambda's local mode plays,
and checks the task inputs and the execution's course against the contract
in statemachine/README.md: StartRound, then PlanRound, the shard Maps
(ShardStatistics and DecideRound when the plan asks for statistics, then
AggregateShards), CommitRound, and ShouldContinue; and, when the execution
fails, ReportFailure before Failed.
"""

from __future__ import annotations

import json
import time

import pytest
from botocore.exceptions import ClientError

from conftest import entered_states, wait_done

ROUND_TIMEOUT = 2  # seconds: StartRound's TimeoutSecondsPath in the timeout tests
# How long the worker holds a full batch of shard tasks before answering:
# a Map that ignored its concurrency would schedule more tasks meanwhile
# (LocalStack schedules the next iteration within milliseconds).
HOLD = 0.5


def round_result(job_id: str, rnd: int, cont: bool, **extra) -> dict:
    return {
        "job_id": job_id,
        "round": rnd,
        "global_model_key": f"jobs/{job_id}/rounds/{rnd + 1}/global.safetensors",
        "metrics": {"loss": 1.0 / rnd, "clients": 3},
        "continue": cont,
        **extra,
    }


def handover(job_id: str, rnd: int, usable: int = 3, expected: int = 3) -> dict:
    """What the stream path answers StartRound with once every expected client is in."""
    return {"job_id": job_id, "round": rnd, "closed_by": "stream", "usable": usable, "expected": expected}


DEADLINE = {"closed_by": "deadline"}  # DeadlinePassed's $.handover


def plan(attempt: str, shards: int = 1, statistics: bool = False, concurrency: int = 1) -> dict:
    """PlanRound's answer for a round to aggregate: shards 0..shards-1."""
    return {"attempt": attempt, "shards": list(range(shards)), "statistics": statistics, "concurrency": concurrency}


def replan(**rejected: str) -> dict:
    """CommitRound's answer when a shard rejected a client's update mid-stream."""
    return {"replan": True, "rejected": rejected}


def check_context(ctx: dict, job_input: dict, state: str) -> None:
    """The task inputs carry the whole context object ($$) as `context`."""
    assert ctx["Execution"]["Id"].startswith("arn:aws:states:")
    assert ctx["Execution"]["Input"] == job_input
    assert ctx["State"]["Name"] == state
    assert ctx["State"]["EnteredTime"]


def check_start_round_input(task_input: dict, job_input: dict, rnd: int) -> dict:
    """StartRound's task input is the lambda:invoke Parameters object."""
    assert set(task_input) == {"FunctionName", "Payload"}, task_input
    assert task_input["FunctionName"].startswith("arn:aws:lambda:")
    payload = task_input["Payload"]
    assert set(payload) == {"action", "job_id", "round", "round_timeout_seconds", "context"}, payload
    assert payload["action"] == "start_round"
    assert payload["job_id"] == job_input["job_id"]
    assert payload["round"] == rnd
    assert payload["round_timeout_seconds"] == job_input["round_timeout_seconds"]
    check_context(payload["context"], job_input, "StartRound")
    # Activities have no context.Task.Token (a .waitForTaskToken Lambda task
    # does): the local worker takes the token from GetActivityTask instead.
    assert "Token" not in payload["context"].get("Task", {})
    return payload


# action -> (the task state, the fields besides action, job_id, round and context)
TASK_FIELDS = {
    "plan_round": ("PlanRound", {"closed_by"}),
    "shard_statistics": ("ShardStatisticsTask", {"attempt", "shard"}),
    "decide_round": ("DecideRound", {"attempt"}),
    "aggregate_shard": ("AggregateShardTask", {"attempt", "shard"}),
    "commit_round": ("CommitRound", {"attempt", "closed_by"}),
    "report_failure": ("ReportFailure", {"error"}),
}


def check_task_input(task_input: dict, action: str, job_input: dict, rnd: int, **fields) -> None:
    """A round task's input (the activity input is the Parameters object, as
    is): exactly action, job_id, round, context and the action's fields."""
    state, extra = TASK_FIELDS[action]
    assert set(fields) <= extra, fields
    assert set(task_input) == {"action", "job_id", "round", "context"} | extra, task_input
    assert task_input["action"] == action
    assert task_input["job_id"] == job_input["job_id"]
    assert task_input["round"] == rnd
    for key, value in fields.items():
        assert task_input[key] == value, (key, task_input)
    if "closed_by" in extra:
        assert task_input["closed_by"] in ("stream", "deadline")
    check_context(task_input["context"], job_input, state)


def report_failure(worker, job_input: dict, rnd: int, error: str, cause: str | None = None,
                   fail: tuple[str, str] | None = None) -> dict:
    """The report_failure task a failing execution schedules before Failed:
    its input carries the caught error ({Error, Cause}; `cause` None: not
    checked); answered as report_failure answers (its answer is dropped),
    or failed with `fail` = (error, cause). Returns the input."""
    token, task_input = worker.poll("report_failure")
    check_task_input(task_input, "report_failure", job_input, rnd)
    assert set(task_input["error"]) == {"Error", "Cause"}, task_input["error"]
    assert task_input["error"]["Error"] == error
    if cause is not None:
        assert task_input["error"]["Cause"] == cause
    if fail:
        worker.fail(token, *fail)
    else:
        worker.succeed(token, {"job_id": job_input["job_id"], "round": rnd, "notified": True})
    return task_input


def run_shards(worker, action: str, job_input: dict, rnd: int, the_plan: dict) -> list[dict]:
    """Answers one Map's shard tasks: takes as many at once as the plan's
    concurrency allows, holds them a moment, answers them; returns the inputs.
    Every shard of the plan must come exactly once, with the plan's attempt."""
    todo = len(the_plan["shards"])
    inputs = []
    while todo:
        batch = [worker.poll(action) for _ in range(min(the_plan["concurrency"], todo))]
        todo -= len(batch)
        if todo:
            time.sleep(HOLD)
        for token, task_input in batch:
            check_task_input(task_input, action, job_input, rnd, attempt=the_plan["attempt"])
            inputs.append(task_input)
            # Small and ignored by the workflow (the real outputs go to S3).
            worker.succeed(token, {"shard": task_input["shard"], "bytes_read": 1024})
    shards = [i["shard"] for i in inputs]
    assert sorted(shards) == the_plan["shards"], f"{action}: shards {shards}, plan {the_plan['shards']}"
    return inputs


def run_attempt(worker, job_input: dict, rnd: int, the_plan: dict, closed_by: str, commit: dict) -> None:
    """Everything after PlanRound's answer `the_plan`: the Maps, DecideRound,
    and CommitRound, answered with `commit`."""
    attempt = the_plan["attempt"]
    if the_plan["statistics"]:
        run_shards(worker, "shard_statistics", job_input, rnd, the_plan)
        token, decide = worker.poll("decide_round")
        check_task_input(decide, "decide_round", job_input, rnd, attempt=attempt)
        # Never lands in the state (ResultPath null): checked by the callers.
        worker.succeed(token, {"decided": True, "noise_key": "not-in-the-state"})
    run_shards(worker, "aggregate_shard", job_input, rnd, the_plan)
    token, task_input = worker.poll("commit_round")
    check_task_input(task_input, "commit_round", job_input, rnd, attempt=attempt, closed_by=closed_by)
    worker.succeed(token, commit)


def plan_and_commit(worker, job_input: dict, rnd: int, closed_by: str, the_plan: dict, commit: dict,
                    poll_timeout: float = 30.0) -> None:
    """PlanRound (after the hand-over or the deadline) answered with `the_plan`,
    then the attempt; `the_plan` may also be {"closed": result}."""
    token, task_input = worker.poll("plan_round", timeout=poll_timeout)
    check_task_input(task_input, "plan_round", job_input, rnd, closed_by=closed_by)
    worker.succeed(token, the_plan)
    if "closed" not in the_plan:
        run_attempt(worker, job_input, rnd, the_plan, closed_by, commit)


def attempt_states(the_plan: dict, replanned: bool = False) -> list[str]:
    """The states one PlanRound answer leads through, up to ShouldContinue
    (or, replanned, back to PlanRound)."""
    out = ["PlanRound", "Planned"]
    if "closed" in the_plan:
        return out + ["AlreadyClosed"]
    shards = len(the_plan["shards"])
    if the_plan["statistics"]:
        out += ["ShardStatistics"] + ["ShardStatisticsTask"] * shards + ["DecideRound"]
    return out + ["AggregateShards"] + ["AggregateShardTask"] * shards + ["CommitRound", "Committed"]


def round_states(closed_by: str, *plans: dict) -> list[str]:
    """The states of one round up to the Choice; more than one plan: replanned."""
    plans = plans or (plan("a1"),)
    out = ["StartRound"] + (["DeadlinePassed"] if closed_by == "deadline" else [])
    for the_plan in plans:
        out += attempt_states(the_plan)
    return out + ["ShouldContinue"]


def history(sfn, arn: str) -> list[dict]:
    return [ev for page in sfn.get_paginator("get_execution_history").paginate(executionArn=arn)
            for ev in page["events"]]


def most_outstanding(events: list[dict], map_state: str, task_state: str) -> list[int]:
    """For each entry of `map_state`: the most iterations of `task_state`
    running at once (entered, not yet exited)."""
    out = []
    running = 0
    for ev in events:
        entered = ev.get("stateEnteredEventDetails", {}).get("name")
        exited = ev.get("stateExitedEventDetails", {}).get("name")
        if entered == map_state:
            out.append(0)
        elif entered == task_state:
            running += 1
            out[-1] = max(out[-1], running)
        elif exited == task_state:
            running -= 1
    return out


def state_inputs(events: list[dict], state: str) -> list[dict]:
    return [json.loads(ev["stateEnteredEventDetails"]["input"]) for ev in events
            if ev.get("stateEnteredEventDetails", {}).get("name") == state]


def state_outputs(events: list[dict], state: str) -> list[dict]:
    return [json.loads(ev["stateExitedEventDetails"]["output"]) for ev in events
            if ev.get("stateExitedEventDetails", {}).get("name") == state]


def test_three_rounds_then_finalize(sfn, start_job):
    """Every round: StartRound is answered with the hand-over, PlanRound
    plans, the Maps run every shard, CommitRound's result decides.

    Round 1 takes the statistics path (3 shards, 2 at a time), round 2 goes
    straight to AggregateShards (3 shards, one at a time), round 3's plan
    finds the round closed already (a retry, or a racing attempt won): its
    stored result goes to ShouldContinue without any Map.
    """
    arn, worker, job_input = start_job()
    job_id = job_input["job_id"]
    plans = {
        1: plan("r1-a1", shards=3, statistics=True, concurrency=2),
        2: plan("r2-a1", shards=3, statistics=False, concurrency=1),
        3: {"closed": round_result(job_id, 3, False, closed_by="stream")},
    }
    for rnd, cont in ((1, True), (2, True), (3, False)):
        token, task_input = worker.poll("start_round")
        check_start_round_input(task_input, job_input, rnd)
        worker.succeed(token, handover(job_id, rnd))
        result = round_result(job_id, rnd, cont, closed_by="stream")
        plan_and_commit(worker, job_input, rnd, "stream", plans[rnd], result)

    token, fin = worker.poll("finalize")
    assert fin["action"] == "finalize"
    assert fin["job_id"] == job_id
    assert fin["round"] == 3
    # The result is the stored one the plan returned, not the hand-over.
    assert fin["result"] == round_result(job_id, 3, False, closed_by="stream")
    assert set(fin) == {"action", "job_id", "round", "result", "context"}, fin
    check_context(fin["context"], job_input, "Finalize")
    final_key = fin["result"]["global_model_key"]
    worker.succeed(token, {"job_id": job_id, "artifact_id": "a-1", "final_model_key": final_key})

    desc = wait_done(sfn, arn)
    assert desc["status"] == "SUCCEEDED", desc
    out = json.loads(desc["output"])
    assert out["job_id"] == job_id and out["round"] == 3
    assert out["handover"] == handover(job_id, 3)
    assert out["plan"] == plans[3]
    assert out["result"] == round_result(job_id, 3, False, closed_by="stream")
    assert out["final"]["artifact_id"] == "a-1"
    assert "error" not in out

    seen = [act for act, _ in worker.seen]
    assert seen == (
        ["start_round", "plan_round"] + ["shard_statistics"] * 3 + ["decide_round"] + ["aggregate_shard"] * 3
        + ["commit_round"]
        + ["start_round", "plan_round"] + ["aggregate_shard"] * 3 + ["commit_round"]
        + ["start_round", "plan_round", "finalize"]
    )
    assert [inp["Payload"]["round"] for act, inp in worker.seen if act == "start_round"] == [1, 2, 3]
    assert [inp["round"] for act, inp in worker.seen if act == "plan_round"] == [1, 2, 3]
    assert [inp["round"] for act, inp in worker.seen if act == "commit_round"] == [1, 2]
    loop = ["NextRound", "AdvanceRound"]
    assert entered_states(sfn, arn) == (
        ["Init"] + round_states("stream", plans[1]) + loop + round_states("stream", plans[2]) + loop
        + round_states("stream", plans[3]) + ["Finalize", "Succeeded"]
    )

    events = history(sfn, arn)
    # The plan's concurrency: 2 at a time in round 1 (never more, and the
    # Map did run two at once), 1 at a time in round 2.
    assert most_outstanding(events, "ShardStatistics", "ShardStatisticsTask") == [2]
    assert most_outstanding(events, "AggregateShards", "AggregateShardTask") == [2, 1]
    # Nothing of the shard tasks or the decision lands in the state: each
    # Map and DecideRound hand on exactly what they got.
    for state in ("ShardStatistics", "DecideRound", "AggregateShards"):
        assert state_outputs(events, state) == state_inputs(events, state), state
    assert "not-in-the-state" not in desc["output"]
    # AlreadyClosed: result = plan.closed, the rest of the state kept.
    (closed_in,) = state_inputs(events, "AlreadyClosed")
    (should_in,) = [i for i in state_inputs(events, "ShouldContinue") if i["round"] == 3]
    assert should_in == {**closed_in, "result": plans[3]["closed"]}


def test_timeout_closes_round(sfn, start_job):
    """StartRound's deadline: DeadlinePassed, then PlanRound and CommitRound with closed_by=deadline."""
    arn, worker, job_input = start_job(round_timeout_seconds=ROUND_TIMEOUT, min_clients=2)
    job_id = job_input["job_id"]
    _, task_input = worker.poll("start_round")  # taken, never answered
    check_start_round_input(task_input, job_input, 1)

    # plan_round being scheduled proves StartRound has timed out.
    token, task_input = worker.poll("plan_round", timeout=ROUND_TIMEOUT + 30)
    check_task_input(task_input, "plan_round", job_input, 1, closed_by="deadline")
    assert task_input["context"]["Execution"]["Id"] == arn
    the_plan = plan("a1")
    worker.succeed(token, the_plan)
    run_attempt(worker, job_input, 1, the_plan, "deadline", round_result(job_id, 1, False, closed_by="deadline"))

    token, fin = worker.poll("finalize")
    assert fin["round"] == 1 and fin["result"]["closed_by"] == "deadline"
    worker.succeed(token, {"job_id": job_id})

    desc = wait_done(sfn, arn)
    assert desc["status"] == "SUCCEEDED", desc
    out = json.loads(desc["output"])
    # The timeout itself leaves no trace in the state (Catch ResultPath null).
    assert out["handover"] == DEADLINE and "error" not in out
    assert entered_states(sfn, arn) == ["Init"] + round_states("deadline", the_plan) + ["Finalize", "Succeeded"]


def test_timeout_then_next_round(sfn, start_job):
    """A timed-out round that CommitRound closes with continue=true loops on;
    round 2's hand-over replaces round 1's DeadlinePassed marker."""
    arn, worker, job_input = start_job(round_timeout_seconds=ROUND_TIMEOUT)
    job_id = job_input["job_id"]
    worker.poll("start_round")
    plan_and_commit(worker, job_input, 1, "deadline", plan("r1"), round_result(job_id, 1, True, closed_by="deadline"),
                    poll_timeout=ROUND_TIMEOUT + 30)
    token, task_input = worker.poll("start_round")
    check_start_round_input(task_input, job_input, 2)
    worker.succeed(token, handover(job_id, 2))
    plan_and_commit(worker, job_input, 2, "stream", plan("r2"), round_result(job_id, 2, False, closed_by="stream"))
    token, _ = worker.poll("finalize")
    worker.succeed(token, {})
    desc = wait_done(sfn, arn)
    assert desc["status"] == "SUCCEEDED", desc
    out = json.loads(desc["output"])
    assert out["round"] == 2 and out["handover"] == handover(job_id, 2)
    assert out["result"]["closed_by"] == "stream"
    assert entered_states(sfn, arn) == (
        ["Init"] + round_states("deadline", plan("r1")) + ["NextRound", "AdvanceRound"]
        + round_states("stream", plan("r2")) + ["Finalize", "Succeeded"]
    )


def test_stream_then_timed_out_round(sfn, start_job):
    """The other order: round 1 handed over, round 2 times out. Round 1's
    hand-over is still in the state when round 2 times out (ResultPath null);
    DeadlinePassed overwrites it, so PlanRound and CommitRound get deadline,
    not stream."""
    arn, worker, job_input = start_job(round_timeout_seconds=ROUND_TIMEOUT)
    job_id = job_input["job_id"]
    token, _ = worker.poll("start_round")
    worker.succeed(token, handover(job_id, 1))
    plan_and_commit(worker, job_input, 1, "stream", plan("r1"), round_result(job_id, 1, True, closed_by="stream"))
    _, task_input = worker.poll("start_round")  # round 2: never answered
    check_start_round_input(task_input, job_input, 2)
    plan_and_commit(worker, job_input, 2, "deadline", plan("r2"), round_result(job_id, 2, False, closed_by="deadline"),
                    poll_timeout=ROUND_TIMEOUT + 30)
    token, _ = worker.poll("finalize")
    worker.succeed(token, {})
    desc = wait_done(sfn, arn)
    assert desc["status"] == "SUCCEEDED", desc
    assert json.loads(desc["output"])["handover"] == DEADLINE


def test_replan_runs_a_new_attempt(sfn, start_job):
    """CommitRound answers replan (a shard found a client's update bad):
    PlanRound runs again, on the same hand-over, and its new attempt (here
    with the statistics pass and fewer shards) goes through to a result."""
    arn, worker, job_input = start_job()
    job_id = job_input["job_id"]
    token, _ = worker.poll("start_round")
    worker.succeed(token, handover(job_id, 1))
    first, second = plan("a1", shards=2, concurrency=2), plan("a2", shards=1, statistics=True)
    bad = replan(**{"site-b": "non-finite value in tensor fc1.weight"})
    plan_and_commit(worker, job_input, 1, "stream", first, bad)
    # The second plan: same round, same closed_by; the new attempt's id
    # reaches every task after it.
    result = round_result(job_id, 1, False, closed_by="stream", rejected={"site-b": "non-finite value"})
    plan_and_commit(worker, job_input, 1, "stream", second, result)
    token, fin = worker.poll("finalize")
    assert fin["result"] == result
    worker.succeed(token, {})

    desc = wait_done(sfn, arn)
    assert desc["status"] == "SUCCEEDED", desc
    out = json.loads(desc["output"])
    assert out["plan"] == second and out["result"] == result
    assert [act for act, _ in worker.seen] == (
        ["start_round", "plan_round"] + ["aggregate_shard"] * 2 + ["commit_round"]
        + ["plan_round", "shard_statistics", "decide_round", "aggregate_shard", "commit_round", "finalize"]
    )
    assert [inp["attempt"] for act, inp in worker.seen if "attempt" in inp] == ["a1"] * 3 + ["a2"] * 4
    states = entered_states(sfn, arn)
    assert states == ["Init"] + round_states("stream", first, second) + ["Finalize", "Succeeded"]
    # The replan answer is in $.result when PlanRound runs again (the plan
    # task does not read it) and is replaced by the round's result after.
    events = history(sfn, arn)
    plan_inputs = state_inputs(events, "PlanRound")
    assert len(plan_inputs) == 2
    assert plan_inputs[1]["result"] == bad and plan_inputs[1]["plan"] == first
    assert plan_inputs[1]["handover"] == plan_inputs[0]["handover"] == handover(job_id, 1)


def test_quorum_not_met_fails_execution(sfn, start_job):
    arn, worker, job_input = start_job(round_timeout_seconds=ROUND_TIMEOUT, min_clients=3)
    worker.poll("start_round")
    token, task_input = worker.poll("plan_round", timeout=ROUND_TIMEOUT + 30)
    check_task_input(task_input, "plan_round", job_input, 1, closed_by="deadline")
    cause = "quorum not met: 1 of min_clients 3 updates received"
    worker.fail(token, "QuorumNotMet", cause)
    # The clients are told before the execution fails.
    report_failure(worker, job_input, 1, "QuorumNotMet", cause)

    desc = wait_done(sfn, arn)
    assert desc["status"] == "FAILED", desc
    assert desc.get("error") == "QuorumNotMet"
    assert cause in desc.get("cause", "")
    assert entered_states(sfn, arn) == ["Init", "StartRound", "DeadlinePassed", "PlanRound", "ReportFailure", "Failed"]
    # Not retried.
    assert [act for act, _ in worker.seen] == ["start_round", "plan_round", "report_failure"]


@pytest.mark.parametrize("action, error, cause", [
    ("shard_statistics", "InvalidTaskInput", "shard 1 is not in attempt a1's plan"),
    ("aggregate_shard", "AggregationFailed", "aggregation failed: no usable update"),
])
def test_shard_failure_fails_execution(sfn, start_job, action, error, cause):
    """A shard task failing with an error that is not retried fails its Map,
    and the execution, with that Error and Cause; nothing after the Map runs."""
    arn, worker, job_input = start_job()
    job_id = job_input["job_id"]
    token, _ = worker.poll("start_round")
    worker.succeed(token, handover(job_id, 1))
    token, _ = worker.poll("plan_round")
    the_plan = plan("a1", shards=2, statistics=action == "shard_statistics", concurrency=2)
    worker.succeed(token, the_plan)
    ok_token, _ = worker.poll(action)
    bad_token, bad = worker.poll(action)
    check_task_input(bad, action, job_input, 1, attempt="a1")
    worker.fail(bad_token, error, cause)
    # The Map's Catch: the shard's Error and Cause, unchanged, to ReportFailure.
    reported = report_failure(worker, job_input, 1, error, cause)

    desc = wait_done(sfn, arn)
    assert desc["status"] == "FAILED", desc
    assert desc.get("error") == error
    assert desc.get("cause") == cause
    map_state, task_state = {"shard_statistics": ("ShardStatistics", "ShardStatisticsTask"),
                             "aggregate_shard": ("AggregateShards", "AggregateShardTask")}[action]
    assert entered_states(sfn, arn) == (
        ["Init", "StartRound", "PlanRound", "Planned", map_state, task_state, task_state, "ReportFailure", "Failed"]
    )
    events = history(sfn, arn)
    (failed_in,) = state_inputs(events, "Failed")
    assert failed_in["error"] == {"Error": error, "Cause": cause}
    # ReportFailure's answer is dropped (ResultPath null).
    (report_in,) = state_inputs(events, "ReportFailure")
    assert failed_in == report_in and reported["error"] == report_in["error"]
    # Not retried; the other shard's answer, after the Map failed, changes
    # nothing (AWS rejects it; LocalStack 4.8.1 may accept and drop it).
    assert [act for act, _ in worker.seen].count(action) == 2
    assert [act for act, _ in worker.seen].count("report_failure") == 1
    try:
        worker.succeed(ok_token, {"shard": 0})
    except ClientError as err:
        assert err.response["Error"]["Code"] in ("TaskTimedOut", "InvalidToken"), err.response
    assert sfn.describe_execution(executionArn=arn)["status"] == "FAILED"


@pytest.mark.parametrize("action, closed_by", [
    ("plan_round", "deadline"),
    ("shard_statistics", "stream"),
])
def test_transient_failure_is_retried(sfn, start_job, action, closed_by):
    """A task failing with Transient (the system's failure) gets a new task
    with the same input instead of failing the execution (statemachine/README.md,
    "Retries and timeouts"): PlanRound after the deadline, one shard's
    iteration of a Map (the other shards are not run again). Every task has
    the same retriers (test_asl.py); test_aws_variant.py retries CommitRound
    too. test_quorum_not_met_fails_execution shows a permanent error is not
    retried."""
    arn, worker, job_input = start_job(round_timeout_seconds=ROUND_TIMEOUT)
    job_id = job_input["job_id"]
    token, _ = worker.poll("start_round")
    if closed_by == "stream":
        worker.succeed(token, handover(job_id, 1))
    the_plan = plan("a1", shards=2, statistics=True, concurrency=2)
    result = round_result(job_id, 1, False, closed_by=closed_by)

    def fail_once(expected: str) -> tuple[str, dict]:
        """Fails the next `expected` task with Transient; returns the retry's token and input."""
        token, first = worker.poll(expected, timeout=ROUND_TIMEOUT + 30)
        worker.fail(token, "Transient", "DynamoDB UpdateItem fedstep-rounds: ThrottlingException (HTTP 400)")
        token, again = worker.poll(expected)
        # The same task input again, one retry on: a retry does not re-enter the state.
        assert {k: v for k, v in again.items() if k != "context"} == {k: v for k, v in first.items() if k != "context"}
        assert again["context"]["State"]["RetryCount"] == first["context"]["State"]["RetryCount"] + 1
        assert again["context"]["State"]["EnteredTime"] == first["context"]["State"]["EnteredTime"]
        return token, again

    if action == "plan_round":
        token, task_input = fail_once("plan_round")
        check_task_input(task_input, "plan_round", job_input, 1, closed_by=closed_by)
        worker.succeed(token, the_plan)
        run_attempt(worker, job_input, 1, the_plan, closed_by, result)
    else:
        token, task_input = worker.poll("plan_round")
        worker.succeed(token, the_plan)
        other_token, other = worker.poll("shard_statistics")
        token, retried = fail_once("shard_statistics")
        assert {other["shard"], retried["shard"]} == {0, 1}
        for t, i in ((other_token, other), (token, retried)):
            check_task_input(i, "shard_statistics", job_input, 1, attempt="a1")
            worker.succeed(t, {"shard": i["shard"]})
        token, _ = worker.poll("decide_round")
        worker.succeed(token, {})
        run_shards(worker, "aggregate_shard", job_input, 1, the_plan)
        token, _ = worker.poll("commit_round")
        worker.succeed(token, result)
    token, _ = worker.poll("finalize")
    worker.succeed(token, {})
    desc = wait_done(sfn, arn)
    assert desc["status"] == "SUCCEEDED", desc
    seen = [act for act, _ in worker.seen]
    # One retry: of the plan, or of one shard (the other shard ran once).
    assert seen.count(action) == {"plan_round": 2, "shard_statistics": 3}[action]
    assert seen.count("aggregate_shard") == 2
    assert entered_states(sfn, arn) == ["Init"] + round_states(closed_by, the_plan) + ["Finalize", "Succeeded"]


def test_callback_after_timeout_is_rejected(sfn, start_job):
    """A StartRound hand-over that arrives after the deadline never counts.

    AWS rejects it with TaskTimedOut (or InvalidToken) as soon as the task has
    timed out. LocalStack 4.8.1 never raises TaskTimedOut: while the execution
    still runs it accepts the late callback and drops it (the task is gone),
    and rejects it with InvalidToken once the execution has ended. Asserted
    here: the late callback has no effect on the execution on either (PlanRound
    runs once, with closed_by=deadline), and it is rejected with
    TaskTimedOut/InvalidToken at the latest once the execution is over.
    """
    arn, worker, job_input = start_job(round_timeout_seconds=ROUND_TIMEOUT)
    job_id = job_input["job_id"]
    late_token, _ = worker.poll("start_round")
    # plan_round being scheduled proves StartRound has timed out.
    token, task_input = worker.poll("plan_round", timeout=ROUND_TIMEOUT + 30)
    check_task_input(task_input, "plan_round", job_input, 1, closed_by="deadline")
    late = handover(job_id, 1)
    try:
        worker.succeed(late_token, late)
    except ClientError as err:  # AWS behaviour
        assert err.response["Error"]["Code"] in ("TaskTimedOut", "InvalidToken"), err.response
    worker.succeed(token, plan("a1"))
    run_attempt(worker, job_input, 1, plan("a1"), "deadline", round_result(job_id, 1, False, closed_by="deadline"))
    token, fin = worker.poll("finalize")
    assert fin["result"]["closed_by"] == "deadline"
    worker.succeed(token, {})
    desc = wait_done(sfn, arn)
    assert desc["status"] == "SUCCEEDED", desc
    out = json.loads(desc["output"])
    assert out["handover"] == DEADLINE
    assert out["result"]["continue"] is False and out["result"]["closed_by"] == "deadline"
    states = entered_states(sfn, arn)
    assert states.count("StartRound") == 1 and states.count("PlanRound") == 1
    assert [act for act, _ in worker.seen].count("plan_round") == 1

    with pytest.raises(ClientError) as err:
        worker.succeed(late_token, late)
    assert err.value.response["Error"]["Code"] in ("TaskTimedOut", "InvalidToken"), err.value.response


def test_second_hand_over_is_ignored(sfn, start_job):
    """A token takes one answer: a second hand-over (a racing stream delivery)
    or a failure after it changes nothing, and PlanRound runs once.

    AWS rejects the second answer (TaskTimedOut / InvalidToken: the engine
    takes either as "the workflow moved on"). LocalStack 4.8.1 accepts both
    silently while the execution runs, and rejects with InvalidToken after.
    """
    arn, worker, job_input = start_job()
    job_id = job_input["job_id"]
    token, _ = worker.poll("start_round")
    worker.succeed(token, handover(job_id, 1, usable=2))
    for again in (lambda: worker.succeed(token, handover(job_id, 1, usable=3)),
                  lambda: worker.fail(token, "NoUsableUpdate", "late failure")):
        try:
            again()
        except ClientError as err:  # AWS behaviour
            assert err.response["Error"]["Code"] in ("TaskTimedOut", "InvalidToken"), err.response
    # (The plan finds the round closed: what follows PlanRound is not what
    # this test is about.)
    closed = {"closed": round_result(job_id, 1, False, closed_by="stream")}
    plan_and_commit(worker, job_input, 1, "stream", closed, {})
    fin_token, _ = worker.poll("finalize")
    worker.succeed(fin_token, {})
    desc = wait_done(sfn, arn)
    assert desc["status"] == "SUCCEEDED", desc
    # The first answer is the one kept.
    assert json.loads(desc["output"])["handover"] == handover(job_id, 1, usable=2)
    assert [act for act, _ in worker.seen] == ["start_round", "plan_round", "finalize"]
    assert entered_states(sfn, arn) == ["Init"] + round_states("stream", closed) + ["Finalize", "Succeeded"]
    with pytest.raises(ClientError) as err:
        worker.succeed(token, handover(job_id, 1))
    assert err.value.response["Error"]["Code"] in ("TaskTimedOut", "InvalidToken"), err.value.response


@pytest.mark.parametrize("error, cause", [
    ("InvalidJob", "job config rejected: min_clients > clients"),
    # What a retried StartRound sends when it finds its round FAILED.
    ("NoUsableUpdate", "round 1 failed: no usable update"),
    ("QuorumNotMet", "quorum not met: 1 of min_clients 3 updates received"),
])
def test_start_round_task_failure_fails_execution(sfn, start_job, error, cause):
    arn, worker, job_input = start_job()
    token, _ = worker.poll("start_round")
    worker.fail(token, error, cause)
    report_failure(worker, job_input, 1, error, cause)
    desc = wait_done(sfn, arn)
    assert desc["status"] == "FAILED"
    assert desc.get("error") == error
    assert cause in desc.get("cause", "")
    # Straight to ReportFailure and Failed: no PlanRound.
    assert entered_states(sfn, arn) == ["Init", "StartRound", "ReportFailure", "Failed"]
    assert [act for act, _ in worker.seen] == ["start_round", "report_failure"]


def test_failing_report_failure_keeps_the_original_error(sfn, start_job):
    """report_failure failing (SendTaskFailure with a permanent error, not
    retried): ReportFailure's Catch keeps its error apart ($.report_error)
    and goes to Failed, which reports the original error and cause."""
    arn, worker, job_input = start_job()
    token, _ = worker.poll("start_round")
    cause = "job config rejected: min_clients > clients"
    worker.fail(token, "InvalidJob", cause)
    report_failure(worker, job_input, 1, "InvalidJob", cause, fail=("NotFound", "job not found"))
    desc = wait_done(sfn, arn)
    assert desc["status"] == "FAILED", desc
    assert desc.get("error") == "InvalidJob"
    assert desc.get("cause") == cause
    assert entered_states(sfn, arn) == ["Init", "StartRound", "ReportFailure", "Failed"]
    assert [act for act, _ in worker.seen] == ["start_round", "report_failure"]
    events = history(sfn, arn)
    (report_in,) = state_inputs(events, "ReportFailure")
    (failed_in,) = state_inputs(events, "Failed")
    assert failed_in == {**report_in, "report_error": {"Error": "NotFound", "Cause": "job not found"}}


@pytest.mark.parametrize("bad, closed_by, via", [
    ({}, "stream", "commit"),
    ({"continue": "yes"}, "deadline", "closed"),
])
def test_result_without_boolean_continue_fails(sfn, start_job, bad, closed_by, via):
    """The round's result decides, whether CommitRound returned it or the
    plan found it stored (closed); one without a boolean continue is a
    contract violation."""
    arn, worker, job_input = start_job(round_timeout_seconds=ROUND_TIMEOUT)
    job_id = job_input["job_id"]
    token, _ = worker.poll("start_round")
    if closed_by == "stream":
        worker.succeed(token, handover(job_id, 1))
    bad_result = {"job_id": job_id, "round": 1, **bad}
    the_plan = plan("a1") if via == "commit" else {"closed": bad_result}
    plan_and_commit(worker, job_input, 1, closed_by, the_plan, bad_result, poll_timeout=ROUND_TIMEOUT + 30)
    report_failure(worker, job_input, 1, "FedstepContractViolation", "round result has no boolean field 'continue'")
    desc = wait_done(sfn, arn)
    assert desc["status"] == "FAILED"
    assert desc.get("error") == "FedstepContractViolation"
    assert desc.get("cause") == "round result has no boolean field 'continue'"
    assert entered_states(sfn, arn) == (
        ["Init"] + round_states(closed_by, the_plan) + ["BadResult", "ReportFailure", "Failed"]
    )


def test_hand_over_continue_is_not_read(sfn, start_job):
    """Only the round's result is read by ShouldContinue: a StartRound
    answer that looks like a round result (the old protocol) still goes to
    PlanRound, and the round's result (here the one a closed plan found)
    with continue=false ends the job."""
    arn, worker, job_input = start_job()
    job_id = job_input["job_id"]
    token, _ = worker.poll("start_round")
    worker.succeed(token, {**round_result(job_id, 1, True), "closed_by": "stream"})
    closed = {"closed": round_result(job_id, 1, False, closed_by="stream")}
    plan_and_commit(worker, job_input, 1, "stream", closed, {})
    token, _ = worker.poll("finalize")
    worker.succeed(token, {})
    desc = wait_done(sfn, arn)
    assert desc["status"] == "SUCCEEDED", desc
    assert entered_states(sfn, arn) == ["Init"] + round_states("stream", closed) + ["Finalize", "Succeeded"]


def test_hand_over_without_closed_by_fails_with_runtime_error(sfn, start_job):
    """PlanRound's "closed_by.$": "$.handover.closed_by" is a path that must
    exist: a hand-over without closed_by fails the execution with
    States.Runtime before any plan_round task is scheduled (no retrier
    names States.Runtime).

    On AWS a States.Runtime error is not caught by States.ALL: the execution
    fails at PlanRound with the JSONPath message as its cause. LocalStack
    4.8.1 records it as an ActivityFailed of PlanRound, lets PlanRound's
    Catch take it to Failed, whose ErrorPath then yields a States.* name,
    which it refuses: the execution fails with States.Runtime too, but with
    the cause "ValueError(Custom Error Names MUST NOT begin with the prefix
    'States.', ...)". (On LocalStack the Catch runs ReportFailure first,
    which gets the States.Runtime error with the JSONPath message.)
    Asserted: the error, no plan_round task, no Finalize, and the JSONPath
    message in the history.
    """
    arn, worker, job_input = start_job()
    job_id = job_input["job_id"]
    token, _ = worker.poll("start_round")
    worker.succeed(token, {"job_id": job_id, "round": 1, "usable": 3, "expected": 3})
    # LocalStack 4.8.1 schedules report_failure (PlanRound's Catch); AWS ends the execution.
    deadline = time.monotonic() + 30
    while not worker.scheduled("report_failure") and sfn.describe_execution(executionArn=arn)["status"] == "RUNNING":
        assert time.monotonic() < deadline, "neither report_failure nor the end of the execution"
        time.sleep(0.2)
    if worker.scheduled("report_failure"):
        reported = report_failure(worker, job_input, 1, "States.Runtime")
        assert "$.handover.closed_by" in reported["error"]["Cause"]
    desc = wait_done(sfn, arn)
    assert desc["status"] == "FAILED", desc
    assert desc.get("error") == "States.Runtime"
    states = entered_states(sfn, arn)
    assert states[:3] == ["Init", "StartRound", "PlanRound"], states
    # AWS: [], LocalStack 4.8.1: ["ReportFailure", "Failed"]
    assert states[3:] in ([], ["ReportFailure", "Failed"]), states
    events = history(sfn, arn)
    assert not [ev for ev in events if ev["type"] == "ActivityScheduled" and "plan_round" in
                ev["activityScheduledEventDetails"]["resource"]]
    assert "$.handover.closed_by" in json.dumps(events, default=str)
    assert [act for act, _ in worker.seen] == ["start_round"] + (["report_failure"] if states[3:] else [])
