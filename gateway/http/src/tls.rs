//! TLS for inspection: the device's ClientHello read without answering it (so a Do Not Inspect
//! connection can be replayed byte for byte), leaves minted by the gateway's CA for the name the
//! device asked for, and an upstream verifier that records a bad certificate for the rules to
//! act on instead of failing the connection.

use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

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

/// Mints and caches leaves for inspected names.
pub struct Minter {
    ca: Arc<CertificateAuthority>,
    key: LeafKey,
    signer: Arc<dyn SigningKey>,
    cache: Mutex<LruCache<String, Arc<CertifiedKey>>>,
}

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
            cache: Mutex::new(LruCache::new(
                NonZeroUsize::new(LEAF_CACHE).unwrap_or(NonZeroUsize::MIN),
            )),
        })
    }

    /// The leaf for `name` (a DNS name or an address), from the cache or minted now.
    pub fn leaf(&self, name: &str, now: SystemTime) -> Result<Arc<CertifiedKey>, String> {
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
        if let Ok(mut cache) = self.cache.lock() {
            cache.put(name.to_string(), leaf.clone());
        }
        Ok(leaf)
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

/// Server settings toward the device: `leaf`, offering `alpn`.
pub fn device_config(
    leaf: Arc<CertifiedKey>,
    alpn: &[&[u8]],
) -> Result<Arc<rustls::ServerConfig>, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(OneLeaf(leaf)));
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(config))
}

/// Verifies an origin's certificate against the roots, recording a failure in `failed` instead of
/// refusing: the request's rule decides (`untrusted_cert`). Signatures are always checked.
#[derive(Debug)]
struct Recording {
    inner: Arc<WebPkiServerVerifier>,
    failed: Arc<Mutex<Option<String>>>,
}

impl ServerCertVerifier for Recording {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if let Err(e) = self.inner.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        ) {
            if let Ok(mut slot) = self.failed.lock() {
                *slot = Some(e.to_string());
            }
        }
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

/// The upstream side's trust: the host's roots plus `http.upstream_ca`.
#[derive(Debug, Clone)]
pub struct UpstreamTrust {
    verifier: Arc<WebPkiServerVerifier>,
}

impl UpstreamTrust {
    /// Trust in `roots`.
    pub fn new(roots: rustls::RootCertStore) -> Result<UpstreamTrust, String> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider)
            .build()
            .map_err(|e| e.to_string())?;
        Ok(UpstreamTrust { verifier })
    }

    /// Client settings for one connection offering `alpn`, and where a certificate failure is
    /// recorded.
    #[allow(clippy::type_complexity)]
    pub fn client_config(
        &self,
        alpn: &[&[u8]],
    ) -> Result<(Arc<rustls::ClientConfig>, Arc<Mutex<Option<String>>>), String> {
        let failed = Arc::new(Mutex::new(None));
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(Recording {
                inner: self.verifier.clone(),
                failed: failed.clone(),
            }))
            .with_no_client_auth();
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Ok((Arc::new(config), failed))
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
