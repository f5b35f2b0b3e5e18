//! TLS for inspection: the device's ClientHello read without answering it (so a Do Not Inspect
//! connection can be replayed byte for byte), leaves minted by the gateway's CA for the name the
//! device asked for, and an upstream verifier that records a bad certificate for the rules to
//! act on instead of failing the connection.

use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use lru::LruCache;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::server::{Accepted, Acceptor, ClientHello, ResolvesServerCert};
use rustls::sign::{CertifiedKey, SigningKey};
use rustls::{DigitallySignedStruct, SignatureScheme};
use tokio::io::{AsyncRead, AsyncReadExt};
use waygate_keys::{CertificateAuthority, LeafKey};

/// Most bytes read while waiting for a complete ClientHello. Post-quantum key shares make it
/// span a few segments (about 1.8 KiB with X25519MLKEM768); TLS caps a handshake message at
/// 16 MiB, but no browser sends more than a few KiB.
pub const MAX_CLIENT_HELLO: usize = 64 * 1024;

/// Leaves kept, one per name: enough for the hosts a busy office browses in a day.
const LEAF_CACHE: usize = 4096;

/// The device's first bytes.
pub enum Hello {
    /// A complete ClientHello, ready to be answered; `recorded` holds every byte read.
    Tls {
        /// rustls's parsed hello.
        accepted: Box<Accepted>,
        /// The bytes read, to replay upstream when not decrypting.
        recorded: Vec<u8>,
    },
    /// Not TLS (or the stream ended first); `recorded` holds what was read.
    Other {
        /// The bytes read.
        recorded: Vec<u8>,
    },
}

/// Reads from `device` (starting with `recorded`, already read) until a whole ClientHello is in,
/// however many segments it spans.
pub async fn read_client_hello<D: AsyncRead + Unpin>(
    device: &mut D,
    mut recorded: Vec<u8>,
) -> std::io::Result<Hello> {
    let mut acceptor = Acceptor::default();
    let mut fed = 0;
    loop {
        while fed < recorded.len() {
            let mut rest = &recorded[fed..];
            match acceptor.read_tls(&mut rest) {
                Ok(0) | Err(_) => return Ok(Hello::Other { recorded }),
                Ok(n) => fed += n,
            }
        }
        match acceptor.accept() {
            Ok(Some(accepted)) => {
                return Ok(Hello::Tls {
                    accepted: Box::new(accepted),
                    recorded,
                })
            }
            Ok(None) => {}
            Err(_) => return Ok(Hello::Other { recorded }),
        }
        if recorded.len() >= MAX_CLIENT_HELLO {
            return Ok(Hello::Other { recorded });
        }
        let before = recorded.len();
        recorded.reserve(4096);
        if device.read_buf(&mut recorded).await? == 0 || recorded.len() == before {
            return Ok(Hello::Other { recorded });
        }
    }
}

/// The SNI and ALPN protocols of a ClientHello.
pub fn hello_facts(hello: &ClientHello<'_>) -> (Option<String>, bool) {
    let sni = hello.server_name().map(|s| s.to_ascii_lowercase());
    let h2 = hello
        .alpn()
        .is_some_and(|mut protocols| protocols.any(|p| p == b"h2"));
    (sni, h2)
}

/// A minted leaf and the device-side settings serving it, built once per name.
struct Minted {
    leaf: Arc<CertifiedKey>,
    /// Offering HTTP/1.1 only.
    h1: Arc<rustls::ServerConfig>,
    /// Offering h2 first (the origin speaks it).
    h2: Arc<rustls::ServerConfig>,
}

/// Mints and caches leaves for inspected names, with their device-side settings.
pub struct Minter {
    ca: Arc<CertificateAuthority>,
    key: LeafKey,
    signer: Arc<dyn SigningKey>,
    /// One session cache for every name's settings, so a device's reconnection resumes its
    /// session (rustls checks the name on resumption) and memory stays bounded by one cache.
    sessions: Arc<dyn rustls::server::StoresServerSessions>,
    cache: Mutex<LruCache<String, Arc<Minted>>>,
}

