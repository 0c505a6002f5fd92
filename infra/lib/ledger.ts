import { RemovalPolicy } from 'aws-cdk-lib';
import * as dynamodb from 'aws-cdk-lib/aws-dynamodb';
import { Construct } from 'constructs';

/** Name of the artifact registry index on the rounds table (same as scripts/local_deploy.py). */
export const ARTIFACTS_INDEX = 'artifacts_by_type';

export interface LedgerProps {
  readonly retainData: boolean;
}

/**
 * The DynamoDB ledger (docs/design.md §2):
 * - `rounds`: written by the Lambda functions only. PK job_id (S), SK round (N); the
 *   sparse GSI `artifacts_by_type` (artifact_llm_type / artifact_created_at)
 *   is the artifact registry, newest first with ScanIndexForward=false.
 * - `updates`: written by clients, one row per client and round. PK client_id
 *   (S), SK job_round (S) = `{job_id}#{round:06}`; its NEW_IMAGE stream drives
 *   the stream function (Aggregator.streamFunction).
 *
 * Both on-demand, PITR on, encrypted with the AWS managed key
 * (alias/aws/dynamodb): visible in CloudTrail, and no key policy to manage.
 * We use Table (not TableV2) but never its stream grant helper, which would
 * add dynamodb:ListStreams on "*"; see Aggregator.
 */
export class Ledger extends Construct {
  readonly rounds: dynamodb.Table;
  readonly updates: dynamodb.Table;

  constructor(scope: Construct, id: string, props: LedgerProps) {
    super(scope, id);
    const common = {
      billingMode: dynamodb.BillingMode.PAY_PER_REQUEST,
      encryption: dynamodb.TableEncryption.AWS_MANAGED,
      pointInTimeRecoverySpecification: { pointInTimeRecoveryEnabled: true },
      removalPolicy: props.retainData ? RemovalPolicy.RETAIN : RemovalPolicy.DESTROY,
      deletionProtection: props.retainData,
    };

    this.rounds = new dynamodb.Table(this, 'Rounds', {
      ...common,
      partitionKey: { name: 'job_id', type: dynamodb.AttributeType.STRING },
      sortKey: { name: 'round', type: dynamodb.AttributeType.NUMBER },
    });
    this.rounds.addGlobalSecondaryIndex({
      indexName: ARTIFACTS_INDEX,
      partitionKey: { name: 'artifact_llm_type', type: dynamodb.AttributeType.STRING },
      sortKey: { name: 'artifact_created_at', type: dynamodb.AttributeType.STRING },
      projectionType: dynamodb.ProjectionType.ALL,
    });

    this.updates = new dynamodb.Table(this, 'Updates', {
      ...common,
      partitionKey: { name: 'client_id', type: dynamodb.AttributeType.STRING },
      sortKey: { name: 'job_round', type: dynamodb.AttributeType.STRING },
      stream: dynamodb.StreamViewType.NEW_IMAGE,
    });
  }

  /** ARN of the rounds table's artifact index (for exact IAM grants). */
  get artifactsIndexArn(): string {
    return `${this.rounds.tableArn}/index/${ARTIFACTS_INDEX}`;
  }
}
