import { CfnOutput, Stack, StackProps, Tags } from 'aws-cdk-lib';
import { Construct } from 'constructs';
import { ClientAccess } from './client-access';
import { ClientSettings } from './config';
import { Ledger } from './ledger';
import { Messaging } from './messaging';
import { ModelStore } from './model-store';

export interface ClientsStackProps extends StackProps {
  /** The clients of this batch (lib/client-batches.ts). */
  readonly clients: ClientSettings[];
  readonly store: ModelStore;
  readonly ledger: Ledger;
  readonly messaging: Messaging;
  /** The main stack's name: prefixes the clients' Roles Anywhere profile names. */
  readonly deploymentName: string;
  /** ARN of the deployment's Roles Anywhere trust anchor (main stack), if it has one. */
  readonly trustAnchorArn?: string;
}

/**
 * One batch of clients: per client its queue, subscription and role
 * (ClientAccess), its Roles Anywhere profile if it has one, and one output,
 * `Client<Id>Config`.
 *
 * A top-level stack, not a nested one: `cdk deploy --outputs-file` writes
 * the outputs of top-level stacks only, and the CLI (`fedstep infra
 * client-config`) reads a client's settings from there.
 *
 * What it uses from the main stack (bucket, updates table, topic, shared
 * DLQ) arrives as weak cross-stack references (cdk.json:
 * `@aws-cdk/core:defaultCrossStackReferences = weak`): `Fn::GetStackOutput`
 * of a handful of plain outputs of the main stack, shared by all batches.
 * No Fn::ImportValue exports: the main stack stays updatable while clients
 * stacks exist.
 *
 * Logical ids depend only on the client id (construct path
 * `Client-<id>/...`), not on the other members of the batch.
 */
export class ClientsStack extends Stack {
  readonly clients: Map<string, ClientAccess> = new Map();

  constructor(scope: Construct, id: string, props: ClientsStackProps) {
    super(scope, id, props);
    Tags.of(this).add('project', 'fedstep');
    const { store, ledger, messaging } = props;

    for (const client of props.clients) {
      const access = new ClientAccess(this, `Client-${client.id}`, {
        client,
        store,
        ledger,
        topic: messaging.topic,
        deadLetterQueue: messaging.clientDlq,
        rolesAnywhere: props.trustAnchorArn === undefined ? undefined : {
          trustAnchorArn: props.trustAnchorArn,
          profileName: `${props.deploymentName}-${client.id}`,
        },
      });
      this.clients.set(client.id, access);
      // Everything a client.toml needs, in one value (see README "Client
      // config"): one output per client, so a batch stays far below
      // CloudFormation's 200 outputs per stack. With Roles Anywhere, also
      // what the client's credential_process needs (the role is role_arn).
      new CfnOutput(this, `Client${outputKey(client.id)}Config`, {
        description: `fedstep client ${client.id}: client settings as JSON`,
        value: this.toJsonString({
          client_id: client.id,
          region: this.region,
          bucket: store.bucket.bucketName,
          updates_table: ledger.updates.tableName,
          queue_url: access.queue.queueUrl,
          role_arn: access.role.roleArn,
          external_id: client.externalId,
          ...(access.rolesAnywhere === undefined ? {} : {
            trust_anchor_arn: props.trustAnchorArn,
            profile_arn: access.rolesAnywhere.arn,
          }),
        }),
      });
    }
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
