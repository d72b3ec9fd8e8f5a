//! Free loopback ports: bind `127.0.0.1:0` for each port wanted, all at once
//! (so one instance never gets the same port twice), then release them for
//! the server to bind. Another process can still take one in between; the
//! caller detects that and retries on fresh ports.

use std::net::TcpListener;

use crate::Error;

/// Returns `n` distinct ports that were free a moment ago.
///
/// # Errors
/// [`Error::Io`] if binding fails.
pub(crate) fn free_ports(n: usize) -> Result<Vec<u16>, Error> {
    let listeners = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0"))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| Error::io("binding 127.0.0.1:0 to find a free port", e))?;
    listeners
        .iter()
        .map(|l| l.local_addr().map(|a| a.port()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| Error::io("reading a bound port", e))
}
