//! Batched UDP I/O on tokio: one socket, many datagrams per system call (recvmmsg with GRO on
//! receive, GSO runs on send, through quinn-udp), kernel buffers forced large when allowed.
//!
//! Inputs: datagrams from the network, and runs of equal-size datagrams to send. Outputs:
//! each received datagram with its source, handed to a callback. The gateway's serving loop
//! polls it for the WireGuard socket; the device client will for its own.
#![deny(missing_docs)]

use std::io::{self, IoSliceMut};
use std::net::SocketAddr;

use quinn_udp::{RecvMeta, Transmit, UdpSocketState, BATCH_SIZE};
use socket2::{Domain, Protocol, Socket, Type};
use tokio::io::Interest;
use tokio::net::UdpSocket;

/// Room for one GRO-coalesced receive.
const RECV_BUFFER: usize = 64 * 1024;

/// A UDP socket read and written in batches.
#[derive(Debug)]
pub struct BatchSocket {
    socket: UdpSocket,
    state: UdpSocketState,
    bufs: Vec<Vec<u8>>,
    metas: Vec<RecvMeta>,
}

impl BatchSocket {
    /// Binds `addr` (`[::]` takes IPv4 too) with `kernel_buffer` bytes of receive and send
    /// buffer: forced past `net.core.{r,w}mem_max` with CAP_NET_ADMIN, else what the limits
    /// allow. Must be called inside a tokio runtime.
    pub fn bind(addr: SocketAddr, kernel_buffer: usize) -> io::Result<BatchSocket> {
        BatchSocket::from_std(bind_one(addr, kernel_buffer, false)?)
    }

    /// Reads and writes a socket of [`bind_group`] in batches. Must be called inside the
    /// tokio runtime that will poll it.
    pub fn from_std(socket: std::net::UdpSocket) -> io::Result<BatchSocket> {
        let state = UdpSocketState::new((&socket).into())?;
        Ok(BatchSocket {
            socket: UdpSocket::from_std(socket)?,
            state,
            bufs: vec![vec![0u8; RECV_BUFFER]; BATCH_SIZE],
            metas: vec![RecvMeta::default(); BATCH_SIZE],
        })
    }

    /// Marks every datagram this socket sends with `mark` (SO_MARK, needs CAP_NET_ADMIN), so
    /// policy routing can keep a tunnel's own datagrams out of the tunnel.
    pub fn set_mark(&self, mark: u32) -> io::Result<()> {
        socket2::SockRef::from(&self.socket).set_mark(mark)
    }

    /// The bound address.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.socket.local_addr()
    }

    /// Waits until a receive may find datagrams.
    pub async fn readable(&self) -> io::Result<()> {
        self.socket.readable().await
    }

    /// Datagrams the kernel takes in one GSO send.
    pub fn max_gso_segments(&self) -> usize {
        self.state.max_gso_segments()
    }

    /// Receives one batch and hands each datagram to `on` (GRO-coalesced buffers split at
    /// their stride). `Ok(true)` when the batch was full and more may be waiting, `Ok(false)`
    /// when the socket is drained.
    pub fn receive_batch(&mut self, mut on: impl FnMut(SocketAddr, &[u8])) -> io::Result<bool> {
        let mut slices: Vec<IoSliceMut<'_>> =
            self.bufs.iter_mut().map(|b| IoSliceMut::new(b)).collect();
        let (socket, state, metas) = (&self.socket, &self.state, &mut self.metas);
        let capacity = slices.len();
        let mut count = 0;
        // A short batch means recvmmsg found the queue empty: reported as WouldBlock, it
        // clears the socket's readiness now instead of costing another recvmmsg that fails
        // (recvmmsg calls per wake of the gateway's loop went from 0.67 to 0.29, four paced
        // downloads at 100 Mbit/s). A datagram that arrives after it still wakes the reactor:
        // epoll signals every arrival on a socket, drained or not.
        let got = socket.try_io(Interest::READABLE, || {
            count = state.recv(socket.into(), &mut slices, metas)?;
            if count < capacity {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            Ok(())
        });
        let more = match got {
            Ok(()) => true,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => false,
            Err(e) => return Err(e),
        };
        for (meta, buf) in metas.iter().zip(slices.iter()).take(count) {
            let data = &buf[..meta.len.min(buf.len())];
            for datagram in data.chunks(meta.stride.max(1)) {
                on(meta.addr, datagram);
            }
        }
        Ok(more)
    }

    /// Sends `contents`, `segment_size`-byte datagrams back to back (the last may be shorter),
    /// to `dst` in one call, waiting while the kernel pushes back.
    pub async fn send_run(
        &self,
        dst: SocketAddr,
        contents: &[u8],
        segment_size: usize,
    ) -> io::Result<()> {
        let transmit = Transmit {
            destination: dst,
            ecn: None,
            contents,
            segment_size: (contents.len() > segment_size).then_some(segment_size),
            src_ip: None,
        };
        loop {
            match self.socket.try_io(Interest::WRITABLE, || {
                self.state.try_send((&self.socket).into(), &transmit)
            }) {
                Ok(()) => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.socket.writable().await?,
                Err(e) => return Err(e),
            }
        }
    }
}

