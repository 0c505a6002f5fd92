"""Deploy fedstep's AWS resources onto the emulators (LocalStack + moto).

Run it through scripts/local-deploy.sh, which picks the emulator venv's
python (boto3 comes with moto[server]) and the emulator endpoints.

What it creates, every name prefixed with --prefix (default "fedstep"), all
idempotently (a second run changes nothing, a changed ASL is updated):

  S3 bucket        {prefix}-models        versioned, SSE-S3, public access blocked
  DynamoDB table   {prefix}-rounds        PK job_id (S), SK round (N),
                                          GSI artifacts_by_type: artifact_llm_type (S) / artifact_created_at (S)
  DynamoDB table   {prefix}-updates       PK client_id (S), SK job_round (S) "{job_id}#{round:06}",
                                          stream NEW_IMAGE
  SNS topics       {prefix}-global_model_ready, {prefix}-training_complete
  SQS queues       {prefix}-client-{id}   one per client, subscribed to global_model_ready
                                          and training_complete, with RawMessageDelivery
  IAM role         {prefix}-states        for the state machine (not enforced by LocalStack)
  SFN activities   {prefix}-start_round, {prefix}-plan_round, {prefix}-shard_statistics,
                   {prefix}-decide_round, {prefix}-aggregate_shard, {prefix}-commit_round,
                   {prefix}-finalize, {prefix}-report_failure (one per task action)
  State machine    {prefix}-federated-training (STANDARD), from
                   statemachine/federated_training.asl.json with its
                   placeholders substituted by the activity ARNs

Everything created is printed as JSON and written to .emu/deploy-{prefix}.json
(or --out); its "aggregator_env" holds the environment the aggregator gets
on AWS (same FEDSTEP_* names as infra/lib/aggregator.ts) plus the activity
and stream ARNs its local mode polls; --print-env prints those as `export`
lines (plus FEDSTEP_S3_FORCE_PATH_STYLE=1, which `fedstep job|model` need on
the emulators) instead of the JSON. --client-configs DIR also writes a
ready DIR/<client>.toml per client. --delete removes what a deploy with the
same prefix created.

Endpoints come only from the standard variables (AWS_ENDPOINT_URL,
AWS_ENDPOINT_URL_DYNAMODB, ...), so LocalStack in Docker works the same.
The script refuses to run without AWS_ENDPOINT_URL: it must never touch a real
account by accident.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import sys
import time
from pathlib import Path

import boto3
from botocore.config import Config
from botocore.exceptions import ClientError

ROOT = Path(__file__).resolve().parent.parent
ASL_PATH = ROOT / "statemachine" / "federated_training.asl.json"
# The placeholder values on AWS, with {partition} and {function_arn} left
# open: the CDK app's definitionSubstitutions must resolve to exactly this
# (infra/test/stack.test.ts), and tests/statemachine/test_aws_variant.py runs
# the definition it yields.
AWS_SUBSTITUTIONS_PATH = ROOT / "statemachine" / "aws-substitutions.json"

# Placeholders of the ASL (documented in statemachine/README.md).
PLACEHOLDERS = (
    "StartRoundResource",
    "AggregatorFunctionArn",
    "PlanRoundResource",
    "ShardStatisticsResource",
    "DecideRoundResource",
    "AggregateShardResource",
    "CommitRoundResource",
    "FinalizeResource",
    "ReportFailureResource",
)
# One activity per task action (the "action" field of the task input), named
# {prefix}-{action}: the local worker polls each with the handler of that action.
ACTIVITIES = (
    "start_round", "plan_round", "shard_statistics", "decide_round", "aggregate_shard", "commit_round", "finalize",
    "report_failure",
)
# Activities an older version of this script created; --delete removes them too.
LEGACY_ACTIVITIES = ("close_round",)
# Placeholder -> the activity (action) it becomes on the emulators.
ACTIVITY_PLACEHOLDERS = {
    "StartRoundResource": "start_round",
    "PlanRoundResource": "plan_round",
    "ShardStatisticsResource": "shard_statistics",
    "DecideRoundResource": "decide_round",
    "AggregateShardResource": "aggregate_shard",
    "CommitRoundResource": "commit_round",
    "FinalizeResource": "finalize",
    "ReportFailureResource": "report_failure",
}
TOPICS = ("global_model_ready", "training_complete")
ARTIFACTS_INDEX = "artifacts_by_type"

PREFIX_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,39}$")
CLIENT_RE = re.compile(r"^[A-Za-z0-9_-]{1,60}$")


def log(msg: str) -> None:
    print(f"local-deploy: {msg}", file=sys.stderr)


def substitute(definition: str, values: dict[str, str]) -> str:
    """${Name} -> value, like CloudFormation's DefinitionSubstitutions.

    Fails on a placeholder without a value, so a new placeholder in the ASL
    cannot slip through to the emulators unfilled.
    """
    found = set(re.findall(r"\$\{([A-Za-z0-9_]+)\}", definition))
    missing = found - set(values)
    if missing:
        raise SystemExit(f"ASL placeholders without a value: {sorted(missing)}")
    for key, value in values.items():
        definition = definition.replace("${" + key + "}", value)
    json.loads(definition)  # still valid JSON
    return definition


def aws_substitutions(partition: str, function_arn: str) -> dict[str, str]:
    """The placeholder values the CDK app deploys with (statemachine/aws-substitutions.json)."""
    table = json.loads(AWS_SUBSTITUTIONS_PATH.read_text())
    out = {}
    for name, value in table.items():
        value = value.replace("{partition}", partition).replace("{function_arn}", function_arn)
        if "{" in value:
            raise SystemExit(f"{AWS_SUBSTITUTIONS_PATH}: {name}: unknown variable in {value!r}")
        out[name] = value
    return out


class Aws:
    """boto3 clients configured from the standard environment."""

    def __init__(self) -> None:
        self.region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
        cfg = Config(
            region_name=self.region,
            retries={"max_attempts": 5, "mode": "standard"},
            s3={"addressing_style": "path"},  # emulators serve no bucket.host names
        )
        self.session = boto3.session.Session(region_name=self.region)
        self.cfg = cfg

    def client(self, name: str):
        return self.session.client(name, config=self.cfg)


def ignore(codes: tuple[str, ...], fn, *args, **kwargs):
    """Call fn; swallow ClientErrors whose code is in codes (idempotence)."""
    try:
        return fn(*args, **kwargs)
    except ClientError as err:
        if err.response.get("Error", {}).get("Code") in codes:
            return None
        raise


def names(prefix: str, clients: list[str]) -> dict:
    return {
        "prefix": prefix,
        "bucket": f"{prefix}-models",
        "rounds_table": f"{prefix}-rounds",
        "updates_table": f"{prefix}-updates",
        "topics": {t: f"{prefix}-{t}" for t in TOPICS},
        "queues": {c: f"{prefix}-client-{c}" for c in clients},
        "role": f"{prefix}-states",
        "activities": {a: f"{prefix}-{a}" for a in ACTIVITIES},
        "state_machine": f"{prefix}-federated-training",  # same shape as the CDK stack's name
        "aggregator_function": f"{prefix}-aggregator",
    }


# --- S3 ---------------------------------------------------------------------

def deploy_bucket(aws: Aws, bucket: str) -> None:
    s3 = aws.client("s3")
    kwargs = {"Bucket": bucket}
    if aws.region != "us-east-1":
        kwargs["CreateBucketConfiguration"] = {"LocationConstraint": aws.region}
    ignore(("BucketAlreadyOwnedByYou", "BucketAlreadyExists"), s3.create_bucket, **kwargs)
    s3.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    s3.put_bucket_encryption(
        Bucket=bucket,
        ServerSideEncryptionConfiguration={
            "Rules": [{"ApplyServerSideEncryptionByDefault": {"SSEAlgorithm": "AES256"}}]
        },
    )
    s3.put_public_access_block(
        Bucket=bucket,
        PublicAccessBlockConfiguration={
            "BlockPublicAcls": True,
            "IgnorePublicAcls": True,
            "BlockPublicPolicy": True,
            "RestrictPublicBuckets": True,
        },
    )
    status = s3.get_bucket_versioning(Bucket=bucket).get("Status")
    if status != "Enabled":
        raise SystemExit(f"bucket {bucket}: versioning is {status!r}, expected Enabled")


# --- DynamoDB (moto) ----------------------------------------------------------

def create_table(ddb, spec: dict) -> dict:
    name = spec["TableName"]
    try:
        return ddb.describe_table(TableName=name)["Table"]
    except ClientError as err:
        if err.response["Error"]["Code"] != "ResourceNotFoundException":
            raise
    ignore(("ResourceInUseException",), ddb.create_table, **spec)
    ddb.get_waiter("table_exists").wait(TableName=name, WaiterConfig={"Delay": 1, "MaxAttempts": 60})
    return ddb.describe_table(TableName=name)["Table"]


def deploy_tables(aws: Aws, rounds: str, updates: str) -> dict:
    ddb = aws.client("dynamodb")
    rounds_desc = create_table(ddb, {
        "TableName": rounds,
        "BillingMode": "PAY_PER_REQUEST",
        "AttributeDefinitions": [
            {"AttributeName": "job_id", "AttributeType": "S"},
            {"AttributeName": "round", "AttributeType": "N"},
            {"AttributeName": "artifact_llm_type", "AttributeType": "S"},
            {"AttributeName": "artifact_created_at", "AttributeType": "S"},
        ],
        "KeySchema": [
            {"AttributeName": "job_id", "KeyType": "HASH"},
            {"AttributeName": "round", "KeyType": "RANGE"},
        ],
        # The artifact registry: sparse (only rows carrying artifact_llm_type
        # appear), newest first with ScanIndexForward=false.
        "GlobalSecondaryIndexes": [{
            "IndexName": ARTIFACTS_INDEX,
            "KeySchema": [
                {"AttributeName": "artifact_llm_type", "KeyType": "HASH"},
                {"AttributeName": "artifact_created_at", "KeyType": "RANGE"},
            ],
            "Projection": {"ProjectionType": "ALL"},
        }],
    })
    gsis = {g["IndexName"] for g in rounds_desc.get("GlobalSecondaryIndexes", [])}
    if ARTIFACTS_INDEX not in gsis:
        raise SystemExit(f"table {rounds} exists without GSI {ARTIFACTS_INDEX}; delete it and redeploy")

    updates_desc = create_table(ddb, {
        "TableName": updates,
        "BillingMode": "PAY_PER_REQUEST",
        "AttributeDefinitions": [
            {"AttributeName": "client_id", "AttributeType": "S"},
            {"AttributeName": "job_round", "AttributeType": "S"},
        ],
        "KeySchema": [
            {"AttributeName": "client_id", "KeyType": "HASH"},
            {"AttributeName": "job_round", "KeyType": "RANGE"},
        ],
        "StreamSpecification": {"StreamEnabled": True, "StreamViewType": "NEW_IMAGE"},
    })
    stream = updates_desc.get("StreamSpecification", {})
    stream_arn = updates_desc.get("LatestStreamArn")
    if not stream.get("StreamEnabled") or stream.get("StreamViewType") != "NEW_IMAGE" or not stream_arn:
        raise SystemExit(f"table {updates}: stream not NEW_IMAGE / no LatestStreamArn: {stream}")
    return {
        "rounds": rounds,
        "rounds_arn": rounds_desc["TableArn"],
        "artifacts_index": ARTIFACTS_INDEX,
        "updates": updates,
        "updates_arn": updates_desc["TableArn"],
        "updates_stream_arn": stream_arn,
    }


# --- SNS + SQS ----------------------------------------------------------------

def existing_sqs_subscriptions(sns, topic_arn: str) -> dict[str, str]:
    """queue ARN -> subscription ARN for the topic's SQS subscriptions."""
    found = {}
    for page in sns.get_paginator("list_subscriptions_by_topic").paginate(TopicArn=topic_arn):
        for sub in page["Subscriptions"]:
            if sub["Protocol"] == "sqs":
                found[sub["Endpoint"]] = sub["SubscriptionArn"]
    return found


