import * as fs from 'fs';
import * as path from 'path';
import { Json, scratchDir, Synth, synthFedstep } from './helpers';

/**
 * `fedstep infra client-config` (crates/cli/src/infra_cmd.rs) reads the file
 * `cdk deploy --outputs-file` writes. Its tests read FIXTURE; this test
 * derives the same file from the synthesized template (outputs resolved with
 * made-up physical names), so a renamed output or a changed Client<Id>Config
 * field fails here instead of breaking the CLI silently.
 *
 * After an intended change: FEDSTEP_UPDATE_FIXTURES=1 npx jest outputs-fixture
 */
const FIXTURE = path.join(__dirname, 'fixtures', 'cdk-outputs.json');

const STACK = 'Fedstep';
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

/** What CloudFormation would put in the outputs file, with fake physical ids. */
function resolve(v: Json, resources: Record<string, Json>): string {
  if (typeof v === 'string') return v;
  if (v?.Ref !== undefined) {
    switch (v.Ref) {
      case 'AWS::Partition': return 'aws';
      case 'AWS::Region': return REGION;
      case 'AWS::AccountId': return ACCOUNT;
      case 'AWS::URLSuffix': return 'amazonaws.com';
    }
    const r = resources[v.Ref];
    const name = `${STACK}-${v.Ref}`;
    switch (r?.Type) {
      case 'AWS::S3::Bucket': return name.toLowerCase();
      case 'AWS::DynamoDB::Table': return name;
      case 'AWS::SQS::Queue': return `https://sqs.${REGION}.amazonaws.com/${ACCOUNT}/${name}`;
      case 'AWS::SNS::Topic': return `arn:aws:sns:${REGION}:${ACCOUNT}:${name}`;
      case 'AWS::Lambda::Function': return name;
      case 'AWS::StepFunctions::StateMachine':
        return `arn:aws:states:${REGION}:${ACCOUNT}:stateMachine:${r.Properties.StateMachineName}`;
    }
    throw new Error(`resolve: Ref to ${v.Ref} (${r?.Type}) not modelled`);
  }
  if (v?.['Fn::GetAtt'] !== undefined) {
    const [id, attr] = v['Fn::GetAtt'];
    if (resources[id]?.Type === 'AWS::IAM::Role' && attr === 'Arn') return `arn:aws:iam::${ACCOUNT}:role/${STACK}-${id}`;
    throw new Error(`resolve: GetAtt ${id}.${attr} (${resources[id]?.Type}) not modelled`);
  }
  if (v?.['Fn::Join'] !== undefined) {
    return (v['Fn::Join'][1] as Json[]).map((x) => resolve(x, resources)).join(v['Fn::Join'][0]);
  }
  throw new Error(`resolve: unsupported ${JSON.stringify(v)}`);
}

function outputsFile(): Record<string, Record<string, string>> {
  const t = s.template.toJSON();
  const out: Record<string, string> = {};
  for (const key of Object.keys(t.Outputs).sort()) out[key] = resolve(t.Outputs[key].Value, t.Resources);
  return { [STACK]: out };
}

test('the CLI fixture is what `cdk deploy --outputs-file` would write for this stack', () => {
  const want = `${JSON.stringify(outputsFile(), null, 2)}\n`;
  if (process.env.FEDSTEP_UPDATE_FIXTURES === '1') {
    fs.mkdirSync(path.dirname(FIXTURE), { recursive: true });
    fs.writeFileSync(FIXTURE, want);
  }
  expect(fs.existsSync(FIXTURE)).toBe(true);
  // On a mismatch: FEDSTEP_UPDATE_FIXTURES=1 npx jest outputs-fixture, then
  // run the CLI's tests (cargo test --release -p fedstep --test infra_client_config).
  expect(fs.readFileSync(FIXTURE, 'utf8')).toBe(want);
});

test('every client has a Config output with the fields client.toml needs', () => {
  const outputs = outputsFile()[STACK];
  const configs = Object.entries(outputs).filter(([k]) => /^Client.+Config$/.test(k));
  expect(configs.map(([k]) => k).sort()).toEqual(['ClientSiteAConfig', 'ClientSiteBConfig', 'ClientSiteCConfig']);
  for (const [, value] of configs) {
    const c = JSON.parse(value);
    expect(Object.keys(c).sort()).toEqual(
      ['bucket', 'client_id', 'external_id', 'queue_url', 'region', 'role_arn', 'updates_table']);
    expect(c.region).toBe(REGION);
    expect(c.queue_url).toMatch(/^https:\/\/sqs\./);
    expect(c.role_arn).toMatch(/^arn:aws:iam::\d{12}:role\//);
  }
  expect(JSON.parse(outputs.ClientSiteBConfig).external_id).toBe('ext-site-b');
});
