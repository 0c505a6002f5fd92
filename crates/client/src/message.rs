//! Decoding a queue message. The body comes from outside (anyone who can
//! publish to the topic or send to the queue), so it is bounded, parsed
//! without trusting its shape, and checked against the key layout before
//! any of its fields is used as a key or a path.

use fedstep_cloud::records::{GlobalModelReady, JobFailed, Notification, TrainingComplete, SCHEMA};
use fedstep_cloud::{bounded, keys};
use serde_json::Value;

/// SQS's own maximum message size; anything larger was not sent by us.
pub const MAX_MESSAGE_BYTES: usize = 256 * 1024;

/// Rounds beyond this are not plausible and would make silly keys.
pub const MAX_ROUND: u32 = 1_000_000;

/// Why a body was not accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rejection {
    /// Can never become valid: log the reason and delete the message.
    Malformed(String),
    /// Written by a newer fedstep: an upgraded client can still use it, so
    /// it is left on the queue (the redrive policy ends the loop).
    NewerSchema(u32),
}

/// Parses and checks a message body. Accepts the notification itself (SNS
/// raw message delivery, which the deployments use) and, for robustness,
/// the SNS JSON envelope around it.
pub fn decode(body: &str) -> Result<Notification, Rejection> {
    let bad = |why: String| Rejection::Malformed(why);
    if body.len() > MAX_MESSAGE_BYTES {
        return Err(bad(format!(
            "message is {} bytes, more than the {MAX_MESSAGE_BYTES} allowed",
            body.len()
        )));
    }
    let mut value: Value = serde_json::from_str(body).map_err(|e| bad(format!("not JSON: {e}")))?;
    if let Some(inner) = sns_envelope_message(&value) {
        value = serde_json::from_str(inner)
            .map_err(|e| bad(format!("SNS envelope's Message is not JSON: {e}")))?;
    }
    // The schema is read before the typed parse so that a newer message
    // with new fields is reported as newer, not as garbage.
    let schema = match value.get("schema") {
        Some(Value::Number(n)) => n
            .as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .ok_or_else(|| bad(format!("schema {n} is not a small non-negative integer")))?,
        Some(other) => return Err(bad(format!("schema is {other}, not a number"))),
        None => return Err(bad("no schema field".into())),
    };
    if schema > SCHEMA {
        return Err(Rejection::NewerSchema(schema));
    }
    if schema != SCHEMA {
        return Err(bad(format!(
            "schema {schema} is not supported (expected {SCHEMA})"
        )));
    }
    let note: Notification =
        serde_json::from_value(value).map_err(|e| bad(format!("not a notification: {e}")))?;
    match &note {
        Notification::GlobalModelReady(m) => check_ready(m),
        Notification::TrainingComplete(m) => check_complete(m),
        Notification::JobFailed(m) => check_failed(m),
    }
    .map_err(bad)?;
    Ok(match note {
        // Text for the log: bounded and escaped here, once.
        Notification::JobFailed(m) => Notification::JobFailed(JobFailed {
            error: bounded::quote(&m.error),
            cause: bounded::failure(&m.cause),
            ..m
        }),
        other => other,
    })
}

fn sns_envelope_message(v: &Value) -> Option<&str> {
    if v.get("Type")?.as_str()? == "Notification" && v.get("TopicArn").is_some() {
        v.get("Message")?.as_str()
    } else {
        None
    }
}

fn check_round(round: u32) -> Result<(), String> {
    if (1..=MAX_ROUND).contains(&round) {
        Ok(())
    } else {
        Err(format!("round {round} is outside 1..={MAX_ROUND}"))
    }
}

fn check_ready(m: &GlobalModelReady) -> Result<(), String> {
    keys::check_id("job_id", &m.job_id)?;
    check_round(m.round)?;
    let want = keys::global_model(&m.job_id, m.round);
    if m.model_key != want {
        return Err(format!(
            "model_key `{}` is not this round's global model key `{want}`",
            m.model_key
        ));
    }
    if !is_sha256_hex(&m.checksum) {
        return Err(format!(
            "checksum `{}` is not a SHA-256 in lowercase hex",
            m.checksum
        ));
    }
    if m.deadline <= 0 {
        return Err(format!("deadline {} is not a Unix time", m.deadline));
    }
    if let Some(c) = &m.server_variate {
        let want = keys::server_variate(&m.job_id, m.round);
        if c.key != want {
            return Err(format!(
                "server_variate.key `{}` is not this round's server variate key `{want}`",
                c.key
            ));
        }
        if !is_sha256_hex(&c.checksum) {
            return Err(format!(
                "server_variate.checksum `{}` is not a SHA-256 in lowercase hex",
                c.checksum
            ));
        }
    }
    Ok(())
}

