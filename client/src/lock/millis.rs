//! Durations on the wire: a wait or a lease in whole milliseconds, refused
//! when it does not fit the protocol's `u32`.

use std::time::Duration;

use crate::error::Error;

/// `d` in whole milliseconds (rounded down), or an error naming `what`.
pub(super) fn millis(what: &str, d: Duration) -> Result<u32, Error> {
    u32::try_from(d.as_millis())
        .map_err(|_| Error::InvalidArgument(format!("{what} of {d:?} exceeds the protocol's {} ms", u32::MAX)))
}

/// A lease in whole milliseconds, rounded up so a short lease is not zero
/// (which would mean "no lease").
pub(super) fn lease_millis(d: Duration) -> Result<u32, Error> {
    if d.is_zero() {
        return Err(Error::InvalidArgument("a lease must be longer than zero".into()));
    }
    let ms = millis("lease", d)?;
    Ok(if Duration::from_millis(ms.into()) < d {
        ms.saturating_add(1)
    } else {
        ms
    })
}

pub(super) fn lease_millis_or_max(d: Duration) -> u32 {
    lease_millis(d).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lease_rounds_up_and_refuses_zero() {
        assert_eq!(lease_millis(Duration::from_micros(1)), Ok(1));
        assert_eq!(lease_millis(Duration::from_micros(1500)), Ok(2));
        assert_eq!(lease_millis(Duration::from_millis(300)), Ok(300));
        assert!(matches!(lease_millis(Duration::ZERO), Err(Error::InvalidArgument(_))));
        assert!(matches!(
            millis("wait", Duration::from_secs(u64::MAX / 4)),
            Err(Error::InvalidArgument(_))
        ));
    }
}
