//! Node authentication in Kubernetes: the agent's projected service-account token, checked
//! with a TokenReview.
//!
//! The kubelet gives each agent pod a token for the audience [`AUDIENCE`], bound to the pod
//! (and so to its node) and rotated before it expires; the agent sends it as
//! `Authorization: Bearer` with every request. The CA asks the API server
//! (`authentication.k8s.io/v1` TokenReview, `spec.audiences: [mesh-ca]`) and accepts it only if
//! it is authenticated, for that audience, as the agent's service account. The node is the
//! token's `authentication.kubernetes.io/node-name` extra (Kubernetes 1.30 and later); older
//! clusters give the pod's name and UID only, and the node is then that pod's `spec.nodeName`
//! from the CA's own pod watch. A token that is for no pod names no node, and is refused.
//!
//! What this protects: a compromised node holds only the tokens of the pods on it, so it can
//! authenticate as itself and no other node.
//!
//! Cost: a successful review is cached for a minute under a hash of the token (never the token
//! itself), and concurrent requests with the same token wait for one review, so a node's burst
//! costs one. Reviews in flight are bounded: a flood of made-up tokens is answered `503`
//! rather than passed on to the API server.

use std::{
    collections::HashMap,
    sync::Arc,
    time::{Duration, Instant},
};

use http::header;
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec, TokenReviewStatus};
use kube::{Api, Client, api::PostParams};
use parking_lot::Mutex;
use sha2::{Digest, Sha256};
use tokio::sync::{OnceCell, Semaphore};

use super::{
    auth::{AuthError, AuthFuture, Caller, NodeAuthenticator},
    pods::PodWatch,
};

/// The audience of the agents' tokens.
pub const AUDIENCE: &str = "mesh-ca";
/// Extra fields of a token bound to a pod, as the TokenReview reports them.
const NODE_NAME: &str = "authentication.kubernetes.io/node-name";
const POD_NAME: &str = "authentication.kubernetes.io/pod-name";
const POD_UID: &str = "authentication.kubernetes.io/pod-uid";
/// A service account's user name: `system:serviceaccount:<namespace>:<name>`.
const SERVICE_ACCOUNT_PREFIX: &str = "system:serviceaccount:";

/// What the reviewer accepts and how much it remembers.
#[derive(Debug, Clone)]
pub struct TokenOptions {
    /// The agents' service account, `namespace/name`.
    pub agent_namespace: String,
    pub agent_service_account: String,
    /// How long a successful review is reused.
    pub cache_ttl: Duration,
    /// Tokens remembered at most (about two per node: the current and the rotated one).
    pub cache_entries: usize,
    /// Reviews in flight at most.
    pub max_reviews: usize,
}

impl Default for TokenOptions {
    fn default() -> Self {
        Self {
            agent_namespace: "mesh-system".into(),
            agent_service_account: "mesh-agent".into(),
            cache_ttl: Duration::from_secs(60),
            cache_entries: 20_000,
            max_reviews: 32,
        }
    }
}

/// One token's review: done once, shared by the requests that wait for it.
struct Slot {
    reviewed: OnceCell<String>,
    created: Instant,
}

type TokenHash = [u8; 32];

pub struct TokenReviewer {
    api: Api<TokenReview>,
    pods: Arc<PodWatch>,
    options: TokenOptions,
    /// `system:serviceaccount:<ns>:<sa>` of the agents.
    agent_user: String,
    cache: Mutex<HashMap<TokenHash, Arc<Slot>>>,
    reviews: Semaphore,
}

impl TokenReviewer {
    /// Reviews with `client`; falls back to `pods` for tokens that do not name their node.
    pub fn new(client: Client, pods: Arc<PodWatch>, options: TokenOptions) -> Self {
        let agent_user = format!(
            "{SERVICE_ACCOUNT_PREFIX}{}:{}",
            options.agent_namespace, options.agent_service_account
        );
        Self {
            api: Api::all(client),
            pods,
            agent_user,
            cache: Mutex::new(HashMap::new()),
            reviews: Semaphore::new(options.max_reviews.max(1)),
            options,
        }
    }

