//! The HELLO payload: who is sending, so the receiver can de-duplicate per sender stream.
//!
//! # Format
//! ```text
//! Hello { run_id: u64, core: u16, name_len: u8, name: [u8; name_len] }   // little endian
//! ```
//! `run_id` is random per shipper process start: sequence numbers restart at 1 in each run,
//! and (run_id, core) names one sequence space.

use thiserror::Error;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hello {
    pub run_id: u64,
    pub core: u16,
    pub name: String,
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum HelloError {
    #[error("HELLO payload of {0} bytes is malformed")]
    Malformed(usize),
    #[error("HELLO name is not UTF-8")]
    Name,
}

impl Hello {
    pub fn encode(&self) -> Vec<u8> {
        let name = &self.name.as_bytes()[..self.name.len().min(super::limits::NAME_BYTES_MAX)];
        let mut out = Vec::with_capacity(11 + name.len());
        out.extend_from_slice(&self.run_id.to_le_bytes());
        out.extend_from_slice(&self.core.to_le_bytes());
        out.push(name.len() as u8);
        out.extend_from_slice(name);
        out
    }

    pub fn decode(b: &[u8]) -> Result<Hello, HelloError> {
        if b.len() < 11 || b.len() != 11 + b[10] as usize {
            return Err(HelloError::Malformed(b.len()));
        }
        Ok(Hello {
            run_id: u64::from_le_bytes(b[..8].try_into().expect("8 bytes")),
            core: u16::from_le_bytes([b[8], b[9]]),
            name: std::str::from_utf8(&b[11..]).map_err(|_| HelloError::Name)?.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_malformed() {
        let h = Hello { run_id: 9, core: 3, name: "edge-1".into() };
        assert_eq!(Hello::decode(&h.encode()), Ok(h));
        assert_eq!(Hello::decode(&[0; 10]), Err(HelloError::Malformed(10)));
        let mut bad = Hello { run_id: 1, core: 0, name: "ab".into() }.encode();
        bad[11] = 0xff;
        assert_eq!(Hello::decode(&bad), Err(HelloError::Name));
    }
}
