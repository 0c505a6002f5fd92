import * as fs from 'fs';
import * as path from 'path';
import { CLIENT_RESOURCES, clientResources, ROLES_ANYWHERE_RESOURCES } from '../lib/client-batches';
import { Json, nagErrors, scratchDir, Synth, synthFedstep } from './helpers';

/**
 * Deployments with many clients (issue #20: one stack held at most 59).
 * CloudFormation limits a stack to 500 resources, 200 outputs and a 1 MB
 * template (uploaded through S3); every stack of a deployment must stay
 * below them at any client count, and adding a client must leave every
 * other client's resources exactly as they were. (app.synth() also runs
 * CDK's CloudFormation validation, cdk.json's validateAgainstDefaultRules,
 * which throws on a template over these limits.)
 */

/** CloudFormation's per-stack quotas. */
const LIMITS = { resources: 500, outputs: 200, templateBytes: 1_000_000 };

const ids = (n: number): string[] => Array.from({ length: n }, (_, i) => `site-${String(i).padStart(3, '0')}`);

const synths = new Map<number, Synth>();
/** A deployment of `n` clients site-000 ... (cached: the adding test reuses 100). */
function deployment(n: number): Synth {
  if (!synths.has(n)) synths.set(n, synthFedstep({ clients: ids(n).join(',') }));
  return synths.get(n)!;
}

afterAll(() => fs.rmSync(scratchDir(), { recursive: true, force: true }));

const count = (o: Json): number => Object.keys(o ?? {}).length;
const isMetadata = (r: Json): boolean => r.Type === 'AWS::CDK::Metadata';

let mainResources: number | undefined;

describe.each([3, 100, 500])('%i clients', (n) => {
  test('every stack is within the CloudFormation limits; client resources scale by CLIENT_RESOURCES', () => {
    const s = deployment(n);
    const figures: string[] = [];
    let clientResources = 0;
    let configOutputs = 0;
    for (const [name, t] of s.templates) {
      const resources = count(t.Resources);
      const outputs = count(t.Outputs);
      const bytes = JSON.stringify(t).length;
      figures.push(`${name}: ${resources} resources, ${outputs} outputs, ${Math.round(bytes / 1000)} kB`);
      // +1: the CLI adds a CDKMetadata resource the test app leaves out.
      expect({ name, resources: resources + 1 < LIMITS.resources }).toEqual({ name, resources: true });
      expect({ name, outputs: outputs < LIMITS.outputs }).toEqual({ name, outputs: true });
      expect({ name, bytes: bytes < LIMITS.templateBytes }).toEqual({ name, bytes: true });
      expect({ name, params: count(t.Parameters) < 200 }).toEqual({ name, params: true });
      if (name === 'Fedstep') continue;

      // A clients stack: CLIENT_RESOURCES per client and its Config output, nothing else.
      const members = s.deployment.batches.get(Number(name.slice(-2)))!.clients.size;
      const own = Object.values<Json>(t.Resources).filter((r) => !isMetadata(r));
      expect(own).toHaveLength(CLIENT_RESOURCES * members);
      expect(Object.values<Json>(t.Resources).some((r) => r.Type.startsWith('AWS::RolesAnywhere::'))).toBe(false);
      expect(Object.keys(t.Outputs).filter((k) => /^Client.+Config$/.test(k))).toHaveLength(members);
      expect(outputs).toBe(members);
      clientResources += own.length;
      configOutputs += outputs;
    }
    expect(clientResources).toBe(CLIENT_RESOURCES * n);
    expect(configOutputs).toBe(n);
    const byType = (type: string): number =>
      [...s.templates.values()].reduce((sum, t) => sum + Object.values<Json>(t.Resources).filter((r) => r.Type === type).length, 0);
    expect(byType('AWS::SQS::Queue')).toBe(n + 2); // + the stream DLQ and the clients' shared DLQ
    expect(byType('AWS::SNS::Subscription')).toBe(n);
    expect(byType('AWS::IAM::Role')).toBe(n + 3); // + the two Lambdas' and the state machine's
    expect(byType('AWS::IAM::Policy')).toBe(4); // none per client (inline); the two Lambdas', the state machine's two
    expect(byType('AWS::Lambda::Function')).toBe(2); // the aggregator and the stream function, whatever n

    // The main stack does not grow with the clients.
    const main = count(s.templates.get('Fedstep').Resources);
    mainResources ??= main;
    expect(main).toBe(mainResources);
    expect([...s.deployment.batches.values()].every((b) => b.clients.size <= 100)).toBe(true);
    console.log(`${n} clients, ${s.templates.size} stacks:\n  ${figures.join('\n  ')}`);
  }, 300_000);

  test('cdk-nag: no AwsSolutions errors in any stack', () => {
    expect(nagErrors(deployment(n))).toEqual([]);
    if (n === 500) synths.delete(n); // free the memory
  });
});

