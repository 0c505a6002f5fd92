"""The AWS variant of statemachine/federated_training.asl.json, executed on LocalStack.

On AWS every task invokes the aggregator Lambda: StartRound through the
lambda:invoke.waitForTaskToken integration, every other task (PlanRound,
the Maps' ShardStatisticsTask and AggregateShardTask, DecideRound,
CommitRound, Finalize, ReportFailure) through the function ARN directly (the legacy form:
the task's output is the function's return value). The placeholder values come from
statemachine/aws-substitutions.json, the table the CDK app's
definitionSubstitutions is held to (infra/test/stack.test.ts).

Lambdas cannot run on the emulators (no Docker), so the invocations are
answered by LocalStack's mocked service integrations: scripts/emulators.sh
starts LocalStack with SFN_MOCK_CONFIG naming a file this module writes, and
an execution started as `<state machine ARN>#<test case>` takes the listed
states' answers from it instead of invoking anything. Parameters, the
context object, TimeoutSecondsPath, Retry, Catch, ResultPath, Choice, the
Maps (ItemsPath, ItemSelector, MaxConcurrencyPath) and the round loop are
LocalStack's interpreter running the deployed definition.

What a mocked answer stands for (LocalStack 4.8.1, read in its source and
checked here; statemachine/README.md, "The AWS variant on the emulators"):

- StartRound: a Return is the task's output at once, i.e. what the stream
  path's SendTaskSuccess (the hand-over) would deliver on AWS. The task
  token is still generated into the context object, but nothing waits for
  a callback.
- The direct-ARN tasks: a Return is the Lambda Invoke response
  {StatusCode, Payload[, FunctionError]}; LocalStack passes Payload on, and
  turns a FunctionError payload {errorType, errorMessage} into Error =
  errorType, Cause = that JSON, as for a real function error.
- Lambda service errors (Lambda.ServiceException, ...) are Throws.
- The answer is chosen by the state's RetryCount, which every entry of the
  state resets: all rounds of one execution get the same answer, and so do
  all iterations of a Map (each counts its own retries). A run of several
  rounds, or a commit answering replan, therefore loops until it is
  stopped; the loop tests stop it once they have seen what they check.
- StartRound's States.Timeout cannot be mocked (a Throw may not use a
  States.* name, and a mocked callback task never waits). It comes from
  round_timeout_seconds = 0, which LocalStack accepts (AWS would reject it
  as a TimeoutSecondsPath value): the timeout fires when the task starts,
  and DeadlinePassed (a Pass state, nothing to mock) leads to PlanRound.
  LocalStack evaluates the mock on a thread it waits 0 s for, so a mock
  that finishes within the thread's first slice of the GIL wins instead
  (seen once the JSONPath parser tables made evaluation fast). That answer
  is padded so that copying it outlasts the slice (one race in six starts
  without the padding under a build's load, none in a dozen with it), and
  start() stops an execution that still lost the race and starts the case
  again, judged by the states it entered.

The executions that end by themselves are started together by one module
fixture (their retry backoff is spent asleep), so the module takes about as
long as the slowest of them, or as LocalStack needs to run them all: it
works on one core, and LocalStack 4.8.1 builds a new JSONPath parser for
every path it evaluates (about 30 ms of CPU each), so every Map iteration
costs it a few hundred milliseconds. Hence one shard in most cases.
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
from test_contract import (
    DEADLINE, TASK_FIELDS, handover, most_outstanding, plan, replan, round_result, round_states,
)

ROOT = Path(__file__).resolve().parents[2]
ASL_TEXT = (ROOT / "statemachine" / "federated_training.asl.json").read_text()

# Where scripts/emulators.sh tells LocalStack to look (`emulators.sh env`).
MOCK_CONFIG = Path(
    os.environ.get("FEDSTEP_SFN_MOCK_CONFIG")
    or Path(os.environ.get("FEDSTEP_EMU_DIR") or ROOT / ".emu").resolve() / "sfn-mock-config.json"
)

ROUND_TIMEOUT = 30  # round_timeout_seconds where StartRound answers (a mock never waits)
DIRECT_TIMEOUT = STATES["PlanRound"]["TimeoutSeconds"]  # 960, every direct-ARN task's
LAMBDA_RETRIES = next(r for r in STATES["StartRound"]["Retry"] if "Lambda.ServiceException" in r["ErrorEquals"])[
    "MaxAttempts"
]
AGGREGATOR_RETRIES = next(r for r in STATES["Finalize"]["Retry"] if r["ErrorEquals"] == ["AggregatorError"])[
    "MaxAttempts"
]
BAD_RESULT_CAUSE = STATES["BadResult"]["Result"]["Cause"]


# --- mocked answers -----------------------------------------------------------


def callback(output) -> dict:
    """StartRound: what SendTaskSuccess would deliver (the hand-over)."""
    return {"Return": output}


def returns(payload) -> dict:
    """A direct-ARN task: the Invoke response of a function that returned `payload`."""
    return {"Return": {"StatusCode": 200, "Payload": payload}}


def function_error(error_type: str, message: str) -> dict:
    """A direct-ARN task: the Invoke response of a function that failed.

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


def notified(job_id: str) -> dict:
    """What report_failure returns (ReportFailure drops it: ResultPath null)."""
    return {"job_id": job_id, "round": 1, "notified": True}


# --- the test cases -----------------------------------------------------------

# What the Maps' tasks and DecideRound return: small objects the workflow ignores.
SHARD_DONE = {"shard_done": True, "bytes_read": 1024}
DECIDED = {"decided": True}
# The plan most cases run: no statistics pass, one shard. Every Map
# iteration costs LocalStack time, and all the batch's executions share it:
# only the cases about the Maps run more shards.
DEFAULT_PLAN = plan("a1", shards=1, statistics=False, concurrency=1)
TWO_SHARDS = plan("a1", shards=2, statistics=False, concurrency=2)


