import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';
import { App, Aspects, Stack } from 'aws-cdk-lib';
import { Template } from 'aws-cdk-lib/assertions';
import { CloudAssembly } from 'aws-cdk-lib/cx-api';
import { AwsSolutionsChecks } from 'cdk-nag';
import { ClientsStack } from '../lib/clients-stack';
import { INFRA_DIR, resolveSettings } from '../lib/config';
import { addFedstep, FedstepDeployment } from '../lib/fedstep-app';
import { FedstepStack } from '../lib/fedstep-stack';

/** Feature flags etc. from cdk.json, so tests synthesize what `cdk synth` does. */
const CDK_JSON_CONTEXT: Record<string, unknown> = JSON.parse(
  fs.readFileSync(path.join(INFRA_DIR, 'cdk.json'), 'utf8'),
).context;

let scratch: string | undefined;

/** A per-process scratch directory, removed at exit. */
export function scratchDir(): string {
  if (scratch === undefined) {
    scratch = fs.mkdtempSync(path.join(os.tmpdir(), 'fedstep-infra-test-'));
    const dir = scratch;
    process.on('exit', () => fs.rmSync(dir, { recursive: true, force: true }));
  }
  return scratch;
}

/**
 * A stand-in for crates/lambda: a Cargo.toml with the real package and binary
 * name. With bundling skipped, RustFunction only parses it (cargo never runs),
 * so the default code path is tested without a Rust build and independently
 * of whether crates/lambda exists yet.
 */
export function fixtureCrate(): string {
  const dir = path.join(scratchDir(), 'lambda-crate');
  if (!fs.existsSync(dir)) {
    fs.mkdirSync(path.join(dir, 'src'), { recursive: true });
    fs.writeFileSync(path.join(dir, 'Cargo.toml'),
      '[package]\nname = "fedstep-lambda"\nversion = "0.0.0"\nedition = "2021"\n\n' +
      '[[bin]]\nname = "fedstep-lambda"\npath = "src/main.rs"\n');
    fs.writeFileSync(path.join(dir, 'src', 'main.rs'), 'fn main() {}\n');
  }
  return path.join(dir, 'Cargo.toml');
}

/** A prebuilt-code directory with a placeholder bootstrap (for `lambdaAsset`). */
export function placeholderAsset(): string {
  const dir = path.join(scratchDir(), 'lambda-asset');
  if (!fs.existsSync(dir)) {
    fs.mkdirSync(dir, { recursive: true });
    fs.writeFileSync(path.join(dir, 'bootstrap'), '#!/bin/sh\necho placeholder\n', { mode: 0o755 });
  }
  return dir;
}

/**
 * An App with cdk.json's context, bundling skipped, writing to the scratch dir.
 *
 * One flag differs from cdk.json: with `@aws-cdk/core:annotationsInValidationReport`
 * every error annotation (cdk-nag's included) makes synth throw, which would
 * fail every test at once instead of letting the cdk-nag test list the
 * findings. test.sh's `cdk synth` step runs the app with cdk.json's flags, so
 * an AwsSolutions error fails that step as well.
 */
export function testApp(context: Record<string, unknown> = {}): App {
  return new App({
    outdir: fs.mkdtempSync(path.join(scratchDir(), 'cdk.out-')),
    context: {
      ...CDK_JSON_CONTEXT,
      '@aws-cdk/core:annotationsInValidationReport': false,
      'aws:cdk:bundling-stacks': [],
      ...context,
    },
  });
}

export interface Synth {
  readonly app: App;
  readonly deployment: FedstepDeployment;
  /** The main stack. */
  readonly stack: FedstepStack;
  /** The main stack's template. */
  readonly template: Template;
  readonly assembly: CloudAssembly;
  /** Every stack's template (main first, then the clients stacks), by stack name. */
  readonly templates: Map<string, Json>;
}

export interface SynthOptions {
  /** Apply cdk-nag's AwsSolutions checks (default true). */
  readonly nag?: boolean;
}

