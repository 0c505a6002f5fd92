import { ArnFormat, CfnOutput, Stack, StackProps, Tags } from 'aws-cdk-lib';
import { Construct } from 'constructs';
import { Aggregator } from './aggregator';
import { FedstepSettings } from './config';
import { Ledger } from './ledger';
import { Messaging } from './messaging';
import { ModelStore } from './model-store';
import { Monitoring } from './monitoring';
import { ClientTrustAnchor } from './roles-anywhere';
import { TrainingWorkflow } from './training-workflow';

export interface FedstepStackProps extends StackProps {
  readonly settings: FedstepSettings;
}

/**
 * The main stack of a fedstep deployment: model bucket, ledger tables, the
 * notification topic and the clients' shared DLQ, the Rust Lambda (two
 * functions from one bootstrap: the aggregator and the stream function) and
 * the training state machine, and with `rolesAnywhere` the clients' Roles
 * Anywhere trust anchor. The clients live in ClientsStacks
 * (lib/fedstep-app.ts). See infra/README.md.
 */
export class FedstepStack extends Stack {
  readonly store: ModelStore;
  readonly ledger: Ledger;
  readonly messaging: Messaging;
  readonly aggregator: Aggregator;
  readonly workflow: TrainingWorkflow;
  readonly monitoring: Monitoring;
  /** Only with the `rolesAnywhere` setting: one anchor for all clients stacks. */
  readonly clientTrustAnchor?: ClientTrustAnchor;

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

    // The Lambdas need the state machine's ARN (environment + task callback
    // permission) and the state machine needs the aggregator's ARN (definition +
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
      streamMemoryMb: s.streamMemoryMb,
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

    this.monitoring = new Monitoring(this, 'Monitoring', {
      stateMachine: this.workflow.stateMachine,
      function: this.aggregator.function,
      streamFunction: this.aggregator.streamFunction,
      deadLetterQueues: { StreamDlq: this.aggregator.streamDlq, ClientDlq: this.messaging.clientDlq },
      alarmTopic: s.alarmTopic,
      dashboardName: this.stackName,
    });

    if (s.rolesAnywhere !== undefined) {
      this.clientTrustAnchor = new ClientTrustAnchor(this, 'ClientTrustAnchor', {
        settings: s.rolesAnywhere,
        name: `${this.stackName}-clients`,
      });
    }

    const global: Array<[string, string, string]> = [
      ['Region', this.region, 'AWS region of the deployment'],
      ['ModelBucketName', this.store.bucket.bucketName, 'S3 model bucket'],
      ['RoundsTableName', this.ledger.rounds.tableName, 'DynamoDB rounds table (ledger, artifact registry)'],
      ['UpdatesTableName', this.ledger.updates.tableName, 'DynamoDB updates table (written by clients)'],
      ['GlobalModelReadyTopicArn', this.messaging.topic.topicArn, 'SNS topic of global_model_ready, training_complete and job_failed (attribute "type")'],
      // The same topic: kept for scripts that read this output. Subscribe
      // with the filter policy {"type": ["training_complete", "job_failed"]}
      // for job ends only.
      ['TrainingCompleteTopicArn', this.messaging.topic.topicArn, 'SNS topic of training_complete and job_failed (filter on the "type" attribute)'],
      ['ClientDlqUrl', this.messaging.clientDlq.queueUrl, 'messages the clients failed to process (all client queues)'],
      ['StateMachineArn', this.workflow.stateMachine.stateMachineArn, 'Step Functions training state machine'],
      ['AggregatorFunctionName', this.aggregator.function.functionName, 'aggregator Lambda function'],
      ['StreamFunctionName', this.aggregator.streamFunction.functionName, 'updates stream Lambda function (validates and counts rows)'],
      ['StreamDlqUrl', this.aggregator.streamDlq.queueUrl, 'stream records the stream function gave up on'],
    ];
    global.push(['DashboardName', this.monitoring.dashboard.dashboardName, 'CloudWatch dashboard of rounds, executions, both Lambda functions and the dead-letter queues']);
    if (this.monitoring.topic !== undefined) {
      global.push(['AlarmTopicArn', this.monitoring.topic.topicArn, 'SNS topic the alarms notify (subscribe a pager or e-mail)']);
    }
    if (this.clientTrustAnchor !== undefined) {
      global.push(['ClientTrustAnchorArn', this.clientTrustAnchor.arn, 'IAM Roles Anywhere trust anchor of the client certificates']);
    }
    for (const [id, value, description] of global) new CfnOutput(this, id, { value, description });
  }
}
