//! Problems found in user input, each pinned to a file, line, resource and field.

use std::fmt;
use std::sync::Arc;

use serde::Serialize;

/// Where a document or field came from: a file (or `<stdin>`), a 1-based
/// line and, where the YAML parser says so, a 1-based column.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct Location {
    #[serde(serialize_with = "as_str")]
    pub file: Arc<str>,
    pub line: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub column: Option<usize>,
}

fn as_str<S: serde::Serializer>(v: &Arc<str>, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(v)
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Line 0: the file as a whole (it could not be read), no place in it.
        match (self.line, self.column) {
            (0, _) => write!(f, "{}", self.file),
            (line, None) => write!(f, "{}:{line}", self.file),
            (line, Some(column)) => write!(f, "{}:{line}:{column}", self.file),
        }
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

    /// `error: Kind ns/name: field.path: reason`, for an object that comes
    /// from no file (a running server's): a location would be invented.
    pub fn unplaced(&self) -> impl fmt::Display + '_ {
        Unplaced(self)
    }
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.location, Unplaced(self))
    }
}

struct Unplaced<'a>(&'a Diagnostic);

impl fmt::Display for Unplaced<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let Unplaced(d) = self;
        let severity = match d.severity {
            Severity::Error => "error",
            Severity::Warning => "warning",
        };
        write!(f, "{severity}: ")?;
        if let Some(resource) = &d.resource {
            write!(f, "{resource}: ")?;
        }
        if let Some(field) = &d.field {
            write!(f, "{field}: ")?;
        }
        f.write_str(&d.message)
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
