//! Operators' signed approval of templates.
//!
//! Each operator signs the digests of its node's templates (name, SQL text,
//! parameter specs and clip bounds: [`Template::digest`]) with its node's
//! Ed25519 policy key (ring). The nodes show each other their signed
//! policies; a template runs only when both operators signed the same
//! digest under the same name.

use ring::signature::{ED25519, Ed25519KeyPair, KeyPair, UnparsedPublicKey};
use serde::{Deserialize, Serialize};

use crate::Template;

/// One signed template digest.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignedTemplate {
    /// Template name.
    pub name: String,
    /// Hex of [`Template::digest`].
    pub digest: String,
}

/// A node's signed policy.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignedPolicy {
    /// `bank` or `platform`.
    pub role: String,
    /// The collaboration.
    pub collaboration: String,
    /// The approved templates.
    pub templates: Vec<SignedTemplate>,
    /// Hex of the Ed25519 public key.
    pub public_key: String,
    /// Hex of the Ed25519 signature over [`SignedPolicy::message`].
    pub signature: String,
}

/// Errors signing or checking a policy.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PolicyError {
    /// The key file is not an Ed25519 key.
    #[error("not an Ed25519 policy key")]
    BadKey,
    /// The signature does not verify, or was made with another key.
    #[error("the policy's signature does not verify against the expected public key")]
    BadSignature,
    /// Malformed hex or JSON.
    #[error("malformed policy: {0}")]
    Malformed(String),
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Decodes hex.
///
/// # Errors
/// [`PolicyError::Malformed`].
pub fn unhex(s: &str) -> Result<Vec<u8>, PolicyError> {
    let s = s.trim();
    if !s.len().is_multiple_of(2) {
        return Err(PolicyError::Malformed("odd-length hex".into()));
    }
    (0..s.len() / 2)
        .map(|i| {
            s.get(2 * i..2 * i + 2)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| PolicyError::Malformed("bad hex".into()))
        })
        .collect()
}

/// A fresh Ed25519 policy key: `(PKCS#8 hex, public key hex)`.
///
/// # Errors
/// [`PolicyError::BadKey`] if the OS generator fails.
pub fn generate_key() -> Result<(String, String), PolicyError> {
    let rng = ring::rand::SystemRandom::new();
    let pkcs8 = Ed25519KeyPair::generate_pkcs8(&rng).map_err(|_| PolicyError::BadKey)?;
    let kp = Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).map_err(|_| PolicyError::BadKey)?;
    Ok((hex(pkcs8.as_ref()), hex(kp.public_key().as_ref())))
}

impl SignedPolicy {
    fn message(role: &str, collaboration: &str, templates: &[SignedTemplate]) -> Vec<u8> {
        let mut m = b"cleanroom-policy-v1\n".to_vec();
        for part in [role, collaboration] {
            m.extend_from_slice(&(part.len() as u64).to_le_bytes());
            m.extend_from_slice(part.as_bytes());
        }
        for t in templates {
            m.extend_from_slice(&(t.name.len() as u64).to_le_bytes());
            m.extend_from_slice(t.name.as_bytes());
            m.extend_from_slice(t.digest.as_bytes());
        }
        m
    }

    /// Signs `templates` with the PKCS#8 (hex) Ed25519 key.
    ///
    /// # Errors
    /// [`PolicyError::BadKey`].
    pub fn sign(role: &str, collaboration: &str, templates: &[Template], key_hex: &str) -> Result<Self, PolicyError> {
        let kp = Ed25519KeyPair::from_pkcs8(&unhex(key_hex)?).map_err(|_| PolicyError::BadKey)?;
        let mut list: Vec<SignedTemplate> = templates
            .iter()
            .map(|t| SignedTemplate {
                name: t.name.clone(),
                digest: hex(&t.digest()),
            })
            .collect();
        list.sort_by(|a, b| a.name.cmp(&b.name));
        let sig = kp.sign(&Self::message(role, collaboration, &list));
        Ok(Self {
            role: role.to_string(),
            collaboration: collaboration.to_string(),
            templates: list,
            public_key: hex(kp.public_key().as_ref()),
            signature: hex(sig.as_ref()),
        })
    }

    /// Checks the signature against the expected public key (hex).
    ///
    /// # Errors
    /// [`PolicyError::BadSignature`] or [`PolicyError::Malformed`].
    pub fn verify(&self, expected_public_key_hex: &str) -> Result<(), PolicyError> {
        if self.public_key.trim() != expected_public_key_hex.trim() {
            return Err(PolicyError::BadSignature);
        }
        let pk = UnparsedPublicKey::new(&ED25519, unhex(expected_public_key_hex)?);
        pk.verify(
            &Self::message(&self.role, &self.collaboration, &self.templates),
            &unhex(&self.signature)?,
        )
        .map_err(|_| PolicyError::BadSignature)
    }

    /// Whether this policy approves exactly this template text.
    pub fn approves(&self, t: &Template) -> bool {
        let d = hex(&t.digest());
        self.templates.iter().any(|s| s.name == t.name && s.digest == d)
    }

    /// JSON text.
    ///
    /// # Errors
    /// [`PolicyError::Malformed`] (never for a well-formed policy).
    pub fn to_json(&self) -> Result<String, PolicyError> {
        serde_json::to_string_pretty(self).map_err(|e| PolicyError::Malformed(e.to_string()))
    }

    /// Parses JSON text (at most 1 MiB).
    ///
    /// # Errors
    /// [`PolicyError::Malformed`].
    pub fn from_json(text: &[u8]) -> Result<Self, PolicyError> {
        if text.len() > 1 << 20 {
            return Err(PolicyError::Malformed("policy over 1 MiB".into()));
        }
        serde_json::from_slice(text).map_err(|e| PolicyError::Malformed(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Clip, TemplateKind};

    fn t(name: &str, kind: TemplateKind) -> Template {
        Template::builtin(
            name,
            kind,
            (0, 100),
            vec!["s".into()],
            Clip {
                transactions: 1,
                spend_cents: 10,
            },
            1,
            1,
            vec!["alice".into()],
        )
    }

    #[test]
    fn sign_verify_and_tamper() {
        let (key, public) = generate_key().unwrap();
        let (_, other_public) = generate_key().unwrap();
        let a = t("a", TemplateKind::Overlap);
        let b = t("b", TemplateKind::SpendByCategory);
        let p = SignedPolicy::sign("bank", "c", &[a.clone(), b.clone()], &key).unwrap();
        p.verify(&public).unwrap();
        assert!(p.approves(&a) && p.approves(&b));
        assert_eq!(p.verify(&other_public), Err(PolicyError::BadSignature));
        let round = SignedPolicy::from_json(p.to_json().unwrap().as_bytes()).unwrap();
        round.verify(&public).unwrap();
        // A tampered list does not verify.
        let mut bad = p.clone();
        bad.templates[0].digest = "00".repeat(32);
        assert_eq!(bad.verify(&public), Err(PolicyError::BadSignature));
        // A changed template text is not approved.
        let mut b2 = b.clone();
        b2.sql.push(' ');
        assert!(!p.approves(&b2));
        // Another name for the same text is not approved.
        let mut b3 = b;
        b3.name = "c".into();
        assert!(!p.approves(&b3));
    }
}
