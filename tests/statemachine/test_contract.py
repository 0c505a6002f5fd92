"""Contract tests of statemachine/federated_training.asl.json on LocalStack.

The test is the activity worker (GetActivityTask / SendTaskSuccess /
SendTaskFailure), i.e. it plays the part fedstep-lambda's local mode plays,
and checks the task inputs and the execution's course against the contract
in statemachine/README.md.
"""

from __future__ import annotations

import json

import pytest
from botocore.exceptions import ClientError

from conftest import entered_states, wait_done

ROUND_TIMEOUT = 2  # seconds: StartRound's TimeoutSecondsPath in the timeout tests


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


def check_close_round_input(close: dict, job_input: dict, rnd: int, closed_by: str) -> None:
    """CloseRound's task input: closed_by from the hand-over or from DeadlinePassed."""
    assert set(close) == {"action", "job_id", "round", "closed_by", "context"}, close
    assert close["action"] == "close_round"
    assert close["job_id"] == job_input["job_id"]
    assert close["round"] == rnd
    assert close["closed_by"] == closed_by
    check_context(close["context"], job_input, "CloseRound")


def round_states(closed_by: str) -> list[str]:
    """The states of one round up to the Choice."""
    return ["StartRound"] + (["DeadlinePassed"] if closed_by == "deadline" else []) + ["CloseRound", "ShouldContinue"]


def test_three_rounds_then_finalize(sfn, start_job):
    """Every round: StartRound is answered with the hand-over, then CloseRound
    aggregates and its result decides."""
    arn, worker, job_input = start_job()
    job_id = job_input["job_id"]
    for rnd, cont in ((1, True), (2, True), (3, False)):
        token, task_input = worker.poll("start_round")
        check_start_round_input(task_input, job_input, rnd)
        worker.succeed(token, handover(job_id, rnd))
        token, close = worker.poll("close_round")
        check_close_round_input(close, job_input, rnd, "stream")
        worker.succeed(token, round_result(job_id, rnd, cont, closed_by="stream"))

    token, fin = worker.poll("finalize")
    assert fin["action"] == "finalize"
    assert fin["job_id"] == job_id
    assert fin["round"] == 3
    # The result is CloseRound's, not the hand-over.
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
    assert out["result"] == round_result(job_id, 3, False, closed_by="stream")
    assert out["final"]["artifact_id"] == "a-1"
    assert "error" not in out

    seen = [act for act, _ in worker.seen]
    assert seen == ["start_round", "close_round"] * 3 + ["finalize"]
    assert [inp["Payload"]["round"] for act, inp in worker.seen if act == "start_round"] == [1, 2, 3]
    assert [inp["round"] for act, inp in worker.seen if act == "close_round"] == [1, 2, 3]
    loop = round_states("stream") + ["NextRound", "AdvanceRound"]
    assert entered_states(sfn, arn) == ["Init"] + loop * 2 + round_states("stream") + ["Finalize", "Succeeded"]


def test_timeout_closes_round(sfn, start_job):
    """StartRound's deadline: DeadlinePassed, then CloseRound with closed_by=deadline."""
    arn, worker, job_input = start_job(round_timeout_seconds=ROUND_TIMEOUT, min_clients=2)
    job_id = job_input["job_id"]
    _, task_input = worker.poll("start_round")  # taken, never answered
    check_start_round_input(task_input, job_input, 1)

    token, close = worker.poll("close_round", timeout=ROUND_TIMEOUT + 30)
    check_close_round_input(close, job_input, 1, "deadline")
    assert close["context"]["Execution"]["Id"] == arn
    worker.succeed(token, round_result(job_id, 1, False, closed_by="deadline"))

    token, fin = worker.poll("finalize")
    assert fin["round"] == 1 and fin["result"]["closed_by"] == "deadline"
    worker.succeed(token, {"job_id": job_id})

    desc = wait_done(sfn, arn)
    assert desc["status"] == "SUCCEEDED", desc
    out = json.loads(desc["output"])
    # The timeout itself leaves no trace in the state (Catch ResultPath null).
    assert out["handover"] == DEADLINE and "error" not in out
    assert entered_states(sfn, arn) == ["Init"] + round_states("deadline") + ["Finalize", "Succeeded"]


