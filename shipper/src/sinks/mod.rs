//! Where batches go. `receiver` is the sink to `shipper receive` over the framed protocol.

pub mod receiver;
