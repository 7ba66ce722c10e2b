//! The memory of frames in progress, over every connection of the receiver: a connection
//! reserves room for a frame's payload before it reads it, so a thousand peers each sending
//! half of a 16 MiB frame cannot make the receiver hold 16 GB.
//!
//! # Design constraints
//! - One budget per process (`receiver.frames_in_progress_bytes_max`, at least
//!   `frame_bytes_max`, so any frame the receiver accepts fits), shared by the worker threads.
//!   It is taken and given back once per frame, never per record.
//! - A frame whose payload is at most [`FRAME_PAYLOAD_UNRESERVED_BYTES`] is read without a
//!   reservation: every connection may hold that much (plus its header and one read) on its
//!   own, so heartbeats and small frames never wait.
//! - A connection holds at most one reservation: the frame it is reading.
//! - Fair: reservations are granted in the order they were asked for, over every connection
//!   of every worker (a FIFO semaphore), so a large frame is not starved by a stream of small
//!   ones behind it, and a connection that finished a frame asks again behind those waiting.
//! - A reservation is given back when its frame has been handled (written or refused) or its
//!   connection ends, whichever comes first (it is dropped).
//!
//! # Operation
//! Once a frame's header says its payload is over the allowance, the connection asks for that
//! many bytes. With room, it goes on reading. Without, it stops reading (TCP pushes back on
//! the sender) and waits in line up to `receiver.frames_in_progress_wait_ms`; still without
//! room, it is refused with ERROR (`reason="memory"`): the shipper backs off and resends.
//! Nothing is ever allocated past the budget for a frame's payload.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::config::receiver::FRAMES_IN_PROGRESS_BYTES_LIMIT;

/// Payload bytes a connection may read without a reservation. One socket read (`READ_BYTES`,
/// 64 KiB) is at most this much, so a frame's header is always seen before anything
/// larger is buffered.
pub const FRAME_PAYLOAD_UNRESERVED_BYTES: u32 = 64 << 10;

/// Room for the payloads of frames in progress, shared by every connection of the receiver.
pub struct FrameBudget {
    bytes: Arc<Semaphore>,
    bytes_max: u64,
}

/// Room for one frame's payload, given back when dropped.
#[derive(Debug)]
pub struct Reservation {
    _permit: OwnedSemaphorePermit,
}

/// Why a reservation was not granted.
#[derive(Debug, PartialEq, Eq)]
pub enum NoRoom {
    /// Not now: it would have to wait in line.
    Busy,
    /// No room came within the wait.
    TimedOut,
}

impl FrameBudget {
    pub fn new(bytes_max: u64) -> Arc<FrameBudget> {
        assert!(bytes_max <= FRAMES_IN_PROGRESS_BYTES_LIMIT, "validated by the configuration");
        Arc::new(FrameBudget { bytes: Arc::new(Semaphore::new(bytes_max as usize)), bytes_max })
    }

    /// The budget, in bytes.
    pub fn bytes_max(&self) -> u64 {
        self.bytes_max
    }

    /// Bytes reserved now, over every connection.
    pub fn bytes_reserved(&self) -> u64 {
        self.bytes_max - self.bytes.available_permits() as u64
    }

    /// Reserves `bytes` if there is room now and nobody waits before it.
    pub fn try_reserve(&self, bytes: u32) -> Result<Reservation, NoRoom> {
        match self.bytes.clone().try_acquire_many_owned(bytes) {
            Ok(permit) => Ok(Reservation { _permit: permit }),
            Err(_) => Err(NoRoom::Busy),
        }
    }

    /// Reserves `bytes`, waiting in line up to `wait` for room.
    pub async fn reserve(&self, bytes: u32, wait: Duration) -> Result<Reservation, NoRoom> {
        let permit = tokio::time::timeout(wait, self.bytes.clone().acquire_many_owned(bytes));
        match permit.await {
            Ok(Ok(permit)) => Ok(Reservation { _permit: permit }),
            Ok(Err(_)) => unreachable!("the budget's semaphore is never closed"),
            Err(_) => Err(NoRoom::TimedOut),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run<F: std::future::Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap().block_on(f)
    }

    #[test]
    fn reservations_are_counted_and_given_back_when_dropped() {
        let budget = FrameBudget::new(10 << 20);
        let a = budget.try_reserve(4 << 20).unwrap();
        let b = budget.try_reserve(6 << 20).unwrap();
        assert_eq!(budget.bytes_reserved(), 10 << 20);
        assert_eq!(budget.try_reserve(1).unwrap_err(), NoRoom::Busy);
        drop(a);
        assert_eq!(budget.bytes_reserved(), 6 << 20);
        let c = budget.try_reserve(4 << 20).unwrap();
        assert_eq!(budget.try_reserve(1).unwrap_err(), NoRoom::Busy);
        drop((b, c));
        assert_eq!(budget.bytes_reserved(), 0);
        assert_eq!(budget.bytes_max(), 10 << 20);
    }

    #[test]
    fn a_wait_ends_with_room_or_at_its_bound_and_gives_nothing_back_twice() {
        run(async {
            let budget = FrameBudget::new(8);
            let held = budget.try_reserve(6).unwrap();
            let started = std::time::Instant::now();
            let late = budget.reserve(4, Duration::from_millis(50)).await;
            assert_eq!(late.unwrap_err(), NoRoom::TimedOut);
            assert!(started.elapsed() >= Duration::from_millis(50));
            // The wait that gave up holds nothing.
            assert_eq!(budget.bytes_reserved(), 6);
            let waiting = budget.reserve(4, Duration::from_secs(10));
            let release = async {
                tokio::task::yield_now().await;
                drop(held);
            };
            let (got, ()) = tokio::join!(waiting, release);
            let got = got.unwrap();
            assert_eq!(budget.bytes_reserved(), 4);
            drop(got);
            assert_eq!(budget.bytes_reserved(), 0);
        })
    }

    #[test]
    fn room_goes_to_who_asked_first() {
        run(async {
            // A large frame waiting is not passed by a small one asking after it.
            let budget = FrameBudget::new(8);
            let held = budget.try_reserve(6).unwrap();
            let large = budget.reserve(8, Duration::from_secs(10));
            tokio::pin!(large);
            assert!(futures_poll(&mut large).is_none(), "the large frame waits");
            assert_eq!(budget.try_reserve(2).unwrap_err(), NoRoom::Busy, "2 are free, but queued");
            drop(held);
            let large = large.await.unwrap();
            assert_eq!(budget.bytes_reserved(), 8);
            drop(large);
        })
    }

    /// Polls `f` once.
    fn futures_poll<F: std::future::Future + Unpin>(f: &mut F) -> Option<F::Output> {
        let waker = std::task::Waker::noop();
        let mut cx = std::task::Context::from_waker(waker);
        match std::pin::Pin::new(f).poll(&mut cx) {
            std::task::Poll::Ready(v) => Some(v),
            std::task::Poll::Pending => None,
        }
    }
}
