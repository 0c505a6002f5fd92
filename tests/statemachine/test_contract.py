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


def test_three_rounds_then_finalize(sfn, start_job):
    arn, worker, job_input = start_job()
    job_id = job_input["job_id"]
    for rnd, cont in ((1, True), (2, True), (3, False)):
        token, task_input = worker.poll("start_round")
        check_start_round_input(task_input, job_input, rnd)
        worker.succeed(token, round_result(job_id, rnd, cont))

    token, fin = worker.poll("finalize")
    assert fin["action"] == "finalize"
    assert fin["job_id"] == job_id
    assert fin["round"] == 3
    assert fin["result"] == round_result(job_id, 3, False)
    check_context(fin["context"], job_input, "Finalize")
    worker.succeed(token, {"job_id": job_id, "artifact_id": "a-1", "final_model_key": fin["result"]["global_model_key"]})

    desc = wait_done(sfn, arn)
    assert desc["status"] == "SUCCEEDED", desc
    out = json.loads(desc["output"])
    assert out["job_id"] == job_id and out["round"] == 3
    assert out["result"]["continue"] is False
    assert out["final"]["artifact_id"] == "a-1"

    seen_rounds = [inp["Payload"]["round"] for act, inp in worker.seen if act == "start_round"]
    assert seen_rounds == [1, 2, 3]
    assert [act for act, _ in worker.seen].count("finalize") == 1
    states = entered_states(sfn, arn)
    assert states.count("StartRound") == 3
    assert states.count("Finalize") == 1
    assert "CloseRound" not in states


def test_timeout_closes_round(sfn, start_job):
    arn, worker, job_input = start_job(round_timeout_seconds=ROUND_TIMEOUT, min_clients=2)
    job_id = job_input["job_id"]
    _, task_input = worker.poll("start_round")  # taken, never answered
    check_start_round_input(task_input, job_input, 1)

    token, close = worker.poll("close_round", timeout=ROUND_TIMEOUT + 30)
    assert close["action"] == "close_round"
    assert close["job_id"] == job_id
    assert close["round"] == 1
    assert set(close) == {"action", "job_id", "round", "context"}, close
    check_context(close["context"], job_input, "CloseRound")
    assert close["context"]["Execution"]["Id"] == arn
    worker.succeed(token, round_result(job_id, 1, False, closed_by="deadline"))

    token, fin = worker.poll("finalize")
    assert fin["round"] == 1 and fin["result"]["closed_by"] == "deadline"
    worker.succeed(token, {"job_id": job_id})

    desc = wait_done(sfn, arn)
    assert desc["status"] == "SUCCEEDED", desc
    assert entered_states(sfn, arn) == [
        "Init", "StartRound", "CloseRound", "ShouldContinue", "Finalize", "Succeeded",
    ]


def test_timeout_then_next_round(sfn, start_job):
    """A timed-out round that the aggregator closes with continue=true loops on."""
    arn, worker, job_input = start_job(round_timeout_seconds=ROUND_TIMEOUT)
    job_id = job_input["job_id"]
    worker.poll("start_round")
    token, close = worker.poll("close_round", timeout=ROUND_TIMEOUT + 30)
    worker.succeed(token, round_result(job_id, 1, True))
    token, task_input = worker.poll("start_round")
    check_start_round_input(task_input, job_input, 2)
    worker.succeed(token, round_result(job_id, 2, False))
    token, _ = worker.poll("finalize")
    worker.succeed(token, {})
    assert wait_done(sfn, arn)["status"] == "SUCCEEDED"


def test_quorum_not_met_fails_execution(sfn, start_job):
    arn, worker, job_input = start_job(round_timeout_seconds=ROUND_TIMEOUT, min_clients=3)
    worker.poll("start_round")
    token, close = worker.poll("close_round", timeout=ROUND_TIMEOUT + 30)
    cause = "quorum not met: 1 of min_clients 3 updates received"
    worker.fail(token, "QuorumNotMet", cause)

    desc = wait_done(sfn, arn)
    assert desc["status"] == "FAILED", desc
    assert desc.get("error") == "QuorumNotMet"
    assert cause in desc.get("cause", "")
    states = entered_states(sfn, arn)
    assert states[-1] == "Failed" and "Finalize" not in states


def test_transient_failure_is_retried(sfn, start_job):
    """A task failing with Transient (the system's failure) gets a new task
    for the same round instead of failing the execution (statemachine/README.md,
    "Retries and timeouts"); test_quorum_not_met_fails_execution shows a
    permanent error is not retried."""
    arn, worker, job_input = start_job(round_timeout_seconds=ROUND_TIMEOUT)
    job_id = job_input["job_id"]
    worker.poll("start_round")
    token, _ = worker.poll("close_round", timeout=ROUND_TIMEOUT + 30)
    worker.fail(token, "Transient", "DynamoDB UpdateItem fedstep-rounds: ThrottlingException (HTTP 400)")

    token, again = worker.poll("close_round")
    assert again["action"] == "close_round" and again["job_id"] == job_id and again["round"] == 1
    worker.succeed(token, round_result(job_id, 1, False, closed_by="deadline"))
    token, _ = worker.poll("finalize")
    worker.succeed(token, {})
    desc = wait_done(sfn, arn)
    assert desc["status"] == "SUCCEEDED", desc
    assert [act for act, _ in worker.seen].count("close_round") == 2


def test_callback_after_timeout_is_rejected(sfn, start_job):
    """A StartRound callback that arrives after the deadline never counts.

    AWS rejects it with TaskTimedOut (or InvalidToken) as soon as the task has
    timed out. LocalStack 4.8.1 never raises TaskTimedOut: while the execution
    still runs it accepts the late callback and drops it (the task is gone),
    and rejects it with InvalidToken once the execution has ended. Asserted
    here: the late callback has no effect on the execution on either, and it
    is rejected with TaskTimedOut/InvalidToken at the latest once the
    execution is over.
    """
    arn, worker, job_input = start_job(round_timeout_seconds=ROUND_TIMEOUT)
    job_id = job_input["job_id"]
    late_token, _ = worker.poll("start_round")
    # close_round being scheduled proves StartRound has timed out.
    token, _ = worker.poll("close_round", timeout=ROUND_TIMEOUT + 30)
    late = round_result(job_id, 1, True, closed_by="late callback")
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
    assert out["result"]["continue"] is False and out["result"]["closed_by"] == "deadline"
    assert entered_states(sfn, arn).count("StartRound") == 1

    with pytest.raises(ClientError) as err:
        worker.succeed(late_token, late)
    assert err.value.response["Error"]["Code"] in ("TaskTimedOut", "InvalidToken"), err.value.response


def test_start_round_task_failure_fails_execution(sfn, start_job):
    arn, worker, _ = start_job()
    token, _ = worker.poll("start_round")
    worker.fail(token, "InvalidJob", "job config rejected: min_clients > clients")
    desc = wait_done(sfn, arn)
    assert desc["status"] == "FAILED"
    assert desc.get("error") == "InvalidJob"
    assert "min_clients > clients" in desc.get("cause", "")


@pytest.mark.parametrize("bad", [{}, {"continue": "yes"}])
def test_result_without_boolean_continue_fails(sfn, start_job, bad):
    arn, worker, job_input = start_job()
    token, _ = worker.poll("start_round")
    worker.succeed(token, {"job_id": job_input["job_id"], "round": 1, **bad})
    desc = wait_done(sfn, arn)
    assert desc["status"] == "FAILED"
    assert desc.get("error") == "FedstepContractViolation"
