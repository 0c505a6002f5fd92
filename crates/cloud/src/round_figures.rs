//! What one closed round took and gave, in a few numbers an operator
//! graphs and alarms on (the Lambda prints them as CloudWatch metrics).
//! Only operator-chosen names appear here: a client's metric names are
//! untrusted and unbounded in number, so of the reported metrics only the
//! job's stop metric is carried.

use crate::records::ClosedBy;

#[derive(Debug, Clone, PartialEq)]
pub struct RoundFigures {
    pub job_id: String,
    pub round: u32,
    pub closed_by: ClosedBy,
    pub clients_accepted: usize,
    pub clients_rejected: usize,
    /// The numeric core's own clock over the aggregation (all passes).
    pub aggregation_seconds: f64,
    pub bytes_read: u64,
    pub bytes_written: u64,
    /// From StartRound opening the round to the engine closing it.
    pub open_to_close_seconds: i64,
    /// The job's stop metric (name, value) as this round measured it; none
    /// without a stop rule, or when no accepted client reported it.
    pub stop_metric: Option<(String, f64)>,
}
