//! Conversions between socket addresses and the eBPF map encoding (mesh_common::SockAddr).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use mesh_common::{FAMILY_V4, FAMILY_V6, FlowKey, SockAddr};

/// The flow key connect4/sock_ops stored for a captured connection, computed from what the
/// proxy sees on accept: the app's address (the accepted socket's peer).
pub fn flow_key(netns_cookie: u64, peer: SocketAddr) -> FlowKey {
    FlowKey {
        netns_cookie,
        src: encode(peer),
        _pad: 0,
    }
}

pub fn encode(addr: SocketAddr) -> SockAddr {
    let mut out = SockAddr {
        port: addr.port(),
        ..Default::default()
    };
    match addr.ip() {
        IpAddr::V4(ip) => {
            out.family = FAMILY_V4;
            out.ip[0] = u32::from_ne_bytes(ip.octets());
        }
        IpAddr::V6(ip) => {
            out.family = FAMILY_V6;
            for (word, chunk) in out.ip.iter_mut().zip(ip.octets().chunks_exact(4)) {
                *word = u32::from_ne_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
            }
        }
    }
    out
}

/// The socket address in a map value; `None` for an unknown family.
pub fn decode(addr: &SockAddr) -> Option<SocketAddr> {
    let ip = match addr.family {
        FAMILY_V4 => IpAddr::V4(Ipv4Addr::from(addr.ip[0].to_ne_bytes())),
        FAMILY_V6 => {
            let mut octets = [0u8; 16];
            for (chunk, word) in octets.chunks_exact_mut(4).zip(addr.ip) {
                chunk.copy_from_slice(&word.to_ne_bytes());
            }
            IpAddr::V6(Ipv6Addr::from(octets))
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, addr.port))
}

#[cfg(test)]
mod tests {
    use super::{decode, encode};

    #[test]
    fn round_trips_both_families() {
        for text in ["10.1.0.2:8080", "[fd00:1::2]:443"] {
            let addr = text.parse().expect("valid");
            assert_eq!(decode(&encode(addr)), Some(addr));
        }
    }

    #[test]
    fn ipv4_is_in_network_order_as_the_kernel_stores_it() {
        let encoded = encode("127.0.0.1:1".parse().expect("valid"));
        assert_eq!(encoded.ip[0].to_ne_bytes(), [127, 0, 0, 1]);
    }
}
