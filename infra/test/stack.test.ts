import * as fs from 'fs';
import * as path from 'path';
import { App, Aspects, Stack } from 'aws-cdk-lib';
import { Annotations, Match } from 'aws-cdk-lib/assertions';
import * as sqs from 'aws-cdk-lib/aws-sqs';
import { RustFunction } from 'cargo-lambda-cdk';
import { AwsSolutionsChecks } from 'cdk-nag';
import { LEASE_MARGIN, STREAM_SETTINGS, STREAM_TIMEOUT } from '../lib/aggregator';
import { CLIENT_RESOURCES, ROLES_ANYWHERE_RESOURCES } from '../lib/client-batches';
import { JOB_ARN_OVERHEAD, JOB_ARNS_POLICY_BUDGET, jobPolicyChars, resolveSettings } from '../lib/config';
import { addFedstep } from '../lib/fedstep-app';
import { FedstepStack } from '../lib/fedstep-stack';
import { ARTIFACTS_INDEX } from '../lib/ledger';
import { UPDATE_TAG } from '../lib/model-store';
import { aslPlaceholders } from '../lib/training-workflow';
import {
  allResources, asArray, derefCrossStack, fakeResolve, getAttArn, Json, logicalId, nagErrors, placeholderAsset, policyDocuments,
  resourcesOfType, scratchDir, stackOfClient, substitute, Synth, synthFedstep, testApp,
} from './helpers';
import { decide, Decision } from './iam-eval';

const CLIENTS = ['site-a', 'site-b', 'site-c'];
const CONTEXT = {
  clients: 'site-a,site-b,site-c',
  fedstep: {
    clients: {
      'site-b': { trustedPrincipal: '123456789012', externalId: 'ext-site-b', jobs: ['job-1', 'job-2'] },
      'site-c': { trustedPrincipal: 'arn:aws:iam::210987654321:role/onprem-trainer', externalId: 'ext-site-c' },
    },
  },
};

let s: Synth;
let t: Json; // the main stack's template as JSON
/** The resources of all stacks (main + clients), cross-stack references resolved. */
let all: Record<string, Json>;
beforeAll(() => {
  s = synthFedstep(CONTEXT);
  t = s.template.toJSON();
  all = allResources(s);
});
afterAll(() => fs.rmSync(scratchDir(), { recursive: true, force: true }));

const ids = () => ({
  bucket: logicalId(s.stack, s.stack.store.bucket),
  logBucket: logicalId(s.stack, s.stack.store.accessLogs),
  rounds: logicalId(s.stack, s.stack.ledger.rounds),
  updates: logicalId(s.stack, s.stack.ledger.updates),
  fn: logicalId(s.stack, s.stack.aggregator.function),
  fnRole: logicalId(s.stack, s.stack.aggregator.role),
  fnLogs: logicalId(s.stack, s.stack.aggregator.logGroup),
  streamFn: logicalId(s.stack, s.stack.aggregator.streamFunction),
  streamRole: logicalId(s.stack, s.stack.aggregator.streamRole),
  streamLogs: logicalId(s.stack, s.stack.aggregator.streamLogGroup),
  streamDlq: logicalId(s.stack, s.stack.aggregator.streamDlq),
  key: logicalId(s.stack, s.stack.messaging.key),
  topic: logicalId(s.stack, s.stack.messaging.topic),
  clientDlq: logicalId(s.stack, s.stack.messaging.clientDlq),
  sm: logicalId(s.stack, s.stack.workflow.stateMachine),
  smRole: logicalId(s.stack, s.stack.workflow.role),
  smWildcard: logicalId(s.stack, s.stack.workflow.serviceWildcardPolicy),
});

/** Statements of all identity policies of a role: inline in the role, and IAM policies attached to it (any stack). */
function roleStatements(roleId: string): Json[] {
  const out: Json[] = [];
  for (const inline of asArray<Json>(all[roleId].Properties.Policies)) out.push(...asArray(inline.PolicyDocument.Statement));
  for (const [, p] of resourcesOfType(all, 'AWS::IAM::Policy')) {
    if (asArray<Json>(p.Properties.Roles).some((r) => r.Ref === roleId)) out.push(...asArray(p.Properties.PolicyDocument.Statement));
  }
  return out;
}

/** Logical ids of a client's queue and role (in its clients stack). */
function clientIds(client: string): { queue: string; role: string; stack: string } {
  const stack = stackOfClient(s, client);
  const access = s.deployment.clients.get(client)!;
  return { queue: logicalId(stack, access.queue), role: logicalId(stack, access.role), stack: stack.stackName };
}

const bucketObjects = (bucketId: string, pattern: string): Json => ({ 'Fn::Join': ['', [getAttArn(bucketId), `/${pattern}`]] });

/** Every state of an ASL document, the Maps' inner states included. */
const allStates = (asl: Json): Json[] => Object.values<Json>(asl.States).flatMap((st) =>
  [st, ...(st.ItemProcessor ? allStates(st.ItemProcessor) : [])]);

describe('cdk-nag', () => {
  test('AwsSolutions reports no errors in any stack (suppressions are per resource, each with a reason)', () => {
    expect(s.deployment.batches.size).toBeGreaterThan(1);
    expect(nagErrors(s)).toEqual([]);
  });

  test('the checks are live in this setup (a bare queue fails them)', () => {
    const app = new App();
    const bare = new Stack(app, 'Bare');
    new sqs.Queue(bare, 'Queue');
    Aspects.of(app).add(new AwsSolutionsChecks());
    app.synth();
    expect(Annotations.fromStack(bare).findError('*', Match.stringLikeRegexp('AwsSolutions-SQS4.*')).length).toBe(1);
  });

  test('no stack-wide suppressions', () => {
    for (const tpl of s.templates.values()) {
      expect(JSON.stringify(tpl.Metadata ?? {})).not.toContain('cdk_nag');
      for (const [id, r] of Object.entries<Json>(tpl.Resources)) {
        for (const rule of r.Metadata?.cdk_nag?.rules_to_suppress ?? []) {
          expect({ id, reason: typeof rule.reason === 'string' && rule.reason.length > 20 }).toEqual({ id, reason: true });
        }
      }
    }
  });
});

describe('model bucket', () => {
  test('versioned, SSE, public access blocked, access logs to the log bucket', () => {
    const b = t.Resources[ids().bucket];
    expect(b.Properties.VersioningConfiguration).toEqual({ Status: 'Enabled' });
    expect(b.Properties.BucketEncryption.ServerSideEncryptionConfiguration[0].ServerSideEncryptionByDefault.SSEAlgorithm)
      .toMatch(/^(AES256|aws:kms)$/);
    expect(b.Properties.PublicAccessBlockConfiguration).toEqual({
      BlockPublicAcls: true, BlockPublicPolicy: true, IgnorePublicAcls: true, RestrictPublicBuckets: true,
    });
    expect(b.Properties.LoggingConfiguration.DestinationBucketName).toEqual({ Ref: ids().logBucket });
  });

  test('log bucket: encrypted, public access blocked', () => {
    const b = t.Resources[ids().logBucket];
    expect(b.Properties.BucketEncryption.ServerSideEncryptionConfiguration[0].ServerSideEncryptionByDefault.SSEAlgorithm).toBe('AES256');
    expect(b.Properties.PublicAccessBlockConfiguration.BlockPublicPolicy).toBe(true);
  });

  test('RETAIN by default', () => {
    expect(t.Resources[ids().bucket].DeletionPolicy).toBe('Retain');
    expect(t.Resources[ids().rounds].DeletionPolicy).toBe('Retain');
    expect(t.Resources[ids().updates].DeletionPolicy).toBe('Retain');
  });

  test.each(['bucket', 'logBucket'] as const)('%s policy denies non-TLS requests', (which) => {
    const bucketId = ids()[which];
    const policies = resourcesOfType(s.template, 'AWS::S3::BucketPolicy').filter(([, p]) => p.Properties.Bucket.Ref === bucketId);
    expect(policies).toHaveLength(1);
    expect(policies[0][1].Properties.PolicyDocument.Statement).toEqual(expect.arrayContaining([{
      Action: 's3:*',
      Condition: { Bool: { 'aws:SecureTransport': 'false' } },
      Effect: 'Deny',
      Principal: { AWS: '*' },
      Resource: [getAttArn(bucketId), { 'Fn::Join': ['', [getAttArn(bucketId), '/*']] }],
    }]));
  });

  test('lifecycle: update objects (tagged by the client at upload) expire, noncurrent versions too', () => {
    const rules: Json[] = t.Resources[ids().bucket].Properties.LifecycleConfiguration.Rules;
    const updates = rules.find((r) => r.Id === 'expire-client-updates');
    expect(updates).toMatchObject({
      Status: 'Enabled',
      Prefix: 'jobs/',
      TagFilters: [{ Key: UPDATE_TAG.key, Value: UPDATE_TAG.value }],
      ExpirationInDays: 30,
      NoncurrentVersionExpiration: { NoncurrentDays: 7 },
    });
    // The tag the client's S3 adapter sets is this one (crates/aws/src/s3.rs).
    const s3rs = fs.readFileSync(path.resolve(__dirname, '..', '..', 'crates', 'aws', 'src', 's3.rs'), 'utf8');
    expect(s3rs).toContain(`pub const UPDATE_TAGGING: &str = "${UPDATE_TAG.key}=${UPDATE_TAG.value}";`);
    const noncurrent = rules.find((r) => r.Id === 'expire-noncurrent-versions');
    expect(noncurrent).toMatchObject({ Status: 'Enabled', Prefix: 'jobs/', NoncurrentVersionExpiration: { NoncurrentDays: 7 } });
  });
});

