import { StackProps } from 'aws-cdk-lib';
import { Construct } from 'constructs';
import { ClientAccess } from './client-access';
import { assignBatches, batchStackName } from './client-batches';
import { ClientsStack, outputKey } from './clients-stack';
import { FedstepSettings } from './config';
import { FedstepStack } from './fedstep-stack';

export interface FedstepDeployment {
  /** The main stack (named `stackName`). */
  readonly main: FedstepStack;
  /** The non-empty clients stacks by batch number, in batch order. */
  readonly batches: Map<number, ClientsStack>;
  /** Every client's access construct, by client id. */
  readonly clients: Map<string, ClientAccess>;
  /** The stack each client lives in, by client id. */
  readonly stackOf: Map<string, ClientsStack>;
}

/**
 * One fedstep deployment: the main stack `stackName` and one top-level
 * `<stackName>-Clients-NN` stack per non-empty batch of clients
 * (lib/client-batches.ts). Deploy them together: `cdk deploy --all`.
 * Each clients stack depends on the main stack (weak references to its
 * outputs), so the CLI deploys the main stack first.
 */
export function addFedstep(scope: Construct, stackName: string, settings: FedstepSettings, props: StackProps = {}): FedstepDeployment {
  checkOutputKeys(settings.clients.map((c) => c.id));
  const main = new FedstepStack(scope, stackName, { ...props, settings });
  const batches = new Map<number, ClientsStack>();
  const clients = new Map<string, ClientAccess>();
  const stackOf = new Map<string, ClientsStack>();
  for (const [batch, members] of assignBatches(settings.clients, settings.clientBatches)) {
    const name = batchStackName(stackName, batch);
    const stack = new ClientsStack(scope, name, {
      ...props,
      description: `fedstep ${stackName}: clients batch ${batch} (queues and roles of the clients assigned to it)`,
      clients: members,
      store: main.store,
      ledger: main.ledger,
      messaging: main.messaging,
      deploymentName: stackName,
      trustAnchorArn: main.clientTrustAnchor?.arn,
    });
    batches.set(batch, stack);
    for (const [id, access] of stack.clients) {
      clients.set(id, access);
      stackOf.set(id, stack);
    }
  }
  return { main, batches, clients, stackOf };
}

/**
 * Output names are `Client<Id>Config` with the id in PascalCase; two ids
 * that map to the same name are refused even in different batches, so a
 * name always means one client of the deployment.
 */
function checkOutputKeys(ids: string[]): void {
  const seen = new Map<string, string>();
  for (const id of ids) {
    const key = outputKey(id);
    const clash = seen.get(key);
    if (clash !== undefined) {
      throw new Error(`client ids "${clash}" and "${id}" map to the same output name Client${key}*; rename one`);
    }
    seen.set(key, id);
  }
}
