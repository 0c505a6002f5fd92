//! `fedstep infra client-config`: a ready `client.toml` for one client from
//! the JSON that `cdk deploy --all --outputs-file FILE` writes
//! (`{"<stack>": {"<OutputKey>": "<value>", ...}, ...}`).
//!
//! A deployment is a main stack `<name>` and clients stacks
//! `<name>-Clients-NN` (infra/lib/fedstep-app.ts); each client stack
//! outputs, per client, `Client<Id>Config`: one JSON object with `client_id,
//! region, bucket, updates_table, queue_url, role_arn, external_id`. The
//! client is found by the `client_id` inside it, in whichever stack of the
//! file holds it, so this file does not re-implement the stack's output
//! naming or the assignment of clients to stacks. infra's jest tests derive
//! `infra/test/fixtures/cdk-outputs.json` from the synthesized templates and
//! this crate's tests read that file, so the two sides cannot drift apart
//! silently.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use clap::{Args, Subcommand};
use fedstep_cloud::keys::check_id;
use serde_json::Value;

#[derive(Subcommand)]
pub enum InfraCommand {
    /// Print a client.toml for one client from `cdk deploy --outputs-file` JSON.
    ClientConfig(ClientConfigArgs),
}

#[derive(Args)]
pub struct ClientConfigArgs {
    /// The file `cdk deploy --outputs-file FILE` wrote.
    #[arg(long)]
    outputs: PathBuf,
    /// The client id (as in `-c clients=...`).
    #[arg(long)]
    client: String,
    /// The stack name: only that stack and its clients stacks
    /// `<NAME>-Clients-NN` are searched. Needed only when the file holds
    /// several deployments with this client.
    #[arg(long)]
    stack: Option<String>,
}

/// The fields of a `Client<Id>Config` output, in the order they are read.
const FIELDS: [&str; 7] = [
    "client_id",
    "region",
    "bucket",
    "updates_table",
    "queue_url",
    "role_arn",
    "external_id",
];

/// Longest value accepted from the outputs file (ARNs and URLs are far shorter).
const MAX_VALUE_LEN: usize = 2048;

pub fn run(cmd: InfraCommand) -> Result<()> {
    match cmd {
        InfraCommand::ClientConfig(args) => {
            let text = std::fs::read_to_string(&args.outputs)
                .with_context(|| format!("cannot read outputs file {}", args.outputs.display()))?;
            let toml = client_config(&text, &args.outputs, &args.client, args.stack.as_deref())?;
            print!("{toml}");
            Ok(())
        }
    }
}

/// One client's settings, as the stack outputs them.
struct ClientOutputs {
    stack: String,
    fields: BTreeMap<&'static str, String>,
}

/// The client.toml text for `client` from the outputs file's `text`.
pub fn client_config(text: &str, file: &Path, client: &str, stack: Option<&str>) -> Result<String> {
    check_id("--client", client).map_err(|e| anyhow!(e))?;
    let outputs = find_client(text, file, client, stack)?;
    Ok(render(client, &outputs))
}

fn find_client(
    text: &str,
    file: &Path,
    client: &str,
    stack: Option<&str>,
) -> Result<ClientOutputs> {
    let file = file.display();
    let root: Value =
        serde_json::from_str(text).with_context(|| format!("outputs file {file} is not JSON"))?;
    let stacks = root.as_object().ok_or_else(|| {
        anyhow!("outputs file {file} must be a JSON object of stacks ({{\"<stack>\": {{\"<output>\": \"<value>\"}}}}), as `cdk deploy --outputs-file` writes it")
    })?;

    // The stacks to search: every stack of the file, or with --stack the
    // named stack and its clients stacks.
    let searched: Vec<(&String, &Value)> = match stack {
        Some(name) => {
            let picked: Vec<_> = stacks
                .iter()
                .filter(|(n, _)| in_deployment(n, name))
                .collect();
            if picked.is_empty() {
                bail!(
                    "stack `{name}` is not in outputs file {file} (stacks there: {})",
                    list(stacks.keys())
                );
            }
            picked
        }
        None => stacks.iter().collect(),
    };

    let mut with_clients = Vec::new(); // stacks that have Client<Id>Config outputs
    let mut known = Vec::new(); // the other clients' ids
    let mut found = Vec::new(); // (stack, fields) of `client`
    for (stack_name, outputs) in searched.iter().copied() {
        let Some(outputs) = outputs.as_object() else {
            if stack.is_some() {
                bail!("stack `{stack_name}` in outputs file {file} must be an object of outputs");
            }
            continue;
        };
        let mut has_clients = false;
        for (key, value) in client_configs_of(outputs) {
            has_clients = true;
            let config = parse_config(value)
                .with_context(|| format!("output {key} of stack `{stack_name}` in {file}"))?;
            let id = config.get("client_id").and_then(Value::as_str);
            if id != Some(client) {
                known.push(id.unwrap_or("?").to_string());
                continue;
            }
            let mut fields = BTreeMap::new();
            for field in FIELDS {
                let value = string_field(&config, field).with_context(|| {
                    format!("output {key} (client `{client}`) of stack `{stack_name}` in {file}")
                })?;
                fields.insert(field, value);
            }
            found.push((stack_name, fields));
        }
        if has_clients {
            with_clients.push(stack_name);
        }
    }

    match found.len() {
        1 => {
            let (stack_name, fields) = found.remove(0);
            return Ok(ClientOutputs {
                stack: stack_name.to_string(),
                fields,
            });
        }
        0 => {}
        _ => bail!(
            "several fedstep stacks ({}) in outputs file {file} hold client `{client}`; choose one with --stack",
            list(found.iter().map(|(n, _)| *n))
        ),
    }
    if with_clients.is_empty() && stack.is_none() {
        bail!(
            "outputs file {file} has no stack with fedstep client outputs (Client<Id>Config); \
             was it written by `cdk deploy --all --outputs-file` for a fedstep deployment with clients? (stacks there: {})",
            list(stacks.keys())
        );
    }
    known.sort();
    // Name the stacks that hold clients, else (--stack without any) the searched ones.
    let names: Vec<&String> = if with_clients.is_empty() {
        searched.iter().map(|(n, _)| *n).collect()
    } else {
        with_clients
    };
    bail!(
        "client `{client}` is not in the outputs of stack(s) {} ({file}): no Client<Id>Config output has \"client_id\": \"{client}\" (clients there: {}). \
         Add it with `cdk deploy --all -c clients=...,{client} --outputs-file ...`",
        list(names.into_iter()),
        if known.is_empty() { "none".to_string() } else { known.join(", ") }
    )
}

