//! What the gateway asks of its host: the descriptor limit, the interfaces' addresses, and
//! handing freed memory back.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use waygate_engine::protect::HostAddress;

/// Descriptors kept for everything that is not a flow: listeners, the registry, the resolver's
/// own connections, log files.
const DESCRIPTORS_KEPT: u64 = 256;
/// Below this many descriptors the gateway warns at start: a few hundred devices' browsers
/// hold that many connections.
const DESCRIPTORS_LOW: u64 = 65_536;

/// Raises the soft descriptor limit to the hard one (systemd starts services with a soft limit
/// of 1,024) and returns the limit now in force; warns when it is low.
pub fn raise_descriptor_limit() -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit struct that we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        tracing::warn!(err = %io::Error::last_os_error(), "cannot read the descriptor limit");
        return 1024;
    }
    let soft = limit.rlim_cur;
    if limit.rlim_cur < limit.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: limit.rlim_max,
            rlim_max: limit.rlim_max,
        };
        // SAFETY: setrlimit reads one rlimit struct that we own.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            limit.rlim_cur = limit.rlim_max;
        } else {
            tracing::warn!(err = %io::Error::last_os_error(), soft, hard = limit.rlim_max, "cannot raise the descriptor limit");
        }
    }
    let now = limit.rlim_cur;
    if now < DESCRIPTORS_LOW {
        tracing::warn!(
            descriptors = now,
            was = soft,
            hard = limit.rlim_max,
            "the descriptor limit is low: every flow holds one; raise LimitNOFILE (systemd) or `ulimit -Hn`"
        );
    } else {
        tracing::info!(descriptors = now, was = soft, "descriptor limit");
    }
    now
}

/// How many flows fit in `descriptors`: each flow holds one upstream descriptor, and a flow to
/// the gateway's own DNS over TCP, TLS or HTTPS holds a second on the resolver's side, so half.
pub fn flows_for_descriptors(descriptors: u64) -> usize {
    let flows = descriptors.saturating_sub(DESCRIPTORS_KEPT) / 2;
    usize::try_from(flows).unwrap_or(usize::MAX).max(64)
}

/// DNS queries all devices may have waiting for an upstream: each holds a socket. At most
/// 16,384: queries are told apart by a 16-bit ticket, and a quarter of that space keeps the
/// search for a free one short.
pub fn dns_queries_for_descriptors(descriptors: u64) -> usize {
    usize::try_from(descriptors / 8)
        .unwrap_or(usize::MAX)
        .clamp(64, 16_384)
}

/// Every address of every interface of the host, with its prefix length.
pub fn interface_addresses() -> io::Result<Vec<HostAddress>> {
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs allocates a list and stores its head in `head`; freed below.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let mut out = Vec::new();
    let mut cursor = head;
    while !cursor.is_null() {
        // SAFETY: `cursor` is a node of the list getifaddrs returned, not yet freed.
        let entry = unsafe { &*cursor };
        // SAFETY: the address and netmask pointers are null or point to sockaddrs of the family
        // the address names, valid until freeifaddrs.
        if let Some(addr) = unsafe { sockaddr_ip(entry.ifa_addr) } {
            let prefix =
                unsafe { sockaddr_ip(entry.ifa_netmask) }.map_or(max_prefix(addr), prefix_len);
            out.push(HostAddress { addr, prefix });
        }
        cursor = entry.ifa_next;
    }
    // SAFETY: `head` came from getifaddrs and is freed once.
    unsafe { libc::freeifaddrs(head) };
    out.sort();
    out.dedup();
    Ok(out)
}

/// `RTF_LOCAL` in `/proc/net/ipv6_route`: a route that delivers to the host itself.
const RTF_LOCAL: u32 = 0x8000_0000;

/// The IPv6 prefixes the host delivers to itself (`ip -6 route add local PREFIX dev lo`, as the
/// README sets up a dedicated egress prefix), read from `/proc/net/ipv6_route`, which lists every
/// table. Empty where the kernel has no IPv6.
pub fn local_ipv6_prefixes() -> Vec<ipnet::IpNet> {
    let Ok(text) = std::fs::read_to_string("/proc/net/ipv6_route") else {
        return Vec::new();
    };
    let mut out = parse_ipv6_routes(&text);
    out.sort();
    out.dedup();
    out
}

/// The `RTF_LOCAL` destinations of `/proc/net/ipv6_route` text.
fn parse_ipv6_routes(text: &str) -> Vec<ipnet::IpNet> {
    text.lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let flags = u32::from_str_radix(fields.get(8)?, 16).ok()?;
            if flags & RTF_LOCAL == 0 {
                return None;
            }
            let dest = u128::from_str_radix(fields.first()?, 16).ok()?;
            let len = u8::from_str_radix(fields.get(1)?, 16).ok()?;
            ipnet::Ipv6Net::new(Ipv6Addr::from(dest), len)
                .ok()
                .map(ipnet::IpNet::V6)
        })
        .collect()
}

