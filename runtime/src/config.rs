//! YAML configuration loading with errors that name the file and the bad field's path.
//!
//! Example error: `config file cluster.yaml: field `node.call_timeout_ms`: invalid type: string "x", expected u64`.

use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;

/// Why a config could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("config file {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The YAML was read but a field is missing, mistyped or unknown.
    #[error("{origin}: field `{field}`: {message}")]
    Invalid {
        /// `config file <path>` or `config string`.
        origin: String,
        /// Dotted path of the offending field (`.` for the document root).
        field: String,
        /// What was wrong.
        message: String,
    },
}

impl ConfigError {
    /// The dotted path of the offending field, if the error is about a field.
    pub fn field(&self) -> Option<&str> {
        match self {
            ConfigError::Invalid { field, .. } => Some(field),
            ConfigError::Io { .. } => None,
        }
    }
}

fn parse<T: DeserializeOwned>(text: &str, origin: String) -> Result<T, ConfigError> {
    let deserializer = serde_yaml::Deserializer::from_str(text);
    serde_path_to_error::deserialize(deserializer).map_err(|err| {
        let field = err.path().to_string();
        ConfigError::Invalid {
            origin,
            field,
            message: err.into_inner().to_string(),
        }
    })
}

/// Parses a config from a YAML string.
pub fn from_yaml_str<T: DeserializeOwned>(text: &str) -> Result<T, ConfigError> {
    parse(text, "config string".to_string())
}

/// Reads and parses a YAML config file.
pub fn load_yaml<T: DeserializeOwned>(path: impl AsRef<Path>) -> Result<T, ConfigError> {
    let path = path.as_ref();
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    parse(&text, format!("config file {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Inner {
        #[allow(dead_code)]
        port: u16,
    }
    #[derive(Debug, Deserialize)]
    struct Outer {
        #[allow(dead_code)]
        nodes: Vec<Inner>,
    }

    #[test]
    fn error_names_the_nested_field_path() {
        let err = from_yaml_str::<Outer>("nodes:\n  - port: 1\n  - port: nope\n").unwrap_err();
        assert_eq!(err.field(), Some("nodes[1].port"));
        assert!(err.to_string().contains("nodes[1].port"), "{err}");
    }

    #[test]
    fn error_names_the_file() {
        let dir = std::env::temp_dir().join(format!("turbine-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("bad.yaml");
        std::fs::write(&file, "nodes: 3\n").unwrap();
        let err = load_yaml::<Outer>(&file).unwrap_err();
        assert!(err.to_string().contains("bad.yaml"), "{err}");
        let missing = load_yaml::<Outer>(dir.join("absent.yaml")).unwrap_err();
        assert!(matches!(missing, ConfigError::Io { .. }));
    }
}
