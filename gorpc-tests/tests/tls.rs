//! TLS and mutual TLS over real TCP on 127.0.0.1, on every runtime pairing. Certificates are
//! made here with rcgen: a CA, a server certificate for localhost and 127.0.0.1, a client
//! certificate from that CA, and a client certificate from an unrelated CA.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use gorpc::client::{ConnectionConfig, PoolConfig};
use gorpc::tls::rustls::pki_types::PrivatePkcs8KeyDer;
use gorpc::tls::rustls::server::WebPkiClientVerifier;
use gorpc::tls::rustls::{self, RootCertStore};
use gorpc::tls::{CertificateDer, ClientTls, PrivateKeyDer, ServerName};
use gorpc::{
    CallOptions, Client, ClientConfig, Code, Router, Runtime, Server, ServerReply, ServerRequest,
    Shutdown,
};
use gorpc_tests::{
    client_config, concurrent_echoes, loopback, on_every_runtime, sleep, within, SECOND,
};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};

/// A certificate with its private key.
struct Identity {
    cert: rcgen::Certificate,
    key: KeyPair,
}

impl Identity {
    fn chain(&self) -> Vec<CertificateDer<'static>> {
        vec![self.cert.der().clone()]
    }

    fn key(&self) -> PrivateKeyDer<'static> {
        PrivatePkcs8KeyDer::from(self.key.serialize_der()).into()
    }
}

fn ca(name: &str) -> Identity {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let cert = params.self_signed(&key).unwrap();
    Identity { cert, key }
}

fn leaf(issuer: &Identity, name: &str, sans: &[&str], usage: ExtendedKeyUsagePurpose) -> Identity {
    let key = KeyPair::generate().unwrap();
    let sans: Vec<String> = sans.iter().map(|s| s.to_string()).collect();
    let mut params = CertificateParams::new(sans).unwrap();
    params.distinguished_name.push(DnType::CommonName, name);
    params.extended_key_usages = vec![usage];
    let cert = params.signed_by(&key, &issuer.cert, &issuer.key).unwrap();
    Identity { cert, key }
}

/// Everything a scenario needs, made fresh per test.
struct Pki {
    ca: Identity,
    server: Identity,
    client: Identity,
    /// Signed by a CA the server does not know.
    stranger: Identity,
    /// That CA.
    other_ca: Identity,
}