describe('ledger tables', () => {
  test('rounds: keys, artifact GSI, PITR, encryption, on-demand', () => {
    const p = t.Resources[ids().rounds].Properties;
    expect(p.KeySchema).toEqual([{ AttributeName: 'job_id', KeyType: 'HASH' }, { AttributeName: 'round', KeyType: 'RANGE' }]);
    expect(p.AttributeDefinitions).toEqual(expect.arrayContaining([
      { AttributeName: 'job_id', AttributeType: 'S' }, { AttributeName: 'round', AttributeType: 'N' },
      { AttributeName: 'artifact_llm_type', AttributeType: 'S' }, { AttributeName: 'artifact_created_at', AttributeType: 'S' },
    ]));
    expect(p.GlobalSecondaryIndexes).toEqual([{
      IndexName: ARTIFACTS_INDEX,
      KeySchema: [{ AttributeName: 'artifact_llm_type', KeyType: 'HASH' }, { AttributeName: 'artifact_created_at', KeyType: 'RANGE' }],
      Projection: { ProjectionType: 'ALL' },
    }]);
    expect(p.PointInTimeRecoverySpecification).toEqual({ PointInTimeRecoveryEnabled: true });
    expect(p.SSESpecification.SSEEnabled).toBe(true);
    expect(p.BillingMode).toBe('PAY_PER_REQUEST');
  });

  test('updates: keys, NEW_IMAGE stream, PITR, encryption, on-demand', () => {
    const p = t.Resources[ids().updates].Properties;
    expect(p.KeySchema).toEqual([{ AttributeName: 'client_id', KeyType: 'HASH' }, { AttributeName: 'job_round', KeyType: 'RANGE' }]);
    expect(p.AttributeDefinitions).toEqual([
      { AttributeName: 'client_id', AttributeType: 'S' }, { AttributeName: 'job_round', AttributeType: 'S' },
    ]);
    expect(p.StreamSpecification).toEqual({ StreamViewType: 'NEW_IMAGE' });
    expect(p.PointInTimeRecoverySpecification).toEqual({ PointInTimeRecoveryEnabled: true });
    expect(p.SSESpecification.SSEEnabled).toBe(true);
    expect(p.BillingMode).toBe('PAY_PER_REQUEST');
  });
});

describe('messaging', () => {
  test('one topic (both notification kinds): KMS-encrypted with the rotated stack key, TLS-only', () => {
    const topics = resourcesOfType(all, 'AWS::SNS::Topic');
    expect(topics.map(([id]) => id)).toEqual([ids().topic]);
    expect(t.Resources[ids().key].Properties.EnableKeyRotation).toBe(true);
    for (const [topicId, topic] of topics) {
      expect(topic.Properties.KmsMasterKeyId).toEqual(getAttArn(ids().key));
      const policies = resourcesOfType(s.template, 'AWS::SNS::TopicPolicy')
        .filter(([, p]) => asArray<Json>(p.Properties.Topics).some((x) => x.Ref === topicId));
      expect(policies).toHaveLength(1);
      expect(policies[0][1].Properties.PolicyDocument.Statement).toEqual(expect.arrayContaining([
        expect.objectContaining({ Effect: 'Deny', Condition: { Bool: { 'aws:SecureTransport': 'false' } }, Resource: { Ref: topicId } }),
      ]));
    }
  });

  test('every queue: encrypted, TLS-only; client queues dead-letter into the one shared DLQ', () => {
    const queues = resourcesOfType(all, 'AWS::SQS::Queue');
    // The stream DLQ, the clients' shared DLQ, one queue per client.
    expect(queues).toHaveLength(2 + CLIENTS.length);
    for (const [queueId, q] of queues) {
      expect(q.Properties.SqsManagedSseEnabled === true || q.Properties.KmsMasterKeyId !== undefined).toBe(true);
      const policies = resourcesOfType(all, 'AWS::SQS::QueuePolicy')
        .filter(([, p]) => asArray<Json>(p.Properties.Queues).some((x) => x.Ref === queueId));
      expect(policies).toHaveLength(1);
      expect(policies[0][1].Properties.PolicyDocument.Statement).toEqual(expect.arrayContaining([
        expect.objectContaining({ Effect: 'Deny', Condition: { Bool: { 'aws:SecureTransport': 'false' } }, Resource: getAttArn(queueId) }),
      ]));
    }
    for (const client of CLIENTS) {
      const q = all[clientIds(client).queue];
      expect(q.Properties.RedrivePolicy).toEqual({ deadLetterTargetArn: getAttArn(ids().clientDlq), maxReceiveCount: 5 });
    }
    // The shared DLQ is no client's queue: nobody receives from it but the operator.
    expect(all[ids().clientDlq].Properties.RedrivePolicy).toBeUndefined();
    expect(all[ids().clientDlq].Properties.MessageRetentionPeriod).toBeGreaterThan(all[clientIds('site-a').queue].Properties.MessageRetentionPeriod);
  });

  test('client subscriptions: one per client on the one topic (both kinds), raw delivery, job_id filter only where configured', () => {
    const subs = resourcesOfType(all, 'AWS::SNS::Subscription');
    expect(subs).toHaveLength(CLIENTS.length);
    for (const client of CLIENTS) {
      const queueId = clientIds(client).queue;
      const mine = subs.filter(([, x]) => JSON.stringify(x.Properties.Endpoint) === JSON.stringify(getAttArn(queueId)));
      expect(mine.map(([, x]) => x.Properties.TopicArn)).toEqual([{ Ref: ids().topic }]);
      for (const [, sub] of mine) {
        expect(sub.Properties).toMatchObject({ Protocol: 'sqs', RawMessageDelivery: true });
        if (client === 'site-b') {
          expect(sub.Properties.FilterPolicy).toEqual({ job_id: ['job-1', 'job-2'] });
          expect(sub.Properties.FilterPolicyScope ?? 'MessageAttributes').toBe('MessageAttributes');
        } else {
          expect(sub.Properties.FilterPolicy).toBeUndefined();
        }
      }
    }
  });

  test('each client queue lets exactly the topic send to it', () => {
    for (const client of CLIENTS) {
      const queueId = clientIds(client).queue;
      const policies = resourcesOfType(all, 'AWS::SQS::QueuePolicy')
        .filter(([, p]) => asArray<Json>(p.Properties.Queues).some((x) => x.Ref === queueId));
      expect(policies).toHaveLength(1);
      expect(asArray<Json>(policies[0][1].Properties.Queues)).toEqual([{ Ref: queueId }]);
      const sends = asArray<Json>(policies[0][1].Properties.PolicyDocument.Statement).filter((st) => st.Action === 'sqs:SendMessage');
      expect(sends.map((st) => st.Condition.ArnEquals['aws:SourceArn'])).toEqual([{ Ref: ids().topic }]);
      for (const st of sends) expect(st.Principal).toEqual({ Service: 'sns.amazonaws.com' });
    }
  });
});

