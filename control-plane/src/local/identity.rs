//! Identity without ceremony in local mode: the control plane keeps its own trust anchor and
//! issuer in its state directory, and mints a bootstrap token for each Pod document, so that a
//! mesh started with no flags speaks mTLS.
//!
//! ```text
//! <state-dir>/            0700
//!   ca/anchor.crt         the trust anchor (10 years)          0644
//!   ca/anchor.key         its key                              0600
//!   ca/issuer.crt/.key    the issuer (1 year, re-issued from the anchor 30 days before it ends)
//!   ca/anchors.pem        what proxies trust (= anchor.crt)    0644
//!   tokens/<ns>/<pod>     the pod's bootstrap token            0600 (root)
//! ```
//!
//! A bootstrap token proves the pod's identity (its namespace and `serviceAccountName`) to the
//! identity API, like a projected ServiceAccount token in Kubernetes. Only the pod's set-up
//! (root, which creates the pod) can read it, and hands a copy to that pod's proxy alone.
//! Tokens are random (256 bits from the system's CSPRNG), kept across restarts, and removed
//! with their Pod document. Operators who bring their own root use `--issuer-cert/--issuer-key`
//! (or `strait identity init`) instead.

use std::collections::BTreeSet;
use std::io::Write as _;
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use crate::resources::{ObjectMeta, Pod, Resource, Secret};

/// Why the state directory could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("cannot use the state directory {path}: {source} (set --state-dir / STRAIT_STATE_DIR to a directory this process can write, or pass --issuer-cert/--issuer-key)")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the local CA in {dir}: {source}")]
    Ca {
        dir: PathBuf,
        #[source]
        source: strait_identity::ca::CaError,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> StateError + '_ {
    move |source| StateError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Creates `dir` (and parents) with mode 0700 if missing.
fn private_dir(dir: &Path) -> Result<(), StateError> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(io(dir))
}

/// Writes `path` atomically with `mode`.
fn write_file(path: &Path, contents: &[u8], mode: u32) -> Result<(), StateError> {
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .map_err(io(&tmp))?;
    f.write_all(contents).map_err(io(&tmp))?;
    f.sync_all().map_err(io(&tmp))?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode)).map_err(io(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io(path))
}

/// The local CA's files.
#[derive(Debug, Clone)]
pub struct LocalCa {
    pub issuer_cert: PathBuf,
    pub issuer_key: PathBuf,
    /// The bundle proxies trust.
    pub anchors: PathBuf,
    /// SHA-256 of the anchor's DER, `AB:CD:...`.
    pub fingerprint: String,
    /// Whether this start created the anchor (else it was reused).
    pub created: bool,
}

const ANCHOR_LIFETIME: Duration = Duration::from_secs(3600 * 24 * 3650);
const ISSUER_LIFETIME: Duration = Duration::from_secs(3600 * 24 * 365);
/// The issuer is re-issued from the anchor when less than this is left.
const ISSUER_RENEW_BEFORE: Duration = Duration::from_secs(3600 * 24 * 30);

