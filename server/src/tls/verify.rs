//! The certificate verifiers etcd's TLS rules need beyond rustls' own: the allowed peer CN or
//! hostname, a trusted CA's own certificate as the other side's (Go's x509 accepts it), and
//! any server certificate for `--peer-auto-tls` peers.

use super::*;
use rustls::server::danger::ClientCertVerified;

/// Client verifier for `--peer-cert-allowed-cn` and `--peer-cert-allowed-hostname`: the chain
/// must verify, and then the leaf must name the allowed CN or be valid for the hostname.
#[derive(Debug)]
pub(super) struct AllowedPeer {
    pub(super) inner: Arc<dyn ClientCertVerifier>,
    pub(super) cn: Option<String>,
    pub(super) hostname: Option<String>,
}

impl ClientCertVerifier for AllowedPeer {
    fn root_hint_subjects(&self) -> &[rustls::DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: rustls::pki_types::UnixTime,
    ) -> std::result::Result<ClientCertVerified, rustls::Error> {
        let ok = self
            .inner
            .verify_client_cert(end_entity, intermediates, now)?;
        if let Some(cn) = &self.cn {
            let (_, cert) = x509_parser::parse_x509_certificate(end_entity.as_ref())
                .map_err(|e| rustls::Error::General(format!("bad peer certificate: {e}")))?;
            let names: Vec<&str> = cert
                .subject()
                .iter_common_name()
                .filter_map(|a| a.as_str().ok())
                .collect();
            if !names.iter().any(|n| n == cn) {
                return Err(refused(format!(
                    "certificate CN {names:?}, allowed CN {cn:?}"
                )));
            }
        }
        if let Some(host) = &self.hostname {
            let name = ServerName::try_from(host.as_str())
                .map_err(|e| rustls::Error::General(format!("bad allowed hostname: {e}")))?;
            let ee = webpki::EndEntityCert::try_from(end_entity)
                .map_err(|e| rustls::Error::General(format!("bad peer certificate: {e}")))?;
            ee.verify_is_valid_for_subject_name(&name).map_err(|_| {
                refused(format!(
                    "the certificate is not valid for hostname {host:?}"
                ))
            })?;
        }
        Ok(ok)
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> std::result::Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> std::result::Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// Go's x509 accepts a certificate that is itself one of the trusted CAs as the other side's
/// certificate; webpki refuses any CA certificate as an end entity. etcd's own fixtures do
/// this (a self-signed CA with CN `root`, used as CA, server and client certificate), and so
/// may a deployment: the exact certificate of a trusted CA is accepted too, when it is within
/// its validity period, allows the usage and is not revoked by a CRL of its own.
#[derive(Debug)]
pub(super) struct CaItself {
    pub(super) cas: Vec<CertificateDer<'static>>,
    pub(super) crls: Vec<CertificateRevocationListDer<'static>>,
}

impl CaItself {
    pub(super) fn read(ca_file: &Path, crl_file: Option<&Path>) -> Result<CaItself> {
        Ok(CaItself {
            cas: read_certs(ca_file)?,
            crls: match crl_file {
                Some(f) => read_crls(f)?,
                None => vec![],
            },
        })
    }

    fn accepts(
        &self,
        cert: &CertificateDer<'_>,
        now: rustls::pki_types::UnixTime,
        client: bool,
    ) -> bool {
        if !self.cas.iter().any(|ca| ca.as_ref() == cert.as_ref()) {
            return false;
        }
        let Ok((_, c)) = x509_parser::parse_x509_certificate(cert.as_ref()) else {
            return false;
        };
        let Ok(now) = x509_parser::time::ASN1Time::from_timestamp(now.as_secs() as i64) else {
            return false;
        };
        if !c.validity().is_valid_at(now) {
            return false;
        }
        let usage_ok = match c.extended_key_usage() {
            Ok(Some(eku)) => {
                let u = &eku.value;
                u.any || if client { u.client_auth } else { u.server_auth }
            }
            Ok(None) => true,
            Err(_) => false,
        };
        let revoked = self.crls.iter().any(|crl| {
            x509_parser::parse_x509_crl(crl.as_ref()).is_ok_and(|(_, crl)| {
                crl.issuer() == c.subject()
                    && crl
                        .iter_revoked_certificates()
                        .any(|r| r.raw_serial() == c.raw_serial())
            })
        });
        usage_ok && !revoked
    }
}

/// A client verifier that also takes a trusted CA's own certificate (see `CaItself`).
#[derive(Debug)]
pub(super) struct ClientCaAsLeaf {
    pub(super) inner: Arc<dyn ClientCertVerifier>,
    pub(super) cas: CaItself,
}

impl ClientCertVerifier for ClientCaAsLeaf {
    fn root_hint_subjects(&self) -> &[rustls::DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: rustls::pki_types::UnixTime,
    ) -> std::result::Result<ClientCertVerified, rustls::Error> {
        match self
            .inner
            .verify_client_cert(end_entity, intermediates, now)
        {
            Err(_) if self.cas.accepts(end_entity, now, true) => {
                Ok(ClientCertVerified::assertion())
            }
            other => other,
        }
    }

    fn client_auth_mandatory(&self) -> bool {
        self.inner.client_auth_mandatory()
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> std::result::Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> std::result::Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// The server-side counterpart, for a member dialing its peers: the trusted CA's own
/// certificate must still name the host dialed.
#[derive(Debug)]
pub(super) struct ServerCaAsLeaf {
    pub(super) inner: Arc<rustls::client::WebPkiServerVerifier>,
    pub(super) cas: CaItself,
}

impl rustls::client::danger::ServerCertVerifier for ServerCaAsLeaf {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: rustls::pki_types::UnixTime,
    ) -> std::result::Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        match self
            .inner
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
        {
            Err(e) if self.cas.accepts(end_entity, now, false) => {
                let names_host = webpki::EndEntityCert::try_from(end_entity)
                    .is_ok_and(|ee| ee.verify_is_valid_for_subject_name(server_name).is_ok());
                if names_host {
                    Ok(rustls::client::danger::ServerCertVerified::assertion())
                } else {
                    Err(e)
                }
            }
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> std::result::Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> std::result::Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// Accepts any server certificate: only for peers whose pairs `--peer-auto-tls` generated,
/// which nobody can verify (etcd skips verification for them too).
#[derive(Debug)]
pub(super) struct AnyServer(pub(super) Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyServer {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> std::result::Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> std::result::Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> std::result::Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
