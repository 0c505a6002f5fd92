import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';
import { App, Aspects, Stack } from 'aws-cdk-lib';
import { Template } from 'aws-cdk-lib/assertions';
import { CloudAssembly } from 'aws-cdk-lib/cx-api';
import { AwsSolutionsChecks } from 'cdk-nag';
import { INFRA_DIR, resolveSettings } from '../lib/config';
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
  readonly stack: FedstepStack;
  readonly template: Template;
  readonly assembly: CloudAssembly;
}

/**
 * Synthesizes a FedstepStack with bundling skipped (`aws:cdk:bundling-stacks: []`)
 * and cdk-nag's AwsSolutions checks applied. `context` is the CDK context the
 * user would pass with -c / cdk.json.
 */
export function synthFedstep(context: Record<string, unknown> = {}): Synth {
  const app = testApp({ lambdaManifest: fixtureCrate(), ...context });
  const settings = resolveSettings((key) => app.node.tryGetContext(key));
  const stack = new FedstepStack(app, 'Fedstep', { settings });
  Aspects.of(app).add(new AwsSolutionsChecks({ verbose: true }));
  const assembly = app.synth();
  return { app, stack, template: Template.fromStack(stack), assembly };
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

/** All resources of a type, as [logicalId, resource] pairs. */
export function resourcesOfType(template: Template, type: string): Array<[string, Json]> {
  return Object.entries(template.findResources(type));
}

export function asArray<T>(v: T | T[] | undefined): T[] {
  return v === undefined ? [] : Array.isArray(v) ? v : [v];
}

/** Every policy document the template contains, labelled by where it is. */
export function policyDocuments(template: Template): Array<{ where: string; type: string; doc: Json }> {
  const out: Array<{ where: string; type: string; doc: Json }> = [];
  for (const [id, r] of Object.entries<Json>(template.toJSON().Resources)) {
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
