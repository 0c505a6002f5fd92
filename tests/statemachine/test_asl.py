"""Static checks of the ASL: no emulator needed."""

from __future__ import annotations

import json
import re
from pathlib import Path

import local_deploy

ROOT = Path(__file__).resolve().parents[2]
TASK_ERROR_NAME_RS = (ROOT / "crates" / "cloud" / "src" / "task_error_name.rs").read_text()
ASL_TEXT = (ROOT / "statemachine" / "federated_training.asl.json").read_text()
README = (ROOT / "statemachine" / "README.md").read_text()
ASL = json.loads(ASL_TEXT)
STATES = ASL["States"]


MAPS = {name: state for name, state in STATES.items() if state["Type"] == "Map"}


def scopes() -> list[tuple[str, dict]]:
    """(StartAt, States) of the workflow and of every Map's iterations: a
    state can only go to a state of its own scope."""
    return [(ASL["StartAt"], STATES)] + [
        (m["ItemProcessor"]["StartAt"], m["ItemProcessor"]["States"]) for m in MAPS.values()
    ]


def all_states() -> dict[str, dict]:
    """Every state, the Maps' inner ones included (names are unique across scopes)."""
    out: dict[str, dict] = {}
    for _, states in scopes():
        assert not set(out) & set(states), f"state names used twice: {set(out) & set(states)}"
        out.update(states)
    return out


TASKS = {name: state for name, state in all_states().items() if state["Type"] == "Task"}


def targets(state: dict) -> list[str]:
    out = [state[k] for k in ("Next", "Default") if k in state]
    out += [c["Next"] for c in state.get("Catch", [])]
    out += [c["Next"] for c in state.get("Choices", [])]
    return out


def test_every_transition_target_exists():
    for start, states in scopes():
        assert start in states
        for name, state in states.items():
            for t in targets(state):
                assert t in states, f"{name} -> {t}: no such state in its scope"
            if state["Type"] not in ("Succeed", "Fail", "Choice"):
                assert "Next" in state or state.get("End") is True, f"{name} neither Next nor End"


def test_every_state_is_reachable():
    for start, states in scopes():
        seen, todo = set(), [start]
        while todo:
            name = todo.pop()
            if name not in seen:
                seen.add(name)
                todo += targets(states[name])
        assert seen == set(states), f"unreachable: {set(states) - seen}"


def test_placeholders_are_known_and_documented():
    found = set(re.findall(r"\$\{([A-Za-z0-9_]+)\}", ASL_TEXT))
    # Nothing else that looks like a substitution (Fn::Sub-style would choke).
    assert ASL_TEXT.count("${") == len(re.findall(r"\$\{[A-Za-z0-9_]+\}", ASL_TEXT))
    assert found == set(local_deploy.PLACEHOLDERS)
    for name in found:
        assert "${" + name + "}" in README, f"placeholder ${{{name}}} not documented in statemachine/README.md"


def test_task_resources_are_placeholders():
    assert set(TASKS) == {
        "StartRound", "PlanRound", "ShardStatisticsTask", "DecideRound", "AggregateShardTask", "CommitRound",
        "Finalize", "ReportFailure",
    }
    for name, state in TASKS.items():
        assert re.fullmatch(r"\$\{[A-Za-z0-9_]+\}", state["Resource"]), name


def test_aws_substitution_is_valid_json():
    # statemachine/aws-substitutions.json: what the CDK app substitutes
    # (infra/test/stack.test.ts holds the app to it).
    fn = "arn:aws:lambda:eu-west-1:123456789012:function:fedstep-aggregator"
    subs = local_deploy.aws_substitutions("aws", fn)
    assert set(subs) == set(local_deploy.PLACEHOLDERS)
    out = json.loads(local_deploy.substitute(ASL_TEXT, subs))
    assert out["States"]["StartRound"]["Resource"] == "arn:aws:states:::lambda:invoke.waitForTaskToken"
    assert out["States"]["StartRound"]["Parameters"]["FunctionName"] == fn
    # The direct (legacy) form for every other task, the Maps' included:
    # the task's output is the function's return value.
    for name in set(TASKS) - {"StartRound"}:
        state = out["States"].get(name) or next(
            m["ItemProcessor"]["States"][name] for m in out["States"].values()
            if name in m.get("ItemProcessor", {}).get("States", {}))
        assert state["Resource"] == fn, name
    assert "${" not in json.dumps(out)