/// The local CA under `<state_dir>/ca`: reused when present, created otherwise.
pub fn ensure_ca(state_dir: &Path, trust_domain: &str) -> Result<LocalCa, StateError> {
    let dir = state_dir.join("ca");
    private_dir(state_dir)?;
    private_dir(&dir)?;
    let ca_err = |source| StateError::Ca {
        dir: dir.clone(),
        source,
    };
    let anchor_cert = dir.join("anchor.crt");
    let anchor_key = dir.join("anchor.key");
    let issuer_cert = dir.join("issuer.crt");
    let issuer_key = dir.join("issuer.key");
    let anchors = dir.join("anchors.pem");
    let created = !anchor_cert.exists() || !anchor_key.exists();
    if created {
        let g = strait_identity::ca::generate(trust_domain, ANCHOR_LIFETIME, ISSUER_LIFETIME)
            .map_err(ca_err)?;
        write_file(&anchor_key, g.anchor_key_pem.as_bytes(), 0o600)?;
        write_file(&anchor_cert, g.anchor_cert_pem.as_bytes(), 0o644)?;
        write_file(&issuer_key, g.issuer_key_pem.as_bytes(), 0o600)?;
        write_file(&issuer_cert, g.issuer_cert_pem.as_bytes(), 0o644)?;
    }
    let anchor_pem = std::fs::read_to_string(&anchor_cert).map_err(io(&anchor_cert))?;
    let issuer_left = std::fs::read_to_string(&issuer_cert)
        .ok()
        .and_then(|pem| strait_identity::ca::not_after_of_pem(&pem).ok())
        .and_then(|t| t.duration_since(SystemTime::now()).ok());
    if !issuer_key.exists() || issuer_left.is_none_or(|left| left < ISSUER_RENEW_BEFORE) {
        let key_pem = std::fs::read_to_string(&anchor_key).map_err(io(&anchor_key))?;
        let (cert, key) =
            strait_identity::ca::issue_issuer(&anchor_pem, &key_pem, trust_domain, ISSUER_LIFETIME)
                .map_err(ca_err)?;
        write_file(&issuer_key, key.as_bytes(), 0o600)?;
        write_file(&issuer_cert, cert.as_bytes(), 0o644)?;
        tracing::info!(path = %issuer_cert.display(), "issued a new local issuer from the trust anchor");
    }
    write_file(&anchors, anchor_pem.as_bytes(), 0o644)?;
    Ok(LocalCa {
        issuer_cert,
        issuer_key,
        anchors,
        fingerprint: fingerprint(&anchor_pem),
        created,
    })
}

