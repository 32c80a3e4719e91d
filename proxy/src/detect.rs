//! Protocol detection: read the first bytes of a connection and decide HTTP/2 (prior-knowledge
//! preface), HTTP/1 (a request line) or opaque TCP, as early as the bytes allow.
//!
//! Client-first non-HTTP protocols are recognised on their first bytes, not after a timeout. A
//! client that sends nothing is handled by [`crate::first_bytes`] (a server may be speaking
//! first). A client whose bytes so far can still be an HTTP request line (or a TLS ClientHello)
//! is slow, not opaque: it keeps being read up to the header-read timeout, and a client that
//! has not finished by then is cut (slowloris).

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt};

/// What a connection speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Http1,
    Http2,
    /// A complete TLS ClientHello record is in the prefix.
    Tls,
    Opaque,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Http1 => "http/1",
            Protocol::Http2 => "h2",
            Protocol::Tls => "tls",
            Protocol::Opaque => "tcp",
        }
    }
}

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// Longest method token accepted (the longest registered method is 17 bytes).
const MAX_METHOD: usize = 24;
/// Past this many bytes a plausible request line is called HTTP/1; hyper then answers 414.
pub const MAX_PEEK: usize = 8 * 1024;

/// How detection ended.
#[derive(Debug)]
pub struct Detected {
    pub protocol: Protocol,
    /// The bytes read so far, to replay before the rest of the stream.
    pub prefix: Bytes,
    /// True when the protocol was decided by the timeout (nothing conclusive arrived).
    pub timed_out: bool,
}

/// Reads from `io` until the protocol is known, the peer closes, or a timeout passes: `timeout`
/// for a client that has sent nothing (then it is opaque TCP), `header_timeout` for one whose
/// bytes are still a plausible request (then it is cut, with a `TimedOut` error).
pub async fn detect<T: AsyncRead + Unpin>(
    io: &mut T,
    timeout: Duration,
    header_timeout: Duration,
) -> std::io::Result<Detected> {
    let mut buf = BytesMut::with_capacity(1024);
    let (protocol, timed_out) = detect_into(io, &mut buf, timeout, header_timeout).await?;
    Ok(Detected {
        protocol,
        prefix: buf.freeze(),
        timed_out,
    })
}

/// [`detect`] into a buffer of the caller's, which may already hold bytes: a call that is
/// dropped part-way loses nothing, and a later call goes on from what was read. Returns the
/// protocol and whether it was decided by the timeout (nothing arrived).
pub async fn detect_into<T: AsyncRead + Unpin>(
    io: &mut T,
    buf: &mut BytesMut,
    timeout: Duration,
    header_timeout: Duration,
) -> std::io::Result<(Protocol, bool)> {
    if let Some(protocol) = classify(buf) {
        return Ok((protocol, false));
    }
    let start = tokio::time::Instant::now();
    loop {
        let deadline = start
            + if buf.is_empty() {
                timeout
            } else {
                timeout.max(header_timeout)
            };
        if buf.capacity() == buf.len() {
            buf.reserve(buf.len().max(1024));
        }
        match tokio::time::timeout_at(deadline, io.read_buf(buf)).await {
            Err(_elapsed) if buf.is_empty() => return Ok((Protocol::Opaque, true)),
            Err(_elapsed) => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!(
                        "the request's first line was not complete within the header-read timeout of {:?} ({} bytes); closed",
                        timeout.max(header_timeout),
                        buf.len()
                    ),
                ))
            }
            Ok(Err(e)) => return Err(e),
            // EOF: whatever arrived can only be forwarded as is.
            Ok(Ok(0)) => return Ok((classify(buf).unwrap_or(Protocol::Opaque), false)),
            Ok(Ok(_)) => {
                if let Some(protocol) = classify(buf) {
                    return Ok((protocol, false));
                }
            }
        }
    }
}

/// Decides from the bytes so far; `None` when more bytes are needed.
pub fn classify(buf: &[u8]) -> Option<Protocol> {
    if buf.is_empty() {
        return None;
    }
    // TLS: handshake record (0x16), version 3.x; wait for the whole first record (the
    // ClientHello), so its SNI can be read.
    if buf[0] == 0x16 {
        if buf.len() < 5 {
            return if buf.len() < 2 || buf[1] == 0x03 {
                None
            } else {
                Some(Protocol::Opaque)
            };
        }
        if buf[1] != 0x03 {
            return Some(Protocol::Opaque);
        }
        let record = 5 + usize::from(u16::from_be_bytes([buf[3], buf[4]]));
        return if buf.len() >= record {
            Some(Protocol::Tls)
        } else {
            None
        };
    }
    let n = buf.len().min(H2_PREFACE.len());
    if buf[..n] == H2_PREFACE[..n] {
        return if buf.len() >= H2_PREFACE.len() {
            Some(Protocol::Http2)
        } else {
            None
        };
    }
    classify_http1(buf)
}

