import * as fs from 'fs';
import * as path from 'path';
import { Json, scratchDir, Synth, synthFedstep } from './helpers';

/**
 * `fedstep infra client-config` (crates/cli/src/infra_cmd.rs) reads the file
 * `cdk deploy --all --outputs-file` writes: the outputs of every top-level
 * stack, the main stack and the clients stacks. Its tests read FIXTURE; this
 * test derives the same file from the synthesized templates (outputs resolved
 * with made-up physical names), so a renamed output, a client moved to
 * another stack or a changed Client<Id>Config field fails here instead of
 * breaking the CLI silently.
 *
 * After an intended change: FEDSTEP_UPDATE_FIXTURES=1 npx jest outputs-fixture
 */
const FIXTURE = path.join(__dirname, 'fixtures', 'cdk-outputs.json');

const MAIN = 'Fedstep';
const REGION = 'eu-west-1';
const ACCOUNT = '111122223333';

let s: Synth;
beforeAll(() => {
  s = synthFedstep({
    clients: 'site-a,site-b,site-c',
    fedstep: { clients: { 'site-b': { trustedPrincipal: '123456789012', externalId: 'ext-site-b' } } },
  });
});
afterAll(() => fs.rmSync(scratchDir(), { recursive: true, force: true }));

/**
 * What CloudFormation would put in the outputs file for a value of `stack`,
 * with fake physical ids; a weak reference (Fn::GetStackOutput) resolves the
 * producing stack's output.
 */
function resolve(v: Json, stack: string): string {
  const resources: Record<string, Json> = s.templates.get(stack).Resources;
  if (typeof v === 'string') return v;
  if (v?.Ref !== undefined) {
    switch (v.Ref) {
      case 'AWS::Partition': return 'aws';
      case 'AWS::Region': return REGION;
      case 'AWS::AccountId': return ACCOUNT;
      case 'AWS::URLSuffix': return 'amazonaws.com';
    }
    const r = resources[v.Ref];
    const name = `${stack}-${v.Ref}`;
    switch (r?.Type) {
      case 'AWS::S3::Bucket': return name.toLowerCase();
      case 'AWS::DynamoDB::Table': return name;
      case 'AWS::SQS::Queue': return `https://sqs.${REGION}.amazonaws.com/${ACCOUNT}/${name}`;
      case 'AWS::SNS::Topic': return `arn:aws:sns:${REGION}:${ACCOUNT}:${name}`;
      case 'AWS::Lambda::Function': return name;
      case 'AWS::CloudWatch::Dashboard': return r.Properties.DashboardName;
      case 'AWS::StepFunctions::StateMachine':
        return `arn:aws:states:${REGION}:${ACCOUNT}:stateMachine:${r.Properties.StateMachineName}`;
    }
    throw new Error(`resolve: Ref to ${v.Ref} (${r?.Type}) not modelled`);
  }
  if (v?.['Fn::GetAtt'] !== undefined) {
    const [id, attr] = v['Fn::GetAtt'];
    const type = resources[id]?.Type;
    if (type === 'AWS::IAM::Role' && attr === 'Arn') return `arn:aws:iam::${ACCOUNT}:role/${stack}-${id}`;
    if (type === 'AWS::S3::Bucket' && attr === 'Arn') return `arn:aws:s3:::${stack}-${id}`.toLowerCase();
    if (type === 'AWS::DynamoDB::Table' && attr === 'Arn') return `arn:aws:dynamodb:${REGION}:${ACCOUNT}:table/${stack}-${id}`;
    if (type === 'AWS::SQS::Queue' && attr === 'Arn') return `arn:aws:sqs:${REGION}:${ACCOUNT}:${stack}-${id}`;
    throw new Error(`resolve: GetAtt ${id}.${attr} (${type}) not modelled`);
  }
  if (v?.['Fn::Join'] !== undefined) {
    return (v['Fn::Join'][1] as Json[]).map((x) => resolve(x, stack)).join(v['Fn::Join'][0]);
  }
  if (v?.['Fn::GetStackOutput'] !== undefined) {
    const { StackName: producer, OutputName: output, Region: region } = v['Fn::GetStackOutput'];
    if (resolve(region, stack) !== REGION) throw new Error(`resolve: a reference to another region: ${JSON.stringify(v)}`);
    return resolve(s.templates.get(producer).Outputs[output].Value, producer);
  }
  throw new Error(`resolve: unsupported ${JSON.stringify(v)}`);
}

/** The outputs file of `cdk deploy --all --outputs-file` for this deployment (stacks in name order, like the CLI writes them). */
function outputsFile(): Record<string, Record<string, string>> {
  const file: Record<string, Record<string, string>> = {};
  for (const stack of [...s.templates.keys()].sort()) {
    const t = s.templates.get(stack);
    const out: Record<string, string> = {};
    for (const key of Object.keys(t.Outputs ?? {}).sort()) out[key] = resolve(t.Outputs[key].Value, stack);
    file[stack] = out;
  }
  return file;
}

test('the CLI fixture is what `cdk deploy --all --outputs-file` would write for this deployment', () => {
  const want = `${JSON.stringify(outputsFile(), null, 2)}\n`;
  if (process.env.FEDSTEP_UPDATE_FIXTURES === '1') {
    fs.mkdirSync(path.dirname(FIXTURE), { recursive: true });
    fs.writeFileSync(FIXTURE, want);
  }
  expect(fs.existsSync(FIXTURE)).toBe(true);
  // On a mismatch: FEDSTEP_UPDATE_FIXTURES=1 npx jest outputs-fixture, then
  // run the CLI's tests (cargo test --release -p fedstep --test cli infra_client_config).
  expect(fs.readFileSync(FIXTURE, 'utf8')).toBe(want);
});

test('every client has one Config output, in a clients stack, with the fields client.toml needs', () => {
  const file = outputsFile();
  expect(Object.keys(file)).toEqual([MAIN, ...[...s.deployment.batches.values()].map((b) => b.stackName)].sort());
  expect(Object.keys(file[MAIN]).filter((k) => /^Client.+Config$/.test(k))).toEqual([]);
  const configs: Array<[string, string, string]> = [];
  for (const [stack, outputs] of Object.entries(file)) {
    for (const [k, v] of Object.entries(outputs)) if (/^Client.+Config$/.test(k)) configs.push([stack, k, v]);
  }
  expect(configs.map(([, k]) => k).sort()).toEqual(['ClientSiteAConfig', 'ClientSiteBConfig', 'ClientSiteCConfig']);
  for (const [stack, , value] of configs) {
    const c = JSON.parse(value);
    expect(stack).toBe(s.deployment.stackOf.get(c.client_id)!.stackName);
    expect(Object.keys(c).sort()).toEqual(
      ['bucket', 'client_id', 'external_id', 'queue_url', 'region', 'role_arn', 'updates_table']);
    expect(c.region).toBe(REGION);
    // The main stack's bucket and table, through the weak references.
    expect(c.bucket).toBe(file[MAIN].ModelBucketName);
    expect(c.updates_table).toBe(file[MAIN].UpdatesTableName);
    expect(c.queue_url).toMatch(/^https:\/\/sqs\./);
    expect(c.role_arn).toMatch(/^arn:aws:iam::\d{12}:role\//);
    // Only the Config output per client: a batch of 100 clients stays at 100 outputs.
    expect(Object.keys(file[stack]).every((k) => /^Client.+Config$/.test(k))).toBe(true);
  }
  const siteB = configs.find(([, k]) => k === 'ClientSiteBConfig')!;
  expect(JSON.parse(siteB[2]).external_id).toBe('ext-site-b');
});
