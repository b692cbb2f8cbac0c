//! Policy files: the operators' Ed25519 keys and signed template lists.

use std::path::{Path, PathBuf};

use cleanroom_query::policy::{SignedPolicy, generate_key};

use crate::NodeError;
use crate::config::NodeConfig;

fn read(path: &Path) -> Result<String, NodeError> {
    std::fs::read_to_string(path).map_err(|e| NodeError::Config {
        path: path.display().to_string(),
        what: e.to_string(),
    })
}

fn write(path: &Path, text: &str, secret: bool) -> Result<(), NodeError> {
    std::fs::write(path, text).map_err(|e| NodeError::Config {
        path: path.display().to_string(),
        what: e.to_string(),
    })?;
    #[cfg(unix)]
    if secret {
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600));
    }
    #[cfg(not(unix))]
    let _ = secret;
    Ok(())
}

/// Writes `<role>-policy.key` (hex PKCS#8, mode 0600) and
/// `<role>-policy.pub` (hex) for both roles into `dir`.
///
/// # Errors
/// A file error.
pub fn init_keys(dir: &Path) -> Result<Vec<PathBuf>, NodeError> {
    let mut out = Vec::new();
    for role in ["bank", "platform"] {
        let (key, public) = generate_key().map_err(|_| NodeError::Internal("policy key generation failed"))?;
        let k = dir.join(format!("{role}-policy.key"));
        let p = dir.join(format!("{role}-policy.pub"));
        write(&k, &format!("{key}\n"), true)?;
        write(&p, &format!("{public}\n"), false)?;
        out.push(k);
        out.push(p);
    }
    Ok(out)
}

/// Signs the templates of a node's config with its policy key and writes
/// the signed policy to `[policy] signed`.
///
/// # Errors
/// A config error (no key, unreadable files).
pub fn sign(cfg: &NodeConfig, config_path: &Path) -> Result<SignedPolicy, NodeError> {
    let key_path = cfg.policy.key.as_ref().ok_or_else(|| NodeError::Config {
        path: config_path.display().to_string(),
        what: "[policy] key is needed to sign".into(),
    })?;
    let key = read(key_path)?;
    let templates = cfg.templates(config_path)?;
    let signed = SignedPolicy::sign(cfg.role.as_str(), &cfg.collaboration.id, &templates, key.trim()).map_err(|e| {
        NodeError::Config {
            path: key_path.display().to_string(),
            what: e.to_string(),
        }
    })?;
    let json = signed.to_json().map_err(|e| NodeError::Config {
        path: cfg.policy.signed.display().to_string(),
        what: e.to_string(),
    })?;
    write(&cfg.policy.signed, &json, false)?;
    Ok(signed)
}

/// Reads a signed policy and checks it against a public key file.
///
/// # Errors
/// [`NodeError::Config`] when it does not verify.
pub fn load_verified(signed: &Path, public_key: &Path) -> Result<SignedPolicy, NodeError> {
    let text = read(signed)?;
    let policy = SignedPolicy::from_json(text.as_bytes()).map_err(|e| NodeError::Config {
        path: signed.display().to_string(),
        what: e.to_string(),
    })?;
    policy.verify(read(public_key)?.trim()).map_err(|e| NodeError::Config {
        path: signed.display().to_string(),
        what: e.to_string(),
    })?;
    Ok(policy)
}
