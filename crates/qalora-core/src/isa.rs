//! The instruction sets the kernels run with, detected once at run time, and the proofs
//! that let safe code reach the SIMD kernels.
//!
//! A SIMD kernel is compiled for its features with `#[target_feature]`, and running it on a
//! CPU without them is undefined behaviour. So every kernel is reached through a safe entry
//! point that takes a proof token ([`HasAvx2`], [`HasAvx512Vnni`], [`HasAvx512Bf16`]), and the
//! only way to get a token is from an [`Isa`] after `is_x86_feature_detected!` said yes
//! ([`Isa::avx2`], [`Isa::avx512_vnni`], [`Isa::avx512_bf16`]). Callers dispatch one way everywhere:
//!
//! ```text
//! if let Some(cpu) = isa.avx2() {
//!     return x86::dot(cpu, a, b);
//! }
//! scalar_dot(a, b)
//! ```
//!
//! Asking for an instruction set the CPU lacks is not an error: it runs the best one below.

use std::sync::OnceLock;

/// Instruction set a kernel runs with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isa {
    /// Portable scalar code (the twin every SIMD kernel is tested against).
    Scalar,
    /// x86-64 AVX2 + FMA + F16C.
    Avx2,
    /// AVX2 plus AVX-512 F/VL/VNNI (integer dot products on 256-bit vectors). Only the
    /// int8-activation routes (`matmul/int8.rs`, `matmul/tiled.rs`) have kernels for it; the
    /// exact kernels run their AVX2 code under it.
    Avx512Vnni,
    /// [`Isa::Avx512Vnni`] plus AVX-512 BW/BF16 (bf16 dot products and conversions): the
    /// bf16-activation route and the bf16 dequantization (`matmul/bf16.rs`); everything else
    /// runs its AVX-512 VNNI or AVX2 code under it.
    Avx512Bf16,
}

#[cfg(target_arch = "x86_64")]
fn has_avx2() -> bool {
    is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") && is_x86_feature_detected!("f16c")
}

#[cfg(target_arch = "x86_64")]
fn has_avx512_vnni() -> bool {
    is_x86_feature_detected!("avx512f")
        && is_x86_feature_detected!("avx512vl")
        && is_x86_feature_detected!("avx512vnni")
}

#[cfg(target_arch = "x86_64")]
fn has_avx512_bf16() -> bool {
    is_x86_feature_detected!("avx512bw") && is_x86_feature_detected!("avx512bf16")
}

impl Isa {
    /// The best instruction set of the exact kernels on this CPU (detected once).
    pub fn detect() -> Isa {
        static BEST: OnceLock<Isa> = OnceLock::new();
        *BEST.get_or_init(|| {
            #[cfg(target_arch = "x86_64")]
            if has_avx2() {
                return Isa::Avx2;
            }
            Isa::Scalar
        })
    }

    /// The best instruction set of the int8-activation kernels on this CPU.
    pub fn detect_int8() -> Isa {
        static BEST: OnceLock<Isa> = OnceLock::new();
        *BEST.get_or_init(|| {
            #[cfg(target_arch = "x86_64")]
            if Isa::detect() == Isa::Avx2 && has_avx512_vnni() {
                return Isa::Avx512Vnni;
            }
            Isa::detect()
        })
    }

    /// The best instruction set on this CPU (every kernel runs its best code under it).
    pub fn detect_best() -> Isa {
        static BEST: OnceLock<Isa> = OnceLock::new();
        *BEST.get_or_init(|| {
            #[cfg(target_arch = "x86_64")]
            if Isa::detect_int8() == Isa::Avx512Vnni && has_avx512_bf16() {
                return Isa::Avx512Bf16;
            }
            Isa::detect_int8()
        })
    }

    /// This instruction set if the CPU has it, else the best one below it that it has.
    pub fn usable(self) -> Isa {
        match self {
            Isa::Avx512Bf16 => Isa::detect_best(),
            Isa::Avx512Vnni => Isa::detect_int8(),
            Isa::Avx2 => Isa::detect(),
            Isa::Scalar => Isa::Scalar,
        }
    }

    /// The instruction set the exact kernels use under this one.
    pub fn exact(self) -> Isa {
        match self.usable() {
            Isa::Avx512Vnni | Isa::Avx512Bf16 => Isa::Avx2,
            other => other,
        }
    }