describe('500 clients, all with IAM Roles Anywhere', () => {
  test('a profile more per client, and every stack still within the CloudFormation limits', () => {
    const clients = Object.fromEntries(ids(500).map((id) => [id, { rolesAnywhere: { certificateSubjectCN: `${id}.fedstep.example.org` } }]));
    const s = synthFedstep({
      clients,
      rolesAnywhere: { caCertificateFile: path.join(__dirname, 'fixtures', 'roles-anywhere-ca.pem') },
    });
    let profiles = 0;
    let outputs = 0;
    for (const [name, t] of s.templates) {
      const resources = count(t.Resources);
      expect({ name, resources: resources + 1 < LIMITS.resources }).toEqual({ name, resources: true });
      expect({ name, outputs: count(t.Outputs) < LIMITS.outputs }).toEqual({ name, outputs: true });
      expect({ name, bytes: JSON.stringify(t).length < LIMITS.templateBytes }).toEqual({ name, bytes: true });
      const typed = (type: string): number => Object.values<Json>(t.Resources).filter((r) => r.Type === type).length;
      if (name === 'Fedstep') {
        // The one trust anchor; the main stack grows by it (and the output of its ARN), not by clients.
        expect(typed('AWS::RolesAnywhere::TrustAnchor')).toBe(1);
        expect(typed('AWS::RolesAnywhere::Profile')).toBe(0);
        expect(resources).toBe(mainResources === undefined ? resources : mainResources + 1);
        continue;
      }
      const batch = s.deployment.batches.get(Number(name.slice(-2)))!;
      const members = [...batch.clients.keys()];
      const expected = members.reduce((sum, id) => sum + clientResources({ id, externalId: 'x', rolesAnywhere: { certificateSubjectCN: id } }), 0);
      expect(expected).toBe((CLIENT_RESOURCES + ROLES_ANYWHERE_RESOURCES) * members.length);
      expect(Object.values<Json>(t.Resources).filter((r) => !isMetadata(r))).toHaveLength(expected);
      expect(typed('AWS::RolesAnywhere::Profile')).toBe(members.length);
      expect(typed('AWS::RolesAnywhere::TrustAnchor')).toBe(0);
      // Still one output per client: the profile's ARN rides in its Config.
      expect(count(t.Outputs)).toBe(members.length);
      profiles += typed('AWS::RolesAnywhere::Profile');
      outputs += count(t.Outputs);
    }
    expect(profiles).toBe(500);
    expect(outputs).toBe(500);
    expect(nagErrors(s)).toEqual([]);
  }, 300_000);
});

describe('adding a client (100 -> 101, in the middle of the sorted ids)', () => {
  test('no other client changes stack or any property; nothing else changes', () => {
    const before = deployment(100);
    const added = 'site-049x'; // sorts between site-049 and site-050
    const list = ids(100);
    list.splice(50, 0, added);
    const after = synthFedstep({ clients: list.join(',') });

    // Each existing client stays in its stack.
    for (const id of ids(100)) {
      expect([id, after.deployment.stackOf.get(id)!.stackName]).toEqual([id, before.deployment.stackOf.get(id)!.stackName]);
    }
    // Every resource and output of every existing stack is still there,
    // byte for byte (same logical id, same properties): CloudFormation has
    // nothing to update or replace for them.
    for (const [name, t] of before.templates) {
      const now = after.templates.get(name);
      expect(now).toBeDefined();
      for (const [id, r] of Object.entries<Json>(t.Resources)) expect([name, id, now.Resources[id]]).toEqual([name, id, r]);
      for (const [id, o] of Object.entries<Json>(t.Outputs ?? {})) expect([name, id, now.Outputs[id]]).toEqual([name, id, o]);
    }
    expect(after.templates.get('Fedstep')).toEqual(before.templates.get('Fedstep'));

    // What is new: the added client's four resources and its output, in its stack.
    const home = after.deployment.stackOf.get(added)!.stackName;
    const added_: string[] = [];
    for (const [name, t] of after.templates) {
      const old = before.templates.get(name);
      for (const id of Object.keys(t.Resources)) if (old?.Resources[id] === undefined) added_.push(`${name}/${id}`);
      for (const id of Object.keys(t.Outputs ?? {})) if (old?.Outputs?.[id] === undefined) added_.push(`${name}/output:${id}`);
    }
    expect(added_.sort()).toEqual(expect.arrayContaining([`${home}/output:ClientSite049xConfig`]));
    expect(added_).toHaveLength(CLIENT_RESOURCES + 1);
    for (const entry of added_) expect(entry).toMatch(new RegExp(`^${home}/(Clientsite049x|output:ClientSite049xConfig$)`));
  }, 300_000);
});