def subscribe_raw(sns, topic_arn: str, queue_arn: str, existing: dict[str, str]) -> str:
    """Subscribe queue_arn to topic_arn (once) with RawMessageDelivery."""
    sub_arn = existing.get(queue_arn)
    if not sub_arn:
        sub_arn = sns.subscribe(
            TopicArn=topic_arn,
            Protocol="sqs",
            Endpoint=queue_arn,
            Attributes={"RawMessageDelivery": "true"},
            ReturnSubscriptionArn=True,
        )["SubscriptionArn"]
    sns.set_subscription_attributes(
        SubscriptionArn=sub_arn, AttributeName="RawMessageDelivery", AttributeValue="true"
    )
    return sub_arn


def deploy_messaging(aws: Aws, topic_names: dict, queue_names: dict) -> tuple[dict, dict]:
    """Topics, one queue per client, and each queue subscribed to BOTH topics:
    global_model_ready (train) and training_complete (a client with
    exit_on_complete stops when its job ends)."""
    sns = aws.client("sns")
    sqs = aws.client("sqs")
    topics = {key: sns.create_topic(Name=name)["TopicArn"] for key, name in topic_names.items()}
    existing = {key: existing_sqs_subscriptions(sns, arn) for key, arn in topics.items()}

    clients = {}
    for client_id, qname in queue_names.items():
        url = sqs.create_queue(QueueName=qname)["QueueUrl"]
        qarn = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
        # On AWS SNS needs this to deliver; LocalStack does not check it, but
        # keeping it makes the local deployment the same shape as the real one.
        policy = {
            "Version": "2012-10-17",
            "Statement": [{
                "Effect": "Allow",
                "Principal": {"Service": "sns.amazonaws.com"},
                "Action": "sqs:SendMessage",
                "Resource": qarn,
                "Condition": {"ArnEquals": {"aws:SourceArn": list(topics.values())}},
            }],
        }
        sqs.set_queue_attributes(QueueUrl=url, Attributes={"Policy": json.dumps(policy)})
        subs = {key: subscribe_raw(sns, arn, qarn, existing[key]) for key, arn in topics.items()}
        clients[client_id] = {
            "queue_name": qname,
            "queue_url": url,
            "queue_arn": qarn,
            # global_model_ready's, kept under its old key for readers of the JSON.
            "subscription_arn": subs["global_model_ready"],
            "subscriptions": subs,
        }
    return topics, clients


