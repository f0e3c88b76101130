//! Problems found in user input, each pinned to a file, line, resource and field.

use std::fmt;
use std::sync::Arc;

use serde::Serialize;

/// Where a document or field came from: a file (or `<stdin>`) and a 1-based line.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct Location {
    #[serde(serialize_with = "as_str")]
    pub file: Arc<str>,
    pub line: usize,
}

fn as_str<S: serde::Serializer>(v: &Arc<str>, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(v)
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.file, self.line)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Error,
    Warning,
}

/// One problem with user input.
///
/// Rendered as `file:line: error: Kind ns/name: field.path: reason`, the shape every
/// meshward command uses so editors and CI logs can jump to the line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Diagnostic {
    pub severity: Severity,
    pub location: Location,
    /// `Kind namespace/name`, when the document got far enough to have one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resource: Option<String>,
    /// The field path inside the document (`spec.rules[0].to[0].operation.methods[1]`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
    pub message: String,
}

impl Diagnostic {
    pub fn is_error(&self) -> bool {
        self.severity == Severity::Error
    }
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let severity = match self.severity {
            Severity::Error => "error",
            Severity::Warning => "warning",
        };
        write!(f, "{}: {severity}: ", self.location)?;
        if let Some(resource) = &self.resource {
            write!(f, "{resource}: ")?;
        }
        if let Some(field) = &self.field {
            write!(f, "{field}: ")?;
        }
        f.write_str(&self.message)
    }
}

/// A problem found by validation before it is placed in a file: a field path
/// inside the object and what is wrong there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldIssue {
    pub severity: Severity,
    pub field: String,
    pub message: String,
}

impl FieldIssue {
    pub fn error(field: impl Into<String>, message: impl Into<String>) -> Self {
        FieldIssue {
            severity: Severity::Error,
            field: field.into(),
            message: message.into(),
        }
    }

    pub fn warning(field: impl Into<String>, message: impl Into<String>) -> Self {
        FieldIssue {
            severity: Severity::Warning,
            field: field.into(),
            message: message.into(),
        }
    }
}
