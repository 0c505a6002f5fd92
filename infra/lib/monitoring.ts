import { Duration, RemovalPolicy } from 'aws-cdk-lib';
import * as cloudwatch from 'aws-cdk-lib/aws-cloudwatch';
import * as actions from 'aws-cdk-lib/aws-cloudwatch-actions';
import * as iam from 'aws-cdk-lib/aws-iam';
import * as kms from 'aws-cdk-lib/aws-kms';
import * as lambda from 'aws-cdk-lib/aws-lambda';
import * as sfn from 'aws-cdk-lib/aws-stepfunctions';
import * as sns from 'aws-cdk-lib/aws-sns';
import * as sqs from 'aws-cdk-lib/aws-sqs';
import { Construct } from 'constructs';

/**
 * What the aggregator prints per closed round as CloudWatch metrics (EMF
 * lines, crates/lambda/src/emf.rs): namespace, dimension and names must be
 * the Rust ones (test/stack.test.ts reads emf.rs to check).
 */
export const ROUND_METRICS = {
  namespace: 'Fedstep',
  dimension: 'JobId',
  names: ['ClientsAccepted', 'ClientsRejected', 'AggregationSeconds', 'BytesRead', 'BytesWritten', 'OpenToCloseSeconds', 'StopMetric'],
} as const;

/** Stream records older than this mean the stream function has fallen behind. */
export const MAX_ITERATOR_AGE = Duration.minutes(5);

export interface MonitoringProps {
  readonly stateMachine: sfn.StateMachine;
  /** The aggregator (the state machine's tasks). */
  readonly function: lambda.IFunction;
  /** The `updates` stream's function: iterator age, errors and throttles of the stream processing. */
  readonly streamFunction: lambda.IFunction;
  /** Every dead-letter queue of the deployment: a message in any is an alarm. */
  readonly deadLetterQueues: Record<string, sqs.IQueue>;
  /** Create an SNS topic the alarms notify (subscribe a pager or e-mail to it). */
  readonly alarmTopic: boolean;
  readonly dashboardName: string;
}

/**
 * A CloudWatch dashboard of the rounds (the aggregator's EMF metrics, one
 * line per job), the executions, both Lambda functions and the dead-letter
 * queues; and alarms on what needs a person: a failed, timed-out or aborted
 * execution, any message in a dead-letter queue, and a stream the stream
 * function has fallen behind on. Alarms treat missing data as fine: no executions is
 * not a failure.
 */
export class Monitoring extends Construct {
  readonly dashboard: cloudwatch.Dashboard;
  readonly alarms: cloudwatch.Alarm[] = [];
  /** Only with `alarmTopic`. */
  readonly topic?: sns.Topic;

