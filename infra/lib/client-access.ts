import { Duration } from 'aws-cdk-lib';
import * as iam from 'aws-cdk-lib/aws-iam';
import * as sns from 'aws-cdk-lib/aws-sns';
import * as subs from 'aws-cdk-lib/aws-sns-subscriptions';
import * as sqs from 'aws-cdk-lib/aws-sqs';
import { NagSuppressions } from 'cdk-nag';
import { Construct } from 'constructs';
import { ClientSettings } from './config';
import { Ledger } from './ledger';
import { KEYS, ModelStore } from './model-store';

/** How often a client may fail to process a message before it is dead-lettered. */
export const CLIENT_MAX_RECEIVE_COUNT = 5;

export interface ClientAccessProps {
  readonly client: ClientSettings;
  readonly store: ModelStore;
  readonly ledger: Ledger;
  /** `global_model_ready`: a round is open, train. */
  readonly topic: sns.ITopic;
  /** `training_complete`: a job ended (a client with `exit_on_complete` stops). */
  readonly trainingComplete: sns.ITopic;
}

/**
 * Everything one federation client gets: its queue on `global_model_ready`
 * and `training_complete` (with a DLQ) and an IAM role it assumes, allowed
 * exactly:
 * - SQS: receive/delete/extend visibility on its own queue;
 * - S3: read global models; write (and read back) only its own update key,
 *   tagged `fedstep-kind=update` so the bucket's lifecycle rule expires it;
 * - DynamoDB: PutItem/GetItem/Query on `updates` rows whose partition key is
 *   its client id (dynamodb:LeadingKeys).
 * No KMS permission is needed: the queue is SSE-SQS, the bucket SSE-S3 and
 * the table uses the AWS managed DynamoDB key.
 */
export class ClientAccess extends Construct {
  readonly queue: sqs.Queue;
  readonly deadLetterQueue: sqs.Queue;
  readonly role: iam.Role;

  constructor(scope: Construct, id: string, props: ClientAccessProps) {
    super(scope, id);
    const { client, store, ledger } = props;
    const bucketArn = store.bucket.bucketArn;

    this.deadLetterQueue = new sqs.Queue(this, 'Dlq', {
      encryption: sqs.QueueEncryption.SQS_MANAGED,
      enforceSSL: true,
      retentionPeriod: Duration.days(14),
    });
    this.queue = new sqs.Queue(this, 'Queue', {
      encryption: sqs.QueueEncryption.SQS_MANAGED,
      enforceSSL: true,
      // The client extends visibility while it trains (DESIGN.md §3.2).
      visibilityTimeout: Duration.minutes(5),
      retentionPeriod: Duration.days(4),
      deadLetterQueue: { queue: this.deadLetterQueue, maxReceiveCount: CLIENT_MAX_RECEIVE_COUNT },
    });
    // Both topics, raw delivery, the same job filter: the client tells the
    // two kinds apart by the body's `type` (exit_on_complete needs the
    // second one; a client without it just deletes those messages).
    for (const topic of [props.topic, props.trainingComplete]) {
      topic.addSubscription(new subs.SqsSubscription(this.queue, {
        rawMessageDelivery: true,
        filterPolicy: client.jobs
          ? { job_id: sns.SubscriptionFilter.stringFilter({ allowlist: client.jobs }) }
          : undefined,
      }));
    }

    this.role = new iam.Role(this, 'Role', {
      description: `fedstep client ${client.id}`,
      assumedBy: trustedPrincipal(client),
      externalIds: [client.externalId],
      maxSessionDuration: Duration.hours(12),
    });
    const policy = new iam.Policy(this, 'Policy', {
      statements: [
        new iam.PolicyStatement({
          sid: 'OwnQueue',
          actions: ['sqs:ReceiveMessage', 'sqs:DeleteMessage', 'sqs:ChangeMessageVisibility', 'sqs:GetQueueAttributes'],
          resources: [this.queue.queueArn],
        }),
        new iam.PolicyStatement({
          sid: 'ReadGlobalModels',
          actions: ['s3:GetObject'],
          resources: [`${bucketArn}/${KEYS.globalModel}`],
        }),
        new iam.PolicyStatement({
          // Read-back of its own upload: a retried client compares checksums
          // (HeadObject) instead of uploading again. PutObjectTagging: the
          // upload carries the fedstep-kind=update tag (PutObject and
          // CreateMultipartUpload with tags need it).
          sid: 'OwnUpdates',
          actions: ['s3:PutObject', 's3:PutObjectTagging', 's3:AbortMultipartUpload', 's3:GetObject'],
          resources: [`${bucketArn}/${KEYS.clientUpdate(client.id)}`],
        }),
        new iam.PolicyStatement({
          sid: 'OwnLedgerRows',
          actions: ['dynamodb:PutItem', 'dynamodb:GetItem', 'dynamodb:Query'],
          resources: [ledger.updates.tableArn],
          conditions: { 'ForAllValues:StringEquals': { 'dynamodb:LeadingKeys': [client.id] } },
        }),
      ],
    });
    policy.attachToRole(this.role);

    // Justified: keys contain the run-time job id and round number
    // (jobs/{job}/rounds/{r}/...), so the patterns fix everything else: the
    // file name global.safetensors, or updates/<this client>.safetensors.
    NagSuppressions.addResourceSuppressions(policy, [
      {
        id: 'AwsSolutions-IAM5',
        reason: 'S3 keys embed run-time job ids and round numbers; the patterns pin the object name (global model, or this client\'s own update).',
        appliesTo: [
          { regex: '/^Resource::<.*Models[0-9A-F]{8}\\.Arn>\\/jobs\\/\\*\\/rounds\\/\\*\\/global\\.safetensors$/g' },
          { regex: `/^Resource::<.*Models[0-9A-F]{8}\\.Arn>\\/jobs\\/\\*\\/rounds\\/\\*\\/updates\\/${escapeRegex(client.id)}\\.safetensors$/g` },
        ],
      },
    ]);
    // Justified: this queue is the client queue's dead-letter queue.
    NagSuppressions.addResourceSuppressions(this.deadLetterQueue, [
      { id: 'AwsSolutions-SQS3', reason: 'This queue is the dead-letter queue of the client queue.' },
    ]);
  }
}

/** The principal allowed to assume a client's role. */
function trustedPrincipal(client: ClientSettings): iam.IPrincipal {
  const p = client.trustedPrincipal;
  if (p === undefined) return new iam.AccountRootPrincipal();
  if (/^\d{12}$/.test(p)) return new iam.AccountPrincipal(p);
  // Trusting a role ARN: the role must exist when the stack deploys (IAM
  // resolves it to a unique id).
  return new iam.ArnPrincipal(p);
}

function escapeRegex(s: string): string {
  return s.replace(/[.*+?^${}()|[\]\\\/-]/g, '\\$&');
}
