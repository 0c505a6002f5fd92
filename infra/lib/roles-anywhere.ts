import { Duration } from 'aws-cdk-lib';
import * as iam from 'aws-cdk-lib/aws-iam';
import * as rolesanywhere from 'aws-cdk-lib/aws-rolesanywhere';
import { Construct } from 'constructs';
import { ClientRolesAnywhere, RolesAnywhereSettings } from './config';

/**
 * IAM Roles Anywhere for on-premises clients (optional, off by default):
 * a client machine holding a certificate from the deployment's CA gets
 * short-lived credentials for its client role from `aws_signing_helper`
 * (AWS profile `credential_process`, infra/README.md), so no long-lived
 * access key is needed anywhere.
 *
 * One trust anchor per deployment, in the main stack (ClientTrustAnchor);
 * per client that opts in, a profile for its role and a trust policy
 * statement (ClientProfile, in the client's clients stack).
 */

/** How long one set of credentials lasts: `credential_process` fetches the next set before they expire. */
export const ROLES_ANYWHERE_SESSION = Duration.hours(1);

/** The IAM Roles Anywhere service principal. */
export const ROLES_ANYWHERE_PRINCIPAL = 'rolesanywhere.amazonaws.com';

/** The certificate's subject CN as Roles Anywhere maps it into the session (its default attribute mapping). */
export const SUBJECT_CN_TAG = 'aws:PrincipalTag/x509Subject/CN';

/** The deployment's trust anchor: the CA (a PEM bundle or an AWS Private CA) that issues client certificates. */
export class ClientTrustAnchor extends Construct {
  readonly trustAnchor: rolesanywhere.CfnTrustAnchor;

  constructor(scope: Construct, id: string, props: { readonly settings: RolesAnywhereSettings; readonly name: string }) {
    super(scope, id);
    const { caCertificatePem, acmPcaArn } = props.settings;
    const source: rolesanywhere.CfnTrustAnchor.SourceProperty = caCertificatePem !== undefined
      ? { sourceType: 'CERTIFICATE_BUNDLE', sourceData: { x509CertificateData: caCertificatePem } }
      : { sourceType: 'AWS_ACM_PCA', sourceData: { acmPcaArn } };
    this.trustAnchor = new rolesanywhere.CfnTrustAnchor(this, 'Resource', {
      name: props.name,
      // Created enabled: a disabled anchor would fail every client's
      // CreateSession until someone enabled it by hand.
      enabled: true,
      source,
    });
  }

  get arn(): string {
    return this.trustAnchor.attrTrustAnchorArn;
  }
}

export interface ClientProfileProps {
  readonly role: iam.Role;
  readonly certificate: ClientRolesAnywhere;
  readonly trustAnchorArn: string;
  /** Profile name, e.g. `Fedstep-site-a` (letters, digits, spaces, `-`, `_`). */
  readonly name: string;
}

/**
 * One client's Roles Anywhere access: a profile that can hand out exactly
 * this client's role, and a statement in the role's trust policy that lets
 * Roles Anywhere assume it only for a certificate with the client's subject
 * CN, validated by this deployment's trust anchor (aws:SourceArn). The
 * profile alone would not be enough: any profile of the account could name
 * the role, and any certificate of the anchor could use the profile; the
 * trust policy pins both.
 */
export class ClientProfile extends Construct {
  readonly profile: rolesanywhere.CfnProfile;

  constructor(scope: Construct, id: string, props: ClientProfileProps) {
    super(scope, id);
    this.profile = new rolesanywhere.CfnProfile(this, 'Resource', {
      name: props.name,
      enabled: true,
      roleArns: [props.role.roleArn],
      durationSeconds: ROLES_ANYWHERE_SESSION.toSeconds(),
    });
    // sts:TagSession and sts:SetSourceIdentity: Roles Anywhere sets the
    // certificate's attributes as session tags and its CN as the source
    // identity (both show in CloudTrail), and needs both actions to do so.
    props.role.assumeRolePolicy!.addStatements(new iam.PolicyStatement({
      sid: 'RolesAnywhere',
      principals: [new iam.ServicePrincipal(ROLES_ANYWHERE_PRINCIPAL)],
      actions: ['sts:AssumeRole', 'sts:TagSession', 'sts:SetSourceIdentity'],
      conditions: {
        StringEquals: { [SUBJECT_CN_TAG]: props.certificate.certificateSubjectCN },
        ArnEquals: { 'aws:SourceArn': props.trustAnchorArn },
      },
    }));
  }

  get arn(): string {
    return this.profile.attrProfileArn;
  }
}
