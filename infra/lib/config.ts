import * as fs from 'fs';
import * as path from 'path';
import { KEYS } from './model-store';

/**
 * Deployment settings of one fedstep stack, resolved from CDK context and an
 * optional JSON config file (see README.md, "Configuration").
 *
 * Precedence, highest first:
 *   1. single context keys:  `cdk deploy -c clients=site-a,site-b -c arch=x86_64`
 *   2. the config file:      `fedstep.config.json` (or `-c config=path/to/file.json`)
 *   3. the `fedstep` object in cdk.json's context
 *   4. the defaults below
 * Client lists are merged: a client named anywhere is deployed; its settings
 * (trustedPrincipal, externalId, jobs, batch, rolesAnywhere) come from the
 * highest source that has them.
 */

/** Infra directory (where cdk.json lives); relative paths resolve from here. */
export const INFRA_DIR = path.resolve(__dirname, '..');

/** Client ids: also used in S3 keys, IAM patterns and DynamoDB keys. Same rule as scripts/local_deploy.py. */
export const CLIENT_ID_RE = /^[A-Za-z0-9_-]{1,60}$/;
/** Clients stacks are named <stack>-Clients-NN (two digits). */
export const MAX_CLIENT_BATCHES = 100;
/** Job ids used in SNS filter policies. */
const JOB_ID_RE = /^[A-Za-z0-9_.-]{1,128}$/;
const ACCOUNT_RE = /^\d{12}$/;
const PRINCIPAL_ARN_RE = /^arn:aws[a-z-]*:(iam|sts)::\d{12}:[A-Za-z0-9+=,.@_\/-]+$/;
/** sts:ExternalId: 2-1224 chars from this set (AWS STS AssumeRole). */
const EXTERNAL_ID_RE = /^[\w+=,.@:\/-]{2,1224}$/;
/**
 * A client certificate's subject CN as the role's trust policy compares it
 * (X.509 allows at most 64 characters). No `$`, `{` or `}` (IAM would read
 * `${...}` as a policy variable), no quotes or control characters.
 */
const CERTIFICATE_CN_RE = /^[A-Za-z0-9][A-Za-z0-9 ._@:=+\/-]{0,63}$/;
const ACM_PCA_ARN_RE = /^arn:aws[a-z-]*:acm-pca:[a-z0-9-]+:\d{12}:certificate-authority\/[A-Za-z0-9-]+$/;
/** CloudFormation's limit on a trust anchor's certificate bundle (SourceData.X509CertificateData). */
const MAX_CA_BUNDLE_CHARS = 8000;

/**
 * IAM allows a role 10,240 characters of inline policy (whitespace not
 * counted), and each of a client's `jobs` adds two ARNs to its role
 * (lib/client-access.ts): one to ReadGlobalModels,
 * `"<bucket ARN>/jobs/<job>/rounds/*\/global.safetensors",`, and one to
 * ReadScaffoldVariates, `"<bucket ARN>/jobs/<job>/rounds/*\/scaffold_variate.safetensors",`.
 * The job ARNs of one client may take this many characters of it, counted
 * with jobPolicyChars each; the rest of the policy needs less than 3,000
 * even with the longest names (test/stack.test.ts checks the sum).
 */
export const JOB_ARNS_POLICY_BUDGET = 7000;
/** The longest bucket ARN: `arn:aws-us-gov:s3:::` and a 63-character name. */
const LONGEST_BUCKET_ARN = `arn:aws-us-gov:s3:::${'b'.repeat(63)}`;
/**
 * What one job's ARNs cost in its client's role policy: for each of its keys
 * (KEYS.jobGlobalModel, KEYS.jobScaffoldVariate) the longest bucket ARN, `/`,
 * the key, two quotes and a comma.
 */
