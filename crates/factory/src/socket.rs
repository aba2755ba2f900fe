//! What lies at a Unix socket path a server is about to bind, or `factory destroy` about
//! to clean up: one probe for the VMCache endpoint, the metrics socket and the clean-up,
//! each of which decides what to do with what it finds.

use std::path::Path;

/// What is at a socket path.
#[derive(Debug)]
pub enum SocketAt {
    /// Nothing (or nothing readable).
    Nothing,
    /// Something that is not a socket.
    NotASocket,
    /// A socket a process accepted a connection on: in use.
    Answered,
    /// A socket whose connections are refused: nothing listens, stale.
    Refused,
    /// A socket the connection failed on otherwise (a full backlog of a busy server
    /// answers `EAGAIN`): may be live.
    Unanswered(std::io::Error),
}

/// Looks at `path`, connecting to it when it is a socket.
pub async fn probe(path: &Path) -> SocketAt {
    use std::os::unix::fs::FileTypeExt;
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return SocketAt::Nothing;
    };
    if !meta.file_type().is_socket() {
        return SocketAt::NotASocket;
    }
    match tokio::net::UnixStream::connect(path).await {
        Ok(_) => SocketAt::Answered,
        Err(err) if err.kind() == std::io::ErrorKind::ConnectionRefused => SocketAt::Refused,
        Err(err) => SocketAt::Unanswered(err),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn each_kind_is_told_apart() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("s.sock");
        assert!(matches!(probe(&path).await, SocketAt::Nothing));
        let live = tokio::net::UnixListener::bind(&path).expect("bind");
        assert!(matches!(probe(&path).await, SocketAt::Answered));
        drop(live);
        assert!(matches!(probe(&path).await, SocketAt::Refused));
        let file = dir.path().join("file");
        std::fs::write(&file, b"x").expect("write");
        assert!(matches!(probe(&file).await, SocketAt::NotASocket));
    }
}
