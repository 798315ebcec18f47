//! Panics in driver code, turned into error messages so that a job whose
//! body or finalization callback panics still concludes (QEMU's jobs
//! cannot panic, but a Rust driver can, and a job stuck in `pending` with
//! the control-plane lock released half-way would wedge its waiters).

use std::any::Any;
use std::future::Future;
use std::panic::{self, AssertUnwindSafe};
use std::pin::Pin;
use std::task::{Context, Poll};

/// The message of a panic payload (`panic!` with a literal or a format).
pub(crate) fn panic_message(payload: &(dyn Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".to_owned())
}

/// Calls `make` and awaits the future it returns, catching a panic in the
/// call or in any poll of the future as `Err(message)`.
///
/// Unwind safety is asserted: after a panic the future is dropped unpolled,
/// and the driver is only called again for the remaining finalization
/// steps, which is what QEMU would do after an error.
pub(crate) async fn catch_panic<F>(make: impl FnOnce() -> F) -> Result<F::Output, String>
where
    F: Future + Unpin,
{
    let fut = panic::catch_unwind(AssertUnwindSafe(make)).map_err(|p| panic_message(&*p))?;
    CatchUnwind(fut).await
}

/// A future that turns a panic while polling its inner future into
/// `Err(message)`.
struct CatchUnwind<F>(F);

impl<F: Future + Unpin> Future for CatchUnwind<F> {
    type Output = Result<F::Output, String>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let inner = &mut self.0;
        match panic::catch_unwind(AssertUnwindSafe(|| Pin::new(inner).poll(cx))) {
            Ok(Poll::Ready(v)) => Poll::Ready(Ok(v)),
            Ok(Poll::Pending) => Poll::Pending,
            Err(payload) => Poll::Ready(Err(panic_message(&*payload))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn catches_panics_in_the_call_and_in_polls() {
        let ok = catch_panic(|| Box::pin(async { 7 })).await;
        assert_eq!(ok, Ok(7));

        let in_call =
            catch_panic(|| -> Pin<Box<dyn Future<Output = ()> + Send>> { panic!("in the call") })
                .await;
        assert_eq!(in_call, Err("in the call".to_owned()));

        let in_poll = catch_panic(|| {
            Box::pin(async {
                tokio::task::yield_now().await;
                let n = 3;
                panic!("in poll {n}");
            })
        })
        .await;
        assert_eq!(in_poll, Err::<(), _>("in poll 3".to_owned()));
    }
}