export function jobPolicyChars(job: string): number {
  return [KEYS.jobGlobalModel(job), KEYS.jobScaffoldVariate(job)]
    .reduce((sum, key) => sum + LONGEST_BUCKET_ARN.length + 1 + key.length + 3, 0);
}
/** What one job's ARNs cost besides the job id (which each of them holds once). */
export const JOB_ARN_OVERHEAD = jobPolicyChars('');

export type LambdaArch = 'arm64' | 'x86_64';

export interface ClientSettings {
  /** Client id, e.g. `site-a`. */
  readonly id: string;
  /**
   * Who may assume the client's role: a 12-digit account id or an IAM role/user
   * ARN. Undefined: the deploying account (its root, i.e. any principal of the
   * account that IAM allows to call sts:AssumeRole on the role).
   */
  readonly trustedPrincipal?: string;
  /** Required `sts:ExternalId` when assuming the client role. */
  readonly externalId: string;
  /** Only deliver this client's notifications for these job ids (SNS filter on the `job_id` attribute). Undefined: all jobs. */
  readonly jobs?: string[];
  /**
   * The clients stack (batch) this client lives in, pinned. Undefined: chosen
   * by a hash of the id (lib/client-batches.ts), which never changes.
   */
  readonly batch?: number;
  /**
   * IAM Roles Anywhere for this client (needs the top-level `rolesAnywhere`):
   * a profile for its role, and a trust policy that lets a certificate from
   * the deployment's trust anchor with this subject CN assume the role.
   * Undefined: no Roles Anywhere access.
   */
  readonly rolesAnywhere?: ClientRolesAnywhere;
}

export interface ClientRolesAnywhere {
  /** The subject common name (CN) of the client's certificate. */
  readonly certificateSubjectCN: string;
}

/**
 * The deployment's IAM Roles Anywhere trust anchor: the CA that issues the
 * clients' certificates. Exactly one of the two.
 */
export interface RolesAnywhereSettings {
  /** PEM of the CA certificate(s) (a CERTIFICATE_BUNDLE trust anchor), read from `caCertificateFile`. */
  readonly caCertificatePem?: string;
  /** An AWS Private CA (an AWS_ACM_PCA trust anchor). */
  readonly acmPcaArn?: string;
}

export interface FedstepSettings {
  readonly clients: ClientSettings[];
  /**
   * How many clients stacks the clients are spread over (by a hash of their
   * id). Fixed for the life of a deployment: changing it moves clients.
   */
  readonly clientBatches: number;
  readonly architecture: LambdaArch;
  /** Lambda memory in MB (also buys CPU: 1769 MB = 1 vCPU). */
  readonly memoryMb: number;
  /** Lambda timeout in minutes (max 15). */
  readonly timeoutMinutes: number;
  /**
   * Memory in MB of the stream function (validates and counts `updates` rows,
   * never reads a model). Its timeout is fixed (lib/aggregator.ts STREAM_TIMEOUT).
   */
  readonly streamMemoryMb: number;
  readonly rustLog: string;
  readonly logRetentionDays: number;
  /** RETAIN the bucket, tables and log bucket on stack deletion (default true). */
  readonly retainData: boolean;
  /** Days after which client update objects (jobs/x/rounds/y/updates/) expire. */
  readonly updateExpirationDays: number;
  /** Days after which noncurrent versions of update objects expire. */
  readonly noncurrentExpirationDays: number;
  /** Cargo.toml of the Lambda crate (absolute). */
  readonly lambdaManifest: string;
  /** Prebuilt Lambda code directory (containing `bootstrap`): skips the Rust build. */
  readonly lambdaAsset?: string;
  /** Amazon States Language file of the training workflow (absolute). */
  readonly aslPath: string;
  /** Undefined (the default): no IAM Roles Anywhere resources at all. */
  readonly rolesAnywhere?: RolesAnywhereSettings;
  /** An SNS topic the alarms notify (default false: alarms show on the dashboard only). */
  readonly alarmTopic: boolean;
}

