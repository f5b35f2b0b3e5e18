//! The cost floor of answering DNS over UDP: a responder that does no DNS work at all. It reads
//! queries in batches (`recvmmsg`, blocking for the first), turns each into a REFUSED answer by
//! flipping header bits, and sends the batch back (`sendmmsg`). Whatever CPU it spends per query is
//! the kernel's share that any UDP resolver pays on the same machine, so scripts/bench-dns.sh runs
//! it beside Waygate and Unbound to show how much of their cost is theirs.

use std::io;
use std::mem::{size_of, zeroed};
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::thread::{self, JoinHandle};

const BATCH: usize = 64;
const DATAGRAM: usize = 4096;
const HEADER: usize = 12;

/// Serves REFUSED to every query on `addr` from a thread of its own.
pub fn serve(addr: SocketAddr) -> Result<JoinHandle<()>, String> {
    let socket = UdpSocket::bind(addr).map_err(|e| format!("bind udp {addr}: {e}"))?;
    Ok(thread::spawn(move || {
        if let Err(e) = run(&socket) {
            eprintln!("lab-origin: dns floor on {addr}: {e}");
        }
    }))
}

/// Turns a query into a REFUSED answer in place; false for what is not a query.
pub fn refuse(msg: &mut [u8]) -> bool {
    if msg.len() < HEADER || msg[2] & 0x80 != 0 {
        return false;
    }
    msg[2] |= 0x80; // QR: a response; opcode and RD stay as asked.
    msg[3] = (msg[3] & 0xf0) | 5; // RCODE REFUSED
    true
}

fn run(socket: &UdpSocket) -> io::Result<()> {
    let fd = socket.as_raw_fd();
    let mut bufs = vec![0u8; BATCH * DATAGRAM];
    loop {
        // SAFETY: all-zero sockaddr_storage, iovec and mmsghdr are valid empty values; every
        // pointer set below points into `addrs`, `iovs` or `bufs`, which outlive both calls.
        let mut addrs: [libc::sockaddr_storage; BATCH] = unsafe { zeroed() };
        let mut iovs: [libc::iovec; BATCH] = unsafe { zeroed() };
        let mut msgs: [libc::mmsghdr; BATCH] = unsafe { zeroed() };
        for (i, buf) in bufs.chunks_mut(DATAGRAM).enumerate() {
            iovs[i].iov_base = buf.as_mut_ptr().cast();
            iovs[i].iov_len = DATAGRAM;
            msgs[i].msg_hdr.msg_name = (&mut addrs[i] as *mut libc::sockaddr_storage).cast();
            msgs[i].msg_hdr.msg_namelen = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            msgs[i].msg_hdr.msg_iov = &mut iovs[i];
            msgs[i].msg_hdr.msg_iovlen = 1;
        }
        // SAFETY: as above.
        let n = unsafe {
            libc::recvmmsg(
                fd,
                msgs.as_mut_ptr(),
                BATCH as libc::c_uint,
                libc::MSG_WAITFORONE,
                std::ptr::null_mut(),
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        // Answers go out in the received slots, skipping what is not a query.
        let mut out = 0;
        for i in 0..n as usize {
            let len = (msgs[i].msg_len as usize).min(DATAGRAM);
            let start = i * DATAGRAM;
            if !refuse(&mut bufs[start..start + len]) {
                continue;
            }
            iovs[i].iov_len = len;
            msgs.swap(out, i);
            out += 1;
        }
        let mut sent = 0;
        while sent < out {
            // SAFETY: as above; `sent..out` are filled messages.
            let k = unsafe {
                libc::sendmmsg(
                    fd,
                    msgs[sent..].as_mut_ptr(),
                    (out - sent) as libc::c_uint,
                    0,
                )
            };
            if k <= 0 {
                break;
            }
            sent += k as usize;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_query_becomes_refused_and_anything_else_is_dropped() {
        let mut q = [
            0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 1,
        ];
        assert!(refuse(&mut q));
        assert_eq!(&q[..4], &[0x12, 0x34, 0x81, 0x05]);
        // Now a response: refusing it again would ping-pong.
        assert!(!refuse(&mut q));
        assert!(!refuse(&mut [0u8; 11]));
    }
}
