//! A mesh policy resource -> the model's policy, validated by the config's own code
//! ([`policy_object`]) from the object's `spec`, so that a field means the same in the file
//! and in the cluster.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::core::DynamicObject;

use super::{ObjectKey, TranslateError};
use crate::config::{PolicyObject, policy_object};
use crate::k8s::kinds::ObjectKind;

/// A validated policy object, with what orders two that claim the same thing.
#[derive(Debug, Clone, PartialEq)]
pub struct PolicyPiece {
    pub object: PolicyObject,
    /// `metadata.creationTimestamp`: the older wins a conflict (absent sorts first).
    pub created: Option<Time>,
}

pub fn policy(
    kind: ObjectKind,
    obj: &DynamicObject,
    key: &ObjectKey,
) -> Result<PolicyPiece, TranslateError> {
    let Some(policy_kind) = kind.policy() else {
        return Err(TranslateError::Invalid(format!(
            "{kind} is not a policy kind"
        )));
    };
    let spec = obj.data.get("spec").cloned().unwrap_or_default();
    let text = spec.to_string();
    let object = policy_object(policy_kind, &key.namespace, &key.name, &text)?;
    let created = obj.metadata.creation_timestamp.clone();
    Ok(PolicyPiece { object, created })
}