def test_timeout_then_next_round(sfn, start_job):
    """A timed-out round that CloseRound closes with continue=true loops on;
    round 2's hand-over replaces round 1's DeadlinePassed marker."""
    arn, worker, job_input = start_job(round_timeout_seconds=ROUND_TIMEOUT)
    job_id = job_input["job_id"]
    worker.poll("start_round")
    token, close = worker.poll("close_round", timeout=ROUND_TIMEOUT + 30)
    check_close_round_input(close, job_input, 1, "deadline")
    worker.succeed(token, round_result(job_id, 1, True, closed_by="deadline"))
    token, task_input = worker.poll("start_round")
    check_start_round_input(task_input, job_input, 2)
    worker.succeed(token, handover(job_id, 2))
    token, close = worker.poll("close_round")
    check_close_round_input(close, job_input, 2, "stream")
    worker.succeed(token, round_result(job_id, 2, False, closed_by="stream"))
    token, _ = worker.poll("finalize")
    worker.succeed(token, {})
    desc = wait_done(sfn, arn)
    assert desc["status"] == "SUCCEEDED", desc
    out = json.loads(desc["output"])
    assert out["round"] == 2 and out["handover"] == handover(job_id, 2)
    assert out["result"]["closed_by"] == "stream"
    assert entered_states(sfn, arn) == (
        ["Init"] + round_states("deadline") + ["NextRound", "AdvanceRound"]
        + round_states("stream") + ["Finalize", "Succeeded"]
    )


def test_stream_then_timed_out_round(sfn, start_job):
    """The other order: round 1 handed over, round 2 times out. Round 1's
    hand-over is still in the state when round 2 times out (ResultPath null);
    DeadlinePassed overwrites it, so CloseRound gets deadline, not stream."""
    arn, worker, job_input = start_job(round_timeout_seconds=ROUND_TIMEOUT)
    job_id = job_input["job_id"]
    token, _ = worker.poll("start_round")
    worker.succeed(token, handover(job_id, 1))
    token, close = worker.poll("close_round")
    check_close_round_input(close, job_input, 1, "stream")
    worker.succeed(token, round_result(job_id, 1, True, closed_by="stream"))
    _, task_input = worker.poll("start_round")  # round 2: never answered
    check_start_round_input(task_input, job_input, 2)
    token, close = worker.poll("close_round", timeout=ROUND_TIMEOUT + 30)
    check_close_round_input(close, job_input, 2, "deadline")
    worker.succeed(token, round_result(job_id, 2, False, closed_by="deadline"))
    token, _ = worker.poll("finalize")
    worker.succeed(token, {})
    desc = wait_done(sfn, arn)
    assert desc["status"] == "SUCCEEDED", desc
    assert json.loads(desc["output"])["handover"] == DEADLINE


def test_quorum_not_met_fails_execution(sfn, start_job):
    arn, worker, job_input = start_job(round_timeout_seconds=ROUND_TIMEOUT, min_clients=3)
    worker.poll("start_round")
    token, close = worker.poll("close_round", timeout=ROUND_TIMEOUT + 30)
    check_close_round_input(close, job_input, 1, "deadline")
    cause = "quorum not met: 1 of min_clients 3 updates received"
    worker.fail(token, "QuorumNotMet", cause)

    desc = wait_done(sfn, arn)
    assert desc["status"] == "FAILED", desc
    assert desc.get("error") == "QuorumNotMet"
    assert cause in desc.get("cause", "")
    states = entered_states(sfn, arn)
    assert states == ["Init"] + round_states("deadline")[:-1] + ["Failed"]
    # Not retried.
    assert [act for act, _ in worker.seen].count("close_round") == 1


def test_aggregation_failure_after_hand_over_fails_execution(sfn, start_job):
    """CloseRound after a hand-over reports a round without a usable update
    as AggregationFailed (permanent: not retried)."""
    arn, worker, job_input = start_job()
    job_id = job_input["job_id"]
    token, _ = worker.poll("start_round")
    worker.succeed(token, handover(job_id, 1, usable=3, expected=3))
    token, close = worker.poll("close_round")
    check_close_round_input(close, job_input, 1, "stream")
    cause = "aggregation failed: no usable update"
    worker.fail(token, "AggregationFailed", cause)

    desc = wait_done(sfn, arn)
    assert desc["status"] == "FAILED", desc
    assert desc.get("error") == "AggregationFailed"
    assert cause in desc.get("cause", "")
    assert entered_states(sfn, arn) == ["Init", "StartRound", "CloseRound", "Failed"]
    assert [act for act, _ in worker.seen] == ["start_round", "close_round"]


