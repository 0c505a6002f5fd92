import {
  assignBatches, batchOf, batchStackName, CLIENT_RESOURCES, clientResources, hashBatch, MAX_BATCH_RESOURCES, MAX_CLIENTS_PER_BATCH,
  ROLES_ANYWHERE_RESOURCES,
} from '../lib/client-batches';
import { ClientSettings } from '../lib/config';

const client = (id: string, batch?: number): ClientSettings => ({ id, externalId: `fedstep-${id}`, batch });

describe('client batches', () => {
  test('the hash is pinned: changing it would move every client of every deployment to another stack', () => {
    // If this fails, the assignment function changed: existing deployments
    // would replace all client queues and roles. Don't.
    expect(['site-a', 'site-b', 'site-c', 'site-000', 'x'].map((id) => hashBatch(id, 16))).toEqual([14, 6, 15, 10, 2]);
    expect(hashBatch('site-a', 1)).toBe(0);
  });

  test('a client\'s batch depends on its id only, not on the other clients or the order', () => {
    const ids = Array.from({ length: 50 }, (_, i) => `c-${i}`);
    const forward = assignBatches(ids.map((id) => client(id)), 16);
    const reversed = assignBatches([...ids].reverse().concat('new-one').map((id) => client(id)), 16);
    const where = (m: Map<number, ClientSettings[]>) =>
      new Map([...m].flatMap(([b, cs]) => cs.map((c): [string, number] => [c.id, b])));
    const before = where(forward);
    const after = where(reversed);
    for (const id of ids) expect([id, after.get(id)]).toEqual([id, before.get(id)]);
  });

  test('a pinned batch wins over the hash', () => {
    expect(batchOf(client('site-a'), 16)).toBe(14);
    expect(batchOf(client('site-a', 3), 16)).toBe(3);
    expect([...assignBatches([client('site-a', 3), client('site-b')], 16).keys()]).toEqual([3, 6]);
  });

  test('empty batches get no stack; batches come in order', () => {
    const m = assignBatches(['site-a', 'site-b', 'site-c'].map((id) => client(id)), 16);
    expect([...m.keys()]).toEqual([6, 14, 15]);
  });

  test('a batch over the limit is refused with what to do', () => {
    const many = Array.from({ length: MAX_CLIENTS_PER_BATCH + 1 }, (_, i) => client(`c-${i}`, 0));
    expect(() => assignBatches(many, 4)).toThrow(/batch 0 would hold 101 clients \(at most 100\).*clients\.<id>\.batch/);
    expect(() => assignBatches(many.slice(1), 4)).not.toThrow();
  });

  test('Roles Anywhere clients cost a resource more; a batch is also capped by resources', () => {
    const withCert = (id: string, batch?: number): ClientSettings => ({ ...client(id, batch), rolesAnywhere: { certificateSubjectCN: id } });
    expect(clientResources(client('a'))).toBe(CLIENT_RESOURCES);
    expect(clientResources(withCert('a'))).toBe(CLIENT_RESOURCES + ROLES_ANYWHERE_RESOURCES);
    // 100 clients with certificates would be 500 resources (+ CDKMetadata): over CloudFormation's 500.
    const fits = Math.floor(MAX_BATCH_RESOURCES / (CLIENT_RESOURCES + ROLES_ANYWHERE_RESOURCES));
    expect(fits).toBeLessThan(MAX_CLIENTS_PER_BATCH);
    const many = Array.from({ length: fits + 1 }, (_, i) => withCert(`c-${i}`, 0));
    expect(() => assignBatches(many, 4)).toThrow(new RegExp(`batch 0 would hold ${(fits + 1) * 5} resources \\(${fits + 1} clients; at most ${MAX_BATCH_RESOURCES}\\)`));
    expect(() => assignBatches(many.slice(1), 4)).not.toThrow();
    // Without certificates the same number of clients is fine.
    expect(() => assignBatches(many.map((c) => client(c.id, 0)), 4)).not.toThrow();
  });

  test('stack names', () => {
    expect(batchStackName('Fedstep', 7)).toBe('Fedstep-Clients-07');
    expect(batchStackName('Fed', 99)).toBe('Fed-Clients-99');
  });
});