export const DEFAULTS = {
  clientBatches: 16,
  /**
   * x86_64: the architecture infra/test.sh builds and checks (the CI toolchain
   * has only the host's Rust target), so the default deploy ships a tested
   * bootstrap. arm64 (about 20% cheaper per GB-second) is `-c arch=arm64`
   * once `rustup target add aarch64-unknown-linux-gnu` is done (README.md).
   */
  architecture: 'x86_64' as LambdaArch,
  memoryMb: 3008,
  timeoutMinutes: 15,
  /**
   * A few DynamoDB calls per row and a 24 MiB bootstrap: 128 MB would do,
   * 256 buys twice the CPU share for the TLS handshakes of a cold start.
   */
  streamMemoryMb: 256,
  rustLog: 'info',
  logRetentionDays: 90,
  retainData: true,
  alarmTopic: false,
  updateExpirationDays: 30,
  noncurrentExpirationDays: 7,
  lambdaManifest: '../crates/lambda/Cargo.toml',
  aslPath: '../statemachine/federated_training.asl.json',
};

/** What CloudWatch Logs accepts as a retention period. */
const LOG_RETENTION_DAYS = [1, 3, 5, 7, 14, 30, 60, 90, 120, 150, 180, 365, 400, 545, 731, 1096, 1827, 2192, 2557, 2922, 3288, 3653];

/** Reads a context value (`app.node.tryGetContext`). */
export type ContextGetter = (key: string) => unknown;

export class ConfigError extends Error {
  constructor(message: string) {
    super(`fedstep config: ${message}`);
    this.name = 'ConfigError';
  }
}

type Raw = Record<string, unknown>;

/** Resolves the settings from CDK context (and the config file it points at). */
export function resolveSettings(ctx: ContextGetter, baseDir: string = INFRA_DIR): FedstepSettings {
  const fromCdkJson = asObject(ctx('fedstep'), 'context "fedstep"') ?? {};
  const fromFile = loadConfigFile(ctx('config'), baseDir) ?? {};
  const single: Raw = {};
  for (const key of ['clients', 'clientBatches', 'arch', 'memoryMb', 'timeoutMinutes', 'streamMemoryMb', 'rustLog', 'logRetentionDays', 'retainData',
    'updateExpirationDays', 'noncurrentExpirationDays', 'lambdaManifest', 'lambdaAsset', 'asl', 'rolesAnywhere', 'alarmTopic']) {
    const v = ctx(key);
    if (v !== undefined) single[key] = v;
  }
  // Prefixed aliases, for cdk.json files shared with other apps.
  const asset = ctx('fedstep:lambdaAsset');
  if (asset !== undefined) single.lambdaAsset = asset;

  const layers = [fromCdkJson, fromFile, single]; // lowest first
  const pick = (key: string): unknown => {
    for (let i = layers.length - 1; i >= 0; i--) {
      if (layers[i][key] !== undefined) return layers[i][key];
    }
    return undefined;
  };

  const architecture = parseArch(pick('arch') ?? pick('architecture') ?? DEFAULTS.architecture);
  const memoryMb = parseInteger(pick('memoryMb') ?? DEFAULTS.memoryMb, 'memoryMb', 128, 10240);
  const timeoutMinutes = parseInteger(pick('timeoutMinutes') ?? DEFAULTS.timeoutMinutes, 'timeoutMinutes', 1, 15);
  const streamMemoryMb = parseInteger(pick('streamMemoryMb') ?? DEFAULTS.streamMemoryMb, 'streamMemoryMb', 128, 10240);
  const rustLog = parseString(pick('rustLog') ?? DEFAULTS.rustLog, 'rustLog');
  const logRetentionDays = parseInteger(pick('logRetentionDays') ?? DEFAULTS.logRetentionDays, 'logRetentionDays', 1, 3653);
  if (!LOG_RETENTION_DAYS.includes(logRetentionDays)) {
    throw new ConfigError(`logRetentionDays ${logRetentionDays} is not one of ${LOG_RETENTION_DAYS.join(', ')}`);
  }
  const retainData = parseBool(pick('retainData') ?? DEFAULTS.retainData, 'retainData');
  const alarmTopic = parseBool(pick('alarmTopic') ?? DEFAULTS.alarmTopic, 'alarmTopic');
  const updateExpirationDays = parseInteger(pick('updateExpirationDays') ?? DEFAULTS.updateExpirationDays, 'updateExpirationDays', 1, 36500);
  const noncurrentExpirationDays = parseInteger(pick('noncurrentExpirationDays') ?? DEFAULTS.noncurrentExpirationDays, 'noncurrentExpirationDays', 1, 36500);
  const lambdaManifest = path.resolve(baseDir, parseString(pick('lambdaManifest') ?? DEFAULTS.lambdaManifest, 'lambdaManifest'));
  const assetRaw = pick('lambdaAsset');
  const lambdaAsset = assetRaw === undefined || assetRaw === '' ? undefined : path.resolve(baseDir, parseString(assetRaw, 'lambdaAsset'));
  const aslPath = path.resolve(baseDir, parseString(pick('asl') ?? DEFAULTS.aslPath, 'asl'));

  const clientBatches = parseInteger(pick('clientBatches') ?? DEFAULTS.clientBatches, 'clientBatches', 1, MAX_CLIENT_BATCHES);
  const clients = mergeClients(layers.map((l) => l.clients));
  for (const c of clients) {
    if (c.batch !== undefined && c.batch >= clientBatches) {
      throw new ConfigError(`client ${c.id}: batch ${c.batch} is not below clientBatches (${clientBatches})`);
    }
  }
  const rolesAnywhere = parseRolesAnywhere(pick('rolesAnywhere'), baseDir);
  checkClientCertificates(clients, rolesAnywhere);
  return {
    clients, clientBatches, architecture, memoryMb, timeoutMinutes, streamMemoryMb, rustLog, logRetentionDays, retainData,
    updateExpirationDays, noncurrentExpirationDays, lambdaManifest, lambdaAsset, aslPath, rolesAnywhere, alarmTopic,
  };
}