# Every task's (and Map's) catch-all: the error to $.error, then ReportFailure
# tells the clients before the execution ends in Failed.
CATCH_TO_REPORT = [{"ErrorEquals": ["States.ALL"], "ResultPath": "$.error", "Next": "ReportFailure"}]


def into(name: str) -> set[str]:
    """The states that can go to `name`."""
    return {src for src, st in STATES.items() if name in targets(st)}


def test_round_shape():
    start = STATES["StartRound"]
    assert start["TimeoutSecondsPath"] == "$.round_timeout_seconds"
    # Not "$$.Task.Token": that path does not exist for activities (emulators).
    assert start["Parameters"]["Payload"]["context.$"] == "$$"
    # StartRound's output is the stream path's hand-over, never a round
    # result: every round goes on to PlanRound, which plans the aggregation.
    assert start["ResultPath"] == "$.handover"
    assert start["Next"] == "PlanRound"
    # The deadline: caught first (before States.ALL), state kept as it was.
    assert start["Catch"][0] == {"ErrorEquals": ["States.Timeout"], "ResultPath": None, "Next": "DeadlinePassed"}
    assert start["Catch"][1:] == CATCH_TO_REPORT
    assert {k: v for k, v in STATES["DeadlinePassed"].items() if k != "Comment"} == {
        "Type": "Pass",
        "Result": {"closed_by": "deadline"},
        "ResultPath": "$.handover",
        "Next": "PlanRound",
    }
    plan = STATES["PlanRound"]
    # closed_by comes from the hand-over (stream) or from DeadlinePassed.
    assert plan["Parameters"] == {
        "action": "plan_round",
        "job_id.$": "$.job_id",
        "round.$": "$.round",
        "closed_by.$": "$.handover.closed_by",
        "context.$": "$$",
    }
    assert plan["ResultPath"] == "$.plan"
    assert plan["Next"] == "Planned"
    assert plan["TimeoutSeconds"] == 960
    # The plan: closed short-cut first, then statistics, each comparison
    # behind a rule that has shown its field present (comparing a missing
    # field is a runtime error).
    planned = STATES["Planned"]
    assert planned["Choices"] == [
        {"Variable": "$.plan.closed", "IsPresent": True, "Next": "AlreadyClosed"},
        {"Variable": "$.plan.statistics", "IsPresent": False, "Next": "AggregateShards"},
        {"Variable": "$.plan.statistics", "BooleanEquals": True, "Next": "ShardStatistics"},
    ]
    assert planned["Default"] == "AggregateShards"
    assert {k: v for k, v in STATES["AlreadyClosed"].items() if k != "Comment"} == {
        "Type": "Pass", "InputPath": "$.plan.closed", "ResultPath": "$.result", "Next": "ShouldContinue",
    }
    assert STATES["ShardStatistics"]["Next"] == "DecideRound"
    decide = STATES["DecideRound"]
    assert decide["Parameters"] == {
        "action": "decide_round",
        "job_id.$": "$.job_id",
        "round.$": "$.round",
        "attempt.$": "$.plan.attempt",
        "context.$": "$$",
    }
    # The decision holds a secret: never in the state.
    assert decide["ResultPath"] is None
    assert decide["Next"] == "AggregateShards"
    assert STATES["AggregateShards"]["Next"] == "CommitRound"
    commit = STATES["CommitRound"]
    assert commit["Parameters"] == {
        "action": "commit_round",
        "job_id.$": "$.job_id",
        "round.$": "$.round",
        "attempt.$": "$.plan.attempt",
        "closed_by.$": "$.handover.closed_by",
        "context.$": "$$",
    }
    assert commit["ResultPath"] == "$.result"
    assert commit["Next"] == "Committed"
    assert STATES["Committed"]["Choices"] == [{"Variable": "$.result.replan", "IsPresent": True, "Next": "PlanRound"}]
    assert STATES["Committed"]["Default"] == "ShouldContinue"
    for name in ("PlanRound", "ShardStatistics", "DecideRound", "AggregateShards", "CommitRound", "Finalize"):
        assert STATES[name]["Catch"] == CATCH_TO_REPORT, name
    # The ways into each step of the round: ShouldContinue only after a
    # commit or a closed plan, the commit only after the shards.
    assert into("PlanRound") == {"StartRound", "DeadlinePassed", "Committed"}
    assert into("DeadlinePassed") == {"StartRound"}
    assert into("ShardStatistics") == {"Planned"}
    assert into("DecideRound") == {"ShardStatistics"}
    assert into("AggregateShards") == {"Planned", "DecideRound"}
    assert into("CommitRound") == {"AggregateShards"}
    assert into("ShouldContinue") == {"AlreadyClosed", "Committed"}
    assert STATES["Init"]["Result"] == 1 and STATES["Init"]["ResultPath"] == "$.round"
    assert STATES["NextRound"]["Parameters"] == {"round.$": "States.MathAdd($.round, 1)"}
    assert STATES["Failed"]["CausePath"] == "$.error.Cause"