    /// Every instruction set usable here (Scalar first), for tests and benchmarks.
    pub fn available() -> Vec<Isa> {
        let mut v = vec![Isa::Scalar];
        if Isa::detect() == Isa::Avx2 {
            v.push(Isa::Avx2);
        }
        if Isa::detect_int8() == Isa::Avx512Vnni {
            v.push(Isa::Avx512Vnni);
        }
        if Isa::detect_best() == Isa::Avx512Bf16 {
            v.push(Isa::Avx512Bf16);
        }
        v
    }

    /// Proof that the AVX2 kernels may run: `Some` when this instruction set, as usable on
    /// this CPU, includes AVX2 + FMA + F16C.
    #[cfg(target_arch = "x86_64")]
    pub fn avx2(self) -> Option<HasAvx2> {
        match self.usable() {
            Isa::Avx2 | Isa::Avx512Vnni | Isa::Avx512Bf16 => Some(HasAvx2(())),
            Isa::Scalar => None,
        }
    }

    /// Proof that the AVX-512 VNNI kernels may run: `Some` when this instruction set, as
    /// usable on this CPU, is [`Isa::Avx512Vnni`] or above.
    #[cfg(target_arch = "x86_64")]
    pub fn avx512_vnni(self) -> Option<HasAvx512Vnni> {
        matches!(self.usable(), Isa::Avx512Vnni | Isa::Avx512Bf16).then_some(HasAvx512Vnni(()))
    }

    /// Proof that the AVX-512 BF16 kernels may run: `Some` when this instruction set, as
    /// usable on this CPU, is [`Isa::Avx512Bf16`].
    #[cfg(target_arch = "x86_64")]
    pub fn avx512_bf16(self) -> Option<HasAvx512Bf16> {
        (self.usable() == Isa::Avx512Bf16).then_some(HasAvx512Bf16(()))
    }
}

/// Proof that this CPU has AVX2, FMA and F16C. Only [`Isa::avx2`] makes one, after run-time
/// detection; the AVX2 kernels' safe entry points take it.
#[cfg(target_arch = "x86_64")]
#[derive(Debug, Clone, Copy)]
pub struct HasAvx2(());

/// Proof that this CPU has AVX2, FMA, F16C and AVX-512 F/VL/VNNI. Only
/// [`Isa::avx512_vnni`] makes one.
#[cfg(target_arch = "x86_64")]
#[derive(Debug, Clone, Copy)]
pub struct HasAvx512Vnni(());

/// Proof that this CPU has everything [`HasAvx512Vnni`] proves plus AVX-512 BW and BF16.
/// Only [`Isa::avx512_bf16`] makes one.
#[cfg(target_arch = "x86_64")]
#[derive(Debug, Clone, Copy)]
pub struct HasAvx512Bf16(());

#[cfg(target_arch = "x86_64")]
impl HasAvx512Bf16 {
    /// AVX-512 BF16 is only reported on top of AVX-512 VNNI (see [`Isa::detect_best`]).
    pub fn vnni(self) -> HasAvx512Vnni {
        HasAvx512Vnni(())
    }
    pub fn avx2(self) -> HasAvx2 {
        HasAvx2(())
    }
}

#[cfg(target_arch = "x86_64")]
impl HasAvx512Vnni {
    /// AVX-512 VNNI is only reported on top of AVX2 (see [`Isa::detect_int8`]).
    pub fn avx2(self) -> HasAvx2 {
        HasAvx2(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_follow_detection() {
        for isa in Isa::available() {
            assert_eq!(isa.usable(), isa);
            #[cfg(target_arch = "x86_64")]
            {
                assert_eq!(isa.avx2().is_some(), isa != Isa::Scalar);
                assert_eq!(isa.avx512_vnni().is_some(), matches!(isa, Isa::Avx512Vnni | Isa::Avx512Bf16));
                assert_eq!(isa.avx512_bf16().is_some(), isa == Isa::Avx512Bf16);
            }
        }
        assert_eq!(Isa::Scalar.usable(), Isa::Scalar);
        assert_eq!(Isa::Avx512Vnni.exact(), Isa::detect());
        assert_eq!(Isa::Avx512Bf16.exact(), Isa::detect());
        // Asking for more than the CPU has gives the best it has, never more.
        assert_eq!(Isa::Avx512Bf16.usable(), Isa::detect_best());
        #[cfg(target_arch = "x86_64")]
        assert!(
            Isa::Scalar.avx2().is_none() && Isa::Scalar.avx512_vnni().is_none() && Isa::Scalar.avx512_bf16().is_none()
        );
    }
}