/**
 * `rolesAnywhere: {"caCertificateFile": "pki/ca.pem"}` (relative to the infra
 * directory) or `{"acmPcaArn": "arn:aws:acm-pca:..."}`.
 */
function parseRolesAnywhere(value: unknown, baseDir: string): RolesAnywhereSettings | undefined {
  const obj = asObject(value, 'rolesAnywhere');
  if (obj === undefined) return undefined;
  const known = new Set(['caCertificateFile', 'acmPcaArn']);
  for (const key of Object.keys(obj)) {
    if (!known.has(key)) throw new ConfigError(`rolesAnywhere: unknown setting "${key}" (known: ${[...known].join(', ')})`);
  }
  if ((obj.caCertificateFile === undefined) === (obj.acmPcaArn === undefined)) {
    throw new ConfigError('rolesAnywhere needs exactly one of caCertificateFile (a PEM file of your CA) and acmPcaArn (an AWS Private CA)');
  }
  if (obj.acmPcaArn !== undefined) {
    const arn = parseString(obj.acmPcaArn, 'rolesAnywhere.acmPcaArn');
    if (!ACM_PCA_ARN_RE.test(arn)) throw new ConfigError(`rolesAnywhere.acmPcaArn must be an AWS Private CA ARN, got "${arn}"`);
    return { acmPcaArn: arn };
  }
  const file = path.resolve(baseDir, parseString(obj.caCertificateFile, 'rolesAnywhere.caCertificateFile'));
  if (!fs.existsSync(file)) throw new ConfigError(`rolesAnywhere.caCertificateFile ${file} does not exist`);
  const pem = fs.readFileSync(file, 'utf8').trim();
  // The file goes into the template: a private key must never get there.
  if (/PRIVATE KEY/.test(pem)) throw new ConfigError(`rolesAnywhere.caCertificateFile ${file} contains a private key; give the CA certificate only`);
  if (!/^-----BEGIN CERTIFICATE-----[\s\S]+-----END CERTIFICATE-----$/.test(pem)) {
    throw new ConfigError(`rolesAnywhere.caCertificateFile ${file} is not PEM certificates (-----BEGIN CERTIFICATE----- ...)`);
  }
  if (pem.length > MAX_CA_BUNDLE_CHARS) {
    throw new ConfigError(`rolesAnywhere.caCertificateFile ${file}: ${pem.length} characters, CloudFormation takes at most ${MAX_CA_BUNDLE_CHARS}`);
  }
  return { caCertificatePem: pem };
}

