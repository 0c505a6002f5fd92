import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';
import { ConfigError, DEFAULTS, INFRA_DIR, JOB_ARN_OVERHEAD, JOB_ARNS_POLICY_BUDGET, jobPolicyChars, resolveSettings } from '../lib/config';

const ctx = (values: Record<string, unknown>) => (key: string): unknown => values[key];
/** A base dir without fedstep.config.json, so a developer's local file cannot leak into tests. */
const base = fs.mkdtempSync(path.join(os.tmpdir(), 'fedstep-config-test-'));
afterAll(() => fs.rmSync(base, { recursive: true, force: true }));

describe('resolveSettings', () => {
  test('defaults', () => {
    const s = resolveSettings(ctx({}), base);
    expect(s.clients).toEqual([]);
    expect(s.clientBatches).toBe(16);
    // x86_64, the architecture infra/test.sh builds and checks (lib/config.ts).
    expect(s.architecture).toBe('x86_64');
    expect(s.memoryMb).toBe(3008);
    expect(s.timeoutMinutes).toBe(15);
    expect(s.streamMemoryMb).toBe(256);
    expect(s.rustLog).toBe('info');
    expect(s.retainData).toBe(true);
    expect(s.lambdaAsset).toBeUndefined();
    expect(s.lambdaManifest).toBe(path.resolve(base, DEFAULTS.lambdaManifest));
    expect(s.aslPath).toBe(path.resolve(base, DEFAULTS.aslPath));
  });

  test('default paths point at the repository layout', () => {
    const s = resolveSettings(ctx({}), INFRA_DIR);
    expect(s.lambdaManifest).toBe(path.resolve(INFRA_DIR, '..', 'crates', 'lambda', 'Cargo.toml'));
    expect(s.aslPath).toBe(path.resolve(INFRA_DIR, '..', 'statemachine', 'federated_training.asl.json'));
  });

  test('-c clients=a,b,c (string context) with default external ids', () => {
    const s = resolveSettings(ctx({ clients: ' site-a, site-b ,site-c,' }), base);
    expect(s.clients).toEqual([
      { id: 'site-a', externalId: 'fedstep-site-a', trustedPrincipal: undefined, jobs: undefined },
      { id: 'site-b', externalId: 'fedstep-site-b', trustedPrincipal: undefined, jobs: undefined },
      { id: 'site-c', externalId: 'fedstep-site-c', trustedPrincipal: undefined, jobs: undefined },
    ]);
  });

  test('string context values are parsed (numbers, booleans, arch aliases)', () => {
    const s = resolveSettings(ctx({
      arch: 'x86-64', memoryMb: '10240', timeoutMinutes: '5', streamMemoryMb: '128', retainData: 'false', logRetentionDays: '30',
    }), base);
    expect(s.architecture).toBe('x86_64');
    expect(s.memoryMb).toBe(10240);
    expect(s.streamMemoryMb).toBe(128);
    expect(s.timeoutMinutes).toBe(5);
    expect(s.retainData).toBe(false);
    expect(s.logRetentionDays).toBe(30);
    expect(resolveSettings(ctx({ arch: 'aarch64' }), base).architecture).toBe('arm64');
  });

  test('per-client settings from cdk.json merge with -c clients', () => {
    const s = resolveSettings(ctx({
      fedstep: {
        clients: {
          'site-b': { trustedPrincipal: '123456789012', externalId: 'b-secret-ish', jobs: ['job-1', 'job-2'] },
        },
      },
      clients: 'site-a,site-b',
    }), base);
    expect(s.clients.map((c) => c.id)).toEqual(['site-b', 'site-a']);
    expect(s.clients[0]).toEqual({ id: 'site-b', trustedPrincipal: '123456789012', externalId: 'b-secret-ish', jobs: ['job-1', 'job-2'] });
  });

  test('config file (-c config=...) between cdk.json and single keys', () => {
    const file = path.join(base, 'custom.json');
    fs.writeFileSync(file, JSON.stringify({
      arch: 'x86_64',
      memoryMb: 4096,
      streamMemoryMb: 512,
      clients: [
        'site-a',
        { id: 'site-c', trustedPrincipal: 'arn:aws:iam::210987654321:role/trainer', externalId: 'ext-c' },
      ],
    }));
    const s = resolveSettings(ctx({ config: 'custom.json', fedstep: { memoryMb: 2048, arch: 'arm64' }, memoryMb: '5120' }), base);
    expect(s.architecture).toBe('x86_64'); // file beats cdk.json
    expect(s.memoryMb).toBe(5120); // -c beats file
    expect(s.streamMemoryMb).toBe(512); // from the file
    expect(s.clients.map((c) => c.id)).toEqual(['site-a', 'site-c']);
    expect(s.clients[1].trustedPrincipal).toBe('arn:aws:iam::210987654321:role/trainer');
  });

  test('fedstep.config.json in the infra dir is picked up automatically', () => {
    const dir = fs.mkdtempSync(path.join(base, 'auto-'));
    fs.writeFileSync(path.join(dir, 'fedstep.config.json'), JSON.stringify({ clients: { x: {} } }));
    expect(resolveSettings(ctx({}), dir).clients.map((c) => c.id)).toEqual(['x']);
  });

  test('lambdaAsset resolves relative to the infra dir', () => {
    expect(resolveSettings(ctx({ lambdaAsset: 'build/lambda' }), base).lambdaAsset).toBe(path.join(base, 'build', 'lambda'));
    expect(resolveSettings(ctx({ 'fedstep:lambdaAsset': '/abs/dir' }), base).lambdaAsset).toBe('/abs/dir');
  });

  test('jobs up to the role policy budget are accepted', () => {
    // Two ARNs a job (global model, SCAFFOLD variate), each with the id:
    // 25 ids of 15 characters: 25 × (250 + 2 × 15) = 7,000, exactly the budget.
    expect(JOB_ARN_OVERHEAD).toBe(250);
    expect(jobPolicyChars('x'.repeat(15))).toBe(250 + 2 * 15);
    const jobs = Array.from({ length: 25 }, (_, i) => `job-${String(i).padStart(11, '0')}`);
    expect(jobs[0]).toHaveLength(15);
    expect(25 * (2 * 15 + JOB_ARN_OVERHEAD)).toBe(JOB_ARNS_POLICY_BUDGET);
    expect(resolveSettings(ctx({ clients: { a: { jobs } } }), base).clients[0].jobs).toEqual(jobs);
    expect(() => resolveSettings(ctx({ clients: { a: { jobs: [...jobs, 'j'] } } }), base)).toThrow(/too long for IAM/);
  });

  test('rolesAnywhere: off by default; a CA file (relative to the infra dir) or a Private CA; per-client CN', () => {
    expect(resolveSettings(ctx({}), base).rolesAnywhere).toBeUndefined();
    const ca = fs.readFileSync(path.join(__dirname, 'fixtures', 'roles-anywhere-ca.pem'), 'utf8');
    fs.writeFileSync(path.join(base, 'ca.pem'), `\n${ca}\n`);
    const s = resolveSettings(ctx({
      rolesAnywhere: { caCertificateFile: 'ca.pem' },
      clients: { 'site-a': { rolesAnywhere: { certificateSubjectCN: 'site-a.example.org' } }, 'site-b': {} },
    }), base);
    expect(s.rolesAnywhere).toEqual({ caCertificatePem: ca.trim() });
    expect(s.clients.map((c) => [c.id, c.rolesAnywhere])).toEqual([
      ['site-a', { certificateSubjectCN: 'site-a.example.org' }], ['site-b', undefined],
    ]);
    const arn = 'arn:aws:acm-pca:eu-west-1:111122223333:certificate-authority/12345678-1234-1234-1234-123456789012';
    // -c rolesAnywhere='{"acmPcaArn": ...}' arrives as a string.
    expect(resolveSettings(ctx({ rolesAnywhere: JSON.stringify({ acmPcaArn: arn }) }), base).rolesAnywhere).toEqual({ acmPcaArn: arn });
  });

  test('rolesAnywhere: a file with a private key is refused (it would land in the template)', () => {
    const ca = fs.readFileSync(path.join(__dirname, 'fixtures', 'roles-anywhere-ca.pem'), 'utf8');
    fs.writeFileSync(path.join(base, 'with-key.pem'), `${ca}-----BEGIN PRIVATE KEY-----\nMIG...\n-----END PRIVATE KEY-----\n`);
    fs.writeFileSync(path.join(base, 'not-pem.pem'), 'hello');
    fs.writeFileSync(path.join(base, 'huge.pem'), ca.trim().repeat(12));
    expect(() => resolveSettings(ctx({ rolesAnywhere: { caCertificateFile: 'with-key.pem' } }), base)).toThrow(/private key/);
    expect(() => resolveSettings(ctx({ rolesAnywhere: { caCertificateFile: 'not-pem.pem' } }), base)).toThrow(/not PEM certificates/);
    expect(() => resolveSettings(ctx({ rolesAnywhere: { caCertificateFile: 'huge.pem' } }), base)).toThrow(/at most 8000/);
  });

  test('clientBatches and a client\'s pinned batch', () => {
    const s = resolveSettings(ctx({ clientBatches: '8', clients: { 'site-a': { batch: 7 }, 'site-b': {} } }), base);
    expect(s.clientBatches).toBe(8);
    expect(s.clients.map((c) => [c.id, c.batch])).toEqual([['site-a', 7], ['site-b', undefined]]);
  });

  test.each([
    [{ clients: 'bad id' }, /bad client id/],
    [{ clientBatches: 0 }, /clientBatches must be an integer in \[1, 100\]/],
    [{ clientBatches: 101 }, /clientBatches/],
    [{ clients: { a: { batch: -1 } } }, /client a batch must be an integer/],
    [{ clients: { a: { batch: 1.5 } } }, /client a batch must be an integer/],
    [{ clientBatches: 4, clients: { a: { batch: 4 } } }, /client a: batch 4 is not below clientBatches \(4\)/],
    [{ clients: 'a*' }, /bad client id/],
    [{ clients: 'a#1' }, /bad client id/],
    // Their update keys would match a pattern every client reads.
    [{ clients: 'global' }, /client id "global" is reserved/],
    [{ clients: 'scaffold_variate' }, /client id "scaffold_variate" is reserved/],
    [{ clients: { a: { trustedPrincipal: '123456789012' } } }, /needs an explicit externalId/],
    [{ clients: { a: { trustedPrincipal: 'someone', externalId: 'xx' } } }, /trustedPrincipal must be/],
    [{ clients: { a: { externalId: 'x' } } }, /externalId must be/],
    [{ clients: { a: { jobs: [] } } }, /non-empty list/],
    [{ clients: { a: { jobs: ['ok', 'not ok'] } } }, /bad job id/],
    [{ clients: { a: { jobs: ['job-*'] } } }, /bad job id/],
    // 40 jobs of 100+ characters: 80 S3 ARNs too many for the role's inline policy.
    [{ clients: { a: { jobs: Array.from({ length: 40 }, (_, i) => `job-${i}-${'x'.repeat(100)}`) } } }, /too long for IAM/],
    [{ clients: { a: { typo: 1 } } }, /unknown setting "typo"/],
    [{ arch: 'mips' }, /arch must be/],
    [{ timeoutMinutes: 16 }, /timeoutMinutes/],
    [{ memoryMb: 64 }, /memoryMb/],
    [{ streamMemoryMb: 64 }, /streamMemoryMb must be an integer in \[128, 10240\]/],
    [{ streamMemoryMb: 10241 }, /streamMemoryMb/],
    [{ streamMemoryMb: '256.5' }, /streamMemoryMb/],
    [{ logRetentionDays: 2 }, /logRetentionDays/],
    [{ retainData: 'maybe' }, /retainData/],
    [{ config: 'missing.json' }, /does not exist/],
    [{ rolesAnywhere: {} }, /exactly one of caCertificateFile .* and acmPcaArn/],
    [{ rolesAnywhere: { caCertificateFile: 'x.pem', acmPcaArn: 'arn:aws:acm-pca:eu-west-1:111122223333:certificate-authority/x' } }, /exactly one/],
    [{ rolesAnywhere: { caCertificateFile: 'missing.pem' } }, /missing\.pem does not exist/],
    [{ rolesAnywhere: { acmPcaArn: 'arn:aws:iam::111122223333:role/x' } }, /Private CA ARN/],
    [{ rolesAnywhere: { trustAnchorArn: 'x' } }, /rolesAnywhere: unknown setting "trustAnchorArn"/],
    [{ clients: { a: { rolesAnywhere: { certificateSubjectCN: 'a' } } } }, /client a: rolesAnywhere needs the top-level rolesAnywhere/],
    [{ clients: { a: { rolesAnywhere: {} } } }, /certificateSubjectCN must be a non-empty string/],
    [{ clients: { a: { rolesAnywhere: { certificateSubjectCN: '${aws:username}' } } } }, /certificateSubjectCN must be 1-64 characters/],
    [{ clients: { a: { rolesAnywhere: { certificateSubjectCN: 'x'.repeat(65) } } } }, /certificateSubjectCN must be 1-64 characters/],
    [{ clients: { a: { rolesAnywhere: { cn: 'a' } } } }, /rolesAnywhere: unknown setting "cn"/],
    [{
      rolesAnywhere: { acmPcaArn: 'arn:aws:acm-pca:eu-west-1:111122223333:certificate-authority/x' },
      clients: { a: { rolesAnywhere: { certificateSubjectCN: 'same' } }, b: { rolesAnywhere: { certificateSubjectCN: 'same' } } },
    }, /clients a and b have the same certificate CN "same"/],
  ])('rejects %j', (values, message) => {
    expect(() => resolveSettings(ctx(values), base)).toThrow(ConfigError);
    expect(() => resolveSettings(ctx(values), base)).toThrow(message);
  });
});
