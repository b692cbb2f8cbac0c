//! Policy files: the operators' Ed25519 keys and signed template lists.
//! What is signed is `cleanroom_query::policy`'s; the key, the signature
//! and its check are `cleanroom_crypto::signing`'s.

use std::path::{Path, PathBuf};

use cleanroom_crypto::signing::{self, PolicyKey};
use cleanroom_query::policy::{PolicyDraft, SignedPolicy, unhex};

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
        let (der, key) = PolicyKey::generate()?;
        let k = dir.join(format!("{role}-policy.key"));
        let p = dir.join(format!("{role}-policy.pub"));
        let der_hex = zeroize::Zeroizing::new(hex(&der));
        write(&k, &zeroize::Zeroizing::new(format!("{}\n", der_hex.as_str())), true)?;
        write(&p, &format!("{}\n", hex(&key.public_key())), false)?;
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
    let key_text = zeroize::Zeroizing::new(read(key_path)?);
    let bad_key = |what: String| NodeError::Config {
        path: key_path.display().to_string(),
        what,
    };
    let der = zeroize::Zeroizing::new(unhex(key_text.trim()).map_err(|e| bad_key(e.to_string()))?);
    let key = PolicyKey::from_pkcs8(&der).map_err(|e| bad_key(e.to_string()))?;
    let templates = cfg.templates(config_path)?;
    let draft = PolicyDraft::new(cfg.role.as_str(), &cfg.collaboration.id, &templates);
    let signature = key.sign(&draft.message());
    let signed = draft.signed(&key.public_key(), &signature);
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
    verify(&policy, read(public_key)?.trim()).map_err(|what| NodeError::Config {
        path: signed.display().to_string(),
        what,
    })?;
    Ok(policy)
}

/// Checks that `policy` was signed by the key whose public half is
/// `expected_public_key_hex`; the error says why not.
///
/// # Errors
/// A message for the operator.
pub fn verify(policy: &SignedPolicy, expected_public_key_hex: &str) -> Result<(), String> {
    let bad = || "the policy's signature does not verify against the expected public key".to_string();
    if policy.public_key.trim() != expected_public_key_hex.trim() {
        return Err(bad());
    }
    let public = unhex(expected_public_key_hex).map_err(|e| e.to_string())?;
    let signature = policy.signature_bytes().map_err(|e| e.to_string())?;
    signing::verify(&public, &policy.message(), &signature).map_err(|_| bad())
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use cleanroom_query::{Clip, Template, TemplateKind};

    fn t(name: &str, kind: TemplateKind) -> Template {
        Template::builtin(
            name,
            kind,
            (0, 100),
            vec!["s".into()],
            Clip::new(1, 10),
            1,
            1,
            vec!["alice".into()],
        )
    }

    /// Signed with one operator's key, a policy verifies under its public
    /// key only, and not once a digest is changed.
    #[test]
    fn sign_verify_and_tamper() {
        let (_, key) = PolicyKey::generate().unwrap();
        let (_, other) = PolicyKey::generate().unwrap();
        let (public, other_public) = (hex(&key.public_key()), hex(&other.public_key()));
        let draft = PolicyDraft::new(
            "bank",
            "c",
            &[t("a", TemplateKind::Overlap), t("b", TemplateKind::SpendByCategory)],
        );
        let sig = key.sign(&draft.message());
        let p = draft.signed(&key.public_key(), &sig);
        verify(&p, &public).unwrap();
        assert!(verify(&p, &other_public).is_err());
        let round = SignedPolicy::from_json(p.to_json().unwrap().as_bytes()).unwrap();
        verify(&round, &public).unwrap();
        let mut bad = p.clone();
        bad.templates[0].digest = "00".repeat(32);
        assert!(verify(&bad, &public).is_err());
        // The other key's signature, labelled with this key: refused.
        let mut forged = p.clone();
        forged.signature = hex(&other.sign(&p.message()));
        assert!(verify(&forged, &public).is_err());
    }
}
