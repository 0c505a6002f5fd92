//! Issue #13: the stream delivers a row once, when it is written; a client
//! may rewrite its own row afterwards (PutItem on its own rows), and the
//! rewrite is never delivered. The aggregation re-reads each row and runs
//! the counting rules on it again, then checks the object against the
//! re-read row (size, checksum) and the claims in the core (weighting), so
//! a rewrite can claim nothing a first row could not have claimed: here,
//! each rewrite that breaks a rule rejects its client and the round closes
//! with the others.

use fedstep_cloud::ports::Ledger;
use fedstep_cloud::records::{ClosedBy, RoundStatus, UpdateRecord};
use fedstep_test_support::federation::*;

/// The rule a rewrite breaks, and the rewrite.
type Rewrite = (&'static str, fn(&mut UpdateRecord));

#[tokio::test]
async fn a_row_rewritten_after_it_was_counted_is_checked_again() {
    let rewrites: [Rewrite; 4] = [
        ("model_key", |r| {
            r.model_key = r.model_key.replace("/a.", "/b.")
        }),
        ("checksum", |r| r.checksum = "0".repeat(64)),
        ("bytes", |r| r.bytes += 1),
        ("num_examples", |r| r.num_examples = serde_json::json!(-5)),
    ];
    for (i, (rule, rewrite)) in rewrites.into_iter().enumerate() {
        let fed = Fed::new();
        let engine = fed.engine("agg");
        let j = job(&format!("rw{i}"), 1, &["a", "b", "c"], 2);
        fed.upload_initial(&j, &[0.0]).await;
        engine.start_round(&j, 1, "t").await.unwrap();

        let a = fed.submit(&j, 1, "a", &[9.0], 1, &[]).await;
        engine.on_update(&a).await.unwrap();
        let mut rewritten = a.clone();
        rewrite(&mut rewritten);
        fed.ledger.put_update_raw(rewritten);

        for (c, v) in [("b", 1.0), ("c", 3.0)] {
            let row = fed.submit(&j, 1, c, &[v], 1, &[]).await;
            engine.on_update(&row).await.unwrap();
        }
        engine
            .close_round(&j.job_id, 1, ClosedBy::Stream)
            .await
            .unwrap();
        let item = fed.ledger.get_round(&j.job_id, 1).await.unwrap().unwrap();
        assert_eq!(item.status, RoundStatus::Closed, "{rule}: {item:?}");
        let result = item.result.unwrap();
        assert_eq!(result.accepted, vec!["b", "c"], "{rule}");
        let reason = &result.rejected["a"];
        assert!(reason.contains(rule), "{rule}: {reason}");
    }
}
