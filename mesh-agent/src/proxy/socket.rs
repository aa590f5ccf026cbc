//! Sockets the proxy creates. Every one carries the proxy mark, so the connect4/6 programs
//! never capture the proxy's own traffic and the bind programs let it use the proxy ports.
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
