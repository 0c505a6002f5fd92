import * as fs from 'fs';
import * as path from 'path';
import { Annotations, Match } from 'aws-cdk-lib/assertions';
import { MAX_ITERATOR_AGE, ROUND_METRICS } from '../lib/monitoring';
import { Json, logicalId, resourcesOfType, scratchDir, Synth, synthFedstep } from './helpers';

const EMF_RS = path.resolve(__dirname, '..', '..', 'crates', 'lambda', 'src', 'emf.rs');

let plain: Synth;
let paged: Synth;
beforeAll(() => {
  plain = synthFedstep({ clients: 'site-a,site-b' });
  paged = synthFedstep({ clients: 'site-a', alarmTopic: 'true' });
});
afterAll(() => fs.rmSync(scratchDir(), { recursive: true, force: true }));

const alarms = (s: Synth): Json[] => resourcesOfType(s.template.toJSON().Resources, 'AWS::CloudWatch::Alarm').map(([, a]) => a.Properties);
const alarmOn = (s: Synth, namespace: string, metricName: string): Json[] =>
  alarms(s).filter((a) => a.Namespace === namespace && a.MetricName === metricName);

/** The dashboard body as CloudFormation holds it: a Fn::Join of strings and tokens, flattened to text. */
function dashboardBody(s: Synth): string {
  const [[, d]] = resourcesOfType(s.template.toJSON().Resources, 'AWS::CloudWatch::Dashboard');
  const body = d.Properties.DashboardBody;
  const parts: Json[] = body['Fn::Join'] ? body['Fn::Join'][1] : [body];
  return parts.map((p) => (typeof p === 'string' ? p : JSON.stringify(p))).join('');
}