/**
 * A client's Roles Anywhere access needs the deployment's trust anchor, and
 * no two clients may trust the same certificate CN: one certificate would
 * then get both roles.
 */
function checkClientCertificates(clients: ClientSettings[], rolesAnywhere: RolesAnywhereSettings | undefined): void {
  const byCn = new Map<string, string>();
  for (const c of clients) {
    if (c.rolesAnywhere === undefined) continue;
    if (rolesAnywhere === undefined) {
      throw new ConfigError(`client ${c.id}: rolesAnywhere needs the top-level rolesAnywhere setting (the trust anchor: caCertificateFile or acmPcaArn)`);
    }
    const cn = c.rolesAnywhere.certificateSubjectCN;
    const other = byCn.get(cn);
    if (other !== undefined) throw new ConfigError(`clients ${other} and ${c.id} have the same certificate CN "${cn}"`);
    byCn.set(cn, c.id);
  }
}

function loadConfigFile(explicit: unknown, baseDir: string): Raw | undefined {
  let file: string;
  if (explicit !== undefined && explicit !== '') {
    file = path.resolve(baseDir, parseString(explicit, 'config'));
    if (!fs.existsSync(file)) throw new ConfigError(`config file ${file} does not exist`);
  } else {
    file = path.join(baseDir, 'fedstep.config.json');
    if (!fs.existsSync(file)) return undefined;
  }
  let parsed: unknown;
  try {
    parsed = JSON.parse(fs.readFileSync(file, 'utf8'));
  } catch (e) {
    throw new ConfigError(`${file}: ${(e as Error).message}`);
  }
  return asObject(parsed, file);
}

interface PartialClient {
  trustedPrincipal?: string;
  externalId?: string;
  jobs?: string[];
  batch?: number;
  rolesAnywhere?: ClientRolesAnywhere;
}

/**
 * A clients value is one of
 *   "site-a,site-b"                                  (comma separated ids)
 *   ["site-a", {"id": "site-b", "jobs": ["j1"]}]     (ids or objects with id)
 *   {"site-a": {}, "site-b": {"trustedPrincipal": "123456789012", "externalId": "..."}}
 */
function mergeClients(values: unknown[]): ClientSettings[] {
  const order: string[] = [];
  const merged = new Map<string, PartialClient>();
  for (const value of values) {
    for (const [id, settings] of normalizeClients(value)) {
      if (!merged.has(id)) {
        order.push(id);
        merged.set(id, {});
      }
      const cur = merged.get(id)!;
      merged.set(id, { ...cur, ...dropUndefined(settings) });
    }
  }
  return order.map((id) => finishClient(id, merged.get(id)!));
}

