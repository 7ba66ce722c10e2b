//! The forward protocol's shared-key handshake: the server's HELO, the client's PING, the
//! server's PONG. Both sides prove they know the key without sending it: each sends
//! `hex(sha512(salt + hostname + nonce + key))` over the client's salt, the server's nonce and
//! its own host name.

use ring::digest::{digest, SHA512};
use thiserror::Error;

use super::message::write_str_bytes;
use super::msgpack::{Item, Malformed, Reader};

/// Bytes of the nonce the server sends in HELO.
pub const NONCE_BYTES: usize = 16;

/// Why a PING is refused (the reason also goes back in PONG).
#[derive(Debug, Error, PartialEq, Eq)]
pub enum PingError {
    #[error("malformed PING: {0}")]
    Malformed(#[from] Malformed),
    #[error("not a PING")]
    NotPing,
    #[error("shared_key mismatch")]
    KeyMismatch,
}

/// `["HELO", {"nonce": NONCE, "auth": "", "keepalive": true}]`: no user authentication.
pub fn helo(nonce: &[u8; NONCE_BYTES]) -> Vec<u8> {
    let mut out = Vec::with_capacity(64);
    rmp::encode::write_array_len(&mut out, 2).expect("a Vec grows");
    rmp::encode::write_str(&mut out, "HELO").expect("a Vec grows");
    rmp::encode::write_map_len(&mut out, 3).expect("a Vec grows");
    rmp::encode::write_str(&mut out, "nonce").expect("a Vec grows");
    rmp::encode::write_bin(&mut out, nonce).expect("a Vec grows");
    rmp::encode::write_str(&mut out, "auth").expect("a Vec grows");
    rmp::encode::write_bin(&mut out, b"").expect("a Vec grows");
    rmp::encode::write_str(&mut out, "keepalive").expect("a Vec grows");
    rmp::encode::write_bool(&mut out, true).expect("a Vec grows");
    out
}

/// `hex(sha512(salt + hostname + nonce + key))`.
pub fn proof(salt: &[u8], hostname: &[u8], nonce: &[u8], key: &[u8]) -> String {
    let input = [salt, hostname, nonce, key].concat();
    digest(&SHA512, &input).as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// Checks a complete PING message (`["PING", hostname, salt, proof, username, password]`)
/// against `key` and `nonce`; returns the client's host name and the PONG to send, or why it
/// is refused with the PONG that says so.
pub fn answer(
    ping: &[u8],
    nonce: &[u8],
    key: &[u8],
    self_hostname: &[u8],
) -> Result<(String, Vec<u8>), (PingError, Vec<u8>)> {
    let refuse = |e: PingError| {
        let pong = pong(false, &e.to_string(), b"", b"");
        (e, pong)
    };
    let (hostname, salt, claimed) = read_ping(ping).map_err(refuse)?;
    if claimed != proof(salt, hostname, nonce, key).as_bytes() {
        return Err(refuse(PingError::KeyMismatch));
    }
    let ours = proof(salt, self_hostname, nonce, key);
    let client = String::from_utf8_lossy(&hostname[..hostname.len().min(255)]).into_owned();
    Ok((client, pong(true, "", self_hostname, ours.as_bytes())))
}

/// A PING's host name, salt and proof.
type Ping<'a> = (&'a [u8], &'a [u8], &'a [u8]);

fn read_ping(ping: &[u8]) -> Result<Ping<'_>, PingError> {
    fn text<'a>(r: &mut Reader<'a>) -> Result<&'a [u8], PingError> {
        match r.read()? {
            Item::Str(s) | Item::Bin(s) => Ok(s),
            _ => Err(PingError::NotPing),
        }
    }
    let mut r = Reader::new(ping);
    if r.read()? != Item::Array(6) || text(&mut r)? != b"PING" {
        return Err(PingError::NotPing);
    }
    Ok((text(&mut r)?, text(&mut r)?, text(&mut r)?))
}

/// `["PONG", ok, reason, self_hostname, proof]`.
fn pong(ok: bool, reason: &str, self_hostname: &[u8], proof: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(160);
    rmp::encode::write_array_len(&mut out, 5).expect("a Vec grows");
    rmp::encode::write_str(&mut out, "PONG").expect("a Vec grows");
    rmp::encode::write_bool(&mut out, ok).expect("a Vec grows");
    rmp::encode::write_str(&mut out, reason).expect("a Vec grows");
    write_str_bytes(&mut out, self_hostname);
    write_str_bytes(&mut out, proof);
    out
}

/// This machine's host name (for PONG when `self_hostname` is not set).
pub fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its length; gethostname NUL-terminates within it or
    // truncates, and the last byte stays 0.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len() - 1) };
    let len = buf.iter().position(|&b| b == 0).unwrap_or(0);
    if rc != 0 || len == 0 {
        return "localhost".into();
    }
    String::from_utf8_lossy(&buf[..len]).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ping(hostname: &str, salt: &str, proof: &str) -> Vec<u8> {
        let mut out = Vec::new();
        rmp::encode::write_array_len(&mut out, 6).unwrap();
        for s in ["PING", hostname, salt, proof, "", ""] {
            rmp::encode::write_str(&mut out, s).unwrap();
        }
        out
    }

    #[test]
    fn a_client_with_the_key_gets_a_pong_proving_ours() {
        let nonce = [7u8; NONCE_BYTES];
        let hello = helo(&nonce);
        assert_eq!(&hello[..6], &[0x92, 0xa4, b'H', b'E', b'L', b'O']);
        let good = ping("edge-1", "salt", &proof(b"salt", b"edge-1", &nonce, b"secret"));
        let (client, pong) = answer(&good, &nonce, b"secret", b"agg").unwrap();
        assert_eq!(client, "edge-1");
        let mut r = Reader::new(&pong);
        assert_eq!(r.read(), Ok(Item::Array(5)));
        assert_eq!(r.read(), Ok(Item::Str(b"PONG")));
        assert_eq!(r.read(), Ok(Item::Bool(true)));
        assert_eq!(r.read(), Ok(Item::Str(b"")));
        assert_eq!(r.read(), Ok(Item::Str(b"agg")));
        let ours = proof(b"salt", b"agg", &nonce, b"secret");
        assert_eq!(r.read(), Ok(Item::Str(ours.as_bytes())));
    }

    #[test]
    fn a_wrong_key_or_a_stranger_is_refused_with_a_reason() {
        let nonce = [7u8; NONCE_BYTES];
        let bad = ping("edge-1", "salt", &proof(b"salt", b"edge-1", &nonce, b"guess"));
        let (e, pong) = answer(&bad, &nonce, b"secret", b"agg").unwrap_err();
        assert_eq!(e, PingError::KeyMismatch);
        let mut r = Reader::new(&pong);
        assert_eq!(
            (r.read(), r.read(), r.read()),
            (Ok(Item::Array(5)), Ok(Item::Str(b"PONG")), Ok(Item::Bool(false)))
        );
        assert_eq!(r.read(), Ok(Item::Str(b"shared_key mismatch")));
        let (e, _) = answer(&[0x93, 0xa1, b'x', 0x01, 0x02], &nonce, b"k", b"a").unwrap_err();
        assert_eq!(e, PingError::NotPing);
        let (e, _) = answer(&[0x96, 0xa4], &nonce, b"k", b"a").unwrap_err();
        assert_eq!(e, PingError::Malformed(Malformed::Truncated));
    }
}