def test_failure_path():
    """Every way a job fails runs ReportFailure (the clients are told, the
    open round failed) before Failed, which reports the original error: a
    task's error after its retries (every catch-all), and a round result
    without a boolean continue (BadResult). ReportFailure's own failure
    still ends in Failed, with the original error."""
    # The only Fail state; the only way into it is ReportFailure.
    assert [name for name, st in all_states().items() if st["Type"] == "Fail"] == ["Failed"]
    assert {k: v for k, v in STATES["Failed"].items() if k != "Comment"} == {
        "Type": "Fail", "ErrorPath": "$.error.Error", "CausePath": "$.error.Cause",
    }
    assert into("Failed") == {"ReportFailure"}
    # Every catch-all of the workflow leads to ReportFailure with the error
    # in $.error (ReportFailure's own excepted); the Maps' inner tasks have
    # none (the Map's Catch takes a failed iteration).
    catchers = set()
    for name, state in all_states().items():
        for catch in state.get("Catch", []):
            if "States.ALL" in catch["ErrorEquals"] and name != "ReportFailure":
                assert catch == CATCH_TO_REPORT[0], name
                catchers.add(name)
    assert catchers == {"StartRound", "PlanRound", "ShardStatistics", "DecideRound", "AggregateShards", "CommitRound",
                        "Finalize"}
    assert into("ReportFailure") == catchers | {"BadResult"}

    # No Fail state for a bad result any more: the same error, through ReportFailure.
    assert {k: v for k, v in STATES["BadResult"].items() if k != "Comment"} == {
        "Type": "Pass",
        "Result": {"Error": "FedstepContractViolation", "Cause": "round result has no boolean field 'continue'"},
        "ResultPath": "$.error",
        "Next": "ReportFailure",
    }
    assert into("BadResult") == {"ShouldContinue"}

    report = STATES["ReportFailure"]
    assert report["Type"] == "Task"
    assert report["Resource"] == "${ReportFailureResource}"
    # Exactly these fields: error is the caught {Error, Cause}.
    assert report["Parameters"] == {
        "action": "report_failure",
        "job_id.$": "$.job_id",
        "round.$": "$.round",
        "error.$": "$.error",
        "context.$": "$$",
    }
    assert report["TimeoutSeconds"] == 960
    # Its answer stays out of the state (and out of the execution's output).
    assert report["ResultPath"] is None
    # Retried like every task (test_every_task_retries_alike), then, if it
    # still fails, Failed with the original error: its own goes elsewhere.
    assert report["Retry"] == STATES["Finalize"]["Retry"]
    assert report["Catch"] == [{"ErrorEquals": ["States.ALL"], "ResultPath": "$.report_error", "Next": "Failed"}]
    assert report["Next"] == "Failed"