# --- Step Functions -----------------------------------------------------------

def deploy_role(aws: Aws, role: str) -> str:
    iam = aws.client("iam")
    try:
        return iam.get_role(RoleName=role)["Role"]["Arn"]
    except ClientError as err:
        if err.response["Error"]["Code"] != "NoSuchEntity":
            raise
    trust = {
        "Version": "2012-10-17",
        "Statement": [{
            "Effect": "Allow",
            "Principal": {"Service": "states.amazonaws.com"},
            "Action": "sts:AssumeRole",
        }],
    }
    return iam.create_role(RoleName=role, AssumeRolePolicyDocument=json.dumps(trust))["Role"]["Arn"]


def find_state_machine(sfn, name: str) -> str | None:
    for page in sfn.get_paginator("list_state_machines").paginate():
        for sm in page["stateMachines"]:
            if sm["name"] == name:
                return sm["stateMachineArn"]
    return None


def deploy_workflow(aws: Aws, n: dict, account: str) -> dict:
    sfn = aws.client("stepfunctions")
    activities = {key: sfn.create_activity(name=name)["activityArn"] for key, name in n["activities"].items()}
    role_arn = deploy_role(aws, n["role"])
    substitutions = {
        placeholder: activities[action] for placeholder, action in ACTIVITY_PLACEHOLDERS.items()
    }
    # Never invoked on the emulators: the start_round activity worker
    # receives {"FunctionName": <this>, "Payload": {...}} and uses Payload.
    function_arn = f"arn:aws:lambda:{aws.region}:{account}:function:{n['aggregator_function']}"
    substitutions["AggregatorFunctionArn"] = function_arn
    definition = substitute(ASL_PATH.read_text(), substitutions)
    arn = find_state_machine(sfn, n["state_machine"])
    if arn:
        current = sfn.describe_state_machine(stateMachineArn=arn)["definition"]
        if json.loads(current) != json.loads(definition):
            sfn.update_state_machine(stateMachineArn=arn, definition=definition, roleArn=role_arn)
            log(f"updated state machine {n['state_machine']}")
    else:
        arn = sfn.create_state_machine(
            name=n["state_machine"], definition=definition, roleArn=role_arn, type="STANDARD"
        )["stateMachineArn"]
    return {
        "activities": activities,
        "state_machine": {"name": n["state_machine"], "arn": arn, "role_arn": role_arn},
        "substitutions": substitutions,
    }


