import * as fs from 'fs';
import { RemovalPolicy, Stack } from 'aws-cdk-lib';
import * as iam from 'aws-cdk-lib/aws-iam';
import * as lambda from 'aws-cdk-lib/aws-lambda';
import * as logs from 'aws-cdk-lib/aws-logs';
import * as sfn from 'aws-cdk-lib/aws-stepfunctions';
import { NagSuppressions } from 'cdk-nag';
import { Construct } from 'constructs';

/** `${Name}` placeholders of statemachine/federated_training.asl.json (see statemachine/README.md). */
export const ASL_PLACEHOLDER_RE = /\$\{([A-Za-z0-9_]+)\}/g;

/** Finds the `${Name}` placeholders of an ASL document. */
export function aslPlaceholders(definition: string): string[] {
  return [...new Set([...definition.matchAll(ASL_PLACEHOLDER_RE)].map((m) => m[1]))].sort();
}

/** What each placeholder becomes on AWS (the emulator deployment substitutes activities instead). */
export function definitionSubstitutions(fn: lambda.IFunction): Record<string, string> {
  return {
    // The round opens with a callback task; the stream path's SendTaskSuccess
    // (the hand-over) or the round's timeout ends it.
    StartRoundResource: `arn:${Stack.of(fn).partition}:states:::lambda:invoke.waitForTaskToken`,
    AggregatorFunctionArn: fn.functionArn,
    // Plain invocations: the task's result is the Lambda's return value
    // (PlanRound's is the plan, CommitRound's the round result). The round's
    // aggregation is PlanRound, the Maps' shard tasks (ShardStatistics,
    // AggregateShard: one invocation per shard), DecideRound and CommitRound;
    // all invoke the same function, which picks the handler by the event's
    // action.
    PlanRoundResource: fn.functionArn,
    ShardStatisticsResource: fn.functionArn,
    DecideRoundResource: fn.functionArn,
    AggregateShardResource: fn.functionArn,
    CommitRoundResource: fn.functionArn,
    FinalizeResource: fn.functionArn,
    // A failed job (a task's error after its retries, or a round result
    // without a boolean continue): the function tells the clients and fails
    // the open round before the execution ends in Failed.
    ReportFailureResource: fn.functionArn,
  };
}

export interface TrainingWorkflowProps {
  /** Fixed name: the Lambda's environment and policy refer to the ARN before the state machine exists. */
  readonly stateMachineName: string;
  readonly aslPath: string;
  readonly function: lambda.IFunction;
  readonly logRetentionDays: number;
}

/**
 * The training state machine (STANDARD: `.waitForTaskToken` needs it), loaded
 * from the ASL file with its placeholders filled by CloudFormation's
 * DefinitionSubstitutions, with ALL-level logging and X-Ray tracing.
 *
 * Its role is created here and handed to the state machine without policy
 * updates, so that every statement is explicit: lambda:InvokeFunction on
 * exactly the aggregator (every task invokes it, the Maps' iterations too,
 * with this role), plus the one isolated, justified "*" policy that log
 * delivery and X-Ray require.
 */
export class TrainingWorkflow extends Construct {
  readonly stateMachine: sfn.StateMachine;
  readonly role: iam.Role;
  readonly logGroup: logs.LogGroup;
  /** The only policy in the stack with `Resource: "*"` (see the comment on it). */
  readonly serviceWildcardPolicy: iam.Policy;

  constructor(scope: Construct, id: string, props: TrainingWorkflowProps) {
    super(scope, id);
    const definition = fs.readFileSync(props.aslPath, 'utf8');
    try {
      JSON.parse(definition);
    } catch (e) {
      throw new Error(`${props.aslPath}: not valid JSON: ${(e as Error).message}`);
    }
    const substitutions = definitionSubstitutions(props.function);
    // Fail at synth, not at deploy time, on a placeholder nobody fills.
    const unknown = aslPlaceholders(definition).filter((p) => !(p in substitutions));
    if (unknown.length > 0) {
      throw new Error(`${props.aslPath}: placeholders without a substitution: ${unknown.join(', ')}`);
    }

    this.logGroup = new logs.LogGroup(this, 'Logs', {
      // The /aws/vendedlogs/ prefix keeps the CloudWatch Logs resource policy
      // Step Functions writes small (AWS recommendation for vended logs).
      logGroupName: `/aws/vendedlogs/states/${props.stateMachineName}`,
      retention: props.logRetentionDays as logs.RetentionDays,
      removalPolicy: RemovalPolicy.DESTROY,
    });

    this.role = new iam.Role(this, 'Role', {
      assumedBy: new iam.ServicePrincipal('states.amazonaws.com'),
      description: 'fedstep training state machine',
    });
    const invoke = new iam.Policy(this, 'InvokeAggregator', {
      statements: [new iam.PolicyStatement({
        sid: 'InvokeAggregator',
        actions: ['lambda:InvokeFunction'],
        resources: [props.function.functionArn],
      })],
    });
    invoke.attachToRole(this.role);

    // The single documented exception to "no * resources": the CloudWatch Logs
    // vended-log-delivery APIs (CreateLogDelivery, ..., DescribeLogGroups) and
    // the X-Ray trace APIs do not support resource-level permissions; AWS
    // documents Resource "*" for both ("IAM policies for logging" and "X-Ray"
    // in the Step Functions developer guide). They grant no data access: log
    // delivery only points this state machine's logs at the log group above,
    // and X-Ray only accepts trace segments. The policy holds nothing else.
    this.serviceWildcardPolicy = new iam.Policy(this, 'LogDeliveryAndTracing', {
      statements: [
        new iam.PolicyStatement({
          sid: 'VendedLogDelivery',
          actions: [
            'logs:CreateLogDelivery', 'logs:GetLogDelivery', 'logs:UpdateLogDelivery', 'logs:DeleteLogDelivery',
            'logs:ListLogDeliveries', 'logs:PutResourcePolicy', 'logs:DescribeResourcePolicies', 'logs:DescribeLogGroups',
          ],
          resources: ['*'],
        }),
        new iam.PolicyStatement({
          sid: 'XRayTracing',
          actions: ['xray:PutTraceSegments', 'xray:PutTelemetryRecords', 'xray:GetSamplingRules', 'xray:GetSamplingTargets'],
          resources: ['*'],
        }),
      ],
    });
    this.serviceWildcardPolicy.attachToRole(this.role);
    NagSuppressions.addResourceSuppressions(this.serviceWildcardPolicy, [
      {
        id: 'AwsSolutions-IAM5',
        reason: 'CloudWatch Logs vended log delivery and X-Ray APIs support no resource-level permissions (AWS requires Resource "*"); this policy holds only those actions.',
        appliesTo: ['Resource::*'],
      },
    ]);

    this.stateMachine = new sfn.StateMachine(this, 'StateMachine', {
      stateMachineName: props.stateMachineName,
      stateMachineType: sfn.StateMachineType.STANDARD,
      definitionBody: sfn.DefinitionBody.fromFile(props.aslPath),
      definitionSubstitutions: substitutions,
      // Immutable view: CDK would otherwise add its own statements (incl. "*")
      // to a default policy; ours are all above.
      role: this.role.withoutPolicyUpdates(),
      logs: { destination: this.logGroup, level: sfn.LogLevel.ALL, includeExecutionData: true },
      tracingEnabled: true,
    });
    // Step Functions checks the role's permissions when the state machine is created.
    this.stateMachine.node.addDependency(invoke, this.serviceWildcardPolicy);
  }
}
