//! etcd's HTTP endpoints on the client port, asked without a gRPC client:
//! `GET /health` (is the member serving, with a leader and a quorum?) and the
//! gRPC gateway's `POST /v3/maintenance/status` (its member id, the leader it
//! follows, the raft term). How the testkit tells a serving member from one
//! that is starting, frozen or gone, and finds the leader.
//!
//! Requests are HTTP/1.0 on a fresh `TcpStream`, so the answer is never
//! chunked: its body is `Content-Length` bytes, or what comes until the
//! server closes the connection.

use std::io::{self, Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

/// Bounds how much of an answer is read; both answers are a few hundred bytes.
const MAX_RESPONSE: usize = 64 * 1024;

/// Whether the etcd member at `addr` says `{"health":"true"}` on `GET /health`:
/// it has a leader and a quorum read succeeded. `Ok(false)` is an answer that
/// says unhealthy (HTTP 503 while there is no leader).
///
/// # Errors
/// Any I/O error, including a timeout (a frozen or dead member), or an answer
/// that is not HTTP with a JSON `health` field.
pub fn etcd_health(addr: SocketAddr, timeout: Duration) -> io::Result<bool> {
    let (_status, body) = request(addr, "GET", "/health", "", timeout)?;
    let json = parse_json(&body)?;
    match json.get("health").and_then(serde_json::Value::as_str) {
        Some(health) => Ok(health == "true"),
        None => Err(invalid(format!("no \"health\" in {body}"))),
    }
}

/// The part of `/v3/maintenance/status` the testkit uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Status {
    /// The answering member's id.
    pub member_id: u64,
    /// The id of the leader it knows of; 0 for none.
    pub leader: u64,
    /// Its raft term.
    pub raft_term: u64,
}

impl Status {
    /// Whether the answering member says it is the leader.
    pub(crate) fn is_leader(&self) -> bool {
        self.leader != 0 && self.leader == self.member_id
    }

    /// Parses the gateway's JSON; 64-bit numbers come as strings there.
    fn parse(body: &str) -> io::Result<Status> {
        let json = parse_json(body)?;
        let field = |pointer: &str| {
            let value = json.pointer(pointer);
            value
                .and_then(serde_json::Value::as_str)
                .and_then(|s| s.parse().ok())
                .or_else(|| value.and_then(serde_json::Value::as_u64))
        };
        Ok(Status {
            member_id: field("/header/member_id").ok_or_else(|| invalid(format!("no member_id in {body}")))?,
            // A member without a leader omits the field (proto3 zero value).
            leader: field("/leader").unwrap_or(0),
            raft_term: field("/raftTerm").unwrap_or(0),
        })
    }
}

/// Asks the member at `addr` for its status.
///
/// # Errors
/// As [`etcd_health`], or an HTTP error status.
pub(crate) fn status(addr: SocketAddr, timeout: Duration) -> io::Result<Status> {
    let (code, body) = request(addr, "POST", "/v3/maintenance/status", "{}", timeout)?;
    if code != 200 {
        return Err(invalid(format!("HTTP {code}: {body}")));
    }
    Status::parse(&body)
}

/// Whether anything answers HTTP at `addr` (`GET /version`, any status):
/// an etcd peer port answers once the member serves peer traffic.
pub(crate) fn answers_http(addr: SocketAddr, timeout: Duration) -> bool {
    request(addr, "GET", "/version", "", timeout).is_ok()
}