describe('monitoring', () => {
  test('the dashboard graphs the names the aggregator prints (crates/lambda/src/emf.rs)', () => {
    const rust = fs.readFileSync(EMF_RS, 'utf8');
    expect(rust).toContain(`pub const NAMESPACE: &str = "${ROUND_METRICS.namespace}";`);
    expect(rust).toContain(`pub const DIMENSION: &str = "${ROUND_METRICS.dimension}";`);
    for (const name of ROUND_METRICS.names) expect(rust).toContain(`"${name}"`);

    const body = dashboardBody(plain);
    for (const name of ROUND_METRICS.names) {
      // One SEARCH per metric: a line per job, whatever jobs run.
      expect(body).toContain(`SEARCH('{${ROUND_METRICS.namespace},${ROUND_METRICS.dimension}} MetricName=\\"${name}\\"'`);
    }
    for (const m of ['ExecutionsFailed', 'ExecutionsTimedOut', 'IteratorAge', 'ApproximateNumberOfMessagesVisible']) {
      expect(body).toContain(m);
    }
  });

  test('alarms: failed, timed-out and aborted executions of this state machine', () => {
    const smArn = { Ref: logicalId(plain.stack, plain.stack.workflow.stateMachine) };
    for (const metric of ['ExecutionsFailed', 'ExecutionsTimedOut', 'ExecutionsAborted']) {
      const [a, ...more] = alarmOn(plain, 'AWS/States', metric);
      expect(more).toEqual([]);
      expect(a.Dimensions).toEqual([{ Name: 'StateMachineArn', Value: smArn }]);
      expect(a).toMatchObject({
        Threshold: 1, ComparisonOperator: 'GreaterThanOrEqualToThreshold', EvaluationPeriods: 1,
        Statistic: 'Sum', TreatMissingData: 'notBreaching',
      });
    }
  });

  test('alarms: a message in either dead-letter queue; the stream falling behind', () => {
    const queues = alarmOn(plain, 'AWS/SQS', 'ApproximateNumberOfMessagesVisible')
      .map((a) => a.Dimensions[0].Value);
    const queueNames = (id: string) => ({ 'Fn::GetAtt': [id, 'QueueName'] });
    expect(queues).toEqual(expect.arrayContaining([
      queueNames(logicalId(plain.stack, plain.stack.aggregator.streamDlq)),
      queueNames(logicalId(plain.stack, plain.stack.messaging.clientDlq)),
    ]));
    expect(queues).toHaveLength(2);
    // The iterator age is the stream function's: it holds the mapping.
    const [age, ...more] = alarmOn(plain, 'AWS/Lambda', 'IteratorAge');
    expect(more).toEqual([]);
    expect(age.Dimensions).toEqual([{ Name: 'FunctionName', Value: { Ref: logicalId(plain.stack, plain.stack.aggregator.streamFunction) } }]);
    expect(age).toMatchObject({ Statistic: 'Maximum', Threshold: MAX_ITERATOR_AGE.toMilliseconds() });
  });

  test('the dashboard graphs both functions: invocations, errors and throttles of the aggregator and of the stream function', () => {
    // The body with each token as a plain string: a Ref as the logical id.
    const [[, d]] = resourcesOfType(plain.template.toJSON().Resources, 'AWS::CloudWatch::Dashboard');
    const parts: Json[] = d.Properties.DashboardBody['Fn::Join'][1];
    const body = JSON.parse(parts.map((p) => (typeof p === 'string' ? p : p.Ref ?? 'token')).join(''));
    const fn = logicalId(plain.stack, plain.stack.aggregator.function);
    const stream = logicalId(plain.stack, plain.stack.aggregator.streamFunction);
    const lambdaMetrics = (title: string): string[] => {
      const w = body.widgets.find((x: Json) => x.properties.title === title);
      expect(w).toBeDefined();
      return w.properties.metrics.map((m: Json[]) => m.filter((x) => typeof x === 'string').join(' '));
    };
    expect(lambdaMetrics('Aggregator Lambda (tasks)')).toEqual(['Invocations', 'Errors', 'Throttles']
      .map((m) => `AWS/Lambda ${m} FunctionName ${fn}`));
    expect(lambdaMetrics('Stream Lambda (updates stream)')).toEqual(['Invocations', 'Errors', 'Throttles']
      .map((m) => `AWS/Lambda ${m} FunctionName ${stream}`));
    expect(lambdaMetrics('Stream iterator age (ms) and dead letters')[0]).toBe(`AWS/Lambda IteratorAge FunctionName ${stream}`);
    // A dashboard row is 24 units wide.
    const widths = body.widgets.map((x: Json) => x.width);
    expect(widths.reduce((a: number, b: number) => a + b, 0) % 24).toBe(0);
  });

  test('without alarmTopic: no topic, no alarm actions', () => {
    for (const a of alarms(plain)) expect(a.AlarmActions).toBeUndefined();
    expect(plain.stack.monitoring.topic).toBeUndefined();
    expect(plain.template.toJSON().Outputs.AlarmTopicArn).toBeUndefined();
    expect(plain.template.toJSON().Outputs.DashboardName).toBeDefined();
  });

  test('with alarmTopic: every alarm notifies one encrypted topic that CloudWatch may use', () => {
    const topic = paged.stack.monitoring.topic!;
    const topicId = logicalId(paged.stack, topic);
    const all = alarms(paged);
    expect(all.length).toBe(6);
    for (const a of all) expect(a.AlarmActions).toEqual([{ Ref: topicId }]);
    const t = paged.template.toJSON();
    const keyRef = t.Resources[topicId].Properties.KmsMasterKeyId;
    const keyId = keyRef['Fn::GetAtt'][0];
    const statements: Json[] = t.Resources[keyId].Properties.KeyPolicy.Statement;
    expect(statements).toEqual(expect.arrayContaining([
      expect.objectContaining({
        Principal: { Service: 'cloudwatch.amazonaws.com' },
        Action: expect.arrayContaining(['kms:Decrypt', 'kms:GenerateDataKey*']),
        Effect: 'Allow',
      }),
    ]));
    expect(t.Outputs.AlarmTopicArn.Value).toEqual({ Ref: topicId });
    expect(Annotations.fromStack(paged.stack).findError('*', Match.stringLikeRegexp('AwsSolutions-.*'))).toEqual([]);
  });
});