describe('aggregator Lambda', () => {
  test('runtime, arch, memory, timeout, JSON logs, environment', () => {
    const p = t.Resources[ids().fn].Properties;
    expect(p.Runtime).toBe('provided.al2023');
    expect(p.Handler).toBe('bootstrap');
    expect(p.Architectures).toEqual(['x86_64']); // the default (lib/config.ts)
    expect(p.MemorySize).toBe(3008);
    expect(p.Timeout).toBe(900);
    expect(p.LoggingConfig.LogFormat).toBe('JSON');
    const env = p.Environment.Variables;
    expect(env).toMatchObject({
      FEDSTEP_BUCKET: { Ref: ids().bucket },
      FEDSTEP_ROUNDS_TABLE: { Ref: ids().rounds },
      FEDSTEP_UPDATES_TABLE: { Ref: ids().updates },
      FEDSTEP_TOPIC_ARN: { Ref: ids().topic },
      RUST_LOG: 'info',
    });
    // The lease outlives the function's timeout by the margin: 900 + 60.
    expect(env.FEDSTEP_LEASE_SECONDS).toBe('960');
    expect(Number(env.FEDSTEP_LEASE_SECONDS)).toBe(p.Timeout + LEASE_MARGIN.toSeconds());
    // ...under the name the Lambda reads (crates/lambda/src/aws_engine.rs).
    const engineRs = fs.readFileSync(path.resolve(__dirname, '..', '..', 'crates', 'lambda', 'src', 'aws_engine.rs'), 'utf8');
    expect(engineRs).toContain('std::env::var("FEDSTEP_LEASE_SECONDS")');
    // training_complete goes to the same topic: the Lambda falls back to
    // FEDSTEP_TOPIC_ARN when this one is unset (next test).
    expect(env.FEDSTEP_TRAINING_COMPLETE_TOPIC_ARN).toBeUndefined();
    expect(roleStatements(ids().fnRole).filter((st) => st.Sid === 'Publish'))
      .toEqual([{ Sid: 'Publish', Effect: 'Allow', Action: 'sns:Publish', Resource: { Ref: ids().topic } }]);
    // Derived from the fixed name (no dependency cycle), and the right one.
    expect(fakeResolve(env.FEDSTEP_STATE_MACHINE_ARN))
      .toBe(`arn:aws:states:eu-west-1:111122223333:stateMachine:${t.Resources[ids().sm].Properties.StateMachineName}`);
  });

  test('the Lambda publishes the job ends (training_complete, job_failed) to FEDSTEP_TOPIC_ARN when FEDSTEP_TRAINING_COMPLETE_TOPIC_ARN is unset', () => {
    // crates/aws/src/sns.rs: the one-topic layout (lib/messaging.ts) relies on this fallback,
    // for both kinds that end a job (job_failed: the state machine's ReportFailure).
    const sns = fs.readFileSync(path.resolve(__dirname, '..', '..', 'crates', 'aws', 'src', 'sns.rs'), 'utf8');
    expect(sns).toMatch(/Notification::TrainingComplete\(_\)\s*\|\s*Notification::JobFailed\(_\)\s*=>\s*self\s*\.training_complete_topic_arn\s*\.as_deref\(\)\s*\.unwrap_or\(&self\.topic_arn\)/);
    // Both kinds carry the attributes the subscriptions filter on (job_id) and operators may filter on (type).
    expect(sns).toContain('.message_attributes("job_id"');
    expect(sns).toContain('.message_attributes("type"');
  });

  test('S3: reads pinned to versions, writes multipart, tags the streamed model\'s SHA-256, only under jobs/', () => {
    // crates/aws/src/s3_reader.rs (GetObject with a versionId) and s3_writer.rs
    // (multipart, then PutObjectTagging on the completed version).
    const byId = Object.fromEntries(roleStatements(ids().fnRole).map((st) => [st.Sid, st]));
    const objects = bucketObjects(ids().bucket, 'jobs/*');
    expect(byId.ReadModels).toEqual({
      Sid: 'ReadModels', Effect: 'Allow', Resource: objects,
      Action: ['s3:GetObject', 's3:GetObjectAttributes', 's3:GetObjectTagging', 's3:GetObjectVersion',
        's3:GetObjectVersionTagging'],
    });
    expect(byId.WriteModels).toEqual({
      Sid: 'WriteModels', Effect: 'Allow', Resource: objects,
      Action: ['s3:AbortMultipartUpload', 's3:ListMultipartUploadParts', 's3:PutObject', 's3:PutObjectTagging',
        's3:PutObjectVersionTagging'],
    });
  });

  test('S3: the sharded round\'s tasks read and write an attempt\'s objects and uploads in parts, nothing outside jobs/', () => {
    // statemachine/README.md: a round's attempts keep their plan, statistics,
    // decision and part receipts under jobs/{job}/rounds/{r}/attempts/; the
    // outputs are uploads in parts that several invocations write, one
    // completes, and an attempt given up aborts.
    const bucketArn = 'arn:aws:s3:::fedstep-models';
    const resolve = (r: Json): string => {
      if (typeof r === 'string') return r;
      const parts = r['Fn::Join']?.[1] as Json[] | undefined;
      if (parts?.length === 2 && JSON.stringify(parts[0]) === JSON.stringify(getAttArn(ids().bucket))) return `${bucketArn}${parts[1]}`;
      return 'arn:aws:not-the-bucket';
    };
    const stmts = roleStatements(ids().fnRole);
    const s3 = (action: string, key: string): Decision => decide(stmts, { action, resource: `${bucketArn}/${key}` }, resolve);
    const actions = ['s3:GetObject', 's3:PutObject', 's3:AbortMultipartUpload', 's3:ListMultipartUploadParts'];
    for (const key of ['jobs/job-1/rounds/3/attempts/a1/plan.json', 'jobs/job-1/rounds/3/attempts/a1/shards/0/statistics.bin',
      'jobs/job-1/rounds/4/global.safetensors']) {
      for (const action of actions) expect([action, key, s3(action, key)]).toEqual([action, key, 'allowed']);
    }
    for (const action of actions) expect([action, s3(action, 'other/job-1/x')]).toEqual([action, 'implicitly denied']);
  });

  test('updates table: reads rows, and puts one only to carry an async job\'s late row into the next version', () => {
    // crates/cloud/src/engine/aggregation.rs reads rows (GetItem); carry.rs
    // puts a copy of a late row (conditional PutItem). Nothing deletes or
    // rewrites a row, and nothing reaches the table's stream from here.
    const byId = Object.fromEntries(roleStatements(ids().fnRole).map((st) => [st.Sid, st]));
    expect(byId.UpdatesTable).toEqual({
      Sid: 'UpdatesTable', Effect: 'Allow', Resource: getAttArn(ids().updates),
      Action: ['dynamodb:BatchGetItem', 'dynamodb:GetItem', 'dynamodb:PutItem', 'dynamodb:Query'],
    });
    const actions = roleStatements(ids().fnRole).flatMap((st) => asArray<string>(st.Action));
    for (const a of ['dynamodb:DeleteItem', 'dynamodb:Scan', 'dynamodb:BatchWriteItem']) expect(actions).not.toContain(a);
  });

  test('the default code path is cargo-lambda-cdk RustFunction (bundling skipped here)', () => {
    expect(s.stack.aggregator.function).toBeInstanceOf(RustFunction);
  });

  test('updates stream mapping: on the stream function; INSERT filter, partial batch failures, bisect, bounded retries, DLQ', () => {
    const mappings = resourcesOfType(s.template, 'AWS::Lambda::EventSourceMapping');
    expect(mappings).toHaveLength(1);
    const p = mappings[0][1].Properties;
    expect(p.EventSourceArn).toEqual({ 'Fn::GetAtt': [ids().updates, 'StreamArn'] });
    expect(p.FunctionName).toEqual({ Ref: ids().streamFn });
    expect(p.BatchSize).toBe(STREAM_SETTINGS.batchSize);
    expect(p.FilterCriteria).toEqual({ Filters: [{ Pattern: JSON.stringify({ eventName: ['INSERT'] }) }] });
    expect(p.FunctionResponseTypes).toEqual(['ReportBatchItemFailures']);
    expect(p.BisectBatchOnFunctionError).toBe(true);
    expect(p.MaximumRetryAttempts).toBe(STREAM_SETTINGS.retryAttempts);
    expect(p.MaximumRetryAttempts).toBeGreaterThanOrEqual(0);
    expect(p.MaximumRecordAgeInSeconds).toBe(STREAM_SETTINGS.maxRecordAge.toSeconds());
    expect(p.DestinationConfig).toEqual({ OnFailure: { Destination: getAttArn(ids().streamDlq) } });
    expect(p.StartingPosition).toBe('TRIM_HORIZON');
  });

  test('may answer task tokens of exactly this state machine', () => {
    // A retried start_round that finds its round complete hands it over on
    // its new token itself (statemachine/README.md).
    const stmts = roleStatements(ids().fnRole).filter((st) => asArray<string>(st.Action).some((a) => a.startsWith('states:')));
    expect(stmts).toHaveLength(1);
    expect(asArray(stmts[0].Action).sort()).toEqual(['states:SendTaskFailure', 'states:SendTaskHeartbeat', 'states:SendTaskSuccess']);
    expect(fakeResolve(stmts[0].Resource))
      .toBe(`arn:aws:states:eu-west-1:111122223333:stateMachine:${t.Resources[ids().sm].Properties.StateMachineName}`);
  });

  test('no longer reads the stream (the stream function does)', () => {
    const actions = roleStatements(ids().fnRole).flatMap((st) => asArray<string>(st.Action));
    for (const a of ['dynamodb:GetRecords', 'dynamodb:GetShardIterator', 'dynamodb:DescribeStream', 'dynamodb:ListStreams']) {
      expect(actions).not.toContain(a);
    }
  });
});

