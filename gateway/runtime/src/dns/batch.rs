//! Batched datagram I/O for the resolver's UDP listeners: one `recvmmsg` takes every query
//! waiting on the socket and one `sendmmsg` sends the answers, so a busy listener pays two
//! system calls per batch instead of two per query (measured with scripts/bench-dns.sh, the
//! calls were most of the resolver's cost).

use std::io;
use std::mem::{size_of, zeroed};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::RawFd;

/// Most datagrams received or sent per call.
pub const BATCH: usize = 64;
/// Largest query read (bigger ones are truncated and then refused as malformed).
pub const DATAGRAM: usize = 4096;

/// Receive buffers for one batch.
pub struct RecvBatch {
    bufs: Vec<u8>,
    lens: [usize; BATCH],
    from: [Option<SocketAddr>; BATCH],
}

impl Default for RecvBatch {
    fn default() -> Self {
        RecvBatch {
            bufs: vec![0u8; BATCH * DATAGRAM],
            lens: [0; BATCH],
            from: [None; BATCH],
        }
    }
}

impl RecvBatch {
    /// Reads every waiting datagram (up to [`BATCH`]) without blocking; `WouldBlock` when none.
    pub fn recv(&mut self, fd: RawFd) -> io::Result<usize> {
        // SAFETY: zeroed storage is a valid (empty) sockaddr_storage and mmsghdr.
        let mut addrs: [libc::sockaddr_storage; BATCH] = unsafe { zeroed() };
        // SAFETY: as above; every iovec is filled below.
        let mut iovs: [libc::iovec; BATCH] = unsafe { zeroed() };
        for (iov, buf) in iovs.iter_mut().zip(self.bufs.chunks_mut(DATAGRAM)) {
            iov.iov_base = buf.as_mut_ptr().cast();
            iov.iov_len = buf.len();
        }
        // SAFETY: as above.
        let mut msgs: [libc::mmsghdr; BATCH] = unsafe { zeroed() };
        for (i, m) in msgs.iter_mut().enumerate() {
            m.msg_hdr.msg_name = (&mut addrs[i] as *mut libc::sockaddr_storage).cast();
            m.msg_hdr.msg_namelen = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            m.msg_hdr.msg_iov = &mut iovs[i];
            m.msg_hdr.msg_iovlen = 1;
        }
        // SAFETY: every pointer in `msgs` points into `addrs`, `iovs` and `self.bufs`, which
        // outlive the call; the kernel writes at most the lengths given.
        let n = unsafe {
            libc::recvmmsg(
                fd,
                msgs.as_mut_ptr(),
                BATCH as libc::c_uint,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let n = n as usize;
        for i in 0..n {
            self.lens[i] = (msgs[i].msg_len as usize).min(DATAGRAM);
            self.from[i] = to_socket_addr(&addrs[i]);
        }
        Ok(n)
    }

    /// Datagram `i` of the last batch and its sender (`None` for an unknown address family).
    pub fn get(&self, i: usize) -> Option<(&[u8], SocketAddr)> {
        let from = (*self.from.get(i)?)?;
        let start = i * DATAGRAM;
        Some((&self.bufs[start..start + self.lens[i]], from))
    }
}

fn to_socket_addr(s: &libc::sockaddr_storage) -> Option<SocketAddr> {
    match i32::from(s.ss_family) {
        libc::AF_INET => {
            // SAFETY: the family says the storage holds a sockaddr_in.
            let a = unsafe { &*(s as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
            Some(SocketAddr::V4(SocketAddrV4::new(
                Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr)),
                u16::from_be(a.sin_port),
            )))
        }
        libc::AF_INET6 => {
            // SAFETY: the family says the storage holds a sockaddr_in6.
            let a = unsafe { &*(s as *const libc::sockaddr_storage).cast::<libc::sockaddr_in6>() };
            Some(SocketAddr::V6(SocketAddrV6::new(
                Ipv6Addr::from(a.sin6_addr.s6_addr),
                u16::from_be(a.sin6_port),
                a.sin6_flowinfo,
                a.sin6_scope_id,
            )))
        }
        _ => None,
    }
}

/// Sends `out` (destination, message; at most [`BATCH`] are taken) with as few calls as the
/// kernel allows; returns how many were sent (the rest hit a full socket buffer: `WouldBlock`
/// when none went). The headers live on the stack: nothing is allocated per batch.
pub fn send_batch<'a>(
    fd: RawFd,
    out: impl IntoIterator<Item = (SocketAddr, &'a [u8])>,
) -> io::Result<usize> {
    let mut addrs: [Option<socket2::SockAddr>; BATCH] = [const { None }; BATCH];
    // SAFETY: zeroed iovecs and mmsghdrs are valid; the ones used are filled below.
    let mut iovs: [libc::iovec; BATCH] = unsafe { zeroed() };
    // SAFETY: as above.
    let mut msgs: [libc::mmsghdr; BATCH] = unsafe { zeroed() };
    let mut n = 0;
    for (to, msg) in out.into_iter().take(BATCH) {
        let addr = addrs[n].insert(to.into());
        iovs[n].iov_base = msg.as_ptr() as *mut libc::c_void;
        iovs[n].iov_len = msg.len();
        let hdr = &mut msgs[n].msg_hdr;
        hdr.msg_name = addr.as_ptr() as *mut libc::c_void;
        hdr.msg_namelen = addr.len();
        hdr.msg_iov = &mut iovs[n];
        hdr.msg_iovlen = 1;
        n += 1;
    }
    if n == 0 {
        return Ok(0);
    }
    // SAFETY: the first `n` headers point into `addrs`, `iovs` and the caller's messages, alive
    // for the call; the kernel only reads them.
    let sent =
        unsafe { libc::sendmmsg(fd, msgs.as_mut_ptr(), n as libc::c_uint, libc::MSG_DONTWAIT) };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(sent as usize)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    #[test]
    fn a_batch_goes_out_and_comes_back_in_one_call_each() {
        let a = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let b = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let to = b.local_addr().unwrap();
        let msgs: Vec<Vec<u8>> = (0..10u8).map(|i| vec![i; usize::from(i) + 1]).collect();
        let out: Vec<(SocketAddr, &[u8])> = msgs.iter().map(|m| (to, m.as_slice())).collect();
        assert_eq!(send_batch(a.as_raw_fd(), out.iter().copied()).unwrap(), 10);
        let mut batch = RecvBatch::default();
        let mut got = 0;
        for _ in 0..100 {
            match batch.recv(b.as_raw_fd()) {
                Ok(n) => {
                    for i in 0..n {
                        let (data, from) = batch.get(i).unwrap();
                        assert_eq!(from, a.local_addr().unwrap());
                        assert_eq!(data, msgs[got].as_slice());
                        got += 1;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    std::thread::sleep(std::time::Duration::from_millis(5))
                }
                Err(e) => panic!("{e}"),
            }
            if got == 10 {
                break;
            }
        }
        assert_eq!(got, 10);
        assert_eq!(
            batch.recv(b.as_raw_fd()).unwrap_err().kind(),
            io::ErrorKind::WouldBlock
        );
    }
}
