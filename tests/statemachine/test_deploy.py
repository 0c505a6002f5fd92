"""What scripts/local-deploy.sh promises beyond the state machine.

The DynamoDB stream and the SNS -> SQS fan-out are what fedstep-lambda's
local mode and the clients build on, so check them on the emulators.
"""

from __future__ import annotations

import json
import uuid

import boto3
from botocore.config import Config


def client(name: str, region: str):
    return boto3.client(name, config=Config(region_name=region, s3={"addressing_style": "path"}))


def test_tables_match_the_contract(aws, deployment):
    ddb = client("dynamodb", aws)
    rounds = ddb.describe_table(TableName=deployment["tables"]["rounds"])["Table"]
    assert {k["AttributeName"]: k["KeyType"] for k in rounds["KeySchema"]} == {"job_id": "HASH", "round": "RANGE"}
    types = {a["AttributeName"]: a["AttributeType"] for a in rounds["AttributeDefinitions"]}
    assert types["job_id"] == "S" and types["round"] == "N"
    (gsi,) = rounds["GlobalSecondaryIndexes"]
    assert gsi["IndexName"] == "artifacts_by_type"
    assert [k["AttributeName"] for k in gsi["KeySchema"]] == ["artifact_llm_type", "artifact_created_at"]

    updates = ddb.describe_table(TableName=deployment["tables"]["updates"])["Table"]
    assert {k["AttributeName"]: k["KeyType"] for k in updates["KeySchema"]} == {
        "client_id": "HASH", "job_round": "RANGE",
    }
    assert updates["StreamSpecification"] == {"StreamEnabled": True, "StreamViewType": "NEW_IMAGE"}
    assert updates["LatestStreamArn"] == deployment["tables"]["updates_stream_arn"]


def test_updates_stream_delivers_new_images(aws, deployment):
    ddb = client("dynamodb", aws)
    streams = client("dynamodbstreams", aws)
    job_round = f"job-{uuid.uuid4().hex[:6]}#000001"
    ddb.put_item(
        TableName=deployment["tables"]["updates"],
        Item={"client_id": {"S": "site-a"}, "job_round": {"S": job_round}, "num_examples": {"N": "42"}},
    )
    arn = deployment["tables"]["updates_stream_arn"]
    shards = streams.describe_stream(StreamArn=arn)["StreamDescription"]["Shards"]
    images = []
    for shard in shards:
        it = streams.get_shard_iterator(
            StreamArn=arn, ShardId=shard["ShardId"], ShardIteratorType="TRIM_HORIZON"
        )["ShardIterator"]
        for rec in streams.get_records(ShardIterator=it)["Records"]:
            images.append((rec["eventName"], rec["dynamodb"].get("NewImage")))
    assert ("INSERT", {
        "client_id": {"S": "site-a"}, "job_round": {"S": job_round}, "num_examples": {"N": "42"},
    }) in images


def test_topic_fans_out_raw_to_every_client_queue(aws, deployment):
    sns = client("sns", aws)
    sqs = client("sqs", aws)
    body = json.dumps({"schema": 1, "job_id": "fanout", "round": 1, "nonce": uuid.uuid4().hex})
    sns.publish(TopicArn=deployment["topics"]["global_model_ready"], Message=body)
    for client_id, q in deployment["clients"].items():
        msgs = sqs.receive_message(QueueUrl=q["queue_url"], WaitTimeSeconds=5, MaxNumberOfMessages=10)
        bodies = [m["Body"] for m in msgs.get("Messages", [])]
        assert body in bodies, f"{client_id}: raw message not delivered: {bodies}"
        for m in msgs.get("Messages", []):
            sqs.delete_message(QueueUrl=q["queue_url"], ReceiptHandle=m["ReceiptHandle"])


def test_bucket_is_versioned(aws, deployment):
    s3 = client("s3", aws)
    assert s3.get_bucket_versioning(Bucket=deployment["bucket"])["Status"] == "Enabled"


def test_aggregator_env_points_at_the_deployment(deployment):
    env = deployment["aggregator_env"]
    assert env["FEDSTEP_BUCKET"] == deployment["bucket"]
    assert env["FEDSTEP_ROUNDS_TABLE"] == deployment["tables"]["rounds"]
    assert env["FEDSTEP_UPDATES_TABLE"] == deployment["tables"]["updates"]
    assert env["FEDSTEP_TOPIC_ARN"] == deployment["topics"]["global_model_ready"]
    assert env["FEDSTEP_STATE_MACHINE_ARN"] == deployment["state_machine"]["arn"]
    # One activity per task action; the local worker polls each.
    actions = ("start_round", "plan_round", "shard_statistics", "decide_round", "aggregate_shard", "commit_round",
               "finalize", "report_failure")
    assert set(deployment["activities"]) == set(actions)
    prefix = deployment["prefix"]
    for action in actions:
        assert deployment["activities"][action].endswith(f":activity:{prefix}-{action}")
        assert env[f"FEDSTEP_{action.upper()}_ACTIVITY_ARN"] == deployment["activities"][action]
    assert not {k for k in env if k.endswith("_ACTIVITY_ARN")} - {f"FEDSTEP_{a.upper()}_ACTIVITY_ARN" for a in actions}
    assert env["FEDSTEP_UPDATES_STREAM_ARN"] == deployment["tables"]["updates_stream_arn"]