describe('stream Lambda', () => {
  const stateMachineArn = (): string =>
    `arn:aws:states:eu-west-1:111122223333:stateMachine:${t.Resources[ids().sm].Properties.StateMachineName}`;

  test('small memory, short timeout, same runtime, arch, JSON logs and environment as the aggregator, its own log group', () => {
    const p = t.Resources[ids().streamFn].Properties;
    const agg = t.Resources[ids().fn].Properties;
    expect(p.MemorySize).toBe(256); // streamMemoryMb's default (lib/config.ts)
    expect(p.Timeout).toBe(STREAM_TIMEOUT.toSeconds());
    expect(p.Timeout).toBe(120);
    expect(p.Runtime).toBe('provided.al2023');
    expect(p.Handler).toBe('bootstrap');
    expect(p.Architectures).toEqual(agg.Architectures);
    expect(p.LoggingConfig).toEqual({ LogFormat: 'JSON', LogGroup: { Ref: ids().streamLogs } });
    expect(agg.LoggingConfig).toEqual({ LogFormat: 'JSON', LogGroup: { Ref: ids().fnLogs } });
    expect(p.Role).toEqual(getAttArn(ids().streamRole));
    // The bootstrap builds the whole engine at start and requires every
    // FEDSTEP_* name (crates/lambda/src/aws_engine.rs): the same environment.
    expect(p.Environment).toEqual(agg.Environment);
    for (const v of ['FEDSTEP_BUCKET', 'FEDSTEP_ROUNDS_TABLE', 'FEDSTEP_UPDATES_TABLE', 'FEDSTEP_TOPIC_ARN']) {
      expect(p.Environment.Variables[v]).toBeDefined();
    }
    // A batch (at most batchSize rows) fits many times over in the timeout;
    // the aggregator keeps its own (next tests).
    expect(STREAM_SETTINGS.batchSize).toBeLessThanOrEqual(10);
    expect(p.Timeout).toBeLessThan(agg.Timeout);
  });

  test('both functions run the same code asset (one build, one upload)', () => {
    const fns = resourcesOfType(s.template, 'AWS::Lambda::Function');
    expect(fns.map(([id]) => id).sort()).toEqual([ids().fn, ids().streamFn].sort());
    const code = t.Resources[ids().fn].Properties.Code;
    expect(code.S3Key).toMatch(/^[0-9a-f]{64}\.zip$/);
    expect(t.Resources[ids().streamFn].Properties.Code).toEqual(code);
    // One Lambda code asset to stage and publish (the other file asset is the ASL).
    const manifest = JSON.parse(fs.readFileSync(path.join(s.assembly.directory, 'Fedstep.assets.json'), 'utf8'));
    const zips = Object.entries<Json>(manifest.files).filter(([, f]) => f.source.packaging === 'zip');
    expect(zips.map(([hash]) => `${hash}.zip`)).toEqual([code.S3Key]);
  });

  test('role: logs to its own group, GetItem/UpdateItem on the rounds table, reads exactly the updates stream, SendTaskSuccess, its DLQ', () => {
    const stmts = roleStatements(ids().streamRole);
    const bySid = Object.fromEntries(stmts.filter((st) => st.Sid !== undefined).map((st) => [st.Sid, st]));
    expect(bySid.Logs).toEqual({
      Sid: 'Logs', Effect: 'Allow', Action: ['logs:CreateLogStream', 'logs:PutLogEvents'], Resource: getAttArn(ids().streamLogs),
    });
    // on_update's ledger calls (crates/cloud/src/engine/update.rs over
    // crates/aws/src/dynamo.rs): get_round, and get_job only for a row
    // naming no round (GetItem); add_received, record_rejection
    // (UpdateItem); all on the table's items, no index.
    expect(bySid.RoundsItems).toEqual({
      Sid: 'RoundsItems', Effect: 'Allow', Action: ['dynamodb:GetItem', 'dynamodb:UpdateItem'], Resource: getAttArn(ids().rounds),
    });
    expect(bySid.UpdatesStream).toEqual({
      Sid: 'UpdatesStream', Effect: 'Allow',
      Action: ['dynamodb:DescribeStream', 'dynamodb:GetRecords', 'dynamodb:GetShardIterator', 'dynamodb:ListStreams'],
      Resource: { 'Fn::GetAtt': [ids().updates, 'StreamArn'] },
    });
    expect(bySid.HandOver).toMatchObject({ Sid: 'HandOver', Effect: 'Allow', Action: 'states:SendTaskSuccess' });
    expect(fakeResolve(bySid.HandOver.Resource)).toBe(stateMachineArn());
    // The mapping's on-failure destination (CDK's SqsDlq grant): send to exactly the stream DLQ.
    const unnamed = stmts.filter((st) => st.Sid === undefined);
    expect(unnamed).toEqual([{
      Effect: 'Allow', Action: ['sqs:GetQueueAttributes', 'sqs:GetQueueUrl', 'sqs:SendMessage'], Resource: getAttArn(ids().streamDlq),
    }]);
    expect(Object.keys(bySid).sort()).toEqual(['HandOver', 'Logs', 'RoundsItems', 'UpdatesStream']);
  });

  test('role: no S3, SNS or KMS action at all, no other table, index or Step Functions action', () => {
    const stmts = roleStatements(ids().streamRole);
    const actions = stmts.flatMap((st) => asArray<string>(st.Action));
    expect(actions.filter((a) => /^(s3|sns|kms):/.test(a))).toEqual([]);
    expect(actions.filter((a) => a.startsWith('states:'))).toEqual(['states:SendTaskSuccess']);
    expect(actions.filter((a) => a.startsWith('dynamodb:')).sort()).toEqual([
      'dynamodb:DescribeStream', 'dynamodb:GetItem', 'dynamodb:GetRecords', 'dynamodb:GetShardIterator',
      'dynamodb:ListStreams', 'dynamodb:UpdateItem',
    ]);
    const text = JSON.stringify(stmts);
    for (const other of [ids().bucket, ids().topic, ids().key]) expect(text).not.toContain(`"${other}"`);
    // The updates table itself only through its stream ARN.
    for (const st of stmts) {
      for (const r of asArray<Json>(st.Resource)) {
        if (JSON.stringify(r).includes(ids().updates)) expect(r).toEqual({ 'Fn::GetAtt': [ids().updates, 'StreamArn'] });
      }
    }
    // Denied by the evaluator too, whatever the resource: every statement's
    // resources read as "*", so only the actions decide.
    const anyResource = (): string => '*';
    for (const action of ['s3:GetObject', 's3:PutObject', 's3:ListBucket', 'sns:Publish', 'kms:Decrypt', 'kms:GenerateDataKey',
      'states:SendTaskFailure', 'states:SendTaskHeartbeat', 'dynamodb:PutItem', 'dynamodb:Query', 'dynamodb:Scan',
      'dynamodb:BatchGetItem', 'dynamodb:DeleteItem']) {
      expect([action, decide(stmts, { action, resource: 'arn:aws:any' }, anyResource)]).toEqual([action, 'implicitly denied']);
    }
    expect(decide(stmts, { action: 'dynamodb:UpdateItem', resource: 'arn:aws:any' }, anyResource)).toBe('allowed');
  });

  test('the mapping waits for the stream role; the aggregator\'s policy update waits for the mapping', () => {
    const [[mappingId, mapping]] = resourcesOfType(s.template, 'AWS::Lambda::EventSourceMapping');
    const streamPolicy = resourcesOfType(s.template, 'AWS::IAM::Policy')
      .filter(([, p]) => asArray<Json>(p.Properties.Roles).some((r) => r.Ref === ids().streamRole));
    expect(streamPolicy).toHaveLength(1);
    expect(mapping.DependsOn).toEqual(expect.arrayContaining([ids().streamRole, streamPolicy[0][0]]));
    const aggPolicy = resourcesOfType(s.template, 'AWS::IAM::Policy')
      .filter(([, p]) => asArray<Json>(p.Properties.Roles).some((r) => r.Ref === ids().fnRole));
    expect(aggPolicy).toHaveLength(1);
    expect(aggPolicy[0][1].DependsOn).toEqual(expect.arrayContaining([mappingId]));
  });

  test('the stream DLQ and the mapping keep their logical ids from the one-function layout (updated in place)', () => {
    // Renaming either would replace it: a new mapping re-reads the stream
    // from TRIM_HORIZON, a new DLQ drops the records parked in the old one.
    const [[mappingId]] = resourcesOfType(s.template, 'AWS::Lambda::EventSourceMapping');
    expect(mappingId).toMatch(/^AggregatorUpdatesStream[0-9A-F]{8}$/);
    expect(ids().streamDlq).toMatch(/^AggregatorStreamDlq[0-9A-F]{8}$/);
    expect(ids().fn).toMatch(/^AggregatorFunction[0-9A-F]{8}$/);
  });
});

