//! qalora-core: the tch-free kernels of qalora. Everything here works on plain slices
//! (row-major), so `cargo test` runs without libtorch; the Python extension adapts torch
//! tensors onto these functions.

pub mod error;
pub mod gptq;
pub mod group_grad;
pub mod group_pool;
pub mod isa;
pub mod layout;
pub mod matmul;
pub mod merge;
pub mod pack;
pub mod parallel;
pub mod probe;
pub mod quant;
#[doc(hidden)]
pub mod testutil;
#[cfg(target_arch = "x86_64")]
pub mod x86;

pub use error::{ErrorKind, KernelError, Result};
/// Re-exported so the binding names the same f16/bf16 types the kernels take.
pub use half;
pub use isa::Isa;
pub use layout::{check_bits, max_code, packed_row_bytes, QuantLayout, SUPPORTED_BITS};
pub use matmul::GroupParams;
pub use quant::ParamDtype;
