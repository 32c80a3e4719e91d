//! `strait-proxy await-ready`: waits until the local proxy answers `/ready` with 200. In the
//! classic sidecar mode it is the proxy container's `postStart` hook, which holds the
//! application's start until the proxy can carry its traffic.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

#[derive(Debug, Clone, clap::Args)]
pub struct AwaitConfig {
    /// The proxy's admin address.
    #[arg(long, env = "STRAIT_AWAIT_ADDR", default_value = "127.0.0.1:4191")]
    pub admin_addr: SocketAddr,
    /// Give up (exit 1) after this long.
    #[arg(long, default_value = "120s", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
}

/// One probe: is `/ready` answering 200?
fn is_ready(addr: SocketAddr) -> bool {
    let probe = || -> std::io::Result<bool> {
        let mut stream = TcpStream::connect_timeout(&addr, Duration::from_millis(500))?;
        stream.set_read_timeout(Some(Duration::from_secs(1)))?;
        stream.write_all(b"GET /ready HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")?;
        let mut head = [0u8; 12];
        stream.read_exact(&mut head)?;
        Ok(head.starts_with(b"HTTP/1.1 200"))
    };
    probe().unwrap_or(false)
}

/// Polls every 100 ms until ready or the timeout passes.
pub fn run(cfg: &AwaitConfig) -> Result<(), String> {
    let deadline = Instant::now() + cfg.timeout;
    loop {
        if is_ready(cfg.admin_addr) {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "the proxy at {} was not ready within {:?}",
                cfg.admin_addr, cfg.timeout
            ));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_for_a_200_and_gives_up_after_the_timeout() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let server = std::thread::spawn(move || {
            // First a 503, then a 200.
            for status in ["503 Service Unavailable", "200 OK"] {
                let (mut s, _) = listener.accept().expect("accept");
                let mut buf = [0u8; 256];
                let _ = s.read(&mut buf);
                let _ = write!(s, "HTTP/1.1 {status}\r\ncontent-length: 0\r\n\r\n");
            }
        });
        let cfg = AwaitConfig {
            admin_addr: addr,
            timeout: Duration::from_secs(10),
        };
        run(&cfg).expect("ready after a 503");
        server.join().expect("server");
        // Nothing listens there any more.
        let cfg = AwaitConfig {
            admin_addr: addr,
            timeout: Duration::from_millis(300),
        };
        assert!(run(&cfg).expect_err("timeout").contains("not ready"));
    }
}
