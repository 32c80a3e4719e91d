//! Listening sockets with an explicit accept backlog (the default of `std`'s and tokio's
//! `bind` is 128: a burst of a few hundred connections overflows it and the kernel drops SYNs).

use std::net::SocketAddr;

use tokio::net::{TcpListener, TcpSocket};

/// The accept queue of every Strait listener unless `STRAIT_LISTEN_BACKLOG` says otherwise
/// (the kernel caps it at `net.core.somaxconn`).
pub const DEFAULT_BACKLOG: u32 = 1024;

/// `STRAIT_LISTEN_BACKLOG`, or [`DEFAULT_BACKLOG`].
pub fn backlog() -> Result<u32, String> {
    match std::env::var("STRAIT_LISTEN_BACKLOG") {
        Err(_) => Ok(DEFAULT_BACKLOG),
        Ok(v) => v
            .trim()
            .parse::<u32>()
            .ok()
            .filter(|n| (1..=65_535).contains(n))
            .ok_or_else(|| format!("STRAIT_LISTEN_BACKLOG {v:?} is not a number from 1 to 65535")),
    }
}

/// Binds `addr` (address reuse on, so a restart does not wait for TIME_WAIT) and listens
/// with `backlog`. With `v6_only`, an IPv6 socket takes IPv6 only, leaving IPv4 to a socket of
/// its own.
pub fn bind(addr: SocketAddr, backlog: u32, v6_only: bool) -> std::io::Result<TcpListener> {
    let socket = match addr {
        SocketAddr::V4(_) => TcpSocket::new_v4()?,
        SocketAddr::V6(_) => {
            let s = socket2::Socket::new(
                socket2::Domain::IPV6,
                socket2::Type::STREAM,
                Some(socket2::Protocol::TCP),
            )?;
            s.set_only_v6(v6_only)?;
            s.set_nonblocking(true)?;
            TcpSocket::from_std_stream(std::net::TcpStream::from(s))
        }
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(backlog)
}

/// [`bind`] with the configured backlog; errors name the address and what to do.
pub fn listen(setting: &str, addr: SocketAddr) -> Result<TcpListener, String> {
    let backlog = backlog()?;
    bind(addr, backlog, false).map_err(|e| format!("cannot listen on {setting} {addr}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn listeners_of_both_families_take_the_backlog() {
        let v4 = bind("127.0.0.1:0".parse().expect("addr"), 1024, false).expect("v4");
        assert!(v4.local_addr().expect("addr").is_ipv4());
        // IPv6 may be missing on a host: only check it when it binds.
        if let Ok(v6) = bind("[::1]:0".parse().expect("addr"), 1024, true) {
            assert!(v6.local_addr().expect("addr").is_ipv6());
        }
    }
}
