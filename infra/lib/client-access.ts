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
import { ClientProfile } from './roles-anywhere';

/** How often a client may fail to process a message before it is dead-lettered. */
export const CLIENT_MAX_RECEIVE_COUNT = 5;

export interface ClientAccessProps {
  readonly client: ClientSettings;
  readonly store: ModelStore;
  readonly ledger: Ledger;
  /** The notification topic: `global_model_ready`, `training_complete`, `job_failed` (Messaging). */
  readonly topic: sns.ITopic;
  /** The dead-letter queue all client queues share (Messaging). */
  readonly deadLetterQueue: sqs.IQueue;
  /**
   * The deployment's Roles Anywhere trust anchor and the name for this
   * client's profile; required when the client has `rolesAnywhere`, unused
   * otherwise.
   */
  readonly rolesAnywhere?: { readonly trustAnchorArn: string; readonly profileName: string };
}

/**
 * Everything one federation client gets: its queue on the notification topic
 * (dead-lettering into the shared DLQ) and an IAM role it assumes, allowed
 * exactly:
 * - SQS: receive/delete/extend visibility on its own queue;
 * - S3: read the global models and SCAFFOLD server control variates of its
 *   `jobs` (of every job without the setting); write (and read back) only
 *   its own update key and its own SCAFFOLD Δc_i key beside it, both tagged
 *   `fedstep-kind=update` so the bucket's lifecycle rule expires them, and
 *   never in another storage class than STANDARD nor under a customer-
 *   provided key (two Deny statements, see below);
 * - DynamoDB: PutItem/GetItem/Query on `updates` rows whose partition key is
 *   its client id (dynamodb:LeadingKeys).
 * No KMS permission is needed: the queue is SSE-SQS, the bucket SSE-S3 and
 * the table uses the AWS managed DynamoDB key.
 *
 * Four CloudFormation resources (CLIENT_RESOURCES): the queue, its queue
 * policy (the topic may send, TLS only), the subscription, and the role with
 * its permissions inline (a separate AWS::IAM::Policy would be a fifth
 * resource and buys nothing: nobody else attaches it). A client with
 * `rolesAnywhere` also gets a Roles Anywhere profile for its role
 * (ROLES_ANYWHERE_RESOURCES, lib/roles-anywhere.ts).
 */
export class ClientAccess extends Construct {
  readonly queue: sqs.Queue;
  readonly role: iam.Role;
  /** The client's Roles Anywhere profile, when it has `rolesAnywhere`. */
  readonly rolesAnywhere?: ClientProfile;

