//! The round's metrics: each numeric client metric averaged over the
//! accepted clients with their aggregation weights (so the number matches
//! how much each client shaped the model), plus client counts.

use std::collections::BTreeMap;

use fedstep_core::measurements::{ClientStatus, Measurements};

use crate::records::UpdateRecord;

pub(super) fn round_metrics(
    m: &Measurements,
    rows: &BTreeMap<String, UpdateRecord>,
    rejected: usize,
) -> BTreeMap<String, f64> {
    let mut sums: BTreeMap<String, (f64, f64)> = BTreeMap::new();
    for c in m
        .clients
        .iter()
        .filter(|c| c.status == ClientStatus::Accepted)
    {
        let (Some(w), Some(row)) = (c.weight, rows.get(&c.client_id)) else {
            continue;
        };
        for (name, v) in &row.metrics {
            // Non-numeric or non-finite claims are skipped, not fatal.
            if let Some(x) = v.as_f64().filter(|x| x.is_finite()) {
                let e = sums.entry(name.clone()).or_default();
                e.0 += w * x;
                e.1 += w;
            }
        }
    }
    let mut out: BTreeMap<String, f64> = sums
        .into_iter()
        .filter(|(_, (_, w))| *w > 0.0)
        .map(|(k, (s, w))| (k, s / w))
        .collect();
    out.insert("clients_accepted".into(), m.accepted as f64);
    out.insert("clients_rejected".into(), rejected as f64);
    out
}