fn check_complete(m: &TrainingComplete) -> Result<(), String> {
    keys::check_id("job_id", &m.job_id)?;
    check_round(m.final_round)?;
    let prefix = format!("jobs/{}/", m.job_id);
    if !m.final_model_key.starts_with(&prefix) || m.final_model_key.contains("..") {
        return Err(format!(
            "final_model_key `{}` is not under `{prefix}`",
            m.final_model_key
        ));
    }
    if m.artifact_id.is_empty() || m.artifact_id.len() > 200 {
        return Err("artifact_id must be 1–200 characters".into());
    }
    Ok(())
}

fn check_failed(m: &JobFailed) -> Result<(), String> {
    keys::check_id("job_id", &m.job_id)?;
    check_round(m.round)
}

/// The checksum format rule lives with the checksums (fedstep-cloud);
/// re-exported for the decoder's property tests and fuzz target.
pub use fedstep_cloud::checksum::is_sha256_hex;

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn ready() -> Value {
        json!({"type": "global_model_ready", "schema": 1, "job_id": "j1", "round": 2,
               "model_key": "jobs/j1/rounds/2/global.safetensors",
               "checksum": "a".repeat(64), "deadline": 1_800_000_000_i64,
               "round_config": {"local_epochs": 1}})
    }

    fn malformed(v: &Value) -> String {
        match decode(&v.to_string()) {
            Err(Rejection::Malformed(why)) => why,
            other => panic!("expected malformed, got {other:?}"),
        }
    }

    #[test]
    fn accepts_raw_and_sns_enveloped_messages() {
        let Ok(Notification::GlobalModelReady(m)) = decode(&ready().to_string()) else {
            panic!()
        };
        assert_eq!((m.job_id.as_str(), m.round), ("j1", 2));
        let env = json!({"Type": "Notification", "TopicArn": "arn:aws:sns:x",
                         "Message": ready().to_string()});
        assert!(decode(&env.to_string()).is_ok());
        let done = json!({"type": "training_complete", "schema": 1, "job_id": "j1",
                          "final_round": 3, "final_model_key": "jobs/j1/rounds/4/global.safetensors",
                          "artifact_id": "j1:3"});
        assert!(matches!(
            decode(&done.to_string()),
            Ok(Notification::TrainingComplete(_))
        ));
    }

    #[test]
    fn rejections_say_why() {
        let mut v = ready();
        v["model_key"] = json!("jobs/other/rounds/2/global.safetensors");
        assert!(malformed(&v).contains("model_key"));
        let mut v = ready();
        v["job_id"] = json!("../etc");
        assert!(malformed(&v).contains("job_id"));
        let mut v = ready();
        v["checksum"] = json!("ABC");
        assert!(malformed(&v).contains("checksum"));
        let mut v = ready();
        v["round"] = json!(0);
        assert!(malformed(&v).contains("round 0"));
        let mut v = ready();
        v["round"] = json!(-1);
        assert!(malformed(&v).contains("not a notification"));
        let mut v = ready();
        v["type"] = json!("launch_missiles");
        assert!(malformed(&v).contains("not a notification"));
        let mut v = ready();
        v.as_object_mut().unwrap().remove("schema");
        assert!(malformed(&v).contains("schema"));
        assert!(matches!(decode("{not json"), Err(Rejection::Malformed(w)) if w.contains("JSON")));
        let big = format!("\"{}\"", "x".repeat(MAX_MESSAGE_BYTES));
        assert!(matches!(decode(&big), Err(Rejection::Malformed(w)) if w.contains("bytes")));
        let deep = "[".repeat(10_000);
        assert!(matches!(decode(&deep), Err(Rejection::Malformed(_))));
    }

    #[test]
    fn a_scaffold_rounds_server_variate_is_checked_like_the_model() {
        let mut v = ready();
        v["server_variate"] = json!({"key": "jobs/j1/rounds/2/scaffold_variate.safetensors",
                                     "checksum": "b".repeat(64)});
        let Ok(Notification::GlobalModelReady(m)) = decode(&v.to_string()) else {
            panic!()
        };
        assert_eq!(m.server_variate.unwrap().checksum, "b".repeat(64));
        let mut bad = v.clone();
        bad["server_variate"]["key"] = json!("jobs/j1/rounds/2/updates/x.safetensors");
        assert!(malformed(&bad).contains("server_variate.key"));
        let mut bad = v.clone();
        bad["server_variate"]["checksum"] = json!("B".repeat(64));
        assert!(malformed(&bad).contains("server_variate.checksum"));
    }

    #[test]
    fn newer_schema_is_not_malformed() {
        let mut v = ready();
        v["schema"] = json!(2);
        v["brand_new_field"] = json!(true);
        assert_eq!(decode(&v.to_string()), Err(Rejection::NewerSchema(2)));
    }
}
