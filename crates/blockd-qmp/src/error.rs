//! QMP error classes and the error value every command handler returns.
//!
//! QEMU picks the error class per call site (an unknown device is
//! `DeviceNotFound`, an unknown job `DeviceNotActive`, nearly everything else
//! `GenericError`), so handlers choose the class explicitly through the
//! constructors here; nothing is derived automatically from an I/O error.

use serde::Serialize;
use std::fmt;

/// The error classes of QEMU's QMP (`qapi/error.json`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum ErrorClass {
    /// The catch-all class; the `desc` says what went wrong.
    GenericError,
    /// The command does not exist (or is not available yet, before negotiation).
    CommandNotFound,
    /// A device, backend or job named by the client is not active.
    DeviceNotActive,
    /// A device or backend named by the client does not exist.
    DeviceNotFound,
    /// KVM lacks a capability (kept for wire compatibility; blockd never raises it).
    KVMMissingCap,
}

impl ErrorClass {
    /// The class name as it appears on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorClass::GenericError => "GenericError",
            ErrorClass::CommandNotFound => "CommandNotFound",
            ErrorClass::DeviceNotActive => "DeviceNotActive",
            ErrorClass::DeviceNotFound => "DeviceNotFound",
            ErrorClass::KVMMissingCap => "KVMMissingCap",
        }
    }
}

/// An error answered to a QMP client: `{"error": {"class": ..., "desc": ...}}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QmpError {
    /// The error class.
    pub class: ErrorClass,
    /// Human-readable description, worded as QEMU words it where clients may match on it.
    pub desc: String,
}

impl QmpError {
    /// A `GenericError` with the given description.
    pub fn generic(desc: impl Into<String>) -> Self {
        QmpError {
            class: ErrorClass::GenericError,
            desc: desc.into(),
        }
    }

    /// An error of an explicit class.
    pub fn with_class(class: ErrorClass, desc: impl Into<String>) -> Self {
        QmpError {
            class,
            desc: desc.into(),
        }
    }

    /// `CommandNotFound`: "The command NAME has not been found".
    pub fn command_not_found(name: &str) -> Self {
        Self::with_class(
            ErrorClass::CommandNotFound,
            format!("The command {name} has not been found"),
        )
    }

    /// `DeviceNotFound` with QEMU's "Device 'NAME' not found" wording.
    pub fn device_not_found(name: &str) -> Self {
        Self::with_class(
            ErrorClass::DeviceNotFound,
            format!("Device '{name}' not found"),
        )
    }

    /// `DeviceNotActive` for a block job that does not exist.
    pub fn block_job_not_found(id: &str) -> Self {
        Self::with_class(
            ErrorClass::DeviceNotActive,
            format!("Block job '{id}' not found"),
        )
    }

    /// "Parameter 'NAME' is missing".
    pub fn missing_parameter(name: &str) -> Self {
        Self::generic(format!("Parameter '{name}' is missing"))
    }

    /// "Invalid parameter type for 'NAME', expected: WHAT".
    pub fn invalid_parameter_type(name: &str, expected: &str) -> Self {
        Self::generic(format!(
            "Invalid parameter type for '{name}', expected: {expected}"
        ))
    }

    /// "Parameter 'NAME' expects WHAT".
    pub fn invalid_parameter_value(name: &str, expected: &str) -> Self {
        Self::generic(format!("Parameter '{name}' expects {expected}"))
    }

    /// "Parameter 'NAME' is unexpected".
    pub fn unexpected_parameter(name: &str) -> Self {
        Self::generic(format!("Parameter '{name}' is unexpected"))
    }

    /// "Parameter 'NAME' does not accept value 'VALUE'".
    pub fn bad_enum_value(name: &str, value: &str) -> Self {
        Self::generic(format!(
            "Parameter '{name}' does not accept value '{value}'"
        ))
    }

    /// The `{"class": ..., "desc": ...}` object.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({"class": self.class.as_str(), "desc": self.desc})
    }
}

impl fmt::Display for QmpError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.desc)
    }
}

impl std::error::Error for QmpError {}
