import * as fs from 'fs';
import { Duration } from 'aws-cdk-lib';
import * as iam from 'aws-cdk-lib/aws-iam';
import * as lambda from 'aws-cdk-lib/aws-lambda';
import { SqsDlq } from 'aws-cdk-lib/aws-lambda-event-sources';
import * as logs from 'aws-cdk-lib/aws-logs';
import * as s3assets from 'aws-cdk-lib/aws-s3-assets';
import * as sqs from 'aws-cdk-lib/aws-sqs';
import { RustFunction } from 'cargo-lambda-cdk';
import { NagSuppressions } from 'cdk-nag';
import { Construct } from 'constructs';
import { LambdaArch } from './config';
import { Ledger } from './ledger';
import { Messaging } from './messaging';
import { KEYS, ModelStore } from './model-store';

/** Cargo package and binary of the Lambda (crates/lambda). */
export const LAMBDA_BINARY = 'fedstep-lambda';

/**
 * The oldest glibc the Lambda binary may need, as cargo-zigbuild's target
 * suffix (zig links against this version's symbols). provided.al2023 has
 * glibc 2.34, so any value up to that runs; 2.17 is what scripts/dist.sh
 * builds the downloadable client and CLI for (GLIBC_DIST there). Without a
 * suffix zig picks its own, newer default, and a different zig target means
 * different C compiler settings for ring (C and assembly through the cc
 * crate), so dist.sh right after this build (as in scripts/test.sh) would
 * recompile the whole AWS SDK stack instead of reusing it. Keep the two
 * equal.
 */
export const LAMBDA_GLIBC = '2.17';

/**
 * The stream function's timeout. A stream invocation validates and counts at
 * most STREAM_SETTINGS.batchSize rows, each a handful of DynamoDB calls
 * (GetItem of the job and of the round, one UpdateItem, rarely a second
 * GetItem or UpdateItem) and at most one SendTaskSuccess, no S3 at all:
 * milliseconds per row, seconds for a batch even when the SDK retries
 * throttled calls with backoff. Two minutes leave a wide margin and still
 * bound a stuck invocation (a hung connection), which holds its shard, far
 * below the aggregator's 15.
 */
export const STREAM_TIMEOUT = Duration.minutes(2);

/** Settings of the DynamoDB stream -> Lambda event source mapping. */
export const STREAM_SETTINGS = {
  batchSize: 10,
  /** Bounded retries: a poison record must not block its shard for 24 h. */
  retryAttempts: 5,
  /** A record older than this goes to the DLQ instead of being retried. */
  maxRecordAge: Duration.hours(6),
};

/**
 * How much longer than the function's timeout a round's aggregation lease
 * lasts (FEDSTEP_LEASE_SECONDS). A claimed round whose aggregator crashed is
 * taken over once the lease has run out; a live aggregation must never be.
 * Lambda ends every invocation at its timeout, and the claim is made inside
 * the invocation, so no live holder outlives claim + timeout; the margin
 * absorbs clock differences between the execution environments (the lease
 * expiry is written with the claimer's clock and compared with the
 * taker's).
 */
export const LEASE_MARGIN = Duration.seconds(60);

/** The aggregation lease for a function that runs at most `timeout`. */
export function leaseSeconds(timeout: Duration): number {
  return timeout.toSeconds() + LEASE_MARGIN.toSeconds();
}

export interface AggregatorProps {
  readonly store: ModelStore;
  readonly ledger: Ledger;
  readonly messaging: Messaging;
  /** ARN of the training state machine, known before it exists (see FedstepStack). */
  readonly stateMachineArn: string;
  readonly architecture: LambdaArch;
  readonly memoryMb: number;
  readonly timeoutMinutes: number;
  /** Memory of the stream function (its timeout is STREAM_TIMEOUT). */
  readonly streamMemoryMb: number;
  readonly rustLog: string;
  readonly logRetentionDays: number;
  /** Cargo.toml of crates/lambda (used unless lambdaAsset is set). */
  readonly lambdaManifest: string;
  /** Prebuilt code directory containing `bootstrap`; skips cargo-lambda. */
  readonly lambdaAsset?: string;
}

