//! A Service -> its VIPs and ports; an EndpointSlice -> the ready endpoints of one Service.
//! They meet at rebuild: a Service's endpoints are those of the slices labelled with its
//! name (`kubernetes.io/service-name`), whichever arrives first.
//!
//! Only TCP ports are kept (the mesh proxies TCP). A headless Service (`clusterIP: None`) and
//! an ExternalName have no VIP to steer and give nothing.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::{ObjectKey, TranslateError, ip, port};
use crate::names::Kind;

/// The label an EndpointSlice names its Service with.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServicePiece {
    pub name: String,
    pub namespace: String,
    /// Canonical, in the API's order.
    pub vips: Vec<IpAddr>,
    pub ports: Vec<PortPiece>,
    /// Shared with the Service built from it.
    pub selector: Arc<BTreeMap<String, String>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortPiece {
    pub port: u16,
    pub target: TargetPort,
    pub name: Option<String>,
}

/// `targetPort`: a number, or a container port's name that each endpoint resolves (its
/// slice's port of the same name as the Service's port carries the number).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TargetPort {
    Number(u16),
    Name(String),
}

/// The ready endpoints of one slice and its ports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlicePiece {
    /// The Service it belongs to (same namespace).
    pub service: String,
    /// (port name, port number), TCP only.
    pub ports: Vec<(Option<String>, u16)>,
    pub endpoints: Vec<SliceEndpoint>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SliceEndpoint {
    pub ips: Vec<IpAddr>,
    pub node: Option<String>,
    pub zone: Option<String>,
}

fn is_tcp(protocol: Option<&str>) -> bool {
    protocol.is_none_or(|p| p == "TCP")
}

/// The Service `key` as VIPs and ports; `None` when it has no VIP.
pub fn service(svc: &Service, key: &ObjectKey) -> Result<Option<ServicePiece>, TranslateError> {
    let Some(spec) = svc.spec.as_ref() else {
        return Ok(None);
    };
    if spec.type_.as_deref() == Some("ExternalName") {
        return Ok(None);
    }
    let written: Vec<&String> = match (&spec.cluster_ips, &spec.cluster_ip) {
        (Some(ips), _) if !ips.is_empty() => ips.iter().collect(),
        (_, Some(one)) => vec![one],
        _ => Vec::new(),
    };
    let mut vips = Vec::new();
    for (i, text) in written.into_iter().enumerate() {
        if text == "None" || text.is_empty() {
            continue;
        }
        let vip = ip(text, &format!("spec.clusterIPs[{i}]"))?;
        if !vips.contains(&vip) {
            vips.push(vip);
        }
    }
    if vips.is_empty() {
        return Ok(None);
    }
    let mut ports = Vec::new();
    for (i, p) in spec.ports.iter().flatten().enumerate() {
        if !is_tcp(p.protocol.as_deref()) {
            continue;
        }
        let base = format!("spec.ports[{i}]");
        let number = port(p.port, &format!("{base}.port"))?;
        let target = match &p.target_port {
            None => TargetPort::Number(number),
            Some(IntOrString::Int(t)) => {
                TargetPort::Number(port(*t, &format!("{base}.targetPort"))?)
            }
            Some(IntOrString::String(name)) => match name.parse::<i32>() {
                Ok(t) => TargetPort::Number(port(t, &format!("{base}.targetPort"))?),
                Err(_) => TargetPort::Name(name.clone()),
            },
        };
        let name = p.name.clone().filter(|n| !n.is_empty());
        if let Some(n) = &name {
            Kind::Port
                .check(n)
                .map_err(|e| TranslateError::Invalid(format!("{base}.name: `{n}`: {e}")))?;
        }
        if ports.iter().any(|q: &PortPiece| q.port == number) {
            return Err(TranslateError::Invalid(format!(
                "{base}.port: port {number} is listed twice"
            )));
        }
        ports.push(PortPiece {
            port: number,
            target,
            name,
        });
    }
    if ports.is_empty() {
        return Ok(None);
    }
    Ok(Some(ServicePiece {
        name: key.name.clone(),
        namespace: key.namespace.clone(),
        vips,
        ports,
        selector: Arc::new(spec.selector.clone().unwrap_or_default()),
    }))
}

/// The ready endpoints of `slice`; `None` for a slice of no Service or of FQDN addresses.
pub fn slice(slice: &EndpointSlice) -> Result<Option<SlicePiece>, TranslateError> {
    let Some(service) = slice
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(SERVICE_NAME_LABEL))
        .cloned()
    else {
        return Ok(None);
    };
    if slice.address_type == "FQDN" {
        return Ok(None);
    }
    let mut ports = Vec::new();
    for (i, p) in slice.ports.iter().flatten().enumerate() {
        if !is_tcp(p.protocol.as_deref()) {
            continue;
        }
        let Some(number) = p.port else { continue };
        let number = port(number, &format!("ports[{i}].port"))?;
        ports.push((p.name.clone().filter(|n| !n.is_empty()), number));
    }
    let mut endpoints = Vec::new();
    for (i, e) in slice.endpoints.iter().enumerate() {
        // Ready unless the API says it is not (an unknown readiness counts as ready).
        if e.conditions.as_ref().and_then(|c| c.ready) == Some(false) {
            continue;
        }
        let mut ips = Vec::new();
        for (j, text) in e.addresses.iter().enumerate() {
            ips.push(ip(text, &format!("endpoints[{i}].addresses[{j}]"))?);
        }
        endpoints.push(SliceEndpoint {
            ips,
            node: e.node_name.clone(),
            zone: e.zone.clone(),
        });
    }
    Ok(Some(SlicePiece {
        service,
        ports,
        endpoints,
    }))
}
