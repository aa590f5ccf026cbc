//! The wire format of the CA's API, shared by the node's client ([`super::RemoteSigner`]) and
//! the CA (`crate::ca`): HTTP/1.1 over mutual TLS, JSON bodies, keys and certificates as
//! base64 DER.
//!
//! - `POST /v1/sign` `{"identity": "spiffe://...", "publicKey": "<SPKI>", "lifetimeSeconds": N}`
//!   -> `200 {"chain": ["<leaf>", "<intermediate>"...]}` (leaf first, no root), or an error
//!   status with `{"error": "..."}`: `400` malformed, `403` not placed on the node, `413` too
//!   large, `429` over the node's rate (with `retry-after`), `503` the CA cannot sign now.
//! - `GET /v1/health` -> `200 {"ok": true}`: reachability, with the same authentication.

use base64::Engine;
use serde::{Deserialize, Serialize};

pub const SIGN_PATH: &str = "/v1/sign";
pub const HEALTH_PATH: &str = "/v1/health";
/// The largest request body the CA reads; a P-256 or RSA-4096 key and an identity fit many
/// times over.
pub const MAX_REQUEST_BYTES: usize = 16 * 1024;
/// The largest response body a node reads (a chain of a few certificates).
pub const MAX_RESPONSE_BYTES: usize = 64 * 1024;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SignRequest {
    /// The workload identity asked for.
    pub identity: String,
    /// The DER SubjectPublicKeyInfo to certify, base64.
    pub public_key: String,
    /// The lifetime asked for; the CA may shorten it.
    pub lifetime_seconds: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SignResponse {
    /// DER certificates, base64, leaf first.
    pub chain: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ErrorBody {
    pub error: String,
}

pub fn encode(der: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(der)
}

pub fn decode(text: &str) -> Result<Vec<u8>, base64::DecodeError> {
    base64::engine::general_purpose::STANDARD.decode(text)
}
