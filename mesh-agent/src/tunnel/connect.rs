//! The CONNECT request of one tunnel stream: what a client sends, and the pure validation the
//! server applies before anything else (fuzzed by `mesh-agent/fuzz`).
//!
//! A stream may carry the address of the client pod it proxies, as HBONE does, in a
//! `Forwarded: for="ip:port"` header (RFC 7239): several pods share one tunnel connection, so
//! the connection's own peer address does not say which one. It is only a claim: the server
//! reads it here and decides elsewhere, against its configuration, whether to believe it.

use std::net::{IpAddr, SocketAddr};

use http::{Method, Request, Version, header};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConnectError {
    #[error("method {0} is not CONNECT")]
    Method(String),
    #[error("not an HTTP/2 request")]
    Version,
    #[error("extended CONNECT (:protocol) is not supported")]
    ExtendedConnect,
    #[error("no :authority")]
    MissingAuthority,
    #[error("CONNECT must not carry :scheme or :path")]
    SchemeOrPath,
    #[error(":authority {0:?} is not an ip:port")]
    BadAuthority(String),
    #[error(":authority {0} is not a unicast address with a port")]
    ForbiddenAddress(SocketAddr),
    #[error("CONNECT must not carry a {0} header")]
    ForbiddenHeader(&'static str),
}

/// Validates a tunnel CONNECT request and returns its target. Accepts only plain HTTP/2
/// CONNECT whose `:authority` is a literal `ip:port` (no names: the sender already resolved
/// the endpoint, and a name here would make the receiving agent a DNS-driven open proxy), with
/// a unicast address and a non-zero port. Whether the target is allowed (is it a pod of this
/// node, does policy permit the client) is the handler's business, not this function's.
pub fn parse_connect<B>(request: &Request<B>) -> Result<SocketAddr, ConnectError> {
    if request.method() != Method::CONNECT {
        return Err(ConnectError::Method(truncated(request.method().as_str())));
    }
    if request.version() != Version::HTTP_2 {
        return Err(ConnectError::Version);
    }
    if request.extensions().get::<h2::ext::Protocol>().is_some() {
        return Err(ConnectError::ExtendedConnect);
    }
    let uri = request.uri();
    if uri.scheme().is_some() || uri.path_and_query().is_some() {
        return Err(ConnectError::SchemeOrPath);
    }
    let authority = uri.authority().ok_or(ConnectError::MissingAuthority)?;
    // A SocketAddr parse rejects names, user info, missing ports and IPv6 zone ids.
    let addr: SocketAddr = authority
        .as_str()
        .parse()
        .map_err(|_| ConnectError::BadAuthority(truncated(authority.as_str())))?;
    if addr.port() == 0 || !is_unicast(addr.ip()) {
        return Err(ConnectError::ForbiddenAddress(addr));
    }
    // A CONNECT has no request body in the HTTP sense; framing headers would be confused.
    for name in [
        header::CONTENT_LENGTH,
        header::TRANSFER_ENCODING,
        header::HOST,
    ] {
        if request.headers().contains_key(&name) {
            return Err(ConnectError::ForbiddenHeader(static_name(&name)));
        }
    }
    Ok(addr)
}

/// Where a stream goes, and for whom: the CONNECT authority and the client pod's address the
/// stream carries, if any.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamTarget {
    pub authority: SocketAddr,
    pub forwarded_for: Option<SocketAddr>,
}

impl From<SocketAddr> for StreamTarget {
    fn from(authority: SocketAddr) -> Self {
        Self {
            authority,
            forwarded_for: None,
        }
    }
}

/// The request a client sends to open a stream to `target`.
pub fn connect_request(target: StreamTarget) -> Result<Request<()>, http::Error> {
    let mut request = Request::builder()
        .method(Method::CONNECT)
        .version(Version::HTTP_2)
        .uri(target.authority.to_string());
    if let Some(client) = target.forwarded_for {
        request = request.header(header::FORWARDED, format!("for=\"{client}\""));
    }
    request.body(())
}

/// The client address a stream claims in its `Forwarded: for=` header: exactly one header
/// with one `for` element holding an IP address, with a port or not (0 then). Anything else
/// (several headers or elements, obfuscated identifiers, garbage) is no claim at all: the
/// server then connects as the pod itself, which is always safe.
pub fn forwarded_for<B>(request: &Request<B>) -> Option<SocketAddr> {
    let mut values = request.headers().get_all(header::FORWARDED).iter();
    let value = values.next()?.to_str().ok()?;
    if values.next().is_some() || value.contains([',', ';']) {
        return None;
    }
    let (name, node) = value.trim().split_once('=')?;
    if !name.eq_ignore_ascii_case("for") {
        return None;
    }
    let node = node
        .strip_prefix('"')
        .and_then(|n| n.strip_suffix('"'))
        .unwrap_or(node);
    let addr = match node.parse::<SocketAddr>() {
        Ok(addr) => addr,
        Err(_) => {
            let ip = node
                .strip_prefix('[')
                .and_then(|n| n.strip_suffix(']'))
                .unwrap_or(node);
            SocketAddr::new(ip.parse().ok()?, 0)
        }
    };
    is_unicast(addr.ip()).then_some(SocketAddr::new(addr.ip().to_canonical(), addr.port()))
}