/// Whether stack `name` belongs to the deployment `--stack deployment`: the
/// stack of that name, or one of its clients stacks `<deployment>-Clients-NN`
/// (infra/lib/client-batches.ts, `batchStackName`).
fn in_deployment(name: &str, deployment: &str) -> bool {
    name == deployment
        || name
            .strip_prefix(deployment)
            .and_then(|rest| rest.strip_prefix("-Clients-"))
            .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

/// `Client<Id>Config` outputs of one stack's output object.
fn client_configs_of(
    outputs: &serde_json::Map<String, Value>,
) -> impl Iterator<Item = (&String, &Value)> {
    outputs.iter().filter(|(k, _)| {
        k.len() > "ClientConfig".len() && k.starts_with("Client") && k.ends_with("Config")
    })
}

/// The output's value is a JSON object serialized into a string.
fn parse_config(value: &Value) -> Result<serde_json::Map<String, Value>> {
    let text = value
        .as_str()
        .ok_or_else(|| anyhow!("must be a string holding a JSON object, got {value}"))?;
    match serde_json::from_str::<Value>(text).context("is not JSON")? {
        Value::Object(map) => Ok(map),
        other => bail!("must hold a JSON object, got {other}"),
    }
}

/// A required, non-empty, single-line string field.
fn string_field(config: &serde_json::Map<String, Value>, field: &str) -> Result<String> {
    let value = match config.get(field) {
        None => bail!(
            "missing \"{field}\" (the stack outputs {})",
            FIELDS.join(", ")
        ),
        Some(Value::String(s)) => s,
        Some(other) => bail!("\"{field}\" must be a string, got {other}"),
    };
    if value.trim().is_empty() {
        bail!("\"{field}\" is empty");
    }
    if value.len() > MAX_VALUE_LEN {
        bail!("\"{field}\" is longer than {MAX_VALUE_LEN} bytes");
    }
    // Values also land in comments of the printed file: one line each.
    if value.chars().any(char::is_control) {
        bail!("\"{field}\" contains control characters (newline, tab, ...)");
    }
    Ok(value.clone())
}

fn list<'a>(names: impl Iterator<Item = &'a String>) -> String {
    let names: Vec<_> = names.map(String::as_str).collect();
    if names.is_empty() {
        "none".into()
    } else {
        names.join(", ")
    }
}

/// A TOML string literal (quoted and escaped by the toml crate).
fn quoted(s: &str) -> String {
    toml::Value::String(s.to_string()).to_string()
}

