//! `fedstep infra client-config` against the outputs file the deployment
//! really produces: `infra/test/fixtures/cdk-outputs.json` is derived from
//! the synthesized templates by infra's jest tests (outputs-fixture.test.ts),
//! so a renamed output or field breaks one side or the other, never silently.
//! The file holds the main stack `Fedstep` and the clients stacks
//! `Fedstep-Clients-NN` the clients live in. The printed client.toml must
//! load with the client's own config loader.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use fedstep_client::config::{ClientConfig, TrainerConfig};
use serde_json::Value;

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../infra/test/fixtures/cdk-outputs.json")
}

fn fedstep(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_fedstep"))
        .args(args)
        .output()
        .unwrap()
}

fn client_config(outputs: &Path, extra: &[&str]) -> Output {
    let mut args = vec![
        "infra",
        "client-config",
        "--outputs",
        outputs.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    fedstep(&args)
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// The fixture's `Client<Id>Config` of one client, parsed, and the stack
/// that holds it.
fn stack_config(outputs: &Value, key: &str) -> (String, Value) {
    let stacks = outputs.as_object().unwrap();
    let holding: Vec<_> = stacks
        .iter()
        .filter_map(|(stack, o)| o[key].as_str().map(|text| (stack.clone(), text)))
        .collect();
    match holding.as_slice() {
        [(stack, text)] => (stack.clone(), serde_json::from_str(text).unwrap()),
        other => panic!("fixture: {key} in {} stacks", other.len()),
    }
}

fn fixture_json() -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixture()).unwrap()).unwrap()
}

#[test]
fn prints_a_client_toml_that_the_client_loads() {
    let outputs = fixture_json();
    let mut stacks = Vec::new();
    for (client, key) in [
        ("site-a", "ClientSiteAConfig"),
        ("site-b", "ClientSiteBConfig"),
        ("site-c", "ClientSiteCConfig"),
    ] {
        let out = client_config(&fixture(), &["--client", client]);
        assert!(out.status.success(), "{client}: {}", stderr(&out));
        let text = String::from_utf8(out.stdout).unwrap();
        let cfg = ClientConfig::from_toml(&text)
            .unwrap_or_else(|e| panic!("{client}: printed config does not load: {e}\n{text}"));

        let (stack, want) = stack_config(&outputs, key);
        assert!(
            stack.starts_with("Fedstep-Clients-"),
            "{client} is in {stack}"
        );
        assert_eq!(cfg.client_id, client);
        assert_eq!(cfg.queue_url, want["queue_url"].as_str().unwrap());
        assert_eq!(cfg.bucket, want["bucket"].as_str().unwrap());
        assert_eq!(cfg.updates_table, want["updates_table"].as_str().unwrap());
        assert_eq!(cfg.region.as_deref(), want["region"].as_str());
        assert_eq!(cfg.endpoint, None, "real AWS: no endpoint override");
        assert!(!cfg.exit_on_complete);
        assert!(matches!(cfg.trainer, TrainerConfig::Builtin(_)));
        // The role and external id go into the AWS profile shown in the comments.
        for field in ["role_arn", "external_id"] {
            let line = format!("#   {field} = {}", want[field].as_str().unwrap());
            assert!(text.contains(&line), "{client}: no `{line}` in\n{text}");
        }
        assert!(text.contains(&format!("AWS_PROFILE=fedstep-{client}")));
        assert!(
            text.contains(&format!("of stack \"{stack}\"")),
            "{client}: stack {stack} not named in\n{text}"
        );
        // --stack with the deployment (main stack) name, or with the clients
        // stack itself, finds the same client.
        for name in ["Fedstep", stack.as_str()] {
            let again = client_config(&fixture(), &["--client", client, "--stack", name]);
            assert!(again.status.success(), "--stack {name}: {}", stderr(&again));
            assert_eq!(String::from_utf8(again.stdout).unwrap(), text);
        }
        stacks.push(stack);
    }
    // The fixture spreads the three clients over several clients stacks, so
    // the search across stacks is exercised.
    stacks.sort();
    stacks.dedup();
    assert!(stacks.len() > 1, "{stacks:?}");
    // --stack with another clients stack does not find the client.
    let (stack_a, _) = stack_config(&outputs, "ClientSiteAConfig");
    let (stack_b, _) = stack_config(&outputs, "ClientSiteBConfig");
    assert_ne!(stack_a, stack_b);
    let out = client_config(
        &fixture(),
        &["--client", "site-a", "--stack", stack_b.as_str()],
    );
    assert_eq!(out.status.code(), Some(1));
    let e = stderr(&out);
    assert!(e.contains("client `site-a`") && e.contains(&stack_b), "{e}");
}

