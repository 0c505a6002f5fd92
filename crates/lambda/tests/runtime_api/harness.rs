//! The aggregator run the way Lambda runs it: the `fedstep-lambda` binary
//! with no arguments (the bootstrap), fed by a Lambda Runtime API, here
//! `cargo lambda watch --only-lambda-apis`, and invoked over HTTP at the
//! Invoke API's path. Nothing of the crate is linked into the test: what is
//! exercised is the process, its environment and the wire.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// How long one invocation may take before the test calls it hung.
const INVOKE_TIMEOUT: Duration = Duration::from_secs(120);

/// `cargo-lambda`: FEDSTEP_CARGO_LAMBDA (scripts/test.sh sets it from
/// infra/lambda-tools.sh), else the first one on PATH.
pub fn cargo_lambda() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("FEDSTEP_CARGO_LAMBDA") {
        return Some(PathBuf::from(p)).filter(|p| p.is_file());
    }
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|dir| dir.join("cargo-lambda"))
        .find(|p| p.is_file())
}

/// The binary under test: FEDSTEP_LAMBDA_BOOTSTRAP (e.g. the `bootstrap`
/// that `cargo lambda build` made for the deployment), else this build's.
pub fn bootstrap_binary() -> PathBuf {
    std::env::var_os("FEDSTEP_LAMBDA_BOOTSTRAP")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_fedstep-lambda")))
}

/// An answer of the Invoke API.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub body: Value,
}

/// A child process, killed when dropped, so that a failing test leaves
/// neither the Runtime API nor the bootstrap running.
struct Proc {
    child: Child,
    log: PathBuf,
}

impl Proc {
    fn spawn(mut cmd: Command, log: PathBuf) -> Proc {
        let out = std::fs::File::create(&log).unwrap();
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap_or_else(|e| panic!("start {cmd:?}: {e}"));
        Proc { child, log }
    }

    fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().unwrap()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub struct Runtime {
    // Declared first, dropped first: the function before its Runtime API.
    bootstrap: Proc,
    watch: Proc,
    port: u16,
    function: String,
}

impl Runtime {
    /// Starts the Runtime API, then the bootstrap with `env` on top of the
    /// variables the Runtime API says a function needs. The bootstrap gets
    /// no other environment (no HOME, no AWS profile): as in Lambda.
    pub fn start(cargo_lambda: &Path, env: &[(String, String)], dir: &Path) -> Runtime {
        let port = free_port();
        let mut cmd = Command::new(cargo_lambda);
        cmd.args(["lambda", "watch", "--only-lambda-apis"])
            .args(["--invoke-address", "127.0.0.1"])
            .args(["--invoke-port", &port.to_string()])
            // It reads the package with `cargo metadata` (the crate's dir).
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .env("NO_COLOR", "1")
            .env("CARGO_TERM_COLOR", "never");
        let mut watch = Proc::spawn(cmd, dir.join("cargo-lambda-watch.log"));
        let lambda_env = wait_for_watch(&mut watch, port);
        let function = lambda_env
            .iter()
            .find(|(k, _)| k == "AWS_LAMBDA_FUNCTION_NAME")
            .map(|(_, v)| v.clone())
            .expect("cargo lambda watch names no AWS_LAMBDA_FUNCTION_NAME");
        let mut cmd = Command::new(bootstrap_binary());
        cmd.env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .envs(lambda_env.iter().map(|(k, v)| (k, v)))
            .envs(env.iter().map(|(k, v)| (k, v)));
        let bootstrap = Proc::spawn(cmd, dir.join("bootstrap.log"));
        Runtime {
            bootstrap,
            watch,
            port,
            function,
        }
    }

