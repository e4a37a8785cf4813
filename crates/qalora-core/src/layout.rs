//! The canonical storage layout (docs/design.md §2) and the checks every kernel and the binding
//! run before they touch memory. Each fact (bit width, group size, byte packing, code range,
//! sizes that fit in memory) is checked here and only here, so each has one message.
//!
//! Codes: each row of K codes is a little-endian bitstream; code k occupies bits
//! [k*b, (k+1)*b) of the row, bit 0 being the lowest bit of byte 0. A packed row is
//! K*b/8 bytes. Scales and offsets: one per (row, group), shape (N, K/g).

use std::fmt;

use crate::error::{ErrorKind, KernelError, Result};

/// Bit widths the library stores. 5 and 6 hold the codes of GGUF's Q5_x and Q6_K blocks.
pub const SUPPORTED_BITS: [u32; 6] = [2, 3, 4, 5, 6, 8];

/// How far on each side of the group size asked for the error message looks for valid
/// ones: bounded, so the message costs the same for K = 64 and K = 2^63.
const NEAR_WINDOW: u64 = 4096;

/// An integer argument as the caller gave it (at the binding, a Python int of any size).
/// The checks take it as given so that a message reports the value given: bits = -1 is
/// "got -1", never the result of a conversion.
pub trait GivenInt: fmt::Display {
    /// The value, or `None` when it does not fit in an i64.
    fn get(&self) -> Option<i64>;
}

macro_rules! given_int {
    ($($t:ty),*) => {$(
        impl GivenInt for $t {
            fn get(&self) -> Option<i64> {
                i64::try_from(*self).ok()
            }
        }
    )*};
}
given_int!(i32, i64, u32, u64, usize);

/// The value as a usize when it is one (not negative, not too large).
fn as_usize(v: &impl GivenInt) -> Option<usize> {
    v.get().and_then(|v| usize::try_from(v).ok())
}

/// Fails unless `bits` is one of [`SUPPORTED_BITS`]; returns it.
pub fn check_bits(bits: impl GivenInt) -> Result<u32> {
    match bits.get().and_then(|b| u32::try_from(b).ok()) {
        Some(b) if SUPPORTED_BITS.contains(&b) => Ok(b),
        _ => {
            Err(KernelError::new(ErrorKind::Bits, format!("bits: got {bits}, allowed values are 2, 3, 4, 5, 6 and 8")))
        }
    }
}

/// Largest code of a `bits`-bit quantizer (2^bits - 1). `bits` is a checked bit width.
pub fn max_code(bits: u32) -> u32 {
    (1u32 << bits) - 1
}

/// Fails unless in_features K is at least 1; returns it.
pub fn check_in_features(k: impl GivenInt) -> Result<usize> {
    match (k.get(), as_usize(&k)) {
        (_, Some(v)) if v >= 1 => Ok(v),
        (None, _) => Err(KernelError::shape(format!("in_features K: got {k}, which is too large to address"))),
        _ => Err(KernelError::shape(format!("in_features K: got {k}, it must be at least 1"))),
    }
}

