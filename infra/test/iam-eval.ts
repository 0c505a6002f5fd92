import { asArray, Json } from './helpers';

/**
 * A small evaluator of identity-policy statements, enough to ask "would IAM
 * allow this S3 request?" of a client role's policy in the tests. It follows
 * the documented rules (IAM User Guide, "Policy evaluation logic" and
 * "Condition operators"):
 * - a request is allowed when some Allow statement matches and no Deny does;
 * - a statement matches when its action, resource and every condition match
 *   (conditions ANDed, values of one key ORed);
 * - a key missing from the request: StringEquals-like operators are false,
 *   negated ones (StringNotEquals, ...) are *true*, `...IfExists` operators
 *   are true, and `Null` tests exactly that presence;
 * - `*` and `?` in actions and resources are wildcards (`*` also matches `/`).
 * Operators it does not know throw, so a policy change cannot pass a test by
 * being misread.
 */
export interface Request {
  readonly action: string;
  readonly resource: string;
  /** Condition keys present in the request (e.g. `s3:x-amz-storage-class`). */
  readonly context?: Record<string, string>;
}

export type Decision = 'allowed' | 'denied' | 'implicitly denied';

export function decide(statements: Json[], request: Request, resolveResource: (r: Json) => string): Decision {
  const matching = statements.filter((st) => matches(st, request, resolveResource));
  if (matching.some((st) => st.Effect === 'Deny')) return 'denied';
  return matching.some((st) => st.Effect === 'Allow') ? 'allowed' : 'implicitly denied';
}

function matches(st: Json, request: Request, resolveResource: (r: Json) => string): boolean {
  if (st.NotAction !== undefined || st.NotResource !== undefined) throw new Error('NotAction/NotResource not modelled');
  if (!asArray<string>(st.Action).some((a) => glob(a, request.action))) return false;
  if (!asArray<Json>(st.Resource).some((r) => glob(resolveResource(r), request.resource))) return false;
  return Object.entries<Json>(st.Condition ?? {}).every(([op, keys]) =>
    Object.entries<Json>(keys).every(([key, values]) => condition(op, request.context?.[key], asArray<string>(values))));
}

function condition(operator: string, actual: string | undefined, values: string[]): boolean {
  if (operator === 'Null') {
    if (values.length !== 1) throw new Error('Null takes one value');
    return (actual === undefined) === (values[0] === 'true');
  }
  const ifExists = operator.endsWith('IfExists');
  const op = ifExists ? operator.slice(0, -'IfExists'.length) : operator;
  if (actual === undefined) {
    if (ifExists) return true;
    switch (op) {
      case 'StringEquals': case 'StringLike': return false;
      case 'StringNotEquals': case 'StringNotLike': return true;
      default: throw new Error(`operator ${operator} not modelled`);
    }
  }
  switch (op) {
    case 'StringEquals': return values.includes(actual);
    case 'StringNotEquals': return !values.includes(actual);
    case 'StringLike': return values.some((v) => glob(v, actual));
    case 'StringNotLike': return !values.some((v) => glob(v, actual));
    default: throw new Error(`operator ${operator} not modelled`);
  }
}

/** IAM's wildcard match: `*` any run of characters (including `/`), `?` one character. */
export function glob(pattern: string, s: string): boolean {
  const re = pattern.replace(/[.+^${}()|[\]\\]/g, '\\$&').replace(/\*/g, '.*').replace(/\?/g, '.');
  return new RegExp(`^${re}$`).test(s);
}