/**
 * Synthesizes a fedstep deployment (main stack `Fedstep` + clients stacks)
 * with bundling skipped (`aws:cdk:bundling-stacks: []`) and cdk-nag's
 * AwsSolutions checks applied. `context` is the CDK context the user would
 * pass with -c / cdk.json.
 */
export function synthFedstep(context: Record<string, unknown> = {}, options: SynthOptions = {}): Synth {
  const app = testApp({ lambdaManifest: fixtureCrate(), ...context });
  const settings = resolveSettings((key) => app.node.tryGetContext(key));
  const deployment = addFedstep(app, 'Fedstep', settings);
  if (options.nag ?? true) Aspects.of(app).add(new AwsSolutionsChecks({ verbose: true }));
  const assembly = app.synth();
  const templates = new Map<string, Json>();
  for (const stack of [deployment.main, ...deployment.batches.values()]) {
    templates.set(stack.stackName, assembly.getStackByName(stack.stackName).template);
  }
  const template = Template.fromJSON(templates.get('Fedstep'));
  return { app, deployment, stack: deployment.main, template, assembly, templates };
}

/** The clients stack a client lives in. */
export function stackOfClient(s: Synth, clientId: string): ClientsStack {
  const stack = s.deployment.stackOf.get(clientId);
  if (stack === undefined) throw new Error(`no client ${clientId}`);
  return stack;
}

/**
 * `template` with every weak cross-stack reference (`Fn::GetStackOutput` of
 * an output of another stack of `s`) replaced by that output's value in the
 * producing template: a client stack's reference to the bucket ARN becomes
 * `{"Fn::GetAtt": [<bucket id>, "Arn"]}`, comparable with the main stack's ids.
 */
export function derefCrossStack(s: Synth, template: Json): Json {
  const walk = (v: Json): Json => {
    if (Array.isArray(v)) return v.map(walk);
    if (v === null || typeof v !== 'object') return v;
    const ref = v['Fn::GetStackOutput'];
    if (ref !== undefined) {
      const producer = s.templates.get(ref.StackName);
      const output = producer?.Outputs?.[ref.OutputName];
      if (output === undefined) throw new Error(`Fn::GetStackOutput of a missing output: ${JSON.stringify(ref)}`);
      expect(ref.Region).toEqual({ Ref: 'AWS::Region' });
      return output.Value;
    }
    return Object.fromEntries(Object.entries(v).map(([k, x]) => [k, walk(x)]));
  };
  return walk(template);
}

/**
 * All resources of the deployment in one object, cross-stack references
 * resolved (derefCrossStack). Logical ids are unique across the stacks
 * (client resources carry the client id); CDKMetadata is left out.
 */
export function allResources(s: Synth): Record<string, Json> {
  const out: Record<string, Json> = {};
  for (const [name, t] of s.templates) {
    for (const [id, r] of Object.entries<Json>(derefCrossStack(s, t).Resources)) {
      if (r.Type === 'AWS::CDK::Metadata') continue;
      if (id in out) throw new Error(`logical id ${id} in two stacks (${name})`);
      out[id] = r;
    }
  }
  return out;
}

export type Json = any; // eslint-disable-line @typescript-eslint/no-explicit-any

/** Logical id of a construct's default CloudFormation resource. */
export function logicalId(stack: Stack, construct: { node: { defaultChild?: unknown } }): string {
  return stack.getLogicalId(construct.node.defaultChild as never);
}

/** `{ "Fn::GetAtt": [id, "Arn"] }` */
export function getAttArn(id: string): Json {
  return { 'Fn::GetAtt': [id, 'Arn'] };
}

/** All resources of a type, as [logicalId, resource] pairs (from a Template or a Resources object). */
export function resourcesOfType(resources: Template | Record<string, Json>, type: string): Array<[string, Json]> {
  if (resources instanceof Template) return Object.entries(resources.findResources(type));
  return Object.entries<Json>(resources).filter(([, r]) => r.Type === type);
}

