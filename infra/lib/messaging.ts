import { Duration, RemovalPolicy } from 'aws-cdk-lib';
import * as kms from 'aws-cdk-lib/aws-kms';
import * as sns from 'aws-cdk-lib/aws-sns';
import { Construct } from 'constructs';

/**
 * SNS topics and their customer managed KMS key.
 * - `global_model_ready`: published by the Lambda when a round opens; every
 *   client's SQS queue subscribes to it (see ClientAccess).
 * - `training_complete`: published by the Lambda's finalize step; every
 *   client's queue subscribes to it too (`exit_on_complete`), and operators
 *   may add their own subscriptions (e-mail, chat, queues).
 *
 * The key encrypts only the topics. Publishers (the Lambda) need
 * kms:GenerateDataKey + kms:Decrypt on it; SNS delivers to the SSE-SQS client
 * queues without any key grant.
 */
export class Messaging extends Construct {
  readonly key: kms.Key;
  readonly globalModelReady: sns.Topic;
  readonly trainingComplete: sns.Topic;

  constructor(scope: Construct, id: string) {
    super(scope, id);
    this.key = new kms.Key(this, 'TopicKey', {
      description: 'fedstep: encrypts the global_model_ready and training_complete SNS topics',
      enableKeyRotation: true,
      // A deleted key makes the (transient) messages unreadable, nothing else; a
      // 7-day window still allows cancelling an accidental deletion.
      pendingWindow: Duration.days(7),
      removalPolicy: RemovalPolicy.DESTROY,
    });
    this.globalModelReady = new sns.Topic(this, 'GlobalModelReady', {
      displayName: 'fedstep global_model_ready',
      masterKey: this.key,
      enforceSSL: true,
    });
    this.trainingComplete = new sns.Topic(this, 'TrainingComplete', {
      displayName: 'fedstep training_complete',
      masterKey: this.key,
      enforceSSL: true,
    });
  }
}
