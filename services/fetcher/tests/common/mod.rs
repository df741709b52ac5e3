//! The plumbing of the fault-injecting proxies in front of a real
//! registry (`faults.rs`, `hostile_network.rs`): one request per
//! connection, forwarded with `Connection: close`, the whole answer read
//! so that a test can damage it before handing it on.

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A request's head (through the blank line), or `None` if the client
/// went away first.
pub async fn read_head(s: &mut TcpStream) -> Option<Vec<u8>> {
    let mut buf = Vec::new();
    let mut tmp = [0u8; 8192];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            buf.truncate(end + 4);
            return Some(buf);
        }
        let n = s.read(&mut tmp).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&tmp[..n]);
    }
}

/// Send `head` upstream with the connection closed after the answer; the
/// whole answer and where its body starts.
pub async fn forward(head: &str, upstream: &str) -> Option<(Vec<u8>, usize)> {
    let mut req = String::new();
    for line in head.split("\r\n").filter(|l| !l.is_empty()) {
        if !line.to_ascii_lowercase().starts_with("connection:") {
            req.push_str(line);
            req.push_str("\r\n");
        }
    }
    req.push_str("Connection: close\r\n\r\n");
    let mut up = TcpStream::connect(upstream).await.ok()?;
    up.write_all(req.as_bytes()).await.ok()?;
    let mut answer = Vec::new();
    up.read_to_end(&mut answer).await.ok()?;
    let body_at = answer
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|p| p + 4)
        .unwrap_or(answer.len());
    Some((answer, body_at))
}