def test_shard_maps():
    """Both Maps run one task per shard of the plan, as many at a time as the
    plan says, and keep the tasks' outputs out of the state."""
    assert set(MAPS) == {"ShardStatistics", "AggregateShards"}
    for name, action, task in (
        ("ShardStatistics", "shard_statistics", "ShardStatisticsTask"),
        ("AggregateShards", "aggregate_shard", "AggregateShardTask"),
    ):
        m = MAPS[name]
        assert m["ItemsPath"] == "$.plan.shards"
        assert m["MaxConcurrencyPath"] == "$.plan.concurrency"
        assert "MaxConcurrency" not in m
        assert m["ItemSelector"] == {
            "action": action,
            "job_id.$": "$.job_id",
            "round.$": "$.round",
            "attempt.$": "$.plan.attempt",
            "shard.$": "$$.Map.Item.Value",
        }
        # Outputs live in S3, never in the history's state (size; secrets).
        assert m["ResultPath"] is None
        assert m["Catch"] == CATCH_TO_REPORT
        # No Retry on the Map itself: it would rerun every shard.
        assert "Retry" not in m
        proc = m["ItemProcessor"]
        assert proc["ProcessorConfig"] == {"Mode": "INLINE"}
        assert proc["StartAt"] == task and list(proc["States"]) == [task]
        st = proc["States"][task]
        assert st["Parameters"] == {
            "action.$": "$.action",
            "job_id.$": "$.job_id",
            "round.$": "$.round",
            "attempt.$": "$.attempt",
            "shard.$": "$.shard",
            "context.$": "$$",
        }
        assert st["TimeoutSeconds"] == 960
        assert st["End"] is True
        assert "Catch" not in st  # the Map's Catch takes a failed iteration


def test_closed_by_values_are_the_aggregators():
    """The two closed_by values PlanRound and CommitRound can get are the ones the Rust
    ClosedBy enum (serde, lowercase) accepts: "stream" from the hand-over
    (crates/cloud/src/records.rs, HandOver), "deadline" from DeadlinePassed."""
    records = (ROOT / "crates" / "cloud" / "src" / "records.rs").read_text()
    block = records[records.index("pub enum ClosedBy {"):]
    block = block[: block.index("\n}")]
    assert '#[serde(rename_all = "lowercase")]\npub enum ClosedBy' in records
    variants = {v.lower() for v in re.findall(r"^    ([A-Z][A-Za-z]+),$", block, re.M)}
    assert variants == {"stream", "deadline"}, variants
    assert STATES["DeadlinePassed"]["Result"]["closed_by"] in variants


# The error names a task can fail with, by whose fault (statemachine/README.md,
# "Retries and timeouts"). System failures are worth a retry; everything else
# fails the same way again (or must not be repeated: QuorumNotMet has already
# marked the round FAILED).
SYSTEM_ERRORS = {"Transient", "AggregatorError"}
PERMANENT_ERRORS = {
    "QuorumNotMet", "InvalidInput", "InvalidTaskInput", "NotFound", "ConditionFailed", "AggregationFailed",
    "NoUsableUpdate",  # a retried StartRound's SendTaskFailure on a FAILED round (crates/cloud/src/engine/start.rs)
    "JobFailed",  # the same, on a round ReportFailure failed (the job failed while it was open)
    "UnknownEvent",  # crates/lambda/src/lambda.rs: neither a stream batch nor a task payload
}
LAMBDA_SERVICE_ERRORS = {
    "Lambda.ServiceException", "Lambda.AWSLambdaException", "Lambda.SdkClientException", "Lambda.TooManyRequestsException",
}
# Would also match permanent errors (States.ALL, States.TaskFailed) or turn
# StartRound's deadline into another wait for the same round (States.Timeout).
CATCH_ALLS = {"States.ALL", "States.TaskFailed", "States.Timeout"}


def retrier_for(state: dict, error: str) -> dict | None:
    """The retrier Step Functions applies to `error`: the first that names it."""
    for retry in state.get("Retry", []):
        if error in retry["ErrorEquals"]:
            return retry
    return None