describe('state machine', () => {
  const aslPath = path.resolve(__dirname, '..', '..', 'statemachine', 'federated_training.asl.json');
  const awsSubstitutionsPath = path.resolve(__dirname, '..', '..', 'statemachine', 'aws-substitutions.json');

  test('STANDARD, logging ALL to its log group, X-Ray tracing', () => {
    const p = t.Resources[ids().sm].Properties;
    expect(p.StateMachineType).toBe('STANDARD');
    expect(p.LoggingConfiguration).toEqual({
      Destinations: [{ CloudWatchLogsLogGroup: { LogGroupArn: getAttArn(logicalId(s.stack, s.stack.workflow.logGroup)) } }],
      IncludeExecutionData: true,
      Level: 'ALL',
    });
    expect(p.TracingConfiguration).toEqual({ Enabled: true });
  });

  test('definition comes from statemachine/ with every placeholder substituted', () => {
    const p = t.Resources[ids().sm].Properties;
    const subs: Record<string, Json> = p.DefinitionSubstitutions;
    const lambdaArn = getAttArn(ids().fn);
    for (const name of ['AggregatorFunctionArn', 'PlanRoundResource', 'ShardStatisticsResource', 'DecideRoundResource',
      'AggregateShardResource', 'CommitRoundResource', 'FinalizeResource', 'ReportFailureResource']) {
      expect([name, subs[name]]).toEqual([name, lambdaArn]);
    }
    expect(fakeResolve(subs.StartRoundResource)).toBe('arn:aws:states:::lambda:invoke.waitForTaskToken');
    const fnArn = fakeResolve(lambdaArn);

    // statemachine/aws-substitutions.json is the same table with the partition
    // and the function ARN left open; tests/statemachine/test_aws_variant.py
    // runs the definition it yields on LocalStack. They must not drift apart.
    const table: Record<string, string> = JSON.parse(fs.readFileSync(awsSubstitutionsPath, 'utf8'));
    const fromTable = Object.fromEntries(Object.entries(table).map(([name, value]) =>
      [name, value.replaceAll('{partition}', 'aws').replaceAll('{function_arn}', fnArn)]));
    expect(Object.fromEntries(Object.entries(subs).map(([name, value]) => [name, fakeResolve(value)]))).toEqual(fromTable);

    // The staged definition is the file in statemachine/, byte for byte...
    const staged = path.join(s.assembly.directory, `asset.${p.DefinitionS3Location.Key}`);
    const source = fs.readFileSync(aslPath, 'utf8');
    expect(fs.readFileSync(staged, 'utf8')).toBe(source);
    // ...and after CloudFormation's substitution no ${...} is left.
    expect(Object.keys(subs).sort()).toEqual(expect.arrayContaining(aslPlaceholders(source)));
    const deployed = substitute(source, subs);
    // (A literal "${...}" in prose, like the file's Comment, is not a placeholder.)
    expect(deployed).not.toMatch(/\$\{[A-Za-z0-9_]+\}/);
    const asl = JSON.parse(deployed);
    const tasks = allStates(asl).filter((st) => st.Type === 'Task');
    // StartRound, PlanRound, the two Maps' tasks, DecideRound, CommitRound, Finalize, ReportFailure.
    expect(tasks).toHaveLength(8);
    for (const task of tasks) {
      if (task.Resource === 'arn:aws:states:::lambda:invoke.waitForTaskToken') {
        expect(task.Parameters.FunctionName).toBe(fnArn);
      } else {
        expect(task.Resource).toBe(fnArn);
      }
    }
  });

  test('the round as deployed: StartRound waits for the hand-over, then the plan, the shard Maps and the commit invoke the function', () => {
    // statemachine/README.md: the stream path answers StartRound's token
    // with a hand-over (never a result); every round's aggregation is
    // PlanRound, a Map of shard tasks (two with the statistics pass, and
    // DecideRound between them), and CommitRound, each invoking the function.
    const p = t.Resources[ids().sm].Properties;
    const fnArn = fakeResolve(getAttArn(ids().fn));
    const asl = JSON.parse(substitute(fs.readFileSync(aslPath, 'utf8'), p.DefinitionSubstitutions));
    const { StartRound: start, DeadlinePassed: deadline, PlanRound: plan, CommitRound: commit } = asl.States;
    expect(start.Resource).toBe('arn:aws:states:::lambda:invoke.waitForTaskToken');
    expect(start.Parameters.FunctionName).toBe(fnArn);
    expect(start.ResultPath).toBe('$.handover');
    expect(start.Next).toBe('PlanRound');
    expect(start.Catch[0]).toEqual({ ErrorEquals: ['States.Timeout'], ResultPath: null, Next: 'DeadlinePassed' });
    expect(deadline).toMatchObject({ Type: 'Pass', Result: { closed_by: 'deadline' }, ResultPath: '$.handover', Next: 'PlanRound' });
    expect(plan).toMatchObject({ Resource: fnArn, ResultPath: '$.plan', Next: 'Planned' });
    expect(plan.Parameters['closed_by.$']).toBe('$.handover.closed_by');
    for (const name of ['ShardStatistics', 'AggregateShards']) {
      const map = asl.States[name];
      expect(map).toMatchObject({ Type: 'Map', ItemsPath: '$.plan.shards', MaxConcurrencyPath: '$.plan.concurrency', ResultPath: null });
      const inner = Object.values<Json>(map.ItemProcessor.States);
      expect(inner).toHaveLength(1);
      expect(inner[0].Resource).toBe(fnArn);
    }
    expect(asl.States.DecideRound).toMatchObject({ Resource: fnArn, ResultPath: null, Next: 'AggregateShards' });
    expect(commit).toMatchObject({ Resource: fnArn, ResultPath: '$.result', Next: 'Committed' });
    expect(commit.Parameters['closed_by.$']).toBe('$.handover.closed_by');
    // A failed job tells the clients through the function before it ends in Failed.
    expect(asl.States.ReportFailure).toMatchObject({ Resource: fnArn, ResultPath: null, Next: 'Failed' });
    expect(asl.States.ReportFailure.Parameters.action).toBe('report_failure');
    // Each invocation must be able to use the function's whole timeout (and
    // the lease is derived from it): every direct task outlasts it.
    const fnTimeout: number = t.Resources[ids().fn].Properties.Timeout;
    const direct = allStates(asl).filter((st) => st.Type === 'Task' && st.Resource === fnArn);
    expect(direct).toHaveLength(7);
    for (const task of direct) expect(task.TimeoutSeconds).toBeGreaterThan(fnTimeout);
  });

  test('role may invoke exactly the aggregator; the only "*" is the isolated log-delivery/X-Ray policy', () => {
    const stmts = roleStatements(ids().smRole);
    const invoke = stmts.filter((st) => asArray<string>(st.Action).includes('lambda:InvokeFunction'));
    expect(invoke).toEqual([{ Sid: 'InvokeAggregator', Action: 'lambda:InvokeFunction', Effect: 'Allow', Resource: getAttArn(ids().fn) }]);
    const wildcard = t.Resources[ids().smWildcard].Properties.PolicyDocument.Statement as Json[];
    const actions = wildcard.flatMap((st) => asArray<string>(st.Action));
    expect(actions.every((a) => a.startsWith('logs:') || a.startsWith('xray:'))).toBe(true);
    expect(actions.some((a) => /^logs:(Get|Put)LogEvents$|^logs:CreateLogStream$/.test(a))).toBe(false);
    expect(t.Resources[ids().sm].DependsOn).toEqual(expect.arrayContaining([ids().smWildcard]));
  });
});

