//! Operators' signed approval of templates.
//!
//! Each operator signs the digests of its node's templates (name, SQL text,
//! parameter specs and clip bounds: [`Template::digest`]) with its node's
//! Ed25519 policy key. This module says what is signed ([`PolicyDraft`],
//! [`SignedPolicy::message`]) and what a policy approves; the key, the
//! signature and its check are `cleanroom_crypto::signing`'s, driven by the
//! node (`cleanroom_node::policy`). The nodes show each other their signed
//! policies; a template runs only when both operators signed the same
//! digest under the same name.

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

/// Errors reading a policy.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PolicyError {
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

/// What an operator signs: its role, the collaboration and its templates'
/// digests (sorted by name).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PolicyDraft {
    role: String,
    collaboration: String,
    templates: Vec<SignedTemplate>,
}

impl PolicyDraft {
    /// The draft for `templates`.
    pub fn new(role: &str, collaboration: &str, templates: &[Template]) -> Self {
        let mut list: Vec<SignedTemplate> = templates
            .iter()
            .map(|t| SignedTemplate {
                name: t.name.clone(),
                digest: hex(&t.digest()),
            })
            .collect();
        list.sort_by(|a, b| a.name.cmp(&b.name));
        Self {
            role: role.to_string(),
            collaboration: collaboration.to_string(),
            templates: list,
        }
    }

    /// The bytes to sign.
    pub fn message(&self) -> Vec<u8> {
        message(&self.role, &self.collaboration, &self.templates)
    }

    /// The signed policy, with the signer's public key and its signature of
    /// [`PolicyDraft::message`].
    pub fn signed(self, public_key: &[u8], signature: &[u8]) -> SignedPolicy {
        SignedPolicy {
            role: self.role,
            collaboration: self.collaboration,
            templates: self.templates,
            public_key: hex(public_key),
            signature: hex(signature),
        }
    }
}

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

impl SignedPolicy {
    /// The bytes its signature is over.
    pub fn message(&self) -> Vec<u8> {
        message(&self.role, &self.collaboration, &self.templates)
    }

    /// The signature's bytes.
    ///
    /// # Errors
    /// [`PolicyError::Malformed`] for bad hex.
    pub fn signature_bytes(&self) -> Result<Vec<u8>, PolicyError> {
        unhex(&self.signature)
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
            Clip::new(1, 10),
            1,
            1,
            vec!["alice".into()],
        )
    }

    /// The message covers role, collaboration and every (name, digest);
    /// a policy approves exactly the signed texts under their names.
    #[test]
    fn the_message_covers_every_template_and_approval_is_exact() {
        let a = t("a", TemplateKind::Overlap);
        let b = t("b", TemplateKind::SpendByCategory);
        let draft = PolicyDraft::new("bank", "c", &[b.clone(), a.clone()]);
        let m = draft.message();
        assert_ne!(m, PolicyDraft::new("platform", "c", &[a.clone(), b.clone()]).message());
        assert_ne!(m, PolicyDraft::new("bank", "d", &[a.clone(), b.clone()]).message());
        assert_ne!(m, PolicyDraft::new("bank", "c", std::slice::from_ref(&a)).message());
        // Sorted by name: the order given does not matter.
        assert_eq!(m, PolicyDraft::new("bank", "c", &[a.clone(), b.clone()]).message());
        let p = draft.signed(&[1; 32], &[2; 64]);
        assert_eq!(p.message(), m);
        assert_eq!(p.signature_bytes().unwrap(), vec![2; 64]);
        assert!(p.approves(&a) && p.approves(&b));
        let round = SignedPolicy::from_json(p.to_json().unwrap().as_bytes()).unwrap();
        assert_eq!(round, p);
        let mut tampered = p.clone();
        tampered.templates[0].digest = "00".repeat(32);
        assert_ne!(tampered.message(), m);
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