/// Device sessions kept for resumption, across all names.
const DEVICE_SESSIONS: usize = 4096;

impl std::fmt::Debug for Minter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Minter").finish_non_exhaustive()
    }
}

impl Minter {
    /// A minter signing with `ca`, with a fresh shared leaf key.
    pub fn new(ca: Arc<CertificateAuthority>) -> Result<Minter, String> {
        let key = LeafKey::generate().map_err(|e| e.to_string())?;
        let der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.der().to_vec()));
        let signer =
            rustls::crypto::ring::sign::any_supported_type(&der).map_err(|e| e.to_string())?;
        Ok(Minter {
            ca,
            key,
            signer,
            sessions: rustls::server::ServerSessionMemoryCache::new(DEVICE_SESSIONS),
            cache: Mutex::new(LruCache::new(
                NonZeroUsize::new(LEAF_CACHE).unwrap_or(NonZeroUsize::MIN),
            )),
        })
    }

    fn minted(&self, name: &str, now: SystemTime) -> Result<Arc<Minted>, String> {
        if let Ok(mut cache) = self.cache.lock() {
            if let Some(hit) = cache.get(name) {
                return Ok(hit.clone());
            }
        }
        let chain = self
            .ca
            .mint(name, &self.key, now)
            .map_err(|e| e.to_string())?;
        let leaf = Arc::new(CertifiedKey::new(
            chain.into_iter().map(CertificateDer::from).collect(),
            self.signer.clone(),
        ));
        let config = |alpn: &[&[u8]]| device_config(leaf.clone(), alpn, self.sessions.clone());
        let minted = Arc::new(Minted {
            h1: config(&[b"http/1.1"])?,
            h2: config(&[b"h2", b"http/1.1"])?,
            leaf,
        });
        if let Ok(mut cache) = self.cache.lock() {
            cache.put(name.to_string(), minted.clone());
        }
        Ok(minted)
    }

    /// The leaf for `name` (a DNS name or an address), from the cache or minted now.
    pub fn leaf(&self, name: &str, now: SystemTime) -> Result<Arc<CertifiedKey>, String> {
        Ok(self.minted(name, now)?.leaf.clone())
    }

    /// Server settings toward the device serving the leaf for `name`, offering h2 first when
    /// `h2`. Built with the leaf and reused: building them per connection cost more than the
    /// cached leaf saved.
    pub fn device_config(
        &self,
        name: &str,
        h2: bool,
        now: SystemTime,
    ) -> Result<Arc<rustls::ServerConfig>, String> {
        let minted = self.minted(name, now)?;
        Ok(if h2 {
            minted.h2.clone()
        } else {
            minted.h1.clone()
        })
    }

    /// Names cached.
    pub fn cached(&self) -> usize {
        self.cache.lock().map(|c| c.len()).unwrap_or(0)
    }
}

/// Serves one minted leaf whatever the hello says.
#[derive(Debug)]
struct OneLeaf(Arc<CertifiedKey>);

impl ResolvesServerCert for OneLeaf {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }
}

/// Server settings toward the device: `leaf`, offering `alpn`, resuming from `sessions`.
fn device_config(
    leaf: Arc<CertifiedKey>,
    alpn: &[&[u8]],
    sessions: Arc<dyn rustls::server::StoresServerSessions>,
) -> Result<Arc<rustls::ServerConfig>, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(OneLeaf(leaf)));
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    config.session_storage = sessions;
    Ok(Arc::new(config))
}

/// Checks the origin's handshake signatures but leaves the certificate chain to
/// [`UpstreamTrust::verify`], after the handshake: the rules decide what a bad certificate does
/// (`untrusted_cert`), and one shared client config (with session resumption) cannot carry a
/// per-connection result.
#[derive(Debug)]
struct SignaturesOnly {
    inner: Arc<WebPkiServerVerifier>,
}

