//! Certificates for a collaboration (rcgen): a CA, the two node
//! certificates and analyst certificates, and the naming scheme that tells
//! nodes and analysts apart.
//!
//! - A node's certificate names `<role>.node.cleanroom` (role `bank` or
//!   `platform`) and may authenticate as server and as client.
//! - An analyst's certificate names `<name>.analyst.cleanroom` and may
//!   authenticate as client only.
//! - A node's worker `w` (docs/protocol.md, "Workers") has a certificate
//!   naming `<role>-worker-<w>.node.cleanroom`, server and client.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, CertifiedIssuer, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose, RevocationReason, RevokedCertParams,
    SerialNumber,
};

use crate::TransportError;

/// The DNS name in a node's certificate.
pub fn node_name(role: &str) -> String {
    format!("{role}.node.cleanroom")
}

/// The DNS name in the certificate of worker `index` of a node.
pub fn worker_name(role: &str, index: u32) -> String {
    format!("{role}-worker-{index}.node.cleanroom")
}

/// The index of the worker of `role` among a certificate's DNS names
/// (`None` if none names one).
pub fn worker_index(names: &[String], role: &str) -> Option<u32> {
    let prefix = format!("{role}-worker-");
    names.iter().find_map(|n| {
        let digits = n.strip_prefix(&prefix)?.strip_suffix(".node.cleanroom")?;
        if digits.is_empty() || digits.len() > 4 || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        // No leading zeros: one name per index.
        if digits.len() > 1 && digits.starts_with('0') {
            return None;
        }
        digits.parse().ok()
    })
}

/// The file name (without `.pem` / `.key`) of worker `index`'s
/// certificate and key.
pub fn worker_file(role: &str, index: u32) -> String {
    format!("{role}-worker-{index}")
}

/// Certificates for `count` workers of each node, signed by the CA in
/// `dir`, valid for `days` days: `<role>-worker-<w>.pem` and `.key`.
///
/// # Errors
/// A file, parse or signing error.
pub fn issue_workers(dir: &Path, count: u32, days: i64) -> Result<Vec<PathBuf>, TransportError> {
    let now = now_secs();
    let mut files = Vec::new();
    for role in ["bank", "platform"] {
        for w in 0..count {
            let file = worker_file(role, w);
            files.push(issue(
                dir,
                &file,
                &worker_name(role, w),
                true,
                now - 86_400,
                now.saturating_add(days.saturating_mul(86_400)),
            )?);
            files.push(dir.join(format!("{file}.key")));
        }
    }
    Ok(files)
}

/// The DNS name in an analyst's certificate.
pub fn analyst_name(name: &str) -> String {
    format!("{name}.analyst.cleanroom")
}

/// Whether `name` is usable as a role or analyst name (a DNS label).
pub fn valid_label(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-')
}

/// Paths written by [`init`].
#[derive(Debug, Clone)]
pub struct Written {
    /// `ca.pem` (certificate only: the CA key is written as `ca.key`).
    pub ca: PathBuf,
    /// Every file written.
    pub files: Vec<PathBuf>,
}

fn write(path: &Path, contents: &str, secret: bool) -> Result<(), TransportError> {
    std::fs::write(path, contents).map_err(|source| TransportError::Write2 {
        path: path.display().to_string(),
        source,
    })?;
    #[cfg(unix)]
    if secret {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(|source| {
            TransportError::Write2 {
                path: path.display().to_string(),
                source,
            }
        })?;
    }
    #[cfg(not(unix))]
    let _ = secret;
    Ok(())
}

fn validity(params: &mut CertificateParams, days: i64) {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    params.not_before = rcgen::date_time_ymd(1970, 1, 1) + std::time::Duration::from_secs((now - 86_400).max(0) as u64);
    params.not_after =
        rcgen::date_time_ymd(1970, 1, 1) + std::time::Duration::from_secs((now + days * 86_400).max(0) as u64);
}

