//! Listeners: accept, find the original destination (SO_ORIGINAL_DST), hand the connection on.

use std::future::Future;
use std::io;
use std::net::SocketAddr;

use tokio::net::{TcpListener, TcpStream};
use tokio_util::task::TaskTracker;

use crate::drain::Drain;

/// The destination the client asked for before iptables redirected it here.
pub fn original_dst(stream: &TcpStream) -> io::Result<SocketAddr> {
    let sock = socket2::SockRef::from(stream);
    let local = stream.local_addr()?;
    let addr = if local.is_ipv4() {
        sock.original_dst_v4()?
    } else {
        sock.original_dst_v6()?
    };
    addr.as_socket().ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            "original destination is not an IP address",
        )
    })
}

/// What a listener does with a connection made straight to it (not redirected elsewhere).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ToItself {
    /// It would loop back into the proxy (outbound): refused.
    Refuse,
    /// The inbound listener is also the mesh port: handled.
    Handle,
}

/// Accepts until the drain starts. Each connection runs `handle(stream, original_dst)` as a
/// task of `tracker`; one made straight to the listener is handled as `to_itself` says.
pub async fn accept_loop<F, Fut>(
    name: &'static str,
    listener: TcpListener,
    to_itself: ToItself,
    drain: Drain,
    tracker: TaskTracker,
    handle: F,
) where
    F: Fn(TcpStream, SocketAddr) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let local = listener.local_addr().ok();
    let stop = drain.signaled();
    tokio::pin!(stop);
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = &mut stop => break,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // EMFILE and friends: back off briefly rather than spin.
                strait_admin::log_limited!(tracing::Level::WARN, "accept failed", name, error = %e, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let orig_dst = match original_dst(&stream) {
            Ok(a) => a,
            Err(e) => {
                strait_admin::log_limited!(tracing::Level::WARN, "no original destination", name, %peer, error = %e, "no original destination (not redirected by iptables?); closing");
                continue;
            }
        };
        if to_itself == ToItself::Refuse
            && Some(orig_dst.port()) == local.map(|l| l.port())
            && stream.local_addr().ok() == Some(orig_dst)
        {
            strait_admin::log_limited!(tracing::Level::WARN, "loop", name, %peer, "connection addressed to the proxy itself; closing to avoid a loop");
            continue;
        }
        // Boxed before the spawn: a connection's future is ~10 KB (its protocols' states side
        // by side), which the spawn would otherwise move several times; a pointer moves free.
        tracker.spawn(Box::pin(handle(stream, orig_dst)));
    }
    tracing::info!(listener = name, "stopped accepting");
}