def backoff_seconds(retry: dict) -> float:
    """The longest total wait of a retrier: every attempt at its full interval (jitter only shortens)."""
    interval, rate = retry.get("IntervalSeconds", 1), retry.get("BackoffRate", 2.0)
    cap = retry.get("MaxDelaySeconds", float("inf"))
    return sum(min(interval * rate**i, cap) for i in range(retry.get("MaxAttempts", 3)))


def test_task_error_names_are_classified():
    """Every error name the aggregator reports is either retried or deliberately not."""
    # crates/cloud/src/task_error_name.rs is the one place the names are written.
    block = TASK_ERROR_NAME_RS[TASK_ERROR_NAME_RS.index("pub fn as_str(self)"):]
    block = block[: block.index("}\n    }")]
    names = set(re.findall(r'=> "([A-Za-z]+)"', block))
    assert {"Transient", "AggregatorError", "QuorumNotMet", "InvalidTaskInput", "NoUsableUpdate"} <= names, names
    assert names <= SYSTEM_ERRORS | PERMANENT_ERRORS, f"classify {names - SYSTEM_ERRORS - PERMANENT_ERRORS} here and in the ASL"
    # Nobody names an error outside it.
    for rs in (ROOT / "crates").glob("*/src/**/*.rs"):
        text = rs.read_text()
        assert not re.search(r'error_type: "[A-Za-z]+"', text), rs


def test_every_task_retries_alike():
    """One set of retriers for every task: what the tests check of one
    task's retries (test_aws_variant.py) holds for all of them."""
    for name, state in TASKS.items():
        assert state["Retry"] == STATES["Finalize"]["Retry"], name


def test_tasks_retry_system_errors_with_backoff_and_never_permanent_ones():
    for name, state in TASKS.items():
        transient = retrier_for(state, "Transient")
        assert transient is not None, f"{name} does not retry Transient"
        # Exponential backoff with jitter, so retries of many executions spread out.
        assert transient["MaxAttempts"] >= 3, name
        assert transient.get("BackoffRate", 2.0) > 1, name
        assert transient.get("JitterStrategy") == "FULL", name
        aggregator = retrier_for(state, "AggregatorError")
        assert aggregator is not None, f"{name} does not retry AggregatorError"
        assert aggregator is not transient, name
        # Unclassified internal errors may be a bug rather than an outage: fewer attempts.
        assert 1 <= aggregator["MaxAttempts"] < transient["MaxAttempts"], name
        assert aggregator.get("JitterStrategy") == "FULL", name
        for error in LAMBDA_SERVICE_ERRORS:
            assert retrier_for(state, error) is not None, f"{name} does not retry {error}"

        for retry in state["Retry"]:
            named = set(retry["ErrorEquals"])
            assert not named & PERMANENT_ERRORS, f"{name} retries permanent errors {named & PERMANENT_ERRORS}"
            assert not named & CATCH_ALLS, f"{name} retries {named & CATCH_ALLS}"
            # Anything else must be classified above first.
            assert named <= SYSTEM_ERRORS | LAMBDA_SERVICE_ERRORS, f"{name} retries unclassified {named}"
        for error in PERMANENT_ERRORS:
            assert retrier_for(state, error) is None, f"{name} retries {error}"

        # StartRound's retries eat into the round (its deadline counts from
        # when the state was entered), so the backoff stays short: the worst
        # case of every retrier together is well under a round timeout
        # (statemachine/README.md: a few minutes and up).
        total = sum(backoff_seconds(r) for r in state["Retry"])
        assert total <= 120, f"{name}: up to {total} s of backoff"


def test_retries_are_documented():
    section = README[README.index("## Retries and timeouts"):]
    for error in SYSTEM_ERRORS:
        assert f"`{error}`" in section, error
    for state in TASKS.values():
        for retry in state["Retry"]:
            if "MaxDelaySeconds" in retry:
                assert f"{retry['MaxDelaySeconds']} s" in section
