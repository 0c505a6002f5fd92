//! A round progress bar on stderr when it is a terminal; nothing otherwise
//! (CI logs and pipes get the table on stdout only).

use std::io::IsTerminal;

use indicatif::{ProgressBar, ProgressStyle};

pub struct RoundBar(Option<ProgressBar>);

impl RoundBar {
    pub fn new(rounds: u32) -> RoundBar {
        RoundBar(std::io::stderr().is_terminal().then(|| {
            let bar = ProgressBar::new(u64::from(rounds));
            if let Ok(style) = ProgressStyle::with_template(
                "{prefix} [{bar:30}] {pos}/{len} rounds {msg} ({elapsed})",
            ) {
                bar.set_style(style.progress_chars("=> "));
            }
            bar.set_prefix("simulate");
            bar
        }))
    }

    pub fn message(&self, msg: String) {
        if let Some(bar) = &self.0 {
            bar.set_message(msg);
        }
    }

    /// Prints a line to stdout without tearing the bar.
    pub fn println(&self, line: &str) {
        match &self.0 {
            Some(bar) => bar.suspend(|| println!("{line}")),
            None => println!("{line}"),
        }
    }

    pub fn inc(&self) {
        if let Some(bar) = &self.0 {
            bar.inc(1);
        }
    }

    pub fn finish(&self) {
        if let Some(bar) = &self.0 {
            bar.finish_and_clear();
        }
    }
}
