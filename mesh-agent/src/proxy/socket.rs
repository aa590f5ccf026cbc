//! Sockets the proxy creates. Every one carries the proxy mark (or, connecting from a tunnel
//! client's address, the transparent mark), so the connect4/6 programs never capture the
//! proxy's own traffic and the bind programs let it use the proxy ports.
//! Listeners are `SO_REUSEPORT`, so a successor agent can listen on the same ports before
//! this one stops (the handover of a rolling update).

use std::{io, net::SocketAddr};

use socket2::{Domain, Protocol, Socket, Type};

/// A listening socket, to be created on the thread of the pod's network namespace.
pub fn listener(addr: SocketAddr, mark: u32) -> io::Result<std::net::TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_mark(mark)?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(4096)?;
    Ok(socket.into())
}

/// An unconnected TCP socket for an upstream connection to `addr`, created on the thread of
/// the network namespace it should leave from.
pub fn upstream(addr: SocketAddr, mark: u32) -> io::Result<std::net::TcpStream> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_mark(mark)?;
    socket.set_nonblocking(true)?;
    socket.set_tcp_nodelay(true)?;
    Ok(socket.into())
}

/// Turns an unconnected upstream socket into one that connects from `client`, an address
/// that is not the pod's (a client pod of another node): IP_TRANSPARENT (CAP_NET_ADMIN) lets
/// it bind there, and `mark` (the transparent mark) is what the app's accepted socket
/// inherits and the pod's reply route selects. The port is picked here, at bind, so the
/// caller can register the source before the SYN leaves.
pub fn transparent(
    socket: &std::net::TcpStream,
    client: std::net::IpAddr,
    mark: u32,
) -> io::Result<()> {
    let socket = socket2::SockRef::from(socket);
    socket.set_mark(mark)?;
    if client.is_ipv4() {
        socket.set_ip_transparent_v4(true)?;
    } else {
        socket.set_ip_transparent_v6(true)?;
    }
    socket.bind(&SocketAddr::new(client, 0).into())
}

/// A listening socket on `[::]` that also accepts IPv4 (for the tunnel port).
pub fn dual_stack_listener(addr: SocketAddr, mark: u32) -> io::Result<std::net::TcpListener> {
    let socket = Socket::new(Domain::IPV6, Type::STREAM, Some(Protocol::TCP))?;
    socket.set_mark(mark)?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.set_only_v6(false)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(4096)?;
    Ok(socket.into())
}

/// Makes the pod's network namespace hand the pending connections of a closing listener to
/// another listener of its `SO_REUSEPORT` group (`net.ipv4.tcp_migrate_req`, Linux 5.14),
/// instead of resetting them: what an agent's listeners leave when it hands over to its
/// successor. Runs on the thread of that namespace (`/proc/sys/net` is the caller's).
pub fn migrate_pending_connections() -> io::Result<()> {
    std::fs::write("/proc/sys/net/ipv4/tcp_migrate_req", "1")
}
