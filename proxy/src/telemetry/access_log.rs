//! The access log: one JSON line per request on stdout (the proxy's own logs go to stderr).
//! A thread of its own writes the lines, so a slow reader of stdout never stalls a request;
//! lines beyond a bounded queue are dropped and counted.

use std::io::Write;
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::Arc;

use serde::Serialize;

use crate::metrics::Metrics;

/// Lines waiting for the writer at most.
const QUEUE: usize = 8192;

/// One request, as logged.
#[derive(Debug, Serialize)]
pub struct Entry<'a> {
    /// Start of the request, RFC 3339 UTC.
    pub timestamp: String,
    pub direction: &'static str,
    pub client_id: &'a str,
    pub server_id: &'a str,
    pub method: &'a str,
    pub authority: &'a str,
    pub path: &'a str,
    pub protocol: &'a str,
    pub status: u16,
    pub grpc_status: Option<u16>,
    /// `success` or `failure`, as the metrics classify it.
    pub classification: &'static str,
    /// Why the proxy answered itself (`""`: the upstream answered).
    pub error: &'a str,
    pub route: &'a str,
    pub backend: &'a str,
    pub tls: bool,
    /// From the request to the end of the response body, in microseconds.
    pub duration_us: u64,
    /// The client's address (`ip:port`).
    pub peer: &'a str,
    /// Where the request went: the endpoint (outbound) or the application (inbound); empty when
    /// the proxy answered itself.
    pub upstream: &'a str,
    /// The request's `x-request-id` (given one by the first proxy when it had none).
    pub request_id: &'a str,
    /// The request's `Content-Length`, when it had one.
    pub request_bytes: Option<u64>,
    /// Response body bytes sent.
    pub response_bytes: u64,
    pub user_agent: &'a str,
    /// Empty when the request was not traced.
    pub trace_id: &'a str,
    pub span_id: &'a str,
}

/// Sends lines to the writer thread.
#[derive(Debug, Clone)]
pub struct AccessLog {
    lines: SyncSender<String>,
    metrics: Arc<Metrics>,
}

impl AccessLog {
    /// An access log on stdout.
    pub fn stdout(metrics: Arc<Metrics>) -> std::io::Result<Self> {
        Self::to(std::io::stdout, metrics)
    }

    /// An access log written to what `out` opens (locked per batch of lines).
    pub fn to<W, F>(out: F, metrics: Arc<Metrics>) -> std::io::Result<Self>
    where
        W: Write,
        F: FnMut() -> W + Send + 'static,
    {
        let (lines, rx) = sync_channel(QUEUE);
        std::thread::Builder::new()
            .name("access-log".into())
            .spawn(move || write_lines(rx, out))?;
        Ok(Self { lines, metrics })
    }

    pub fn log(&self, entry: &Entry<'_>) {
        let Ok(mut line) = serde_json::to_string(entry) else {
            return;
        };
        line.push('\n');
        if self.lines.try_send(line).is_err() {
            self.metrics.access_log_dropped.inc();
        }
    }
}

fn write_lines<W: Write, F: FnMut() -> W>(rx: Receiver<String>, mut out: F) {
    while let Ok(line) = rx.recv() {
        let mut w = out();
        let mut result = w.write_all(line.as_bytes());
        while let Ok(more) = rx.try_recv() {
            result = result.and_then(|()| w.write_all(more.as_bytes()));
        }
        if result.and_then(|()| w.flush()).is_err() {
            // stdout is gone (closed pipe): nothing to log to; keep draining so senders never block.
            continue;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);

    impl Write for Sink {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().expect("lock").extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn entries_are_json_lines() {
        let sink = Sink::default();
        let out = sink.clone();
        let log = AccessLog::to(move || out.clone(), Arc::new(Metrics::new())).expect("thread");
        let entry = Entry {
            timestamp: "2026-11-22T10:00:00.000Z".into(),
            direction: "inbound",
            client_id: "spiffe://cluster.local/ns/a/sa/client",
            server_id: "spiffe://cluster.local/ns/default/sa/web",
            method: "GET",
            authority: "web:80",
            path: "/a \"quoted\" path",
            protocol: "HTTP/1.1",
            status: 200,
            grpc_status: None,
            classification: "success",
            error: "",
            route: "",
            backend: "",
            tls: true,
            duration_us: 1500,
            peer: "10.0.0.1:40000",
            upstream: "10.0.0.2:8080",
            request_id: "id-1",
            request_bytes: None,
            response_bytes: 17,
            user_agent: "curl/8",
            trace_id: "4bf92f3577b34da6a3ce929d0e0e4736",
            span_id: "00f067aa0ba902b7",
        };
        log.log(&entry);
        log.log(&Entry {
            status: 503,
            ..entry
        });
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        let text = loop {
            let text = String::from_utf8(sink.0.lock().expect("lock").clone()).expect("utf8");
            if text.lines().count() == 2 || std::time::Instant::now() > deadline {
                break text;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        };
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).expect("a JSON object per line"))
            .collect();
        assert_eq!(lines.len(), 2, "{text}");
        assert_eq!(lines[0]["path"], "/a \"quoted\" path");
        assert_eq!(
            lines[0]["client_id"],
            "spiffe://cluster.local/ns/a/sa/client"
        );
        assert_eq!(lines[0]["request_bytes"], serde_json::Value::Null);
        assert_eq!(lines[1]["status"], 503);
    }
}