# --- delete -------------------------------------------------------------------

def delete_all(aws: Aws, n: dict) -> None:
    sfn = aws.client("stepfunctions")
    arn = find_state_machine(sfn, n["state_machine"])
    if arn:
        for page in sfn.get_paginator("list_executions").paginate(stateMachineArn=arn, statusFilter="RUNNING"):
            for ex in page["executions"]:
                ignore(("ExecutionDoesNotExist",), sfn.stop_execution, executionArn=ex["executionArn"])
        sfn.delete_state_machine(stateMachineArn=arn)
    # Also the activity of the one-task round (close_round) that a deployment
    # made before the sharded workflow still has.
    wanted = set(n["activities"].values()) | {f"{n['prefix']}-{a}" for a in LEGACY_ACTIVITIES}
    for page in sfn.get_paginator("list_activities").paginate():
        for act in page["activities"]:
            if act["name"] in wanted:
                sfn.delete_activity(activityArn=act["activityArn"])
    iam = aws.client("iam")
    ignore(("NoSuchEntity",), iam.delete_role, RoleName=n["role"])
    sns = aws.client("sns")
    sqs = aws.client("sqs")
    for name in n["topics"].values():
        topic_arn = sns.create_topic(Name=name)["TopicArn"]
        for page in sns.get_paginator("list_subscriptions_by_topic").paginate(TopicArn=topic_arn):
            for sub in page["Subscriptions"]:
                ignore(("NotFound",), sns.unsubscribe, SubscriptionArn=sub["SubscriptionArn"])
        sns.delete_topic(TopicArn=topic_arn)
    for name in n["queues"].values():
        res = ignore(("AWS.SimpleQueueService.NonExistentQueue", "QueueDoesNotExist"), sqs.get_queue_url, QueueName=name)
        if res:
            sqs.delete_queue(QueueUrl=res["QueueUrl"])
    ddb = aws.client("dynamodb")
    for name in (n["rounds_table"], n["updates_table"]):
        ignore(("ResourceNotFoundException",), ddb.delete_table, TableName=name)
    s3 = aws.client("s3")
    bucket = n["bucket"]
    if ignore(("NoSuchBucket", "404"), s3.head_bucket, Bucket=bucket) is not None:
        for page in s3.get_paginator("list_object_versions").paginate(Bucket=bucket):
            objs = [{"Key": v["Key"], "VersionId": v["VersionId"]}
                    for v in page.get("Versions", []) + page.get("DeleteMarkers", [])]
            if objs:
                s3.delete_objects(Bucket=bucket, Delete={"Objects": objs, "Quiet": True})
        s3.delete_bucket(Bucket=bucket)


