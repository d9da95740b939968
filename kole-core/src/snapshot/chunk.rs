//! The fixed binary chunk header, and the checks every chunk passes before it is decompressed.
//!
//! A chunk is a 44-byte header followed by the compressed payload. All integers little-endian:
//!
//! | offset | size | field |
//! |---:|---:|---|
//! | 0 | 4 | magic `KOLC` |
//! | 4 | 2 | format version ([`FORMAT_VERSION`]) |
//! | 6 | 1 | codec ([`Codec`]: 1 gzip, 2 lz4) |
//! | 7 | 1 | section kind ([`SectionKind`]: 1 dictionary, 2 nodes) |
//! | 8 | 8 | generation |
//! | 16 | 8 | snapshot id (random per write) |
//! | 24 | 4 | chunk index |
//! | 28 | 4 | chunk count of the generation |
//! | 32 | 4 | decompressed payload length |
//! | 36 | 4 | compressed payload length |
//! | 40 | 4 | CRC-32 (IEEE) of bytes 0..40 followed by the payload |

use serde::{Deserialize, Serialize};

use super::{ChunkFault, Codec, FORMAT_VERSION};

/// Bytes of the fixed chunk header.
pub const CHUNK_HEADER_LEN: usize = 44;
/// First four bytes of every chunk.
pub const CHUNK_MAGIC: [u8; 4] = *b"KOLC";

/// What a chunk's payload holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum SectionKind {
    /// A piece of the dictionary: strings, label sets, platforms, workload-state sets, digests.
    Dictionary = 1,
    /// A run of nodes, in name order, one column per field.
    Nodes = 2,
}

/// The decoded fixed header of a chunk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChunkHeader {
    /// Format version.
    pub version: u16,
    /// Codec byte (see [`Codec`]).
    pub codec: u8,
    /// Section kind byte (see [`SectionKind`]).
    pub section: u8,
    /// Generation.
    pub generation: u64,
    /// Snapshot id: unique per write.
    pub snapshot_id: u64,
    /// Index of this chunk.
    pub index: u32,
    /// Chunks in the generation.
    pub count: u32,
    /// Decompressed payload length.
    pub raw_len: u32,
    /// Compressed payload length.
    pub payload_len: u32,
    /// CRC-32 over bytes 0..40 and the payload.
    pub checksum: u32,
}

impl ChunkHeader {
    /// Writes the header (checksum included) into the first [`CHUNK_HEADER_LEN`] bytes of `chunk`,
    /// whose remaining bytes are the payload.
    pub(crate) fn seal(mut self, chunk: &mut [u8]) -> u32 {
        let (head, payload) = chunk.split_at_mut(CHUNK_HEADER_LEN);
        self.payload_len = payload.len() as u32;
        head[0..4].copy_from_slice(&CHUNK_MAGIC);
        head[4..6].copy_from_slice(&self.version.to_le_bytes());
        head[6] = self.codec;
        head[7] = self.section;
        head[8..16].copy_from_slice(&self.generation.to_le_bytes());
        head[16..24].copy_from_slice(&self.snapshot_id.to_le_bytes());
        head[24..28].copy_from_slice(&self.index.to_le_bytes());
        head[28..32].copy_from_slice(&self.count.to_le_bytes());
        head[32..36].copy_from_slice(&self.raw_len.to_le_bytes());
        head[36..40].copy_from_slice(&self.payload_len.to_le_bytes());
        let crc = checksum(&head[..40], payload);
        head[40..44].copy_from_slice(&crc.to_le_bytes());
        crc
    }

    /// Parses the header fields without judging them (beyond length and magic).
    pub fn parse(chunk: &[u8]) -> Result<Self, ChunkFault> {
        let Some(h) = chunk.get(..CHUNK_HEADER_LEN) else {
            return Err(ChunkFault::Truncated { len: chunk.len() });
        };
        if h[0..4] != CHUNK_MAGIC {
            return Err(ChunkFault::BadMagic);
        }
        let u16_at = |o: usize| u16::from_le_bytes([h[o], h[o + 1]]);
        let u32_at = |o: usize| u32::from_le_bytes([h[o], h[o + 1], h[o + 2], h[o + 3]]);
        let u64_at = |o: usize| u64::from(u32_at(o)) | (u64::from(u32_at(o + 4)) << 32);
        Ok(Self {
            version: u16_at(4),
            codec: h[6],
            section: h[7],
            generation: u64_at(8),
            snapshot_id: u64_at(16),
            index: u32_at(24),
            count: u32_at(28),
            raw_len: u32_at(32),
            payload_len: u32_at(36),
            checksum: u32_at(40),
        })
    }
}

/// What a chunk is expected to be: from its manifest and position.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Expected {
    pub(crate) codec: Codec,
    pub(crate) section: SectionKind,
    pub(crate) generation: u64,
    pub(crate) snapshot_id: u64,
    pub(crate) index: u32,
    pub(crate) count: u32,
    pub(crate) checksum: u32,
    pub(crate) max_raw_len: u64,
}

