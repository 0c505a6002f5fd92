//! The emulator environment: endpoints, region and credentials as the
//! standard AWS_* variables, and whether the emulators answer at all.

use std::collections::BTreeMap;
use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

/// The AWS_* variables every process of a scenario gets.
pub type AwsEnv = BTreeMap<String, String>;

const VARS: &[&str] = &[
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_DYNAMODB",
    "AWS_ENDPOINT_URL_DYNAMODB_STREAMS",
];

pub fn in_ci() -> bool {
    std::env::var("CI")
        .is_ok_and(|v| matches!(v.to_ascii_lowercase().as_str(), "true" | "1" | "yes"))
}

/// Emulators not usable: under CI a failure, otherwise a message and `None`.
pub fn unavailable<T>(reason: &str) -> Option<T> {
    assert!(
        !in_ci(),
        "CI=true and the emulators are not usable: {reason}"
    );
    eprintln!("SKIPPED (emulators not usable; CI would fail): {reason}");
    None
}

/// The standard variables if AWS_ENDPOINT_URL is set (any AWS-compatible
/// endpoint, e.g. LocalStack in Docker), else what `scripts/emulators.sh
/// env` prints. Missing credentials become the emulators' test/test.
pub fn aws_env() -> Result<AwsEnv, String> {
    let mut env: AwsEnv = if std::env::var_os("AWS_ENDPOINT_URL").is_some() {
        VARS.iter()
            .filter_map(|k| std::env::var(k).ok().map(|v| (k.to_string(), v)))
            .collect()
    } else {
        let script = crate::repo_root().join("scripts/emulators.sh");
        let out = std::process::Command::new(&script)
            .arg("env")
            .output()
            .map_err(|e| format!("running {} env: {e}", script.display()))?;
        if !out.status.success() {
            return Err(format!(
                "{} env failed: {}",
                script.display(),
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.strip_prefix("export "))
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_string(), v.trim_matches('\'').to_string()))
            .collect()
    };
    if !env.contains_key("AWS_ENDPOINT_URL") {
        return Err("AWS_ENDPOINT_URL is not set and scripts/emulators.sh env gave none".into());
    }
    if !env.contains_key("AWS_ACCESS_KEY_ID") && std::env::var_os("AWS_PROFILE").is_none() {
        env.insert("AWS_ACCESS_KEY_ID".into(), "test".into());
        env.insert("AWS_SECRET_ACCESS_KEY".into(), "test".into());
    }
    if !env.contains_key("AWS_REGION") {
        let region = env
            .get("AWS_DEFAULT_REGION")
            .cloned()
            .unwrap_or_else(|| "us-east-1".into());
        env.insert("AWS_REGION".into(), region);
    }
    Ok(env)
}

/// The endpoint of DynamoDB (moto here), falling back to the default one.
pub fn dynamodb_endpoint(env: &AwsEnv) -> &str {
    env.get("AWS_ENDPOINT_URL_DYNAMODB")
        .unwrap_or(&env["AWS_ENDPOINT_URL"])
}

/// A TCP connection to every endpoint within 3 s, or why not.
pub fn reachable(env: &AwsEnv) -> Result<(), String> {
    for url in [env["AWS_ENDPOINT_URL"].as_str(), dynamodb_endpoint(env)] {
        let rest = url.split_once("://").map_or(url, |(_, r)| r);
        let authority = rest.split('/').next().unwrap_or(rest);
        let with_port = if authority.contains(':') {
            authority.to_string()
        } else if url.starts_with("https") {
            format!("{authority}:443")
        } else {
            format!("{authority}:80")
        };
        let addr = with_port
            .to_socket_addrs()
            .map_err(|e| format!("endpoint {url}: {e}"))?
            .next()
            .ok_or_else(|| format!("endpoint {url}: no address"))?;
        TcpStream::connect_timeout(&addr, Duration::from_secs(3)).map_err(|e| {
            format!("endpoint {url} does not answer ({e}); run scripts/emulators.sh up")
        })?;
    }
    Ok(())
}