fn is_token(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// `method SP request-target SP HTTP/1.x CRLF` (RFC 9112 section 3), checked byte by byte.
fn classify_http1(buf: &[u8]) -> Option<Protocol> {
    let opaque = Some(Protocol::Opaque);
    // method
    let method_len = buf.iter().take_while(|b| is_token(**b)).count();
    if method_len == 0 || method_len > MAX_METHOD {
        return opaque;
    }
    let &after_method = buf.get(method_len)?;
    if after_method != b' ' {
        return opaque;
    }
    // request-target: visible ASCII
    let rest = &buf[method_len + 1..];
    let target_len = rest
        .iter()
        .take_while(|b| (0x21..=0x7e).contains(*b))
        .count();
    let Some(&after_target) = rest.get(target_len) else {
        return if buf.len() >= MAX_PEEK {
            Some(Protocol::Http1)
        } else {
            None
        };
    };
    if target_len == 0 || after_target != b' ' {
        return opaque;
    }
    // version and line end
    let version = &rest[target_len + 1..];
    const V: &[u8] = b"HTTP/1.";
    let n = version.len().min(V.len());
    if version[..n] != V[..n] {
        return opaque;
    }
    if version.len() < V.len() + 1 {
        return None;
    }
    if !version[V.len()].is_ascii_digit() {
        return opaque;
    }
    match version.get(V.len() + 1) {
        None => None,
        Some(b'\r' | b'\n') => Some(Protocol::Http1),
        Some(_) => opaque,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_complete_prefixes() {
        assert_eq!(classify(H2_PREFACE), Some(Protocol::Http2));
        assert_eq!(
            classify(b"GET / HTTP/1.1\r\nHost: x\r\n"),
            Some(Protocol::Http1)
        );
        assert_eq!(classify(b"M-SEARCH * HTTP/1.1\r\n"), Some(Protocol::Http1));
        assert_eq!(
            classify(b"\x16\x03\x01\x00\x02ab"),
            Some(Protocol::Tls),
            "a whole TLS record"
        );
        assert_eq!(
            classify(b"\x16\x03\x01\x02\x00"),
            None,
            "a TLS record still arriving"
        );
        assert_eq!(classify(b"\x16\x01"), Some(Protocol::Opaque));
        assert_eq!(classify(b"PING\r\n"), Some(Protocol::Opaque));
        assert_eq!(classify(b"hello world\n"), Some(Protocol::Opaque));
        assert_eq!(classify(b"GET / HTTP/2.0\r\n"), Some(Protocol::Opaque));
        assert_eq!(
            classify(b"*3\r\n$3\r\nSET\r\n"),
            Some(Protocol::Opaque),
            "redis"
        );
    }

    #[test]
    fn waits_for_more_only_while_the_bytes_could_still_be_http() {
        for partial in [
            &b"G"[..],
            b"GET",
            b"GET /",
            b"GET /x HTTP",
            b"GET / HTTP/1.1",
            b"PRI * HTTP/2.0\r\n",
        ] {
            assert_eq!(
                classify(partial),
                None,
                "{:?}",
                String::from_utf8_lossy(partial)
            );
        }
    }

    #[tokio::test]
    async fn detection_decides_on_first_bytes_and_times_out_on_silence() {
        let (mut client, mut server) = tokio::io::duplex(1024);
        tokio::io::AsyncWriteExt::write_all(&mut client, b"GET / HTTP/1.1\r\n")
            .await
            .expect("write");
        let d = detect(&mut server, Duration::from_secs(5), Duration::from_secs(10))
            .await
            .expect("detect");
        assert_eq!(d.protocol, Protocol::Http1);
        assert_eq!(&d.prefix[..], b"GET / HTTP/1.1\r\n");

        let (_client, mut server) = tokio::io::duplex(1024);
        let d = detect(
            &mut server,
            Duration::from_millis(20),
            Duration::from_secs(10),
        )
        .await
        .expect("detect");
        assert!(d.timed_out);
        assert_eq!(d.protocol, Protocol::Opaque);
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_request_line_is_http_and_a_stalled_one_is_cut() {
        use tokio::io::AsyncWriteExt as _;
        let second = Duration::from_secs(1);
        // 20 bytes over 2 s: past the 1 s detection timeout, still HTTP/1.
        let (mut client, mut server) = tokio::io::duplex(1024);
        let sender = tokio::spawn(async move {
            for b in b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" {
                client.write_all(&[*b]).await.expect("write");
                tokio::time::sleep(Duration::from_millis(80)).await;
            }
            client
        });
        let d = detect(&mut server, second, 10 * second)
            .await
            .expect("detected");
        assert_eq!(d.protocol, Protocol::Http1);
        assert!(!d.timed_out);
        let _client = sender.await.expect("sender");
        // A request line that never ends: cut at the header-read timeout, not passed as TCP.
        let (mut client, mut server) = tokio::io::duplex(1024);
        client.write_all(b"GET /aaaa").await.expect("write");
        let started = tokio::time::Instant::now();
        let err = detect(&mut server, second, 10 * second)
            .await
            .expect_err("cut");
        assert_eq!(err.kind(), std::io::ErrorKind::TimedOut);
        assert_eq!(started.elapsed(), 10 * second);
        // Silence is still server-first TCP after the detection timeout.
        let (_client, mut server) = tokio::io::duplex(1024);
        let d = detect(&mut server, second, 10 * second)
            .await
            .expect("opaque");
        assert_eq!(d.protocol, Protocol::Opaque);
        assert!(d.timed_out);
        drop(client);
    }
}