impl ServerCertVerifier for SignaturesOnly {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// Verified chains remembered, per name and chain.
const VERIFIED_CACHE: usize = 1024;
/// How long a verification result is reused: a certificate that expires or a trust change is
/// seen within this.
const VERIFIED_FOR: Duration = Duration::from_secs(600);

type ChainKey = (String, Vec<CertificateDer<'static>>);
/// When a chain was verified, and why it failed (`None`: trusted).
type Verified = (Instant, Option<String>);

/// The upstream side's trust: the host's roots plus `http.upstream_ca`.
#[derive(Debug, Clone)]
pub struct UpstreamTrust {
    verifier: Arc<WebPkiServerVerifier>,
    /// Offering HTTP/1.1 only.
    h1: Arc<rustls::ClientConfig>,
    /// Offering h2 and HTTP/1.1.
    h2: Arc<rustls::ClientConfig>,
    verified: Arc<Mutex<LruCache<ChainKey, Verified>>>,
}

impl UpstreamTrust {
    /// Trust in `roots`.
    pub fn new(roots: rustls::RootCertStore) -> Result<UpstreamTrust, String> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider)
            .build()
            .map_err(|e| e.to_string())?;
        let config = |alpn: &[&[u8]]| -> Result<Arc<rustls::ClientConfig>, String> {
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            let mut config = rustls::ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .map_err(|e| e.to_string())?
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(SignaturesOnly {
                    inner: verifier.clone(),
                }))
                .with_no_client_auth();
            config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
            Ok(Arc::new(config))
        };
        Ok(UpstreamTrust {
            h1: config(&[b"http/1.1"])?,
            h2: config(&[b"h2", b"http/1.1"])?,
            verifier,
            verified: Arc::new(Mutex::new(LruCache::new(
                NonZeroUsize::new(VERIFIED_CACHE).unwrap_or(NonZeroUsize::MIN),
            ))),
        })
    }

    /// Client settings offering h2 and HTTP/1.1 when `h2`, else HTTP/1.1; shared by every
    /// connection, so sessions with an origin resume.
    pub fn client_config(&self, h2: bool) -> Arc<rustls::ClientConfig> {
        if h2 {
            self.h2.clone()
        } else {
            self.h1.clone()
        }
    }

    /// Why the chain an origin presented for `name` is not trusted, `None` when it is; a
    /// resumed session's chain is the one its first handshake presented. Results are reused
    /// for [`VERIFIED_FOR`].
    pub fn verify(
        &self,
        name: &ServerName<'_>,
        chain: Option<&[CertificateDer<'_>]>,
    ) -> Option<String> {
        let Some((end_entity, intermediates)) = chain.and_then(|c| c.split_first()) else {
            return Some("the origin presented no certificate".into());
        };
        let key: ChainKey = (
            name.to_str().into_owned(),
            chain
                .unwrap_or_default()
                .iter()
                .map(|c| c.clone().into_owned())
                .collect(),
        );
        if let Ok(mut cache) = self.verified.lock() {
            if let Some((at, result)) = cache.get(&key) {
                if at.elapsed() < VERIFIED_FOR {
                    return result.clone();
                }
            }
        }
        let result = self
            .verifier
            .verify_server_cert(end_entity, intermediates, name, &[], UnixTime::now())
            .err()
            .map(|e| e.to_string());
        if let Ok(mut cache) = self.verified.lock() {
            cache.put(key, (Instant::now(), result.clone()));
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A ClientHello for `name` offering h2, as a browser sends it.
    fn client_hello(name: &str) -> Vec<u8> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth();
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let server = ServerName::try_from(name.to_string()).expect("name");
        let mut conn = rustls::ClientConnection::new(Arc::new(config), server).expect("client");
        let mut out = Vec::new();
        conn.write_tls(&mut out).expect("hello");
        out
    }

    /// Hands `bytes` to the reader a few at a time, as separate segments would arrive.
    struct Trickle {
        bytes: Vec<u8>,
        at: usize,
        step: usize,
    }

    impl AsyncRead for Trickle {
        fn poll_read(
            mut self: std::pin::Pin<&mut Self>,
            _cx: &mut std::task::Context<'_>,
            buf: &mut tokio::io::ReadBuf<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            let end = (self.at + self.step)
                .min(self.bytes.len())
                .min(self.at + buf.remaining());
            let chunk = self.bytes[self.at..end].to_vec();
            buf.put_slice(&chunk);
            self.at = end;
            std::task::Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn a_client_hello_split_over_many_segments_is_read_whole_and_recorded() {
        let hello = client_hello("split.example");
        let mut device = Trickle {
            bytes: hello.clone(),
            at: 0,
            step: 7,
        };
        match read_client_hello(&mut device, Vec::new())
            .await
            .expect("read")
        {
            Hello::Tls { accepted, recorded } => {
                assert_eq!(recorded, hello, "every byte read is kept for the replay");
                let (sni, h2) = hello_facts(&accepted.client_hello());
                assert_eq!((sni.as_deref(), h2), (Some("split.example"), true));
            }
            Hello::Other { .. } => panic!("not recognised"),
        }
        let mut plain = Trickle {
            bytes: b"GET / HTTP/1.1\r\n\r\n".to_vec(),
            at: 0,
            step: 100,
        };
        assert!(matches!(
            read_client_hello(&mut plain, Vec::new())
                .await
                .expect("read"),
            Hello::Other { .. }
        ));
    }

    #[test]
    fn an_origin_chain_is_verified_against_the_roots_and_the_result_reused() {
        #[allow(clippy::disallowed_methods)] // certificate validity needs a real time
        let now = SystemTime::now();
        let ca = CertificateAuthority::generate("Origin CA", now).expect("ca");
        let issued = ca
            .issue(&["origin.example".to_string()], &[], now)
            .expect("issue");
        let chain: Vec<CertificateDer<'static>> = issued
            .chain_der
            .iter()
            .map(|d| CertificateDer::from(d.clone()))
            .collect();
        let name = ServerName::try_from("origin.example").expect("name");
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(CertificateDer::from(ca.cert_der().to_vec()))
            .expect("root");
        let trusting = UpstreamTrust::new(roots).expect("trust");
        assert_eq!(trusting.verify(&name, Some(&chain)), None);
        assert_eq!(trusting.verify(&name, Some(&chain)), None, "cached");
        let other = ServerName::try_from("other.example").expect("name");
        assert!(
            trusting.verify(&other, Some(&chain)).is_some(),
            "another name is another question"
        );
        assert!(trusting.verify(&name, None).is_some(), "no certificate");

        let other_ca = CertificateAuthority::generate("Other CA", now).expect("ca");
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(CertificateDer::from(other_ca.cert_der().to_vec()))
            .expect("root");
        let distrusting = UpstreamTrust::new(roots).expect("trust");
        assert!(distrusting.verify(&name, Some(&chain)).is_some());
        assert!(distrusting.verify(&name, Some(&chain)).is_some(), "cached");
    }

    #[test]
    fn leaves_share_one_key_and_are_cached_per_name() {
        #[allow(clippy::disallowed_methods)] // certificate validity needs a real time
        let now = SystemTime::now();
        let ca = Arc::new(CertificateAuthority::generate("Test CA", now).expect("ca"));
        let minter = Minter::new(ca).expect("minter");
        let a = minter.leaf("a.example", now).expect("leaf");
        let b = minter.leaf("b.example", now).expect("leaf");
        let a2 = minter.leaf("a.example", now).expect("leaf");
        assert!(Arc::ptr_eq(&a, &a2), "cached");
        assert!(Arc::ptr_eq(&a.key, &b.key), "one shared key");
        assert_eq!(minter.cached(), 2);
        assert!(minter.leaf("203.0.113.5", now).is_ok(), "an address leaf");
    }
}