  constructor(scope: Construct, id: string, props: ClientAccessProps) {
    super(scope, id);
    const { client, store, ledger } = props;
    const bucketArn = store.bucket.bucketArn;

    this.queue = new sqs.Queue(this, 'Queue', {
      encryption: sqs.QueueEncryption.SQS_MANAGED,
      enforceSSL: true,
      // The client extends visibility while it trains (docs/design.md §3.2).
      visibilityTimeout: Duration.minutes(5),
      retentionPeriod: Duration.days(4),
      deadLetterQueue: { queue: props.deadLetterQueue, maxReceiveCount: CLIENT_MAX_RECEIVE_COUNT },
    });
    // One subscription for every kind (the topic carries them all), raw
    // delivery, the job filter: the client tells the kinds apart by the
    // body's `type` (exit_on_complete needs training_complete and
    // job_failed; a client without it deletes the first and logs the
    // second).
    props.topic.addSubscription(new subs.SqsSubscription(this.queue, {
      rawMessageDelivery: true,
      filterPolicy: client.jobs
        ? { job_id: sns.SubscriptionFilter.stringFilter({ allowlist: client.jobs }) }
        : undefined,
    }));

    const access = new iam.PolicyDocument({
      statements: [
        new iam.PolicyStatement({
          sid: 'OwnQueue',
          actions: ['sqs:ReceiveMessage', 'sqs:DeleteMessage', 'sqs:ChangeMessageVisibility', 'sqs:GetQueueAttributes'],
          resources: [this.queue.queueArn],
        }),
        new iam.PolicyStatement({
          sid: 'ReadGlobalModels',
          actions: ['s3:GetObject'],
          resources: globalModelKeys(client).map((key) => `${bucketArn}/${key}`),
        }),
        new iam.PolicyStatement({
          // SCAFFOLD's server control variate c, beside each global model:
          // scoped exactly like ReadGlobalModels (the same jobs).
          sid: 'ReadScaffoldVariates',
          actions: ['s3:GetObject'],
          resources: scaffoldVariateKeys(client).map((key) => `${bucketArn}/${key}`),
        }),
        new iam.PolicyStatement({
          sid: 'OwnUpdates',
          actions: OWN_UPLOAD_ACTIONS,
          resources: [`${bucketArn}/${KEYS.clientUpdate(client.id)}`],
        }),
        new iam.PolicyStatement({
          // SCAFFOLD's Δc_i, uploaded beside the update and like it (tagged
          // fedstep-kind=update, so it expires with it; read back on retry).
          sid: 'OwnScaffoldDeltas',
          actions: OWN_UPLOAD_ACTIONS,
          resources: [`${bucketArn}/${KEYS.clientScaffoldDelta(client.id)}`],
        }),
        ...uploadGuards(bucketArn),
        new iam.PolicyStatement({
          sid: 'OwnLedgerRows',
          actions: ['dynamodb:PutItem', 'dynamodb:GetItem', 'dynamodb:Query'],
          resources: [ledger.updates.tableArn],
          conditions: { 'ForAllValues:StringEquals': { 'dynamodb:LeadingKeys': [client.id] } },
        }),
      ],
    });
    this.role = new iam.Role(this, 'Role', {
      description: `fedstep client ${client.id}`,
      assumedBy: trustedPrincipal(client),
      externalIds: [client.externalId],
      maxSessionDuration: Duration.hours(12),
      inlinePolicies: { access },
    });
    if (client.rolesAnywhere !== undefined) {
      if (props.rolesAnywhere === undefined) throw new Error(`client ${client.id}: rolesAnywhere without the deployment's trust anchor`);
      this.rolesAnywhere = new ClientProfile(this, 'RolesAnywhereProfile', {
        role: this.role,
        certificate: client.rolesAnywhere,
        trustAnchorArn: props.rolesAnywhere.trustAnchorArn,
        name: props.rolesAnywhere.profileName,
      });
    }

    // Justified: keys contain the run-time job id and round number
    // (jobs/{job}/rounds/{r}/...), so the patterns fix everything else: the
    // file name global.safetensors or scaffold_variate.safetensors (and the
    // job, where the client lists its jobs), or updates/<this
    // client>.safetensors or updates/<this client>.scaffold_delta.safetensors.
    // (cdk-nag does not report the Deny statements' bucket-wide resource: a
    // Deny grants nothing.)
    const jobPattern = client.jobs === undefined ? '\\*' : `(${client.jobs.map(escapeRegex).join('|')})`;
    const ownUpdate = `jobs\\/\\*\\/rounds\\/\\*\\/updates\\/${escapeRegex(client.id)}`;
    NagSuppressions.addResourceSuppressions(this.role, [
      {
        id: 'AwsSolutions-IAM5',
        reason: 'S3 keys embed run-time job ids and round numbers; the patterns pin the object name (global model or SCAFFOLD server variate, or this client\'s own update or SCAFFOLD delta).',
        appliesTo: [
          { regex: bucketObjectsRegex(`jobs\\/${jobPattern}\\/rounds\\/\\*\\/global\\.safetensors`) },
          { regex: bucketObjectsRegex(`jobs\\/${jobPattern}\\/rounds\\/\\*\\/scaffold_variate\\.safetensors`) },
          { regex: bucketObjectsRegex(`${ownUpdate}\\.safetensors`) },
          { regex: bucketObjectsRegex(`${ownUpdate}\\.scaffold_delta\\.safetensors`) },
        ],
      },
    ]);
  }
}

/**
 * A suppression regex for the resource `<model bucket ARN>/<keyRegex>` as
 * cdk-nag prints it. The bucket lives in the main stack and the client's
 * stack refers to its ARN with a weak reference. cdk-nag visits the role
 * before CDK resolves that reference and prints `<ModelStoreModels1234ABCD.Arn>`;
 * when the same app is synthesized a second time (assertions'
 * Annotations.fromStack does that) the reference is already resolved and it
 * prints the `{"Fn::GetStackOutput": {...}}` of the main stack's output
 * `PublishOutputFnGetAttModelStoreModels1234ABCDArn...`. Both name the model
 * bucket's ARN and nothing else.
 */
