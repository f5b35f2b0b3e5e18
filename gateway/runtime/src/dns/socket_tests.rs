//! The listeners and the upstream client against each other over loopback sockets: the server's
//! DNS over UDP, TCP, TLS and HTTPS answered through its resolver, asked by the same
//! [`UpstreamClient`] that asks the gateway's own upstreams, with certificates from a CA.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use hickory_proto::op::{Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::{Name, RData, RecordType};
use waygate_keys::CertificateAuthority;

use super::encrypted::{trust_roots, HttpsTarget};
use super::*;

fn policy(q: &QueryInfo<'_>) -> PolicyVerdict {
    match format!("{}.", q.name).as_str() {
        "blocked.example." => Decision::Block(BlockMode::Refused).into(),
        "moved.example." => {
            Decision::OverrideIps(vec![IpAddr::V4(Ipv4Addr::new(203, 0, 113, 99))]).into()
        }
        _ => Decision::Block(BlockMode::NxDomain).into(),
    }
}

type Policy = fn(&QueryInfo<'_>) -> PolicyVerdict;

fn query(id: u16, name: &str) -> Vec<u8> {
    let mut m = Message::new();
    m.set_id(id)
        .set_message_type(MessageType::Query)
        .set_op_code(OpCode::Query)
        .set_recursion_desired(true)
        .add_query(Query::query(Name::from_ascii(name).unwrap(), RecordType::A));
    m.to_vec().unwrap()
}

struct Served {
    _running: server::RunningServer,
    udp: SocketAddr,
    tcp: SocketAddr,
    dot: SocketAddr,
    doh: SocketAddr,
    roots: rustls::RootCertStore,
}

async fn serve() -> Served {
    let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_795_000_000);
    #[allow(clippy::disallowed_methods)] // certificates must be valid for the TLS clients now
    let now = now.max(SystemTime::now());
    let ca = CertificateAuthority::generate("Test CA", now).unwrap();
    let cert = ca
        .issue(&[], &[IpAddr::V4(Ipv4Addr::LOCALHOST)], now)
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, ca.cert_pem()).unwrap();
    let roots = trust_roots(Some(&ca_file)).unwrap();

    let resolver: server::SharedResolver<Policy> = Arc::new(Mutex::new(Resolver::new(
        policy as Policy,
        ResolverConfig::default(),
        3,
    )));
    let nowhere = UpstreamClient::new(Vec::new(), None, Duration::from_secs(1));
    let identify: server::Identify = Arc::new(|from: SocketAddr| ClientCtx::from_ip(from.ip()));
    let server = DnsServer::new(resolver, nowhere, identify);
    let any = SocketAddr::from((Ipv4Addr::LOCALHOST, 0));
    let listen = |kind| StreamListener { addr: any, kind };
    let config = ServerConfig {
        udp: vec![any],
        streams: vec![
            listen(StreamKind::Tcp),
            listen(StreamKind::Tls),
            listen(StreamKind::Https),
        ],
        tls: Some(crate::tls::dns_tls(&cert).unwrap()),
        ..ServerConfig::default()
    };
    let running = server.start(&config).await.unwrap();
    Served {
        udp: running.udp_addrs[0],
        tcp: running.stream_addr(StreamKind::Tcp).unwrap(),
        dot: running.stream_addr(StreamKind::Tls).unwrap(),
        doh: running.stream_addr(StreamKind::Https).unwrap(),
        _running: running,
        roots,
    }
}

fn client(upstream: &str, roots: &rustls::RootCertStore) -> UpstreamClient {
    let up: Upstream = upstream.parse().unwrap();
    UpstreamClient::new(vec![up], None, Duration::from_secs(3)).with_roots(roots)
}

async fn ask(client: &UpstreamClient, id: u16, name: &str) -> Message {
    let (answer, _) = client.query(&query(id, name)).await.unwrap();
    let m = Message::from_vec(&answer).unwrap();
    assert_eq!(m.id(), id);
    m
}

#[tokio::test]
async fn every_transport_answers_through_the_resolver() {
    let s = serve().await;
    let transports = [
        format!("{}", s.udp),
        format!("tls://{}", s.dot),
        format!("https://{}/dns-query", s.doh),
    ];
    for upstream in &transports {
        let c = client(upstream, &s.roots);
        let blocked = ask(&c, 7, "blocked.example.").await;
        assert_eq!(blocked.response_code(), ResponseCode::Refused, "{upstream}");
        // Several queries reuse the pooled connection.
        for id in 8..12 {
            let moved = ask(&c, id, "moved.example.").await;
            assert_eq!(
                moved.answers()[0].data(),
                &RData::A(Ipv4Addr::new(203, 0, 113, 99).into()),
                "{upstream}"
            );
        }
    }
    // Plain TCP through the same framing as DoT.
    let mut stream = tokio::net::TcpStream::connect(s.tcp).await.unwrap();
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let q = query(21, "blocked.example.");
    let mut framed = (q.len() as u16).to_be_bytes().to_vec();
    framed.extend_from_slice(&q);
    stream.write_all(&framed).await.unwrap();
    let n = stream.read_u16().await.unwrap();
    let mut buf = vec![0; usize::from(n)];
    stream.read_exact(&mut buf).await.unwrap();
    assert_eq!(
        Message::from_vec(&buf).unwrap().response_code(),
        ResponseCode::Refused
    );
}

#[tokio::test]
async fn an_untrusted_certificate_fails_the_upstream() {
    let s = serve().await;
    let nobody = rustls::RootCertStore::empty();
    for upstream in [format!("tls://{}", s.dot), format!("https://{}", s.doh)] {
        let c = client(&upstream, &nobody);
        let err = c.query(&query(1, "moved.example.")).await.unwrap_err();
        assert!(err.to_string().contains("certificate"), "{upstream}: {err}");
    }
    // The name the certificate must carry is checked too.
    let c = client(&format!("tls://dns.example@{}", s.dot), &s.roots);
    assert!(c.query(&query(1, "moved.example.")).await.is_err());
    assert_eq!(
        HttpsTarget::parse(&format!("https://{}", s.doh))
            .unwrap()
            .path,
        "/dns-query"
    );
}
