import { createHash } from 'crypto';
import { ClientSettings } from './config';

/**
 * Which clients stack ("batch") each client lives in.
 *
 * A client's batch depends on its own id only (or on the `batch` pinned in
 * its settings), never on the other clients or on its position in the list:
 * adding, removing or renaming one client never moves another between
 * stacks, which would replace its queue and role (new queue URL, new role
 * ARN). See infra/README.md, "Many clients".
 */

/**
 * Most clients one clients stack may hold. CloudFormation allows 500
 * resources and 200 outputs per stack; a client costs CLIENT_RESOURCES
 * resources (ROLES_ANYWHERE_RESOURCES more with Roles Anywhere) and one
 * output, so 100 clients are 400 resources + CDKMetadata, 500 with Roles
 * Anywhere for all: MAX_BATCH_RESOURCES caps that case.
 */
export const MAX_CLIENTS_PER_BATCH = 100;

/** Resources one client adds (queue, queue policy, subscription, role). */
export const CLIENT_RESOURCES = 4;

/** Resources a client with `rolesAnywhere` adds on top (its Roles Anywhere profile). */
export const ROLES_ANYWHERE_RESOURCES = 1;

/**
 * Most client resources one clients stack may hold: CloudFormation's 500,
 * less the CDKMetadata resource the CLI adds and room for a stack-level
 * resource added later (20 clients with Roles Anywhere fewer than 100).
 */
export const MAX_BATCH_RESOURCES = 480;

/** The CloudFormation resources `client` adds to its clients stack. */
export function clientResources(client: ClientSettings): number {
  return CLIENT_RESOURCES + (client.rolesAnywhere === undefined ? 0 : ROLES_ANYWHERE_RESOURCES);
}

/** The batch of a client id among `batches`: a stable hash (SHA-256) of the id. */
export function hashBatch(clientId: string, batches: number): number {
  const digest = createHash('sha256').update(clientId, 'utf8').digest();
  return digest.readUInt32BE(0) % batches;
}

/** The batch of a client: its pinned `batch`, else the hash of its id. */
export function batchOf(client: ClientSettings, batches: number): number {
  return client.batch ?? hashBatch(client.id, batches);
}

/** `Fedstep` + 7 -> `Fedstep-Clients-07`. */
export function batchStackName(mainStackName: string, batch: number): string {
  return `${mainStackName}-Clients-${String(batch).padStart(2, '0')}`;
}

/**
 * The clients of each non-empty batch, in batch order; within a batch in the
 * order given (the order does not affect any logical id). Throws when a
 * batch would exceed MAX_CLIENTS_PER_BATCH or MAX_BATCH_RESOURCES.
 */
export function assignBatches(clients: ClientSettings[], batches: number): Map<number, ClientSettings[]> {
  const byBatch = new Map<number, ClientSettings[]>();
  for (const client of clients) {
    const b = batchOf(client, batches);
    if (!byBatch.has(b)) byBatch.set(b, []);
    byBatch.get(b)!.push(client);
  }
  const remedy = 'pin new clients to emptier batches with clients.<id>.batch (existing clients must stay where they are), ' +
    'or, for a new deployment only, raise clientBatches';
  for (const [b, members] of byBatch) {
    if (members.length > MAX_CLIENTS_PER_BATCH) {
      throw new Error(`clients batch ${b} would hold ${members.length} clients (at most ${MAX_CLIENTS_PER_BATCH}): ${remedy}`);
    }
    const resources = members.reduce((sum, c) => sum + clientResources(c), 0);
    if (resources > MAX_BATCH_RESOURCES) {
      throw new Error(`clients batch ${b} would hold ${resources} resources (${members.length} clients; at most ${MAX_BATCH_RESOURCES}): ${remedy}`);
    }
  }
  return new Map([...byBatch.entries()].sort(([a], [b]) => a - b));
}
