//! Who a ServiceAccount token belongs to.
//!
//! Local mode: the tokens of the config directory's ServiceAccount token Secrets. Kubernetes
//! mode: the TokenReview API, with the identity audience, so that only tokens minted for Strait
//! (the projected volume the injector adds) are accepted, never a pod's API token.

use std::sync::Arc;
use tracing::Instrument as _;

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use kube::api::{Api, PostParams};
use tokio::sync::watch;

use crate::index::MeshIndex;

/// Why a token was not accepted.
#[derive(Debug, Clone, thiserror::Error, PartialEq)]
pub enum TokenError {
    #[error("the token is not a known ServiceAccount token")]
    Unknown,
    #[error("the token was refused by TokenReview: {0}")]
    Rejected(String),
    #[error("the token belongs to {0:?}, not to a ServiceAccount")]
    NotServiceAccount(String),
    #[error("TokenReview failed: {message} ({hint})")]
    ReviewFailed {
        message: String,
        /// What to check, from the kind of failure.
        hint: &'static str,
    },
}

/// Authenticates workload tokens.
#[derive(Clone)]
pub enum Authenticator {
    Local(watch::Receiver<Arc<MeshIndex>>),
    Kubernetes {
        client: kube::Client,
        audience: String,
        /// Recent TokenReview verdicts, so that a burst of requests (a restarting deployment,
        /// or a caller repeating a bad token) does not become a burst of API calls.
        verdicts: Arc<Verdicts>,
    },
}

impl Authenticator {
    /// TokenReview against `client` for tokens of `audience`.
    pub fn kubernetes(client: kube::Client, audience: String) -> Self {
        Authenticator::Kubernetes {
            client,
            audience,
            verdicts: Arc::new(Verdicts::default()),
        }
    }
}

/// TokenReview verdicts by SHA-256 of the token (the token itself is not kept): an accepted
/// token for 30 s, a refused one for 5 s. A failed review is not remembered.
#[derive(Debug, Default)]
pub struct Verdicts {
    entries: std::sync::Mutex<std::collections::HashMap<[u8; 32], (Verdict, std::time::Instant)>>,
}

type Verdict = Result<(String, String), TokenError>;

const ACCEPTED_FOR: std::time::Duration = std::time::Duration::from_secs(30);
const REFUSED_FOR: std::time::Duration = std::time::Duration::from_secs(5);
const MAX_VERDICTS: usize = 10_000;

impl Verdicts {
    fn key(token: &str) -> [u8; 32] {
        let d = ring::digest::digest(&ring::digest::SHA256, token.as_bytes());
        let mut k = [0u8; 32];
        k.copy_from_slice(d.as_ref());
        k
    }

    fn get(&self, token: &str) -> Option<Verdict> {
        let entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        let (verdict, until) = entries.get(&Self::key(token))?;
        (std::time::Instant::now() < *until).then(|| verdict.clone())
    }

    fn put(&self, token: &str, verdict: &Verdict) {
        let ttl = match verdict {
            Ok(_) => ACCEPTED_FOR,
            Err(TokenError::ReviewFailed { .. }) => return,
            Err(_) => REFUSED_FOR,
        };
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        if entries.len() >= MAX_VERDICTS {
            let now = std::time::Instant::now();
            entries.retain(|_, (_, until)| *until > now);
            if entries.len() >= MAX_VERDICTS {
                entries.clear();
            }
        }
        entries.insert(
            Self::key(token),
            (verdict.clone(), std::time::Instant::now() + ttl),
        );
    }
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Authenticator::Local(_) => f.write_str("Authenticator::Local"),
            Authenticator::Kubernetes { audience, .. } => {
                write!(f, "Authenticator::Kubernetes({audience})")
            }
        }
    }
}

impl Authenticator {
    /// The `(namespace, service account)` the token proves.
    pub async fn authenticate(&self, token: &str) -> Result<(String, String), TokenError> {
        match self {
            Authenticator::Local(index) => {
                let _span = tracing::info_span!("token lookup", mode = "local").entered();
                index
                    .borrow()
                    .token_account(token)
                    .cloned()
                    .ok_or(TokenError::Unknown)
            }
            Authenticator::Kubernetes {
                client,
                audience,
                verdicts,
            } => {
                if let Some(v) = verdicts.get(token) {
                    return v;
                }
                let v = review(client.clone(), token, audience)
                    .instrument(tracing::info_span!("token review", %audience))
                    .await;
                verdicts.put(token, &v);
                v
            }
        }
    }
}

