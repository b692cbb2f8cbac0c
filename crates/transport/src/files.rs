//! What a configuration names for a party's identity: its role and the
//! certificate, key, CA and revocation files (shared by the node's and the
//! analyst's configurations).

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::{TransportError, TrustAnchors};

/// Which side a node plays.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// The holder (customers with transactions).
    Bank,
    /// The matcher (users with segments).
    Platform,
}

impl Role {
    /// Its name, as in certificates.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Bank => "bank",
            Role::Platform => "platform",
        }
    }

    /// The other role.
    pub fn peer(self) -> Role {
        match self {
            Role::Bank => Role::Platform,
            Role::Platform => Role::Bank,
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Certificate, key and CA files.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdentityFiles {
    /// PEM certificate (chain).
    pub cert: PathBuf,
    /// PEM private key.
    pub key: PathBuf,
    /// PEM CA certificate(s) of the collaboration.
    pub ca: PathBuf,
    /// PEM certificate revocation list(s) of the CA (`cleanroom certs
    /// revoke`): certificates listed there are refused.
    #[serde(default)]
    pub crl: Option<PathBuf>,
}

impl IdentityFiles {
    /// The CA certificates with the configured revocation lists.
    ///
    /// # Errors
    /// An unreadable CA or CRL file.
    pub fn trust_anchors(&self) -> Result<TrustAnchors, TransportError> {
        let ca = TrustAnchors::load(&self.ca)?;
        Ok(match &self.crl {
            Some(crl) => ca.with_crl(crl)?,
            None => ca,
        })
    }

    /// Takes relative paths as relative to `base` (the config file's
    /// directory).
    pub fn make_relative_to(&mut self, base: &Path) {
        for p in [&mut self.cert, &mut self.key, &mut self.ca] {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
        if let Some(p) = self.crl.as_mut()
            && p.is_relative()
        {
            *p = base.join(&*p);
        }
    }
}