fn pki() -> Pki {
    let ca_ = ca("gorpc test CA");
    let other_ca = ca("unrelated CA");
    Pki {
        server: leaf(
            &ca_,
            "server",
            &["localhost", "127.0.0.1"],
            ExtendedKeyUsagePurpose::ServerAuth,
        ),
        client: leaf(&ca_, "client-1", &[], ExtendedKeyUsagePurpose::ClientAuth),
        stranger: leaf(
            &other_ca,
            "stranger",
            &[],
            ExtendedKeyUsagePurpose::ClientAuth,
        ),
        ca: ca_,
        other_ca,
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn roots(ca: &Identity) -> Arc<RootCertStore> {
    let mut roots = RootCertStore::empty();
    roots.add(ca.cert.der().clone()).unwrap();
    Arc::new(roots)
}

/// A server that requires a client certificate from `pki.ca`.
fn mtls_server_config(pki: &Pki) -> Arc<rustls::ServerConfig> {
    let verifier = WebPkiClientVerifier::builder_with_provider(roots(&pki.ca), provider())
        .build()
        .unwrap();
    let config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_client_cert_verifier(verifier)
        .with_single_cert(pki.server.chain(), pki.server.key())
        .unwrap();
    Arc::new(config)
}

/// A client trusting `trust`, presenting `identity` if any.
fn client_tls(trust: &Identity, identity: Option<&Identity>) -> ClientTls {
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots(trust));
    let config = match identity {
        Some(id) => builder.with_client_auth_cert(id.chain(), id.key()).unwrap(),
        None => builder.with_no_client_auth(),
    };
    ClientTls::new(
        Arc::new(config),
        ServerName::try_from("localhost").unwrap().to_owned(),
    )
}

fn tls_client_config(tls: ClientTls) -> ClientConfig {
    ClientConfig {
        pool: PoolConfig {
            connection: ConnectionConfig {
                connect_timeout: 5 * SECOND,
                tls: Some(tls),
                ..ConnectionConfig::default()
            },
            // Fail fast and retry soon after a refused connection.
            backoff_min: Duration::from_millis(1),
            backoff_max: Duration::from_millis(10),
            ..PoolConfig::default()
        },
        default_timeout: Some(10 * SECOND),
        ..ClientConfig::default()
    }
}

/// "/test.Tls/Whoami" answers with the DER of the caller's certificate (empty without one);
/// "/test.Tls/Echo" echoes, every other call after a tick of the timer so that both the
/// inline and the spawned handler paths run, and records the caller's address.
fn router<S: Runtime>(server: &S, peers: Arc<Mutex<HashSet<SocketAddr>>>) -> Router {
    let rt = server.clone();
    Router::new()
        .route("/test.Tls/Whoami", |req: ServerRequest| async move {
            let der = req
                .peer_certificates()
                .map(|chain| Bytes::copy_from_slice(chain[0].as_ref()))
                .unwrap_or_default();
            ServerReply::ok(der)
        })
        .route("/test.Tls/Echo", move |req: ServerRequest| {
            let rt = rt.clone();
            peers.lock().unwrap().insert(req.peer.unwrap());
            async move {
                if req.body.first().is_some_and(|b| b % 2 == 1) {
                    sleep(&rt, Duration::from_micros(1)).await;
                }
                ServerReply::ok(req.body)
            }
        })
}

async fn whoami(client: &Client) -> Result<Bytes, gorpc::Status> {
    client
        .call_raw("/test.Tls/Whoami", 0, Bytes::new(), CallOptions::default())
        .await
        .map(|rsp| rsp.body)
}

/// A client of `pki.client` calls and is answered; the server still serves after a client
/// that failed.
async fn assert_still_serving<C: Runtime>(client_rt: &C, addr: SocketAddr, pki: &Pki) {
    let client = Client::lazy(
        client_rt.clone(),
        addr,
        tls_client_config(client_tls(&pki.ca, Some(&pki.client))),
    );
    let der = within(
        client_rt,
        10 * SECOND,
        "a good client's call",
        whoami(&client),
    )
    .await
    .expect("a trusted client is served");
    assert_eq!(der.as_ref(), pki.client.cert.der().as_ref());
}

async fn mutual_tls_call_sees_the_client_certificate<S: Runtime, C: Runtime>(
    server_rt: S,
    client_rt: C,
) {
    let pki = pki();
    let server = Server::new(server_rt.clone(), router(&server_rt, Arc::default()))
        .tls(mtls_server_config(&pki))
        .bind(loopback())
        .await
        .unwrap();
    let client = Client::connect(
        client_rt.clone(),
        server.local_addr(),
        tls_client_config(client_tls(&pki.ca, Some(&pki.client))),
    )
    .await
    .expect("TLS connect");
    let der = whoami(&client).await.expect("TLS call");
    assert_eq!(
        der.as_ref(),
        pki.client.cert.der().as_ref(),
        "the handler saw the client's own certificate"
    );
    // A plain request built by hand carries no identity.
    let plain = ServerRequest::new("/x", 0, &Default::default(), Bytes::new());
    assert!(plain.peer_certificates().is_none());
    drop(client);

    // The same through the builder's .tls.
    let client = Client::builder(client_rt.clone())
        .endpoint(server.local_addr())
        .tls(client_tls(&pki.ca, Some(&pki.client)))
        .connect()
        .await
        .expect("TLS connect through the builder");
    let der = whoami(&client).await.expect("TLS call");
    assert_eq!(der.as_ref(), pki.client.cert.der().as_ref());
    drop(client);
    assert_eq!(server.shutdown(5 * SECOND).await, Shutdown::Graceful);
}

async fn client_with_an_untrusted_certificate_is_refused<S: Runtime, C: Runtime>(
    server_rt: S,
    client_rt: C,
) {
    let pki = pki();
    let server = Server::new(server_rt.clone(), router(&server_rt, Arc::default()))
        .tls(mtls_server_config(&pki))
        .bind(loopback())
        .await
        .unwrap();
    let addr = server.local_addr();
    let stranger = Client::lazy(
        client_rt.clone(),
        addr,
        tls_client_config(client_tls(&pki.ca, Some(&pki.stranger))),
    );
    let err = within(&client_rt, 10 * SECOND, "a refused call", whoami(&stranger))
        .await
        .expect_err("a certificate from an unknown CA is refused");
    assert_eq!(err.code(), Code::Unavailable, "{err}");
    assert_still_serving(&client_rt, addr, &pki).await;
}

async fn client_without_a_certificate_is_refused<S: Runtime, C: Runtime>(
    server_rt: S,
    client_rt: C,
) {
    let pki = pki();
    let server = Server::new(server_rt.clone(), router(&server_rt, Arc::default()))
        .tls(mtls_server_config(&pki))
        .bind(loopback())
        .await
        .unwrap();
    let addr = server.local_addr();
    let anonymous = Client::lazy(
        client_rt.clone(),
        addr,
        tls_client_config(client_tls(&pki.ca, None)),
    );
    let err = within(
        &client_rt,
        10 * SECOND,
        "a refused call",
        whoami(&anonymous),
    )
    .await
    .expect_err("a client without a certificate is refused");
    assert_eq!(err.code(), Code::Unavailable, "{err}");
    assert_still_serving(&client_rt, addr, &pki).await;
}

/// The status of a refused handshake has the rustls verdict as its source.
fn assert_rustls_certificate_error(err: &gorpc::Status) {
    use std::error::Error as _;
    let cause = err
        .source()
        .and_then(|e| e.downcast_ref::<rustls::Error>())
        .unwrap_or_else(|| panic!("no rustls::Error under {err:?}"));
    assert!(
        matches!(cause, rustls::Error::InvalidCertificate(_)),
        "{cause:?}"
    );
}

async fn client_refuses_an_untrusted_server<S: Runtime, C: Runtime>(server_rt: S, client_rt: C) {
    let pki = pki();
    let server = Server::new(server_rt.clone(), router(&server_rt, Arc::default()))
        .tls(mtls_server_config(&pki))
        .bind(loopback())
        .await
        .unwrap();
    let addr = server.local_addr();
    // Trusts only the unrelated CA, so the server's certificate does not verify.
    let err = within(
        &client_rt,
        10 * SECOND,
        "connect to an untrusted server",
        Client::connect(
            client_rt.clone(),
            addr,
            tls_client_config(client_tls(&pki.other_ca, Some(&pki.client))),
        ),
    )
    .await
    .expect_err("the server's certificate is not trusted");
    assert_eq!(err.code(), Code::Unavailable, "{err}");
    assert!(
        err.message().contains("TLS handshake") && err.message().contains("certificate"),
        "the rustls error is in the message: {err}"
    );
    assert_rustls_certificate_error(&err);
    assert_still_serving(&client_rt, addr, &pki).await;
}

async fn plain_client_against_a_tls_server_fails_cleanly<S: Runtime, C: Runtime>(
    server_rt: S,
    client_rt: C,
) {
    let pki = pki();
    let server = Server::new(server_rt.clone(), router(&server_rt, Arc::default()))
        .tls(mtls_server_config(&pki))
        .bind(loopback())
        .await
        .unwrap();
    let addr = server.local_addr();
    let timeout = 5 * SECOND;
    let plain = Client::lazy(
        client_rt.clone(),
        addr,
        ClientConfig {
            default_timeout: Some(timeout),
            ..client_config()
        },
    );
    let started = Instant::now();
    let err = within(&client_rt, 2 * timeout, "a plain call", whoami(&plain))
        .await
        .expect_err("plain TCP is not TLS");
    assert!(
        matches!(err.code(), Code::Unavailable | Code::DeadlineExceeded),
        "{err}"
    );
    assert!(
        started.elapsed() <= timeout + SECOND,
        "bounded by the call timeout"
    );
    assert_still_serving(&client_rt, addr, &pki).await;
}

async fn thousand_concurrent_calls_over_one_tls_connection<S: Runtime, C: Runtime>(
    server_rt: S,
    client_rt: C,
) {
    let pki = pki();
    let peers = Arc::new(Mutex::new(HashSet::new()));
    let server = Server::new(server_rt.clone(), router(&server_rt, peers.clone()))
        .tls(mtls_server_config(&pki))
        .bind(loopback())
        .await
        .unwrap();
    let client = Client::connect(
        client_rt.clone(),
        server.local_addr(),
        ClientConfig {
            default_timeout: Some(20 * SECOND),
            ..tls_client_config(client_tls(&pki.ca, Some(&pki.client)))
        },
    )
    .await
    .unwrap();
    // Some bodies large enough to span several TLS records.
    let bodies = (0..1_000u32).map(|i| {
        let len = if i % 50 == 0 { 40_000 } else { 16 };
        let mut body = format!("{}-call-{i}-", i % 10).into_bytes();
        body.resize(len.max(body.len()), b'x');
        Bytes::from(body)
    });
    concurrent_echoes(&client_rt, &client, "/test.Tls/Echo", bodies).await;
    assert_eq!(
        peers.lock().unwrap().len(),
        1,
        "all calls shared one connection"
    );
    drop(client);
    assert_eq!(server.shutdown(5 * SECOND).await, Shutdown::Graceful);
}

/// HTTPS: the HTTP client speaks TLS when its config asks, to a server that answers HTTP
/// and the binary protocol over TLS on one port; the handler sees the client's
/// certificate, and an untrusted server is refused at the handshake.
async fn http_client_calls_over_tls<S: Runtime, C: Runtime>(server_rt: S, client_rt: C) {
    let pki = pki();
    let server = Server::new(server_rt.clone(), router(&server_rt, Arc::default()))
        .tls(mtls_server_config(&pki))
        .http()
        .bind(loopback())
        .await
        .unwrap();
    let addr = server.local_addr();
    let client = Client::http(
        client_rt.clone(),
        addr,
        tls_client_config(client_tls(&pki.ca, Some(&pki.client))),
    );
    let calls = async {
        for _ in 0..3 {
            let der = whoami(&client).await.expect("HTTPS call");
            assert_eq!(der.as_ref(), pki.client.cert.der().as_ref());
        }
        let echo = client
            .call_raw(
                "/test.Tls/Echo",
                0,
                Bytes::from_static(b"over https"),
                CallOptions::default(),
            )
            .await
            .unwrap();
        assert_eq!(echo.body, "over https");
    };
    within(&client_rt, 20 * SECOND, "HTTPS calls", calls).await;

    let untrusting = Client::http(
        client_rt.clone(),
        addr,
        tls_client_config(client_tls(&pki.other_ca, Some(&pki.client))),
    );
    let err = within(&client_rt, 10 * SECOND, "untrusted", whoami(&untrusting))
        .await
        .expect_err("the server's certificate is not trusted");
    assert_eq!(err.code(), Code::Unavailable, "{err}");
    assert!(err.message().contains("TLS handshake"), "{err}");
    assert_rustls_certificate_error(&err);
    drop(client);
    assert_eq!(server.shutdown(5 * SECOND).await, Shutdown::Graceful);
}

/// gRPC over TLS: the client offers ALPN h2 and the server, answering HTTP on the port,
/// chooses it in the handshake; the handler sees the client's certificate; binary clients
/// (no ALPN) share the port.
async fn grpc_over_tls_chooses_h2_by_alpn<S: Runtime, C: Runtime>(server_rt: S, client_rt: C) {
    let pki = pki();
    let server = Server::new(server_rt.clone(), router(&server_rt, Arc::default()))
        .tls(mtls_server_config(&pki))
        .http()
        .bind(loopback())
        .await
        .unwrap();
    let addr = server.local_addr();
    let client = Client::grpc(
        client_rt.clone(),
        addr,
        tls_client_config(client_tls(&pki.ca, Some(&pki.client))),
    );
    let calls = async {
        for _ in 0..3 {
            let der = whoami(&client).await.expect("gRPC call over TLS");
            assert_eq!(der.as_ref(), pki.client.cert.der().as_ref());
        }
    };
    within(&client_rt, 20 * SECOND, "gRPC calls over TLS", calls).await;
    // The handshake itself chose h2 (gRPC clients such as grpc-go insist on it).
    let tls = client_tls(&pki.ca, Some(&pki.client));
    let mut config = (*tls.config).clone();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let handshake = async {
        let socket = client_rt.connect(addr).await.unwrap();
        let mut session =
            gorpc::tls::TlsIo::client(socket, Arc::new(config), tls.server_name).unwrap();
        session.handshake().await.unwrap();
        session.session().alpn_protocol().map(<[u8]>::to_vec)
    };
    let chosen = within(&client_rt, 10 * SECOND, "handshake", handshake).await;
    assert_eq!(chosen.as_deref(), Some(&b"h2"[..]));
    assert_still_serving(&client_rt, addr, &pki).await;
    drop(client);
    assert_eq!(server.shutdown(5 * SECOND).await, Shutdown::Graceful);
}

on_every_runtime!(
    mutual_tls_call_sees_the_client_certificate,
    http_client_calls_over_tls,
    grpc_over_tls_chooses_h2_by_alpn,
    client_with_an_untrusted_certificate_is_refused,
    client_without_a_certificate_is_refused,
    client_refuses_an_untrusted_server,
    plain_client_against_a_tls_server_fails_cleanly,
    thousand_concurrent_calls_over_one_tls_connection,
);
