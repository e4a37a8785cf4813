//! A streaming-read probe of the memory bandwidth, for the benchmarks: every byte of a
//! buffer is loaded once, on all of the kernels' pool threads (each takes contiguous chunks), with
//! several independent 32-byte loads in flight per thread. A sum in torch measures the
//! same thing less directly (its reduction does arithmetic per element), and reads slower.

use rayon::prelude::*;

use crate::isa::Isa;

/// Bytes per work item: large enough for the hardware prefetchers to run ahead.
const CHUNK: usize = 4 << 20;

/// XOR of the buffer's 64-bit words (a checksum, so the loads cannot be dropped); the
/// bytes past the last whole word are ignored.
pub fn stream_read(buf: &[u8], isa: Isa) -> u64 {
    crate::parallel::install(|| buf.par_chunks(CHUNK).map(|c| read_chunk(c, isa)).reduce(|| 0, |a, b| a ^ b))
}

fn read_chunk(c: &[u8], isa: Isa) -> u64 {
    #[cfg(target_arch = "x86_64")]
    if let Some(cpu) = isa.avx2() {
        return avx2::xor_words(cpu, c);
    }
    let _ = isa;
    xor_words_scalar(c)
}

/// Scalar twin of the SIMD read loop.
pub fn xor_words_scalar(c: &[u8]) -> u64 {
    c.chunks_exact(8).fold(0, |a, w| a ^ u64::from_le_bytes(w.try_into().expect("8 bytes")))
}

/// The probe's SIMD read loop (AVX2), kept with the probe rather than among the
/// routes' kernels in `x86/`. Safety as in `x86/mod.rs`: the kernel is reached only through
/// the safe entry point, which takes the proof token.
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use crate::isa::HasAvx2;

    /// XOR of the 64-bit words of `c` (bytes past the last whole word ignored): the SIMD twin of
    /// [`super::xor_words_scalar`], four 32-byte loads in flight.
    pub fn xor_words(_: HasAvx2, c: &[u8]) -> u64 {
        // SAFETY: the token proves AVX2; the kernel reads only inside `c`.
        unsafe { xor_words_avx2(c) }
    }

    /// # Safety
    /// AVX2 is available.
    #[target_feature(enable = "avx2")]
    unsafe fn xor_words_avx2(c: &[u8]) -> u64 {
        let p = c.as_ptr();
        let mut acc = [_mm256_setzero_si256(); 4];
        let mut j = 0;
        while j + 128 <= c.len() {
            for (t, a) in acc.iter_mut().enumerate() {
                *a = _mm256_xor_si256(*a, _mm256_loadu_si256(p.add(j + 32 * t) as *const __m256i));
            }
            j += 128;
        }
        let v = _mm256_xor_si256(_mm256_xor_si256(acc[0], acc[1]), _mm256_xor_si256(acc[2], acc[3]));
        let mut words = [0u64; 4];
        _mm256_storeu_si256(words.as_mut_ptr() as *mut __m256i, v);
        words.iter().fold(super::xor_words_scalar(&c[j..]), |a, w| a ^ w)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_isa_gives_the_scalar_checksum() {
        // Chunks are whole words apart (CHUNK % 8 == 0), so the per-chunk XORs combine into
        // the XOR of every word.
        let buf: Vec<u8> = (0..(CHUNK * 2 + 1000)).map(|i| (i * 7 + i / 251) as u8).collect();
        for len in [0, 7, 8, 100, 4096 + 24, CHUNK + 40, buf.len()] {
            let want = xor_words_scalar(&buf[..len]);
            for isa in Isa::available() {
                assert_eq!(stream_read(&buf[..len], isa), want, "len {len} {isa:?}");
            }
        }
    }
}
