//! Bit packing of integer codes into the canonical little-endian bitstream, and back.
//!
//! Every width has a byte-wise fast path and a bit-by-bit scalar twin (`*_row_scalar`) that
//! the tests compare it against.

use std::fmt;
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::error::{KernelError, Result};
use crate::layout::{check_bits, code_range_error, max_code, packed_row_bytes, size_product};
use crate::parallel::for_each_row;

/// Bit-by-bit reference: code k occupies bits [k*b, (k+1)*b) of the row.
pub fn pack_row_scalar(codes: &[u8], bits: u32, out: &mut [u8]) {
    out.fill(0);
    let b = bits as usize;
    for (k, &q) in codes.iter().enumerate() {
        for j in 0..b {
            if (q >> j) & 1 == 1 {
                let pos = k * b + j;
                out[pos / 8] |= 1 << (pos % 8);
            }
        }
    }
}

/// Bit-by-bit reference inverse of [`pack_row_scalar`].
pub fn unpack_row_scalar(packed: &[u8], bits: u32, out: &mut [u8]) {
    let b = bits as usize;
    for (k, q) in out.iter_mut().enumerate() {
        let mut v = 0u8;
        for j in 0..b {
            let pos = k * b + j;
            v |= ((packed[pos / 8] >> (pos % 8)) & 1) << j;
        }
        *q = v;
    }
}

/// Packs one row; `codes.len() * bits / 8 == out.len()` and codes fit in `bits`.
///
/// The fast paths read each output byte's codes as one little-endian word and shift the
/// codes into place inside it (plain integer ops on fixed-width lanes, which LLVM turns into
/// SIMD shifts and a narrowing pack); they rely on the codes fitting in `bits`.
pub fn pack_row(codes: &[u8], bits: u32, out: &mut [u8]) {
    match bits {
        8 => out.copy_from_slice(codes),
        4 => {
            // w = q0 | q1 << 8; w | w >> 4 has q0 | q1 << 4 in its low byte.
            for (o, c) in out.iter_mut().zip(codes.chunks_exact(2)) {
                let w = u16::from_le_bytes([c[0], c[1]]);
                *o = (w | (w >> 4)) as u8;
            }
        }
        2 => {
            // w = q0 | q1 << 8 | q2 << 16 | q3 << 24; shifts by 6, 12, 18 bring q1..q3 to bits 2, 4, 6.
            for (o, c) in out.iter_mut().zip(codes.chunks_exact(4)) {
                let w = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                *o = (w | (w >> 6) | (w >> 12) | (w >> 18)) as u8;
            }
        }
        // K % 8 != 0 cannot happen at 3 and 5 bits: the layout check requires whole bytes.
        3 => pack_row_words::<3>(codes, out),
        5 => pack_row_words::<5>(codes, out),
        6 => {
            // Whole bytes need K % 4 == 0 only: a last half word of four codes is left over.
            let whole = codes.len() / 8 * 8;
            pack_row_words::<6>(&codes[..whole], &mut out[..whole * 6 / 8]);
            pack_row_scalar(&codes[whole..], 6, &mut out[whole * 6 / 8..]);
        }
        _ => pack_row_scalar(codes, bits, out),
    }
}

/// Packs eight B-bit codes (B = 3, 5, 6) into B bytes at a time: the codes are read as one
/// little-endian u64 of 8-bit lanes and the gaps between them halved three times (8-bit
/// lanes -> 2B bits in 16, 4B in 32, 8B in 64).
#[inline]
fn pack_row_words<const B: u32>(codes: &[u8], out: &mut [u8]) {
    const { assert!(B == 3 || B == 5 || B == 6) };
    for (o, c) in out.chunks_exact_mut(B as usize).zip(codes.chunks_exact(8)) {
        let v = u64::from_le_bytes(c.try_into().unwrap());
        let v = (v & 0x00FF_00FF_00FF_00FF) | ((v & 0xFF00_FF00_FF00_FF00) >> (8 - B));
        let v = (v & 0x0000_FFFF_0000_FFFF) | ((v & 0xFFFF_0000_FFFF_0000) >> (16 - 2 * B));
        let v = (v & 0x0000_0000_FFFF_FFFF) | ((v >> 32) << (4 * B));
        o.copy_from_slice(&v.to_le_bytes()[..B as usize]);
    }
}