function normalizeClients(value: unknown): Array<[string, PartialClient]> {
  if (value === undefined || value === null || value === '') return [];
  if (typeof value === 'string') {
    const trimmed = value.trim();
    // `-c clients='["a","b"]'` arrives as a string too.
    if (trimmed.startsWith('[') || trimmed.startsWith('{')) {
      try {
        return normalizeClients(JSON.parse(trimmed));
      } catch (e) {
        throw new ConfigError(`clients: ${(e as Error).message}`);
      }
    }
    return trimmed.split(',').map((s) => s.trim()).filter((s) => s.length > 0).map((id) => [checkClientId(id), {}]);
  }
  if (Array.isArray(value)) {
    return value.map((entry): [string, PartialClient] => {
      if (typeof entry === 'string') return [checkClientId(entry.trim()), {}];
      const obj = asObject(entry, 'clients[]');
      if (!obj || typeof obj.id !== 'string') throw new ConfigError('clients[]: an object entry needs a string "id"');
      return [checkClientId(obj.id), parseClientSettings(obj, obj.id)];
    });
  }
  const obj = asObject(value, 'clients')!;
  return Object.entries(obj).map(([id, settings]): [string, PartialClient] => {
    const s = settings === null || settings === undefined ? {} : asObject(settings, `clients.${id}`)!;
    return [checkClientId(id), parseClientSettings(s, id)];
  });
}

function parseClientSettings(obj: Raw, id: string): PartialClient {
  const known = new Set(['id', 'trustedPrincipal', 'externalId', 'jobs', 'batch', 'rolesAnywhere']);
  for (const key of Object.keys(obj)) {
    if (!known.has(key)) throw new ConfigError(`client ${id}: unknown setting "${key}" (known: ${[...known].join(', ')})`);
  }
  const out: PartialClient = {};
  if (obj.trustedPrincipal !== undefined) {
    const p = parseString(obj.trustedPrincipal, `client ${id} trustedPrincipal`);
    if (!ACCOUNT_RE.test(p) && !PRINCIPAL_ARN_RE.test(p)) {
      throw new ConfigError(`client ${id}: trustedPrincipal must be a 12-digit account id or an IAM role/user ARN, got "${p}"`);
    }
    out.trustedPrincipal = p;
  }
  if (obj.externalId !== undefined) {
    const e = parseString(obj.externalId, `client ${id} externalId`);
    if (!EXTERNAL_ID_RE.test(e)) throw new ConfigError(`client ${id}: externalId must be 2-1224 characters of [A-Za-z0-9+=,.@:/_-]`);
    out.externalId = e;
  }
  if (obj.jobs !== undefined) {
    if (!Array.isArray(obj.jobs) || obj.jobs.length === 0) throw new ConfigError(`client ${id}: jobs must be a non-empty list of job ids`);
    out.jobs = obj.jobs.map((j) => {
      const job = parseString(j, `client ${id} jobs[]`);
      if (!JOB_ID_RE.test(job)) throw new ConfigError(`client ${id}: bad job id "${job}"`);
      return job;
    });
    if (out.jobs.length > 150) throw new ConfigError(`client ${id}: at most 150 jobs in an SNS filter policy`);
    const policyChars = out.jobs.reduce((sum, job) => sum + jobPolicyChars(job), 0);
    if (policyChars > JOB_ARNS_POLICY_BUDGET) {
      throw new ConfigError(
        `client ${id}: ${out.jobs.length} jobs make its role's policy too long for IAM ` +
        `(${policyChars} of ${JOB_ARNS_POLICY_BUDGET} characters for the jobs' S3 ARNs, ${JOB_ARN_OVERHEAD} + twice the id each): ` +
        'list fewer or shorter job ids, or none (then the client reads every job\'s global models)');
    }
  }
  if (obj.batch !== undefined) out.batch = parseInteger(obj.batch, `client ${id} batch`, 0, MAX_CLIENT_BATCHES - 1);
  if (obj.rolesAnywhere !== undefined) {
    const ra = asObject(obj.rolesAnywhere, `client ${id} rolesAnywhere`) ?? {};
    for (const key of Object.keys(ra)) {
      if (key !== 'certificateSubjectCN') throw new ConfigError(`client ${id}: rolesAnywhere: unknown setting "${key}" (known: certificateSubjectCN)`);
    }
    const cn = parseString(ra.certificateSubjectCN, `client ${id} rolesAnywhere.certificateSubjectCN`);
    if (!CERTIFICATE_CN_RE.test(cn)) {
      throw new ConfigError(`client ${id}: rolesAnywhere.certificateSubjectCN must be 1-64 characters of [A-Za-z0-9 ._@:=+/-], starting with a letter or digit`);
    }
    out.rolesAnywhere = { certificateSubjectCN: cn };
  }
  return out;
}