/// Sends one request and returns the status code and body.
fn request(addr: SocketAddr, method: &str, path: &str, body: &str, timeout: Duration) -> io::Result<(u16, String)> {
    let mut stream = TcpStream::connect_timeout(&addr, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    let request = format!(
        "{method} {path} HTTP/1.0\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes())?;
    // Read up to the end of the body as `Content-Length` gives it: the peer
    // port answers HTTP/1.0 but leaves the connection open.
    let mut response = Vec::new();
    let mut chunk = [0; 4096];
    while !complete(&response) {
        let n = stream.read(&mut chunk)?;
        if n == 0 {
            break;
        }
        response.extend_from_slice(&chunk[..n]);
        if response.len() > MAX_RESPONSE {
            return Err(invalid(format!("answer longer than {MAX_RESPONSE} bytes")));
        }
    }
    parse_response(&String::from_utf8_lossy(&response))
}

/// Whether `response` holds the head and as many body bytes as its
/// `Content-Length` says (without one, the body ends when the server closes).
fn complete(response: &[u8]) -> bool {
    let Some(head_end) = response.windows(4).position(|w| w == b"\r\n\r\n") else {
        return false;
    };
    let head = String::from_utf8_lossy(&response[..head_end]);
    let length = head.lines().find_map(|line| {
        let (name, value) = line.split_once(':')?;
        name.trim()
            .eq_ignore_ascii_case("content-length")
            .then(|| value.trim().parse::<usize>().ok())
            .flatten()
    });
    length.is_some_and(|length| response.len() - (head_end + 4) >= length)
}

/// Splits an HTTP/1.x response into its status code and body.
fn parse_response(response: &str) -> io::Result<(u16, String)> {
    let (head, body) = response
        .split_once("\r\n\r\n")
        .ok_or_else(|| invalid(format!("incomplete HTTP response: {response:?}")))?;
    let status_line = head.lines().next().unwrap_or_default();
    let code = status_line
        .strip_prefix("HTTP/1.")
        .and_then(|rest| rest.split_whitespace().nth(1))
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| invalid(format!("not an HTTP status line: {status_line:?}")))?;
    Ok((code, body.to_owned()))
}

fn parse_json(body: &str) -> io::Result<serde_json::Value> {
    serde_json::from_str(body).map_err(|e| invalid(format!("not JSON ({e}): {body}")))
}

fn invalid(detail: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, detail)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_response() -> io::Result<()> {
        let response = "HTTP/1.0 503 Service Unavailable\r\nContent-Length: 18\r\n\r\n{\"health\":\"false\"}";
        assert_eq!(parse_response(response)?, (503, String::from("{\"health\":\"false\"}")));
        assert!(parse_response("HTTP/1.0 200 OK\r\nContent-Len").is_err());
        assert!(parse_response("SSH-2.0-OpenSSH\r\n\r\n").is_err());
        Ok(())
    }

    #[test]
    fn a_response_is_complete_at_its_content_length() {
        assert!(!complete(b"HTTP/1.0 200 OK\r\nContent-Length: 4\r\n"));
        assert!(!complete(b"HTTP/1.0 200 OK\r\nContent-Length: 4\r\n\r\nabc"));
        assert!(complete(b"HTTP/1.0 200 OK\r\ncontent-length: 4\r\n\r\nabcd"));
        // Without a length, only the server closing the connection ends it.
        assert!(!complete(b"HTTP/1.0 200 OK\r\n\r\nabcd"));
    }

    #[test]
    fn parses_a_status() -> io::Result<()> {
        // As etcd 3.4.23 answers.
        let body = r#"{"header":{"cluster_id":"16842975187262960576","member_id":"5417069778987976672","revision":"1","raft_term":"2"},"version":"3.4.23","dbSize":"20480","leader":"5417069778987976672","raftIndex":"5","raftTerm":"2","raftAppliedIndex":"5","dbSizeInUse":"16384"}"#;
        let status = Status::parse(body)?;
        assert_eq!(
            status,
            Status {
                member_id: 5_417_069_778_987_976_672,
                leader: 5_417_069_778_987_976_672,
                raft_term: 2,
            }
        );
        assert!(status.is_leader());
        let follower = Status::parse(r#"{"header":{"member_id":"7"},"leader":"9","raftTerm":"3"}"#)?;
        assert!(!follower.is_leader());
        assert!(!Status::parse(r#"{"header":{"member_id":"7"}}"#)?.is_leader());
        assert!(Status::parse(r#"{"header":{}}"#).is_err());
        Ok(())
    }
}