/// Unpacks B bytes into eight B-bit codes at a time (B = 3, 5, 6).
#[inline]
fn unpack_row_words<const B: u32>(packed: &[u8], out: &mut [u8]) {
    const { assert!(B == 3 || B == 5 || B == 6) };
    let mask = (1u64 << B) - 1;
    for (c, p) in out.chunks_exact_mut(8).zip(packed.chunks_exact(B as usize)) {
        let mut word = [0u8; 8];
        word[..B as usize].copy_from_slice(p);
        let v = u64::from_le_bytes(word);
        for (i, q) in c.iter_mut().enumerate() {
            *q = ((v >> (B as usize * i)) & mask) as u8;
        }
    }
}

/// Unpacks one row of `out.len()` codes.
pub fn unpack_row(packed: &[u8], bits: u32, out: &mut [u8]) {
    // 2, 3, 5 and 6 bits: AVX2 takes the row's groups of eight codes (about 3x the scalar
    // words' speed; the unpack was most of a 6-bit row's time at M = 1), the rest below.
    #[cfg(target_arch = "x86_64")]
    if let (2 | 3 | 5 | 6, Some(cpu)) = (bits, crate::Isa::detect().avx2()) {
        let done = crate::x86::unpack_groups(cpu, packed, bits, out);
        if done > 0 {
            let at = done * bits as usize / 8;
            return unpack_row_rest(&packed[at..], bits, &mut out[done..]);
        }
    }
    unpack_row_rest(packed, bits, out)
}

fn unpack_row_rest(packed: &[u8], bits: u32, out: &mut [u8]) {
    match bits {
        8 => out.copy_from_slice(packed),
        4 => {
            for (c, &p) in out.chunks_exact_mut(2).zip(packed) {
                c[0] = p & 0xF;
                c[1] = p >> 4;
            }
        }
        2 => {
            for (c, &p) in out.chunks_exact_mut(4).zip(packed) {
                c[0] = p & 3;
                c[1] = (p >> 2) & 3;
                c[2] = (p >> 4) & 3;
                c[3] = p >> 6;
            }
        }
        3 => unpack_row_words::<3>(packed, out),
        5 => unpack_row_words::<5>(packed, out),
        6 => {
            let whole = out.len() / 8 * 8;
            unpack_row_words::<6>(&packed[..whole * 6 / 8], &mut out[..whole]);
            unpack_row_scalar(&packed[whole * 6 / 8..], 6, &mut out[whole..]);
        }
        _ => unpack_row_scalar(packed, bits, out),
    }
}

/// True when every code fits in `bits`. An OR over the row (no early exit) vectorizes;
/// a code fits iff it has no bit above the top code bit.
#[inline]
fn row_in_range(codes: &[u8], bits: u32) -> bool {
    let high = !(max_code(bits) as u8);
    codes.iter().fold(0u8, |acc, &q| acc | q) & high == 0
}

/// Packs an (n, k) row-major matrix of codes into (n, k*bits/8) bytes.
pub fn pack(codes: &[u8], n: usize, k: usize, bits: u32, out: &mut [u8]) -> Result<()> {
    let row_bytes = packed_row_bytes(k, bits)?;
    if codes.len() != size_product("codes", &[n, k])? {
        return Err(KernelError::shape(format!("codes: got {} values, expected n*k = {n}*{k}", codes.len())));
    }
    if out.len() != n * row_bytes {
        return Err(KernelError::internal(format!("pack output has {} bytes, expected {}", out.len(), n * row_bytes)));
    }
    if codes.is_empty() {
        return Ok(());
    }
    // Range check and packing in one pass over the codes: a row with a bad code is noted
    // (the lowest such row wins) and only that row is searched again for the message.
    let first_bad = AtomicUsize::new(usize::MAX);
    for_each_row(out, row_bytes, n * k, |row, o| {
        let c = &codes[row * k..(row + 1) * k];
        if row_in_range(c, bits) {
            pack_row(c, bits, o)
        } else {
            first_bad.fetch_min(row, Ordering::Relaxed);
        }
    });
    let row = first_bad.into_inner();
    if row != usize::MAX {
        let max = max_code(bits) as u8;
        let c = &codes[row * k..(row + 1) * k];
        if let Some(col) = c.iter().position(|&q| q > max) {
            return Err(code_range_error(c[col], row, col, bits));
        }
    }
    Ok(())
}

/// An integer type codes may arrive in, wider than a byte or signed.
pub trait WideCode: Copy + Send + Sync + fmt::Display {
    /// Whether the value lies outside [0, max].
    fn outside(self, max: u64) -> bool;
    /// The low byte: the code itself when it is in range.
    fn low_byte(self) -> u8;
}