describe('client access', () => {
  test.each(CLIENTS)('%s: role trust with ExternalId', (client) => {
    const role = all[clientIds(client).role];
    const [stmt] = role.Properties.AssumeRolePolicyDocument.Statement;
    const expected: Record<string, Json> = {
      'site-a': { AWS: { 'Fn::Join': ['', ['arn:', { Ref: 'AWS::Partition' }, ':iam::', { Ref: 'AWS::AccountId' }, ':root']] } },
      'site-b': { AWS: { 'Fn::Join': ['', ['arn:', { Ref: 'AWS::Partition' }, ':iam::123456789012:root']] } },
      'site-c': { AWS: 'arn:aws:iam::210987654321:role/onprem-trainer' },
    };
    expect(stmt).toEqual({
      Action: 'sts:AssumeRole',
      Effect: 'Allow',
      Principal: expected[client],
      Condition: { StringEquals: { 'sts:ExternalId': client === 'site-a' ? 'fedstep-site-a' : `ext-${client}` } },
    });
  });

  test.each(CLIENTS)('%s: exactly its queue, its S3 keys, its ledger rows', (client) => {
    const { queue, role } = clientIds(client);
    const stmts = roleStatements(role);
    const bucket = ids().bucket;
    expect(stmts).toEqual([
      {
        Sid: 'OwnQueue', Effect: 'Allow',
        Action: ['sqs:ChangeMessageVisibility', 'sqs:DeleteMessage', 'sqs:GetQueueAttributes', 'sqs:ReceiveMessage'],
        Resource: getAttArn(queue),
      },
      {
        // site-b lists its jobs: only their global models.
        Sid: 'ReadGlobalModels', Effect: 'Allow', Action: 's3:GetObject',
        Resource: client === 'site-b'
          ? [bucketObjects(bucket, 'jobs/job-1/rounds/*/global.safetensors'), bucketObjects(bucket, 'jobs/job-2/rounds/*/global.safetensors')]
          : bucketObjects(bucket, 'jobs/*/rounds/*/global.safetensors'),
      },
      {
        // SCAFFOLD's server variate beside each global model, the same jobs.
        Sid: 'ReadScaffoldVariates', Effect: 'Allow', Action: 's3:GetObject',
        Resource: client === 'site-b'
          ? [bucketObjects(bucket, 'jobs/job-1/rounds/*/scaffold_variate.safetensors'), bucketObjects(bucket, 'jobs/job-2/rounds/*/scaffold_variate.safetensors')]
          : bucketObjects(bucket, 'jobs/*/rounds/*/scaffold_variate.safetensors'),
      },
      {
        // PutObjectTagging: updates are uploaded tagged fedstep-kind=update (lifecycle expiry).
        Sid: 'OwnUpdates', Effect: 'Allow',
        Action: ['s3:AbortMultipartUpload', 's3:GetObject', 's3:PutObject', 's3:PutObjectTagging'],
        Resource: bucketObjects(bucket, `jobs/*/rounds/*/updates/${client}.safetensors`),
      },
      {
        // SCAFFOLD's Δc_i beside the update, with the same actions (tagged like it).
        Sid: 'OwnScaffoldDeltas', Effect: 'Allow',
        Action: ['s3:AbortMultipartUpload', 's3:GetObject', 's3:PutObject', 's3:PutObjectTagging'],
        Resource: bucketObjects(bucket, `jobs/*/rounds/*/updates/${client}.scaffold_delta.safetensors`),
      },
      {
        Sid: 'DenyUploadsNotInStandardStorage', Effect: 'Deny', Action: 's3:PutObject',
        Resource: bucketObjects(bucket, '*'),
        Condition: { Null: { 's3:x-amz-storage-class': 'false' }, StringNotEquals: { 's3:x-amz-storage-class': 'STANDARD' } },
      },
      {
        Sid: 'DenyUploadsWithCustomerKeys', Effect: 'Deny', Action: 's3:PutObject',
        Resource: bucketObjects(bucket, '*'),
        Condition: { Null: { 's3:x-amz-server-side-encryption-customer-algorithm': 'false' } },
      },
      {
        Sid: 'OwnLedgerRows', Effect: 'Allow',
        Action: ['dynamodb:GetItem', 'dynamodb:PutItem', 'dynamodb:Query'],
        Resource: getAttArn(ids().updates),
        Condition: { 'ForAllValues:StringEquals': { 'dynamodb:LeadingKeys': [client] } },
      },
    ]);
  });

  /** Would IAM allow `client`'s role this S3 request on the model bucket (`key`)? */
  const s3Decision = (client: string, action: string, key: string, context: Record<string, string> = {}): Decision => {
    const bucketArn = 'arn:aws:s3:::fedstep-models';
    const resolve = (r: Json): string => {
      if (typeof r === 'string') return r;
      const parts = r['Fn::Join']?.[1] as Json[] | undefined;
      if (parts?.length === 2 && JSON.stringify(parts[0]) === JSON.stringify(getAttArn(ids().bucket))) return `${bucketArn}${parts[1]}`;
      return 'arn:aws:not-the-bucket'; // the queue, the table
    };
    return decide(roleStatements(clientIds(client).role), { action, resource: `${bucketArn}/${key}`, context }, resolve);
  };

  // Its update and its SCAFFOLD Δc_i: the same rules for both.
  const ownUploads = (client: string, job = 'job-1', round = 3): [string, string][] => [
    ['update', `jobs/${job}/rounds/${round}/updates/${client}.safetensors`],
    ['scaffold delta', `jobs/${job}/rounds/${round}/updates/${client}.scaffold_delta.safetensors`],
  ];

  test.each(CLIENTS)('%s: uploads its update and Δc_i in STANDARD (or without a storage class) only, never with SSE-C', (client) => {
    for (const [kind, own] of ownUploads(client)) {
      const decision = (action: string, context: Record<string, string> = {}): [string, string, Decision] =>
        [kind, JSON.stringify(context), s3Decision(client, action, own, context)];
      const ok = (context: Record<string, string> = {}): [string, string, Decision] => [kind, JSON.stringify(context), 'allowed'];
      const denied = (context: Record<string, string>): [string, string, Decision] => [kind, JSON.stringify(context), 'denied'];
      // What the client sends (crates/aws/src/s3.rs): no storage class, no
      // encryption headers; UploadPart and CompleteMultipartUpload never carry them.
      expect(decision('s3:PutObject')).toEqual(ok());
      expect(decision('s3:PutObject', { 's3:x-amz-storage-class': 'STANDARD' })).toEqual(ok({ 's3:x-amz-storage-class': 'STANDARD' }));
      expect(decision('s3:PutObject', { 's3:x-amz-server-side-encryption': 'AES256' })).toEqual(ok({ 's3:x-amz-server-side-encryption': 'AES256' }));
      for (const storageClass of ['GLACIER', 'DEEP_ARCHIVE', 'GLACIER_IR', 'STANDARD_IA', 'ONEZONE_IA', 'INTELLIGENT_TIERING', 'REDUCED_REDUNDANCY']) {
        const context = { 's3:x-amz-storage-class': storageClass };
        expect(decision('s3:PutObject', context)).toEqual(denied(context));
      }
      const sseC = { 's3:x-amz-server-side-encryption-customer-algorithm': 'AES256' };
      expect(decision('s3:PutObject', sseC)).toEqual(denied(sseC));
      const both = { 's3:x-amz-storage-class': 'STANDARD', ...sseC };
      expect(decision('s3:PutObject', both)).toEqual(denied(both));
      // Only PutObject is guarded: reading back, tagging and aborting a
      // multipart upload of the own object stay allowed.
      for (const action of ['s3:GetObject', 's3:PutObjectTagging', 's3:AbortMultipartUpload']) {
        expect([action, ...decision(action)]).toEqual([action, ...ok()]);
      }
      // Nothing else on it (no delete, no ACLs, no other object's tagging).
      for (const action of ['s3:DeleteObject', 's3:DeleteObjectVersion', 's3:PutObjectAcl', 's3:GetObjectTagging']) {
        expect([action, ...decision(action)]).toEqual([action, kind, '{}', 'implicitly denied']);
      }
    }
    // The guards are explicit denies on every object, not just the own keys:
    // they hold whatever else may ever allow the role to write.
    expect(s3Decision(client, 's3:PutObject', 'jobs/job-1/rounds/3/global.safetensors')).toBe('implicitly denied');
    expect(s3Decision(client, 's3:PutObject', 'jobs/job-1/rounds/3/global.safetensors', { 's3:x-amz-storage-class': 'GLACIER' })).toBe('denied');
    expect(s3Decision(client, 's3:PutObject', 'jobs/job-1/rounds/3/scaffold_variate.safetensors')).toBe('implicitly denied');
    // Another client's keys: never, neither its update nor its Δc_i (nor
    // one named like this client's with another client's id around it).
    for (const other of ['site-x', CLIENTS.find((c) => c !== client)!, `${client}-2`, `x${client}`]) {
      for (const [kind, key] of ownUploads(other)) {
        for (const action of ['s3:PutObject', 's3:PutObjectTagging', 's3:AbortMultipartUpload', 's3:GetObject']) {
          expect([other, kind, action, s3Decision(client, action, key)]).toEqual([other, kind, action, 'implicitly denied']);
        }
      }
    }
    // Its own id, but not exactly its two keys: no other file under updates/.
    for (const key of [
      `jobs/job-1/rounds/3/updates/${client}.scaffold_variate.safetensors`,
      `jobs/job-1/rounds/3/updates/${client}.safetensors.scaffold_delta`,
      `jobs/job-1/rounds/3/updates/${client}.json`,
      `jobs/job-1/rounds/3/${client}.scaffold_delta.safetensors`,
      'jobs/job-1/rounds/3/scaffold_delta.safetensors',
    ]) {
      expect([key, s3Decision(client, 's3:PutObject', key)]).toEqual([key, 'implicitly denied']);
    }
  });

  test.each(CLIENTS)('%s: uploads its update and Δc_i in any job and round (its jobs list scopes reads only)', (client) => {
    for (const [job, round] of [['job-1', 1], ['job-3', 42], ['a.b_c-9', 1000]] as [string, number][]) {
      for (const [kind, key] of ownUploads(client, job, round)) {
        expect([kind, key, s3Decision(client, 's3:PutObject', key)]).toEqual([kind, key, 'allowed']);
      }
    }
  });

  test.each(CLIENTS)('%s: reads the global models and SCAFFOLD variates of its jobs (every job when it lists none)', (client) => {
    const model = (job: string, round: number): string => `jobs/${job}/rounds/${round}/global.safetensors`;
    const variate = (job: string, round: number): string => `jobs/${job}/rounds/${round}/scaffold_variate.safetensors`;
    for (const key of [model, variate]) {
      for (const job of ['job-1', 'job-2']) expect([job, s3Decision(client, 's3:GetObject', key(job, 7))]).toEqual([job, 'allowed']);
      // site-b lists job-1 and job-2; the others list no jobs.
      const others = client === 'site-b' ? 'implicitly denied' : 'allowed';
      for (const job of ['job-3', 'job-10', 'job-1x']) expect([job, key(job, 1), s3Decision(client, 's3:GetObject', key(job, 1))]).toEqual([job, key(job, 1), others]);
      // Read only: never written by a client.
      for (const action of ['s3:PutObject', 's3:PutObjectTagging', 's3:DeleteObject']) {
        expect([action, s3Decision(client, action, key('job-1', 7))]).toEqual([action, 'implicitly denied']);
      }
    }
    // Never another client's update or Δc_i, nor the server state, nor
    // anything else beside the global model.
    for (const key of [
      'jobs/job-1/rounds/1/updates/site-x.safetensors',
      'jobs/job-1/rounds/1/updates/site-x.scaffold_delta.safetensors',
      'jobs/job-1/rounds/1/server_state.safetensors',
      'jobs/job-1/rounds/1/measurements.json',
      'jobs/job-1/rounds/1/scaffold_variate.json',
    ]) {
      expect([key, s3Decision(client, 's3:GetObject', key)]).toEqual([key, 'implicitly denied']);
    }
  });

  test('the evaluator is faithful where it matters: StringNotEqualsIfExists alone would deny the normal upload', () => {
    // The trap the Deny avoids (lib/client-access.ts, uploadGuards): an
    // ...IfExists or negated operator is true when the key is missing.
    const naive = [
      { Effect: 'Allow', Action: 's3:PutObject', Resource: 'arn:aws:s3:::b/*' },
      { Effect: 'Deny', Action: 's3:PutObject', Resource: 'arn:aws:s3:::b/*', Condition: { StringNotEqualsIfExists: { 's3:x-amz-storage-class': 'STANDARD' } } },
    ];
    expect(decide(naive, { action: 's3:PutObject', resource: 'arn:aws:s3:::b/k' }, (r) => r)).toBe('denied');
    expect(decide(naive, { action: 's3:PutObject', resource: 'arn:aws:s3:::b/k', context: { 's3:x-amz-storage-class': 'STANDARD' } }, (r) => r)).toBe('allowed');
  });

  test('a client\'s role policy stays within IAM\'s 10,240 characters with as many jobs as the config allows', () => {
    // Longest job ids that fit JOB_ARNS_POLICY_BUDGET, in a fresh synth.
    const id = (i: number): string => `${String(i).padStart(3, '0')}-${'j'.repeat(124)}`;
    const jobs = Array.from({ length: Math.floor(JOB_ARNS_POLICY_BUDGET / jobPolicyChars(id(0))) }, (_, i) => id(i));
    expect(jobPolicyChars(id(0))).toBe(2 * 128 + JOB_ARN_OVERHEAD);
    expect(jobs.length).toBeGreaterThan(0);
    const big = synthFedstep({ clients: { many: { jobs } } }, { nag: false });
    const everything = allResources(big);
    const access = big.deployment.clients.get('many')!;
    const roleId = logicalId(big.deployment.stackOf.get('many')!, access.role);
    const [inline] = everything[roleId].Properties.Policies;
    const bySid = (sid: string): Json => inline.PolicyDocument.Statement.find((st: Json) => st.Sid === sid);
    expect(bySid('ReadGlobalModels').Resource).toHaveLength(jobs.length);
    expect(bySid('ReadScaffoldVariates').Resource).toHaveLength(jobs.length);
    // Every CloudFormation expression at the longest value it could take.
    const longest = (v: Json): Json => {
      if (Array.isArray(v)) return v.map(longest);
      if (v === null || typeof v !== 'object') return v;
      if (v['Fn::Join']) return (longest(v['Fn::Join'][1]) as string[]).join(v['Fn::Join'][0]);
      if (v['Fn::GetAtt']) {
        const type = everything[v['Fn::GetAtt'][0]].Type;
        const arn: Record<string, string> = {
          'AWS::S3::Bucket': `arn:aws-us-gov:s3:::${'b'.repeat(63)}`,
          'AWS::SQS::Queue': `arn:aws-us-gov:sqs:us-gov-west-1:111122223333:${'q'.repeat(80)}`,
          'AWS::DynamoDB::Table': `arn:aws-us-gov:dynamodb:us-gov-west-1:111122223333:table/${'t'.repeat(255)}`,
        };
        if (arn[type] === undefined) throw new Error(`no longest ARN for ${type}`);
        return arn[type];
      }
      if (v.Ref !== undefined) throw new Error(`unexpected Ref ${v.Ref} in a client policy`);
      return Object.fromEntries(Object.entries(v).map(([k, x]) => [k, longest(x)]));
    };
    const chars = JSON.stringify(longest(inline.PolicyDocument)).length;
    expect(chars).toBeLessThanOrEqual(10_240);
    // And the budget's premise: the policy without the job ARNs needs less than 3,000.
    const perJob = ['ReadGlobalModels', 'ReadScaffoldVariates'];
    const withoutJobs = JSON.stringify(longest({ ...inline.PolicyDocument, Statement: inline.PolicyDocument.Statement.filter((st: Json) => !perJob.includes(st.Sid)) }));
    expect(withoutJobs.length).toBeLessThan(3000);
  }, 120_000);

  test('outputs: everything a client.toml needs, one Config output per client in its clients stack', () => {
    for (const key of ['Region', 'ModelBucketName', 'RoundsTableName', 'UpdatesTableName', 'GlobalModelReadyTopicArn',
      'TrainingCompleteTopicArn', 'ClientDlqUrl', 'StateMachineArn']) {
      expect(t.Outputs[key]).toBeDefined();
    }
    expect(t.Outputs.TrainingCompleteTopicArn.Value).toEqual({ Ref: ids().topic });
    expect(Object.keys(t.Outputs).filter((k) => k.startsWith('Client') && k !== 'ClientDlqUrl')).toEqual([]);
    const { queue, role, stack } = clientIds('site-b');
    const outputs = derefCrossStack(s, s.templates.get(stack)).Outputs;
    expect(Object.keys(outputs).filter((k) => k.startsWith('ClientSiteB'))).toEqual(['ClientSiteBConfig']);
    // The JSON with CloudFormation expressions in its values: parse it with
    // a placeholder for each expression, then put the expressions back.
    const tokens: Json[] = [];
    const text = (outputs.ClientSiteBConfig.Value['Fn::Join'][1] as Json[])
      .map((p) => (typeof p === 'string' ? p : `@@${tokens.push(p) - 1}@@`)).join('');
    const fields = Object.fromEntries(Object.entries<string>(JSON.parse(text)).map(([k, v]) => {
      const m = /^@@(\d+)@@$/.exec(v);
      return [k, m ? tokens[Number(m[1])] : v];
    }));
    expect(fields).toEqual({
      client_id: 'site-b',
      region: { Ref: 'AWS::Region' },
      bucket: { Ref: ids().bucket },
      updates_table: { Ref: ids().updates },
      queue_url: { Ref: queue },
      role_arn: getAttArn(role),
      external_id: 'ext-site-b',
    });
  });
});