/// SHA-256 of the first certificate in `pem`, as colon-separated hex.
pub fn fingerprint(pem: &str) -> String {
    let der = strait_identity::ca::pem_to_der(pem).unwrap_or_default();
    ring::digest::digest(&ring::digest::SHA256, &der)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Bootstrap tokens of the Pod documents, under `<state_dir>/tokens/<ns>/<pod>`.
#[derive(Debug)]
pub struct BootstrapTokens {
    dir: PathBuf,
    rng: ring::rand::SystemRandom,
}

impl BootstrapTokens {
    pub fn new(state_dir: &Path) -> Result<Self, StateError> {
        let dir = state_dir.join("tokens");
        private_dir(&dir)?;
        Ok(Self {
            dir,
            rng: ring::rand::SystemRandom::new(),
        })
    }

    /// Where the token of pod `ns/name` is (once minted).
    pub fn path(state_dir: &Path, ns: &str, name: &str) -> PathBuf {
        state_dir.join("tokens").join(ns).join(name)
    }

    /// Mints the missing tokens of `pods`, removes those of pods that are gone, and returns
    /// every token as the ServiceAccount token Secret the identity API already accepts.
    pub fn sync(&self, pods: &[&Pod]) -> Vec<Resource> {
        let mut keep = BTreeSet::new();
        let mut secrets = Vec::new();
        for pod in pods {
            let (ns, name) = (&pod.metadata.namespace, &pod.metadata.name);
            if !safe_name(ns) || !safe_name(name) {
                tracing::warn!(namespace = %ns, pod = %name, "not a DNS label; no bootstrap token");
                continue;
            }
            let path = self.dir.join(ns).join(name);
            keep.insert(path.clone());
            let token = match self.read_or_mint(&path) {
                Ok(t) => t,
                Err(e) => {
                    tracing::error!(error = %e, "cannot mint a bootstrap token; the pod gets no identity");
                    continue;
                }
            };
            let sa = pod
                .spec
                .service_account_name
                .as_deref()
                .unwrap_or("default");
            secrets.push(Resource::Secret(Secret {
                metadata: ObjectMeta {
                    name: format!("{name}-bootstrap"),
                    namespace: ns.clone(),
                    labels: Default::default(),
                    annotations: [(
                        "kubernetes.io/service-account.name".to_string(),
                        sa.to_string(),
                    )]
                    .into(),
                    generation: None,
                },
                type_: Some("kubernetes.io/service-account-token".into()),
                data: Default::default(),
                string_data: [("token".to_string(), token)].into(),
            }));
        }
        self.remove_except(&keep);
        secrets
    }

    fn read_or_mint(&self, path: &Path) -> Result<String, StateError> {
        if let Ok(t) = std::fs::read_to_string(path) {
            let t = t.trim().to_string();
            if t.len() >= 32 {
                return Ok(t);
            }
        }
        if let Some(parent) = path.parent() {
            private_dir(parent)?;
        }
        let mut bytes = [0u8; 32];
        ring::rand::SecureRandom::fill(&self.rng, &mut bytes).map_err(|_| StateError::Io {
            path: path.to_path_buf(),
            source: std::io::Error::other("the system's random source failed"),
        })?;
        let token: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        write_file(path, token.as_bytes(), 0o600)?;
        Ok(token)
    }

    fn remove_except(&self, keep: &BTreeSet<PathBuf>) {
        let Ok(namespaces) = std::fs::read_dir(&self.dir) else {
            return;
        };
        for ns in namespaces.flatten() {
            let Ok(files) = std::fs::read_dir(ns.path()) else {
                continue;
            };
            for f in files.flatten() {
                if !keep.contains(&f.path()) {
                    let _ = std::fs::remove_file(f.path());
                }
            }
        }
    }
}

/// A DNS label: safe as a path component.
fn safe_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && s != "."
        && s != ".."
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tempdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("strait-state-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    fn mode(p: &Path) -> u32 {
        std::fs::metadata(p).expect("meta").permissions().mode() & 0o777
    }

    #[test]
    fn the_local_ca_is_created_once_private_and_reused() {
        let dir = tempdir("ca");
        let first = ensure_ca(&dir, "cluster.local").expect("created");
        assert!(first.created);
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(&dir.join("ca/anchor.key")), 0o600);
        assert_eq!(mode(&first.issuer_key), 0o600);
        assert_eq!(mode(&first.anchors), 0o644);
        let again = ensure_ca(&dir, "cluster.local").expect("reused");
        assert!(!again.created);
        assert_eq!(first.fingerprint, again.fingerprint, "the same root");
        assert_eq!(first.fingerprint.len(), 32 * 3 - 1);
        // The issuer chains to the anchor.
        let ca = strait_identity::ca::CertificateAuthority::from_pem(
            &std::fs::read_to_string(&again.issuer_cert).expect("cert"),
            &std::fs::read_to_string(&again.issuer_key).expect("key"),
        );
        assert!(ca.is_ok());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn each_pod_gets_its_own_secret_token_kept_across_restarts_and_removed_with_it() {
        let dir = tempdir("tokens");
        let pod = |name: &str, sa: &str| -> Pod {
            serde_yaml_ng::from_str(&format!(
                "metadata: {{name: {name}, namespace: shop}}\nspec: {{serviceAccountName: {sa}}}"
            ))
            .expect("pod")
        };
        let (a, b) = (pod("web-1", "web"), pod("api-1", "api"));
        let tokens = BootstrapTokens::new(&dir).expect("dir");
        let secrets = tokens.sync(&[&a, &b]);
        assert_eq!(secrets.len(), 2);
        let path = BootstrapTokens::path(&dir, "shop", "web-1");
        let minted = std::fs::read_to_string(&path).expect("token");
        assert_eq!(minted.len(), 64);
        assert_eq!(mode(&path), 0o600);
        let Resource::Secret(s) = &secrets[0] else {
            panic!("a secret")
        };
        assert_eq!(
            s.service_account_token(),
            Some(("web".to_string(), minted.clone()))
        );
        // A restart keeps it; another pod's differs.
        let again = BootstrapTokens::new(&dir).expect("dir");
        again.sync(&[&a, &b]);
        assert_eq!(std::fs::read_to_string(&path).expect("token"), minted);
        assert_ne!(
            std::fs::read_to_string(BootstrapTokens::path(&dir, "shop", "api-1")).expect("t"),
            minted
        );
        // The pod goes: so does its token.
        again.sync(&[&b]);
        assert!(!path.exists());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
