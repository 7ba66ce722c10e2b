//! What a source hands its worker, and what it learns back: the types both sides of the
//! sources' seam share (`sources::Intake` on one side, `transforms::Chain` on the other).

/// A source's index in its worker, given when the worker registers it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SourceId(pub u32);

/// One record as a source hands it over.
#[derive(Clone, Copy, Debug)]
pub struct Record<'a> {
    pub bytes: &'a [u8],
    /// The service, when the source knows it (a journal entry's identifier); otherwise the
    /// transforms find it in the record or use the source's `service`.
    pub key: Option<&'a [u8]>,
    /// The stream the record goes to, when the source knows it; otherwise the transforms
    /// name it (a cfjs1 `format`, else the service).
    pub stream: Option<&'a [u8]>,
    /// A durable source's position after this record (a journal cursor): it comes back to
    /// the source's `sources::Marks` once the frame holding the record is acknowledged.
    pub mark: Option<&'a [u8]>,
}

impl<'a> Record<'a> {
    /// A record whose service and stream the transforms find.
    pub fn bare(bytes: &'a [u8]) -> Record<'a> {
        Record { bytes, key: None, stream: None, mark: None }
    }
}

/// What the transforms made of one record, for the source's own counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Outcome {
    /// Keys (service, stream) cut to the protocol's key limit: 0, 1 or 2.
    pub keys_cut: u8,
    /// The record did not parse as its source's format says (it is kept as text): the index
    /// of the failure in the source kind's failure list (`parse::Failure` for lines,
    /// `syslog::Failure` for socket messages).
    pub failure: Option<u8>,
    /// The chain dropped the record (rate limit): no frame holds it, and its mark is not
    /// registered (a source that waits for its records' frames must not wait for this one).
    pub dropped: bool,
}
