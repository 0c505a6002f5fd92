"""Static checks of the ASL: no emulator needed."""

from __future__ import annotations

import json
import re
from pathlib import Path

import local_deploy

ROOT = Path(__file__).resolve().parents[2]
ASL_TEXT = (ROOT / "statemachine" / "federated_training.asl.json").read_text()
README = (ROOT / "statemachine" / "README.md").read_text()
ASL = json.loads(ASL_TEXT)
STATES = ASL["States"]


def targets(state: dict) -> list[str]:
    out = [state[k] for k in ("Next", "Default") if k in state]
    out += [c["Next"] for c in state.get("Catch", [])]
    out += [c["Next"] for c in state.get("Choices", [])]
    return out


def test_every_transition_target_exists():
    assert ASL["StartAt"] in STATES
    for name, state in STATES.items():
        for t in targets(state):
            assert t in STATES, f"{name} -> {t}: no such state"
        if state["Type"] not in ("Succeed", "Fail", "Choice"):
            assert "Next" in state or state.get("End") is True, f"{name} neither Next nor End"


def test_every_state_is_reachable():
    seen, todo = set(), [ASL["StartAt"]]
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo += targets(STATES[name])
    assert seen == set(STATES), f"unreachable: {set(STATES) - seen}"


def test_placeholders_are_known_and_documented():
    found = set(re.findall(r"\$\{([A-Za-z0-9_]+)\}", ASL_TEXT))
    # Nothing else that looks like a substitution (Fn::Sub-style would choke).
    assert ASL_TEXT.count("${") == len(re.findall(r"\$\{[A-Za-z0-9_]+\}", ASL_TEXT))
    assert found == set(local_deploy.PLACEHOLDERS)
    for name in found:
        assert "${" + name + "}" in README, f"placeholder ${{{name}}} not documented in statemachine/README.md"


def test_task_resources_are_placeholders():
    for name, state in STATES.items():
        if state["Type"] == "Task":
            assert re.fullmatch(r"\$\{[A-Za-z0-9_]+\}", state["Resource"]), name


def test_aws_substitution_is_valid_json():
    fn = "arn:aws:lambda:eu-west-1:123456789012:function:fedstep-aggregator"
    out = json.loads(local_deploy.substitute(ASL_TEXT, {
        "StartRoundResource": "arn:aws:states:::lambda:invoke.waitForTaskToken",
        "AggregatorFunctionArn": fn,
        "CloseRoundResource": fn,
        "FinalizeResource": fn,
    }))
    assert out["States"]["StartRound"]["Parameters"]["FunctionName"] == fn
    assert "${" not in json.dumps(out)


def test_round_shape():
    start = STATES["StartRound"]
    assert start["TimeoutSecondsPath"] == "$.round_timeout_seconds"
    # Not "$$.Task.Token": that path does not exist for activities (emulators).
    assert start["Parameters"]["Payload"]["context.$"] == "$$"
    assert start["Catch"][0] == {"ErrorEquals": ["States.Timeout"], "ResultPath": None, "Next": "CloseRound"}
    for name in ("StartRound", "CloseRound"):
        assert STATES[name]["ResultPath"] == "$.result"
        assert STATES[name]["Next"] == "ShouldContinue"
    assert STATES["Init"]["Result"] == 1 and STATES["Init"]["ResultPath"] == "$.round"
    assert STATES["NextRound"]["Parameters"] == {"round.$": "States.MathAdd($.round, 1)"}
    assert STATES["Failed"]["CausePath"] == "$.error.Cause"
    # Retries only on transient Lambda service errors, never on task errors.
    for name, state in STATES.items():
        for retry in state.get("Retry", []):
            assert all(e.startswith("Lambda.") for e in retry["ErrorEquals"]), name