describe('IAM Roles Anywhere', () => {
  const CA_FILE = path.join(__dirname, 'fixtures', 'roles-anywhere-ca.pem');
  const CN = 'site-a.fedstep.example.org';
  const ACTIONS = ['sts:AssumeRole', 'sts:SetSourceIdentity', 'sts:TagSession'];

  test('off by default: no Roles Anywhere resource, role trust and Config outputs as before', () => {
    expect(Object.values<Json>(all).filter((r) => r.Type.startsWith('AWS::RolesAnywhere::'))).toEqual([]);
    for (const client of CLIENTS) expect(all[clientIds(client).role].Properties.AssumeRolePolicyDocument.Statement).toHaveLength(1);
    expect(t.Outputs.ClientTrustAnchorArn).toBeUndefined();
    for (const tpl of s.templates.values()) expect(JSON.stringify(tpl.Outputs ?? {})).not.toMatch(/trust_anchor_arn|profile_arn/);
  });

  describe('with a CA certificate file and one client opted in', () => {
    let ra: Synth;
    let raAll: Record<string, Json>;
    beforeAll(() => {
      ra = synthFedstep({
        clients: 'site-a,site-b',
        rolesAnywhere: { caCertificateFile: CA_FILE },
        fedstep: { clients: { 'site-a': { rolesAnywhere: { certificateSubjectCN: CN } } } },
      });
      raAll = allResources(ra);
    });
    const idsOf = (client: string): { role: string; stack: string; profile?: string } => {
      const stack = ra.deployment.stackOf.get(client)!;
      const access = ra.deployment.clients.get(client)!;
      return {
        role: logicalId(stack, access.role),
        stack: stack.stackName,
        profile: access.rolesAnywhere && stack.getLogicalId(access.rolesAnywhere.profile),
      };
    };
    const anchorId = (): string => ra.stack.getLogicalId(ra.stack.clientTrustAnchor!.trustAnchor);

    test('one enabled trust anchor in the main stack, holding the CA file; its ARN is an output', () => {
      const anchors = resourcesOfType(raAll, 'AWS::RolesAnywhere::TrustAnchor');
      expect(anchors.map(([id]) => id)).toEqual([anchorId()]);
      expect(ra.template.toJSON().Resources[anchorId()]).toBeDefined();
      expect(anchors[0][1].Properties).toEqual({
        Name: 'Fedstep-clients',
        Enabled: true,
        Source: { SourceType: 'CERTIFICATE_BUNDLE', SourceData: { X509CertificateData: fs.readFileSync(CA_FILE, 'utf8').trim() } },
        Tags: [{ Key: 'project', Value: 'fedstep' }],
      });
      expect(ra.template.toJSON().Outputs.ClientTrustAnchorArn.Value).toEqual({ 'Fn::GetAtt': [anchorId(), 'TrustAnchorArn'] });
    });

    test('the opted-in client: a profile for exactly its role, in its clients stack', () => {
      const { role, profile, stack } = idsOf('site-a');
      const profiles = resourcesOfType(raAll, 'AWS::RolesAnywhere::Profile');
      expect(profiles.map(([id]) => id)).toEqual([profile]);
      expect(ra.templates.get(stack).Resources[profile!]).toBeDefined();
      expect(profiles[0][1].Properties).toEqual({
        Name: 'Fedstep-site-a',
        Enabled: true,
        RoleArns: [getAttArn(role)],
        DurationSeconds: 3600,
        Tags: [{ Key: 'project', Value: 'fedstep' }],
      });
    });

    test('its role trusts Roles Anywhere only for its certificate CN from this trust anchor; the ExternalId trust stays', () => {
      const { role } = idsOf('site-a');
      const [assume, anywhere, ...rest] = raAll[role].Properties.AssumeRolePolicyDocument.Statement;
      expect(rest).toEqual([]);
      expect(assume.Condition).toEqual({ StringEquals: { 'sts:ExternalId': 'fedstep-site-a' } });
      expect({ ...anywhere, Action: [...anywhere.Action].sort() }).toEqual({
        Sid: 'RolesAnywhere',
        Effect: 'Allow',
        Principal: { Service: 'rolesanywhere.amazonaws.com' },
        Action: ACTIONS,
        Condition: {
          StringEquals: { 'aws:PrincipalTag/x509Subject/CN': CN },
          ArnEquals: { 'aws:SourceArn': { 'Fn::GetAtt': [anchorId(), 'TrustAnchorArn'] } },
        },
      });
      // IAM's default limit for a trust policy is 2,048 characters: with
      // every expression as a 120-character ARN and a 64-character CN it fits.
      const arnsLong = (v: Json): Json => {
        if (Array.isArray(v)) return v.map(arnsLong);
        if (v === null || typeof v !== 'object') return v;
        if (Object.keys(v).some((k) => k.startsWith('Fn::') || k === 'Ref')) return 'x'.repeat(120);
        return Object.fromEntries(Object.entries(v).map(([k, x]) => [k, arnsLong(x)]));
      };
      const trustChars = JSON.stringify(arnsLong(raAll[role].Properties.AssumeRolePolicyDocument)).length;
      expect(trustChars + 64 - CN.length).toBeLessThan(2048);
    });

    test('a client without rolesAnywhere gets neither a profile nor the trust', () => {
      const { role } = idsOf('site-b');
      expect(ra.deployment.clients.get('site-b')!.rolesAnywhere).toBeUndefined();
      expect(raAll[role].Properties.AssumeRolePolicyDocument.Statement).toHaveLength(1);
      expect(JSON.stringify(raAll[role])).not.toContain('rolesanywhere');
    });

    test('the Config output carries what credential_process needs, only for the opted-in client', () => {
      const config = (client: string): Json => {
        const { stack } = idsOf(client);
        const value = derefCrossStack(ra, ra.templates.get(stack)).Outputs[`Client${client === 'site-a' ? 'SiteA' : 'SiteB'}Config`].Value;
        const tokens: Json[] = [];
        const text = (value['Fn::Join'][1] as Json[]).map((p) => (typeof p === 'string' ? p : `@@${tokens.push(p) - 1}@@`)).join('');
        return Object.fromEntries(Object.entries<string>(JSON.parse(text)).map(([k, v]) => {
          const m = /^@@(\d+)@@$/.exec(v);
          return [k, m ? tokens[Number(m[1])] : v];
        }));
      };
      const a = config('site-a');
      expect(a.trust_anchor_arn).toEqual({ 'Fn::GetAtt': [anchorId(), 'TrustAnchorArn'] });
      expect(a.profile_arn).toEqual({ 'Fn::GetAtt': [idsOf('site-a').profile, 'ProfileArn'] });
      expect(a.role_arn).toEqual(getAttArn(idsOf('site-a').role));
      expect(Object.keys(config('site-b')).sort()).toEqual(['bucket', 'client_id', 'external_id', 'queue_url', 'region', 'role_arn', 'updates_table']);
    });

    test('one resource more for the opted-in client only; cdk-nag finds nothing', () => {
      const own = (stack: string): number => Object.keys(ra.templates.get(stack).Resources).length;
      expect(own(idsOf('site-a').stack)).toBe(CLIENT_RESOURCES + ROLES_ANYWHERE_RESOURCES);
      expect(own(idsOf('site-b').stack)).toBe(CLIENT_RESOURCES);
      expect(nagErrors(ra)).toEqual([]);
    });
  });

  test('an AWS Private CA as the trust anchor', () => {
    const arn = 'arn:aws:acm-pca:eu-west-1:111122223333:certificate-authority/12345678-1234-1234-1234-123456789012';
    const pca = synthFedstep({ clients: 'solo', rolesAnywhere: { acmPcaArn: arn } }, { nag: false });
    const [[, anchor]] = resourcesOfType(pca.template, 'AWS::RolesAnywhere::TrustAnchor');
    expect(anchor.Properties.Source).toEqual({ SourceType: 'AWS_ACM_PCA', SourceData: { AcmPcaArn: arn } });
    // No client opted in: the anchor alone, no profile.
    expect(resourcesOfType(allResources(pca), 'AWS::RolesAnywhere::Profile')).toEqual([]);
  });
});