/// Bytes in one packed row of `k` codes. K*bits must fill whole bytes (K % 8 == 0 for 3 and
/// 5 bits, K % 4 for 2 and 6 bits, K % 2 for 4 bits) and must not overflow.
pub fn packed_row_bytes(k: usize, bits: u32) -> Result<usize> {
    let bits = check_bits(bits)?;
    let Some(total_bits) = k.checked_mul(bits as usize) else {
        return Err(KernelError::shape(format!(
            "in_features K = {k} is too large: K*bits = {k}*{bits} does not fit in 64 bits"
        )));
    };
    if !total_bits.is_multiple_of(8) {
        let need = 8 / gcd(8, bits as usize);
        return Err(KernelError::shape(format!(
            "in_features K = {k} does not pack into whole bytes at {bits} bits: K must be a multiple of {need}"
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

/// The multiple a group size must be at `bits` bits so that every group starts on a byte
/// boundary (the kernels unpack a range of groups from its first byte): 8 at 3 and 5 bits,
/// 4 at 6 bits, 1 otherwise (at 2, 4 and 8 bits codes never straddle a byte).
pub fn group_multiple(bits: u32) -> usize {
    match bits {
        3 | 5 | 6 => 8 / gcd(8, bits as usize),
        _ => 1,
    }
}

/// Whether `g` can group K = `k` columns: it divides K and is a multiple of
/// [`group_multiple`] (a group then starts on a byte boundary).
fn groups_evenly(k: usize, bits: Option<u32>, g: usize) -> bool {
    g >= 1 && k.is_multiple_of(g) && g.is_multiple_of(bits.map_or(1, group_multiple))
}

/// Fails unless `group_size` can group K = `k` columns (see [`check_layout`]); returns it.
/// `bits` is the bit width when the groups are quantization groups (None for pooling alone).
pub fn check_group_size(k: usize, bits: Option<u32>, group_size: impl GivenInt) -> Result<usize> {
    match as_usize(&group_size) {
        Some(g) if groups_evenly(k, bits, g) => Ok(g),
        _ => {
            let multiple = bits.map_or(1, group_multiple);
            let three = match bits {
                Some(b) if multiple > 1 => format!(" and be a multiple of {multiple} at {b} bits"),
                _ => String::new(),
            };
            let center = match group_size.get() {
                Some(g) if g < 1 => 1,
                Some(g) => (g as u64).min(k as u64),
                None => k as u64,
            };
            Err(KernelError::new(
                ErrorKind::GroupSize,
                format!(
                    "group_size: got {group_size}, it must divide in_features K = {k}{three} ({})",
                    near_group_sizes(k, bits, center)
                ),
            ))
        }
    }
}

/// Fails unless `group_size` is at least 1 (where K is not known); returns it.
pub fn check_positive_group_size(group_size: impl GivenInt) -> Result<usize> {
    match as_usize(&group_size) {
        Some(g) if g >= 1 => Ok(g),
        _ => Err(KernelError::new(
            ErrorKind::GroupSize,
            format!("group_size: got {group_size}, it must be a positive integer"),
        )),
    }
}

/// The group sizes closest to `center` that group K evenly (up to four, ascending), for the
/// group-size message. Looks at most [`NEAR_WINDOW`] values away on each side.
fn near_group_sizes(k: usize, bits: Option<u32>, center: u64) -> String {
    let multiple = bits.map_or(1, group_multiple);
    if !k.is_multiple_of(multiple) {
        return format!("none exists: at {} bits K must be a multiple of {multiple}", bits.unwrap_or(0));
    }
    let valid = |d: u64| usize::try_from(d).is_ok_and(|d| groups_evenly(k, bits, d));
    let mut found = Vec::new();
    for step in 0..=NEAR_WINDOW {
        for d in [center.checked_sub(step), center.checked_add(step).filter(|_| step > 0)].into_iter().flatten() {
            if found.len() < 4 && valid(d) {
                found.push(d);
            }
        }
        if found.len() == 4 {
            break;
        }
    }
    found.sort_unstable();
    let what = if multiple > 1 {
        format!("positive divisors of K that are multiples of {multiple}")
    } else {
        "positive divisors".to_string()
    };
    if found.is_empty() {
        format!("no {what} within {NEAR_WINDOW} of {center}")
    } else {
        let list = found.iter().map(|d| d.to_string()).collect::<Vec<_>>().join(", ");
        format!("{what} near {center}: {list}")
    }
}

/// Checks that a layer with `in_features` inputs can be stored at `bits` bits in groups of
/// `group_size`: bits is one of [`SUPPORTED_BITS`], K >= 1, the group size divides K (and is
/// a multiple of 8 at 3 and 5 bits, of 4 at 6 bits), and K·bits fills whole bytes. Returns
/// (K, bits, group size).
pub fn check_layout(
    in_features: impl GivenInt,
    bits: impl GivenInt,
    group_size: impl GivenInt,
) -> Result<(usize, u32, usize)> {
    let bits = check_bits(bits)?;
    let k = check_in_features(in_features)?;
    let g = check_group_size(k, Some(bits), group_size)?;
    packed_row_bytes(k, bits)?;
    Ok((k, bits, g))
}

/// The product of `dims` (a number of elements), failing when it exceeds isize::MAX, the
/// most a slice or a tensor can hold.
pub fn size_product(what: &str, dims: &[usize]) -> Result<usize> {
    dims.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d)).filter(|&n| isize::try_from(n).is_ok()).ok_or_else(
        || {
            let shape = dims.iter().map(|d| d.to_string()).collect::<Vec<_>>().join(" x ");
            KernelError::shape(format!("{what}: {shape} elements are too many to address"))
        },
    )
}

/// The error for a code outside [0, 2^bits - 1] (`value` as the caller's dtype holds it).
pub fn code_range_error(value: impl fmt::Display, row: usize, col: usize, bits: u32) -> KernelError {
    KernelError::new(
        ErrorKind::CodeRange,
        format!(
            "codes: value {value} at row {row}, column {col} is outside [0, {}] allowed at {bits} bits",
            max_code(bits)
        ),
    )
}

/// Shape and quantization parameters of one quantized weight (N rows, K columns). Made only
/// by [`QuantLayout::new`], which checks the parameters and that every size derived from
/// them fits, so the methods below cannot overflow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct QuantLayout {
    pub n: usize,
    pub k: usize,
    pub bits: u32,
    pub group_size: usize,
}

impl QuantLayout {
    /// Validates bits, group size and byte layout as [`check_layout`] does, N >= 1, and that
    /// N·K fits.
    pub fn new(n: usize, k: usize, bits: impl GivenInt, group_size: impl GivenInt) -> Result<Self> {
        let (k, bits, group_size) = check_layout(k, bits, group_size)?;
        if n == 0 {
            return Err(KernelError::shape(format!("weight shape: got (N={n}, K={k}), N must be at least 1")));
        }
        size_product("weight", &[n, k])?;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_bad_parameters() {
        assert_eq!(QuantLayout::new(4, 64, 7u32, 32usize).unwrap_err().kind, ErrorKind::Bits);
        assert_eq!(QuantLayout::new(4, 64, 5u32, 4usize).unwrap_err().kind, ErrorKind::GroupSize);
        assert_eq!(QuantLayout::new(4, 64, 6u32, 2usize).unwrap_err().kind, ErrorKind::GroupSize);
        assert_eq!(QuantLayout::new(4, 12, 6u32, 4usize).unwrap().row_bytes(), 9);
        assert_eq!(QuantLayout::new(4, 12, 5u32, 4usize).unwrap_err().kind, ErrorKind::GroupSize);
        assert_eq!(QuantLayout::new(4, 16, 5u32, 8usize).unwrap().row_bytes(), 10);
        assert_eq!(QuantLayout::new(4, 64, 4u32, 0usize).unwrap_err().kind, ErrorKind::GroupSize);
        assert_eq!(QuantLayout::new(4, 64, 4u32, 48usize).unwrap_err().kind, ErrorKind::GroupSize);
        assert_eq!(QuantLayout::new(4, 12, 3u32, 4usize).unwrap_err().kind, ErrorKind::GroupSize);
        assert_eq!(QuantLayout::new(0, 64, 4u32, 32usize).unwrap_err().kind, ErrorKind::Shape);
        assert_eq!(QuantLayout::new(4, 0, 4u32, 32usize).unwrap_err().kind, ErrorKind::Shape);
        assert_eq!(QuantLayout::new(4, 6, 4u32, 3usize).unwrap().row_bytes(), 3);
        assert_eq!(QuantLayout::new(4, 6, 2u32, 3usize).unwrap_err().kind, ErrorKind::Shape);
        let msg = QuantLayout::new(4, 576, 4u32, 128usize).unwrap_err().message;
        assert!(msg.contains("576") && msg.contains("144"), "{msg}");
    }

    #[test]
    fn sizes() {
        let l = QuantLayout::new(3, 64, 3u32, 32usize).unwrap();
        assert_eq!((l.groups(), l.row_bytes(), l.packed_len(), l.params_len()), (2, 24, 72, 6));
    }

    /// Messages report the value given, not a converted one.
    #[test]
    fn messages_report_the_value_given() {
        for (bits, shown) in [(-1i64, "got -1"), (1 << 32 | 4, "got 4294967300"), (7, "got 7")] {
            let e = check_bits(bits).unwrap_err();
            assert_eq!(e.kind, ErrorKind::Bits);
            assert!(e.message.contains(shown) && e.message.contains("2, 3, 4, 5, 6 and 8"), "{}", e.message);
        }
        let e = check_layout(64i64, 4i64, -3i64).unwrap_err();
        assert_eq!(e.kind, ErrorKind::GroupSize);
        assert!(e.message.contains("got -3") && e.message.contains("K = 64"), "{}", e.message);
        let e = check_layout(0i64, 4i64, 32i64).unwrap_err();
        assert!(e.kind == ErrorKind::Shape && e.message.contains("got 0"), "{}", e.message);
        assert_eq!(check_layout(576i64, 3i64, 64i64).unwrap(), (576, 3, 64));
        assert_eq!(check_positive_group_size(0i64).unwrap_err().kind, ErrorKind::GroupSize);
    }

    #[test]
    fn group_size_message_lists_valid_neighbours() {
        let msg = check_layout(576i64, 4i64, 128i64).unwrap_err().message;
        assert!(
            msg.contains("got 128") && msg.contains("K = 576") && msg.contains("near 128: 64, 72, 96, 144"),
            "{msg}"
        );
        // At 3 bits only multiples of 8 are offered, and the rule is stated.
        let msg = check_layout(576i64, 3i64, 12i64).unwrap_err().message;
        assert!(msg.contains("multiple of 8 at 3 bits") && msg.contains("near 12: 8, 16, 24, 32"), "{msg}");
        let msg = check_layout(12i64, 3i64, 4i64).unwrap_err().message;
        assert!(msg.contains("K must be a multiple of 8"), "{msg}");
        let msg = check_layout(576i64, 6i64, 30i64).unwrap_err().message;
        assert!(msg.contains("multiple of 4 at 6 bits") && msg.contains("near 30: 16, 24, 32, 36"), "{msg}");
        let msg = check_layout(12i64, 5i64, 4i64).unwrap_err().message;
        assert!(msg.contains("at 5 bits K must be a multiple of 8"), "{msg}");
        let msg = check_group_size(30, None, 0i64).unwrap_err().message;
        assert!(msg.contains("got 0") && msg.contains("near 1: 1, 2, 3, 5"), "{msg}");
    }

    /// The neighbour search is bounded: an O(K) one would run for hours on these K (up to
    /// the top of u64); this test would not finish.
    #[test]
    fn group_size_message_is_bounded_for_huge_k() {
        for k in [(1usize << 40) + 7, (1 << 40) + 1, usize::MAX - 1, usize::MAX / 3] {
            for g in [128i64, 0, -5, 1_000_003] {
                let e = check_group_size(k, Some(4), g).unwrap_err();
                assert!(e.kind == ErrorKind::GroupSize && e.message.contains(&format!("got {g}")), "{}", e.message);
            }
        }
    }

    #[test]
    fn sizes_that_overflow_are_shape_errors() {
        // k * bits wraps to 8 at 2^61 + 1 codes of 8 bits: must fail, not pass as 1 byte.
        let e = packed_row_bytes((1 << 61) + 1, 8).unwrap_err();
        assert!(e.kind == ErrorKind::Shape && e.message.contains("too large"), "{}", e.message);
        assert_eq!(size_product("x", &[1 << 40, 1 << 30]).unwrap_err().kind, ErrorKind::Shape);
        assert_eq!(size_product("x", &[usize::MAX / 2 + 1]).unwrap_err().kind, ErrorKind::Shape);
        assert_eq!(size_product("x", &[3, 5, 0]).unwrap(), 0);
        assert_eq!(QuantLayout::new(1 << 40, 1 << 30, 4u32, 32usize).unwrap_err().kind, ErrorKind::Shape);
        assert_eq!(check_in_features(u64::MAX).unwrap_err().kind, ErrorKind::Shape);
    }
}
