//! One error type for every kernel. The binding layer maps `ErrorKind` onto the Python
//! exception hierarchy (`qalora.errors`), so each message must name the argument, what it
//! got and what is allowed.

use std::fmt;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// A tensor or array has the wrong shape, length or layout.
    Shape,
    /// A tensor has a dtype the op does not take.
    DType,
    /// Tensors live on different devices, or on one the op does not support.
    Device,
    /// The bit width is not one of 2, 3, 4, 5, 6, 8.
    Bits,
    /// The group size is zero, does not divide K, or breaks the byte layout.
    GroupSize,
    /// A code given to `pack` is outside [0, 2^bits - 1].
    CodeRange,
    /// A value is not acceptable (NaN/Inf weights, a non-finite scaling, ...).
    Value,
    /// A bug: a panic or an invariant that should have been checked earlier.
    Internal,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelError {
    pub kind: ErrorKind,
    pub message: String,
}

impl KernelError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self { kind, message: message.into() }
    }
    pub fn shape(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Shape, message)
    }
    pub fn dtype(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::DType, message)
    }
    pub fn device(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Device, message)
    }
    pub fn value(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Value, message)
    }
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Internal, message)
    }
}

impl fmt::Display for KernelError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for KernelError {}

pub type Result<T> = std::result::Result<T, KernelError>;
