//! CloudWatch metrics of each closed round, in the Embedded Metric Format:
//! one JSON line on stdout that CloudWatch Logs turns into metrics, so the
//! aggregator makes no PutMetricData call (no extra latency, no extra IAM,
//! nothing to retry). The CDK app's dashboard and alarms read these names.
//!
//! Format: <https://docs.aws.amazon.com/AmazonCloudWatch/latest/monitoring/CloudWatch_Embedded_Metric_Format_Specification.html>

use fedstep_cloud::RoundFigures;
use serde_json::{json, Map, Value};

/// The metrics' namespace (the dashboard and alarms in infra/ use it).
pub const NAMESPACE: &str = "Fedstep";

/// The one dimension: metrics are per job.
pub const DIMENSION: &str = "JobId";

/// The EMF object for one closed round, stamped `timestamp_ms` (ms since
/// the epoch). A non-finite stop metric is left out: EMF values are JSON
/// numbers.
pub fn round_line(figures: &RoundFigures, timestamp_ms: i64) -> Value {
    let mut metrics: Vec<(&str, &str, Value)> = vec![
        ("ClientsAccepted", "Count", json!(figures.clients_accepted)),
        ("ClientsRejected", "Count", json!(figures.clients_rejected)),
        (
            "AggregationSeconds",
            "Seconds",
            json!(figures.aggregation_seconds),
        ),
        ("BytesRead", "Bytes", json!(figures.bytes_read)),
        ("BytesWritten", "Bytes", json!(figures.bytes_written)),
        (
            "OpenToCloseSeconds",
            "Seconds",
            json!(figures.open_to_close_seconds),
        ),
    ];
    let mut root = Map::new();
    if let Some((name, value)) = &figures.stop_metric {
        if value.is_finite() {
            metrics.push(("StopMetric", "None", json!(value)));
            root.insert("StopMetricName".into(), json!(name));
        }
    }
    let definitions: Vec<Value> = metrics
        .iter()
        .map(|(name, unit, _)| json!({"Name": name, "Unit": unit}))
        .collect();
    root.insert(
        "_aws".into(),
        json!({
            "Timestamp": timestamp_ms,
            "CloudWatchMetrics": [{
                "Namespace": NAMESPACE,
                "Dimensions": [[DIMENSION]],
                "Metrics": definitions,
            }],
        }),
    );
    root.insert(DIMENSION.into(), json!(figures.job_id));
    root.insert("Round".into(), json!(figures.round));
    root.insert("ClosedBy".into(), json!(figures.closed_by));
    for (name, _, value) in metrics {
        root.insert(name.into(), value);
    }
    Value::Object(root)
}

/// Prints the round's EMF line to stdout (the tracing logs go to stderr).
pub fn print_round(figures: &RoundFigures) {
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
    println!("{}", round_line(figures, now_ms));
}

#[cfg(test)]
mod tests {
    use super::*;
    use fedstep_cloud::records::ClosedBy;

    fn figures(stop: Option<(&str, f64)>) -> RoundFigures {
        RoundFigures {
            job_id: "digits-001".into(),
            round: 3,
            closed_by: ClosedBy::Deadline,
            clients_accepted: 4,
            clients_rejected: 1,
            aggregation_seconds: 1.25,
            bytes_read: 1 << 30,
            bytes_written: 256 << 20,
            open_to_close_seconds: 610,
            stop_metric: stop.map(|(n, v)| (n.to_string(), v)),
        }
    }

    /// The specification's required keys and references, checked on the
    /// parsed line: `_aws.Timestamp` a number; each directive's `Namespace`
    /// a string, `Dimensions` arrays of root keys holding strings,
    /// `Metrics` definitions whose `Name` is a root key holding a number
    /// and whose `Unit` is one CloudWatch knows.
    fn assert_valid_emf(line: &str) -> Value {
        const UNITS: [&str; 4] = ["Count", "Seconds", "Bytes", "None"];
        let v: Value = serde_json::from_str(line).expect("one JSON object");
        let aws = &v["_aws"];
        assert!(aws["Timestamp"].as_i64().is_some_and(|t| t > 0), "{line}");
        let directives = aws["CloudWatchMetrics"].as_array().expect("directives");
        assert!(!directives.is_empty());
        for d in directives {
            let ns = d["Namespace"].as_str().expect("namespace");
            assert!((1..=255).contains(&ns.len()));
            for set in d["Dimensions"].as_array().expect("dimension sets") {
                let set = set.as_array().expect("a dimension set");
                assert!(!set.is_empty() && set.len() <= 30);
                for key in set {
                    let key = key.as_str().expect("dimension key");
                    assert!(v[key].is_string(), "dimension {key} is not a root string");
                }
            }
            let metrics = d["Metrics"].as_array().expect("metrics");
            assert!(!metrics.is_empty() && metrics.len() <= 100);
            for m in metrics {
                let name = m["Name"].as_str().expect("metric name");
                assert!(v[name].is_number(), "metric {name} is not a root number");
                let unit = m["Unit"].as_str().expect("unit");
                assert!(UNITS.contains(&unit), "unit {unit}");
            }
        }
        v
    }

    #[test]
    fn a_round_is_one_valid_emf_line() {
        let line = round_line(&figures(Some(("accuracy", 0.91))), 1_800_000_000_000).to_string();
        assert!(!line.contains('\n'));
        let v = assert_valid_emf(&line);
        assert_eq!(v["JobId"], "digits-001");
        assert_eq!(v["Round"], 3);
        assert_eq!(v["ClosedBy"], "deadline");
        assert_eq!(v["ClientsAccepted"], 4);
        assert_eq!(v["ClientsRejected"], 1);
        assert_eq!(v["BytesRead"], 1u64 << 30);
        assert_eq!(v["OpenToCloseSeconds"], 610);
        assert_eq!(v["StopMetric"], 0.91);
        assert_eq!(v["StopMetricName"], "accuracy");
        assert_eq!(v["_aws"]["Timestamp"], 1_800_000_000_000i64);
        let names: Vec<&str> = v["_aws"]["CloudWatchMetrics"][0]["Metrics"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["Name"].as_str().unwrap())
            .collect();
        assert_eq!(
            names,
            [
                "ClientsAccepted",
                "ClientsRejected",
                "AggregationSeconds",
                "BytesRead",
                "BytesWritten",
                "OpenToCloseSeconds",
                "StopMetric"
            ]
        );
    }

    #[test]
    fn no_stop_metric_without_a_finite_value() {
        for stop in [
            None,
            Some(("loss", f64::NAN)),
            Some(("loss", f64::INFINITY)),
        ] {
            let v = assert_valid_emf(&round_line(&figures(stop), 1).to_string());
            assert!(v.get("StopMetric").is_none() && v.get("StopMetricName").is_none());
            assert_eq!(
                v["_aws"]["CloudWatchMetrics"][0]["Metrics"]
                    .as_array()
                    .unwrap()
                    .len(),
                6
            );
        }
    }
}