macro_rules! wide_code {
    (signed: $($s:ty),*; unsigned: $($u:ty),*) => {
        // Negative values become huge as u64, so one unsigned compare checks both ends.
        $(impl WideCode for $s {
            #[inline]
            fn outside(self, max: u64) -> bool {
                self as i64 as u64 > max
            }
            #[inline]
            fn low_byte(self) -> u8 {
                self as u8
            }
        })*
        $(impl WideCode for $u {
            #[inline]
            fn outside(self, max: u64) -> bool {
                self as u64 > max
            }
            #[inline]
            fn low_byte(self) -> u8 {
                self as u8
            }
        })*
    };
}
wide_code!(signed: i8, i16, i32, i64; unsigned: u16, u32, u64);

/// Narrows (n, k) integer codes of a wider type to bytes, failing at the first value outside
/// [0, 2^bits - 1]. The check must come before narrowing: a cast would wrap -1 or 300 into
/// range. Work per element is a compare and a truncation, so it vectorizes.
pub fn narrow_codes<T: WideCode>(codes: &[T], k: usize, bits: u32, out: &mut [u8]) -> Result<()> {
    let bits = check_bits(bits)?;
    if k == 0 || !codes.len().is_multiple_of(k) || out.len() != codes.len() {
        return Err(KernelError::internal(format!(
            "narrow_codes: {} values, {} outputs, rows of {k}",
            codes.len(),
            out.len()
        )));
    }
    let max = max_code(bits) as u64;
    let first_bad = AtomicUsize::new(usize::MAX);
    for_each_row(out, k, codes.len(), |row, o| {
        let c = &codes[row * k..(row + 1) * k];
        let mut bad = false;
        for (d, &v) in o.iter_mut().zip(c) {
            bad |= v.outside(max);
            *d = v.low_byte();
        }
        if bad {
            first_bad.fetch_min(row, Ordering::Relaxed);
        }
    });
    let row = first_bad.into_inner();
    if row != usize::MAX {
        let c = &codes[row * k..(row + 1) * k];
        if let Some(col) = c.iter().position(|v| v.outside(max)) {
            return Err(code_range_error(c[col], row, col, bits));
        }
    }
    Ok(())
}