async fn review(
    client: kube::Client,
    token: &str,
    audience: &str,
) -> Result<(String, String), TokenError> {
    let api: Api<TokenReview> = Api::all(client);
    let request = TokenReview {
        spec: TokenReviewSpec {
            token: Some(token.to_string()),
            audiences: Some(vec![audience.to_string()]),
        },
        ..Default::default()
    };
    let answer = api
        .create(&PostParams::default(), &request)
        .await
        .map_err(review_failed)?;
    account_of(&answer, audience)
}

/// A failed TokenReview call, with a hint that fits its cause: only a refusal by the API
/// server points at RBAC.
fn review_failed(e: kube::Error) -> TokenError {
    let hint = match &e {
        kube::Error::Api(s) if s.code == 403 => {
            "the control plane needs `create tokenreviews`, e.g. the system:auth-delegator ClusterRole"
        }
        kube::Error::Api(s) if s.code == 401 => "the API server refused the control plane's own credentials",
        kube::Error::Api(_) => "the API server refused the review",
        _ => "the API server is unreachable; certificates are issued again once it answers",
    };
    TokenError::ReviewFailed {
        message: e.to_string(),
        hint,
    }
}

/// Reads a TokenReview answer: authenticated, for our audience, a ServiceAccount.
pub fn account_of(answer: &TokenReview, audience: &str) -> Result<(String, String), TokenError> {
    let status = answer
        .status
        .as_ref()
        .ok_or_else(|| TokenError::Rejected("no status in the answer".into()))?;
    if status.authenticated != Some(true) {
        return Err(TokenError::Rejected(
            status
                .error
                .clone()
                .unwrap_or_else(|| "not authenticated".into()),
        ));
    }
    if !status
        .audiences
        .as_ref()
        .is_some_and(|a| a.iter().any(|a| a == audience))
    {
        return Err(TokenError::Rejected(format!(
            "the token is not for the audience {audience}"
        )));
    }
    let username = status
        .user
        .as_ref()
        .and_then(|u| u.username.clone())
        .unwrap_or_default();
    let mut parts = username.splitn(4, ':');
    match (parts.next(), parts.next(), parts.next(), parts.next()) {
        (Some("system"), Some("serviceaccount"), Some(ns), Some(sa))
            if !ns.is_empty() && !sa.is_empty() =>
        {
            Ok((ns.to_string(), sa.to_string()))
        }
        _ => Err(TokenError::NotServiceAccount(username)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> TokenReview {
        let path = format!(
            "{}/../testdata/k8s/tokenreview/{name}",
            env!("CARGO_MANIFEST_DIR")
        );
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path}: {e}"))
    }

    #[test]
    fn captured_answers_read_as_accounts_or_refusals() {
        let aud = "identity.strait.io";
        assert_eq!(
            account_of(&fixture("valid.response.json"), aud),
            Ok(("shop".into(), "web".into()))
        );
        assert_eq!(
            account_of(&fixture("pod-bound.response.json"), aud),
            Ok(("shop".into(), "web".into()))
        );
        for refused in [
            "wrong-audience.response.json",
            "garbage.response.json",
            "no-audiences.response.json",
            "pod-deleted.response.json",
        ] {
            let err = account_of(&fixture(refused), aud).expect_err(refused);
            assert!(matches!(err, TokenError::Rejected(_)), "{refused}: {err}");
        }
        // A token accepted for another audience is not one of ours.
        assert!(account_of(&fixture("valid.response.json"), "other").is_err());
    }

    #[test]
    fn only_a_refusal_hints_at_rbac() {
        let api = |code: u16| {
            review_failed(kube::Error::Api(
                kube::core::Status::failure("no", "Forbidden")
                    .with_code(code)
                    .boxed(),
            ))
            .to_string()
        };
        assert!(api(403).contains("create tokenreviews"), "{}", api(403));
        assert!(!api(500).contains("tokenreviews"));
        let unreachable = review_failed(kube::Error::Service("connection refused".into()));
        assert!(
            unreachable.to_string().contains("unreachable"),
            "{unreachable}"
        );
        assert!(!unreachable.to_string().contains("tokenreviews"));
    }
}