@dataclass
class Case:
    """One mocked execution: the answers per state (attempt 0, 1, ...) and the input."""

    states: dict[str, list[dict]]
    input: dict = field(default_factory=dict)
    # Started by the module fixture (runs to its end by itself); False: the
    # test starts it and stops it (the round loops).
    batch: bool = True
    plan: dict = field(default_factory=lambda: DEFAULT_PLAN)
    closed_by: str = "stream"


def attempt_answers(the_plan: dict, commit: dict) -> dict[str, list[dict]]:
    """PlanRound answering `the_plan`, and the tasks that plan leads to."""
    states = {"PlanRound": [returns(the_plan)]}
    if "closed" in the_plan:
        return states  # no Map, no commit: a mocked answer there would go unused
    if the_plan["statistics"]:
        states["ShardStatisticsTask"] = [returns(SHARD_DONE)]
        states["DecideRound"] = [returns(DECIDED)]
    states["AggregateShardTask"] = [returns(SHARD_DONE)]
    states["CommitRound"] = [returns(commit)]
    return states


def cases(prefix: str) -> dict[str, Case]:
    def rr(case: str, rnd: int, cont, closed_by: str = "stream", **extra) -> dict:
        return round_result(job_id_of(prefix, case), rnd, cont, closed_by=closed_by, **extra)

    def ho(case: str, rnd: int = 1) -> list[dict]:
        """StartRound answered with the stream path's hand-over."""
        return [callback(handover(job_id_of(prefix, case), rnd))]

    def final(case: str) -> dict:
        job = job_id_of(prefix, case)
        return {"job_id": job, "artifact_id": f"{job}-model", "final_model_key": f"jobs/{job}/final.safetensors"}

    # StartRound's answer where the round times out: never used (the timeout
    # fires first); if it were, PlanRound's closed_by would show its marker.
    # LocalStack deep-copies a Return on the thread its zero timeout races
    # (see start()): the padding (~60 KB of JSON, ~30 ms of copying) keeps
    # that thread busy past the interpreter's 5 ms switch interval, so the
    # timeout nearly always fires first even on a loaded machine.
    not_used = [callback({"closed_by": "not-a-timeout", "continue": True, "padding": [{}] * 20_000})]

    def case(name: str, closed_by: str = "stream", the_plan: dict = DEFAULT_PLAN, commit: dict | None = None,
             finalize: bool = True, answers: dict | None = None, extra_input: dict | None = None,
             batch: bool = True, fails: bool = False) -> Case:
        """A round handed over (or timed out: round_timeout_seconds 0), planned
        with `the_plan`, committed with `commit` (default: a result with
        continue=false), finalized; `fails`: the execution fails, so
        ReportFailure runs and answers that the clients were told;
        `answers` replaces the answers of single states."""
        states = {"StartRound": ho(name) if closed_by == "stream" else not_used}
        states.update(attempt_answers(the_plan, rr(name, 1, False, closed_by) if commit is None else commit))
        if finalize:
            states["Finalize"] = [returns(final(name))]
        if fails:
            states["ReportFailure"] = [returns(notified(job_id_of(prefix, name)))]
        states.update(answers or {})
        job_input = {**({"round_timeout_seconds": 0} if closed_by == "deadline" else {}), **(extra_input or {})}
        return Case(states, job_input, batch, the_plan, closed_by)

    def service_errors(reverse: bool = False) -> list[dict]:
        """Every Lambda service error once: one retrier's whole allowance (4 retries)."""
        return [service_error(e) for e in sorted(LAMBDA_SERVICE_ERRORS, reverse=reverse)]

    def function_errors() -> list[dict]:
        """The aggregator's own retried errors, as function errors of the
        direct form: errorType becomes the error name the retriers match."""
        return [function_error("Transient", "DynamoDB UpdateItem: ThrottlingException"),
                function_error("AggregatorError", "model read broke off")]

    with_statistics = plan("a1", shards=3, statistics=True, concurrency=2)
    one_shard = plan("a1", shards=1, statistics=True, concurrency=1)
    out = {
        # The statistics path: 3 shards, 2 at a time.
        "one_round": case("one_round", the_plan=with_statistics),
        # The no-statistics path, after the deadline.
        "timeout_close_finalize": case("timeout_close_finalize", "deadline", extra_input={"min_clients": 2}),
        # The plan finds the round closed: its stored result, no Map.
        "already_closed": case("already_closed", the_plan={"closed": rr("already_closed", 1, False)}),
        "start_round_retried": case("start_round_retried",
                                    answers={"StartRound": service_errors() + ho("start_round_retried")}),
        "plan_round_retried": case("plan_round_retried", "deadline", answers={
            "PlanRound": service_errors(reverse=True) + [returns(DEFAULT_PLAN)]}),
        "commit_round_retried_stream": case("commit_round_retried_stream", answers={
            "CommitRound": service_errors(reverse=True) + [returns(rr("commit_round_retried_stream", 1, False))]}),
        # Every iteration gets the same answers: each shard retried on its own.
        "shard_retried": case("shard_retried", the_plan=TWO_SHARDS, answers={
            "AggregateShardTask": service_errors() + [returns(SHARD_DONE)]}),
        "finalize_retried": case("finalize_retried", answers={
            "Finalize": service_errors() + [returns(final("finalize_retried"))]}),
        # One service error more than the retrier allows; the answer after it
        # would succeed, so a retry too many shows as SUCCEEDED.
        "lambda_retries_exhausted": case("lambda_retries_exhausted", fails=True, answers={
            "StartRound": [service_error("Lambda.ServiceException")] * (LAMBDA_RETRIES + 1)
            + ho("lambda_retries_exhausted")}),
        "aggregator_error_exhausted": case("aggregator_error_exhausted", fails=True, answers={
            "Finalize": [function_error("AggregatorError", "AccessDenied on PutObject")] * (AGGREGATOR_RETRIES + 1)
            + [returns(final("aggregator_error_exhausted"))]}),
        # The same inside a Map: the iteration's retries run out, the Map fails.
        "shard_aggregator_error_exhausted": case("shard_aggregator_error_exhausted", the_plan=one_shard, fails=True,
                                                 answers={
            "ShardStatisticsTask": [function_error("AggregatorError", "AccessDenied on GetObject")]
            * (AGGREGATOR_RETRIES + 1) + [returns(SHARD_DONE)]}),
        # The round's result decides, after a hand-over or the deadline,
        # from CommitRound or from a closed plan.
        "bad_result_empty": case("bad_result_empty", finalize=False, fails=True,
                                 commit={"job_id": job_id_of(prefix, "bad_result_empty"), "round": 1}),
        "bad_result_string": case("bad_result_string", commit=rr("bad_result_string", 1, "yes"), finalize=False,
                                  fails=True),
        "bad_result_deadline": case("bad_result_deadline", "deadline", finalize=False, fails=True,
                                    commit={"job_id": job_id_of(prefix, "bad_result_deadline"), "round": 1}),
        "bad_result_closed": case("bad_result_closed", finalize=False, fails=True, the_plan={
            "closed": {"job_id": job_id_of(prefix, "bad_result_closed"), "round": 1}}),
        # A hand-over without closed_by: PlanRound's "closed_by.$" path is
        # missing. PlanRound's answer would succeed, so an invocation shows.
        "handover_without_closed_by": case("handover_without_closed_by", fails=True, answers={
            "StartRound": [callback({k: v for k, v in handover(job_id_of(prefix, "handover_without_closed_by"), 1)
                                     .items() if k != "closed_by"})]}),
        # The round loops (see the module docstring): stopped by their tests.
        "rounds_loop": case("rounds_loop", commit=rr("rounds_loop", 1, True), finalize=False, batch=False),
        "timeout_loop": case("timeout_loop", "deadline", commit=rr("timeout_loop", 1, True, "deadline"),
                             finalize=False, batch=False),
        "replan_loop": case("replan_loop", the_plan=plan("a1", shards=1), finalize=False, batch=False,
                            commit=replan(**{"site-b": "non-finite value in tensor fc1.weight"})),
        # Transient, then AggregatorError, then success: each retried by its
        # own retrier; on PlanRound after the deadline, on CommitRound after
        # a hand-over, and on a Map's task (each shard on its own).
        "function_errors_retried": case("function_errors_retried", "deadline", answers={
            "PlanRound": function_errors() + [returns(DEFAULT_PLAN)]}),
        "function_errors_retried_stream": case("function_errors_retried_stream", answers={
            "CommitRound": function_errors() + [returns(rr("function_errors_retried_stream", 1, False))]}),
        "function_errors_retried_shard": case("function_errors_retried_shard", the_plan=TWO_SHARDS, answers={
            "AggregateShardTask": function_errors() + [returns(SHARD_DONE)]}),
    }
    # A permanent error fails the execution at the first attempt; the answer
    # after it would succeed, so a retry shows as SUCCEEDED.
    for state, error, closed_by in permanent_error_cases():
        name = permanent_case(state, error, closed_by)
        message = f"{error}: mocked {state} failure"
        if state == "StartRound":
            # Through the callback integration only a Throw can be mocked:
            # here the Error/Cause of a failed invocation (a SendTaskFailure
            # to the token would look the same, with its own cause).
            answers = [throw(error, lambda_error_cause(error, message))] + ho(name)
        else:
            ok = {"PlanRound": returns(PERMANENT_PLAN), "ShardStatisticsTask": returns(SHARD_DONE),
                  "DecideRound": returns(DECIDED), "AggregateShardTask": returns(SHARD_DONE),
                  "CommitRound": returns(rr(name, 1, False, closed_by or "stream")),
                  "Finalize": returns(final(name))}[state]
            answers = [function_error(error, message), ok]
        out[name] = case(name, closed_by or "stream", the_plan=PERMANENT_PLAN, fails=True, answers={state: answers})
    # ReportFailure itself failing: permanently (NotFound, not retried; the
    # answer after it would succeed), or once with a Lambda service error
    # (retried). Either way the execution fails with the original error.
    # The first after CommitRound's error, the second after StartRound's.
    out["report_failure_fails"] = case("report_failure_fails", answers={
        "CommitRound": [function_error("AggregationFailed", REPORTED_MESSAGE),
                        returns(rr("report_failure_fails", 1, False))],
        "ReportFailure": [function_error("NotFound", REPORT_FAILURE_MESSAGE),
                          returns(notified(job_id_of(prefix, "report_failure_fails")))],
    })
    out["report_failure_retried"] = case("report_failure_retried", answers={
        "StartRound": [throw("InvalidTaskInput", lambda_error_cause("InvalidTaskInput", REPORTED_MESSAGE))]
        + ho("report_failure_retried"),
        "ReportFailure": [service_error("Lambda.TooManyRequestsException"),
                          returns(notified(job_id_of(prefix, "report_failure_retried")))],
    })
    return out


