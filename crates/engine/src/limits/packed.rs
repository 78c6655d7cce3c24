//! Rate-limit cells packed for a sync entry.
//!
//! A sync entry carries up to thousands of cells every interval, so its
//! encoding is on the leader's busiest background path. Each cell is packed
//! as the key's length (LEB128 varint), the key's bytes, then the cell's
//! five fields as varints; in the log's JSON the whole list is one base64
//! string, which encodes and decodes at memory speed instead of a JSON array
//! and a `String` per cell.

use std::fmt;

use serde::de::{self, Deserializer, Visitor};
use serde::{Deserialize, Serialize, Serializer};

use super::Cell;

#[derive(Clone, Default, PartialEq, Eq)]
pub struct PackedCells {
    bytes: Vec<u8>,
    count: usize,
}

impl fmt::Debug for PackedCells {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "PackedCells({} cells, {} bytes)",
            self.count,
            self.bytes.len()
        )
    }
}

impl PackedCells {
    pub fn push(&mut self, key: &str, cell: Cell) {
        put_varint(&mut self.bytes, key.len() as u64);
        self.bytes.extend_from_slice(key.as_bytes());
        for v in [
            u64::from(cell.tag),
            u64::from(cell.aux),
            cell.a,
            cell.b,
            cell.c,
        ] {
            put_varint(&mut self.bytes, v);
        }
        self.count += 1;
    }

    pub fn len(&self) -> usize {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Packed size in bytes (what the sync entry carries, before base64).
    pub fn byte_len(&self) -> usize {
        self.bytes.len()
    }

    /// The cells in the order they were pushed.
    pub fn iter(&self) -> impl Iterator<Item = (&str, Cell)> + '_ {
        let mut rest = self.bytes.as_slice();
        // Well-formed by construction (pushed, or checked when decoded).
        std::iter::from_fn(move || take_cell(&mut rest))
    }

    /// Checks packed bytes (from a log entry or a peer) cell by cell.
    fn from_bytes(bytes: Vec<u8>) -> Result<Self, &'static str> {
        let mut rest = bytes.as_slice();
        let mut count = 0;
        while !rest.is_empty() {
            take_cell(&mut rest).ok_or("malformed packed rate-limit cells")?;
            count += 1;
        }
        Ok(Self { bytes, count })
    }
}

impl FromIterator<(String, Cell)> for PackedCells {
    fn from_iter<I: IntoIterator<Item = (String, Cell)>>(iter: I) -> Self {
        let mut p = Self::default();
        for (k, c) in iter {
            p.push(&k, c);
        }
        p
    }
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push(v as u8 | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn take_varint(buf: &mut &[u8]) -> Option<u64> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let (&b, rest) = buf.split_first()?;
        *buf = rest;
        v |= u64::from(b & 0x7f).checked_shl(shift)?;
        if b < 0x80 {
            return Some(v);
        }
    }
    None
}

fn take_cell<'a>(buf: &mut &'a [u8]) -> Option<(&'a str, Cell)> {
    let len = usize::try_from(take_varint(buf)?).ok()?;
    if buf.len() < len {
        return None;
    }
    let (key, rest) = buf.split_at(len);
    *buf = rest;
    let key = std::str::from_utf8(key).ok()?;
    let tag = u32::try_from(take_varint(buf)?).ok()?;
    let aux = u32::try_from(take_varint(buf)?).ok()?;
    let (a, b, c) = (take_varint(buf)?, take_varint(buf)?, take_varint(buf)?);
    Some((key, Cell { tag, aux, a, b, c }))
}

const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// Standard base64 with padding.
fn base64_encode(bytes: &[u8]) -> String {
    let sextet = |n: u32, i: u32| ALPHABET[(n >> (18 - 6 * i) & 63) as usize];
    let mut out = Vec::with_capacity(bytes.len().div_ceil(3) * 4);
    let mut chunks = bytes.chunks_exact(3);
    for c in &mut chunks {
        let n = u32::from(c[0]) << 16 | u32::from(c[1]) << 8 | u32::from(c[2]);
        out.extend_from_slice(&[sextet(n, 0), sextet(n, 1), sextet(n, 2), sextet(n, 3)]);
    }
    match *chunks.remainder() {
        [a] => {
            let n = u32::from(a) << 16;
            out.extend_from_slice(&[sextet(n, 0), sextet(n, 1), b'=', b'=']);
        }
        [a, b] => {
            let n = u32::from(a) << 16 | u32::from(b) << 8;
            out.extend_from_slice(&[sextet(n, 0), sextet(n, 1), sextet(n, 2), b'=']);
        }
        _ => {}
    }
    String::from_utf8(out).expect("base64 is ASCII")
}

