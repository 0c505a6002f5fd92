"""The AWS variant of statemachine/federated_training.asl.json, executed on LocalStack.

On AWS every task invokes the aggregator Lambda: StartRound through the
lambda:invoke.waitForTaskToken integration, CloseRound and Finalize through
the function ARN directly (the legacy form: the task's output is the
function's return value). The placeholder values come from
statemachine/aws-substitutions.json, the table the CDK app's
definitionSubstitutions is held to (infra/test/stack.test.ts).

Lambdas cannot run on the emulators (no Docker), so the invocations are
answered by LocalStack's mocked service integrations: scripts/emulators.sh
starts LocalStack with SFN_MOCK_CONFIG naming a file this module writes, and
an execution started as `<state machine ARN>#<test case>` takes the listed
states' answers from it instead of invoking anything. Parameters, the
context object, TimeoutSecondsPath, Retry, Catch, ResultPath, Choice and
the round loop are LocalStack's interpreter running the deployed definition.

What a mocked answer stands for (LocalStack 4.8.1, read in its source and
checked here; statemachine/README.md, "The AWS variant on the emulators"):

- StartRound: a Return is the task's output at once, i.e. what the stream
  path's SendTaskSuccess (the hand-over) would deliver on AWS. The task
  token is still generated into the context object, but nothing waits for
  a callback.
- CloseRound, Finalize: a Return is the Lambda Invoke response
  {StatusCode, Payload[, FunctionError]}; LocalStack passes Payload on, and
  turns a FunctionError payload {errorType, errorMessage} into Error =
  errorType, Cause = that JSON, as for a real function error.
- Lambda service errors (Lambda.ServiceException, ...) are Throws.
- The answer is chosen by the state's RetryCount, which every entry of the
  state resets: all rounds of one execution get the same answer. A run of
  several rounds therefore loops until it is stopped; the loop tests stop it
  once they have seen the rounds they check.
- StartRound's States.Timeout cannot be mocked (a Throw may not use a
  States.* name, and a mocked callback task never waits). It comes from
  round_timeout_seconds = 0, which LocalStack accepts (AWS would reject it
  as a TimeoutSecondsPath value): the timeout fires when the task starts,
  and DeadlinePassed (a Pass state, nothing to mock) leads to CloseRound.

The executions that end by themselves are started together by one module
fixture (most of their time is retry backoff, spent asleep), so the module
takes about as long as the slowest of them.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import pytest
from botocore.exceptions import ClientError

import local_deploy
from conftest import unavailable, wait_done
from test_asl import LAMBDA_SERVICE_ERRORS, PERMANENT_ERRORS, STATES
from test_contract import DEADLINE, handover, round_result

ROOT = Path(__file__).resolve().parents[2]
ASL_TEXT = (ROOT / "statemachine" / "federated_training.asl.json").read_text()

# Where scripts/emulators.sh tells LocalStack to look (`emulators.sh env`).
MOCK_CONFIG = Path(
    os.environ.get("FEDSTEP_SFN_MOCK_CONFIG")
    or Path(os.environ.get("FEDSTEP_EMU_DIR") or ROOT / ".emu").resolve() / "sfn-mock-config.json"
)

ROUND_TIMEOUT = 30  # round_timeout_seconds where StartRound answers (a mock never waits)
DIRECT_TIMEOUT = STATES["CloseRound"]["TimeoutSeconds"]  # 960, CloseRound's and Finalize's
LAMBDA_RETRIES = next(r for r in STATES["StartRound"]["Retry"] if "Lambda.ServiceException" in r["ErrorEquals"])[
    "MaxAttempts"
]
AGGREGATOR_RETRIES = next(r for r in STATES["Finalize"]["Retry"] if r["ErrorEquals"] == ["AggregatorError"])[
    "MaxAttempts"
]
BAD_RESULT_CAUSE = STATES["BadResult"]["Cause"]


# --- mocked answers -----------------------------------------------------------


def callback(output) -> dict:
    """StartRound: what SendTaskSuccess would deliver (the hand-over)."""
    return {"Return": output}


def returns(payload) -> dict:
    """CloseRound/Finalize: the Invoke response of a function that returned `payload`."""
    return {"Return": {"StatusCode": 200, "Payload": payload}}


def function_error(error_type: str, message: str) -> dict:
    """CloseRound/Finalize: the Invoke response of a function that failed.

    The payload is what the Rust lambda_runtime sends for an error whose
    Diagnostic has error_type / error_message (statemachine/README.md).
    """
    payload = {"errorType": error_type, "errorMessage": message}
    return {"Return": {"StatusCode": 200, "FunctionError": "Unhandled", "Payload": payload}}


def throw(error: str, cause: str) -> dict:
    return {"Throw": {"Error": error, "Cause": cause}}


def lambda_error_cause(error_type: str, message: str) -> str:
    """The Cause Step Functions reports for a function error: the error payload as JSON."""
    return json.dumps({"errorType": error_type, "errorMessage": message}, separators=(",", ":"))


def service_error(name: str) -> dict:
    return throw(name, f"{name}: mocked Lambda service failure (Service: AWSLambda; Status Code: 500)")


def job_id_of(prefix: str, case: str) -> str:
    return f"{prefix}-{case}"


# --- the test cases -----------------------------------------------------------


@dataclass
class Case:
    """One mocked execution: the answers per state (attempt 0, 1, ...) and the input."""

    states: dict[str, list[dict]]
    input: dict = field(default_factory=dict)
    # Started by the module fixture (runs to its end by itself); False: the
    # test starts it and stops it (the round loops).
    batch: bool = True


def cases(prefix: str) -> dict[str, Case]:
    def rr(case: str, rnd: int, cont, closed_by: str = "stream", **extra) -> dict:
        return round_result(job_id_of(prefix, case), rnd, cont, closed_by=closed_by, **extra)

    def ho(case: str, rnd: int = 1) -> list[dict]:
        """StartRound answered with the stream path's hand-over."""
        return [callback(handover(job_id_of(prefix, case), rnd))]

    def final(case: str) -> dict:
        job = job_id_of(prefix, case)
        return {"job_id": job, "artifact_id": f"{job}-model", "final_model_key": f"jobs/{job}/final.safetensors"}

    timed_out = {"round_timeout_seconds": 0}
    # StartRound's answer where the round times out: never used (the timeout
    # fires first); if it were, CloseRound's closed_by would show its marker.
    not_used = [callback({"closed_by": "not-a-timeout", "continue": True})]
    out = {
        "one_round": Case({
            "StartRound": ho("one_round"),
            "CloseRound": [returns(rr("one_round", 1, False))],
            "Finalize": [returns(final("one_round"))],
        }),
        "timeout_close_finalize": Case({
            "StartRound": not_used,
            "CloseRound": [returns(rr("timeout_close_finalize", 1, False, "deadline"))],
            "Finalize": [returns(final("timeout_close_finalize"))],
        }, {**timed_out, "min_clients": 2}),
        # Every Lambda service error once, in one retrier (4 retries), then success.
        "start_round_retried": Case({
            "StartRound": [service_error(e) for e in sorted(LAMBDA_SERVICE_ERRORS)] + ho("start_round_retried"),
            "CloseRound": [returns(rr("start_round_retried", 1, False))],
            "Finalize": [returns(final("start_round_retried"))],
        }),
        "close_round_retried": Case({
            "StartRound": not_used,
            "CloseRound": [service_error(e) for e in sorted(LAMBDA_SERVICE_ERRORS, reverse=True)]
            + [returns(rr("close_round_retried", 1, False, "deadline"))],
            "Finalize": [returns(final("close_round_retried"))],
        }, timed_out),
        "close_round_retried_stream": Case({
            "StartRound": ho("close_round_retried_stream"),
            "CloseRound": [service_error(e) for e in sorted(LAMBDA_SERVICE_ERRORS, reverse=True)]
            + [returns(rr("close_round_retried_stream", 1, False))],
            "Finalize": [returns(final("close_round_retried_stream"))],
        }),
        "finalize_retried": Case({
            "StartRound": ho("finalize_retried"),
            "CloseRound": [returns(rr("finalize_retried", 1, False))],
            "Finalize": [service_error(e) for e in sorted(LAMBDA_SERVICE_ERRORS)]
            + [returns(final("finalize_retried"))],
        }),
        # One service error more than the retrier allows; the answer after it
        # would succeed, so a retry too many shows as SUCCEEDED.
        "lambda_retries_exhausted": Case({
            "StartRound": [service_error("Lambda.ServiceException")] * (LAMBDA_RETRIES + 1)
            + ho("lambda_retries_exhausted"),
            "CloseRound": [returns(rr("lambda_retries_exhausted", 1, False))],
            "Finalize": [returns(final("lambda_retries_exhausted"))],
        }),
        "aggregator_error_exhausted": Case({
            "StartRound": ho("aggregator_error_exhausted"),
            "CloseRound": [returns(rr("aggregator_error_exhausted", 1, False))],
            "Finalize": [function_error("AggregatorError", "AccessDenied on PutObject")] * (AGGREGATOR_RETRIES + 1)
            + [returns(final("aggregator_error_exhausted"))],
        }),
        # CloseRound's result decides, after a hand-over or the deadline.
        "bad_result_empty": Case({
            "StartRound": ho("bad_result_empty"),
            "CloseRound": [returns({"job_id": job_id_of(prefix, "bad_result_empty"), "round": 1})],
        }),
        "bad_result_string": Case({
            "StartRound": ho("bad_result_string"),
            "CloseRound": [returns(rr("bad_result_string", 1, "yes"))],
        }),
        "bad_result_deadline": Case({
            "StartRound": not_used,
            "CloseRound": [returns({"job_id": job_id_of(prefix, "bad_result_deadline"), "round": 1})],
        }, timed_out),
        # A hand-over without closed_by: CloseRound's "closed_by.$" path is
        # missing. CloseRound's answer would succeed, so an invocation shows.
        "handover_without_closed_by": Case({
            "StartRound": [callback({k: v for k, v in handover(job_id_of(prefix, "handover_without_closed_by"), 1)
                                     .items() if k != "closed_by"})],
            "CloseRound": [returns(rr("handover_without_closed_by", 1, False))],
            "Finalize": [returns(final("handover_without_closed_by"))],
        }),
        # The round loops (see the module docstring): stopped by their tests.
        "rounds_loop": Case({
            "StartRound": ho("rounds_loop"),
            "CloseRound": [returns(rr("rounds_loop", 1, True))],
        }, batch=False),
        "timeout_loop": Case({
            "StartRound": not_used,
            "CloseRound": [returns(rr("timeout_loop", 1, True, "deadline"))],
        }, timed_out, batch=False),
    }
    # The aggregator's own retried errors, as function errors of the direct
    # form: errorType becomes the error name the retriers match. Both ways
    # into CloseRound.
    for closed_by in ("deadline", "stream"):
        case = "function_errors_retried" + ("_stream" if closed_by == "stream" else "")
        out[case] = Case({
            "StartRound": ho(case) if closed_by == "stream" else not_used,
            "CloseRound": [
                function_error("Transient", "DynamoDB UpdateItem: ThrottlingException"),
                function_error("AggregatorError", "model read broke off"),
                returns(rr(case, 1, False, closed_by)),
            ],
            "Finalize": [returns(final(case))],
        }, timed_out if closed_by == "deadline" else {})
    # A permanent error fails the execution at the first attempt; the answer
    # after it would succeed, so a retry shows as SUCCEEDED.
    for state, error, closed_by in permanent_error_cases():
        case = permanent_case(state, error, closed_by)
        message = f"{error}: mocked {state} failure"
        if state == "StartRound":
            # Through the callback integration only a Throw can be mocked:
            # here the Error/Cause of a failed invocation (a SendTaskFailure
            # to the token would look the same, with its own cause).
            answers = [throw(error, lambda_error_cause(error, message))] + ho(case)
        else:
            answers = [function_error(error, message), returns(rr(case, 1, False, closed_by or "stream"))]
        states = {state: answers}
        if state in ("CloseRound", "Finalize"):
            states["StartRound"] = not_used if closed_by == "deadline" else ho(case)
        if state == "Finalize":
            states["CloseRound"] = [returns(rr(case, 1, False))]
        out[case] = Case(states, timed_out if closed_by == "deadline" else {})
    return out


