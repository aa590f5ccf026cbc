//! The one error type of the configuration module.

use std::fmt;

/// Why a configuration could not be loaded.
///
/// `Parse` and `Invalid` render as `FILE:LINE:COLUMN: FIELD.PATH: message`, e.g.
/// `mesh.yaml:14:9: services[1].vips[0]: 10.96.0.10 is already the VIP of service default/web`.
/// The position is left out when unknown (`line == 0`) and the path when the error concerns the
/// whole document.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{file}: cannot read configuration: {source}")]
    Read {
        file: String,
        #[source]
        source: std::io::Error,
    },
    /// Not well-formed YAML, a value of the wrong type, an unknown or missing field.
    #[error("{}", Located { file, line: *line, column: *column, path, message })]
    Parse {
        file: String,
        line: u64,
        column: u64,
        path: String,
        message: String,
    },
    /// Well-formed, but semantically invalid (bad address, duplicate, dangling reference, ...).
    #[error("{}", Located { file, line: *line, column: *column, path, message })]
    Invalid {
        file: String,
        line: u64,
        column: u64,
        path: String,
        message: String,
    },
}

impl ConfigError {
    /// `(line, column)`, 1-based, when the error points into the file.
    pub fn position(&self) -> Option<(u64, u64)> {
        match self {
            Self::Read { .. } => None,
            Self::Parse { line, column, .. } | Self::Invalid { line, column, .. } => {
                (*line > 0).then_some((*line, *column))
            }
        }
    }

    /// The field path (`services[1].vips[0]`), empty for the whole document.
    pub fn path(&self) -> &str {
        match self {
            Self::Read { .. } => "",
            Self::Parse { path, .. } | Self::Invalid { path, .. } => path,
        }
    }
}

struct Located<'a> {
    file: &'a str,
    line: u64,
    column: u64,
    path: &'a str,
    message: &'a str,
}

impl fmt::Display for Located<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.file)?;
        if self.line > 0 {
            write!(f, ":{}:{}", self.line, self.column)?;
        }
        f.write_str(": ")?;
        if !self.path.is_empty() {
            write!(f, "{}: ", self.path)?;
        }
        f.write_str(self.message)
    }
}