# The report_failure_* cases: the original error's message, and ReportFailure's own.
REPORTED_MESSAGE = "mocked failure before ReportFailure"
REPORT_FAILURE_MESSAGE = "job not found: mocked ReportFailure failure"


# One shard, with the statistics pass: every task state runs once per attempt,
# so a permanent error is invoked exactly once wherever it is raised.
PERMANENT_PLAN = plan("a1", shards=1, statistics=True, concurrency=1)


def permanent_error_cases() -> list[tuple[str, str, str | None]]:
    """(state, error, closed_by): every permanent error name as a PlanRound
    function error after a hand-over (the plan claims the round and checks
    its inputs: the realistic place for most of them), QuorumNotMet also
    after the deadline (where it really happens), one from inside a Map,
    plus StartRound (a bad task input; a retried StartRound on a FAILED
    round) and Finalize. Every task has the same retriers (test_asl.py), so
    the names need not be repeated on every task; the activity variant
    fails the other tasks of the round (test_contract.py)."""
    return [("PlanRound", e, "stream") for e in sorted(PERMANENT_ERRORS)] + [
        ("PlanRound", "QuorumNotMet", "deadline"),
        ("ShardStatisticsTask", "InvalidTaskInput", "stream"),
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


# A deadline case whose mocked StartRound answer beat its zero timeout is
# started again, at most this many times in all (see start()). The padding
# of its answer makes a lost race rare; CI once saw five in a row on a
# loaded machine before the padding, so the allowance is generous.
DEADLINE_STARTS = 20


def start(sfn, env: Variant, case: str) -> str:
    job_input = {"job_id": job_id_of(env.prefix, case), "rounds": 3, "round_timeout_seconds": ROUND_TIMEOUT}
    job_input.update(env.cases[case].input)
    for _ in range(DEADLINE_STARTS):
        arn = sfn.start_execution(
            stateMachineArn=f"{env.sm_arn}#{case}",
            name=f"{case}-{uuid.uuid4().hex[:6]}",
            input=json.dumps(job_input),
        )["executionArn"]
        # LocalStack runs the mocked callback on a thread and then waits
        # TimeoutSeconds (here 0) for it: a mock evaluated within the
        # thread's first GIL slice answers before the timeout fires. That
        # is LocalStack's race, not the workflow's (on AWS a callback
        # waits for its token), so such an execution is stopped and the
        # case started again; every check still reads the timed-out one.
        if job_input["round_timeout_seconds"] != 0 or deadline_passed(sfn, arn):
            break
        sfn.stop_execution(executionArn=arn, cause="mocked StartRound beat its zero timeout")
    env.job_inputs[case] = job_input
    env.started[case] = arn
    return arn


def deadline_passed(sfn, arn: str, timeout: float = 30) -> bool:
    """Whether execution `arn` left its first StartRound through the
    deadline (waits until it has left it). Decided by the states entered,
    which is what the tests assert: DeadlinePassed before PlanRound."""
    deadline = time.monotonic() + timeout
    while True:
        running = sfn.describe_execution(executionArn=arn)["status"] == "RUNNING"
        entered = History.of(sfn, arn).entered()
        if "DeadlinePassed" in entered:
            return True
        if "PlanRound" in entered or not running:
            return False
        assert time.monotonic() < deadline, f"{arn}: StartRound did not end in {timeout}s"
        time.sleep(0.1)


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
            "PlanRound": [returns({"closed": {"continue": False}})],
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
            # A state's own entered and exited events name it; following
            # previousEventId from a Map's exit would lead into its last
            # iteration's inner state.
            named = ev.get("stateEnteredEventDetails") or ev.get("stateExitedEventDetails")
            self.state_of[ev["id"]] = named["name"] if named else self.state_of.get(ev.get("previousEventId"))

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


# The action of each direct-ARN task state (test_contract.TASK_FIELDS maps
# actions to their states and fields).
ACTION_OF = {state: action for action, (state, _) in TASK_FIELDS.items()} | {"Finalize": "finalize"}


def check_direct_call(call: dict, env: Variant, case: str, state: str, rnd: int, retry_count: int = 0,
                      **fields) -> dict:
    """The event a direct-ARN task invokes the function with: exactly
    action, job_id, round, context and the action's own fields (PlanRound's
    and CommitRound's closed_by is required: pass it; the plan's attempt
    where the task has one)."""
    assert call["resource"] == env.function_arn
    assert call["timeoutInSeconds"] == DIRECT_TIMEOUT
    event = call["input"]
    action = ACTION_OF[state]
    own = TASK_FIELDS[action][1] if action in TASK_FIELDS else {"result"}
    assert set(event) == {"action", "job_id", "round", "context"} | own, event
    assert event["action"] == action
    assert event["job_id"] == env.job_inputs[case]["job_id"]
    assert event["round"] == rnd
    if "closed_by" in own:
        # The caller says which hand-over the task must carry; the mock's
        # answer ("not-a-timeout") is one of them when a zero timeout loses
        # the race (test_timeout_then_next_round).
        assert "closed_by" in fields, "pass the closed_by the task must carry"
    if "attempt" in own and "attempt" not in fields:
        fields["attempt"] = env.cases[case].plan["attempt"]
    for key, value in fields.items():
        assert event[key] == value, (key, event)
    check_context(event["context"], env, case, state, retry_count)
    return event


def check_shard_calls(hist: History, env: Variant, case: str, state: str, rnd: int = 1, attempts: int = 1) -> None:
    """A Map's task ran once per shard of the plan (`attempts` invocations
    each, retry counts 0, 1, ...), each with the plan's attempt."""
    the_plan = env.cases[case].plan
    calls = hist.direct_calls(state)
    assert len(calls) == attempts * len(the_plan["shards"]), calls
    per_shard: dict[int, list[dict]] = {}
    for call in calls:
        per_shard.setdefault(call["input"]["shard"], []).append(call)
    assert sorted(per_shard) == the_plan["shards"]
    for shard, shard_calls in per_shard.items():
        for attempt, call in enumerate(shard_calls):
            check_direct_call(call, env, case, state, rnd, retry_count=attempt, shard=shard)
        # A retry does not re-enter the iteration's state.
        assert len({c["input"]["context"]["State"]["EnteredTime"] for c in shard_calls}) == 1


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
    # hand-over, no error) and adds the deadline marker for PlanRound.
    assert hist.outputs("StartRound") == [entered]
    assert hist.inputs("DeadlinePassed") == [entered]
    assert hist.outputs("DeadlinePassed") == [{**entered, "handover": DEADLINE}]
    assert hist.inputs("PlanRound")[0] == {**entered, "handover": DEADLINE}


def check_handed_over(hist: History, env: Variant, case: str) -> None:
    """StartRound answered with the hand-over: it lands in $.handover and
    PlanRound runs next, on that state."""
    job_input = env.job_inputs[case]
    (entered,) = hist.inputs("StartRound")
    assert entered == {**job_input, "round": 1}
    after = {**entered, "handover": handover(job_input["job_id"], 1)}
    assert hist.outputs("StartRound") == [after]
    assert hist.inputs("PlanRound")[0] == after
    assert "DeadlinePassed" not in hist.entered()


def check_way_in(hist: History, env: Variant, case: str) -> None:
    if env.cases[case].closed_by == "deadline":
        check_timed_out_start_round(hist)
    else:
        check_handed_over(hist, env, case)


def states_of(env: Variant, case: str) -> list[str]:
    """The states of the case's one round, up to ShouldContinue."""
    return round_states(env.cases[case].closed_by, env.cases[case].plan)


def check_reported(hist: History, env: Variant, case: str, desc: dict, retries: int = 0,
                   report_error: dict | None = None) -> dict:
    """A failed execution ran ReportFailure once, right before Failed: the
    function invoked (1 + `retries` times) with exactly action, job_id,
    round, context and error = the caught {Error, Cause}, which is what the
    execution failed with. Its answer is dropped (ResultPath null), so
    Failed gets ReportFailure's input; or, if it failed for good
    (`report_error`), that input plus its own error in $.report_error.
    Returns ReportFailure's state input."""
    error = {"Error": desc["error"], "Cause": desc["cause"]}
    entered = hist.entered()
    assert entered[-2:] == ["ReportFailure", "Failed"] and entered.count("ReportFailure") == 1, entered
    calls = hist.direct_calls("ReportFailure")
    assert len(calls) == 1 + retries, calls
    events = [check_direct_call(call, env, case, "ReportFailure", 1, retry_count=i, error=error)
              for i, call in enumerate(calls)]
    # A retry does not re-enter the state.
    assert len({e["context"]["State"]["EnteredTime"] for e in events}) == 1
    (report_in,) = hist.inputs("ReportFailure")
    assert report_in["error"] == error and "report_error" not in report_in
    (failed_in,) = hist.inputs("Failed")
    if report_error is None:
        assert len(hist.failures("ReportFailure")) == retries
        assert failed_in == report_in
    else:
        assert hist.failures("ReportFailure")[-1] == (report_error["Error"], report_error["Cause"])
        assert failed_in == {**report_in, "report_error": report_error}
    return report_in


# --- the tests -----------------------------------------------------------------------------


def test_one_round_then_finalize(sfn, aws_variant):
    """The statistics path, 3 shards at most 2 at a time: every task's event,
    where each output lands, and the execution's output."""
    env, case = aws_variant, "one_round"
    desc, hist = finished(sfn, env, case)
    assert desc["status"] == "SUCCEEDED", desc
    assert hist.entered() == ["Init"] + states_of(env, case) + ["Finalize", "Succeeded"]
    job_input = env.job_inputs[case]
    the_plan = env.cases[case].plan
    ho = handover(job_input["job_id"], 1)
    result = round_result(job_input["job_id"], 1, False, closed_by="stream")

    (call,) = hist.start_round_calls()
    check_start_round_call(call, env, case, 1)
    # The callback's output (the hand-over) lands in $.handover; the rest of
    # the state is kept.
    check_handed_over(hist, env, case)

    (plan_call,) = hist.direct_calls("PlanRound")
    check_direct_call(plan_call, env, case, "PlanRound", 1, closed_by="stream")
    # The direct form's output is the function's return value (the Invoke
    # response's Payload), kept as $.plan next to the hand-over.
    planned = {**job_input, "round": 1, "handover": ho, "plan": the_plan}
    assert hist.outputs("PlanRound") == [planned]

    # Every shard once per Map, with the plan's attempt; neither the Maps
    # nor DecideRound change the state (ResultPath null).
    check_shard_calls(hist, env, case, "ShardStatisticsTask")
    (decide,) = hist.direct_calls("DecideRound")
    check_direct_call(decide, env, case, "DecideRound", 1)
    check_shard_calls(hist, env, case, "AggregateShardTask")
    for state in ("ShardStatistics", "DecideRound", "AggregateShards"):
        assert hist.inputs(state) == [planned] and hist.outputs(state) == [planned], state
    # The plan's concurrency is a limit (mocked answers come at once, so
    # whether two ran together is up to the timing; test_contract.py checks
    # that they do).
    for map_state, task in (("ShardStatistics", "ShardStatisticsTask"), ("AggregateShards", "AggregateShardTask")):
        (most,) = most_outstanding(hist.events, map_state, task)
        assert 1 <= most <= the_plan["concurrency"], (map_state, most)

    (commit,) = hist.direct_calls("CommitRound")
    check_direct_call(commit, env, case, "CommitRound", 1, closed_by="stream")
    assert hist.outputs("CommitRound") == [{**planned, "result": result}]

    (fin,) = hist.direct_calls("Finalize")
    event = check_direct_call(fin, env, case, "Finalize", 1)
    assert event["result"] == result
    final = {"job_id": job_input["job_id"], "artifact_id": f"{job_input['job_id']}-model",
             "final_model_key": f"jobs/{job_input['job_id']}/final.safetensors"}
    assert hist.outputs("Finalize") == [{**planned, "result": result, "final": final}]
    assert json.loads(desc["output"]) == {**planned, "result": result, "final": final}


def test_timeout_closes_round(sfn, aws_variant):
    """After the deadline, the no-statistics path: PlanRound and CommitRound
    get closed_by=deadline, AggregateShards runs every shard."""
    env, case = aws_variant, "timeout_close_finalize"
    desc, hist = finished(sfn, env, case)
    assert desc["status"] == "SUCCEEDED", desc
    assert hist.entered() == ["Init"] + states_of(env, case) + ["Finalize", "Succeeded"]
    assert "ShardStatistics" not in hist.entered() and "DecideRound" not in hist.entered()
    check_timed_out_start_round(hist)
    job_input = env.job_inputs[case]

    (plan_call,) = hist.direct_calls("PlanRound")
    check_direct_call(plan_call, env, case, "PlanRound", 1, closed_by="deadline")
    check_shard_calls(hist, env, case, "AggregateShardTask")
    (commit,) = hist.direct_calls("CommitRound")
    check_direct_call(commit, env, case, "CommitRound", 1, closed_by="deadline")
    result = round_result(job_input["job_id"], 1, False, closed_by="deadline")
    planned = {**job_input, "round": 1, "handover": DEADLINE, "plan": env.cases[case].plan}
    assert hist.outputs("CommitRound") == [{**planned, "result": result}]
    (fin,) = hist.direct_calls("Finalize")
    assert check_direct_call(fin, env, case, "Finalize", 1)["result"] == result
    out = json.loads(desc["output"])
    assert out["result"] == result and out["round"] == 1 and out["handover"] == DEADLINE and "error" not in out


def test_closed_plan_goes_straight_to_should_continue(sfn, aws_variant):
    """PlanRound finds the round closed (a retry, or a racing attempt won):
    AlreadyClosed copies the stored result to $.result, no Map, no commit."""
    env, case = aws_variant, "already_closed"
    desc, hist = finished(sfn, env, case)
    assert desc["status"] == "SUCCEEDED", desc
    assert hist.entered() == ["Init", "StartRound", "PlanRound", "Planned", "AlreadyClosed", "ShouldContinue",
                              "Finalize", "Succeeded"]
    the_plan = env.cases[case].plan
    (planned,) = hist.outputs("PlanRound")
    assert planned["plan"] == the_plan
    assert hist.outputs("AlreadyClosed") == [{**planned, "result": the_plan["closed"]}]
    (fin,) = hist.direct_calls("Finalize")
    assert check_direct_call(fin, env, case, "Finalize", 1)["result"] == the_plan["closed"]
    for state in ("ShardStatisticsTask", "DecideRound", "AggregateShardTask", "CommitRound"):
        assert hist.direct_calls(state) == [], state


def test_hand_over_without_closed_by_fails_the_execution(sfn, aws_variant):
    """PlanRound's "closed_by.$" path must exist: a hand-over without it
    fails the execution before the function is invoked (its mocked answer
    would succeed), and nothing retries it.

    On AWS that is a States.Runtime error, which States.ALL does not catch:
    the execution fails at PlanRound. LocalStack 4.8.1's direct-ARN Lambda
    task reports it differently: a LambdaFunctionFailed with error
    `Exception` and the JSONPath message as cause, which PlanRound's Catch
    takes to Failed (the activity variant gets States.Runtime, see
    test_contract.py). Asserted: one of the two, the JSONPath message as the
    cause, no invocation, no retry, no Finalize.
    """
    env, case = aws_variant, "handover_without_closed_by"
    desc, hist = finished(sfn, env, case)
    assert desc["status"] == "FAILED", desc
    entered = hist.entered()
    assert entered[:3] == ["Init", "StartRound", "PlanRound"], entered
    if desc["error"] == "Exception":  # LocalStack 4.8.1
        assert entered[3:] == ["ReportFailure", "Failed"], entered
        assert hist.failures("PlanRound") == [("Exception", desc["cause"])]
        check_reported(hist, env, case, desc)
    else:  # AWS
        assert desc["error"] == "States.Runtime", desc
        assert entered[3:] == [], entered
    assert "The JSONPath '$.handover.closed_by' could not be found" in desc["cause"]
    assert hist.direct_calls("PlanRound") == []
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
    """Rounds 1, 2, 3, each handed over, planned, aggregated and committed:
    the round number in every task, the carried hand-over, plan and result
    and the scratch `next` (one execution cannot also reach Finalize: see
    the module docstring)."""
    env, case = aws_variant, "rounds_loop"
    # Round 4 entered: rounds 1 to 3 have gone all the way round.
    hist = stop_loop(sfn, env, case, lambda h: len(h.inputs("StartRound")) >= 4)
    job_input = env.job_inputs[case]
    the_plan = env.cases[case].plan
    ho = handover(job_input["job_id"], 1)  # the same answer every round
    result = round_result(job_input["job_id"], 1, True, closed_by="stream")

    calls = hist.start_round_calls()
    assert len(calls) >= 3
    tokens = [check_start_round_call(c, env, case, rnd)["context"]["Task"]["Token"]
              for rnd, c in zip((1, 2, 3), calls[:3])]
    assert len(set(tokens)) == 3, f"a new task token every round: {tokens}"
    for state, per_round in (("PlanRound", 1), ("AggregateShardTask", len(the_plan["shards"])), ("CommitRound", 1)):
        calls = hist.direct_calls(state)
        assert len(calls) >= 3 * per_round, state
        for i, call in enumerate(calls[:3 * per_round]):
            fields = {"closed_by": "stream"} if state != "AggregateShardTask" else {}
            check_direct_call(call, env, case, state, 1 + i // per_round, **fields)

    inputs = hist.inputs("StartRound")
    assert inputs[0] == {**job_input, "round": 1}
    for rnd in (2, 3):
        # The last round's hand-over, plan and result stay in the state (not
        # in the payload); NextRound's scratch `next` stays too.
        assert inputs[rnd - 1] == {**job_input, "round": rnd, "handover": ho, "plan": the_plan, "result": result,
                                   "next": {"round": rnd}}
    assert [o["next"] for o in hist.outputs("NextRound")[:2]] == [{"round": 2}, {"round": 3}]
    assert [o["round"] for o in hist.outputs("AdvanceRound")[:2]] == [2, 3]
    loop = states_of(env, case) + ["NextRound", "AdvanceRound"]
    assert hist.entered()[:1 + 3 * len(loop)] == ["Init"] + loop * 3
    assert "DeadlinePassed" not in hist.entered() and "Finalize" not in hist.entered()


def test_timeout_then_next_round(sfn, aws_variant):
    """A timed-out round that CommitRound closes with continue=true loops on to
    StartRound of round 2 (which times out too: one answer per state)."""
    env, case = aws_variant, "timeout_loop"
    hist = stop_loop(sfn, env, case, lambda h: len(h.outputs("CommitRound")) >= 2)
    # Round 1 timed out (start() saw to it). Round 2's StartRound races its
    # zero timeout against the mock the same way (see the module doc), and
    # an execution cannot be restarted mid-way: its PlanRound must carry
    # whichever hand-over round 2 got.
    round2 = hist.inputs("PlanRound")[1]["handover"]["closed_by"]
    # Either the timeout's marker or the mock's answer, nothing else.
    assert round2 in ("deadline", "not-a-timeout"), round2
    for state in ("PlanRound", "CommitRound"):
        calls = hist.direct_calls(state)
        assert len(calls) >= 2
        for rnd, call in zip((1, 2), calls):
            check_direct_call(call, env, case, state, rnd, closed_by="deadline" if rnd == 1 else round2)
    starts = hist.inputs("StartRound")
    assert [i["round"] for i in starts[:2]] == [1, 2]
    # Round 1's marker is still in the state when round 2 starts.
    assert starts[1]["handover"] == DEADLINE
    loop = states_of(env, case) + ["NextRound", "AdvanceRound"]
    assert hist.entered()[:len(loop) + 2] == ["Init"] + loop + ["StartRound"]
    if round2 == "deadline":
        assert hist.entered()[len(loop) + 2:len(loop) + 4] == states_of(env, case)[1:3]


def test_replan_goes_back_to_plan_round(sfn, aws_variant):
    """CommitRound answering replan: Committed sends the round back to
    PlanRound, with the same round and hand-over, the replan answer in
    $.result (every entry gets the same mocked answers, so it replans until
    stopped; test_contract.py shows the round going on after a replan)."""
    env, case = aws_variant, "replan_loop"
    hist = stop_loop(sfn, env, case, lambda h: len(h.outputs("CommitRound")) >= 2)
    job_input = env.job_inputs[case]
    the_plan = env.cases[case].plan
    attempt = ["PlanRound", "Planned", "AggregateShards", "AggregateShardTask", "CommitRound", "Committed"]
    assert hist.entered()[:2 + 2 * len(attempt)] == ["Init", "StartRound"] + attempt * 2
    assert "ShouldContinue" not in hist.entered()
    plan_inputs = hist.inputs("PlanRound")
    bad = replan(**{"site-b": "non-finite value in tensor fc1.weight"})
    assert plan_inputs[0] == {**job_input, "round": 1, "handover": handover(job_input["job_id"], 1)}
    assert plan_inputs[1] == {**plan_inputs[0], "plan": the_plan, "result": bad}
    for call in hist.direct_calls("PlanRound")[:2]:
        check_direct_call(call, env, case, "PlanRound", 1, closed_by="stream")


@pytest.mark.parametrize("case, state", [
    ("start_round_retried", "StartRound"),
    ("plan_round_retried", "PlanRound"),
    ("commit_round_retried_stream", "CommitRound"),
    ("shard_retried", "AggregateShardTask"),
    ("finalize_retried", "Finalize"),
])
def test_lambda_service_errors_are_retried(sfn, aws_variant, case, state):
    """Each of Lambda's transient service errors once: 1 + 4 attempts, then
    success; PlanRound after the deadline, CommitRound after a hand-over, a
    Map's task (every shard on its own)."""
    env = aws_variant
    desc, hist = finished(sfn, env, case)
    assert desc["status"] == "SUCCEEDED", desc
    assert hist.entered() == ["Init"] + states_of(env, case) + ["Finalize", "Succeeded"]
    shards = len(env.cases[case].plan["shards"]) if state == "AggregateShardTask" else 1
    expected = sorted(LAMBDA_SERVICE_ERRORS, reverse=state in ("PlanRound", "CommitRound"))
    assert len(expected) == LAMBDA_RETRIES  # the retrier's whole allowance is used
    errors = [e for e, _ in hist.failures(state)]
    assert sorted(errors) == sorted(expected * shards)
    if shards == 1:
        assert errors == expected
    closed_by = env.cases[case].closed_by
    if state == "StartRound":
        calls = hist.start_round_calls()
        assert len(calls) == 1 + LAMBDA_RETRIES
        payloads = [check_start_round_call(call, env, case, 1, retry_count=i) for i, call in enumerate(calls)]
        # A retry does not re-enter the state.
        assert len({p["context"]["State"]["EnteredTime"] for p in payloads}) == 1
    elif state == "AggregateShardTask":
        check_shard_calls(hist, env, case, state, attempts=1 + LAMBDA_RETRIES)
    else:
        calls = hist.direct_calls(state)
        assert len(calls) == 1 + LAMBDA_RETRIES
        fields = {"closed_by": closed_by} if state != "Finalize" else {}
        events = [check_direct_call(call, env, case, state, 1, retry_count=i, **fields) for i, call in enumerate(calls)]
        assert len({e["context"]["State"]["EnteredTime"] for e in events}) == 1
    assert hist.entered().count(state) == shards
    check_way_in(hist, env, case)
    assert json.loads(desc["output"])["result"]["closed_by"] == closed_by


def test_lambda_service_errors_exhaust_their_retrier(sfn, aws_variant):
    env, case = aws_variant, "lambda_retries_exhausted"
    desc, hist = finished(sfn, env, case)
    assert desc["status"] == "FAILED", desc
    assert desc["error"] == "Lambda.ServiceException"
    assert len(hist.start_round_calls()) == 1 + LAMBDA_RETRIES
    assert hist.entered() == ["Init", "StartRound", "ReportFailure", "Failed"]
    # Catch put the error in $.error; ReportFailure gets it, Failed reports it.
    check_reported(hist, env, case, desc)


@pytest.mark.parametrize("case, state", [
    ("function_errors_retried", "PlanRound"),
    ("function_errors_retried_stream", "CommitRound"),
    ("function_errors_retried_shard", "AggregateShardTask"),
])
def test_function_errors_are_retried_by_name(sfn, aws_variant, case, state):
    """Transient and AggregatorError, raised by the function (errorType), each
    retried by its own retrier; then the task's result is used. PlanRound
    after the deadline, CommitRound after a hand-over, a Map's task."""
    env = aws_variant
    desc, hist = finished(sfn, env, case)
    assert desc["status"] == "SUCCEEDED", desc
    check_way_in(hist, env, case)
    shards = len(env.cases[case].plan["shards"]) if state == "AggregateShardTask" else 1
    failures = hist.failures(state)
    assert sorted(e for e, _ in failures) == sorted(["Transient", "AggregatorError"] * shards)
    # The Cause is the function's error payload.
    assert {"errorType": "Transient", "errorMessage": "DynamoDB UpdateItem: ThrottlingException"} in [
        json.loads(cause) for _, cause in failures]
    if state == "AggregateShardTask":
        check_shard_calls(hist, env, case, state, attempts=3)
    else:
        assert [e for e, _ in failures] == ["Transient", "AggregatorError"]
        calls = hist.direct_calls(state)
        assert len(calls) == 3
        for attempt, call in enumerate(calls):
            check_direct_call(call, env, case, state, 1, retry_count=attempt, closed_by=env.cases[case].closed_by)
    assert json.loads(desc["output"])["result"]["closed_by"] == env.cases[case].closed_by
    assert hist.entered() == ["Init"] + states_of(env, case) + ["Finalize", "Succeeded"]


@pytest.mark.parametrize("case, state, message", [
    ("aggregator_error_exhausted", "Finalize", "AccessDenied on PutObject"),
    ("shard_aggregator_error_exhausted", "ShardStatisticsTask", "AccessDenied on GetObject"),
])
def test_aggregator_error_exhausts_its_retrier(sfn, aws_variant, case, state, message):
    """AggregatorError's retrier runs out: the execution fails with it, also
    from inside a Map (the iteration fails the Map, whose Catch goes to Failed)."""
    env = aws_variant
    desc, hist = finished(sfn, env, case)
    assert desc["status"] == "FAILED", desc
    assert desc["error"] == "AggregatorError"
    assert json.loads(desc["cause"]) == {"errorType": "AggregatorError", "errorMessage": message}
    assert len(hist.direct_calls(state)) == 1 + AGGREGATOR_RETRIES
    full = ["Init"] + states_of(env, case) + ["Finalize"]
    assert hist.entered() == full[:full.index(state) + 1] + ["ReportFailure", "Failed"]
    check_reported(hist, env, case, desc)


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
    # Everything up to the failing task, then Failed.
    full = ["Init"] + states_of(env, case) + ["Finalize"]
    assert hist.entered() == full[:full.index(state) + 1] + ["ReportFailure", "Failed"]
    assert check_reported(hist, env, case, desc)["error"]["Error"] == error
    if state != "StartRound":
        check_way_in(hist, env, case)
    if state in ("PlanRound", "CommitRound"):
        check_direct_call(calls[0], env, case, state, 1, closed_by=closed_by)


@pytest.mark.parametrize("case", ["bad_result_empty", "bad_result_string", "bad_result_deadline", "bad_result_closed"])
def test_result_without_boolean_continue_fails(sfn, aws_variant, case):
    """The round's result decides, whichever way it was reached: from
    CommitRound after a hand-over or the deadline, or from a closed plan."""
    env = aws_variant
    desc, hist = finished(sfn, env, case)
    assert desc["status"] == "FAILED", desc
    assert desc["error"] == "FedstepContractViolation"
    assert desc["cause"] == BAD_RESULT_CAUSE
    assert hist.entered() == ["Init"] + states_of(env, case) + ["BadResult", "ReportFailure", "Failed"]
    # BadResult (a Pass) puts the contract violation where a task's Catch
    # puts a task's error; ReportFailure then reports it like one.
    (bad_in,) = hist.inputs("BadResult")
    assert "error" not in bad_in
    error = {"Error": "FedstepContractViolation", "Cause": BAD_RESULT_CAUSE}
    assert hist.outputs("BadResult") == [{**bad_in, "error": error}]
    assert check_reported(hist, env, case, desc) == {**bad_in, "error": error}


def test_report_failure_failing_keeps_the_original_error(sfn, aws_variant):
    """ReportFailure failing for good (NotFound: permanent, not retried): its
    Catch keeps its error in $.report_error and goes to Failed, which still
    reports CommitRound's error and cause."""
    env, case = aws_variant, "report_failure_fails"
    desc, hist = finished(sfn, env, case)
    assert desc["status"] == "FAILED", desc
    assert desc["error"] == "AggregationFailed"
    assert json.loads(desc["cause"]) == {"errorType": "AggregationFailed", "errorMessage": REPORTED_MESSAGE}
    round_ = states_of(env, case)
    assert hist.entered() == ["Init"] + round_[:round_.index("CommitRound") + 1] + ["ReportFailure", "Failed"]
    assert hist.failures("CommitRound") == [(desc["error"], desc["cause"])]
    check_reported(hist, env, case, desc, report_error={
        "Error": "NotFound", "Cause": lambda_error_cause("NotFound", REPORT_FAILURE_MESSAGE)})


def test_report_failure_is_retried(sfn, aws_variant):
    """A Lambda service error on ReportFailure is retried like on every task;
    the execution then fails with the original error (StartRound's)."""
    env, case = aws_variant, "report_failure_retried"
    desc, hist = finished(sfn, env, case)
    assert desc["status"] == "FAILED", desc
    assert desc["error"] == "InvalidTaskInput"
    assert desc["cause"] == lambda_error_cause("InvalidTaskInput", REPORTED_MESSAGE)
    assert hist.entered() == ["Init", "StartRound", "ReportFailure", "Failed"]
    check_reported(hist, env, case, desc, retries=1)
    assert [e for e, _ in hist.failures("ReportFailure")] == ["Lambda.TooManyRequestsException"]