fn base64_decode(text: &str) -> Option<Vec<u8>> {
    let text = text.as_bytes();
    if !text.len().is_multiple_of(4) {
        return None;
    }
    let mut out = Vec::with_capacity(text.len() / 4 * 3);
    let quads = text.len() / 4;
    for (q, quad) in text.chunks(4).enumerate() {
        let pad = if q + 1 == quads {
            quad.iter().rev().take_while(|&&c| c == b'=').count()
        } else {
            0
        };
        if pad > 2 {
            return None;
        }
        let mut n = 0u32;
        for &c in &quad[..4 - pad] {
            let v = match c {
                b'A'..=b'Z' => c - b'A',
                b'a'..=b'z' => c - b'a' + 26,
                b'0'..=b'9' => c - b'0' + 52,
                b'+' => 62,
                b'/' => 63,
                _ => return None,
            };
            n = n << 6 | u32::from(v);
        }
        n <<= 6 * pad as u32;
        out.extend_from_slice(&n.to_be_bytes()[1..4 - pad]);
    }
    Some(out)
}

impl Serialize for PackedCells {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&base64_encode(&self.bytes))
    }
}

impl<'de> Deserialize<'de> for PackedCells {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Base64;
        impl Visitor<'_> for Base64 {
            type Value = PackedCells;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("base64-encoded packed rate-limit cells")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<PackedCells, E> {
                let bytes = base64_decode(v).ok_or_else(|| E::custom("invalid base64"))?;
                PackedCells::from_bytes(bytes).map_err(E::custom)
            }
        }
        d.deserialize_str(Base64)
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn cell(tag: u32, aux: u32, a: u64, b: u64, c: u64) -> Cell {
        Cell { tag, aux, a, b, c }
    }

    #[test]
    fn base64_matches_the_standard_vectors() {
        for (raw, enc) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64_encode(raw.as_bytes()), enc);
            assert_eq!(base64_decode(enc).as_deref(), Some(raw.as_bytes()));
        }
        for bad in ["Zg=", "Z===", "Zm9v!A==", "=Zg="] {
            assert_eq!(base64_decode(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn malformed_cells_are_refused_when_decoded() {
        let mut p = PackedCells::default();
        p.push("key", cell(1, 2, 3, u64::MAX, 5));
        let whole = p.bytes.clone();
        for cut in 1..whole.len() {
            let json = serde_json::to_string(&base64_encode(&whole[..cut])).unwrap();
            assert!(
                serde_json::from_str::<PackedCells>(&json).is_err(),
                "a cell cut at {cut} bytes was accepted"
            );
        }
        // A key that is not UTF-8.
        let json = serde_json::to_string(&base64_encode(&[1, 0xff, 1, 0, 0, 0, 0])).unwrap();
        assert!(serde_json::from_str::<PackedCells>(&json).is_err());
        // A tag beyond u32.
        let mut over = vec![1, b'k'];
        put_varint(&mut over, u64::from(u32::MAX) + 1);
        over.extend_from_slice(&[0, 0, 0, 0]);
        let json = serde_json::to_string(&base64_encode(&over)).unwrap();
        assert!(serde_json::from_str::<PackedCells>(&json).is_err());
    }

    proptest! {
        #[test]
        fn cells_round_trip_through_json(
            cells in proptest::collection::vec(
                ("\\PC{0,40}", any::<u32>(), any::<u32>(), any::<u64>(), any::<u64>(), any::<u64>()),
                0..50,
            )
        ) {
            let packed: PackedCells = cells
                .iter()
                .map(|(k, t, x, a, b, c)| (k.clone(), cell(*t, *x, *a, *b, *c)))
                .collect();
            prop_assert_eq!(packed.len(), cells.len());
            let json = serde_json::to_string(&packed).unwrap();
            let back: PackedCells = serde_json::from_str(&json).unwrap();
            prop_assert_eq!(&back, &packed);
            let got: Vec<_> = back.iter().map(|(k, c)| (k.to_owned(), c)).collect();
            let want: Vec<_> = cells
                .iter()
                .map(|(k, t, x, a, b, c)| (k.clone(), cell(*t, *x, *a, *b, *c)))
                .collect();
            prop_assert_eq!(got, want);
        }
    }
}
