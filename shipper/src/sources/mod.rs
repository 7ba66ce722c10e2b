//! Where records come from. Each source is owned by one worker and feeds it whole lines.

pub mod journal;
pub mod lines;
pub mod pipe;
