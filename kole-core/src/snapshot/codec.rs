//! Chunk compression: gzip's DEFLATE (flate2) and LZ4 blocks (lz4_flex), each bounded on the way
//! back in.

use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};
use serde::{Deserialize, Serialize};

use super::ChunkFault;

/// How chunk payloads are compressed. Each chunk is compressed on its own, so restore
/// decompresses chunks in parallel.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Codec {
    /// DEFLATE (RFC 1951), the compression of gzip, as a raw stream: the chunk header already
    /// carries the length and a CRC, so gzip's own wrapper would only repeat them. Smallest
    /// snapshots; the default.
    #[default]
    Gzip = 1,
    /// LZ4 block format: several times faster to compress and decompress, larger output.
    Lz4 = 2,
}

impl Codec {
    pub(crate) fn from_u8(b: u8) -> Option<Self> {
        match b {
            1 => Some(Self::Gzip),
            2 => Some(Self::Lz4),
            _ => None,
        }
    }

    /// Lower-case name (`gzip`, `lz4`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Gzip => "gzip",
            Self::Lz4 => "lz4",
        }
    }
}

/// Appends the compressed form of `raw` to `out`. `level` is gzip's 0..=9 (ignored by lz4).
pub(crate) fn compress(codec: Codec, level: u32, raw: &[u8], out: &mut Vec<u8>) {
    match codec {
        Codec::Gzip => {
            let mut z = Compress::new(Compression::new(level.min(9)), false);
            let start_in = z.total_in();
            loop {
                out.reserve(raw.len() / 2 + 1024);
                let consumed = (z.total_in() - start_in) as usize;
                match z.compress_vec(&raw[consumed..], out, FlushCompress::Finish) {
                    Ok(Status::StreamEnd) => break,
                    Ok(_) => continue,
                    // Compressing into a growing buffer cannot fail; fall back to a stored block
                    // so the output still decodes should a future backend disagree.
                    Err(_) => {
                        out.clear();
                        stored_deflate(raw, out);
                        break;
                    }
                }
            }
        }
        Codec::Lz4 => {
            let start = out.len();
            out.resize(start + lz4_flex::block::get_maximum_output_size(raw.len()), 0);
            match lz4_flex::block::compress_into(raw, &mut out[start..]) {
                Ok(n) => out.truncate(start + n),
                // Unreachable with a maximum-size buffer; an empty payload then fails loudly on restore
                // unless the input was empty too.
                Err(_) => out.truncate(start),
            }
        }
    }
}

/// DEFLATE stored blocks: the trivially correct encoding.
fn stored_deflate(raw: &[u8], out: &mut Vec<u8>) {
    let mut blocks = raw.chunks(65_535).peekable();
    if blocks.peek().is_none() {
        out.extend_from_slice(&[1, 0, 0, 0xff, 0xff]);
    }
    while let Some(b) = blocks.next() {
        out.push(u8::from(blocks.peek().is_none()));
        let len = b.len() as u16;
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(&(!len).to_le_bytes());
        out.extend_from_slice(b);
    }
}

/// Decompresses `payload` to exactly `raw_len` bytes; anything else is a fault. Never allocates
/// more than `raw_len` bytes (the caller has checked it against its limit).
pub(crate) fn decompress(codec: Codec, payload: &[u8], raw_len: usize) -> Result<Vec<u8>, ChunkFault> {
    match codec {
        Codec::Gzip => {
            let mut z = Decompress::new(false);
            let mut out = Vec::with_capacity(raw_len);
            let status = z
                .decompress_vec(payload, &mut out, FlushDecompress::Finish)
                .map_err(|e| ChunkFault::Decompress { reason: e.to_string() })?;
            match status {
                Status::StreamEnd if out.len() == raw_len => {
                    if z.total_in() as usize != payload.len() {
                        return Err(ChunkFault::Decompress {
                            reason: "trailing bytes after the compressed stream".into(),
                        });
                    }
                    Ok(out)
                }
                Status::StreamEnd => {
                    Err(ChunkFault::RawLengthMismatch { declared: raw_len as u32, actual: out.len() as u64 })
                }
                _ if out.len() == raw_len => {
                    // Output full but the stream goes on: longer than declared (or cut short).
                    let mut probe = [0u8; 1];
                    match z.decompress(&payload[z.total_in() as usize..], &mut probe, FlushDecompress::Finish) {
                        Ok(_) if z.total_out() as usize > raw_len => {
                            Err(ChunkFault::RawLengthMismatch { declared: raw_len as u32, actual: z.total_out() })
                        }
                        _ => Err(ChunkFault::Decompress { reason: "compressed stream is cut short".into() }),
                    }
                }
                _ => Err(ChunkFault::Decompress { reason: "compressed stream is cut short".into() }),
            }
        }
        Codec::Lz4 => {
            let mut out = vec![0u8; raw_len];
            let n = lz4_flex::block::decompress_into(payload, &mut out)
                .map_err(|e| ChunkFault::Decompress { reason: e.to_string() })?;
            if n != raw_len {
                return Err(ChunkFault::RawLengthMismatch { declared: raw_len as u32, actual: n as u64 });
            }
            Ok(out)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_codecs_round_trip_and_reject_wrong_lengths() {
        let raw: Vec<u8> = (0..50_000u32).flat_map(|i| (i % 251).to_le_bytes()).collect();
        for codec in [Codec::Gzip, Codec::Lz4] {
            let mut out = vec![9, 9];
            compress(codec, 1, &raw, &mut out);
            assert_eq!(&out[..2], &[9, 9], "appends");
            let payload = &out[2..];
            assert!(payload.len() < raw.len() / 2, "{codec:?} compresses");
            assert_eq!(decompress(codec, payload, raw.len()).unwrap(), raw);
            assert!(decompress(codec, payload, raw.len() - 1).is_err(), "{codec:?} longer than declared");
            assert!(decompress(codec, payload, raw.len() + 1).is_err(), "{codec:?} shorter than declared");
            assert!(decompress(codec, &payload[..payload.len() / 2], raw.len()).is_err());
        }
        let mut out = Vec::new();
        compress(Codec::Gzip, 1, b"", &mut out);
        assert_eq!(decompress(Codec::Gzip, &out, 0).unwrap(), b"");
        let mut stored = Vec::new();
        stored_deflate(&raw[..70_000], &mut stored);
        assert_eq!(decompress(Codec::Gzip, &stored, 70_000).unwrap(), &raw[..70_000]);
    }
}
