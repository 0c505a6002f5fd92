import { Duration, RemovalPolicy } from 'aws-cdk-lib';
import * as s3 from 'aws-cdk-lib/aws-s3';
import { NagSuppressions } from 'cdk-nag';
import { Construct } from 'constructs';

/**
 * S3 key layout (docs/design.md §2). IAM policies match these patterns (`*` in an
 * IAM resource ARN also matches `/`), so keep them in one place.
 */
export const KEYS = {
  /** Everything fedstep writes lives under this prefix. */
  jobsPrefix: 'jobs/',
  /** Everything under jobs/ (the Lambda's read/write scope). */
  allJobObjects: 'jobs/*',
  /** The global model clients train in a round. */
  globalModel: 'jobs/*/rounds/*/global.safetensors',
  /** The global models of one job (job ids hold no `*` or `?`: lib/config.ts). */
  jobGlobalModel: (jobId: string): string => `jobs/${jobId}/rounds/*/global.safetensors`,
  /** SCAFFOLD's server control variate c of a round, beside its global model. */
  scaffoldVariate: 'jobs/*/rounds/*/scaffold_variate.safetensors',
  /** The server control variates of one job. */
  jobScaffoldVariate: (jobId: string): string => `jobs/${jobId}/rounds/*/scaffold_variate.safetensors`,
  /** One client's local model for a round. */
  clientUpdate: (clientId: string): string => `jobs/*/rounds/*/updates/${clientId}.safetensors`,
  /**
   * One client's SCAFFOLD Δc_i for a round, beside its update (uploaded tagged
   * like the update, UPDATE_TAG, so it expires with it). No other client's
   * update key matches: client ids hold no `.` (lib/config.ts CLIENT_ID_RE).
   */
  clientScaffoldDelta: (clientId: string): string => `jobs/*/rounds/*/updates/${clientId}.scaffold_delta.safetensors`,
};

/**
 * Object tag that marks a client update object for expiry.
 *
 * S3 lifecycle filters match a literal key prefix, not a pattern, so a rule
 * cannot select `jobs/*\/rounds/*\/updates/` by key. The expiry rule therefore
 * selects prefix `jobs/` AND this tag. The client sets the tag when it
 * uploads its update (crates/aws/src/s3.rs `UPDATE_TAGGING`, in the same
 * PutObject/CreateMultipartUpload request; its role has s3:PutObjectTagging
 * on its own update keys only), so the expiry counts from the upload:
 * `updateExpirationDays` must exceed any round's timeout. Untagged objects
 * (global models, server state) are kept; their old versions expire with the
 * noncurrent-version rule.
 */
export const UPDATE_TAG = { key: 'fedstep-kind', value: 'update' };

export interface ModelStoreProps {
  readonly retainData: boolean;
  /** Days after upload after which a tagged update object expires. */
  readonly updateExpirationDays: number;
  /** Days after which a noncurrent (overwritten/deleted) version under jobs/ is removed. */
  readonly noncurrentExpirationDays: number;
}

/**
 * The model registry bucket (versioned, SSE-S3, TLS-only, no public access)
 * and the bucket its server access logs go to.
 *
 * SSE-S3 rather than SSE-KMS: clients and the Lambda then need no KMS
 * permissions for model objects, and there is no per-request KMS charge on
 * multi-hundred-MB model transfers. Swap to `BucketEncryption.KMS` with a
 * customer key if your compliance regime asks for key-level audit.
 */
export class ModelStore extends Construct {
  readonly bucket: s3.Bucket;
  readonly accessLogs: s3.Bucket;

  constructor(scope: Construct, id: string, props: ModelStoreProps) {
    super(scope, id);
    const removalPolicy = props.retainData ? RemovalPolicy.RETAIN : RemovalPolicy.DESTROY;

    this.accessLogs = new s3.Bucket(this, 'AccessLogs', {
      // Server access logging delivers only to SSE-S3 encrypted target buckets.
      encryption: s3.BucketEncryption.S3_MANAGED,
      enforceSSL: true,
      blockPublicAccess: s3.BlockPublicAccess.BLOCK_ALL,
      objectOwnership: s3.ObjectOwnership.BUCKET_OWNER_ENFORCED,
      lifecycleRules: [{ id: 'expire-access-logs', expiration: Duration.days(365) }],
      removalPolicy,
    });
    // Justified: this bucket *is* the access-log target of the model bucket.
    // Logging it into itself would recurse; a third bucket would only move the problem.
    NagSuppressions.addResourceSuppressions(this.accessLogs, [
      { id: 'AwsSolutions-S1', reason: 'Server access log target bucket of the model bucket; it does not log itself.' },
    ]);

    this.bucket = new s3.Bucket(this, 'Models', {
      versioned: true,
      encryption: s3.BucketEncryption.S3_MANAGED,
      enforceSSL: true,
      blockPublicAccess: s3.BlockPublicAccess.BLOCK_ALL,
      objectOwnership: s3.ObjectOwnership.BUCKET_OWNER_ENFORCED,
      serverAccessLogsBucket: this.accessLogs,
      serverAccessLogsPrefix: 'models/',
      removalPolicy,
      lifecycleRules: [
        {
          id: 'expire-client-updates',
          prefix: KEYS.jobsPrefix,
          tagFilters: { [UPDATE_TAG.key]: UPDATE_TAG.value },
          expiration: Duration.days(props.updateExpirationDays),
          noncurrentVersionExpiration: Duration.days(props.noncurrentExpirationDays),
        },
        {
          id: 'expire-noncurrent-versions',
          prefix: KEYS.jobsPrefix,
          noncurrentVersionExpiration: Duration.days(props.noncurrentExpirationDays),
          expiredObjectDeleteMarker: true,
          abortIncompleteMultipartUploadAfter: Duration.days(1),
        },
      ],
    });
  }
}
