//! Bit packing of integer codes into the canonical little-endian bitstream, and back.
//!
//! Every width has a byte-wise fast path and a bit-by-bit scalar twin (`*_row_scalar`) that
//! the tests compare it against.

use crate::error::{ErrorKind, KernelError, Result};
use crate::layout::{check_bits, max_code, packed_row_bytes};
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
pub fn pack_row(codes: &[u8], bits: u32, out: &mut [u8]) {
    match bits {
        8 => out.copy_from_slice(codes),
        4 => {
            for (o, c) in out.iter_mut().zip(codes.chunks_exact(2)) {
                *o = c[0] | (c[1] << 4);
            }
        }
        2 => {
            for (o, c) in out.iter_mut().zip(codes.chunks_exact(4)) {
                *o = c[0] | (c[1] << 2) | (c[2] << 4) | (c[3] << 6);
            }
        }
        3 => {
            for (o, c) in out.chunks_exact_mut(3).zip(codes.chunks_exact(8)) {
                let mut v = 0u32;
                for (i, &q) in c.iter().enumerate() {
                    v |= (q as u32) << (3 * i);
                }
                o.copy_from_slice(&v.to_le_bytes()[..3]);
            }
            // K % 8 != 0 cannot happen at 3 bits: the layout check requires whole bytes.
        }
        _ => pack_row_scalar(codes, bits, out),
    }
}

/// Unpacks one row of `out.len()` codes.
pub fn unpack_row(packed: &[u8], bits: u32, out: &mut [u8]) {
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
        3 => {
            for (c, p) in out.chunks_exact_mut(8).zip(packed.chunks_exact(3)) {
                let v = p[0] as u32 | (p[1] as u32) << 8 | (p[2] as u32) << 16;
                for (i, q) in c.iter_mut().enumerate() {
                    *q = ((v >> (3 * i)) & 7) as u8;
                }
            }
        }
        _ => unpack_row_scalar(packed, bits, out),
    }
}

/// Returns (index, value) of the first code above 2^bits - 1, if any.
fn first_out_of_range(codes: &[u8], bits: u32) -> Option<(usize, u8)> {
    let max = max_code(bits) as u8;
    codes.iter().position(|&q| q > max).map(|i| (i, codes[i]))
}

/// Packs an (n, k) row-major matrix of codes into (n, k*bits/8) bytes.
pub fn pack(codes: &[u8], n: usize, k: usize, bits: u32, out: &mut [u8]) -> Result<()> {
    check_bits(bits)?;
    let row_bytes = packed_row_bytes(k, bits)?;
    if codes.len() != n * k {
        return Err(KernelError::shape(format!(
            "codes: got {} values, expected n*k = {n}*{k}",
            codes.len()
        )));
    }
    if out.len() != n * row_bytes {
        return Err(KernelError::internal(format!(
            "pack output has {} bytes, expected {}",
            out.len(),
            n * row_bytes
        )));
    }
    if let Some((i, v)) = first_out_of_range(codes, bits) {
        return Err(KernelError::new(
            ErrorKind::CodeRange,
            format!(
                "codes: value {v} at row {}, column {} is outside [0, {}] allowed at {bits} bits",
                i / k.max(1),
                i % k.max(1),
                max_code(bits)
            ),
        ));
    }
    if n * k == 0 {
        return Ok(());
    }
    for_each_row(out, row_bytes, n * k, |row, o| {
        pack_row(&codes[row * k..(row + 1) * k], bits, o)
    });
    Ok(())
}

/// Unpacks (n, k*bits/8) bytes into an (n, k) matrix of codes.
pub fn unpack(packed: &[u8], n: usize, k: usize, bits: u32, out: &mut [u8]) -> Result<()> {
    check_bits(bits)?;
    let row_bytes = packed_row_bytes(k, bits)?;
    if packed.len() != n * row_bytes {
        return Err(KernelError::shape(format!(
            "packed: got {} bytes, expected n*k*bits/8 = {n}*{k}*{bits}/8 = {}",
            packed.len(),
            n * row_bytes
        )));
    }
    if out.len() != n * k {
        return Err(KernelError::internal("unpack output has the wrong length"));
    }
    if n * k == 0 {
        return Ok(());
    }
    for_each_row(out, k, n * k, |row, o| {
        unpack_row(&packed[row * row_bytes..(row + 1) * row_bytes], bits, o)
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::random_codes;

    #[test]
    fn fast_paths_match_scalar_twin() {
        for bits in [2u32, 3, 4, 8] {
            for k in [8usize, 24, 40, 136] {
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
    }

    #[test]
    fn parallel_matrix_round_trip_and_errors() {
        let (n, k) = (301, 256);
        for bits in [2u32, 3, 4, 8] {
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
        let err = unpack(&out[..7], 2, 8, 4, &mut vec![0u8; 16]).unwrap_err();
        assert_eq!(err.kind, ErrorKind::Shape);
    }
}