fn is_unicast(ip: IpAddr) -> bool {
    match ip.to_canonical() {
        IpAddr::V4(v4) => !(v4.is_unspecified() || v4.is_multicast() || v4.is_broadcast()),
        IpAddr::V6(v6) => !(v6.is_unspecified() || v6.is_multicast()),
    }
}

fn static_name(name: &header::HeaderName) -> &'static str {
    if name == header::CONTENT_LENGTH {
        "content-length"
    } else if name == header::TRANSFER_ENCODING {
        "transfer-encoding"
    } else {
        "host"
    }
}

/// Peer-controlled text goes into logs: cap it.
fn truncated(text: &str) -> String {
    const MAX: usize = 64;
    match text.char_indices().nth(MAX) {
        Some((end, _)) => format!("{}...", &text[..end]),
        None => text.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use http::{Method, Request, Version};

    use super::{ConnectError, StreamTarget, connect_request, forwarded_for, parse_connect};

    fn connect(uri: &str) -> Request<()> {
        Request::builder()
            .method(Method::CONNECT)
            .version(Version::HTTP_2)
            .uri(uri)
            .body(())
            .expect("request")
    }

    #[test]
    fn accepts_ip_and_port() {
        let v4: SocketAddr = "10.1.2.3:8080".parse().expect("addr");
        assert_eq!(
            parse_connect(&connect_request(v4.into()).expect("req")),
            Ok(v4)
        );
        let v6: SocketAddr = "[fd00::1]:443".parse().expect("addr");
        assert_eq!(
            parse_connect(&connect_request(v6.into()).expect("req")),
            Ok(v6)
        );
    }

    #[test]
    fn the_client_address_goes_in_forwarded_and_comes_back_out() {
        let authority: SocketAddr = "10.2.0.2:8080".parse().expect("addr");
        for client in ["10.1.0.2:40123", "[fd00:1::2]:40123"] {
            let client: SocketAddr = client.parse().expect("addr");
            let target = StreamTarget {
                authority,
                forwarded_for: Some(client),
            };
            let request = connect_request(target).expect("req");
            assert_eq!(
                parse_connect(&request),
                Ok(authority),
                "still a valid CONNECT"
            );
            assert_eq!(forwarded_for(&request), Some(client));
        }
        let plain = connect_request(authority.into()).expect("req");
        assert_eq!(forwarded_for(&plain), None);
    }

    #[test]
    fn forwarded_accepts_one_address_and_nothing_else() {
        let with = |values: &[&str]| {
            let mut request = connect("10.2.0.2:8080");
            for value in values {
                request.headers_mut().append(
                    http::header::FORWARDED,
                    value.parse().expect("header value"),
                );
            }
            forwarded_for(&request).map(|a| a.to_string())
        };
        assert_eq!(with(&["for=10.1.0.2"]).as_deref(), Some("10.1.0.2:0"));
        assert_eq!(with(&["For=\"10.1.0.2:7\""]).as_deref(), Some("10.1.0.2:7"));
        assert_eq!(with(&["for=\"[fd00::2]\""]).as_deref(), Some("[fd00::2]:0"));
        assert_eq!(
            with(&["for=\"[::ffff:10.1.0.2]:9\""]).as_deref(),
            Some("10.1.0.2:9"),
            "a v4-mapped address is the IPv4 one"
        );
        for refused in [
            &["for=10.1.0.2", "for=10.1.0.3"][..],
            &["for=10.1.0.2, for=10.1.0.3"],
            &["for=10.1.0.2;proto=http"],
            &["by=10.1.0.2"],
            &["for=unknown"],
            &["for=_hidden"],
            &["for=0.0.0.0"],
            &["for=224.0.0.1"],
            &["for=[fe80::1%eth0]"],
            &["for=10.1.0.2:99999"],
            &[""],
        ] {
            assert_eq!(with(refused), None, "{refused:?}");
        }
    }

    #[test]
    fn refuses_the_rest() {
        for uri in [
            "example.com:80",
            "10.0.0.1",
            "10.0.0.1:0",
            "0.0.0.0:80",
            "224.0.0.1:80",
            "255.255.255.255:80",
            "[::]:80",
            "[fe80::1%eth0]:80",
            "user@10.0.0.1:80",
            "10.0.0.1:99999",
        ] {
            assert!(
                parse_connect(&connect(uri)).is_err(),
                "{uri} accepted: {:?}",
                parse_connect(&connect(uri))
            );
        }
        assert!(matches!(
            parse_connect(&connect("https://10.0.0.1:80/")),
            Err(ConnectError::SchemeOrPath)
        ));
        assert!(matches!(
            parse_connect(&connect("/")),
            Err(ConnectError::SchemeOrPath)
        ));
        let get = Request::builder()
            .method(Method::GET)
            .version(Version::HTTP_2)
            .uri("10.0.0.1:80")
            .body(())
            .expect("request");
        assert!(matches!(parse_connect(&get), Err(ConnectError::Method(_))));
        let mut with_length = connect("10.0.0.1:80");
        with_length
            .headers_mut()
            .insert(http::header::CONTENT_LENGTH, 0.into());
        assert!(matches!(
            parse_connect(&with_length),
            Err(ConnectError::ForbiddenHeader("content-length"))
        ));
    }
}
