//! The report page: one HTML file with the charts inlined as SVG, the
//! participation grid, the rejections with their reasons, the timings and
//! the job's configuration. No script, no network, no external style.
//! Every text that came from a client or the ledger is escaped.

use std::fmt::Write;

use anyhow::{Context, Result};
use fedstep_cloud::timefmt::rfc3339_utc;

use super::charts::Chart;
use super::{JobReport, Participation};

const STYLE: &str = "body{font-family:sans-serif;margin:2em;color:#222;max-width:1100px}\
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}\
th{background:#f4f4f4}td.c{text-align:center}td.l,th.l{text-align:left}\
.accepted{background:#dff0d8}.rejected{background:#f2dede}.late{background:#fcf8e3}\
.silent{background:#eee;color:#888}.received{background:#d9edf7}\
figure{margin:1.5em 0}figcaption{font-weight:bold;margin-bottom:.3em}\
pre{background:#f7f7f7;padding:1em;overflow:auto}";

/// HTML-escapes `s` (text and attribute values).
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

fn mark(p: Participation) -> (&'static str, &'static str) {
    match p {
        Participation::Accepted => ("accepted", "✓"),
        Participation::Rejected => ("rejected", "✗"),
        Participation::Late => ("late", "late"),
        Participation::Received => ("received", "in"),
        Participation::Silent => ("silent", "·"),
    }
}

pub fn page(report: &JobReport, charts: &[Chart]) -> Result<String> {
    let id = escape(&report.job_id);
    let mut h = String::new();
    writeln!(
        h,
        "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">\
         <title>fedstep job {id}</title><style>{STYLE}</style></head><body>"
    )?;
    writeln!(h, "<h1>Job <code>{id}</code></h1>")?;
    let last = report.rounds.last();
    writeln!(
        h,
        "<p>Execution: <b>{}</b>. Rounds recorded: <b>{}</b>{}. Clients: {}.</p>",
        escape(report.execution.as_deref().unwrap_or("unknown")),
        report.rounds.len(),
        last.map_or(String::new(), |r| format!(
            " (the last, round {}, is {}{})",
            r.round,
            escape(&r.status),
            match r.continue_training {
                Some(false) => "; the job stopped there",
                _ => "",
            }
        )),
        report.clients.len()
    )?;

    writeln!(h, "<h2>Charts</h2>")?;
    for c in charts {
        let svg = std::fs::read_to_string(&c.path)
            .with_context(|| format!("reading {}", c.path.display()))?;
        // Inline: drop an XML declaration if the backend wrote one.
        let svg = match svg.find("<svg") {
            Some(i) => &svg[i..],
            None => svg.as_str(),
        };
        writeln!(
            h,
            "<figure><figcaption>{}</figcaption>{svg}</figure>",
            escape(&c.title)
        )?;
    }

    writeln!(
        h,
        "<h2>Participation</h2><p>✓ accepted, ✗ rejected, late: arrived after the \
         round was claimed, in: counted (round not closed), · silent. Hover a cell \
         for the reason.</p><table><tr><th class=\"l\">client</th>"
    )?;
    for r in &report.rounds {
        write!(h, "<th>{}</th>", r.round)?;
    }
    writeln!(h, "</tr>")?;
    for client in &report.clients {
        write!(h, "<tr><th class=\"l\">{}</th>", escape(client))?;
        for r in &report.rounds {
            match r.clients.iter().find(|c| &c.client_id == client) {
                Some(c) => {
                    let (class, text) = mark(c.participation);
                    let title = c
                        .reason
                        .as_deref()
                        .map_or(String::new(), |why| format!(" title=\"{}\"", escape(why)));
                    write!(h, "<td class=\"c {class}\"{title}>{text}</td>")?;
                }
                None => write!(h, "<td class=\"c\">–</td>")?,
            }
        }
        writeln!(h, "</tr>")?;
    }
    writeln!(h, "</table>")?;

    let rejected: Vec<_> = report
        .rounds
        .iter()
        .flat_map(|r| r.clients.iter().map(move |c| (r.round, c)))
        .filter(|(_, c)| c.reason.is_some())
        .collect();
    if !rejected.is_empty() {
        writeln!(
            h,
            "<h2>Rejections</h2><table><tr><th>round</th><th class=\"l\">client</th>\
             <th class=\"l\">reason</th></tr>"
        )?;
        for (round, c) in rejected {
            writeln!(
                h,
                "<tr><td>{round}</td><td class=\"l\">{}</td><td class=\"l\">{}</td></tr>",
                escape(&c.client_id),
                escape(c.reason.as_deref().unwrap_or(""))
            )?;
        }
        writeln!(h, "</table>")?;
    }

    writeln!(
        h,
        "<h2>Rounds</h2><table><tr><th>round</th><th class=\"l\">status</th>\
         <th class=\"l\">closed by</th><th class=\"l\">opened (UTC)</th>\
         <th class=\"l\">last update (client clock)</th><th>aggregation s</th>\
         <th>MB read</th><th>MB written</th><th class=\"l\">failure</th></tr>"
    )?;
    for r in &report.rounds {
        let t = &r.timings;
        let mb = |b: Option<u64>| b.map_or("–".into(), |b| format!("{:.2}", b as f64 / 1e6));
        writeln!(
            h,
            "<tr><td>{}</td><td class=\"l\">{}</td><td class=\"l\">{}</td><td class=\"l\">{}</td>\
             <td class=\"l\">{}</td><td>{}</td><td>{}</td><td>{}</td><td class=\"l\">{}</td></tr>",
            r.round,
            escape(&r.status),
            r.closed_by
                .map_or("–".into(), |c| format!("{c:?}").to_lowercase()),
            rfc3339_utc(t.opened_at),
            escape(t.last_update_at.as_deref().unwrap_or("–")),
            t.aggregation_seconds
                .map_or("–".into(), |s| format!("{s:.3}")),
            mb(t.bytes_read),
            mb(t.bytes_written),
            escape(r.failure.as_deref().unwrap_or(""))
        )?;
    }
    writeln!(h, "</table>")?;

    writeln!(
        h,
        "<h2>Configuration</h2><pre>{}</pre>",
        escape(&serde_json::to_string_pretty(&report.job)?)
    )?;
    writeln!(
        h,
        "<p>Written by <code>fedstep job report</code>; the numbers are in \
         <code>report.json</code> beside this file.</p></body></html>"
    )?;
    Ok(h)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_text_cannot_open_markup() {
        assert_eq!(
            escape(r#"<script>alert("x")</script> & 'y'"#),
            "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp; &#39;y&#39;"
        );
    }
}