/// A leaf certificate's parameters for `dns`: node certificates
/// (`server`) authenticate as server and client, analysts as client only.
fn leaf_params(dns: &str, server: bool) -> Result<CertificateParams, TransportError> {
    let mut params = CertificateParams::new(vec![dns.to_string()])?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, dns);
    params.distinguished_name = dn;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = if server {
        vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth]
    } else {
        vec![ExtendedKeyUsagePurpose::ClientAuth]
    };
    Ok(params)
}

/// Makes a collaboration CA, certificates for the `bank` and `platform`
/// nodes, and one per analyst, valid for `days` days, into `dir`:
/// `ca.pem`, `ca.key`, `<role>.pem`, `<role>.key`, `analyst-<name>.pem`,
/// `analyst-<name>.key`. Keys are ECDSA P-256, written with mode 0600.
///
/// # Errors
/// A generation or file error, or a name that is not a DNS label.
pub fn init(dir: &Path, analysts: &[String], days: i64) -> Result<Written, TransportError> {
    std::fs::create_dir_all(dir).map_err(|source| TransportError::Write2 {
        path: dir.display().to_string(),
        source,
    })?;
    let mut files = Vec::new();
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "cleanroom collaboration CA");
    ca_params.distinguished_name = dn;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    validity(&mut ca_params, days);
    let ca_key = KeyPair::generate()?;
    let ca_key_pem = ca_key.serialize_pem();
    let ca = CertifiedIssuer::self_signed(ca_params, ca_key)?;
    let ca_path = dir.join("ca.pem");
    write(&ca_path, &ca.pem(), false)?;
    write(&dir.join("ca.key"), &ca_key_pem, true)?;
    files.push(ca_path.clone());
    files.push(dir.join("ca.key"));

    let mut leaf = |file: String, dns: String, server: bool| -> Result<(), TransportError> {
        let mut params = leaf_params(&dns, server)?;
        validity(&mut params, days);
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &ca)?;
        let cert_path = dir.join(format!("{file}.pem"));
        let key_path = dir.join(format!("{file}.key"));
        write(&cert_path, &cert.pem(), false)?;
        write(&key_path, &key.serialize_pem(), true)?;
        files.push(cert_path);
        files.push(key_path);
        Ok(())
    };
    for role in ["bank", "platform"] {
        leaf(role.to_string(), node_name(role), true)?;
    }
    for a in analysts {
        if !valid_label(a) {
            return Err(TransportError::Pem {
                path: a.clone(),
                what: "analyst names must be lower-case letters, digits and dashes",
            });
        }
        leaf(format!("analyst-{a}"), analyst_name(a), false)?;
    }
    Ok(Written { ca: ca_path, files })
}

fn read_text(path: &Path) -> Result<String, TransportError> {
    std::fs::read_to_string(path).map_err(|source| TransportError::File {
        path: path.display().to_string(),
        source,
    })
}

macro_rules! unix_time {
    ($secs:expr) => {
        rcgen::date_time_ymd(1970, 1, 1) + std::time::Duration::from_secs(($secs).max(0) as u64)
    };
}

fn now_secs() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// The collaboration CA in `dir` (`ca.pem`, `ca.key`) as an issuer.
fn load_issuer(dir: &Path) -> Result<Issuer<'static, KeyPair>, TransportError> {
    let key = KeyPair::from_pem(&read_text(&dir.join("ca.key"))?)?;
    Ok(Issuer::from_ca_cert_pem(&read_text(&dir.join("ca.pem"))?, key)?)
}