describe('policies', () => {
  test('no policy the stack writes has Resource "*", except the two documented cases', () => {
    const offenders: string[] = [];
    for (const { where, type, doc } of policyDocuments(all)) {
      for (const st of asArray<Json>(doc.Statement)) {
        expect(st.NotResource).toBeUndefined();
        if (!asArray<Json>(st.Resource).some((r) => r === '*')) continue;
        if (type === 'AWS::KMS::Key') {
          // Exception 1: in a key policy, Resource "*" means "this key" (the only form KMS accepts).
          continue;
        }
        offenders.push(`${where}:${st.Sid ?? '?'}`);
      }
    }
    // Exception 2: Step Functions log delivery + X-Ray (see TrainingWorkflow).
    expect(offenders.sort()).toEqual([`${ids().smWildcard}:VendedLogDelivery`, `${ids().smWildcard}:XRayTracing`]);
  });

  test('no wildcard actions anywhere in identity policies (IAM policies and roles\' inline policies)', () => {
    const docs = policyDocuments(all);
    expect(docs.filter((d) => d.type === 'AWS::IAM::Role')).toHaveLength(CLIENTS.length);
    for (const { where, type, doc } of docs) {
      if (type !== 'AWS::IAM::Policy' && type !== 'AWS::IAM::Role') continue;
      for (const st of asArray<Json>(doc.Statement)) {
        for (const action of asArray<string>(st.Action)) expect(`${where}: ${action}`).not.toMatch(/\*/);
      }
    }
  });

  test('every role is assumable only by its intended principal', () => {
    const trust = resourcesOfType(all, 'AWS::IAM::Role').map(([, r]) => r.Properties.AssumeRolePolicyDocument.Statement);
    expect(trust).toHaveLength(3 + CLIENTS.length); // the two Lambdas', the state machine's, one per client
    for (const stmts of trust) {
      for (const st of stmts) expect(st.Principal).not.toEqual('*');
    }
  });
});

describe('options', () => {
  let alt: Synth;
  beforeAll(() => {
    alt = synthFedstep({
      clients: 'solo',
      arch: 'arm64', // the non-default architecture (lib/config.ts DEFAULTS)
      memoryMb: '4096',
      timeoutMinutes: '10',
      streamMemoryMb: '512',
      rustLog: 'fedstep=debug,info',
      retainData: 'false',
      lambdaAsset: placeholderAsset(),
    });
  });

  test('arch, memory, timeout, RUST_LOG, prebuilt asset, DESTROY', () => {
    const at = alt.template.toJSON();
    const fnId = logicalId(alt.stack, alt.stack.aggregator.function);
    const p = at.Resources[fnId].Properties;
    expect(p.Architectures).toEqual(['arm64']);
    expect(p.MemorySize).toBe(4096);
    expect(p.Timeout).toBe(600);
    // The lease follows the configured timeout, not the 15-minute default.
    expect(p.Environment.Variables.FEDSTEP_LEASE_SECONDS).toBe('660');
    expect(p.Environment.Variables.RUST_LOG).toBe('fedstep=debug,info');
    expect(alt.stack.aggregator.function).not.toBeInstanceOf(RustFunction);
    const hash = String(p.Code.S3Key).replace(/\.zip$/, '');
    expect(fs.existsSync(path.join(alt.assembly.directory, `asset.${hash}`, 'bootstrap'))).toBe(true);
    // The stream function: same prebuilt code and architecture, its own memory, the fixed timeout.
    const sp = at.Resources[logicalId(alt.stack, alt.stack.aggregator.streamFunction)].Properties;
    expect(sp.Code).toEqual(p.Code);
    expect(sp.Architectures).toEqual(['arm64']);
    expect(sp.MemorySize).toBe(512);
    expect(sp.Timeout).toBe(STREAM_TIMEOUT.toSeconds());
    expect(sp.Environment).toEqual(p.Environment);
    expect(at.Resources[logicalId(alt.stack, alt.stack.store.bucket)].DeletionPolicy).toBe('Delete');
    expect(Annotations.fromStack(alt.stack).findError('*', Match.stringLikeRegexp('AwsSolutions-.*'))).toEqual([]);
  });

  test('the real crates/lambda manifest, when present, synthesizes without building', () => {
    const real = path.resolve(__dirname, '..', '..', 'crates', 'lambda', 'Cargo.toml');
    if (!fs.existsSync(real)) {
      console.warn(`skipped: ${real} does not exist yet`);
      return;
    }
    const app = testApp();
    const settings = resolveSettings((k) => app.node.tryGetContext(k));
    const stack = new FedstepStack(app, 'Real', { settings });
    expect(stack.aggregator.function).toBeInstanceOf(RustFunction);
    app.synth();
  });

  test('an ASL placeholder without a substitution fails the synth', () => {
    const asl = path.join(scratchDir(), 'bad.asl.json');
    fs.writeFileSync(asl, JSON.stringify({ StartAt: 'A', States: { A: { Type: 'Task', Resource: '${Unknown}', End: true } } }));
    const app = testApp({ lambdaAsset: placeholderAsset(), asl });
    const settings = resolveSettings((k) => app.node.tryGetContext(k));
    expect(() => new FedstepStack(app, 'Bad', { settings })).toThrow(/placeholders without a substitution: Unknown/);
  });

  test('a missing Lambda crate fails with a hint', () => {
    const app = testApp({ lambdaManifest: path.join(scratchDir(), 'nope', 'Cargo.toml') });
    const settings = resolveSettings((k) => app.node.tryGetContext(k));
    expect(() => new FedstepStack(app, 'NoCrate', { settings })).toThrow(/lambdaAsset/);
  });

  test('client ids that collide in output names are rejected', () => {
    const app = testApp({ lambdaAsset: placeholderAsset(), clients: 'site-a,site_a' });
    const settings = resolveSettings((k) => app.node.tryGetContext(k));
    expect(() => addFedstep(app, 'Clash', settings)).toThrow(/same output name/);
  });
});
