#!/usr/bin/env node
import { App, Aspects } from 'aws-cdk-lib';
import { AwsSolutionsChecks } from 'cdk-nag';
import { resolveSettings } from '../lib/config';
import { addFedstep } from '../lib/fedstep-app';

// `-c skipBuild=true`: synthesize without running cargo-lambda (offline
// checks, CI). Context given to the App here outranks the CLI's own
// aws:cdk:bundling-stacks. The Lambda asset then points at the crate's
// *source* directory, so never deploy a template synthesized this way.
const probe = new App({ autoSynth: false });
const skipBuild = ['true', true, '1'].includes(probe.node.tryGetContext('skipBuild'));

const app = new App(skipBuild ? { postCliContext: { 'aws:cdk:bundling-stacks': [] } } : {});
const settings = resolveSettings((key) => app.node.tryGetContext(key));
const stackName = String(app.node.tryGetContext('stackName') ?? 'Fedstep');

// The main stack `stackName` plus `<stackName>-Clients-NN` stacks holding the
// clients (see lib/fedstep-app.ts): `cdk deploy --all`.
addFedstep(app, stackName, settings, {
  description: 'fedstep: serverless federated learning (Step Functions + Rust Lambda + S3 + DynamoDB + SNS/SQS)',
});

// cdk-nag: AwsSolutions errors fail the synth; exceptions are suppressed one
// resource at a time, each with its reason, in lib/.
Aspects.of(app).add(new AwsSolutionsChecks({ verbose: true }));
app.synth();
