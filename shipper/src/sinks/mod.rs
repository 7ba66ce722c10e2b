//! Where frames go. `delivery` sends them to `shipper receive` (the receiver process) over the
//! framed protocol and takes the acknowledgements back; `quarantine` keeps the frames a
//! receiver refused for good on the shipper's disk.

pub mod delivery;
pub mod quarantine;