#[test]
fn an_unknown_client_is_named_with_the_clients_there() {
    let out = client_config(&fixture(), &["--client", "site-z"]);
    assert_eq!(out.status.code(), Some(1));
    let e = stderr(&out);
    assert!(out.stdout.is_empty(), "nothing printed on error");
    assert!(e.contains("client `site-z`"), "{e}");
    assert!(e.contains("site-a, site-b, site-c"), "{e}");
    assert!(e.contains("Fedstep"), "{e}");
}

#[test]
fn a_missing_stack_file_or_field_is_named() {
    let dir = tempfile::tempdir().unwrap();

    let out = client_config(&fixture(), &["--client", "site-a", "--stack", "Other"]);
    assert_eq!(out.status.code(), Some(1));
    let e = stderr(&out);
    assert!(
        e.contains("stack `Other`") && e.contains("stacks there: Fedstep"),
        "{e}"
    );

    let missing = dir.path().join("nope.json");
    let out = client_config(&missing, &["--client", "site-a"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("nope.json"), "{}", stderr(&out));

    // The client's Config output without the bucket.
    let mut outputs = fixture_json();
    let (stack_a, mut cfg) = stack_config(&outputs, "ClientSiteAConfig");
    cfg.as_object_mut().unwrap().remove("bucket");
    outputs[&stack_a]["ClientSiteAConfig"] = Value::from(cfg.to_string());
    let file = dir.path().join("no-bucket.json");
    std::fs::write(&file, outputs.to_string()).unwrap();
    let out = client_config(&file, &["--client", "site-a"]);
    assert_eq!(out.status.code(), Some(1));
    let e = stderr(&out);
    assert!(
        e.contains("missing \"bucket\"") && e.contains("ClientSiteAConfig"),
        "{e}"
    );

    // Outputs of a stack without clients (or not a fedstep stack).
    let file = dir.path().join("no-clients.json");
    std::fs::write(&file, r#"{"Fedstep": {"Region": "eu-west-1"}}"#).unwrap();
    let out = client_config(&file, &["--client", "site-a"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("no stack with fedstep client outputs"),
        "{}",
        stderr(&out)
    );

    // Two deployments A and B (the fixture's stacks renamed) in one file:
    // --stack is required, and the deployment name selects its clients stacks.
    let one = fixture_json();
    let mut both = serde_json::Map::new();
    for deployment in ["A", "B"] {
        for (stack, o) in one.as_object().unwrap() {
            both.insert(stack.replacen("Fedstep", deployment, 1), o.clone());
        }
    }
    let (stack_b, _) = stack_config(&one, "ClientSiteBConfig");
    let (in_a, in_b) = (
        stack_b.replacen("Fedstep", "A", 1),
        stack_b.replacen("Fedstep", "B", 1),
    );
    let file = dir.path().join("two.json");
    std::fs::write(&file, Value::Object(both).to_string()).unwrap();
    let out = client_config(&file, &["--client", "site-b"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains(&format!("several fedstep stacks ({in_a}, {in_b})")),
        "{}",
        stderr(&out)
    );
    let out = client_config(&file, &["--client", "site-b", "--stack", "B"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains(&format!("of stack \"{in_b}\"")), "{text}");

    // Not JSON at all.
    let file = dir.path().join("garbage.json");
    std::fs::write(&file, "Outputs:\n  - nope").unwrap();
    let out = client_config(&file, &["--client", "site-a"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("is not JSON"), "{}", stderr(&out));
}
