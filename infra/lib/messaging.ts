import { Duration, RemovalPolicy } from 'aws-cdk-lib';
import * as kms from 'aws-cdk-lib/aws-kms';
import * as sns from 'aws-cdk-lib/aws-sns';
import * as sqs from 'aws-cdk-lib/aws-sqs';
import { NagSuppressions } from 'cdk-nag';
import { Construct } from 'constructs';

/**
 * The notification topic, its customer managed KMS key, and the one
 * dead-letter queue all client queues share.
 *
 * One topic carries every kind of notification the Lambda publishes:
 * `global_model_ready` (a round is open), `training_complete` (a job
 * ended) and `job_failed` (a job failed: the workflow's ReportFailure).
 * Each message has the attributes `type` (the kind) and `job_id`.
 * Every client queue subscribes once (ClientAccess), optionally filtered on
 * `job_id`; the client tells the kinds apart by the body's `type`. Operators
 * who want only job ends subscribe with the filter policy
 * `{"type": ["training_complete", "job_failed"]}`. One topic instead of two
 * halves the subscriptions per client, and the Lambda needs no change for
 * it: without FEDSTEP_TRAINING_COMPLETE_TOPIC_ARN it publishes job ends to
 * FEDSTEP_TOPIC_ARN (crates/aws/src/sns.rs).
 *
 * The construct id `GlobalModelReady` is kept from the two-topic layout so
 * that an existing deployment keeps its topic (and ARN).
 *
 * The key encrypts only the topic. The publisher (the Lambda) needs
 * kms:GenerateDataKey + kms:Decrypt on it; SNS delivers to the SSE-SQS client
 * queues without any key grant.
 */
export class Messaging extends Construct {
  readonly key: kms.Key;
  /** `global_model_ready`, `training_complete` and `job_failed`. */
  readonly topic: sns.Topic;
  /**
   * Dead-letter queue of every client queue. A message there carries the
   * queue it came from in its `DeadLetterQueueSourceArn` attribute (and
   * SQS's redrive returns it there), so one shared queue loses nothing that a
   * queue per client would keep, and costs no resources per client.
   */
  readonly clientDlq: sqs.Queue;

  constructor(scope: Construct, id: string) {
    super(scope, id);
    this.key = new kms.Key(this, 'TopicKey', {
      description: 'fedstep: encrypts the notification SNS topic',
      enableKeyRotation: true,
      // A deleted key makes the (transient) messages unreadable, nothing else; a
      // 7-day window still allows cancelling an accidental deletion.
      pendingWindow: Duration.days(7),
      removalPolicy: RemovalPolicy.DESTROY,
    });
    this.topic = new sns.Topic(this, 'GlobalModelReady', {
      displayName: 'fedstep notifications (global_model_ready, training_complete)',
      masterKey: this.key,
      enforceSSL: true,
    });

    this.clientDlq = new sqs.Queue(this, 'ClientDlq', {
      encryption: sqs.QueueEncryption.SQS_MANAGED,
      enforceSSL: true,
      // Longer than the client queues' 4 days: SQS keeps a message's original
      // enqueue time when it moves it here.
      retentionPeriod: Duration.days(14),
    });
    NagSuppressions.addResourceSuppressions(this.clientDlq, [
      { id: 'AwsSolutions-SQS3', reason: 'This queue is the dead-letter queue of the client queues.' },
    ]);
  }
}