fn render(client: &str, o: &ClientOutputs) -> String {
    let f = |k: &str| o.fields[k].as_str();
    let profile = format!("fedstep-{client}");
    let mut t = String::new();
    let _ = writeln!(
        t,
        "# fedstep-client configuration for client {} of stack {}, from its",
        quoted(client),
        quoted(&o.stack)
    );
    t.push_str(
        "# `cdk deploy` outputs (`fedstep infra client-config`). Every key is\n\
         # explained in examples/client.toml. Run: fedstep-client run --config client.toml\n\
         #\n\
         # AWS credentials: the client assumes its role through an AWS profile.\n\
         # Put this into ~/.aws/config on the client machine and run the client\n",
    );
    let _ = writeln!(t, "# with AWS_PROFILE={profile}:");
    t.push_str("#\n");
    let _ = writeln!(t, "#   [profile {profile}]");
    let _ = writeln!(t, "#   role_arn = {}", f("role_arn"));
    let _ = writeln!(t, "#   external_id = {}", f("external_id"));
    let _ = writeln!(t, "#   region = {}", f("region"));
    t.push_str(
        "#   source_profile = <a profile of the principal trusted by the role>\n\
         #   # (or: credential_source = Ec2InstanceMetadata / Environment)\n\
         #\n\
         # On-premises without long-lived keys: see infra/README.md (IAM Roles Anywhere).\n\n",
    );
    for key in [
        "client_id",
        "queue_url",
        "bucket",
        "updates_table",
        "region",
    ] {
        let _ = writeln!(t, "{key} = {}", quoted(f(key)));
    }
    t.push_str(
        "\n# Take part only in these jobs (the stack may also filter them for you).\n\
         # jobs = [\"my-job\"]\n\n\
         # Exit with status 0 when training_complete arrives for one of our jobs\n\
         # (the queue is subscribed to that topic). false: keep serving new jobs.\n\
         exit_on_complete = false\n\n\
         # How this client trains: the built-in trainer on the bundled digits is a\n\
         # smoke test; point it at your data or an external trainer (see\n\
         # examples/client.toml).\n\
         [trainer]\n\
         kind = \"builtin\"\n\
         dataset = \"digits\"\n",
    );
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outputs(config: Value) -> String {
        serde_json::json!({ "Fedstep": { "ClientSiteAConfig": config.to_string(), "Region": "eu-west-1" } })
            .to_string()
    }

    fn good() -> Value {
        serde_json::json!({
            "client_id": "site-a", "region": "eu-west-1", "bucket": "b",
            "updates_table": "u", "queue_url": "https://sqs/q", "role_arn": "arn:aws:iam::1:role/r",
            "external_id": "fedstep-site-a",
        })
    }

    #[test]
    fn quotes_values_and_rejects_multi_line_ones() {
        let mut c = good();
        c["bucket"] = Value::from("a\"b\\c");
        let t = client_config(&outputs(c), Path::new("o.json"), "site-a", None).unwrap();
        let parsed: toml::Table = toml::from_str(&t).unwrap();
        assert_eq!(parsed["bucket"].as_str(), Some("a\"b\\c"), "{t}");

        let mut c = good();
        c["role_arn"] = Value::from("arn\nclient_id = \"evil\"");
        let e = client_config(&outputs(c), Path::new("o.json"), "site-a", None).unwrap_err();
        assert!(
            format!("{e:#}").contains("\"role_arn\" contains control characters"),
            "{e:#}"
        );
    }

    #[test]
    fn clients_stacks_belong_to_their_deployment() {
        assert!(in_deployment("Fedstep", "Fedstep"));
        assert!(in_deployment("Fedstep-Clients-07", "Fedstep"));
        assert!(in_deployment("Fedstep-Clients-07", "Fedstep-Clients-07"));
        assert!(!in_deployment("Fedstep-Clients-", "Fedstep"));
        assert!(!in_deployment("Fedstep-Clients-0x", "Fedstep"));
        assert!(!in_deployment("FedstepB-Clients-07", "Fedstep"));
        assert!(!in_deployment("Fedstep-Clients-07", "Fedstep-Clients-0"));
        assert!(!in_deployment("Other", "Fedstep"));
    }

    #[test]
    fn the_client_is_found_in_whichever_stack_holds_it() {
        let mut b = good();
        b["client_id"] = Value::from("site-b");
        let text = serde_json::json!({
            "Fedstep": { "Region": "eu-west-1", "ClientDlqUrl": "https://sqs/dlq" },
            "Fedstep-Clients-03": { "ClientSiteAConfig": good().to_string() },
            "Fedstep-Clients-11": { "ClientSiteBConfig": b.to_string() },
        })
        .to_string();
        let file = Path::new("o.json");
        for stack in [None, Some("Fedstep"), Some("Fedstep-Clients-11")] {
            let t = client_config(&text, file, "site-b", stack).unwrap();
            assert!(
                t.contains("of stack \"Fedstep-Clients-11\""),
                "{stack:?}: {t}"
            );
        }
        // --stack narrows the search to that stack (and its clients stacks).
        let e = client_config(&text, file, "site-b", Some("Fedstep-Clients-03")).unwrap_err();
        let e = format!("{e:#}");
        assert!(
            e.contains("client `site-b`") && e.contains("clients there: site-a"),
            "{e}"
        );
    }

    #[test]
    fn a_client_in_two_deployments_needs_stack() {
        let text = serde_json::json!({
            "A-Clients-01": { "ClientSiteAConfig": good().to_string() },
            "B-Clients-01": { "ClientSiteAConfig": good().to_string() },
        })
        .to_string();
        let file = Path::new("o.json");
        let e = client_config(&text, file, "site-a", None).unwrap_err();
        assert!(
            e.to_string()
                .contains("several fedstep stacks (A-Clients-01, B-Clients-01)"),
            "{e}"
        );
        let t = client_config(&text, file, "site-a", Some("B")).unwrap();
        assert!(t.contains("of stack \"B-Clients-01\""), "{t}");
    }

    #[test]
    fn a_bad_client_argument_is_refused_before_reading() {
        let e = client_config("{}", Path::new("o.json"), "../x", None).unwrap_err();
        assert!(e.to_string().contains("--client `../x`"), "{e}");
    }
}
