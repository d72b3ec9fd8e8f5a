//! What a caller makes of a reply: its success body, or the client error its
//! status maps to. A leaf under both the low-level calls (`client.rs`) and
//! the lock API (`lock/`), so neither imports the other for it.

use clastor_protocol::ResponseBody;

use crate::conn::Reply;
use crate::error::Error;

/// The success body of a reply, or its error.
pub(crate) fn body(reply: Reply) -> Result<ResponseBody, Error> {
    reply.response.result.map_err(Error::from)
}

/// The error for a success body that does not answer the request (the
/// opcode matched, so this is a server bug).
pub(crate) fn unexpected(body: &ResponseBody) -> Error {
    Error::Malformed(format!("unexpected {} reply body", body.opcode()))
}
