//! The transport header: the first bytes, inside mesh TLS, of an opaque TCP connection made to
//! a peer proxy's mesh port (its inbound port, 4143) rather than to the application's port.
//! It names the application's port.
//!
//! Opaque TCP goes this way so that the peer never has to guess whether TLS is coming: on a
//! connection to an application port, the first bytes decide (a mesh ClientHello or the
//! client's own protocol) and, on a port whose server speaks first, the application's greeting
//! decides at once; no timer looks for a ClientHello that may never come.
//!
//! Wire format (9 bytes): `STRAIT` `0x01` (magic and version), then the port, big-endian.

use tokio::io::{AsyncRead, AsyncReadExt};

const MAGIC: &[u8; 7] = b"STRAIT\x01";
pub const LEN: usize = MAGIC.len() + 2;

#[derive(Debug, thiserror::Error)]
pub enum HeaderError {
    #[error("the connection ended before its transport header: {0}")]
    Read(#[from] std::io::Error),
    #[error("not a Strait transport header (version 1 expected): the peer is not a Strait proxy of this version")]
    Magic,
    #[error("the transport header names port 0")]
    PortZero,
}

/// The header for a connection to the application's `port`.
pub fn encode(port: u16) -> [u8; LEN] {
    let mut out = [0; LEN];
    out[..MAGIC.len()].copy_from_slice(MAGIC);
    out[MAGIC.len()..].copy_from_slice(&port.to_be_bytes());
    out
}

/// Parses a header.
pub fn decode(bytes: &[u8; LEN]) -> Result<u16, HeaderError> {
    if &bytes[..MAGIC.len()] != MAGIC {
        return Err(HeaderError::Magic);
    }
    match u16::from_be_bytes([bytes[MAGIC.len()], bytes[MAGIC.len() + 1]]) {
        0 => Err(HeaderError::PortZero),
        port => Ok(port),
    }
}

/// Reads the header from `io`: exactly its bytes, so what follows is the client's.
pub async fn read<I: AsyncRead + Unpin>(io: &mut I) -> Result<u16, HeaderError> {
    let mut bytes = [0; LEN];
    io.read_exact(&mut bytes).await?;
    decode(&bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_every_port_edge() {
        for port in [1, 80, 3306, 4143, 65535] {
            assert_eq!(decode(&encode(port)).expect("a header"), port);
        }
    }

    #[test]
    fn refuses_what_is_not_a_header() {
        assert!(matches!(
            decode(b"GET / HTTP"[..LEN].try_into().expect("9 bytes")),
            Err(HeaderError::Magic)
        ));
        let mut other_version = encode(80);
        other_version[6] = 2;
        assert!(matches!(decode(&other_version), Err(HeaderError::Magic)));
        assert!(matches!(decode(&encode(0)), Err(HeaderError::PortZero)));
    }

    #[tokio::test]
    async fn reads_exactly_the_header() {
        let mut wire = encode(3306).to_vec();
        wire.extend_from_slice(b"client bytes");
        let mut io = &wire[..];
        assert_eq!(read(&mut io).await.expect("a header"), 3306);
        assert_eq!(io, b"client bytes");
        let mut short = &wire[..4];
        assert!(matches!(read(&mut short).await, Err(HeaderError::Read(_))));
    }
}