export function asArray<T>(v: T | T[] | undefined): T[] {
  return v === undefined ? [] : Array.isArray(v) ? v : [v];
}

/** Every policy document the template (or Resources object) contains, labelled by where it is. */
export function policyDocuments(resources: Template | Record<string, Json>): Array<{ where: string; type: string; doc: Json }> {
  const out: Array<{ where: string; type: string; doc: Json }> = [];
  const all: Record<string, Json> = resources instanceof Template ? resources.toJSON().Resources : resources;
  for (const [id, r] of Object.entries<Json>(all)) {
    const p = r.Properties ?? {};
    switch (r.Type) {
      case 'AWS::IAM::Policy':
      case 'AWS::IAM::ManagedPolicy':
      case 'AWS::S3::BucketPolicy':
      case 'AWS::SQS::QueuePolicy':
      case 'AWS::SNS::TopicPolicy':
        out.push({ where: id, type: r.Type, doc: p.PolicyDocument });
        break;
      case 'AWS::IAM::Role':
      case 'AWS::IAM::User':
      case 'AWS::IAM::Group':
        for (const inline of asArray<Json>(p.Policies)) out.push({ where: `${id}/${inline.PolicyName}`, type: r.Type, doc: inline.PolicyDocument });
        break;
      case 'AWS::KMS::Key':
        out.push({ where: id, type: r.Type, doc: p.KeyPolicy });
        break;
      case 'AWS::Lambda::Permission':
      case 'AWS::Lambda::LayerVersionPermission':
        throw new Error(`unexpected resource-based permission ${id} (${r.Type}): extend the "no *" walk`);
      default:
        if (/Policy/.test(r.Type) && r.Type !== 'AWS::IAM::Role') {
          throw new Error(`policy-like resource ${id} (${r.Type}) not covered by policyDocuments(): extend it`);
        }
    }
  }
  return out;
}

/**
 * Evaluates the intrinsics CDK emits for ARNs with fixed pseudo parameters:
 * Ref AWS::Partition/Region/AccountId, Fn::Join, and Fn::GetAtt [id, Arn]
 * (rendered as `arn:aws:lambda:...:function:<id>`, enough to recognise it).
 */
export function fakeResolve(v: Json): string {
  if (typeof v === 'string') return v;
  if (v?.Ref === 'AWS::Partition') return 'aws';
  if (v?.Ref === 'AWS::Region') return 'eu-west-1';
  if (v?.Ref === 'AWS::AccountId') return '111122223333';
  if (v?.Ref === 'AWS::URLSuffix') return 'amazonaws.com';
  if (v?.['Fn::Join']) return (v['Fn::Join'][1] as Json[]).map(fakeResolve).join(v['Fn::Join'][0]);
  if (v?.['Fn::GetAtt']?.[1] === 'Arn') return `arn:aws:lambda:eu-west-1:111122223333:function:${v['Fn::GetAtt'][0]}`;
  throw new Error(`fakeResolve: unsupported ${JSON.stringify(v)}`);
}

/** Applies DefinitionSubstitutions the way CloudFormation does. */
export function substitute(definition: string, subs: Record<string, Json>): string {
  return definition.replace(/\$\{([A-Za-z0-9_]+)\}/g, (whole, name: string) =>
    name in subs ? fakeResolve(subs[name]) : whole);
}

/**
 * cdk-nag's AwsSolutions errors in every stack of the synth, as
 * `<path>: <rule>` lines. Read from the assembly already synthesized
 * (Annotations.fromStack would synthesize the whole app again per stack).
 */
export function nagErrors(s: Synth): string[] {
  const out: string[] = [];
  for (const stack of [s.stack, ...s.deployment.batches.values()]) {
    for (const m of s.assembly.getStackArtifact(stack.artifactId).messages) {
      const text = String(m.entry.data);
      if (m.level === 'error' && text.startsWith('AwsSolutions-')) out.push(`${m.id}: ${text.split('\n')[0]}`);
    }
  }
  return out;
}
