//! `client_certificate_v2`: a certificate from the device's PEM file, checked on the gateway
//! against the CA the rule names (its signature, validity at the time given, common name and
//! extended key usages). The client sends certificates only; a private key never leaves it.

use x509_parser::pem::Pem;
use x509_parser::prelude::{FromDer as _, X509Certificate};
use x509_parser::time::ASN1Time;

use crate::ClientCertificateInput;

/// The `CERTIFICATE` blocks of a PEM text, joined; other blocks (keys) are left out.
pub fn certificate_blocks(text: &str) -> Option<String> {
    const BEGIN: &str = "-----BEGIN CERTIFICATE-----";
    const END: &str = "-----END CERTIFICATE-----";
    let mut out = String::new();
    let mut rest = text;
    while let Some(start) = rest.find(BEGIN) {
        let Some(len) = rest[start..].find(END) else {
            break;
        };
        let stop = start + len + END.len();
        out.push_str(&rest[start..stop]);
        out.push('\n');
        rest = &rest[stop..];
    }
    (!out.is_empty()).then_some(out)
}

/// The common name of the first certificate in `pem` that `ca_der` signed and that meets the
/// rule; or why none does.
pub(crate) fn find_signed(
    pem: &str,
    ca_der: &[u8],
    rule: &ClientCertificateInput,
    now: i64,
) -> Result<String, String> {
    let (_, ca) =
        X509Certificate::from_der(ca_der).map_err(|e| format!("the CA does not parse: {e}"))?;
    let at = ASN1Time::from_timestamp(now).map_err(|e| e.to_string())?;
    let mut last = "no certificate in the file".to_string();
    for block in Pem::iter_from_buffer(pem.as_bytes()) {
        let Ok(block) = block else {
            last = "a PEM block does not decode".into();
            continue;
        };
        if block.label != "CERTIFICATE" {
            continue;
        }
        let Ok(cert) = block.parse_x509() else {
            last = "a certificate does not parse".into();
            continue;
        };
        let cn = cert
            .subject()
            .iter_common_name()
            .next()
            .and_then(|a| a.as_str().ok())
            .unwrap_or("")
            .to_string();
        if cert.verify_signature(Some(ca.public_key())).is_err() {
            last = format!("CN={cn} is not signed by the CA");
            continue;
        }
        if !cert.validity().is_valid_at(at) {
            last = format!("CN={cn} is not valid now (expired or not yet valid)");
            continue;
        }
        if let Some(want) = &rule.cn {
            if &cn != want {
                last = format!("CN={cn} is not {want}");
                continue;
            }
        }
        if !rule.extended_key_usage.is_empty() {
            let eku = cert.extended_key_usage().ok().flatten();
            let has = |name: &str| {
                eku.as_ref().is_some_and(|e| match name {
                    "clientAuth" => e.value.client_auth || e.value.any,
                    "emailProtection" => e.value.email_protection || e.value.any,
                    _ => false,
                })
            };
            if let Some(missing) = rule.extended_key_usage.iter().find(|u| !has(u)) {
                last = format!("CN={cn} lacks the extended key usage {missing}");
                continue;
            }
        }
        return Ok(cn);
    }
    Err(last)
}
