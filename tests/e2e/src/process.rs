//! A binary under test running as a child process, its stderr (the log) in
//! a file. Dropped while still running: SIGTERM, then SIGKILL after 10 s,
//! so a failed test leaves no process behind.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

pub struct Process {
    pub name: String,
    pub log: PathBuf,
    child: Child,
}

impl Process {
    /// Starts `cmd` with stdout and stderr appended to `log`.
    pub fn spawn(name: &str, mut cmd: Command, log: &Path) -> Process {
        let file = std::fs::File::create(log)
            .unwrap_or_else(|e| panic!("creating {}: {e}", log.display()));
        let child = cmd
            .stdin(Stdio::null())
            .stdout(file.try_clone().expect("dup the log file"))
            .stderr(file)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {name} ({cmd:?}): {e}"));
        Process {
            name: name.to_string(),
            log: log.to_path_buf(),
            child,
        }
    }

    pub fn id(&self) -> u32 {
        self.child.id()
    }

    pub fn try_status(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().expect("waitpid")
    }

    /// The exit status within `limit`, or `None` if still running.
    pub async fn wait_for_exit(&mut self, limit: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(s) = self.try_status() {
                return Some(s);
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Panics (showing the log's tail) unless the process exits 0 within
    /// `limit`: what a client with `exit_on_complete` does when its job ends.
    pub async fn expect_exit_zero(&mut self, limit: Duration) {
        let status = self.wait_for_exit(limit).await;
        assert!(
            status.is_some_and(|s| s.success()),
            "{} did not exit 0: {status:?}\n{}",
            self.name,
            self.log_tail(30)
        );
    }

    /// SIGTERM and the exit status (SIGKILL if it takes more than `limit`).
    pub async fn terminate(&mut self, limit: Duration) -> ExitStatus {
        if let Some(s) = self.try_status() {
            return s;
        }
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        match self.wait_for_exit(limit).await {
            Some(s) => s,
            None => {
                let _ = self.child.kill();
                self.child.wait().expect("waitpid after SIGKILL")
            }
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn log_tail(&self, lines: usize) -> String {
        format!(
            "--- {} ({}) last {lines} lines:\n{}",
            self.name,
            self.log.display(),
            crate::deployment::tail(&self.log, lines)
        )
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if self.try_status().is_some() {
            return;
        }
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if self.try_status().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