@pytest.mark.parametrize("closed_by", ["stream", "deadline"])
def test_transient_failure_is_retried(sfn, start_job, closed_by):
    """A task failing with Transient (the system's failure) gets a new task
    for the same round instead of failing the execution (statemachine/README.md,
    "Retries and timeouts"), on both ways into CloseRound;
    test_quorum_not_met_fails_execution shows a permanent error is not retried."""
    arn, worker, job_input = start_job(round_timeout_seconds=ROUND_TIMEOUT)
    job_id = job_input["job_id"]
    token, _ = worker.poll("start_round")
    if closed_by == "stream":
        worker.succeed(token, handover(job_id, 1))
    token, close = worker.poll("close_round", timeout=ROUND_TIMEOUT + 30)
    check_close_round_input(close, job_input, 1, closed_by)
    worker.fail(token, "Transient", "DynamoDB UpdateItem fedstep-rounds: ThrottlingException (HTTP 400)")

    token, again = worker.poll("close_round")
    # The same task input again, one retry on: a retry does not re-enter the state.
    check_close_round_input(again, job_input, 1, closed_by)
    assert again["context"]["State"]["RetryCount"] == close["context"]["State"]["RetryCount"] + 1
    assert again["context"]["State"]["EnteredTime"] == close["context"]["State"]["EnteredTime"]
    worker.succeed(token, round_result(job_id, 1, False, closed_by=closed_by))
    token, _ = worker.poll("finalize")
    worker.succeed(token, {})
    desc = wait_done(sfn, arn)
    assert desc["status"] == "SUCCEEDED", desc
    assert [act for act, _ in worker.seen].count("close_round") == 2
    assert entered_states(sfn, arn) == ["Init"] + round_states(closed_by) + ["Finalize", "Succeeded"]


def test_callback_after_timeout_is_rejected(sfn, start_job):
    """A StartRound hand-over that arrives after the deadline never counts.

    AWS rejects it with TaskTimedOut (or InvalidToken) as soon as the task has
    timed out. LocalStack 4.8.1 never raises TaskTimedOut: while the execution
    still runs it accepts the late callback and drops it (the task is gone),
    and rejects it with InvalidToken once the execution has ended. Asserted
    here: the late callback has no effect on the execution on either (CloseRound
    runs once, with closed_by=deadline), and it is rejected with
    TaskTimedOut/InvalidToken at the latest once the execution is over.
    """
    arn, worker, job_input = start_job(round_timeout_seconds=ROUND_TIMEOUT)
    job_id = job_input["job_id"]
    late_token, _ = worker.poll("start_round")
    # close_round being scheduled proves StartRound has timed out.
    token, close = worker.poll("close_round", timeout=ROUND_TIMEOUT + 30)
    check_close_round_input(close, job_input, 1, "deadline")
    late = handover(job_id, 1)
    try:
        worker.succeed(late_token, late)
    except ClientError as err:  # AWS behaviour
        assert err.response["Error"]["Code"] in ("TaskTimedOut", "InvalidToken"), err.response
    worker.succeed(token, round_result(job_id, 1, False, closed_by="deadline"))
    token, fin = worker.poll("finalize")
    assert fin["result"]["closed_by"] == "deadline"
    worker.succeed(token, {})
    desc = wait_done(sfn, arn)
    assert desc["status"] == "SUCCEEDED", desc
    out = json.loads(desc["output"])
    assert out["handover"] == DEADLINE
    assert out["result"]["continue"] is False and out["result"]["closed_by"] == "deadline"
    states = entered_states(sfn, arn)
    assert states.count("StartRound") == 1 and states.count("CloseRound") == 1
    assert [act for act, _ in worker.seen].count("close_round") == 1

    with pytest.raises(ClientError) as err:
        worker.succeed(late_token, late)
    assert err.value.response["Error"]["Code"] in ("TaskTimedOut", "InvalidToken"), err.value.response


