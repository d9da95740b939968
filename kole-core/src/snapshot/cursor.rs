//! Byte-level building blocks of the section encodings: LEB128 varints, zigzag, byte planes, and
//! a bounds-checked reader whose every method is total.

/// Appends `v` as an unsigned LEB128 varint.
#[inline]
pub(crate) fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push(v as u8 | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// Zigzag: small magnitudes of either sign become small unsigned numbers.
#[inline]
pub(crate) fn zigzag(v: i64) -> u64 {
    ((v << 1) ^ (v >> 63)) as u64
}

#[inline]
pub(crate) fn unzigzag(v: u64) -> i64 {
    (v >> 1) as i64 ^ -((v & 1) as i64)
}

/// Appends `values` as byte planes: one width byte `w` (1..=4, the bytes the largest value needs),
/// then `w` planes of `values.len()` bytes each, most significant plane first. Planes keep bytes
/// of equal meaning together, which is what the entropy coder needs.
pub(crate) fn put_planes(out: &mut Vec<u8>, values: &[u32]) {
    let max = values.iter().copied().max().unwrap_or(0);
    let w = (4 - max.leading_zeros() as usize / 8).max(1);
    out.push(w as u8);
    for plane in (0..w).rev() {
        let shift = plane * 8;
        out.extend(values.iter().map(|&v| (v >> shift) as u8));
    }
}

/// A bounds-checked reader over a decoded section. Every method returns `Err` instead of reading
/// past the end, and lengths are checked against what is left before anything is allocated.
pub(crate) struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

/// Why a read failed, and where.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ReadError {
    pub(crate) reason: &'static str,
    pub(crate) offset: usize,
}

pub(crate) type ReadResult<T> = Result<T, ReadError>;

impl<'a> Reader<'a> {
    pub(crate) fn new(buf: &'a [u8]) -> Self {
        Self { buf, pos: 0 }
    }

    pub(crate) fn err(&self, reason: &'static str) -> ReadError {
        ReadError { reason, offset: self.pos }
    }

    pub(crate) fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.pos == self.buf.len()
    }

    #[inline]
    pub(crate) fn u8(&mut self) -> ReadResult<u8> {
        let b = *self.buf.get(self.pos).ok_or_else(|| self.err("unexpected end"))?;
        self.pos += 1;
        Ok(b)
    }

    #[inline]
    pub(crate) fn bytes(&mut self, n: usize) -> ReadResult<&'a [u8]> {
        if n > self.remaining() {
            return Err(self.err("length runs past the end"));
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    pub(crate) fn u64_le(&mut self) -> ReadResult<u64> {
        let b = self.bytes(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }

    #[inline]
    pub(crate) fn varint(&mut self) -> ReadResult<u64> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let b = self.u8()?;
            v |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                if shift == 63 && b > 1 {
                    return Err(self.err("varint overflows 64 bits"));
                }
                return Ok(v);
            }
        }
        Err(self.err("varint longer than 10 bytes"))
    }

    pub(crate) fn varint_u32(&mut self) -> ReadResult<u32> {
        let v = self.varint()?;
        u32::try_from(v).map_err(|_| self.err("value over 2^32"))
    }

    /// A count of items that each take at least `min_bytes` bytes: checked against what is left,
    /// so a hostile count cannot make the decoder allocate.
    pub(crate) fn count(&mut self, min_bytes: usize) -> ReadResult<usize> {
        let n = self.varint()?;
        let max = self.remaining() / min_bytes.max(1);
        usize::try_from(n).ok().filter(|&n| n <= max).ok_or_else(|| self.err("count exceeds the bytes left"))
    }

    /// `n` values written by [`put_planes`].
    pub(crate) fn planes(&mut self, n: usize) -> ReadResult<Vec<u32>> {
        let w = self.u8()?;
        if !(1..=4).contains(&w) {
            return Err(self.err("bad byte-plane width"));
        }
        let w = usize::from(w);
        let all = self.bytes(n.checked_mul(w).ok_or_else(|| self.err("byte planes too long"))?)?;
        let mut out = vec![0u32; n];
        for plane in all.chunks_exact(n.max(1)).take(w) {
            for (v, &b) in out.iter_mut().zip(plane) {
                *v = (*v << 8) | u32::from(b);
            }
        }
        Ok(out)
    }

    pub(crate) fn offset(&self) -> usize {
        self.pos
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn varints_zigzag_and_planes_round_trip(vs in proptest::collection::vec(any::<u64>(), 0..50), ws in proptest::collection::vec(any::<u32>(), 0..50), z in any::<i64>()) {
            let mut out = Vec::new();
            for &v in &vs { put_varint(&mut out, v); }
            put_planes(&mut out, &ws);
            let mut r = Reader::new(&out);
            for &v in &vs { prop_assert_eq!(r.varint().unwrap(), v); }
            prop_assert_eq!(r.planes(ws.len()).unwrap(), ws);
            prop_assert!(r.is_empty());
            prop_assert_eq!(unzigzag(zigzag(z)), z);
        }

        #[test]
        fn reader_is_total(bytes in proptest::collection::vec(any::<u8>(), 0..64), n in 0usize..1000) {
            let mut r = Reader::new(&bytes);
            let _ = r.varint();
            let _ = r.count(1);
            let _ = r.planes(n);
            let _ = r.bytes(n);
            let _ = r.u64_le();
        }
    }
}