def permanent_error_cases() -> list[tuple[str, str, str | None]]:
    """(state, error, closed_by): every permanent error name as a CloseRound
    function error after a hand-over (the realistic place for most of
    them), QuorumNotMet also after the deadline (where it really happens),
    plus StartRound (a bad task input; a retried StartRound on a FAILED
    round) and Finalize."""
    return [("CloseRound", e, "stream") for e in sorted(PERMANENT_ERRORS)] + [
        ("CloseRound", "QuorumNotMet", "deadline"),
        ("StartRound", "InvalidTaskInput", None),
        ("StartRound", "NoUsableUpdate", None),
        ("Finalize", "NotFound", "stream"),
    ]


def permanent_case(state: str, error: str, closed_by: str | None) -> str:
    return f"permanent_{state}_{error}" + ("_deadline" if closed_by == "deadline" else "")


# --- the mock config file -------------------------------------------------------


def edit_mock_config(edit) -> None:
    """Read, edit and rewrite the shared mock config file, under a lock.

    LocalStack caches the parsed file by its mtime in whole seconds, so a
    second write within the same second would go unseen: the mtime is moved
    on by at least one second on every write.
    """
    MOCK_CONFIG.parent.mkdir(parents=True, exist_ok=True)
    lock_path = MOCK_CONFIG.with_name(MOCK_CONFIG.name + ".lock")
    with open(lock_path, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            old_mtime = int(MOCK_CONFIG.stat().st_mtime)
            config = json.loads(MOCK_CONFIG.read_text())
        except (OSError, ValueError):
            old_mtime, config = 0, {}
        config.setdefault("StateMachines", {})
        config.setdefault("MockedResponses", {})
        edit(config)
        tmp = MOCK_CONFIG.with_name(f"{MOCK_CONFIG.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(config, indent=1))
        os.replace(tmp, MOCK_CONFIG)
        mtime = max(int(time.time()), old_mtime + 1)
        os.utime(MOCK_CONFIG, (mtime, mtime))


def mock_entries(sm_name: str, test_cases: dict[str, Case]):
    """(TestCases, MockedResponses) of one state machine; response names carry its name."""
    tcs, responses = {}, {}
    for case, spec in test_cases.items():
        tcs[case] = {}
        for state, answers in spec.states.items():
            name = f"{sm_name}/{case}/{state}"
            tcs[case][state] = name
            responses[name] = {str(i): answer for i, answer in enumerate(answers)}
    return tcs, responses


def install(sm_name: str, test_cases: dict[str, Case]):
    tcs, responses = mock_entries(sm_name, test_cases)

    def edit(config):
        config["StateMachines"][sm_name] = {"TestCases": tcs}
        config["MockedResponses"].update(responses)

    edit_mock_config(edit)


def uninstall(sm_name: str):
    def edit(config):
        config["StateMachines"].pop(sm_name, None)
        for name in [n for n in config["MockedResponses"] if n.startswith(f"{sm_name}/")]:
            del config["MockedResponses"][name]

    edit_mock_config(edit)


# --- the deployment and its executions -------------------------------------------


@dataclass
class Variant:
    prefix: str
    sm_name: str
    sm_arn: str
    function_arn: str
    region: str
    cases: dict[str, Case]
    job_inputs: dict[str, dict] = field(default_factory=dict)
    started: dict[str, str] = field(default_factory=dict)  # case -> execution ARN


def start(sfn, env: Variant, case: str) -> str:
    job_input = {"job_id": job_id_of(env.prefix, case), "rounds": 3, "round_timeout_seconds": ROUND_TIMEOUT}
    job_input.update(env.cases[case].input)
    arn = sfn.start_execution(
        stateMachineArn=f"{env.sm_arn}#{case}",
        name=f"{case}-{uuid.uuid4().hex[:6]}",
        input=json.dumps(job_input),
    )["executionArn"]
    env.job_inputs[case] = job_input
    env.started[case] = arn
    return arn


@pytest.fixture(scope="module")
def aws_variant(aws, sfn):
    """A state machine from the ASL with the CDK app's substitutions, and the
    batch executions, all started (each test waits for its own)."""
    import boto3

    account = boto3.client("sts", region_name=aws).get_caller_identity()["Account"]
    prefix = f"aws{uuid.uuid4().hex[:8]}"
    sm_name = f"{prefix}-federated-training"
    function_arn = f"arn:aws:lambda:{aws}:{account}:function:{prefix}-aggregator"
    definition = local_deploy.substitute(ASL_TEXT, local_deploy.aws_substitutions("aws", function_arn))
    sm_arn = sfn.create_state_machine(
        name=sm_name,
        definition=definition,
        # LocalStack does not check the role; on AWS it is the CDK app's.
        roleArn=f"arn:aws:iam::{account}:role/{prefix}-states",
        type="STANDARD",
    )["stateMachineArn"]
    env = Variant(prefix, sm_name, sm_arn, function_arn, aws, cases(prefix))
    try:
        # First only a probe: if LocalStack does not read our file (started
        # without SFN_MOCK_CONFIG, or with another path), that is a missing
        # emulator feature, not a test failure (skip locally, fail in CI).
        probe = Case({
            "StartRound": [callback({"closed_by": "stream"})],
            "CloseRound": [returns({"continue": False})],
            "Finalize": [returns({})],
        })
        install(sm_name, {"probe": probe})
        try:
            sfn.start_execution(stateMachineArn=f"{sm_arn}#probe", input=json.dumps(
                {"job_id": f"{prefix}-probe", "round_timeout_seconds": ROUND_TIMEOUT}))
        except ClientError as err:
            unavailable(
                f"LocalStack does not serve mocked responses from {MOCK_CONFIG} "
                f"({err.response['Error']['Code']}: {err.response['Error']['Message']}); "
                "start it with scripts/emulators.sh up (which sets SFN_MOCK_CONFIG), "
                "or point FEDSTEP_SFN_MOCK_CONFIG at the file its SFN_MOCK_CONFIG names"
            )
        install(sm_name, env.cases)
        for case, spec in env.cases.items():
            if spec.batch:
                start(sfn, env, case)
        yield env
    finally:
        for arn in env.started.values():
            if sfn.describe_execution(executionArn=arn)["status"] == "RUNNING":
                sfn.stop_execution(executionArn=arn, error="TestCleanup")
        sfn.delete_state_machine(stateMachineArn=sm_arn)
        uninstall(sm_name)


def finished(sfn, env: Variant, case: str) -> tuple[dict, History]:
    arn = env.started[case]
    # Retries sleep up to 2+4+8+16 s (full jitter: usually half of it).
    desc = wait_done(sfn, arn, timeout=120)
    return desc, History.of(sfn, arn)


# --- reading the execution history ----------------------------------------------------


class History:
    """The events of one execution, each attributed to the state it belongs to.

    Attribution follows previousEventId back to a state's entered event, not
    the order of events: a timed-out task's abandoned attempt keeps adding
    events on LocalStack while the next state runs.
    """

    def __init__(self, events: list[dict]):
        self.events = events
        self.state_of: dict[int, str | None] = {}
        for ev in events:
            entered = ev.get("stateEnteredEventDetails")
            self.state_of[ev["id"]] = entered["name"] if entered else self.state_of.get(ev.get("previousEventId"))

    @classmethod
    def of(cls, sfn, arn: str) -> History:
        events = []
        for page in sfn.get_paginator("get_execution_history").paginate(executionArn=arn):
            events += page["events"]
        return cls(events)

    def entered(self) -> list[str]:
        return [ev["stateEnteredEventDetails"]["name"] for ev in self.events if "stateEnteredEventDetails" in ev]

    def of_state(self, state: str, *types: str) -> list[dict]:
        return [ev for ev in self.events if self.state_of[ev["id"]] == state and (not types or ev["type"] in types)]

    def inputs(self, state: str) -> list[dict]:
        return [json.loads(ev["stateEnteredEventDetails"]["input"]) for ev in self.of_state(state)
                if "stateEnteredEventDetails" in ev]

    def outputs(self, state: str) -> list[dict]:
        return [json.loads(ev["stateExitedEventDetails"]["output"]) for ev in self.of_state(state)
                if "stateExitedEventDetails" in ev]

    def start_round_calls(self) -> list[dict]:
        """StartRound's lambda:invoke requests, one per attempt: {FunctionName, Payload}."""
        calls = []
        for ev in self.of_state("StartRound", "TaskScheduled"):
            details = ev["taskScheduledEventDetails"]
            assert (details["resourceType"], details["resource"]) == ("lambda", "invoke.waitForTaskToken"), details
            calls.append({**details, "parameters": json.loads(details["parameters"])})
        return calls

    def direct_calls(self, state: str) -> list[dict]:
        """A direct-ARN task's invocations, one per attempt: {resource, input (the event), timeoutInSeconds}."""
        calls = []
        for ev in self.of_state(state, "LambdaFunctionScheduled"):
            details = ev["lambdaFunctionScheduledEventDetails"]
            calls.append({**details, "input": json.loads(details["input"])})
        return calls

    def failures(self, state: str) -> list[tuple[str, str]]:
        """(error, cause) of every failed attempt of a task state."""
        out = []
        for ev in self.of_state(state, "TaskFailed", "LambdaFunctionFailed", "TaskTimedOut"):
            details = next(v for k, v in ev.items() if k.endswith("EventDetails"))
            out.append((details.get("error"), details.get("cause")))
        return out


# --- what every task receives ------------------------------------------------------------


def check_context(ctx: dict, env: Variant, case: str, state: str, retry_count: int = 0) -> None:
    arn = env.started[case]
    assert ctx["Execution"]["Id"] == arn
    assert ctx["Execution"]["Input"] == env.job_inputs[case]
    assert ctx["StateMachine"]["Id"] == env.sm_arn
    assert ctx["State"]["Name"] == state
    assert ctx["State"]["RetryCount"] == retry_count
    datetime.fromisoformat(ctx["State"]["EnteredTime"].replace("Z", "+00:00"))  # ISO 8601
    if state == "StartRound":
        # The one place the handler finds its task token.
        assert isinstance(ctx["Task"]["Token"], str) and ctx["Task"]["Token"], ctx
    else:
        assert "Task" not in ctx, ctx


def check_start_round_call(call: dict, env: Variant, case: str, rnd: int, retry_count: int = 0) -> dict:
    """The exact lambda:invoke request; returns the payload (the Lambda event)."""
    params = call["parameters"]
    assert set(params) == {"FunctionName", "Payload"}, params
    assert params["FunctionName"] == env.function_arn
    assert call["region"] == env.region
    # TimeoutSecondsPath, evaluated per execution.
    assert call["timeoutInSeconds"] == env.job_inputs[case]["round_timeout_seconds"]
    assert "heartbeatInSeconds" not in call
    payload = params["Payload"]
    assert set(payload) == {"action", "job_id", "round", "round_timeout_seconds", "context"}, payload
    assert payload["action"] == "start_round"
    assert payload["job_id"] == env.job_inputs[case]["job_id"]
    assert payload["round"] == rnd
    assert payload["round_timeout_seconds"] == env.job_inputs[case]["round_timeout_seconds"]
    check_context(payload["context"], env, case, "StartRound", retry_count)
    return payload


def check_direct_call(call: dict, env: Variant, case: str, state: str, rnd: int, retry_count: int = 0,
                      closed_by: str | None = None) -> dict:
    """The event a direct-ARN task (CloseRound, Finalize) invokes the function
    with; CloseRound's carries closed_by (required: pass it)."""
    assert call["resource"] == env.function_arn
    assert call["timeoutInSeconds"] == DIRECT_TIMEOUT
    event = call["input"]
    keys = {"action", "job_id", "round", "context"} | {"CloseRound": {"closed_by"}, "Finalize": {"result"}}[state]
    assert set(event) == keys, event
    assert event["action"] == {"CloseRound": "close_round", "Finalize": "finalize"}[state]
    assert event["job_id"] == env.job_inputs[case]["job_id"]
    assert event["round"] == rnd
    if state == "CloseRound":
        assert closed_by in ("stream", "deadline")
        assert event["closed_by"] == closed_by
    check_context(event["context"], env, case, state, retry_count)
    return event


def check_timed_out_start_round(hist: History) -> None:
    """StartRound ended by States.Timeout before any answer, caught with
    ResultPath null; DeadlinePassed then sets handover.closed_by = deadline."""
    (entered,) = hist.inputs("StartRound")
    events = hist.of_state("StartRound")
    exited = next(ev for ev in events if ev["type"] == "TaskStateExited")
    # (The abandoned attempt may log a few events after the state has been
    # left, on LocalStack: only what happened before counts.)
    outcomes = [ev for ev in events if ev["id"] < exited["id"]
                and ev["type"] in ("TaskSubmitted", "TaskSucceeded", "TaskFailed", "TaskTimedOut")]
    assert [ev["type"] for ev in outcomes] == ["TaskTimedOut"], (
        "StartRound was not ended by its (zero) timeout; LocalStack may have answered it first",
        [ev["type"] for ev in events],
    )
    assert outcomes[0]["taskTimedOutEventDetails"]["error"] == "States.Timeout"
    # ResultPath null: DeadlinePassed gets StartRound's input unchanged (no
    # hand-over, no error) and adds the deadline marker for CloseRound.
    assert hist.outputs("StartRound") == [entered]
    assert hist.inputs("DeadlinePassed") == [entered]
    assert hist.outputs("DeadlinePassed") == [{**entered, "handover": DEADLINE}]
    assert hist.inputs("CloseRound")[0] == {**entered, "handover": DEADLINE}


def check_handed_over(hist: History, env: Variant, case: str) -> None:
    """StartRound answered with the hand-over: it lands in $.handover and
    CloseRound runs next, on that state."""
    job_input = env.job_inputs[case]
    (entered,) = hist.inputs("StartRound")
    assert entered == {**job_input, "round": 1}
    after = {**entered, "handover": handover(job_input["job_id"], 1)}
    assert hist.outputs("StartRound") == [after]
    assert hist.inputs("CloseRound")[0] == after
    assert "DeadlinePassed" not in hist.entered()


def round_states(closed_by: str) -> list[str]:
    """The states of one round up to the Choice."""
    return ["StartRound"] + (["DeadlinePassed"] if closed_by == "deadline" else []) + ["CloseRound", "ShouldContinue"]


# --- the tests -----------------------------------------------------------------------------


def test_one_round_then_finalize(sfn, aws_variant):
    env, case = aws_variant, "one_round"
    desc, hist = finished(sfn, env, case)
    assert desc["status"] == "SUCCEEDED", desc
    assert hist.entered() == ["Init"] + round_states("stream") + ["Finalize", "Succeeded"]
    job_input = env.job_inputs[case]
    ho = handover(job_input["job_id"], 1)
    result = round_result(job_input["job_id"], 1, False, closed_by="stream")

    (call,) = hist.start_round_calls()
    check_start_round_call(call, env, case, 1)
    # The callback's output (the hand-over) lands in $.handover; the rest of
    # the state is kept.
    check_handed_over(hist, env, case)

    (close,) = hist.direct_calls("CloseRound")
    check_direct_call(close, env, case, "CloseRound", 1, closed_by="stream")
    # The direct form's output is the function's return value (the Invoke
    # response's Payload), kept as $.result next to the hand-over.
    assert hist.outputs("CloseRound") == [{**job_input, "round": 1, "handover": ho, "result": result}]

    (fin,) = hist.direct_calls("Finalize")
    event = check_direct_call(fin, env, case, "Finalize", 1)
    assert event["result"] == result
    final = {"job_id": job_input["job_id"], "artifact_id": f"{job_input['job_id']}-model",
             "final_model_key": f"jobs/{job_input['job_id']}/final.safetensors"}
    assert hist.outputs("Finalize") == [{**job_input, "round": 1, "handover": ho, "result": result, "final": final}]
    assert json.loads(desc["output"]) == {**job_input, "round": 1, "handover": ho, "result": result, "final": final}


def test_timeout_closes_round(sfn, aws_variant):
    env, case = aws_variant, "timeout_close_finalize"
    desc, hist = finished(sfn, env, case)
    assert desc["status"] == "SUCCEEDED", desc
    assert hist.entered() == ["Init"] + round_states("deadline") + ["Finalize", "Succeeded"]
    check_timed_out_start_round(hist)
    job_input = env.job_inputs[case]

    (close,) = hist.direct_calls("CloseRound")
    check_direct_call(close, env, case, "CloseRound", 1, closed_by="deadline")
    result = round_result(job_input["job_id"], 1, False, closed_by="deadline")
    assert hist.outputs("CloseRound") == [{**job_input, "round": 1, "handover": DEADLINE, "result": result}]
    (fin,) = hist.direct_calls("Finalize")
    assert check_direct_call(fin, env, case, "Finalize", 1)["result"] == result
    out = json.loads(desc["output"])
    assert out["result"] == result and out["round"] == 1 and out["handover"] == DEADLINE and "error" not in out


def test_hand_over_without_closed_by_fails_the_execution(sfn, aws_variant):
    """CloseRound's "closed_by.$" path must exist: a hand-over without it
    fails the execution before the function is invoked (its mocked answer
    would succeed), and nothing retries it.

    On AWS that is a States.Runtime error, which States.ALL does not catch:
    the execution fails at CloseRound. LocalStack 4.8.1's direct-ARN Lambda
    task reports it differently: a LambdaFunctionFailed with error
    `Exception` and the JSONPath message as cause, which CloseRound's Catch
    takes to Failed (the activity variant gets States.Runtime, see
    test_contract.py). Asserted: one of the two, the JSONPath message as the
    cause, no invocation, no retry, no Finalize.
    """
    env, case = aws_variant, "handover_without_closed_by"
    desc, hist = finished(sfn, env, case)
    assert desc["status"] == "FAILED", desc
    entered = hist.entered()
    assert entered[:3] == ["Init", "StartRound", "CloseRound"], entered
    if desc["error"] == "Exception":  # LocalStack 4.8.1
        assert entered[3:] == ["Failed"], entered
        assert hist.failures("CloseRound") == [("Exception", desc["cause"])]
    else:  # AWS
        assert desc["error"] == "States.Runtime", desc
        assert entered[3:] == [], entered
    assert "The JSONPath '$.handover.closed_by' could not be found" in desc["cause"]
    assert hist.direct_calls("CloseRound") == []
    (start_out,) = hist.outputs("StartRound")
    assert "closed_by" not in start_out["handover"]


def wait_for(sfn, arn: str, what, timeout: float = 60.0) -> History:
    """Polls the history until what(history) holds."""
    deadline = time.monotonic() + timeout
    while True:
        hist = History.of(sfn, arn)
        if what(hist):
            return hist
        assert time.monotonic() < deadline, f"{arn}: condition not reached in {timeout}s: {hist.entered()}"
        time.sleep(0.3)


def stop_loop(sfn, env: Variant, case: str, enough) -> History:
    """Starts a looping execution and stops it once enough(history) holds.

    Returns the history that satisfied enough(): LocalStack 4.8.1 sometimes
    ends a stopped mocked execution FAILED instead of ABORTED (the task it is
    evaluating at the stop loses its mock and invokes the absent Lambda
    service), and the events after the stop are not what this test checks.
    """
    arn = start(sfn, env, case)
    hist = wait_for(sfn, arn, enough)
    sfn.stop_execution(executionArn=arn, error="TestStop", cause="seen the rounds this test checks")
    desc = wait_done(sfn, arn)
    assert desc["status"] in ("ABORTED", "FAILED"), desc
    return hist


def test_rounds_advance(sfn, aws_variant):
    """Rounds 1, 2, 3, each handed over and closed: the round number, the
    carried hand-over and result and the scratch `next` (one execution cannot
    also reach Finalize: see the module docstring)."""
    env, case = aws_variant, "rounds_loop"
    # Round 4 entered: rounds 1 to 3 have gone all the way round.
    hist = stop_loop(sfn, env, case, lambda h: len(h.inputs("StartRound")) >= 4)
    job_input = env.job_inputs[case]
    ho = handover(job_input["job_id"], 1)  # the same answer every round
    result = round_result(job_input["job_id"], 1, True, closed_by="stream")

    calls = hist.start_round_calls()
    assert len(calls) >= 3
    tokens = [check_start_round_call(c, env, case, rnd)["context"]["Task"]["Token"]
              for rnd, c in zip((1, 2, 3), calls[:3])]
    assert len(set(tokens)) == 3, f"a new task token every round: {tokens}"
    closes = hist.direct_calls("CloseRound")
    for rnd, close in zip((1, 2, 3), closes[:3]):
        check_direct_call(close, env, case, "CloseRound", rnd, closed_by="stream")

    inputs = hist.inputs("StartRound")
    assert inputs[0] == {**job_input, "round": 1}
    for rnd in (2, 3):
        # The last round's hand-over and result stay in the state (not in
        # the payload); NextRound's scratch `next` stays too.
        assert inputs[rnd - 1] == {**job_input, "round": rnd, "handover": ho, "result": result, "next": {"round": rnd}}
    assert [o["next"] for o in hist.outputs("NextRound")[:2]] == [{"round": 2}, {"round": 3}]
    assert [o["round"] for o in hist.outputs("AdvanceRound")[:2]] == [2, 3]
    loop = round_states("stream") + ["NextRound", "AdvanceRound"]
    assert hist.entered()[:1 + 3 * len(loop)] == ["Init"] + loop * 3
    assert "DeadlinePassed" not in hist.entered() and "Finalize" not in hist.entered()


def test_timeout_then_next_round(sfn, aws_variant):
    """A timed-out round that CloseRound closes with continue=true loops on to
    StartRound of round 2 (which times out too: one answer per state)."""
    env, case = aws_variant, "timeout_loop"
    hist = stop_loop(sfn, env, case, lambda h: len(h.outputs("CloseRound")) >= 2)
    closes = hist.direct_calls("CloseRound")
    assert len(closes) >= 2
    for rnd, close in zip((1, 2), closes):
        check_direct_call(close, env, case, "CloseRound", rnd, closed_by="deadline")
    starts = hist.inputs("StartRound")
    assert [i["round"] for i in starts[:2]] == [1, 2]
    # Round 1's marker is still in the state when round 2 starts; round 2's
    # DeadlinePassed writes it again.
    assert starts[1]["handover"] == DEADLINE
    loop = round_states("deadline") + ["NextRound", "AdvanceRound"]
    assert hist.entered()[:len(loop) + 4] == ["Init"] + loop + round_states("deadline")[:3]


@pytest.mark.parametrize("case, state, closed_by", [
    ("start_round_retried", "StartRound", "stream"),
    ("close_round_retried", "CloseRound", "deadline"),
    ("close_round_retried_stream", "CloseRound", "stream"),
    ("finalize_retried", "Finalize", "stream"),
])
def test_lambda_service_errors_are_retried(sfn, aws_variant, case, state, closed_by):
    """Each of Lambda's transient service errors once: 1 + 4 attempts, then
    success; CloseRound's on both ways into it."""
    env = aws_variant
    desc, hist = finished(sfn, env, case)
    assert desc["status"] == "SUCCEEDED", desc
    assert hist.entered() == ["Init"] + round_states(closed_by) + ["Finalize", "Succeeded"]
    errors = [e for e, _ in hist.failures(state)]
    expected = sorted(LAMBDA_SERVICE_ERRORS, reverse=state == "CloseRound")
    assert errors == expected
    assert len(expected) == LAMBDA_RETRIES  # the retrier's whole allowance is used
    calls = hist.start_round_calls() if state == "StartRound" else hist.direct_calls(state)
    assert len(calls) == 1 + LAMBDA_RETRIES
    rnd = 1
    entered_time = set()
    for attempt, call in enumerate(calls):
        if state == "StartRound":
            payload = check_start_round_call(call, env, case, rnd, retry_count=attempt)
        else:
            payload = check_direct_call(call, env, case, state, rnd, retry_count=attempt,
                                        closed_by=closed_by if state == "CloseRound" else None)
        entered_time.add(payload["context"]["State"]["EnteredTime"])
    # A retry does not re-enter the state.
    assert len(entered_time) == 1
    assert hist.entered().count(state) == 1
    if closed_by == "deadline":
        check_timed_out_start_round(hist)
    else:
        check_handed_over(hist, env, case)
    assert json.loads(desc["output"])["result"]["closed_by"] == closed_by


def test_lambda_service_errors_exhaust_their_retrier(sfn, aws_variant):
    env, case = aws_variant, "lambda_retries_exhausted"
    desc, hist = finished(sfn, env, case)
    assert desc["status"] == "FAILED", desc
    assert desc["error"] == "Lambda.ServiceException"
    assert len(hist.start_round_calls()) == 1 + LAMBDA_RETRIES
    assert hist.entered() == ["Init", "StartRound", "Failed"]
    # Catch put the error in $.error; Failed reports it.
    (failed_input,) = hist.inputs("Failed")
    assert failed_input["error"] == {"Error": desc["error"], "Cause": desc["cause"]}


@pytest.mark.parametrize("case, closed_by", [
    ("function_errors_retried", "deadline"),
    ("function_errors_retried_stream", "stream"),
])
def test_function_errors_are_retried_by_name(sfn, aws_variant, case, closed_by):
    """Transient and AggregatorError, raised by the function (errorType), each
    retried by its own retrier; then CloseRound's result is used. After the
    deadline and after a hand-over."""
    env = aws_variant
    desc, hist = finished(sfn, env, case)
    assert desc["status"] == "SUCCEEDED", desc
    if closed_by == "deadline":
        check_timed_out_start_round(hist)
    else:
        check_handed_over(hist, env, case)
    failures = hist.failures("CloseRound")
    assert [e for e, _ in failures] == ["Transient", "AggregatorError"]
    # The Cause is the function's error payload.
    assert json.loads(failures[0][1]) == {
        "errorType": "Transient", "errorMessage": "DynamoDB UpdateItem: ThrottlingException",
    }
    calls = hist.direct_calls("CloseRound")
    assert len(calls) == 3
    for attempt, call in enumerate(calls):
        check_direct_call(call, env, case, "CloseRound", 1, retry_count=attempt, closed_by=closed_by)
    assert json.loads(desc["output"])["result"]["closed_by"] == closed_by
    assert hist.entered() == ["Init"] + round_states(closed_by) + ["Finalize", "Succeeded"]


def test_aggregator_error_exhausts_its_retrier(sfn, aws_variant):
    env, case = aws_variant, "aggregator_error_exhausted"
    desc, hist = finished(sfn, env, case)
    assert desc["status"] == "FAILED", desc
    assert desc["error"] == "AggregatorError"
    assert json.loads(desc["cause"]) == {"errorType": "AggregatorError", "errorMessage": "AccessDenied on PutObject"}
    assert len(hist.direct_calls("Finalize")) == 1 + AGGREGATOR_RETRIES
    assert hist.entered() == ["Init"] + round_states("stream") + ["Finalize", "Failed"]


@pytest.mark.parametrize("state, error, closed_by", permanent_error_cases())
def test_permanent_error_fails_at_once(sfn, aws_variant, state, error, closed_by):
    env, case = aws_variant, permanent_case(state, error, closed_by)
    desc, hist = finished(sfn, env, case)
    assert desc["status"] == "FAILED", desc
    message = f"{error}: mocked {state} failure"
    assert desc["error"] == error
    # Function error: the Cause is the error payload, so it contains the message.
    assert json.loads(desc["cause"]) == {"errorType": error, "errorMessage": message}
    calls = hist.start_round_calls() if state == "StartRound" else hist.direct_calls(state)
    assert len(calls) == 1, "a permanent error must not be retried"
    assert hist.failures(state) == [(desc["error"], desc["cause"])]
    before = {"StartRound": [], "CloseRound": round_states(closed_by)[:-2],
              "Finalize": round_states(closed_by or "stream")}[state]
    assert hist.entered() == ["Init"] + before + [state, "Failed"]
    (failed_input,) = hist.inputs("Failed")
    assert failed_input["error"] == {"Error": error, "Cause": desc["cause"]}
    if closed_by == "deadline":
        check_timed_out_start_round(hist)
    elif closed_by == "stream":
        check_handed_over(hist, env, case)
    if state == "CloseRound":
        check_direct_call(hist.direct_calls("CloseRound")[0], env, case, "CloseRound", 1, closed_by=closed_by)


@pytest.mark.parametrize("case, closed_by", [
    ("bad_result_empty", "stream"),
    ("bad_result_string", "stream"),
    ("bad_result_deadline", "deadline"),
])
def test_result_without_boolean_continue_fails(sfn, aws_variant, case, closed_by):
    """CloseRound's result decides, whichever way it was reached."""
    env = aws_variant
    desc, hist = finished(sfn, env, case)
    assert desc["status"] == "FAILED", desc
    assert desc["error"] == "FedstepContractViolation"
    assert desc["cause"] == BAD_RESULT_CAUSE
    assert hist.entered() == ["Init"] + round_states(closed_by) + ["BadResult"]