/// A socket bound to `addr` with large kernel buffers (see [`BatchSocket::bind`]), nonblocking;
/// `reuse_port`: one of a group.
fn bind_one(
    addr: SocketAddr,
    kernel_buffer: usize,
    reuse_port: bool,
) -> io::Result<std::net::UdpSocket> {
    let domain = if addr.is_ipv4() {
        Domain::IPV4
    } else {
        Domain::IPV6
    };
    let socket = Socket::new(domain, Type::DGRAM, Some(Protocol::UDP))?;
    if addr.is_ipv6() {
        socket.set_only_v6(false)?;
    }
    socket.set_nonblocking(true)?;
    if reuse_port {
        socket.set_reuse_port(true)?;
    }
    if force_buffer(&socket, libc::SO_RCVBUFFORCE, kernel_buffer).is_err() {
        let _ = socket.set_recv_buffer_size(kernel_buffer);
    }
    if force_buffer(&socket, libc::SO_SNDBUFFORCE, kernel_buffer).is_err() {
        let _ = socket.set_send_buffer_size(kernel_buffer);
    }
    socket.bind(&addr.into())?;
    Ok(socket.into())
}

/// Binds `addr` like [`BatchSocket::bind`], for [`BatchSocket::from_std`] on another runtime.
pub fn bind_plain(addr: SocketAddr, kernel_buffer: usize) -> io::Result<std::net::UdpSocket> {
    bind_one(addr, kernel_buffer, false)
}

/// Binds `count` sockets to `addr` as one `SO_REUSEPORT` group, in order: the kernel numbers
/// them 0.. as they are returned, which is what a program of [`steer_group`] returns. Each gets
/// `kernel_buffer` bytes of buffers like [`BatchSocket::bind`]; port 0 picks one port for all.
///
/// A port already in use fails here like a plain bind, although the group itself would let
/// another process of the same user join it later.
pub fn bind_group(
    addr: SocketAddr,
    count: usize,
    kernel_buffer: usize,
) -> io::Result<Vec<std::net::UdpSocket>> {
    // Without SO_REUSEPORT, so a gateway already running on the port is an error, not a
    // group member that silently takes a share of its datagrams.
    let addr = {
        let probe = bind_one(addr, 4096, false)?;
        probe.local_addr()?
    };
    (0..count)
        .map(|_| bind_one(addr, kernel_buffer, true))
        .collect()
}

/// Attaches a classic BPF program to the `SO_REUSEPORT` group of `socket`: for each datagram
/// (it sees the UDP payload) it returns the index of the socket that gets it; an index past the
/// group's end leaves the choice to the kernel's 4-tuple hash. Instructions are
/// `(code, jt, jf, k)`, as in `struct sock_filter`.
pub fn steer_group(socket: &std::net::UdpSocket, program: &[(u16, u8, u8, u32)]) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let mut filter: Vec<libc::sock_filter> = program
        .iter()
        .map(|&(code, jt, jf, k)| libc::sock_filter { code, jt, jf, k })
        .collect();
    let prog = libc::sock_fprog {
        len: u16::try_from(filter.len())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "BPF program too long"))?,
        filter: filter.as_mut_ptr(),
    };
    // SAFETY: the fd is open for the lifetime of `socket`; `prog` points at `filter`, which
    // outlives the call (the kernel copies the program).
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_ATTACH_REUSEPORT_CBPF,
            (&prog as *const libc::sock_fprog).cast(),
            std::mem::size_of::<libc::sock_fprog>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// `SO_RCVBUFFORCE` / `SO_SNDBUFFORCE`, which socket2 does not wrap (they need CAP_NET_ADMIN).