  constructor(scope: Construct, id: string, props: MonitoringProps) {
    super(scope, id);
    const period = Duration.minutes(5);
    const alarm = (name: string, metric: cloudwatch.IMetric, threshold: number, description: string) => {
      const a = new cloudwatch.Alarm(this, name, {
        metric,
        threshold,
        evaluationPeriods: 1,
        comparisonOperator: cloudwatch.ComparisonOperator.GREATER_THAN_OR_EQUAL_TO_THRESHOLD,
        treatMissingData: cloudwatch.TreatMissingData.NOT_BREACHING,
        alarmDescription: description,
      });
      this.alarms.push(a);
      return a;
    };

    const sm = props.stateMachine;
    alarm('ExecutionsFailed', sm.metricFailed({ period, statistic: 'Sum' }), 1,
      'A training execution failed (a round without quorum, a failed aggregation, or an error). See the execution history.');
    alarm('ExecutionsTimedOut', sm.metricTimedOut({ period, statistic: 'Sum' }), 1,
      'A training execution timed out.');
    alarm('ExecutionsAborted', sm.metricAborted({ period, statistic: 'Sum' }), 1,
      'A training execution was aborted (stopped by hand, or by a redeploy).');
    for (const [name, queue] of Object.entries(props.deadLetterQueues)) {
      alarm(`${name}NotEmpty`, queue.metricApproximateNumberOfMessagesVisible({ period, statistic: 'Maximum' }), 1,
        `Messages in the ${name} dead-letter queue: work that was given up on. Inspect, then redrive or delete.`);
    }
    const iteratorAge = new cloudwatch.Metric({
      namespace: 'AWS/Lambda',
      metricName: 'IteratorAge',
      dimensionsMap: { FunctionName: props.streamFunction.functionName },
      statistic: 'Maximum',
      period,
    });
    alarm('StreamIteratorAge', iteratorAge, MAX_ITERATOR_AGE.toMilliseconds(),
      `The stream function is more than ${MAX_ITERATOR_AGE.toMinutes()} minutes behind on the updates stream.`);

    if (props.alarmTopic) {
      // CloudWatch cannot publish to a topic under the AWS managed SNS key,
      // so the topic has its own key whose policy lets CloudWatch use it.
      const key = new kms.Key(this, 'AlarmTopicKey', {
        description: 'fedstep: encrypts the alarm SNS topic',
        enableKeyRotation: true,
        pendingWindow: Duration.days(7),
        removalPolicy: RemovalPolicy.DESTROY,
      });
      key.grant(new iam.ServicePrincipal('cloudwatch.amazonaws.com'), 'kms:Decrypt', 'kms:GenerateDataKey*');
      this.topic = new sns.Topic(this, 'AlarmTopic', {
        displayName: 'fedstep alarms',
        masterKey: key,
        enforceSSL: true,
      });
      for (const a of this.alarms) a.addAlarmAction(new actions.SnsAction(this.topic));
    }

    // One line per job: the metrics carry the JobId dimension, and the jobs
    // are not known at deploy time, so each graph SEARCHes for them.
    const perJob = (metricName: string, statistic: string, label: string) =>
      new cloudwatch.MathExpression({
        expression: `SEARCH('{${ROUND_METRICS.namespace},${ROUND_METRICS.dimension}} MetricName="${metricName}"', '${statistic}', ${period.toSeconds()})`,
        label,
        period,
      });
    const graph = (title: string, left: cloudwatch.IMetric[], width = 8) =>
      new cloudwatch.GraphWidget({ title, left, width, height: 6 });

    this.dashboard = new cloudwatch.Dashboard(this, 'Dashboard', {
      dashboardName: props.dashboardName,
      defaultInterval: Duration.days(1),
    });
    this.dashboard.addWidgets(
      new cloudwatch.TextWidget({
        markdown: '# fedstep\nRounds (one line per job, from the aggregator\'s EMF lines), executions, the aggregator and stream Lambdas and the dead-letter queues. Alarms: right.',
        width: 16,
        height: 3,
      }),
      new cloudwatch.AlarmStatusWidget({ title: 'Alarms', alarms: this.alarms, width: 8, height: 3 }),
    );
    this.dashboard.addWidgets(
      graph('Clients accepted per round', [perJob('ClientsAccepted', 'Sum', 'accepted')]),
      graph('Clients rejected per round', [perJob('ClientsRejected', 'Sum', 'rejected')]),
      graph('Stop metric (the job\'s [stop] metric)', [perJob('StopMetric', 'Average', 'stop metric')]),
    );
    this.dashboard.addWidgets(
      graph('Round open → closed (s)', [perJob('OpenToCloseSeconds', 'Maximum', 'open to close')]),
      graph('Aggregation (s)', [perJob('AggregationSeconds', 'Maximum', 'aggregation')]),
      graph('Bytes read / written per round', [perJob('BytesRead', 'Sum', 'read'), perJob('BytesWritten', 'Sum', 'written')]),
    );
    this.dashboard.addWidgets(
      graph('Executions', [
        sm.metricStarted({ period, statistic: 'Sum' }),
        sm.metricSucceeded({ period, statistic: 'Sum' }),
        sm.metricFailed({ period, statistic: 'Sum' }),
        sm.metricTimedOut({ period, statistic: 'Sum' }),
        sm.metricAborted({ period, statistic: 'Sum' }),
      ], 6),
      graph('Aggregator Lambda (tasks)', [
        props.function.metricInvocations({ period, statistic: 'Sum' }),
        props.function.metricErrors({ period, statistic: 'Sum' }),
        props.function.metricThrottles({ period, statistic: 'Sum' }),
      ], 6),
      graph('Stream Lambda (updates stream)', [
        props.streamFunction.metricInvocations({ period, statistic: 'Sum' }),
        props.streamFunction.metricErrors({ period, statistic: 'Sum' }),
        props.streamFunction.metricThrottles({ period, statistic: 'Sum' }),
      ], 6),
      graph('Stream iterator age (ms) and dead letters', [
        iteratorAge,
        ...Object.values(props.deadLetterQueues).map((q) =>
          q.metricApproximateNumberOfMessagesVisible({ period, statistic: 'Maximum' })),
      ], 6),
    );
  }
}