/// Unpacks (n, k*bits/8) bytes into an (n, k) matrix of codes.
pub fn unpack(packed: &[u8], n: usize, k: usize, bits: u32, out: &mut [u8]) -> Result<()> {
    let row_bytes = packed_row_bytes(k, bits)?;
    let want = size_product("packed", &[n, row_bytes])?;
    if packed.len() != want {
        return Err(KernelError::shape(format!(
            "packed: got {} bytes, expected n*k*bits/8 = {n}*{k}*{bits}/8 = {want}",
            packed.len()
        )));
    }
    if out.len() != size_product("codes", &[n, k])? {
        return Err(KernelError::internal("unpack output has the wrong length"));
    }
    if out.is_empty() {
        return Ok(());
    }
    for_each_row(out, k, n * k, |row, o| unpack_row(&packed[row * row_bytes..(row + 1) * row_bytes], bits, o));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::random_codes;
    use crate::ErrorKind;

    #[test]
    fn fast_paths_match_scalar_twin() {
        for bits in crate::SUPPORTED_BITS {
            for k in [8usize, 16, 24, 40, 136, 1000, 4, 12, 20, 1004, 32, 64, 264, 4096, 4100] {
                if !(k * bits as usize).is_multiple_of(8) {
                    continue;
                }
                let codes = random_codes(k, bits, 7 + k as u64);
                let mut fast = vec![0u8; k * bits as usize / 8];
                let mut slow = fast.clone();
                pack_row(&codes, bits, &mut fast);
                pack_row_scalar(&codes, bits, &mut slow);
                assert_eq!(fast, slow, "pack bits={bits} k={k}");
                let mut back = vec![0u8; k];
                let mut back_slow = vec![0u8; k];
                unpack_row(&fast, bits, &mut back);
                unpack_row_scalar(&fast, bits, &mut back_slow);
                assert_eq!(back, codes);
                assert_eq!(back_slow, codes);
            }
        }
    }

    #[test]
    fn documented_layout() {
        // 4 bits: byte j = q[2j] | q[2j+1] << 4.
        let mut out = [0u8; 2];
        pack_row(&[1, 2, 15, 0], 4, &mut out);
        assert_eq!(out, [0x21, 0x0F]);
        // 3 bits: code k at bits [3k, 3k+3): codes 1..=7,0 -> 0b000_111_110_101_100_011_010_001.
        let mut out3 = [0u8; 3];
        pack_row(&[1, 2, 3, 4, 5, 6, 7, 0], 3, &mut out3);
        let v: u32 = (1..8).map(|i| (i as u32) << (3 * (i - 1))).sum();
        assert_eq!(out3, v.to_le_bytes()[..3]);
        // 2 bits: byte = q0 | q1<<2 | q2<<4 | q3<<6.
        let mut out2 = [0u8; 1];
        pack_row(&[3, 0, 1, 2], 2, &mut out2);
        assert_eq!(out2, [0b10_01_00_11]);
        // 5 and 6 bits: code k at bits [b k, b (k+1)), as a little-endian word.
        for bits in [5u32, 6] {
            let codes: Vec<u8> = (0..8u8).map(|i| (i * 7 + 3) % (1 << bits)).collect();
            let v: u64 = codes.iter().enumerate().map(|(i, &q)| (q as u64) << (bits as usize * i)).sum();
            let mut out = vec![0u8; bits as usize];
            pack_row(&codes, bits, &mut out);
            assert_eq!(out, v.to_le_bytes()[..bits as usize], "bits={bits}");
        }
    }

    #[test]
    fn parallel_matrix_round_trip_and_errors() {
        let (n, k) = (301, 256);
        for bits in crate::SUPPORTED_BITS {
            let codes = random_codes(n * k, bits, bits as u64);
            let mut packed = vec![0u8; n * k * bits as usize / 8];
            pack(&codes, n, k, bits, &mut packed).unwrap();
            let mut back = vec![0u8; n * k];
            unpack(&packed, n, k, bits, &mut back).unwrap();
            assert_eq!(back, codes);
        }
        let mut codes = vec![1u8; 16];
        codes[11] = 16;
        let mut out = vec![0u8; 8];
        let err = pack(&codes, 2, 8, 4, &mut out).unwrap_err();
        assert_eq!(err.kind, ErrorKind::CodeRange);
        assert!(err.message.contains("row 1, column 3"), "{}", err.message);
        let err = unpack(&out[..7], 2, 8, 4, &mut [0u8; 16]).unwrap_err();
        assert_eq!(err.kind, ErrorKind::Shape);
    }

    #[test]
    fn range_errors_name_the_first_bad_code_on_the_parallel_path() {
        // Above the parallel threshold, with bad codes in two rows: the earlier one is named.
        let (n, k) = (257, 256);
        for bits in [2u32, 3, 4, 5, 6] {
            let mut codes = random_codes(n * k, bits, 5);
            codes[200 * k + 17] = 1 << bits;
            codes[40 * k + 9] = 255;
            codes[40 * k + 100] = 1 << bits;
            let mut out = vec![0u8; n * k * bits as usize / 8];
            let err = pack(&codes, n, k, bits, &mut out).unwrap_err();
            assert_eq!(err.kind, ErrorKind::CodeRange);
            assert!(err.message.contains("value 255 at row 40, column 9"), "{}", err.message);
        }
    }

    #[test]
    fn narrow_codes_checks_before_casting() {
        let (n, k) = (130, 264); // above the parallel threshold
        for bits in crate::SUPPORTED_BITS {
            let codes = random_codes(n * k, bits, 9 + bits as u64);
            let wide: Vec<i64> = codes.iter().map(|&q| q as i64).collect();
            let mut out = vec![0u8; n * k];
            narrow_codes(&wide, k, bits, &mut out).unwrap();
            assert_eq!(out, codes);
            let small: Vec<i16> = codes.iter().map(|&q| q as i16).collect();
            narrow_codes(&small, k, bits, &mut out).unwrap();
            assert_eq!(out, codes);
            // Values that a cast to u8 would wrap into range: -1 -> 255, 256 -> 0, 2^32 -> 0.
            for bad in [-1i64, 1 << bits, 256, 300, 1 << 32, i64::MIN] {
                let mut w = wide.clone();
                w[77 * k + 5] = bad;
                w[100 * k] = bad;
                let err = narrow_codes(&w, k, bits, &mut out).unwrap_err();
                assert_eq!(err.kind, ErrorKind::CodeRange);
                let want = format!("value {bad} at row 77, column 5");
                assert!(err.message.contains(&want), "{}", err.message);
            }
        }
        let mut out = vec![0u8; 4];
        let err = narrow_codes(&[0i8, 1, -3, 2], 2, 2, &mut out).unwrap_err();
        assert!(err.message.contains("value -3 at row 1, column 0"), "{}", err.message);
    }
}
