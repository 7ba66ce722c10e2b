//! Where records come from. Each source is owned by one worker and feeds it whole lines
//! (pipes, sockets) or records (journal).

pub mod journal;
pub mod lines;
pub mod pipe;
pub mod socket;