/**
 * The Rust Lambda as two functions from one bootstrap (crates/lambda: the
 * event's shape picks the handler, docs/design.md §3), each with its own
 * least-privilege role and log group, and the `updates` stream event source
 * with a DLQ:
 *
 * - `function`, the aggregator: the state machine's tasks (start_round;
 *   the round's aggregation as plan_round, shard_statistics, decide_round,
 *   aggregate_shard and commit_round, the shard tasks one invocation per
 *   shard; finalize; report_failure when a job fails). The memory and
 *   timeout of the settings; S3 under jobs/, the ledger, the topic, task
 *   callbacks.
 * - `streamFunction`: the `updates` stream. It validates and counts each row
 *   on the round's item and, once every expected client is in, answers
 *   StartRound's task token with the hand-over. It never reads or writes S3
 *   and never publishes, so it runs at a small memory (streamMemoryMb) with
 *   a short timeout (STREAM_TIMEOUT), and its role has no S3, SNS or KMS
 *   statement at all.
 *
 * Both run the same code asset: built (or copied from lambdaAsset) once for
 * the aggregator, and the stream function points at that asset's S3 object.
 *
 * The stream DLQ and the event source mapping keep the construct ids they
 * had when one function served both, so an existing deployment updates the
 * mapping in place (its FunctionName: no replacement, the stream position is
 * kept) and keeps the DLQ with any records parked in it.
 *
 * The roles are written out statement by statement instead of with CDK grant
 * helpers: several helpers add `Resource: "*"` (DynamoDB's ListStreams,
 * X-Ray) or wildcard actions (`s3:GetObject*`, `s3:List*`).
 */
export class Aggregator extends Construct {
  /** The aggregator: every task of the state machine. */
  readonly function: lambda.Function;
  readonly role: iam.Role;
  readonly logGroup: logs.LogGroup;
  /** The `updates` stream's function (validate, count, hand over). */
  readonly streamFunction: lambda.Function;
  readonly streamRole: iam.Role;
  readonly streamLogGroup: logs.LogGroup;
  readonly streamDlq: sqs.Queue;
  readonly streamMapping: lambda.EventSourceMapping;

