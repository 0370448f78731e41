//! The service manager's readiness protocol (`sd_notify`): when systemd
//! starts the server with `Type=notify` it sets `NOTIFY_SOCKET`, and the
//! server sends `READY=1` there once every listener is up (when it prints its
//! readiness line), and `STOPPING=1` when a graceful stop begins. Without the
//! variable nothing is sent. A failure to send is logged, never fatal: the
//! server serves either way.

use std::ffi::OsStr;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::UnixDatagram;

/// The variable naming the service manager's socket.
const NOTIFY_SOCKET: &str = "NOTIFY_SOCKET";

/// Sends `state` (newline-separated `KEY=value` lines) to the service
/// manager, if one is listening.
pub(crate) fn notify(state: &str) {
    if let Some(socket) = std::env::var_os(NOTIFY_SOCKET) {
        notify_to(&socket, state);
    }
}

/// Sends `state` to the datagram socket `socket`: a path, or `@name` for an
/// abstract socket.
fn notify_to(socket: &OsStr, state: &str) {
    let sent = UnixDatagram::unbound().and_then(|out| {
        match socket.as_encoded_bytes().strip_prefix(b"@") {
            Some(name) => {
                let address = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
                out.send_to_addr(state.as_bytes(), &address)
            }
            None => out.send_to(state.as_bytes(), socket),
        }
    });
    if let Err(error) = sent {
        tracing::warn!(
            socket = %socket.to_string_lossy(),
            %error,
            "cannot tell the service manager the server's state"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_state_reaches_a_socket_named_by_path_or_abstract_name() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify.sock");
        let listener = UnixDatagram::bind(&path).unwrap();
        notify_to(path.as_os_str(), "READY=1\nSTATUS=serving");
        let mut buf = [0u8; 64];
        let n = listener.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1\nSTATUS=serving");

        let name = format!("blockseal-notify-test-{}", std::process::id());
        let address = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let listener = UnixDatagram::bind_addr(&address).unwrap();
        notify_to(OsStr::new(&format!("@{name}")), "STOPPING=1");
        let n = listener.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"STOPPING=1");

        // Nobody listening: logged, not fatal.
        notify_to(dir.path().join("absent.sock").as_os_str(), "READY=1");
    }
}
