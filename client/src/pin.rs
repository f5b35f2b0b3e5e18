//! Trusting the gateway on first contact by the CA hash in the enrollment token (kubeadm's
//! discovery hash): the listener's chain must hold a certificate whose SHA-256 is the pinned
//! one, and the leaf must verify against that certificate as the only root. Nothing else is
//! trusted, not even the system's roots. The name in the URL is not required to be in the leaf:
//! every certificate that CA signs belongs to the gateway, and a gateway listening on all
//! addresses cannot know which one a client dials.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, Error, RootCertStore, SignatureScheme};
use sha2::{Digest, Sha256};
use waygate_keys::enroll_token::hex;

/// Verifies a server's chain against the CA with this SHA-256.
#[derive(Debug)]
pub struct PinnedCa {
    pin: [u8; 32],
    provider: Arc<CryptoProvider>,
}

impl PinnedCa {
    /// Trusts only the CA whose certificate (DER) hashes to `pin`.
    pub fn new(pin: [u8; 32]) -> Self {
        PinnedCa {
            pin,
            provider: Arc::new(rustls::crypto::ring::default_provider()),
        }
    }

    /// Client settings that trust only this CA.
    pub fn client_config(self) -> Result<rustls::ClientConfig, Error> {
        let provider = self.provider.clone();
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(self))
            .with_no_client_auth();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(config)
    }
}

impl ServerCertVerifier for PinnedCa {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        let ca = intermediates
            .iter()
            .find(|c| <[u8; 32]>::from(Sha256::digest(c.as_ref())) == self.pin)
            .ok_or_else(|| {
                Error::General(format!(
                    "the gateway's CA does not match the token: no certificate in its chain has \
                     SHA-256 {} (a token from another gateway, or someone in between)",
                    hex(&self.pin)
                ))
            })?;
        let mut roots = RootCertStore::empty();
        roots.add(ca.clone().into_owned())?;
        let verifier =
            WebPkiServerVerifier::builder_with_provider(Arc::new(roots), self.provider.clone())
                .build()
                .map_err(|e| Error::General(format!("pinned CA: {e}")))?;
        match verifier.verify_server_cert(end_entity, &[], server_name, ocsp_response, now) {
            Ok(v) => Ok(v),
            // The chain verified (names are checked last); see the module docs.
            Err(Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            Err(e) => Err(e),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, SystemTime};
    use waygate_keys::CertificateAuthority;

    fn at() -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_795_000_000)
    }

    fn verify(pin: [u8; 32], chain: &[Vec<u8>], name: &str) -> Result<ServerCertVerified, Error> {
        let leaf = CertificateDer::from(chain[0].clone());
        let rest: Vec<CertificateDer<'_>> = chain[1..]
            .iter()
            .map(|c| CertificateDer::from(c.clone()))
            .collect();
        let name = ServerName::try_from(name.to_string()).unwrap();
        let now = UnixTime::since_unix_epoch(Duration::from_secs(1_795_000_100));
        PinnedCa::new(pin).verify_server_cert(&leaf, &rest, &name, &[], now)
    }

    #[test]
    fn the_pinned_ca_is_trusted_and_no_other() {
        let ca = CertificateAuthority::generate("Waygate Gateway CA", at()).unwrap();
        let other = CertificateAuthority::generate("Waygate Gateway CA", at()).unwrap();
        let ip = "198.51.100.1".parse().unwrap();
        let leaf = ca.issue(&[], &[ip], at()).unwrap();
        let pin: [u8; 32] = Sha256::digest(ca.cert_der()).into();
        let other_pin: [u8; 32] = Sha256::digest(other.cert_der()).into();
        verify(pin, &leaf.chain_der, "198.51.100.1").unwrap();
        // Any name: the pin, not the name, authenticates the gateway.
        verify(pin, &leaf.chain_der, "203.0.113.9").unwrap();
        let err = verify(other_pin, &leaf.chain_der, "198.51.100.1").unwrap_err();
        assert!(
            err.to_string().contains("does not match the token"),
            "{err}"
        );
        // A chain that names the pinned CA but whose leaf another CA signed is refused.
        let forged = other.issue(&[], &[ip], at()).unwrap();
        let chain = vec![forged.chain_der[0].clone(), ca.cert_der().to_vec()];
        assert!(verify(pin, &chain, "198.51.100.1").is_err());
        // Without the CA in the chain there is nothing to match.
        assert!(verify(pin, &leaf.chain_der[..1], "198.51.100.1").is_err());
    }
}