function finishClient(id: string, s: PartialClient): ClientSettings {
  let externalId = s.externalId;
  if (externalId === undefined) {
    if (s.trustedPrincipal !== undefined) {
      // A role another party can assume must be protected against the
      // confused-deputy problem with an external id only the two parties know.
      throw new ConfigError(`client ${id}: a trustedPrincipal needs an explicit externalId`);
    }
    externalId = `fedstep-${id}`;
  }
  return { id, trustedPrincipal: s.trustedPrincipal, externalId, jobs: s.jobs, batch: s.batch, rolesAnywhere: s.rolesAnywhere };
}

/**
 * Ids whose update key a read pattern of every client would match: `*` in
 * an IAM resource also matches `/`, so `jobs/*\/rounds/*\/global.safetensors`
 * matches `jobs/j/rounds/1/updates/global.safetensors`, the update of a
 * client named `global` (likewise the SCAFFOLD server variate's name).
 */
export const RESERVED_CLIENT_IDS = ['global', 'scaffold_variate'];

function checkClientId(id: string): string {
  if (!CLIENT_ID_RE.test(id)) {
    throw new ConfigError(`bad client id "${id}": letters, digits, '-' and '_' only, at most 60 characters`);
  }
  if (RESERVED_CLIENT_IDS.includes(id)) {
    throw new ConfigError(
      `client id "${id}" is reserved: its update key would match the ${id}.safetensors every client may read`,
    );
  }
  return id;
}

function dropUndefined<T extends object>(o: T): Partial<T> {
  return Object.fromEntries(Object.entries(o).filter(([, v]) => v !== undefined)) as Partial<T>;
}

function asObject(value: unknown, what: string): Raw | undefined {
  if (value === undefined || value === null) return undefined;
  if (typeof value === 'string') {
    try {
      value = JSON.parse(value);
    } catch {
      throw new ConfigError(`${what} must be a JSON object`);
    }
  }
  if (typeof value !== 'object' || Array.isArray(value)) throw new ConfigError(`${what} must be an object`);
  return value as Raw;
}

function parseArch(v: unknown): LambdaArch {
  const s = String(v).toLowerCase().replace('-', '_');
  if (s === 'arm64' || s === 'aarch64') return 'arm64';
  if (s === 'x86_64' || s === 'amd64' || s === 'x86') return 'x86_64';
  throw new ConfigError(`arch must be arm64 or x86_64, got "${String(v)}"`);
}

function parseInteger(v: unknown, what: string, min: number, max: number): number {
  const n = typeof v === 'number' ? v : typeof v === 'string' && v.trim() !== '' ? Number(v) : NaN;
  if (!Number.isInteger(n) || n < min || n > max) throw new ConfigError(`${what} must be an integer in [${min}, ${max}], got "${String(v)}"`);
  return n;
}

function parseBool(v: unknown, what: string): boolean {
  if (typeof v === 'boolean') return v;
  if (v === 'true' || v === '1' || v === 'yes') return true;
  if (v === 'false' || v === '0' || v === 'no') return false;
  throw new ConfigError(`${what} must be true or false, got "${String(v)}"`);
}

function parseString(v: unknown, what: string): string {
  if (typeof v !== 'string' || v.length === 0) throw new ConfigError(`${what} must be a non-empty string`);
  return v;
}
