"""Fixtures for the state machine contract tests.

The emulator tests talk to Step Functions through the standard AWS
variables (AWS_ENDPOINT_URL, ...); if they are unset, the defaults of
scripts/emulators.sh are used. When the emulators do not answer, the tests
are skipped on a developer machine and FAIL under CI=true.

The deployment comes from FEDSTEP_DEPLOY_JSON (written by
scripts/local-deploy.sh) when set; otherwise the session deploys its own copy
under a unique prefix and deletes it at the end.
"""

from __future__ import annotations

import json
import os
import sys
import time
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))

import local_deploy  # noqa: E402  (scripts/local_deploy.py)

EMULATOR_DEFAULTS = {
    "AWS_ACCESS_KEY_ID": "test",
    "AWS_SECRET_ACCESS_KEY": "test",
    "AWS_REGION": "us-east-1",
    "AWS_ENDPOINT_URL": "http://127.0.0.1:4566",
    "AWS_ENDPOINT_URL_DYNAMODB": "http://127.0.0.1:5000",
    "AWS_ENDPOINT_URL_DYNAMODB_STREAMS": "http://127.0.0.1:5000",
}


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def unavailable(msg: str):
    """Skip locally, fail in CI: a CI run must never pass by skipping."""
    if in_ci():
        pytest.fail(f"emulators required under CI=true: {msg}", pytrace=False)
    pytest.skip(msg)


@pytest.fixture(scope="session")
def aws():
    if not os.environ.get("AWS_ENDPOINT_URL"):
        # Only the endpoint decides whether we are on emulators; never fill
        # credentials in next to a real endpoint.
        for key, value in EMULATOR_DEFAULTS.items():
            os.environ.setdefault(key, value)
    import boto3
    from botocore.config import Config

    region = os.environ.get("AWS_REGION", "us-east-1")
    quick = Config(region_name=region, connect_timeout=2, read_timeout=5, retries={"max_attempts": 1})
    try:
        boto3.client("sts", config=quick).get_caller_identity()
    except Exception as err:  # noqa: BLE001  any failure means "not there"
        unavailable(f"LocalStack not reachable at {os.environ['AWS_ENDPOINT_URL']}: {err}")
    try:
        boto3.client("dynamodb", config=quick).list_tables()
    except Exception as err:  # noqa: BLE001
        unavailable(f"DynamoDB endpoint not reachable: {err}")
    return region


@pytest.fixture(scope="session")
def deployment(aws):
    path = os.environ.get("FEDSTEP_DEPLOY_JSON")
    if path:
        yield json.loads(Path(path).read_text())
        return
    prefix = f"t{uuid.uuid4().hex[:10]}"
    out = local_deploy.deploy(prefix, ["site-a", "site-b", "site-c"])
    yield out
    if not os.environ.get("FEDSTEP_KEEP_DEPLOY"):
        local_deploy.delete_all(local_deploy.Aws(), local_deploy.names(prefix, ["site-a", "site-b", "site-c"]))


@pytest.fixture(scope="session")
def sfn(aws):
    import boto3
    from botocore.config import Config

    # GetActivityTask long-polls (up to 60 s on AWS): the read timeout must exceed that.
    return boto3.client(
        "stepfunctions",
        config=Config(region_name=aws, read_timeout=75, retries={"max_attempts": 3, "mode": "standard"}),
    )


class ActivityWorker:
    """Plays fedstep-lambda's local mode: polls the activities of one deployment.

    Tasks that belong to another job (a leftover execution of an earlier,
    failed test) are failed with StrayTask so they cannot confuse this test.
    """

    def __init__(self, sfn, activities: dict, job_id: str, execution_arn: str | None = None):
        self.sfn = sfn
        self.activities = activities
        self.job_id = job_id
        self.execution_arn = execution_arn
        self.seen: list[tuple[str, dict]] = []

    @staticmethod
    def job_of(task_input: dict):
        payload = task_input.get("Payload", task_input)
        return payload.get("job_id")

    def scheduled(self, activity: str) -> int:
        """How many tasks of `activity` this worker's execution has scheduled so far."""
        arn = self.activities[activity]
        return sum(
            1
            for page in self.sfn.get_paginator("get_execution_history").paginate(executionArn=self.execution_arn)
            for ev in page["events"]
            if ev["type"] == "ActivityScheduled" and ev["activityScheduledEventDetails"]["resource"] == arn
        )

    def poll(self, activity: str, timeout: float = 30.0) -> tuple[str, dict]:
        deadline = time.monotonic() + timeout
        # LocalStack 4.8.1 answers a GetActivityTask that finds no task only
        # after sleeping a whole second, and under load it takes a few
        # hundred milliseconds to schedule the next task after an answer:
        # asking at once costs a second per task. Wait instead until the
        # execution's history shows a task this worker has not taken yet
        # (LocalStack queues a task before it records ActivityScheduled).
        if self.execution_arn:
            taken = sum(1 for act, _ in self.seen if act == activity)
            while self.scheduled(activity) <= taken and time.monotonic() < deadline:
                time.sleep(0.1)
        while time.monotonic() < deadline:
            resp = self.sfn.get_activity_task(activityArn=self.activities[activity], workerName="pytest")
            token = resp.get("taskToken")
            if not token:
                continue
            task_input = json.loads(resp["input"])
            if self.job_of(task_input) != self.job_id:
                self.sfn.send_task_failure(taskToken=token, error="StrayTask", cause="not this test's job")
                continue
            self.seen.append((activity, task_input))
            return token, task_input
        raise AssertionError(f"no {activity} task for job {self.job_id} within {timeout}s")

    def succeed(self, token: str, output: dict) -> None:
        self.sfn.send_task_success(taskToken=token, output=json.dumps(output))

    def fail(self, token: str, error: str, cause: str) -> None:
        self.sfn.send_task_failure(taskToken=token, error=error, cause=cause)


@pytest.fixture
def start_job(sfn, deployment):
    """start_job(**input) -> (execution_arn, worker, input)."""
    started = []

    def start(**extra):
        job_id = f"job-{uuid.uuid4().hex[:8]}"
        job_input = {"job_id": job_id, "rounds": 3, "round_timeout_seconds": 30, **extra}
        arn = sfn.start_execution(
            stateMachineArn=deployment["state_machine"]["arn"],
            name=job_id,
            input=json.dumps(job_input),
        )["executionArn"]
        started.append(arn)
        return arn, ActivityWorker(sfn, deployment["activities"], job_id, arn), job_input

    yield start
    for arn in started:  # leave nothing running behind a failed test
        if sfn.describe_execution(executionArn=arn)["status"] == "RUNNING":
            sfn.stop_execution(executionArn=arn, error="TestCleanup")


def wait_done(sfn, arn: str, timeout: float = 30.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        desc = sfn.describe_execution(executionArn=arn)
        if desc["status"] != "RUNNING":
            return desc
        time.sleep(0.2)
    raise AssertionError(f"execution {arn} still RUNNING after {timeout}s")


def entered_states(sfn, arn: str) -> list[str]:
    """Names of the states the execution entered, in order."""
    names = []
    for page in sfn.get_paginator("get_execution_history").paginate(executionArn=arn):
        for ev in page["events"]:
            details = ev.get("stateEnteredEventDetails")
            if details:
                names.append(details["name"])
    return names