function bucketObjectsRegex(keyRegex: string): string {
  const local = '<.*Models[0-9A-F]{8}\\.Arn>';
  const weak = '\\{"Fn::GetStackOutput":\\{"StackName":"[^"]+",.*"OutputName":"PublishOutputFnGetAtt[A-Za-z0-9]*Models[0-9A-F]{8}Arn[0-9A-F]{8}"\\}\\}';
  return `/^Resource::(${local}|${weak})\\/${keyRegex}$/g`;
}

/**
 * The global-model keys a client may read: those of its `jobs`, or of every
 * job when it lists none (then any client can read any job's global model;
 * infra/README.md, "What a client role allows").
 */
export function globalModelKeys(client: ClientSettings): string[] {
  return client.jobs === undefined ? [KEYS.globalModel] : client.jobs.map(KEYS.jobGlobalModel);
}

/**
 * The SCAFFOLD server control variates a client may read: those of the jobs
 * whose global models it may read (globalModelKeys), nothing else.
 */
export function scaffoldVariateKeys(client: ClientSettings): string[] {
  return client.jobs === undefined ? [KEYS.scaffoldVariate] : client.jobs.map(KEYS.jobScaffoldVariate);
}

/**
 * What a client may do on an object it uploads (its update, its SCAFFOLD
 * Δc_i). PutObject also authorizes CreateMultipartUpload, UploadPart and
 * CompleteMultipartUpload. Read-back (GetObject): a retried client compares
 * checksums (HeadObject) instead of uploading again. PutObjectTagging: the
 * upload carries the fedstep-kind=update tag (PutObject and
 * CreateMultipartUpload with tags need it).
 */
const OWN_UPLOAD_ACTIONS = ['s3:PutObject', 's3:PutObjectTagging', 's3:AbortMultipartUpload', 's3:GetObject'];

/**
 * Deny statements on every object of the bucket that refuse an upload
 * (s3:PutObject: PutObject, CopyObject and the multipart calls) in another
 * storage class than STANDARD or with a customer-provided key (SSE-C). The
 * aggregator reads updates in place: an archived object (GLACIER,
 * DEEP_ARCHIVE) needs a restore first and an SSE-C object the client's key,
 * so such an update is unusable (the aggregator's HEAD check rejects it, see
 * ARCHITECTURE.md); refusing the upload tells the client at once instead of
 * costing the round an update. STANDARD only, not the other readable
 * classes: updates live days and are read once or twice, where the
 * infrequent-access classes only add retrieval fees and minimum durations.
 *
 * Why Deny statements rather than conditions on the OwnUpdates and
 * OwnScaffoldDeltas Allows:
 * - An explicit Deny beats every Allow, so the guarantee holds however the
 *   role comes to be allowed s3:PutObject (a statement added later, a
 *   managed policy an operator attaches, a bucket policy), not only through
 *   OwnUpdates and OwnScaffoldDeltas (the Δc_i is read in place like the
 *   update, so the same holds for it).
 * - Conditions on the Allow would apply to its other actions too
 *   (GetObject, PutObjectTagging, AbortMultipartUpload).
 *
 * The conditions are written for a Deny: a negated operator
 * (StringNotEquals) and every ...IfExists operator evaluate to *true* when
 * the request has no such key. `StringNotEqualsIfExists` alone would
 * therefore deny every upload without an x-amz-storage-class header (the
 * client's normal upload, and every UploadPart, which never has one). So
 * the first statement also requires the header to be present (`Null:
 * false`): it denies exactly "storage class given and not STANDARD". The
 * second denies any request carrying the SSE-C algorithm header.
 * Conditions within one statement are ANDed, hence two statements for
 * "either".
 */
function uploadGuards(bucketArn: string): iam.PolicyStatement[] {
  const allObjects = [`${bucketArn}/*`];
  return [
    new iam.PolicyStatement({
      sid: 'DenyUploadsNotInStandardStorage',
      effect: iam.Effect.DENY,
      actions: ['s3:PutObject'],
      resources: allObjects,
      conditions: {
        Null: { 's3:x-amz-storage-class': 'false' },
        StringNotEquals: { 's3:x-amz-storage-class': 'STANDARD' },
      },
    }),
    new iam.PolicyStatement({
      sid: 'DenyUploadsWithCustomerKeys',
      effect: iam.Effect.DENY,
      actions: ['s3:PutObject'],
      resources: allObjects,
      conditions: {
        Null: { 's3:x-amz-server-side-encryption-customer-algorithm': 'false' },
      },
    }),
  ];
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
