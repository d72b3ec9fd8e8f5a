//! Admin calls for version rotation: `ROTATE` (with its progress events) and
//! `ROTATE_ABORT` (PROTOCOL.md, "Version rotation").

use std::time::Duration;

use clastor_protocol::{Event, KindLayout, Request, ResponseBody, Rotate, RotateOk, RotationProgress, name};

use super::Client;
use crate::conn::HeldUpdate;
use crate::error::Error;
use crate::event::ClientEvent;
use crate::reply::{body, unexpected};

/// Time the server may take after the drain: the switch and the deletion of
/// the old subtree.
const CLEANUP_ALLOWANCE: Duration = Duration::from_secs(60);

impl Client {
    /// Rotates `kind` from version `from` to `to`: the server marks the kind
    /// draining (new acquires wait), waits up to `drain_timeout` (zero: the
    /// server's default) for the locks under `from` to go, switches to `to`
    /// and deletes the old subtree. `on_progress` sees every progress report
    /// of this rotation as it arrives.
    ///
    /// # Errors
    /// [`Error::RotationRefused`] (not at `from`, or another rotation runs),
    /// [`Error::RotationAborted`] (the drain timed out or someone aborted it:
    /// the kind is normal on `from`), [`Error::InvalidName`] (checked before
    /// sending), [`Error::InvalidArgument`] for a timeout too long for the
    /// wire, connection errors and other server statuses.
    ///
    /// # Cancellation safety
    /// Dropping the future leaves the rotation to the server, which stops
    /// driving it when this connection closes; see [`Client::rotate_abort`]
    /// and PROTOCOL.md on how a kind left draining recovers.
    pub async fn rotate(
        &self,
        kind: &str,
        from: &str,
        to: &str,
        drain_timeout: Duration,
        on_progress: impl FnMut(&RotationProgress),
    ) -> Result<RotateOk, Error> {
        self.rotate_to_layout(kind, from, to, None, drain_timeout, on_progress)
            .await
    }

    /// [`Client::rotate`], giving `to` the layout `layout` (`None`: the
    /// layout `from` has): the one way to move a kind between the mutex and
    /// the read-write layout (PROTOCOL.md, "Layouts").
    ///
    /// # Errors
    /// As [`Client::rotate`]; [`Error::Unsupported`] if a layout is named and
    /// the server does not speak protocol version 4;
    /// [`Error::RotationRefused`] for a layout the backend does not have.
    ///
    /// # Cancellation safety
    /// As [`Client::rotate`].
    pub async fn rotate_to_layout(
        &self,
        kind: &str,
        from: &str,
        to: &str,
        layout: Option<KindLayout>,
        drain_timeout: Duration,
        mut on_progress: impl FnMut(&RotationProgress),
    ) -> Result<RotateOk, Error> {
        name::validate("kind", kind).map_err(|e| Error::InvalidName(e.to_string()))?;
        name::validate_version("from", from).map_err(|e| Error::InvalidName(e.to_string()))?;
        name::validate_version("to", to).map_err(|e| Error::InvalidName(e.to_string()))?;
        let drain_timeout_ms = u32::try_from(drain_timeout.as_millis())
            .map_err(|_| Error::InvalidArgument(format!("drain timeout {drain_timeout:?} is too long")))?;
        let req = Request::Rotate(Rotate {
            kind: kind.to_owned(),
            from: from.to_owned(),
            to: to.to_owned(),
            drain_timeout_ms,
            layout,
        });
        // Subscribe before sending: progress may come at once.
        let mut events = self.events();
        let conn = self.pick().await?;
        if layout.is_some() && conn.version() < 4 {
            return Err(Error::Unsupported(format!(
                "a rotation to a layout needs protocol version 4; the server speaks {}",
                conn.version()
            )));
        }
        let extra = drain_timeout.max(Duration::from_secs(60)) + CLEANUP_ALLOWANCE;
        let call = self.call_on(&conn, &req, HeldUpdate::None, extra);
        tokio::pin!(call);
        let mine = |p: &RotationProgress| p.kind == kind && p.from == from && p.to == to;
        let reply = loop {
            tokio::select! {
                biased;
                ev = events.recv() => match ev {
                    Some(ClientEvent::Server { event: Event::RotateProgress { progress, .. }, .. }) if mine(&progress) => {
                        on_progress(&progress);
                    }
                    Some(_) => {}
                    // The client is gone; the call ends with it.
                    None => break call.await,
                },
                reply = &mut call => break reply,
            }
        };
        // Progress comes before the reply on the wire, and the reader hands
        // out events before it completes a reply: anything left is queued.
        while let Ok(ev) = events.rx.try_recv() {
            if let ClientEvent::Server {
                event: Event::RotateProgress { progress, .. },
                ..
            } = ev
                && mine(&progress)
            {
                on_progress(&progress);
            }
        }
        match body(reply?)? {
            ResponseBody::Rotated(ok) => Ok(ok),
            other => Err(unexpected(&other)),
        }
    }

    /// Aborts `kind`'s rotation: a draining kind goes back to normal on its
    /// current version (the running rotation ends with
    /// [`Error::RotationAborted`]). Returns the kind's version and whether a
    /// rotation was aborted (false: the kind was not draining).
    ///
    /// # Errors
    /// [`Error::InvalidName`] (checked before sending), connection errors and
    /// server statuses.
    ///
    /// # Cancellation safety
    /// Safe: the server does it in one atomic step.
    pub async fn rotate_abort(&self, kind: &str) -> Result<(String, bool), Error> {
        name::validate("kind", kind).map_err(|e| Error::InvalidName(e.to_string()))?;
        let conn = self.pick().await?;
        let req = Request::RotateAbort { kind: kind.to_owned() };
        match body(self.call_on(&conn, &req, HeldUpdate::None, Duration::ZERO).await?)? {
            ResponseBody::RotateAborted { version, aborted } => Ok((version, aborted)),
            other => Err(unexpected(&other)),
        }
    }
}