/// Writes `ca.crl.pem` into `dir`: a revocation list signed by the CA in
/// `dir`, valid for `days` days, that revokes the certificates in the PEM
/// files `revoked` (by their serial numbers). The list replaces any earlier
/// one, so name every certificate that stays revoked. Nodes and analysts
/// with `identity.crl` pointing at it refuse those certificates.
///
/// # Errors
/// A file, parse or signing error.
pub fn revoke(dir: &Path, revoked: &[PathBuf], days: i64) -> Result<PathBuf, TransportError> {
    let issuer = load_issuer(dir)?;
    let now = now_secs();
    let mut revoked_certs = Vec::new();
    for path in revoked {
        let bad = || TransportError::Pem {
            path: path.display().to_string(),
            what: "not a certificate this CA can revoke",
        };
        let der = crate::certs_from_pem(&read_text(path)?.into_bytes(), path)?;
        let first = der.first().ok_or_else(bad)?;
        let (_, cert) = x509_parser::parse_x509_certificate(first).map_err(|_| bad())?;
        let serial_number = SerialNumber::from(cert.raw_serial().to_vec());
        revoked_certs.push(RevokedCertParams {
            serial_number,
            revocation_time: unix_time!(now),
            reason_code: Some(RevocationReason::KeyCompromise),
            invalidity_date: None,
        });
    }
    let crl = CertificateRevocationListParams {
        this_update: unix_time!(now - 60),
        next_update: unix_time!(now + days.max(1) * 86_400),
        crl_number: SerialNumber::from(now.max(1) as u64),
        issuing_distribution_point: None,
        revoked_certs,
        key_identifier_method: KeyIdMethod::Sha256,
    }
    .signed_by(&issuer)?;
    let path = dir.join("ca.crl.pem");
    write(&path, &crl.pem()?, false)?;
    Ok(path)
}

/// Issues one more certificate from the CA in `dir` for `dns`, valid from
/// `not_before` to `not_after` (Unix seconds), written as `<file>.pem` and
/// `<file>.key`: for an analyst added later, and for tests of expired and
/// not-yet-valid certificates.
///
/// # Errors
/// A file, parse or signing error.
pub fn issue(
    dir: &Path,
    file: &str,
    dns: &str,
    server: bool,
    not_before: i64,
    not_after: i64,
) -> Result<PathBuf, TransportError> {
    let issuer = load_issuer(dir)?;
    let mut params = leaf_params(dns, server)?;
    params.not_before = unix_time!(not_before);
    params.not_after = unix_time!(not_after);
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, &issuer)?;
    let cert_path = dir.join(format!("{file}.pem"));
    write(&cert_path, &cert.pem(), false)?;
    write(&dir.join(format!("{file}.key")), &key.serialize_pem(), true)?;
    Ok(cert_path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_worker_is_named_by_role_and_index() {
        assert_eq!(worker_name("platform", 3), "platform-worker-3.node.cleanroom");
        let names = |n: &str| vec![n.to_string()];
        assert_eq!(worker_index(&names(&worker_name("platform", 3)), "platform"), Some(3));
        assert_eq!(worker_index(&names(&worker_name("platform", 0)), "platform"), Some(0));
        assert_eq!(worker_index(&names(&worker_name("platform", 3)), "bank"), None);
        for other in [
            "platform.node.cleanroom",
            "platform-worker-.node.cleanroom",
            "platform-worker-03.node.cleanroom",
            "platform-worker-12345.node.cleanroom",
            "platform-worker-1x.node.cleanroom",
            "platform-worker-1.analyst.cleanroom",
        ] {
            assert_eq!(worker_index(&names(other), "platform"), None, "{other}");
        }
    }

    #[test]
    fn worker_certificates_are_issued_by_the_collaboration_ca() {
        let dir = tempfile::tempdir().unwrap();
        init(dir.path(), &[], 1).unwrap();
        let files = issue_workers(dir.path(), 2, 1).unwrap();
        assert_eq!(files.len(), 8);
        for role in ["bank", "platform"] {
            for w in 0..2 {
                let file = worker_file(role, w);
                let id = crate::Identity::load(
                    &dir.path().join(format!("{file}.pem")),
                    &dir.path().join(format!("{file}.key")),
                )
                .unwrap();
                let leaf = id.leaf().unwrap();
                assert!(crate::certificate_is_for(leaf, &worker_name(role, w)));
                assert_eq!(worker_index(&crate::certificate_names(leaf), role), Some(w));
                assert!(!crate::certificate_is_for(leaf, &node_name(role)));
            }
        }
    }
}
