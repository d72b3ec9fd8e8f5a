//! What a ZooKeeper error means for the lock recipe: retry on the same
//! session, give up with a backend error, or look for a node that may exist.
//!
//! `zookeeper_client` fails every in-flight request with the error that ended
//! its connection, which is not always `ConnectionLoss` (see
//! [`connection_broke`]); the three classifications below are the one place
//! that knowledge lives.

use crate::backend::BackendError;

pub(super) type ZkError = zookeeper_client::Error;
pub(super) type ZkResult<T> = Result<T, ZkError>;

/// Maps a ZooKeeper error: connectivity problems are `Unavailable` (retry
/// may help), anything else `Internal`.
pub(super) fn map_err(what: &str, e: ZkError) -> BackendError {
    match e {
        ZkError::ConnectionLoss
        | ZkError::Custom(_)
        | ZkError::SessionExpired
        | ZkError::SessionMoved
        | ZkError::ClientClosed
        | ZkError::NoHosts
        | ZkError::Timeout
        | ZkError::Throttled
        | ZkError::NotReadOnly => BackendError::Unavailable(format!("ZooKeeper {what}: {e}")),
        e => BackendError::Internal(format!("ZooKeeper {what}: {e}")),
    }
}

/// Whether a request failed because its connection broke, so its outcome is
/// unknown but the session may live on. `zookeeper_client` fails every
/// in-flight request with the error that ended the connection: usually
/// `ConnectionLoss`, but `Custom` for an I/O error, a read timeout ("no
/// response from connection") or a switch to a writable server, and
/// `UnexpectedError`/`UnmarshalError` for a reply it could not match or
/// parse (the request may well have been applied). Requests made after it
/// queue until the session reconnects or ends.
pub(super) fn connection_broke(e: &ZkError) -> bool {
    matches!(
        e,
        ZkError::ConnectionLoss | ZkError::Custom(_) | ZkError::UnexpectedError(_) | ZkError::UnmarshalError { .. }
    )
}

/// Whether a failed `create` definitely made no node: ZooKeeper answered
/// with a refusal, or the client refused to send it. Any other error (a lost
/// connection, an expired or closed session, a reply that could not be read)
/// leaves the outcome unknown, so the node must still be looked for.
pub(super) fn definitely_not_created(e: &ZkError) -> bool {
    matches!(
        e,
        ZkError::NodeExists
            | ZkError::NoNode
            | ZkError::NoAuth
            | ZkError::InvalidAcl
            | ZkError::NoChildrenForEphemerals
            | ZkError::BadArguments(_)
            | ZkError::BadVersion
            | ZkError::NotEmpty
            | ZkError::SessionMoved
            | ZkError::Throttled
            | ZkError::NotReadOnly
            | ZkError::QuotaExceeded
            | ZkError::MarshallingError
            | ZkError::Unimplemented
            | ZkError::UnexpectedErrorCode(_)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_refusals_mean_no_node_was_created() {
        for refused in [
            ZkError::NodeExists,
            ZkError::NoNode,
            ZkError::NoAuth,
            ZkError::InvalidAcl,
            ZkError::NoChildrenForEphemerals,
            ZkError::BadArguments(&"bad path"),
            ZkError::SessionMoved,
            ZkError::Throttled,
        ] {
            assert!(definitely_not_created(&refused), "{refused:?}");
            assert!(!connection_broke(&refused), "{refused:?}");
        }
        for unknown in [
            ZkError::ConnectionLoss,
            ZkError::SessionExpired,
            ZkError::ClientClosed,
            ZkError::Timeout,
            ZkError::UnexpectedError("recv response with xid 7 but no pending request".into()),
            ZkError::UnmarshalError {
                entity: "server path",
                reason: &"insufficient buf",
            },
        ] {
            assert!(!definitely_not_created(&unknown), "{unknown:?}");
        }
        // A reply that could not be matched or read: the create may have
        // happened, so it is recovered like a lost connection.
        assert!(connection_broke(&ZkError::UnexpectedError("x".into())));
        assert!(connection_broke(&ZkError::UnmarshalError {
            entity: "stat",
            reason: &"insufficient buf"
        }));
    }
}