  constructor(scope: Construct, id: string, props: AggregatorProps) {
    super(scope, id);
    const { store, ledger, messaging } = props;
    const bucketArn = store.bucket.bucketArn;

    this.logGroup = new logs.LogGroup(this, 'Logs', {
      retention: props.logRetentionDays as logs.RetentionDays,
    });

    this.role = new iam.Role(this, 'Role', {
      assumedBy: new iam.ServicePrincipal('lambda.amazonaws.com'),
      description: 'fedstep aggregator Lambda: round engine and aggregation',
    });
    const allow = (sid: string, actions: string[], resources: string[], conditions?: Record<string, unknown>): void => {
      this.role.addToPrincipalPolicy(new iam.PolicyStatement({ sid, actions, resources, conditions }));
    };
    allow('Logs', ['logs:CreateLogStream', 'logs:PutLogEvents'], [this.logGroup.logGroupArn]);
    // Updates are read in place with GETs pinned to the version the HEAD saw
    // (GetObjectVersion); a streamed global model's SHA-256 is its object
    // tag, written after the upload completes and read back by HEAD-time
    // checks (crates/aws/src/s3_writer.rs, s3.rs `head`).
    allow('ReadModels', [
      's3:GetObject', 's3:GetObjectVersion', 's3:GetObjectAttributes',
      's3:GetObjectTagging', 's3:GetObjectVersionTagging',
    ], [`${bucketArn}/${KEYS.allJobObjects}`]);
    // A sharded aggregation's outputs are uploads in parts written by
    // several invocations (crates/aws/src/s3_parts.rs): the commit completes
    // them, an attempt given up aborts them, and the round's tasks may read
    // an upload's parts back (ListParts needs s3:ListMultipartUploadParts).
    // Attempts keep their plan, statistics, decision and receipts under
    // jobs/{job}/rounds/{r}/attempts/, inside this same jobs/ scope.
    allow('WriteModels', [
      's3:PutObject', 's3:AbortMultipartUpload', 's3:ListMultipartUploadParts',
      's3:PutObjectTagging', 's3:PutObjectVersionTagging',
    ], [`${bucketArn}/${KEYS.allJobObjects}`]);
    allow('ListJobs', ['s3:ListBucket'], [bucketArn], { StringLike: { 's3:prefix': [KEYS.allJobObjects] } });
    allow('RoundsTable',
      ['dynamodb:GetItem', 'dynamodb:PutItem', 'dynamodb:UpdateItem', 'dynamodb:Query', 'dynamodb:ConditionCheckItem'],
      [ledger.rounds.tableArn, ledger.artifactsIndexArn]);
    // PutItem: StartRound of an async job's version carries the rows that
    // came late for an earlier version into it (crates/cloud/src/engine/
    // carry.rs): a conditional put of a copy of the client's own row.
    allow('UpdatesTable', ['dynamodb:GetItem', 'dynamodb:BatchGetItem', 'dynamodb:Query', 'dynamodb:PutItem'],
      [ledger.updates.tableArn]);
    allow('Publish', ['sns:Publish'], [messaging.topic.topicArn]);
    allow('TopicKey', ['kms:GenerateDataKey', 'kms:Decrypt'], [messaging.key.keyArn]);
    allow('TaskCallbacks', ['states:SendTaskSuccess', 'states:SendTaskFailure', 'states:SendTaskHeartbeat'], [props.stateMachineArn]);

    // One value for the function's timeout and the lease derived from it.
    const timeout = Duration.minutes(props.timeoutMinutes);
    const architecture = props.architecture === 'arm64' ? lambda.Architecture.ARM_64 : lambda.Architecture.X86_64;
    // Both functions get the same environment: the bootstrap builds its
    // whole engine at start (crates/lambda/src/aws_engine.rs), and that
    // requires FEDSTEP_BUCKET, the two tables and FEDSTEP_TOPIC_ARN even where
    // the stream path never uses the bucket or the topic. Names only: access
    // is what the roles grant.
    const environment: Record<string, string> = {
      FEDSTEP_BUCKET: store.bucket.bucketName,
      FEDSTEP_ROUNDS_TABLE: ledger.rounds.tableName,
      FEDSTEP_UPDATES_TABLE: ledger.updates.tableName,
      // No FEDSTEP_TRAINING_COMPLETE_TOPIC_ARN: job ends go to the
      // same topic (lib/messaging.ts; crates/aws/src/sns.rs falls back to it).
      FEDSTEP_TOPIC_ARN: messaging.topic.topicArn,
      FEDSTEP_STATE_MACHINE_ARN: props.stateMachineArn,
      // A crashed aggregation is taken over after the lease; a live one
      // must never be: the lease outlives the function's timeout (see
      // LEASE_MARGIN). Unset, the Lambda would assume 960 s: right for
      // the 15-minute maximum, needlessly long for a shorter timeout (a
      // crashed round would wait that long to be taken over).
      // The stream function gets the same value: it never claims a round,
      // and a lease must outlive the aggregator's timeout, not its own.
      FEDSTEP_LEASE_SECONDS: String(leaseSeconds(timeout)),
      RUST_LOG: props.rustLog,
    };
    const common: lambda.FunctionOptions = {
      description: 'fedstep round engine: start_round, the sharded aggregation\'s tasks, finalize, report_failure',
      architecture,
      memorySize: props.memoryMb,
      timeout,
      role: this.role,
      logGroup: this.logGroup,
      loggingFormat: lambda.LoggingFormat.JSON,
      environment,
    };

    if (props.lambdaAsset !== undefined) {
      if (!fs.existsSync(props.lambdaAsset) || !fs.statSync(props.lambdaAsset).isDirectory()) {
        throw new Error(`lambdaAsset ${props.lambdaAsset} is not a directory (expected one containing the "bootstrap" binary)`);
      }
      this.function = new lambda.Function(this, 'Function', {
        ...common,
        runtime: lambda.Runtime.PROVIDED_AL2023,
        handler: 'bootstrap',
        code: lambda.Code.fromAsset(props.lambdaAsset),
      });
    } else {
      if (!fs.existsSync(props.lambdaManifest)) {
        throw new Error(
          `Lambda crate manifest ${props.lambdaManifest} not found. Build from a checkout with crates/lambda, ` +
          'or pass a prebuilt code directory: -c lambdaAsset=path/to/dir-with-bootstrap');
      }
      // cargo-lambda-cdk runs `cargo lambda build --release --bin fedstep-lambda`
      // in the crate's directory at synth time (skipped when the stack is not
      // in aws:cdk:bundling-stacks). The crate is a workspace member, so cargo
      // resolves the workspace root (..) and its target/ by itself.
      this.function = new RustFunction(this, 'Function', {
        ...common,
        manifestPath: props.lambdaManifest,
        binaryName: LAMBDA_BINARY,
        runtime: 'provided.al2023',
        bundling: {
          // The committed Cargo.lock, never a fresh resolution at deploy time.
          // An explicit --target (instead of cargo-lambda-cdk's --x86-64 /
          // --arm64) to pin the glibc version, see LAMBDA_GLIBC.
          // --disable-optimizations: the workspace's release profile, as
          // every test and benchmark builds it, instead of cargo-lambda's
          // own release defaults (panic=abort, thin LTO, one codegen unit,
          // target-cpu=haswell). With panic=abort a panicked aggregation
          // task would kill the process instead of failing the task with
          // AggregatorError and giving its lease up at once, which is what
          // the engine and the workflow's retries are tested for; the
          // benchmark figures are the release profile's; and 16 codegen
          // units without LTO build in a fraction of the time.
          cargoLambdaFlags: [
            '--locked',
            '--disable-optimizations',
            '--target', `${props.architecture === 'arm64' ? 'aarch64' : 'x86_64'}-unknown-linux-gnu.${LAMBDA_GLIBC}`,
          ],
          // Builds locally; requires cargo-lambda + zig on PATH (see README).
          // The Docker fallback would mount only crates/lambda, which cannot
          // build a workspace member.
          // Without debug info (the workspace's release profile keeps line
          // tables for local profiling): 24 MiB (measured with --disable-optimizations).
          environment: { CARGO_TERM_COLOR: 'never', CARGO_PROFILE_RELEASE_STRIP: 'debuginfo' },
        },
      });
    }

    // The stream function: the aggregator's code asset (one build, one
    // upload), its own role, log group, memory and timeout.
    this.streamLogGroup = new logs.LogGroup(this, 'StreamLogs', {
      retention: props.logRetentionDays as logs.RetentionDays,
    });
    this.streamRole = new iam.Role(this, 'StreamRole', {
      assumedBy: new iam.ServicePrincipal('lambda.amazonaws.com'),
      description: 'fedstep stream Lambda: validates and counts updates rows, hands complete rounds over',
    });
    const allowStream = (sid: string, actions: string[], resources: string[]): void => {
      this.streamRole.addToPrincipalPolicy(new iam.PolicyStatement({ sid, actions, resources }));
    };
    allowStream('Logs', ['logs:CreateLogStream', 'logs:PutLogEvents'], [this.streamLogGroup.logGroupArn]);
    // RoundEngine::on_update (crates/cloud/src/engine/update.rs) over
    // DynamoLedger (crates/aws/src/dynamo.rs), all on the rounds table's
    // items (never its index, never the updates table: the stream record
    // carries the row): get_round (and get_job, only to word the refusal
    // of a row naming no round) are consistent GetItems;
    // add_received (ADD to the received set, a GetItem after a lost
    // condition) and record_rejection (SET rejections.<client>, or the
    // whole map when it is missing) are conditional UpdateItems.
    allowStream('RoundsItems', ['dynamodb:GetItem', 'dynamodb:UpdateItem'], [ledger.rounds.tableArn]);
    // What the event source mapping needs, on exactly this stream (the
    // Table.grantStreamRead helper would add ListStreams on "*").
    allowStream('UpdatesStream',
      ['dynamodb:DescribeStream', 'dynamodb:GetRecords', 'dynamodb:GetShardIterator', 'dynamodb:ListStreams'],
      [ledger.updates.tableStreamArn!]);
    // The hand-over (crates/cloud/src/engine/hand_over.rs) is the stream
    // path's only Step Functions call: it never fails a task or sends
    // heartbeats.
    allowStream('HandOver', ['states:SendTaskSuccess'], [props.stateMachineArn]);

    this.streamFunction = new lambda.Function(this, 'StreamFunction', {
      description: 'fedstep updates stream: validates and counts rows, hands a complete round over (no aggregation)',
      architecture,
      memorySize: props.streamMemoryMb,
      timeout: STREAM_TIMEOUT,
      role: this.streamRole,
      logGroup: this.streamLogGroup,
      loggingFormat: lambda.LoggingFormat.JSON,
      environment,
      runtime: lambda.Runtime.PROVIDED_AL2023,
      handler: 'bootstrap',
      code: sharedCode(this.function),
    });

    // Records that still fail after the bounded retries (or are too old) are
    // parked here; the round's deadline (StartRound's timeout, then
    // PlanRound) still closes the round.
    this.streamDlq = new sqs.Queue(this, 'StreamDlq', {
      encryption: sqs.QueueEncryption.SQS_MANAGED,
      enforceSSL: true,
      retentionPeriod: Duration.days(14),
    });
    // Justified: this queue is itself a dead-letter destination (the event
    // source mapping's on-failure destination); a DLQ for a DLQ adds nothing.
    NagSuppressions.addResourceSuppressions(this.streamDlq, [
      { id: 'AwsSolutions-SQS3', reason: 'This queue is the on-failure (dead-letter) destination of the updates stream mapping.' },
    ]);

    this.streamMapping = new lambda.EventSourceMapping(this, 'UpdatesStream', {
      target: this.streamFunction,
      eventSourceArn: ledger.updates.tableStreamArn!,
      startingPosition: lambda.StartingPosition.TRIM_HORIZON,
      batchSize: STREAM_SETTINGS.batchSize,
      filters: [lambda.FilterCriteria.filter({ eventName: lambda.FilterRule.isEqual('INSERT') })],
      reportBatchItemFailures: true,
      bisectBatchOnError: true,
      retryAttempts: STREAM_SETTINGS.retryAttempts,
      maxRecordAge: STREAM_SETTINGS.maxRecordAge,
      onFailure: new SqsDlq(this.streamDlq),
    });
    // The mapping validates its permissions on creation.
    this.streamMapping.node.addDependency(this.streamRole);
    // An update from the one-function layout moves the mapping to the stream
    // function and takes the stream permissions from the aggregator's role:
    // only after the mapping has moved, so it never polls with a role that
    // may no longer read the stream.
    this.role.node.findChild('DefaultPolicy').node.addDependency(this.streamMapping);

    // Justified, and narrowed to two patterns: model objects are addressed by
    // job and round ids chosen at run time (jobs/{job}/rounds/{r}/...), so the
    // Lambda's S3 scope is the jobs/ prefix of this one bucket.
    NagSuppressions.addResourceSuppressions(this.role, [
      {
        id: 'AwsSolutions-IAM5',
        reason: 'Model keys are jobs/{job}/rounds/{r}/... with run-time ids; access is limited to the jobs/ prefix of the model bucket.',
        appliesTo: [{ regex: '/^Resource::<.*Models[0-9A-F]{8}\\.Arn>\\/jobs\\/\\*$/g' }],
      },
    ], true);
  }
}

/**
 * Code for another function from the code asset `fn` was built with (one
 * cargo-lambda build, one staged directory, one upload). RustFunction keeps
 * no handle on its AssetCode, but lambda.Function binds it as an s3 Asset
 * child named `Code` (so does Code.fromAsset for lambdaAsset); a function
 * built from that asset's bucket and key runs the very same zip. Were the
 * asset instead built twice, the CDK would stage and upload it once (same
 * content, same hash), but cargo-lambda would still run twice.
 */
function sharedCode(fn: lambda.Function): lambda.Code {
  const asset = fn.node.tryFindChild('Code');
  if (!(asset instanceof s3assets.Asset)) {
    throw new Error(`${fn.node.path}: no code asset child "Code" to share (cargo-lambda-cdk or aws-cdk-lib changed how a function binds its code)`);
  }
  return lambda.Code.fromBucket(asset.bucket, asset.s3ObjectKey);
}
