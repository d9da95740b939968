//! The manifest: what one generation consists of. Committing it is what makes a generation exist.

use serde::{Deserialize, Serialize};

use super::{Codec, FORMAT_VERSION, SectionKind, SnapshotError};
use crate::model::Timestamp;

/// First four bytes of an encoded manifest.
pub const MANIFEST_MAGIC: [u8; 4] = *b"KOLM";

/// One chunk as the manifest records it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkInfo {
    /// What the chunk holds.
    pub section: SectionKind,
    /// Stored size in bytes, header included.
    pub bytes: u32,
    /// Decompressed payload length.
    pub raw_len: u32,
    /// Nodes (node sections) or dictionary entries (dictionary sections) it holds.
    pub items: u32,
    /// The CRC-32 from the chunk's header.
    pub checksum: u32,
}

/// Describes one complete snapshot generation. The chunk at index `i` is `chunks[i]`; dictionary
/// chunks come first.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// Format version of the chunks.
    pub format_version: u16,
    /// Generation number: increases with every write to a store.
    pub generation: u64,
    /// Random per write, so chunks of two writes of the same generation number never mix.
    pub snapshot_id: u64,
    /// Codec of every chunk.
    pub codec: Codec,
    /// When the snapshot was taken (the caller's clock).
    pub created_at: Timestamp,
    /// Nodes in the snapshot.
    pub node_count: u64,
    /// Chunks in the generation (equals `chunks.len()`).
    pub chunk_count: u32,
    /// Per chunk: section, size, checksum.
    pub chunks: Vec<ChunkInfo>,
    /// Sum of the chunks' stored sizes.
    pub total_bytes: u64,
    /// The writer's fencing token ([`SnapshotOptions::fencing_token`](super::SnapshotOptions)):
    /// a store shared by several writers refuses a commit or prune under a token older than the
    /// newest it holds. 0 for unfenced writers and for manifests written before tokens existed.
    ///
    /// Stored after the postcard body (8 bytes, little endian) rather than in it, so manifests
    /// without it still decode (as 0) and older builds, which ignore trailing bytes, still read
    /// manifests with it.
    #[serde(skip)]
    pub fencing_token: u64,
}

impl Manifest {
    /// Checks that the manifest agrees with itself and with this build.
    pub fn validate(&self) -> Result<(), SnapshotError> {
        let bad = |reason: String| SnapshotError::InvalidManifest { generation: Some(self.generation), reason };
        if self.format_version != FORMAT_VERSION {
            return Err(SnapshotError::UnsupportedVersion {
                generation: self.generation,
                found: self.format_version,
                supported: FORMAT_VERSION,
            });
        }
        if self.chunk_count as usize != self.chunks.len() {
            return Err(bad(format!("chunk_count {} but {} chunks listed", self.chunk_count, self.chunks.len())));
        }
        let total: u64 = self.chunks.iter().map(|c| u64::from(c.bytes)).sum();
        if total != self.total_bytes {
            return Err(bad(format!("total_bytes {} but chunks add up to {total}", self.total_bytes)));
        }
        let dict = self.chunks.iter().take_while(|c| c.section == SectionKind::Dictionary).count();
        if dict == 0 || self.chunks[dict..].iter().any(|c| c.section != SectionKind::Nodes) {
            return Err(bad("chunks must be one or more dictionary sections, then node sections".into()));
        }
        let nodes: u64 = self.chunks[dict..].iter().map(|c| u64::from(c.items)).sum();
        if nodes != self.node_count {
            return Err(bad(format!("node_count {} but node chunks hold {nodes}", self.node_count)));
        }
        Ok(())
    }

    /// Chunks that hold dictionary sections (they come first).
    pub fn dictionary_chunks(&self) -> usize {
        self.chunks.iter().take_while(|c| c.section == SectionKind::Dictionary).count()
    }

