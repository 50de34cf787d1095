//! Mutual TLS and bearer tokens together, on tokio over 127.0.0.1.
//!
//! The example makes its own certificate authority (with rcgen), a server certificate and a
//! client certificate. The server requires a client certificate from that CA and a bearer
//! token; the handler sees who called twice over: the token's subject (from the auth
//! plugin) and the certificate the TLS session verified. Then it shows the refusals: a call
//! without a token, and a client whose certificate the server does not trust.
//!
//!     cargo run -p gorpc-examples --example tls-auth

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use gorpc_plugins::auth::{BearerAuth, BearerToken, Identity, SUBJECT};
use gorpc_tokio::client::ClientBuilder;
use gorpc_tokio::tls::rustls::pki_types::PrivatePkcs8KeyDer;
use gorpc_tokio::tls::rustls::server::WebPkiClientVerifier;
use gorpc_tokio::tls::rustls::{self, RootCertStore};
use gorpc_tokio::tls::{CertificateDer, ClientTls, PrivateKeyDer, ServerName};
use gorpc_tokio::{CallOptions, Router, ServerReply, ServerRequest, Status, Tokio};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};

const WHOAMI: &str = "/demo.Secure/WhoAmI";

struct Certified {
    cert: rcgen::Certificate,
    key: KeyPair,
}

impl Certified {
    fn chain(&self) -> Vec<CertificateDer<'static>> {
        vec![self.cert.der().clone()]
    }

    fn key(&self) -> PrivateKeyDer<'static> {
        PrivatePkcs8KeyDer::from(self.key.serialize_der()).into()
    }
}

fn authority(name: &str) -> Certified {
    let key = KeyPair::generate().expect("key");
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign];
    let cert = params.self_signed(&key).expect("self-signed CA");
    Certified { cert, key }
}

fn issue(ca: &Certified, name: &str, sans: &[&str], usage: ExtendedKeyUsagePurpose) -> Certified {
    let key = KeyPair::generate().expect("key");
    let sans = sans.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let mut params = CertificateParams::new(sans).expect("params");
    params.distinguished_name.push(DnType::CommonName, name);
    params.extended_key_usages = vec![usage];
    let cert = params.signed_by(&key, &ca.cert, &ca.key).expect("signed");
    Certified { cert, key }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn trusting(ca: &Certified) -> Arc<RootCertStore> {
    let mut roots = RootCertStore::empty();
    roots.add(ca.cert.der().clone()).expect("CA certificate");
    Arc::new(roots)
}

fn client_tls(ca: &Certified, me: &Certified) -> ClientTls {
    let tls = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_root_certificates(trusting(ca))
        .with_client_auth_cert(me.chain(), me.key())
        .expect("client certificate");
    let server_name = ServerName::try_from("localhost").expect("name").to_owned();
    ClientTls::new(Arc::new(tls), server_name)
}

/// A client of `addr` over mutual TLS as `me`, trusting `ca`.
fn client(addr: SocketAddr, ca: &Certified, me: &Certified) -> ClientBuilder<Tokio> {
    gorpc_tokio::client()
        .endpoint(addr)
        .tls(client_tls(ca, me))
        .timeout(Duration::from_secs(5))
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    gorpc_examples::init_logging();
    let ca = authority("demo CA");
    let server_cert = issue(
        &ca,
        "server",
        &["localhost"],
        ExtendedKeyUsagePurpose::ServerAuth,
    );
    let alice_cert = issue(
        &ca,
        "alice's laptop",
        &[],
        ExtendedKeyUsagePurpose::ClientAuth,
    );
    let stranger_ca = authority("someone else's CA");
    let stranger_cert = issue(
        &stranger_ca,
        "stranger",
        &[],
        ExtendedKeyUsagePurpose::ClientAuth,
    );

    // The server: TLS that requires a client certificate from our CA, and a bearer token.
    let verifier =
        WebPkiClientVerifier::builder_with_provider(trusting(&ca), provider()).build()?;
    let tls = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier)
        .with_single_cert(server_cert.chain(), server_cert.key())?;
    let auth = BearerAuth::new(|token: &str, _method: &str| match token {
        "alice-token" => Ok(Identity::new("alice")),
        _ => Err(Status::unauthenticated("unknown token")),
    });
    let router = Router::new().route(WHOAMI, |req: ServerRequest| async move {
        let subject = req.metadata_value(SUBJECT).unwrap_or_default();
        let certificates = req.peer_certificates().map_or(0, |chain| chain.len());
        let answer = format!(
            "token subject {:?}, {} verified client certificate(s)",
            String::from_utf8_lossy(subject),
            certificates
        );
        ServerReply::ok(Bytes::from(answer))
    });
    let server = gorpc_tokio::server(router)
        .tls(Arc::new(tls))
        .interceptor(auth)
        .bind("127.0.0.1:0".parse()?)
        .await?;
    let addr = server.local_addr();
    println!("server on {addr} (mutual TLS + bearer token)");

    // Alice: trusted certificate and a valid token.
    let alice = client(addr, &ca, &alice_cert)
        .interceptor(BearerToken::new("alice-token"))
        .build()?;
    let rsp = alice
        .call_raw(WHOAMI, 0, Bytes::new(), CallOptions::default())
        .await?;
    println!("alice:          {}", String::from_utf8_lossy(&rsp.body));

    // A trusted certificate but no token: refused by the auth interceptor.
    let no_token = client(addr, &ca, &alice_cert).build()?;
    let err = no_token
        .call_raw(WHOAMI, 0, Bytes::new(), CallOptions::default())
        .await
        .expect_err("a call without a token must be refused");
    println!("no token:       {err}");

    // A token but a certificate from an unknown CA: the TLS handshake fails.
    let stranger = client(addr, &ca, &stranger_cert)
        .interceptor(BearerToken::new("alice-token"))
        .build()?;
    let err = stranger
        .call_raw(WHOAMI, 0, Bytes::new(), CallOptions::default())
        .await
        .expect_err("an untrusted client certificate must be refused");
    println!("untrusted cert: {err}");

    server.shutdown(Duration::from_secs(1)).await;
    Ok(())
}