# --- client configs -------------------------------------------------------------

CLIENT_EXAMPLE = ROOT / "examples" / "client.toml"


def client_configs(result: dict, out_dir: Path) -> list[Path]:
    """One client.toml per client, from examples/client.toml with this
    deployment's queue, bucket and table filled in, path-style S3 on, and a
    non-IID share of the digits each (the classes dealt round-robin)."""
    example = CLIENT_EXAMPLE.read_text()
    clients = sorted(result["clients"])
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for i, client_id in enumerate(clients):
        classes = [c for c in range(10) if c % len(clients) == i] or [i % 10]
        values = {
            "client_id": json.dumps(client_id),
            "queue_url": json.dumps(result["clients"][client_id]["queue_url"]),
            "bucket": json.dumps(result["bucket"]),
            "updates_table": json.dumps(result["tables"]["updates"]),
            "s3_force_path_style": "true",
            "classes": json.dumps(classes),
            "seed": str(i + 1),
        }
        text = example
        for key, value in values.items():
            text, n = re.subn(rf"(?m)^{key} = .*$", f"{key} = {value}", text, count=1)
            if n != 1:
                raise SystemExit(f"{CLIENT_EXAMPLE}: no `{key} = ...` line to fill in")
        path = out_dir / f"{client_id}.toml"
        path.write_text(text)
        written.append(path)
    return written


# --- main ---------------------------------------------------------------------

def parse_clients(raw: str) -> list[str]:
    clients = [c.strip() for c in raw.split(",") if c.strip()]
    if not clients:
        raise SystemExit("no client ids given")
    for c in clients:
        if not CLIENT_RE.match(c):
            raise SystemExit(f"bad client id {c!r}: letters, digits, '-' and '_' only, at most 60")
    if len(set(clients)) != len(clients):
        raise SystemExit("duplicate client ids")
    return clients


