//! What `fedstep simulate` prints: the clients, a per-round table and the
//! final comparison.

use super::classes::format_group;
use super::data::SimData;
use super::report::{Final, RoundReport};

pub fn clients(data: &SimData) -> String {
    let mut out = format!(
        "{}: {} training / {} test samples, {} clients\n",
        data.name,
        data.train.len(),
        data.test.len(),
        data.clients.len()
    );
    for c in &data.clients {
        let role = match (c.noisy, c.byzantine) {
            (true, _) => "  [noisy: shuffled labels]",
            (_, true) => "  [byzantine: sign-flipped, scaled updates]",
            _ => "",
        };
        out += &format!(
            "  {:<9} classes {:<11} {:>5} train + {:>4} validation samples{role}\n",
            c.id,
            format_group(&c.spec.classes),
            c.train.len(),
            c.validation.len(),
        );
    }
    out
}

pub fn header() -> String {
    format!(
        "{:>5}  {:>9}  {:>7}  {:>8}  {:>8}  {:>7}",
        "round", "fed. acc", "loss", "accepted", "rejected", "seconds"
    )
}

pub fn row(r: &RoundReport) -> String {
    let mut line = format!(
        "{:>5}  {:>9.4}  {:>7.4}  {:>8}  {:>8}  {:>7.2}",
        r.round,
        r.accuracy,
        r.loss,
        r.accepted.len(),
        r.rejected.len(),
        r.seconds
    );
    for (client, reason) in &r.rejected {
        line += &format!("\n       rejected {client}: {reason}");
    }
    line
}

pub fn summary(f: &Final, clients: usize, aggregation: &str) -> String {
    format!(
        "test accuracy after {} rounds:\n  \
         federated ({clients} clients, {aggregation}) {:.4}  ({:.2} x centralized)\n  \
         single agent (agent-1 alone)   {:.4}  ({:.2} x centralized)\n  \
         centralized (all data)         {:.4}\n\
         wall time {:.1} s",
        f.rounds_run,
        f.federated_accuracy,
        f.federated_vs_centralized,
        f.single_agent_accuracy,
        f.single_agent_vs_centralized,
        f.centralized_accuracy,
        f.seconds
    )
}