    /// The manifest's stored form: magic, format version (u16 LE), postcard body, the fencing
    /// token (u64 LE, omitted when 0), CRC-32 (u32 LE) of everything before it.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(64 + self.chunks.len() * 16);
        out.extend_from_slice(&MANIFEST_MAGIC);
        out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        // Serializing plain integers and enums into a Vec cannot fail.
        if let Ok(body) = postcard::to_stdvec(self) {
            out.extend_from_slice(&body);
        }
        if self.fencing_token != 0 {
            out.extend_from_slice(&self.fencing_token.to_le_bytes());
        }
        let mut crc = flate2::Crc::new();
        crc.update(&out);
        out.extend_from_slice(&crc.sum().to_le_bytes());
        out
    }

    /// Parses and validates a stored manifest. `max_bytes` bounds what is accepted at all.
    pub fn from_bytes(bytes: &[u8], max_bytes: usize) -> Result<Self, SnapshotError> {
        let bad = |reason: &str| SnapshotError::InvalidManifest { generation: None, reason: reason.to_owned() };
        if bytes.len() > max_bytes {
            return Err(bad("larger than the manifest size limit"));
        }
        if bytes.len() < 10 {
            return Err(bad("truncated"));
        }
        if bytes[..4] != MANIFEST_MAGIC {
            return Err(bad("bad magic"));
        }
        let (body, tail) = bytes.split_at(bytes.len() - 4);
        let mut crc = flate2::Crc::new();
        crc.update(body);
        if crc.sum().to_le_bytes() != tail {
            return Err(bad("failed its checksum"));
        }
        let version = u16::from_le_bytes([body[4], body[5]]);
        if version != FORMAT_VERSION {
            return Err(bad("unknown manifest format version"));
        }
        let (mut m, rest): (Manifest, &[u8]) = postcard::take_from_bytes(&body[6..]).map_err(|e| {
            SnapshotError::InvalidManifest { generation: None, reason: format!("does not decode: {e}") }
        })?;
        m.fencing_token = match rest {
            [] => 0,
            t => u64::from_le_bytes(t.try_into().map_err(|_| bad("trailing bytes after the body"))?),
        };
        m.validate()?;
        Ok(m)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample() -> Manifest {
        let chunks = vec![
            ChunkInfo { section: SectionKind::Dictionary, bytes: 100, raw_len: 300, items: 12, checksum: 1 },
            ChunkInfo { section: SectionKind::Nodes, bytes: 200, raw_len: 900, items: 40, checksum: 2 },
        ];
        Manifest {
            format_version: FORMAT_VERSION,
            generation: 42,
            snapshot_id: 0xabc,
            codec: Codec::Gzip,
            created_at: Timestamp::from_secs(1_700_000_000),
            node_count: 40,
            chunk_count: 2,
            chunks,
            total_bytes: 300,
            fencing_token: 0,
        }
    }

    #[test]
    fn round_trips_and_detects_damage() {
        let m = sample();
        let bytes = m.to_bytes();
        assert_eq!(Manifest::from_bytes(&bytes, 1 << 20).unwrap(), m);
        for i in 0..bytes.len() {
            let mut b = bytes.clone();
            b[i] ^= 0x10;
            assert!(Manifest::from_bytes(&b, 1 << 20).is_err(), "flip at {i}");
        }
        assert!(Manifest::from_bytes(&bytes[..bytes.len() - 1], 1 << 20).is_err());
        assert!(Manifest::from_bytes(&bytes, 10).is_err());
        let mut wrong = sample();
        wrong.node_count = 41;
        assert!(Manifest::from_bytes(&wrong.to_bytes(), 1 << 20).is_err());
    }

    #[test]
    fn fencing_token_round_trips_and_old_manifests_read_as_zero() {
        // Without a token the stored form is exactly the one written before tokens existed.
        let old = sample();
        let old_bytes = old.to_bytes();
        let mut framed = MANIFEST_MAGIC.to_vec();
        framed.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        framed.extend_from_slice(&postcard::to_stdvec(&old).unwrap());
        let mut crc = flate2::Crc::new();
        crc.update(&framed);
        framed.extend_from_slice(&crc.sum().to_le_bytes());
        assert_eq!(old_bytes, framed);
        assert_eq!(Manifest::from_bytes(&old_bytes, 1 << 20).unwrap().fencing_token, 0);

        let fenced = Manifest { fencing_token: 0x0102_0304_0506_0708, ..sample() };
        let bytes = fenced.to_bytes();
        assert_eq!(bytes.len(), old_bytes.len() + 8);
        assert_eq!(Manifest::from_bytes(&bytes, 1 << 20).unwrap(), fenced);
        // An older build decodes the body with postcard::from_bytes, which ignores the trailer.
        let body = &bytes[6..bytes.len() - 4];
        let seen_by_old: Manifest = postcard::from_bytes(body).unwrap();
        assert_eq!(seen_by_old, Manifest { fencing_token: 0, ..fenced });
    }

    proptest! {
        #[test]
        fn manifest_decoder_is_total(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = Manifest::from_bytes(&bytes, 1 << 20);
            let mut framed = MANIFEST_MAGIC.to_vec();
            framed.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
            framed.extend_from_slice(&bytes);
            let mut crc = flate2::Crc::new();
            crc.update(&framed);
            framed.extend_from_slice(&crc.sum().to_le_bytes());
            let _ = Manifest::from_bytes(&framed, 1 << 20);
        }
    }
}