def test_second_hand_over_is_ignored(sfn, start_job):
    """A token takes one answer: a second hand-over (a racing stream delivery)
    or a failure after it changes nothing, and CloseRound runs once.

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
    close_token, close = worker.poll("close_round")
    check_close_round_input(close, job_input, 1, "stream")
    worker.succeed(close_token, round_result(job_id, 1, False, closed_by="stream"))
    fin_token, _ = worker.poll("finalize")
    worker.succeed(fin_token, {})
    desc = wait_done(sfn, arn)
    assert desc["status"] == "SUCCEEDED", desc
    # The first answer is the one kept.
    assert json.loads(desc["output"])["handover"] == handover(job_id, 1, usable=2)
    assert [act for act, _ in worker.seen] == ["start_round", "close_round", "finalize"]
    assert entered_states(sfn, arn) == ["Init"] + round_states("stream") + ["Finalize", "Succeeded"]
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
    arn, worker, _ = start_job()
    token, _ = worker.poll("start_round")
    worker.fail(token, error, cause)
    desc = wait_done(sfn, arn)
    assert desc["status"] == "FAILED"
    assert desc.get("error") == error
    assert cause in desc.get("cause", "")
    # Straight to Failed: no CloseRound.
    assert entered_states(sfn, arn) == ["Init", "StartRound", "Failed"]
    assert [act for act, _ in worker.seen] == ["start_round"]


@pytest.mark.parametrize("bad", [{}, {"continue": "yes"}])
@pytest.mark.parametrize("closed_by", ["stream", "deadline"])
def test_result_without_boolean_continue_fails(sfn, start_job, bad, closed_by):
    """CloseRound's result decides; one without a boolean continue is a contract violation."""
    arn, worker, job_input = start_job(round_timeout_seconds=ROUND_TIMEOUT)
    job_id = job_input["job_id"]
    token, _ = worker.poll("start_round")
    if closed_by == "stream":
        worker.succeed(token, handover(job_id, 1))
    token, close = worker.poll("close_round", timeout=ROUND_TIMEOUT + 30)
    check_close_round_input(close, job_input, 1, closed_by)
    worker.succeed(token, {"job_id": job_id, "round": 1, **bad})
    desc = wait_done(sfn, arn)
    assert desc["status"] == "FAILED"
    assert desc.get("error") == "FedstepContractViolation"
    assert entered_states(sfn, arn) == ["Init"] + round_states(closed_by) + ["BadResult"]


def test_hand_over_continue_is_not_read(sfn, start_job):
    """Only CloseRound's result is read by ShouldContinue: a StartRound
    answer that looks like a round result (the old protocol) still goes to
    CloseRound, and CloseRound's continue=false ends the job."""
    arn, worker, job_input = start_job()
    job_id = job_input["job_id"]
    token, _ = worker.poll("start_round")
    worker.succeed(token, {**round_result(job_id, 1, True), "closed_by": "stream"})
    token, close = worker.poll("close_round")
    check_close_round_input(close, job_input, 1, "stream")
    worker.succeed(token, round_result(job_id, 1, False, closed_by="stream"))
    token, _ = worker.poll("finalize")
    worker.succeed(token, {})
    desc = wait_done(sfn, arn)
    assert desc["status"] == "SUCCEEDED", desc
    assert entered_states(sfn, arn) == ["Init"] + round_states("stream") + ["Finalize", "Succeeded"]


def test_hand_over_without_closed_by_fails_with_runtime_error(sfn, start_job):
    """CloseRound's "closed_by.$": "$.handover.closed_by" is a path that must
    exist: a hand-over without closed_by fails the execution with
    States.Runtime before any close_round task is scheduled (no retrier
    names States.Runtime).

    On AWS a States.Runtime error is not caught by States.ALL: the execution
    fails at CloseRound with the JSONPath message as its cause. LocalStack
    4.8.1 records it as an ActivityFailed of CloseRound, lets CloseRound's
    Catch take it to Failed, whose ErrorPath then yields a States.* name,
    which it refuses: the execution fails with States.Runtime too, but with
    the cause "ValueError(Custom Error Names MUST NOT begin with the prefix
    'States.', ...)". Asserted: the error, no close_round task, no Finalize,
    and the JSONPath message in the history.
    """
    arn, worker, job_input = start_job()
    job_id = job_input["job_id"]
    token, _ = worker.poll("start_round")
    worker.succeed(token, {"job_id": job_id, "round": 1, "usable": 3, "expected": 3})
    desc = wait_done(sfn, arn)
    assert desc["status"] == "FAILED", desc
    assert desc.get("error") == "States.Runtime"
    states = entered_states(sfn, arn)
    assert states[:3] == ["Init", "StartRound", "CloseRound"], states
    assert states[3:] in ([], ["Failed"]), states  # AWS: [], LocalStack 4.8.1: ["Failed"]
    events = [ev for page in sfn.get_paginator("get_execution_history").paginate(executionArn=arn)
              for ev in page["events"]]
    assert not [ev for ev in events if ev["type"] == "ActivityScheduled" and "close_round" in
                ev["activityScheduledEventDetails"]["resource"]]
    assert "$.handover.closed_by" in json.dumps(events, default=str)
    assert [act for act, _ in worker.seen] == ["start_round"]