/// The IP address in a sockaddr, if it holds one.
///
/// # Safety
/// `sa` is null or points to a valid sockaddr of the family it names.
unsafe fn sockaddr_ip(sa: *const libc::sockaddr) -> Option<IpAddr> {
    if sa.is_null() {
        return None;
    }
    match i32::from((*sa).sa_family) {
        libc::AF_INET => {
            let sin = &*(sa as *const libc::sockaddr_in);
            Some(IpAddr::V4(Ipv4Addr::from(u32::from_be(
                sin.sin_addr.s_addr,
            ))))
        }
        libc::AF_INET6 => {
            let sin6 = &*(sa as *const libc::sockaddr_in6);
            Some(IpAddr::V6(Ipv6Addr::from(sin6.sin6_addr.s6_addr)))
        }
        _ => None,
    }
}

fn max_prefix(addr: IpAddr) -> u8 {
    if addr.is_ipv4() {
        32
    } else {
        128
    }
}

/// The prefix length of a netmask (its leading ones).
fn prefix_len(mask: IpAddr) -> u8 {
    let ones = match mask {
        IpAddr::V4(m) => u32::from(m).leading_ones(),
        IpAddr::V6(m) => u128::from(m).leading_ones(),
    };
    ones as u8
}

/// Hands memory freed inside the heap back to the system. A burst of flows leaves their buffers
/// freed in the middle of the heap, where glibc keeps them mapped; without this a gateway that
/// once held 3,000 DNS-over-TCP flows kept 500 MB long after they closed.
pub fn return_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks glibc's own arenas under their locks.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Gives the pages that lie wholly inside `buffer` back to the system (`MADV_DONTNEED`): they
/// read as zeros afterwards and cost nothing until written again. For buffers whose contents
/// no longer matter (an idle flow's empty socket buffers).
pub fn release_pages(buffer: &mut [u8]) {
    #[cfg(target_os = "linux")]
    {
        static PAGE: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
        let page = *PAGE.get_or_init(|| {
            // SAFETY: sysconf reads a constant of the system.
            let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
            usize::try_from(size).unwrap_or(4096).max(1)
        });
        let start = buffer.as_mut_ptr() as usize;
        let first = start.div_ceil(page) * page;
        let end = (start + buffer.len()) / page * page;
        if end > first {
            // SAFETY: the range lies inside `buffer`, which we borrow exclusively, and is
            // anonymous private memory (the heap or a mapping of the allocator): the kernel
            // only replaces its pages with zero-filled ones, as writing zeros would.
            unsafe {
                libc::madvise(first as *mut libc::c_void, end - first, libc::MADV_DONTNEED);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn released_pages_read_as_zeros_and_the_partial_ones_keep_their_bytes() {
        let mut buffer = vec![0x5au8; 256 * 1024 + 100];
        let cut = &mut buffer[100..];
        release_pages(cut);
        let page = 4096;
        let start = cut.as_ptr() as usize;
        let first = start.div_ceil(page) * page - start;
        let end = (start + cut.len()) / page * page - start;
        assert!(cut[first..end].iter().all(|&b| b == 0));
        assert!(cut[..first].iter().all(|&b| b == 0x5a));
        assert!(cut[end..].iter().all(|&b| b == 0x5a));
        assert!(buffer[..100].iter().all(|&b| b == 0x5a));
    }

    #[test]
    fn local_routes_are_read_from_the_ipv6_route_table() {
        let text = "\
20010db8000200100000000000000000 40 00000000000000000000000000000000 00 00000000000000000000000000000000 00000000 00000001 00000000 80200001       lo
20010db8000200000000000000000000 40 00000000000000000000000000000000 00 00000000000000000000000000000000 00000100 00000001 00000000 00000001     eg0
garbage line
";
        assert_eq!(
            parse_ipv6_routes(text),
            vec!["2001:db8:2:10::/64".parse::<ipnet::IpNet>().unwrap()]
        );
    }

    #[test]
    fn netmasks_become_prefix_lengths() {
        assert_eq!(prefix_len("255.255.255.0".parse().unwrap()), 24);
        assert_eq!(prefix_len("255.255.255.255".parse().unwrap()), 32);
        assert_eq!(prefix_len("ffff:ffff:ffff:ffff::".parse().unwrap()), 64);
    }

    #[test]
    fn the_host_has_at_least_its_loopback_address() {
        let addrs = interface_addresses().unwrap();
        assert!(addrs
            .iter()
            .any(|a| a.addr == IpAddr::V4(Ipv4Addr::LOCALHOST) && a.prefix == 8));
    }

    #[test]
    fn flow_budgets_follow_the_descriptor_limit() {
        assert_eq!(flows_for_descriptors(1024), 384);
        assert_eq!(flows_for_descriptors(100), 64);
        assert_eq!(flows_for_descriptors(1_048_576), 524_160);
        assert_eq!(dns_queries_for_descriptors(1024), 128);
    }
}
