//! Where batches go. `receiver` is the sink to `shipper receive` over the framed protocol;
//! `quarantine` keeps the frames a receiver refused for good on the shipper's disk.

pub mod quarantine;
pub mod receiver;
