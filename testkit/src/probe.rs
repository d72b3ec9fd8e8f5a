//! ZooKeeper's four-letter-word probe (`srvr`) over the client port: how the
//! testkit tells a serving node (and its role) from one that is starting,
//! frozen or gone.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

/// A node's role as reported by `srvr`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// A single server.
    Standalone,
    /// The ensemble's leader.
    Leader,
    /// A follower of the leader.
    Follower,
    /// An observer (non-voting).
    Observer,
}

impl Mode {
    fn parse(word: &str) -> Option<Mode> {
        match word.trim() {
            "standalone" => Some(Mode::Standalone),
            "leader" => Some(Mode::Leader),
            "follower" => Some(Mode::Follower),
            "observer" => Some(Mode::Observer),
            _ => None,
        }
    }

    /// Extracts the mode from a `srvr` answer; `None` while the node is not
    /// serving ("This ZooKeeper instance is not currently serving requests").
    pub fn from_srvr(answer: &str) -> Option<Mode> {
        answer
            .lines()
            .find_map(|line| line.strip_prefix("Mode:").and_then(Mode::parse))
    }
}

/// Sends `srvr` to `addr` and returns the answer.
///
/// # Errors
/// Any I/O error, including a timeout (a frozen or dead node).
pub fn srvr(addr: SocketAddr, timeout: Duration) -> std::io::Result<String> {
    let mut stream = TcpStream::connect_timeout(&addr, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    stream.write_all(b"srvr")?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer)?;
    Ok(answer)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_modes() {
        let answer = "Zookeeper version: 3.8.0\nLatency min/avg/max: 0/0.0/0\nMode: leader\nNode count: 5\n";
        assert_eq!(Mode::from_srvr(answer), Some(Mode::Leader));
        assert_eq!(Mode::from_srvr("Mode: standalone\n"), Some(Mode::Standalone));
        assert_eq!(
            Mode::from_srvr("This ZooKeeper instance is not currently serving requests\n"),
            None
        );
    }
}