    /// The slot of `token`: the cached one while it is fresh, else a new one.
    fn slot(&self, hash: TokenHash) -> Arc<Slot> {
        let mut cache = self.cache.lock();
        let ttl = self.options.cache_ttl;
        if let Some(slot) = cache.get(&hash).filter(|s| s.created.elapsed() < ttl) {
            return slot.clone();
        }
        if cache.len() >= self.options.cache_entries {
            cache.retain(|_, slot| slot.created.elapsed() < ttl);
            if cache.len() >= self.options.cache_entries {
                // Full of fresh tokens (far more than the nodes): forgetting costs reviews only.
                cache.clear();
            }
        }
        let slot = Arc::new(Slot {
            reviewed: OnceCell::new(),
            created: Instant::now(),
        });
        cache.insert(hash, slot.clone());
        slot
    }

    /// Asks the API server about `token`; the node's name if it is an agent's.
    async fn review(&self, token: &str) -> Result<String, AuthError> {
        let _permit = self.reviews.try_acquire().map_err(|_| {
            AuthError::Unavailable("too many token reviews in flight; try again".into())
        })?;
        let review = TokenReview {
            spec: TokenReviewSpec {
                audiences: Some(vec![AUDIENCE.to_owned()]),
                token: Some(token.to_owned()),
            },
            ..TokenReview::default()
        };
        let answer = self
            .api
            .create(&PostParams::default(), &review)
            .await
            .map_err(|e| AuthError::Unavailable(format!("the TokenReview failed: {e}")))?;
        let status = answer.status.unwrap_or_default();
        self.node_of(status)
    }

    /// The node a review's status names, if it is of an agent's token for the CA.
    fn node_of(&self, status: TokenReviewStatus) -> Result<String, AuthError> {
        if status.authenticated != Some(true) {
            let reason = status.error.unwrap_or_else(|| "not authenticated".into());
            return Err(AuthError::Refused(format!(
                "the token is refused: {reason}"
            )));
        }
        if !status
            .audiences
            .as_ref()
            .is_some_and(|a| a.iter().any(|a| a == AUDIENCE))
        {
            return Err(AuthError::Refused(format!(
                "the token is not for the audience {AUDIENCE}"
            )));
        }
        let user = status.user.unwrap_or_default();
        let username = user.username.unwrap_or_default();
        if username != self.agent_user {
            return Err(AuthError::Refused(format!(
                "{username} is not the agents' service account {}",
                self.agent_user
            )));
        }
        let extra = user.extra.unwrap_or_default();
        let first = |key: &str| {
            extra
                .get(key)
                .and_then(|values| values.first())
                .filter(|v| !v.is_empty())
        };
        if let Some(node) = first(NODE_NAME) {
            return Ok(node.clone());
        }
        let (Some(pod), Some(uid)) = (first(POD_NAME), first(POD_UID)) else {
            return Err(AuthError::Refused(
                "the token is not bound to a pod, so it names no node".into(),
            ));
        };
        let namespace = &self.options.agent_namespace;
        match self.pods.node_of(namespace, pod, uid) {
            Ok(Some(node)) => Ok(node),
            Ok(None) => Err(AuthError::Refused(format!(
                "the token's pod {namespace}/{pod} (uid {uid}) is not running on a node"
            ))),
            Err(not_synced) => Err(AuthError::Unavailable(not_synced.to_string())),
        }
    }
}

impl NodeAuthenticator for TokenReviewer {
    fn authenticate<'a>(&'a self, caller: Caller<'a>) -> AuthFuture<'a> {
        Box::pin(async move {
            let token = bearer(caller)?;
            let slot = self.slot(Sha256::digest(token.as_bytes()).into());
            // A failed review leaves the slot empty: the next request reviews again.
            slot.reviewed
                .get_or_try_init(|| self.review(token))
                .await
                .cloned()
        })
    }
}

/// The token of `Authorization: Bearer <token>`.
fn bearer<'a>(caller: Caller<'a>) -> Result<&'a str, AuthError> {
    let value = caller
        .headers
        .get(header::AUTHORIZATION)
        .ok_or(AuthError::NoToken)?;
    let value = value
        .to_str()
        .map_err(|_| AuthError::Refused("the Authorization header is not text".into()))?;
    // The scheme is case-insensitive (RFC 9110).
    match value.split_once(' ') {
        Some((scheme, token))
            if scheme.eq_ignore_ascii_case("bearer") && !token.trim().is_empty() =>
        {
            Ok(token.trim())
        }
        _ => Err(AuthError::NoToken),
    }
}