def deploy(prefix: str, clients: list[str]) -> dict:
    """Create (or converge) everything for prefix; return the outputs dict."""
    if not PREFIX_RE.match(prefix):
        raise SystemExit(f"bad prefix {prefix!r}: lowercase letters, digits and '-', at most 40")
    aws = Aws()
    n = names(prefix, clients)
    account = aws.client("sts").get_caller_identity()["Account"]
    started = time.monotonic()
    deploy_bucket(aws, n["bucket"])
    tables = deploy_tables(aws, n["rounds_table"], n["updates_table"])
    topics, client_out = deploy_messaging(aws, n["topics"], n["queues"])
    workflow = deploy_workflow(aws, n, account)
    log(f"deployed prefix {prefix!r} in {time.monotonic() - started:.1f}s")
    aggregator_env = {
        # The names the CDK stack gives the Lambda (infra/lib/aggregator.ts).
        "FEDSTEP_BUCKET": n["bucket"],
        "FEDSTEP_ROUNDS_TABLE": tables["rounds"],
        "FEDSTEP_UPDATES_TABLE": tables["updates"],
        "FEDSTEP_TOPIC_ARN": topics["global_model_ready"],
        "FEDSTEP_TRAINING_COMPLETE_TOPIC_ARN": topics["training_complete"],
        "FEDSTEP_STATE_MACHINE_ARN": workflow["state_machine"]["arn"],
        # Emulator only: what fedstep-lambda's local mode polls instead of
        # being invoked: FEDSTEP_{ACTION}_ACTIVITY_ARN for every task action.
        "FEDSTEP_START_ROUND_ACTIVITY_ARN": workflow["activities"]["start_round"],
        "FEDSTEP_PLAN_ROUND_ACTIVITY_ARN": workflow["activities"]["plan_round"],
        "FEDSTEP_SHARD_STATISTICS_ACTIVITY_ARN": workflow["activities"]["shard_statistics"],
        "FEDSTEP_DECIDE_ROUND_ACTIVITY_ARN": workflow["activities"]["decide_round"],
        "FEDSTEP_AGGREGATE_SHARD_ACTIVITY_ARN": workflow["activities"]["aggregate_shard"],
        "FEDSTEP_COMMIT_ROUND_ACTIVITY_ARN": workflow["activities"]["commit_round"],
        "FEDSTEP_FINALIZE_ACTIVITY_ARN": workflow["activities"]["finalize"],
        "FEDSTEP_REPORT_FAILURE_ACTIVITY_ARN": workflow["activities"]["report_failure"],
        "FEDSTEP_UPDATES_STREAM_ARN": tables["updates_stream_arn"],
    }
    return {
        "aggregator_env": aggregator_env,
        "prefix": prefix,
        "region": aws.region,
        "account": account,
        "endpoints": {
            "default": os.environ.get("AWS_ENDPOINT_URL"),
            "dynamodb": os.environ.get("AWS_ENDPOINT_URL_DYNAMODB") or os.environ.get("AWS_ENDPOINT_URL"),
            "dynamodb_streams": os.environ.get("AWS_ENDPOINT_URL_DYNAMODB_STREAMS")
            or os.environ.get("AWS_ENDPOINT_URL"),
        },
        "bucket": n["bucket"],
        "tables": tables,
        "topics": topics,
        "clients": client_out,
        **workflow,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prefix", default=os.environ.get("FEDSTEP_PREFIX", "fedstep"))
    ap.add_argument("--clients", default=os.environ.get("FEDSTEP_CLIENTS", "site-a,site-b,site-c"),
                    help="comma-separated client ids")
    ap.add_argument("--out", help="output JSON path (default .emu/deploy-<prefix>.json)")
    ap.add_argument("--delete", action="store_true", help="remove the deployment of --prefix")
    ap.add_argument("--client-configs", metavar="DIR",
                    help="also write DIR/<client>.toml for each client (from examples/client.toml)")
    ap.add_argument("--print-env", action="store_true",
                    help="print the aggregator environment as export lines instead of the JSON")
    args = ap.parse_args(argv)

    if not os.environ.get("AWS_ENDPOINT_URL"):
        raise SystemExit("AWS_ENDPOINT_URL is not set: refusing to deploy to a real AWS account. "
                         'Run: eval "$(scripts/emulators.sh env)"')
    clients = parse_clients(args.clients)
    emu_dir = Path(os.environ.get("FEDSTEP_EMU_DIR", ROOT / ".emu"))
    out = Path(args.out) if args.out else emu_dir / f"deploy-{args.prefix}.json"

    if args.delete:
        delete_all(Aws(), names(args.prefix, clients))
        out.unlink(missing_ok=True)
        log(f"deleted prefix {args.prefix!r}")
        return 0

    result = deploy(args.prefix, clients)
    text = json.dumps(result, indent=2, sort_keys=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text + "\n")
    if args.client_configs:
        for path in client_configs(result, Path(args.client_configs)):
            log(f"wrote {path}")
    if args.print_env:
        for key, value in result["aggregator_env"].items():
            print(f"export {key}={shlex.quote(value)}")
        # The emulators serve no bucket.host names: `fedstep job|model`
        # need path-style S3 URLs here (AWS works with either).
        print("export FEDSTEP_S3_FORCE_PATH_STYLE=1")
    else:
        print(text)
    log(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
