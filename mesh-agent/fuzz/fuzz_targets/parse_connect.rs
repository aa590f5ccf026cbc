//! The tunnel server's CONNECT validation on arbitrary request heads: it must never panic,
//! and whatever it accepts must really be a CONNECT to a literal unicast ip:port.

#![no_main]

use std::net::SocketAddr;

use http::{Method, Request, Version};
use libfuzzer_sys::fuzz_target;
use mesh_agent::tunnel::parse_connect;

fuzz_target!(|data: &[u8]| {
    // Lines: method, URI, then header "name: value" lines. Anything the http crate refuses to
    // build is not a request h2 could hand to the server either.
    let mut lines = data.split(|&b| b == b'\n');
    let method = lines.next().unwrap_or_default();
    let uri = lines.next().unwrap_or_default();
    let Ok(method) = Method::from_bytes(method) else {
        return;
    };
    let mut builder = Request::builder()
        .method(method)
        .version(if data.len() % 7 == 0 {
            Version::HTTP_11
        } else {
            Version::HTTP_2
        })
        .uri(uri);
    for line in lines {
        let mut parts = line.splitn(2, |&b| b == b':');
        let (Some(name), Some(value)) = (parts.next(), parts.next()) else {
            continue;
        };
        builder = builder.header(name, value);
    }
    let Ok(request) = builder.body(()) else {
        return;
    };
    if let Ok(addr) = parse_connect(&request) {
        assert_eq!(request.method(), Method::CONNECT);
        assert_eq!(request.version(), Version::HTTP_2);
        let authority = request
            .uri()
            .authority()
            .expect("accepted without authority");
        assert_eq!(authority.as_str().parse::<SocketAddr>().ok(), Some(addr));
        assert_ne!(addr.port(), 0);
        assert!(!addr.ip().is_unspecified() && !addr.ip().is_multicast());
    }
});
