//! The canonical storage layout (DESIGN.md §2) and the checks every kernel runs before it
//! touches memory.
//!
//! Codes: each row of K codes is a little-endian bitstream; code k occupies bits
//! [k*b, (k+1)*b) of the row, bit 0 being the lowest bit of byte 0. A packed row is
//! K*b/8 bytes. Scales and offsets: one per (row, group), shape (N, K/g).

use crate::error::{ErrorKind, KernelError, Result};

/// Bit widths the library stores.
pub const SUPPORTED_BITS: [u32; 4] = [2, 3, 4, 8];

/// Fails unless `bits` is one of [`SUPPORTED_BITS`].
pub fn check_bits(bits: u32) -> Result<()> {
    if SUPPORTED_BITS.contains(&bits) {
        Ok(())
    } else {
        Err(KernelError::new(ErrorKind::Bits, format!("bits: got {bits}, allowed values are 2, 3, 4 and 8")))
    }
}

/// Largest code of a `bits`-bit quantizer (2^bits - 1).
pub fn max_code(bits: u32) -> u32 {
    (1u32 << bits) - 1
}

/// Bytes in one packed row of `k` codes. K*bits must fill whole bytes (K % 8 == 0 for 3 bits,
/// K % 4 for 2 bits, K % 2 for 4 bits).
pub fn packed_row_bytes(k: usize, bits: u32) -> Result<usize> {
    check_bits(bits)?;
    let total_bits = k * bits as usize;
    if total_bits % 8 != 0 {
        let need = 8 / gcd(8, bits as usize);
        return Err(KernelError::shape(format!(
            "in_features (K) = {k} does not pack into whole bytes at {bits} bits: K must be a multiple of {need}"
        )));
    }
    Ok(total_bits / 8)
}

fn gcd(a: usize, b: usize) -> usize {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// Shape and quantization parameters of one quantized weight (N rows, K columns).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuantLayout {
    pub n: usize,
    pub k: usize,
    pub bits: u32,
    pub group_size: usize,
}

impl QuantLayout {
    /// Validates bits, group size and byte layout. `group_size` must divide K, and for
    /// 3 bits be a multiple of 8 (a group then starts on a byte boundary).
    pub fn new(n: usize, k: usize, bits: u32, group_size: usize) -> Result<Self> {
        check_bits(bits)?;
        if n == 0 || k == 0 {
            return Err(KernelError::shape(format!(
                "weight shape: got (N={n}, K={k}), both dimensions must be at least 1"
            )));
        }
        if group_size == 0 {
            return Err(KernelError::new(
                ErrorKind::GroupSize,
                "group_size: got 0, it must be a positive divisor of in_features",
            ));
        }
        if k % group_size != 0 {
            return Err(KernelError::new(
                ErrorKind::GroupSize,
                format!(
                    "group_size: got {group_size}, it must divide in_features K = {k} (divisors of K near it: {})",
                    near_divisors(k, group_size)
                ),
            ));
        }
        if bits == 3 && group_size % 8 != 0 {
            return Err(KernelError::new(
                ErrorKind::GroupSize,
                format!("group_size: got {group_size}, at 3 bits it must be a multiple of 8"),
            ));
        }
        packed_row_bytes(k, bits)?;
        Ok(Self { n, k, bits, group_size })
    }

    pub fn groups(&self) -> usize {
        self.k / self.group_size
    }

    pub fn row_bytes(&self) -> usize {
        self.k * self.bits as usize / 8
    }

    pub fn packed_len(&self) -> usize {
        self.n * self.row_bytes()
    }

    pub fn params_len(&self) -> usize {
        self.n * self.groups()
    }

    /// Checks the lengths of a packed buffer and of the scale/offset buffers.
    pub fn check_buffers(&self, packed: usize, scales: usize, offsets: usize) -> Result<()> {
        if packed != self.packed_len() {
            return Err(KernelError::shape(format!(
                "packed: got {packed} bytes, expected N*K*bits/8 = {}*{}*{}/8 = {}",
                self.n,
                self.k,
                self.bits,
                self.packed_len()
            )));
        }
        for (name, len) in [("scales", scales), ("offsets", offsets)] {
            if len != self.params_len() {
                return Err(KernelError::shape(format!(
                    "{name}: got {len} values, expected N*(K/group_size) = {}*{} = {}",
                    self.n,
                    self.groups(),
                    self.params_len()
                )));
            }
        }
        Ok(())
    }
}

/// Up to four divisors of `k` closest to `g`, for error messages.
fn near_divisors(k: usize, g: usize) -> String {
    let mut divs: Vec<usize> = (1..=k).filter(|d| k % d == 0).collect();
    divs.sort_by_key(|d| (*d as i64 - g as i64).abs());
    divs.truncate(4);
    divs.sort_unstable();
    divs.iter().map(|d| d.to_string()).collect::<Vec<_>>().join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_bad_parameters() {
        assert_eq!(QuantLayout::new(4, 64, 5, 32).unwrap_err().kind, ErrorKind::Bits);
        assert_eq!(QuantLayout::new(4, 64, 4, 0).unwrap_err().kind, ErrorKind::GroupSize);
        assert_eq!(QuantLayout::new(4, 64, 4, 48).unwrap_err().kind, ErrorKind::GroupSize);
        assert_eq!(QuantLayout::new(4, 12, 3, 4).unwrap_err().kind, ErrorKind::GroupSize);
        assert_eq!(QuantLayout::new(0, 64, 4, 32).unwrap_err().kind, ErrorKind::Shape);
        assert_eq!(QuantLayout::new(4, 6, 4, 3).unwrap().row_bytes(), 3);
        assert_eq!(QuantLayout::new(4, 6, 2, 3).unwrap_err().kind, ErrorKind::Shape);
        let msg = QuantLayout::new(4, 576, 4, 128).unwrap_err().message;
        assert!(msg.contains("576") && msg.contains("144"), "{msg}");
    }

    #[test]
    fn sizes() {
        let l = QuantLayout::new(3, 64, 3, 32).unwrap();
        assert_eq!((l.groups(), l.row_bytes(), l.packed_len(), l.params_len()), (2, 24, 72, 6));
    }
}
