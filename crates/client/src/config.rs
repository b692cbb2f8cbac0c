//! The analyst's configuration (TOML; unknown fields are refused).

use std::net::SocketAddr;
use std::path::Path;

use cleanroom_transport::{IdentityFiles, Role};
use serde::Deserialize;

use crate::ClientError;

/// One node, as an analyst reaches it.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeAddress {
    /// `bank` or `platform`.
    pub role: Role,
    /// Its UDP address.
    pub address: SocketAddr,
}

/// An analyst's configuration.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AnalystConfig {
    /// The analyst's name (as in its certificate).
    pub name: String,
    /// Certificates.
    pub identity: IdentityFiles,
    /// Both nodes.
    pub nodes: Vec<NodeAddress>,
}

fn bad(path: &Path, what: String) -> ClientError {
    ClientError::Config {
        path: path.display().to_string(),
        what,
    }
}

impl AnalystConfig {
    /// Reads and checks an analyst config; relative paths are taken
    /// relative to the file's directory.
    ///
    /// # Errors
    /// [`ClientError::Config`].
    pub fn load(path: &Path) -> Result<Self, ClientError> {
        let text = std::fs::read_to_string(path).map_err(|e| bad(path, e.to_string()))?;
        Self::parse(&text, path)
    }

    /// Parses and checks analyst config text as if read from `path`.
    ///
    /// # Errors
    /// [`ClientError::Config`].
    pub fn parse(text: &str, path: &Path) -> Result<Self, ClientError> {
        let mut cfg: AnalystConfig = toml::from_str(text).map_err(|e| bad(path, e.to_string()))?;
        let base = path.parent().unwrap_or(Path::new("."));
        cfg.identity.make_relative_to(base);
        let has = |r: Role| cfg.nodes.iter().filter(|n| n.role == r).count() == 1;
        if !has(Role::Bank) || !has(Role::Platform) {
            return Err(bad(
                path,
                "list exactly one bank and one platform under [[nodes]]".into(),
            ));
        }
        Ok(cfg)
    }
}