fn force_buffer(socket: &Socket, option: libc::c_int, bytes: usize) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let value = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
    // SAFETY: the fd is open for the lifetime of `socket`; the option value is a c_int whose
    // size is passed along.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            option,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_mark_is_set_where_allowed() {
        let socket = BatchSocket::bind("127.0.0.1:0".parse().unwrap(), 1 << 16).unwrap();
        match socket.set_mark(0x5767) {
            Ok(()) => {
                let mark = socket2::SockRef::from(&socket.socket).mark().unwrap();
                assert_eq!(mark, 0x5767);
            }
            // Without CAP_NET_ADMIN the kernel refuses, and says so.
            Err(e) => assert_eq!(e.raw_os_error(), Some(libc::EPERM), "{e}"),
        }
    }

    #[tokio::test]
    async fn a_steered_group_hands_each_datagram_to_the_socket_the_program_names() {
        let group = bind_group("127.0.0.1:0".parse().unwrap(), 3, 1 << 16).unwrap();
        let port = group[0].local_addr().unwrap().port();
        assert!(group.iter().all(|s| s.local_addr().unwrap().port() == port));
        // The port is taken for anyone outside the group.
        assert!(BatchSocket::bind(group[0].local_addr().unwrap(), 1 << 16).is_err());
        // Socket = first byte; 9 is past the end: the kernel's hash picks.
        steer_group(&group[0], &[(0x30, 0, 0, 0), (0x16, 0, 0, 0)]).unwrap();
        let mut sockets: Vec<BatchSocket> = group
            .into_iter()
            .map(|s| BatchSocket::from_std(s).unwrap())
            .collect();
        let dst = sockets[0].local_addr().unwrap();
        let tx = BatchSocket::bind("127.0.0.1:0".parse().unwrap(), 1 << 16).unwrap();
        let sent: Vec<u8> = (0..30).map(|i| [0u8, 1, 2, 9][i % 4]).collect();
        for &first in &sent {
            tx.send_run(dst, &[first, 7, 7], 3).await.unwrap();
        }
        let mut got = vec![Vec::new(); 3];
        for _ in 0..5_000 {
            if got.iter().map(Vec::len).sum::<usize>() == sent.len() {
                break;
            }
            for (i, s) in sockets.iter_mut().enumerate() {
                s.receive_batch(|_, d| got[i].push(d[0])).unwrap();
            }
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
        assert_eq!(
            got.iter().map(Vec::len).sum::<usize>(),
            sent.len(),
            "{got:?}"
        );
        for (i, firsts) in got.iter().enumerate() {
            assert!(
                firsts.iter().all(|&f| f == i as u8 || f == 9),
                "socket {i}: {firsts:?}"
            );
        }
        assert_eq!(got[1].iter().filter(|&&f| f == 1).count(), 8);
    }

    #[tokio::test]
    async fn a_run_of_datagrams_arrives_as_separate_datagrams() {
        let mut rx = BatchSocket::bind("127.0.0.1:0".parse().unwrap(), 1 << 20).unwrap();
        let tx = BatchSocket::bind("127.0.0.1:0".parse().unwrap(), 1 << 20).unwrap();
        let dst = rx.local_addr().unwrap();
        // Three 100-byte datagrams and a short one, in one run.
        let mut contents = Vec::new();
        for i in 0..3u8 {
            contents.extend_from_slice(&[i; 100]);
        }
        contents.extend_from_slice(&[9; 40]);
        tx.send_run(dst, &contents, 100).await.unwrap();
        let mut got: Vec<Vec<u8>> = Vec::new();
        let from = tx.local_addr().unwrap();
        while got.len() < 4 {
            rx.readable().await.unwrap();
            rx.receive_batch(|src, d| {
                assert_eq!(src, from);
                got.push(d.to_vec());
            })
            .unwrap();
        }
        let sizes: Vec<usize> = got.iter().map(Vec::len).collect();
        assert_eq!(sizes, [100, 100, 100, 40]);
        assert_eq!(got[1], [1u8; 100]);
        // Nothing more: the next receive says so instead of blocking.
        assert!(!rx.receive_batch(|_, _| panic!("no datagram")).unwrap());
    }
}
