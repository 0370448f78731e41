//! A blocking, byte-level NBD client: it sends exactly what a test asks, in
//! the order asked, including what no real client would send.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use crate::wire::*;

/// How long a read waits for the server before the test fails.
const READ_TIMEOUT: Duration = Duration::from_secs(10);

/// A connection a [`Raw`] client can speak over.
pub trait Stream: Read + Write + Send {
    /// Closes the sending side: the server reads end of file after what was sent.
    fn shutdown_write(&self) -> io::Result<()>;
}

impl Stream for UnixStream {
    fn shutdown_write(&self) -> io::Result<()> {
        self.shutdown(Shutdown::Write)
    }
}

impl Stream for TcpStream {
    fn shutdown_write(&self) -> io::Result<()> {
        self.shutdown(Shutdown::Write)
    }
}

/// A blocking, byte-level NBD client. Every read fails the test after 10 s (or
/// the timeout it was connected with) without an answer.
pub struct Raw {
    /// The connection, for tests that read or write it directly.
    pub stream: Box<dyn Stream>,
}

impl Raw {
    /// Connects to a Unix socket.
    #[track_caller]
    pub fn connect(path: &Path) -> Raw {
        Raw::connect_with_timeout(path, READ_TIMEOUT)
    }

    /// Connects to a Unix socket; reads fail the test after `timeout`.
    #[track_caller]
    pub fn connect_with_timeout(path: &Path, timeout: Duration) -> Raw {
        let s = UnixStream::connect(path)
            .unwrap_or_else(|e| panic!("cannot connect to {}: {e}", path.display()));
        s.set_read_timeout(Some(timeout)).unwrap();
        Raw::over(s)
    }

    /// Connects over TCP.
    #[track_caller]
    pub fn connect_tcp(addr: SocketAddr) -> Raw {
        let s =
            TcpStream::connect(addr).unwrap_or_else(|e| panic!("cannot connect to {addr}: {e}"));
        s.set_read_timeout(Some(READ_TIMEOUT)).unwrap();
        Raw::over(s)
    }

    /// A client over a connection the caller made (and set timeouts on).
    pub fn over(stream: impl Stream + 'static) -> Raw {
        Raw {
            stream: Box::new(stream),
        }
    }

    /// Reads exactly `n` bytes.
    #[track_caller]
    pub fn read_n(&mut self, n: usize) -> Vec<u8> {
        let mut b = vec![0; n];
        self.stream
            .read_exact(&mut b)
            .unwrap_or_else(|e| panic!("reading {n} bytes from the server: {e}"));
        b
    }

    /// Reads a big-endian `u16`.
    #[track_caller]
    pub fn u16(&mut self) -> u16 {
        u16::from_be_bytes(self.read_n(2).try_into().unwrap())
    }

    /// Reads a big-endian `u32`.
    #[track_caller]
    pub fn u32(&mut self) -> u32 {
        u32::from_be_bytes(self.read_n(4).try_into().unwrap())
    }

    /// Reads a big-endian `u64`.
    #[track_caller]
    pub fn u64(&mut self) -> u64 {
        u64::from_be_bytes(self.read_n(8).try_into().unwrap())
    }

    /// Sends `bytes`.
    #[track_caller]
    pub fn send(&mut self, bytes: &[u8]) {
        self.stream
            .write_all(bytes)
            .unwrap_or_else(|e| panic!("sending {} bytes to the server: {e}", bytes.len()));
    }

    /// Reads the greeting and returns the handshake flags.
    #[track_caller]
    pub fn greeting(&mut self) -> u16 {
        assert_eq!(self.u64(), NBDMAGIC);
        assert_eq!(self.u64(), IHAVEOPT);
        self.u16()
    }

    /// The greeting, then `client_flags`; returns the handshake flags.
    #[track_caller]
    pub fn handshake(&mut self, client_flags: u32) -> u16 {
        let flags = self.greeting();
        self.send(&client_flags.to_be_bytes());
        flags
    }

    /// Sends an option with its payload.
    #[track_caller]
    pub fn option(&mut self, option: u32, data: &[u8]) {
        let mut b = Vec::new();
        b.extend_from_slice(&IHAVEOPT.to_be_bytes());
        b.extend_from_slice(&option.to_be_bytes());
        b.extend_from_slice(&(data.len() as u32).to_be_bytes());
        b.extend_from_slice(data);
        self.send(&b);
    }

    /// One option reply: (option, reply type, data).
    #[track_caller]
    pub fn option_reply(&mut self) -> (u32, u32, Vec<u8>) {
        assert_eq!(self.u64(), REPLY_MAGIC);
        let option = self.u32();
        let kind = self.u32();
        let len = self.u32() as usize;
        (option, kind, self.read_n(len))
    }

    /// Sends `NBD_OPT_GO` for `name` and returns (size, flags) from
    /// `NBD_INFO_EXPORT`; fails the test unless the server acknowledges.
    #[track_caller]
    pub fn go(&mut self, name: &str) -> (u64, u16) {
        self.option(OPT_GO, &info_payload(name, &[]));
        let mut export = None;
        loop {
            let (opt, kind, data) = self.option_reply();
            assert_eq!(opt, OPT_GO);
            match kind {
                REP_INFO if data[..2] == [0, 0] => {
                    let size = u64::from_be_bytes(data[2..10].try_into().unwrap());
                    let flags = u16::from_be_bytes(data[10..12].try_into().unwrap());
                    export = Some((size, flags));
                }
                REP_INFO => {}
                REP_ACK => return export.expect("NBD_INFO_EXPORT before ACK"),
                other => panic!("GO failed with reply {other:#x}"),
            }
        }
    }

    /// Sends one request header (a write's payload is sent separately).
    #[track_caller]
    pub fn request(&mut self, flags: u16, kind: u16, handle: u64, offset: u64, len: u32) {
        self.send(&request_header(flags, kind, handle, offset, len));
    }

    /// A simple reply: (error, handle).
    #[track_caller]
    pub fn simple_reply(&mut self) -> (u32, u64) {
        assert_eq!(self.u32(), SIMPLE_MAGIC);
        let error = self.u32();
        (error, self.u64())
    }

    /// A structured chunk: (flags, type, handle, payload).
    #[track_caller]
    pub fn chunk(&mut self) -> (u16, u16, u64, Vec<u8>) {
        assert_eq!(self.u32(), STRUCTURED_MAGIC);
        let flags = self.u16();
        let kind = self.u16();
        let handle = self.u64();
        let len = self.u32() as usize;
        (flags, kind, handle, self.read_n(len))
    }

    /// Sends `NBD_CMD_DISC` and closes the sending side. A server that reads the
    /// end of file after a disconnect request has taken in everything this
    /// client sent.
    #[track_caller]
    pub fn disconnect_and_close_write(&mut self) {
        self.request(0, CMD_DISC, u64::MAX, 0, 0);
        self.stream
            .shutdown_write()
            .unwrap_or_else(|e| panic!("closing the sending side: {e}"));
    }

    /// True when the server closed the connection (end of file or reset) before
    /// the read timeout; false when it sent something instead.
    pub fn closed(&mut self) -> bool {
        let mut b = [0u8; 1];
        match self.stream.read(&mut b) {
            Ok(0) => true,
            Ok(_) => false,
            Err(e) => matches!(
                e.kind(),
                io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe
            ),
        }
    }
}
