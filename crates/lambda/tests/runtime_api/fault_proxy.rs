//! An infrastructure failure on demand: an HTTP proxy in front of the
//! DynamoDB emulator that answers 500 InternalServerError to every request
//! whose body names a poisoned string (a job id), and forwards the rest.
//! So one record of a stream batch meets a failing DynamoDB while the
//! records around it do not: the case `batchItemFailures` exists for.
//!
//! One request per connection (answered with `Connection: close`): the SDK
//! reconnects, and the proxy needs no HTTP keep-alive bookkeeping.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

#[derive(Default)]
struct State {
    poison: Mutex<Option<String>>,
    injected: AtomicUsize,
}

pub struct FaultProxy {
    port: u16,
    state: Arc<State>,
}

impl FaultProxy {
    /// Listens on a free loopback port and forwards to `upstream`
    /// (`host:port`). The accept thread lives as long as the test process.
    pub fn start(upstream: String) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let state = Arc::new(State::default());
        let shared = Arc::clone(&state);
        std::thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                let (state, upstream) = (Arc::clone(&shared), upstream.clone());
                std::thread::spawn(move || {
                    let _ = serve(conn, &upstream, &state);
                });
            }
        });
        FaultProxy { port, state }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// From now on, fail every request whose body contains `needle`
    /// (`None`: fail nothing).
    pub fn poison(&self, needle: Option<&str>) {
        *self.state.poison.lock().unwrap() = needle.map(str::to_string);
    }

    /// How many requests were failed so far.
    pub fn injected(&self) -> usize {
        self.state.injected.load(Ordering::SeqCst)
    }
}

fn serve(mut client: TcpStream, upstream: &str, state: &State) -> std::io::Result<()> {
    client.set_read_timeout(Some(Duration::from_secs(30)))?;
    let Some((head, body)) = read_request(&mut client)? else {
        return Ok(());
    };
    let poisoned = state
        .poison
        .lock()
        .unwrap()
        .as_deref()
        .is_some_and(|needle| contains(&body, needle.as_bytes()));
    if poisoned {
        state.injected.fetch_add(1, Ordering::SeqCst);
        let error = r#"{"__type":"com.amazonaws.dynamodb.v20120810#InternalServerError","message":"injected by the test's fault proxy"}"#;
        let answer = format!(
            "HTTP/1.1 500 Internal Server Error\r\nContent-Type: application/x-amz-json-1.0\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n{error}",
            error.len()
        );
        return client.write_all(answer.as_bytes());
    }
    let mut up = TcpStream::connect(upstream)?;
    up.set_read_timeout(Some(Duration::from_secs(30)))?;
    up.write_all(&with_connection_close(&head))?;
    up.write_all(&body)?;
    let mut answer = Vec::new();
    up.read_to_end(&mut answer)?;
    let end = answer
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map_or(answer.len(), |i| i + 4);
    client.write_all(&with_connection_close(&answer[..end]))?;
    client.write_all(&answer[end..])
}

/// The request head (through the blank line) and its Content-Length body.
fn read_request(conn: &mut TcpStream) -> std::io::Result<Option<(Vec<u8>, Vec<u8>)>> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let n = conn.read(&mut chunk)?;
        if n == 0 {
            return Ok(None);
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
    let length = head
        .lines()
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.trim().parse::<usize>().ok())
        .unwrap_or(0);
    let mut body = buf[head_end..].to_vec();
    while body.len() < length {
        let n = conn.read(&mut chunk)?;
        if n == 0 {
            break;
        }
        body.extend_from_slice(&chunk[..n]);
    }
    Ok(Some((buf[..head_end].to_vec(), body)))
}

/// A message head with its Connection header replaced by `close`.
fn with_connection_close(head: &[u8]) -> Vec<u8> {
    let text = String::from_utf8_lossy(head);
    let mut lines: Vec<&str> = text
        .trim_end_matches("\r\n")
        .split("\r\n")
        .filter(|l| {
            !l.split_once(':')
                .is_some_and(|(k, _)| k.trim().eq_ignore_ascii_case("connection"))
        })
        .collect();
    lines.push("Connection: close");
    format!("{}\r\n\r\n", lines.join("\r\n")).into_bytes()
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}
