//! Where records come from. Each source is owned by one worker and feeds it whole lines
//! (pipes, sockets) or records (journal).

pub mod journal;
pub mod lines;
pub mod pipe;
pub mod socket;

use std::io;
use std::time::Duration;

use tokio::sync::watch;

/// Reads `file` (a FIFO or a datagram socket: no position, offset 0 is ignored) into a buffer
/// of `capacity` bytes until `stop`, handing each read's bytes to `on_read`. A failed read
/// goes to `on_error` and is tried again 100 ms later.
pub async fn read_until_stopped(
    file: tokio_uring::fs::File,
    capacity: usize,
    mut stop: watch::Receiver<bool>,
    mut on_read: impl FnMut(&[u8]),
    mut on_error: impl FnMut(&io::Error),
) {
    let mut buf = Vec::with_capacity(capacity);
    loop {
        if *stop.borrow() {
            return;
        }
        buf.clear();
        let (res, b) = tokio::select! {
            r = file.read_at(buf, 0) => r,
            _ = stop.changed() => return,
        };
        buf = b;
        match res {
            Ok(n) => on_read(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                on_error(&e);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}