/// Checks everything the header promises, in the order that gives the most precise complaint;
/// returns the header and the compressed payload.
pub(crate) fn open<'a>(chunk: &'a [u8], want: &Expected) -> Result<(ChunkHeader, &'a [u8]), ChunkFault> {
    let h = ChunkHeader::parse(chunk)?;
    let payload = &chunk[CHUNK_HEADER_LEN..];
    if h.payload_len as usize != payload.len() {
        return Err(ChunkFault::LengthMismatch { header: h.payload_len, actual: payload.len() });
    }
    let computed = checksum(&chunk[..40], payload);
    if computed != h.checksum {
        return Err(ChunkFault::Checksum { stored: h.checksum, computed });
    }
    // Intact from here on: what remains is whether it belongs.
    if h.version != FORMAT_VERSION {
        return Err(ChunkFault::UnsupportedVersion { found: h.version });
    }
    if Codec::from_u8(h.codec).is_none() {
        return Err(ChunkFault::UnknownCodec { found: h.codec });
    }
    if h.codec != want.codec as u8 {
        return Err(ChunkFault::CodecMismatch { found: h.codec });
    }
    if h.section != want.section as u8 {
        return Err(ChunkFault::SectionMismatch { found: h.section });
    }
    if h.generation != want.generation {
        return Err(ChunkFault::WrongGeneration { found: h.generation });
    }
    if h.snapshot_id != want.snapshot_id {
        return Err(ChunkFault::WrongSnapshot { found: h.snapshot_id, expected: want.snapshot_id });
    }
    if h.index != want.index {
        return Err(ChunkFault::WrongIndex { found: h.index });
    }
    if h.count != want.count {
        return Err(ChunkFault::WrongCount { found: h.count, expected: want.count });
    }
    if h.checksum != want.checksum {
        return Err(ChunkFault::NotInManifest { found: h.checksum, expected: want.checksum });
    }
    if u64::from(h.raw_len) > want.max_raw_len {
        return Err(ChunkFault::TooLarge { raw_len: u64::from(h.raw_len), limit: want.max_raw_len });
    }
    Ok((h, payload))
}

/// CRC-32 of `head` followed by `payload`.
pub(crate) fn checksum(head: &[u8], payload: &[u8]) -> u32 {
    let mut crc = flate2::Crc::new();
    crc.update(head);
    crc.update(payload);
    crc.sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<u8> {
        let mut chunk = vec![0u8; CHUNK_HEADER_LEN];
        chunk.extend_from_slice(b"payload bytes");
        ChunkHeader {
            version: FORMAT_VERSION,
            codec: Codec::Lz4 as u8,
            section: SectionKind::Nodes as u8,
            generation: 42,
            snapshot_id: 0xfeed,
            index: 7,
            count: 9,
            raw_len: 100,
            payload_len: 0,
            checksum: 0,
        }
        .seal(&mut chunk);
        chunk
    }

    fn expected(chunk: &[u8]) -> Expected {
        Expected {
            codec: Codec::Lz4,
            section: SectionKind::Nodes,
            generation: 42,
            snapshot_id: 0xfeed,
            index: 7,
            count: 9,
            checksum: ChunkHeader::parse(chunk).unwrap().checksum,
            max_raw_len: 1000,
        }
    }

    #[test]
    fn header_round_trips_and_layout_is_pinned() {
        let chunk = sample();
        assert_eq!(&chunk[..4], b"KOLC");
        assert_eq!(&chunk[8..16], &42u64.to_le_bytes());
        assert_eq!(&chunk[24..28], &7u32.to_le_bytes());
        let (h, payload) = open(&chunk, &expected(&chunk)).unwrap();
        assert_eq!((h.generation, h.index, h.count, h.raw_len), (42, 7, 9, 100));
        assert_eq!(payload, b"payload bytes");
    }

    #[test]
    fn every_header_check_fires() {
        let chunk = sample();
        let want = expected(&chunk);
        assert!(matches!(open(&chunk[..10], &want), Err(ChunkFault::Truncated { len: 10 })));
        assert!(matches!(open(&chunk[..chunk.len() - 1], &want), Err(ChunkFault::LengthMismatch { .. })));
        let mut bad = chunk.clone();
        bad[50] ^= 1;
        assert!(matches!(open(&bad, &want), Err(ChunkFault::Checksum { .. })));
        let other = |f: &dyn Fn(&mut Expected)| {
            let mut w = want;
            f(&mut w);
            open(&chunk, &w).unwrap_err()
        };
        assert_eq!(other(&|w| w.generation = 41), ChunkFault::WrongGeneration { found: 42 });
        assert!(matches!(other(&|w| w.snapshot_id = 1), ChunkFault::WrongSnapshot { .. }));
        assert_eq!(other(&|w| w.index = 6), ChunkFault::WrongIndex { found: 7 });
        assert!(matches!(other(&|w| w.count = 8), ChunkFault::WrongCount { .. }));
        assert!(matches!(other(&|w| w.codec = Codec::Gzip), ChunkFault::CodecMismatch { .. }));
        assert!(matches!(other(&|w| w.section = SectionKind::Dictionary), ChunkFault::SectionMismatch { .. }));
        assert!(matches!(other(&|w| w.checksum ^= 1), ChunkFault::NotInManifest { .. }));
        assert!(matches!(other(&|w| w.max_raw_len = 99), ChunkFault::TooLarge { .. }));
        let msg = crate::snapshot::SnapshotError::Chunk {
            generation: 42,
            index: 7,
            fault: ChunkFault::Checksum { stored: 1, computed: 2 },
        }
        .to_string();
        assert!(msg.starts_with("snapshot chunk 7 of generation 42 failed its checksum"), "{msg}");
    }
}