    /// One synchronous invocation (`POST /2015-03-31/functions/{name}/invocations`).
    pub fn invoke(&mut self, event: &Value) -> Answer {
        if let Some(status) = self.bootstrap.exited() {
            panic!("the bootstrap exited ({status}):\n{}", self.logs());
        }
        let body = event.to_string();
        let request = format!(
            "POST /2015-03-31/functions/{}/invocations HTTP/1.1\r\nHost: 127.0.0.1:{}\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            self.function,
            self.port,
            body.len()
        );
        let mut stream = TcpStream::connect(("127.0.0.1", self.port)).unwrap();
        stream.set_read_timeout(Some(INVOKE_TIMEOUT)).unwrap();
        stream.write_all(request.as_bytes()).unwrap();
        let mut raw = Vec::new();
        if let Err(e) = stream.read_to_end(&mut raw) {
            panic!("invocation unanswered ({e}):\n{}", self.logs());
        }
        let (status, body) = parse_response(&raw)
            .unwrap_or_else(|| panic!("not an HTTP answer: {}", String::from_utf8_lossy(&raw)));
        let body = serde_json::from_slice(&body).unwrap_or_else(|e| {
            panic!(
                "answer body is not JSON ({e}): {}\n{}",
                String::from_utf8_lossy(&body),
                self.logs()
            )
        });
        Answer { status, body }
    }

    /// The last lines of both processes' output, for failure messages.
    pub fn logs(&self) -> String {
        let tail = |text: String| {
            let lines: Vec<&str> = text.lines().collect();
            lines[lines.len().saturating_sub(30)..].join("\n")
        };
        format!(
            "--- bootstrap:\n{}\n--- cargo lambda watch:\n{}",
            tail(self.bootstrap.log()),
            tail(self.watch.log())
        )
    }
}

/// Waits until `cargo lambda watch` serves, and returns the variables it
/// prints for the function ("you MUST set these variables"), so the test
/// follows the tool instead of hard-coding its paths.
fn wait_for_watch(watch: &mut Proc, port: u16) -> Vec<(String, String)> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let log = watch.log();
        if log.contains("starting Runtime server") {
            let vars: Vec<(String, String)> = log
                .lines()
                .filter_map(|line| {
                    let at = line.find("AWS_LAMBDA_")?;
                    let (k, v) = line[at..].trim().split_once('=')?;
                    Some((k.to_string(), v.to_string()))
                })
                .collect();
            assert!(
                vars.iter().any(|(k, _)| k == "AWS_LAMBDA_RUNTIME_API"),
                "cargo lambda watch printed no AWS_LAMBDA_RUNTIME_API:\n{log}"
            );
            if TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return vars;
            }
        }
        if let Some(status) = watch.exited() {
            panic!("cargo lambda watch exited ({status}):\n{log}");
        }
        assert!(
            Instant::now() < deadline,
            "cargo lambda watch not serving after 60 s:\n{log}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Status and body of an HTTP/1.1 response read to its end (the request
/// said `Connection: close`); a chunked body is put back together.
pub fn parse_response(raw: &[u8]) -> Option<(u16, Vec<u8>)> {
    let end = raw.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = std::str::from_utf8(&raw[..end]).ok()?;
    let status = head.split_whitespace().nth(1)?.parse().ok()?;
    let body = &raw[end + 4..];
    let chunked = head.lines().any(|l| {
        let l = l.to_ascii_lowercase();
        l.starts_with("transfer-encoding:") && l.contains("chunked")
    });
    if !chunked {
        return Some((status, body.to_vec()));
    }
    let (mut out, mut rest) = (Vec::new(), body);
    loop {
        let eol = rest.windows(2).position(|w| w == b"\r\n")?;
        let size_text = std::str::from_utf8(&rest[..eol]).ok()?;
        let size = usize::from_str_radix(size_text.split(';').next()?.trim(), 16).ok()?;
        rest = &rest[eol + 2..];
        if size == 0 {
            return Some((status, out));
        }
        out.extend_from_slice(rest.get(..size)?);
        rest = rest.get(size + 2..)?;
    }
}
