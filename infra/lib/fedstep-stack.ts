import { ArnFormat, CfnOutput, Stack, StackProps, Tags } from 'aws-cdk-lib';
import { Construct } from 'constructs';
import { Aggregator } from './aggregator';
import { ClientAccess } from './client-access';
import { FedstepSettings } from './config';
import { Ledger } from './ledger';
import { Messaging } from './messaging';
import { ModelStore } from './model-store';
import { TrainingWorkflow } from './training-workflow';

export interface FedstepStackProps extends StackProps {
  readonly settings: FedstepSettings;
}

/**
 * One fedstep deployment: model bucket, ledger tables, topics, the Rust
 * aggregator Lambda, the training state machine and one queue + role per
 * client. See infra/README.md.
 */
export class FedstepStack extends Stack {
  readonly store: ModelStore;
  readonly ledger: Ledger;
  readonly messaging: Messaging;
  readonly aggregator: Aggregator;
  readonly workflow: TrainingWorkflow;
  readonly clients: Map<string, ClientAccess> = new Map();

  constructor(scope: Construct, id: string, props: FedstepStackProps) {
    super(scope, id, props);
    const s = props.settings;
    Tags.of(this).add('project', 'fedstep');

    this.store = new ModelStore(this, 'ModelStore', {
      retainData: s.retainData,
      updateExpirationDays: s.updateExpirationDays,
      noncurrentExpirationDays: s.noncurrentExpirationDays,
    });
    this.ledger = new Ledger(this, 'Ledger', { retainData: s.retainData });
    this.messaging = new Messaging(this, 'Messaging');

    // The Lambda needs the state machine's ARN (environment + task callback
    // permission) and the state machine needs the Lambda's ARN (definition +
    // invoke permission). Naming the state machine up front breaks the cycle:
    // its ARN is known from the name alone.
    const stateMachineName = `${this.stackName}-federated-training`.slice(0, 80);
    const stateMachineArn = this.formatArn({
      service: 'states',
      resource: 'stateMachine',
      resourceName: stateMachineName,
      arnFormat: ArnFormat.COLON_RESOURCE_NAME,
    });

    this.aggregator = new Aggregator(this, 'Aggregator', {
      store: this.store,
      ledger: this.ledger,
      messaging: this.messaging,
      stateMachineArn,
      architecture: s.architecture,
      memoryMb: s.memoryMb,
      timeoutMinutes: s.timeoutMinutes,
      rustLog: s.rustLog,
      logRetentionDays: s.logRetentionDays,
      lambdaManifest: s.lambdaManifest,
      lambdaAsset: s.lambdaAsset,
    });

    this.workflow = new TrainingWorkflow(this, 'Training', {
      stateMachineName,
      aslPath: s.aslPath,
      function: this.aggregator.function,
      logRetentionDays: s.logRetentionDays,
    });

    const outputIds = new Map<string, string>();
    for (const client of s.clients) {
      const access = new ClientAccess(this, `Client-${client.id}`, {
        client,
        store: this.store,
        ledger: this.ledger,
        topic: this.messaging.globalModelReady,
        trainingComplete: this.messaging.trainingComplete,
      });
      this.clients.set(client.id, access);

      const key = outputKey(client.id);
      const clash = outputIds.get(key);
      if (clash !== undefined) {
        throw new Error(`client ids "${clash}" and "${client.id}" map to the same output name Client${key}*; rename one`);
      }
      outputIds.set(key, client.id);
      const out = (suffix: string, value: string, what: string): void => {
        new CfnOutput(this, `Client${key}${suffix}`, { value, description: `fedstep client ${client.id}: ${what}` });
      };
      out('Id', client.id, 'client id');
      out('QueueUrl', access.queue.queueUrl, 'SQS queue with global_model_ready messages');
      out('RoleArn', access.role.roleArn, 'IAM role the client assumes');
      out('ExternalId', client.externalId, 'sts:ExternalId required to assume the role');
      // Everything a client.toml needs, in one value (see README "Client config").
      out('Config', this.toJsonString({
        client_id: client.id,
        region: this.region,
        bucket: this.store.bucket.bucketName,
        updates_table: this.ledger.updates.tableName,
        queue_url: access.queue.queueUrl,
        role_arn: access.role.roleArn,
        external_id: client.externalId,
      }), 'client settings as JSON');
    }

    const global: Array<[string, string, string]> = [
      ['Region', this.region, 'AWS region of the deployment'],
      ['ModelBucketName', this.store.bucket.bucketName, 'S3 model bucket'],
      ['RoundsTableName', this.ledger.rounds.tableName, 'DynamoDB rounds table (ledger, artifact registry)'],
      ['UpdatesTableName', this.ledger.updates.tableName, 'DynamoDB updates table (written by clients)'],
      ['GlobalModelReadyTopicArn', this.messaging.globalModelReady.topicArn, 'SNS topic global_model_ready'],
      ['TrainingCompleteTopicArn', this.messaging.trainingComplete.topicArn, 'SNS topic training_complete'],
      ['StateMachineArn', this.workflow.stateMachine.stateMachineArn, 'Step Functions training state machine'],
      ['AggregatorFunctionName', this.aggregator.function.functionName, 'aggregator Lambda function'],
      ['StreamDlqUrl', this.aggregator.streamDlq.queueUrl, 'stream records the Lambda gave up on'],
    ];
    for (const [id, value, description] of global) new CfnOutput(this, id, { value, description });
  }
}

/** `site-a` -> `SiteA` (CloudFormation output ids are alphanumeric). */
export function outputKey(clientId: string): string {
  const key = clientId
    .split(/[-_]+/)
    .filter((p) => p.length > 0)
    .map((p) => p[0].toUpperCase() + p.slice(1))
    .join('');
  return key.length > 0 ? key : `X${Buffer.from(clientId).toString('hex')}`;
}
