//! Servers and clients from TOML: components chosen by name (built-in and user plugins) work
//! end to end over TCP, HTTP, gRPC and UDP on every runtime pairing, and every kind of
//! mistake is refused at start-up with the key that is wrong.

use std::sync::Arc;

use bytes::Bytes;
use gorpc::discovery::MemoryRegistry;
use gorpc::{
    CallOptions, Code, Metadata, Next, Router, Runtime, ServerInterceptor, ServerReply,
    ServerRequest,
};
use gorpc_plugins::config::{Config, ConfigError, Plugins, RegistryPlugin};
use gorpc_tests::{on_every_runtime, SECOND};

const SERVER: &str = r#"
[server]
listen = "127.0.0.1:0"
service = "greeter"
max_connections = 100
interceptors = [
    "logging",
    { name = "auth", tokens = { "s3cret" = "alice" } },
    { name = "tag", value = "from-config" },
]
registry = { name = "memory" }
"#;

const CLIENT: &str = r#"
[client]
service = "greeter"
codec = "msgpack"
timeout_ms = 5000
registry = "memory"
balancer = { name = "round_robin", seed = 1 }
interceptors = ["logging", { name = "auth", token = "s3cret" }]
"#;

/// A user plugin: a server interceptor that puts a configured value in the request metadata.
struct Tag(String);

impl ServerInterceptor for Tag {
    fn intercept(
        &self,
        mut request: ServerRequest,
        next: Next,
    ) -> gorpc::BoxFuture<'static, ServerReply> {
        request
            .metadata_mut()
            .insert("x-tag", Bytes::from(self.0.clone()));
        next.run(request)
    }
}

/// The built-ins plus two user plugins: the `tag` interceptor and an in-process registry.
fn plugins(registry: &MemoryRegistry) -> Plugins {
    let registry = registry.clone();
    Plugins::builtin()
        .server_interceptor("tag", |options| {
            let value = options.required_string("value")?;
            Ok(Arc::new(Tag(value)))
        })
        .registry("memory", move |_| {
            Ok(RegistryPlugin {
                discover: Arc::new(registry.clone()),
                register: Some(Arc::new(registry.clone())),
            })
        })
}

async fn a_configured_server_and_client_talk<S: Runtime, C: Runtime>(server_rt: S, client_rt: C) {
    let registry = MemoryRegistry::new();
    let plugins = plugins(&registry);
    let settings = Config::from_toml(SERVER).unwrap().server(&plugins).unwrap();
    let router = Router::new().route("/greeter.Greeter/Hello", |req: ServerRequest| async move {
        // The subject comes from the auth plugin, the tag from the user plugin.
        let subject = req
            .metadata_value("x-gorpc-subject")
            .unwrap_or_default()
            .to_vec();
        let tag = req.metadata_value("x-tag").unwrap_or_default().to_vec();
        ServerReply::ok(Bytes::from([subject, b" ".to_vec(), tag].concat()))
    });
    let server = settings
        .server(server_rt.clone(), router)
        .bind(settings.listen)
        .await
        .unwrap();
    assert_eq!(
        registry.instances("greeter").len(),
        1,
        "registered by config"
    );

    let client_settings = Config::from_toml(CLIENT).unwrap().client(&plugins).unwrap();
    assert_eq!(client_settings.codec, gorpc::proto::codec::MSGPACK);
    let client = client_settings.build(client_rt.clone()).await.unwrap();
    let rsp = client
        .call_raw(
            "/greeter.Greeter/Hello",
            0,
            Bytes::new(),
            CallOptions::default(),
        )
        .await
        .unwrap();
    assert_eq!(&rsp.body[..], b"alice from-config");

    // The same client without the token: refused by the configured auth.
    let anonymous =
        Config::from_toml(&CLIENT.replace(r#", { name = "auth", token = "s3cret" }"#, ""))
            .unwrap()
            .client(&plugins)
            .unwrap()
            .build(client_rt.clone())
            .await
            .unwrap();
    let err = anonymous
        .call_raw(
            "/greeter.Greeter/Hello",
            0,
            Bytes::new(),
            CallOptions {
                metadata: Metadata::new(),
                ..CallOptions::default()
            },
        )
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    server.shutdown(SECOND).await;
    assert!(
        registry.instances("greeter").is_empty(),
        "deregistered at shutdown"
    );
}

/// `transport` picks the wire: HTTP on the server's port beside the binary protocol, and
/// UDP to a datagram server.
async fn transports_are_chosen_by_name<S: Runtime, C: Runtime>(server_rt: S, client_rt: C) {
    let plugins = Plugins::builtin();
    let echo = || {
        Router::new().route("/t.Echo/Echo", |req: ServerRequest| async move {
            ServerReply::ok(req.body)
        })
    };
    let settings =
        Config::from_toml("[server]\nlisten = \"127.0.0.1:0\"\ntransport = \"tcp+http\"")
            .unwrap()
            .server(&plugins)
            .unwrap();
    let server = settings
        .server(server_rt.clone(), echo())
        .bind(settings.listen)
        .await
        .unwrap();
    let udp = gorpc::udp::UdpServer::new(server_rt.clone(), echo())
        .bind(gorpc_tests::loopback())
        .await
        .unwrap();
    for (transport, addr) in [
        ("tcp", server.local_addr()),
        ("http", server.local_addr()),
        ("udp", udp.local_addr()),
    ] {
        let toml =
            format!("[client]\naddress = \"{addr}\"\ntransport = \"{transport}\"\ncodec = \"raw\"");
        let client = Config::from_toml(&toml)
            .unwrap()
            .client(&plugins)
            .unwrap()
            .build(client_rt.clone())
            .await
            .unwrap();
        let rsp = client
            .call_raw(
                "/t.Echo/Echo",
                0,
                Bytes::from_static(b"ping"),
                CallOptions::default(),
            )
            .await
            .unwrap_or_else(|e| panic!("{transport}: {e}"));
        assert_eq!(&rsp.body[..], b"ping", "{transport}");
    }
    server.shutdown(SECOND).await;
    udp.shutdown(SECOND).await;
}

/// `retry` and `hedge` are made on the client's runtime: a method failing twice with
/// `Unavailable` succeeds on its third attempt, one listed in `no_retry` fails at once, and
/// a hedged call whose first attempt stalls is answered by its second.
async fn retry_and_hedge_are_configured_by_name<S: Runtime, C: Runtime>(
    server_rt: S,
    client_rt: C,
) {
    use std::sync::atomic::{AtomicU32, Ordering};
    let attempts = Arc::new(AtomicU32::new(0));
    let counted = attempts.clone();
    let sleeper = server_rt.clone();
    let router = Router::new()
        // Unavailable, then Unavailable, then OK; the count starts over after an OK.
        .route("/t.Flaky/Call", move |_req: ServerRequest| {
            let n = counted.fetch_add(1, Ordering::SeqCst) + 1;
            async move {
                if n.is_multiple_of(3) {
                    ServerReply::ok(Bytes::from_static(b"third time"))
                } else {
                    ServerReply::error(gorpc::Status::new(Code::Unavailable, "not yet"))
                }
            }
        })
        // The first call stalls for a minute; every later one answers at once.
        .route("/t.Slow/Call", {
            let calls = Arc::new(AtomicU32::new(0));
            move |_req: ServerRequest| {
                let first = calls.fetch_add(1, Ordering::SeqCst) == 0;
                let sleeper = sleeper.clone();
                async move {
                    if first {
                        gorpc_tests::sleep(&sleeper, 60 * SECOND).await;
                    }
                    ServerReply::ok(Bytes::from_static(b"fast"))
                }
            }
        });
    let server = gorpc::Server::new(server_rt.clone(), router)
        .bind(gorpc_tests::loopback())
        .await
        .unwrap();
    let addr = server.local_addr();
    let client = |interceptors: &str| {
        let toml = format!(
            "[client]\naddress = \"{addr}\"\ntimeout_ms = 10000\ninterceptors = [{interceptors}]"
        );
        Config::from_toml(&toml)
            .unwrap()
            .client(&Plugins::builtin())
            .unwrap()
            .build(client_rt.clone())
    };
    let call = |client: gorpc::Client, method: &'static str| async move {
        client
            .call_raw(method, 0, Bytes::new(), CallOptions::default())
            .await
    };

    let retrying = client(
        r#"{ name = "retry", max_attempts = 3, codes = ["unavailable"], backoff_base_ms = 1, backoff_max_ms = 5, seed = 7 }"#,
    )
    .await
    .unwrap();
    let rsp = call(retrying, "/t.Flaky/Call").await.unwrap();
    assert_eq!(&rsp.body[..], b"third time");
    assert_eq!(attempts.load(Ordering::SeqCst), 3);

    let once = client(r#"{ name = "retry", backoff_base_ms = 1, no_retry = ["/t.Flaky/Call"] }"#)
        .await
        .unwrap();
    let err = call(once, "/t.Flaky/Call").await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err}");
    assert_eq!(attempts.load(Ordering::SeqCst), 4, "sent once");

    let hedged = client(r#"{ name = "hedge", methods = ["/t.Slow/Call"], delay_ms = 50 }"#)
        .await
        .unwrap();
    let rsp = gorpc_tests::within(
        &client_rt,
        20 * SECOND,
        "the hedge answers before the stalled attempt",
        call(hedged, "/t.Slow/Call"),
    )
    .await
    .unwrap();
    assert_eq!(&rsp.body[..], b"fast");
    server.shutdown(SECOND).await;
}

/// `transport = "grpc"` calls over gRPC, to one address or to a discovered service: servers
/// on `tcp+http` answer it, while servers of the binary protocol alone, which the same
/// client reaches over `tcp`, refuse its HTTP/2 connection.
async fn grpc_clients_call_over_grpc<S: Runtime, C: Runtime>(server_rt: S, client_rt: C) {
    let registry = MemoryRegistry::new();
    let plugins = plugins(&registry);
    let start = |transport: &'static str, service: &'static str| {
        let plugins = &plugins;
        let server_rt = server_rt.clone();
        async move {
            let toml = format!(
                "[server]\nlisten = \"127.0.0.1:0\"\ntransport = \"{transport}\"\n\
                 service = \"{service}\"\nregistry = \"memory\""
            );
            let settings = Config::from_toml(&toml).unwrap().server(plugins).unwrap();
            let echo = Router::new().route("/t.Echo/Echo", |req: ServerRequest| async move {
                ServerReply::ok(req.body)
            });
            settings
                .server(server_rt, echo)
                .bind(settings.listen)
                .await
                .unwrap()
        }
    };
    let with_grpc = start("tcp+http", "echo-grpc").await;
    let binary_only = start("tcp", "echo-binary").await;
    let call = |client: &str, transport: &str| {
        let toml = format!(
            "[client]\n{client}\ntransport = \"{transport}\"\ncodec = \"raw\"\ntimeout_ms = 10000"
        );
        let settings = Config::from_toml(&toml).unwrap().client(&plugins).unwrap();
        let client_rt = client_rt.clone();
        async move {
            let client = settings.build(client_rt).await.unwrap();
            client
                .call_raw(
                    "/t.Echo/Echo",
                    0,
                    Bytes::from_static(b"ping"),
                    CallOptions::default(),
                )
                .await
        }
    };
    let address =
        |server: &gorpc::ServerHandle<S>| format!("address = \"{}\"", server.local_addr());
    let discovered = |service: &str| format!("service = \"{service}\"\nregistry = \"memory\"");

    for client in [address(&with_grpc), discovered("echo-grpc")] {
        let rsp = call(&client, "grpc")
            .await
            .unwrap_or_else(|e| panic!("{client}: {e}"));
        assert_eq!(&rsp.body[..], b"ping", "{client}");
    }
    for client in [address(&binary_only), discovered("echo-binary")] {
        let err = call(&client, "grpc").await.expect_err(&client);
        assert_eq!(err.code(), Code::Unavailable, "{client}: {err}");
        let rsp = call(&client, "tcp")
            .await
            .unwrap_or_else(|e| panic!("{client} over tcp: {e}"));
        assert_eq!(&rsp.body[..], b"ping", "{client}");
    }
    with_grpc.shutdown(SECOND).await;
    binary_only.shutdown(SECOND).await;
}

/// `health = true` and `reflection = true` mount gRPC's standard services, which answer over
/// the binary protocol too; without them, the server has neither.
async fn health_and_reflection_are_mounted_by_flags<S: Runtime, C: Runtime>(
    server_rt: S,
    client_rt: C,
) {
    use futures::StreamExt as _;
    use gorpc::grpc::health::{self, HealthCheckRequest, HealthCheckResponse, ServingStatus};
    use gorpc::grpc::reflection::{
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
        ServerReflectionRequest, ServerReflectionResponse, V1,
    };
    use gorpc::{Protobuf, Request};

    let plugins = Plugins::builtin();
    for flags in ["health = true\nreflection = true", "health = false", ""] {
        let toml = format!("[server]\nlisten = \"127.0.0.1:0\"\n{flags}");
        let settings = Config::from_toml(&toml).unwrap().server(&plugins).unwrap();
        let mounted = flags.contains("true");
        assert_eq!(
            (settings.health, settings.reflection),
            (mounted, mounted),
            "{flags:?}"
        );
        let echo = Router::new().route("/t.Echo/Echo", |req: ServerRequest| async move {
            ServerReply::ok(req.body)
        });
        let server = settings
            .server(server_rt.clone(), echo)
            .bind(settings.listen)
            .await
            .unwrap();
        let client = gorpc::Client::connect(
            client_rt.clone(),
            server.local_addr(),
            gorpc_tests::client_config(),
        )
        .await
        .unwrap();

        let checked = client
            .unary::<_, _, HealthCheckResponse>(
                health::CHECK,
                Protobuf,
                Request::new(HealthCheckRequest::default()),
            )
            .await;
        let (mut sender, mut answers) = client
            .bidi::<_, ServerReflectionRequest, ServerReflectionResponse>(
                V1,
                Protobuf,
                CallOptions::default(),
            )
            .await
            .unwrap()
            .into_parts();
        let request = ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        };
        // A send fails once the call ended; the answers then end with its status.
        if sender.send(&request).await.is_ok() {
            let _ = sender.close_send().await;
        }
        let listed = answers.next().await.expect("an answer or a status");
        if mounted {
            let status = checked.unwrap().message.status;
            assert_eq!(status, ServingStatus::Serving as i32, "{flags:?}");
            let Some(MessageResponse::ListServicesResponse(list)) =
                listed.unwrap().message_response
            else {
                panic!("{flags:?}: no list of services");
            };
            let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
            assert!(
                names.contains(&"grpc.health.v1.Health".to_owned())
                    && names.contains(&"grpc.reflection.v1.ServerReflection".to_owned()),
                "{flags:?}: {names:?}"
            );
        } else {
            assert_eq!(
                checked.unwrap_err().code(),
                Code::Unimplemented,
                "{flags:?}"
            );
            assert_eq!(listed.unwrap_err().code(), Code::Unimplemented, "{flags:?}");
        }
        server.shutdown(SECOND).await;
    }
}

on_every_runtime!(
    a_configured_server_and_client_talk,
    transports_are_chosen_by_name,
    retry_and_hedge_are_configured_by_name,
    grpc_clients_call_over_grpc,
    health_and_reflection_are_mounted_by_flags
);

fn server_error(toml: &str) -> ConfigError {
    let plugins = plugins(&MemoryRegistry::new());
    Config::from_toml(toml)
        .and_then(|c| c.server(&plugins))
        .expect_err("configuration accepted")
}

fn client_error(toml: &str) -> ConfigError {
    let plugins = plugins(&MemoryRegistry::new());
    Config::from_toml(toml)
        .and_then(|c| c.client(&plugins))
        .expect_err("configuration accepted")
}

#[track_caller]
fn assert_error(err: ConfigError, key: &str, fragment: &str) {
    assert_eq!(err.key, key, "{err}");
    assert!(err.message.contains(fragment), "{err}");
}

#[test]
fn unknown_names_say_what_is_known() {
    assert_error(
        client_error("[client]\nservice = \"g\"\nregistry = \"memory\"\nbalancer = \"round_robbin\""),
        "client.balancer.name",
        "unknown balancer \"round_robbin\" (known: consistent_hash, p2c, random, round_robin, weighted_round_robin)",
    );
    assert_error(
        server_error("[server]\nlisten = \"127.0.0.1:0\"\ninterceptors = [\"logging\", \"audit\"]"),
        "server.interceptors[1].name",
        "unknown server interceptor \"audit\"",
    );
    assert_error(
        client_error("[client]\nservice = \"g\"\nregistry = { name = \"zookeeper\" }"),
        "client.registry.name",
        "unknown registry \"zookeeper\" (known: consul, dns, ",
    );
    assert_error(
        client_error("[client]\naddress = \"127.0.0.1:1\"\ncodec = \"xml\""),
        "client.codec",
        "unknown codec \"xml\" (known: json, msgpack, protobuf, raw)",
    );
    assert_error(
        server_error("[server]\nlisten = \"127.0.0.1:0\"\ntransport = \"quic\""),
        "server.transport",
        "unknown transport \"quic\"",
    );
    assert_error(
        client_error("[client]\naddress = \"127.0.0.1:1\"\ntransport = \"quic\""),
        "client.transport",
        "unknown transport \"quic\" (known: tcp, http, grpc, udp)",
    );
    assert_error(
        server_error("[servers]\nlisten = \"127.0.0.1:0\""),
        "servers",
        "unknown section",
    );
}

#[test]
fn bad_options_name_their_key() {
    assert_error(
        client_error("[client]\naddress = \"127.0.0.1:1\"\ninterceptors = [{ name = \"auth\", tokn = \"x\" }]"),
        "client.interceptors[0].tokn",
        "unknown option",
    );
    assert_error(
        client_error("[client]\naddress = \"127.0.0.1:1\"\ninterceptors = [{ name = \"auth\" }]"),
        "client.interceptors[0].token",
        "missing",
    );
    assert_error(
        server_error("[server]\nlisten = \"127.0.0.1:0\"\nmax_connections = \"ten\""),
        "server.max_connections",
        "expected an integer, found string",
    );
    assert_error(
        client_error("[client]\naddress = \"localhost\""),
        "client.address",
        "not an ip:port address",
    );
    assert_error(
        client_error("[client]\nservice = \"g\"\nregistry = { name = \"static\", service = \"g\", addresses = [\"127.0.0.1:1\", \"nowhere\"] }"),
        "client.registry.addresses",
        "\"nowhere\"",
    );
    assert_error(
        server_error("[server]\nservice = \"g\""),
        "server.listen",
        "missing",
    );
    assert_error(
        client_error("[client]\naddress = \"127.0.0.1:1\"\ntimeout_ms = -5"),
        "client.timeout_ms",
        "must not be negative",
    );
    assert_error(
        client_error("[client]\naddress = \"127.0.0.1:1\"\nservice = \"g\""),
        "client.address",
        "not both",
    );
    assert_error(
        client_error("[client]\nservice = \"g\"\nregistry = \"memory\"\ntransport = \"udp\""),
        "client.transport",
        "run over tcp or grpc; http and udp clients take `address`",
    );
    assert_error(
        server_error("[server]\nlisten = \"127.0.0.1:0\"\nhealth = \"yes\""),
        "server.health",
        "expected true or false, found string",
    );
    assert_error(
        server_error("[server]\nlisten = \"127.0.0.1:0\"\nreflection = 1"),
        "server.reflection",
        "expected true or false, found integer",
    );
    assert_error(
        client_error("[client]\naddress = \"127.0.0.1:1\"\nidempotent_methods = [\"/a/b\"]"),
        "client.idempotent_methods",
        "only the udp transport",
    );
    assert_error(
        client_error("[client]\naddress = \"127.0.0.1:1\"\nbalancer = \"p2c\""),
        "client.balancer",
        "nothing to balance",
    );
    assert_error(
        server_error("[server]\nlisten = \"127.0.0.1:0\"\nservice = \"g\"\nregistry = { name = \"static\", service = \"g\", addresses = [] }"),
        "server.registry.name",
        "cannot register servers",
    );
    assert_error(
        server_error("[server]\nlisten = \"127.0.0.1:0\"\nregistry = \"memory\""),
        "server.service",
        "the name to register under",
    );
}

#[test]
fn retry_and_hedge_check_their_options() {
    let with = |interceptor: &str| {
        client_error(&format!(
            "[client]\naddress = \"127.0.0.1:1\"\ninterceptors = [{interceptor}]"
        ))
    };
    assert_error(
        with(r#"{ name = "retry", codes = ["unavailable", "flaky"] }"#),
        "client.interceptors[0].codes[1]",
        "\"flaky\" is not a status code",
    );
    assert_error(
        with(r#"{ name = "retry", max_attempts = 0 }"#),
        "client.interceptors[0].max_attempts",
        "at least 1",
    );
    assert_error(
        with(r#"{ name = "retry", backoff_base_ms = 100, backoff_max_ms = 10 }"#),
        "client.interceptors[0].backoff_max_ms",
        "below backoff_base_ms",
    );
    assert_error(
        with(r#"{ name = "retry", max_attempt = 2 }"#),
        "client.interceptors[0].max_attempt",
        "unknown option",
    );
    assert_error(
        with(r#"{ name = "hedge", delay_ms = 20 }"#),
        "client.interceptors[0].methods",
        "the idempotent methods to hedge",
    );
    assert_error(
        with(r#"{ name = "hedge", methods = ["/a.B/C"] }"#),
        "client.interceptors[0].delay_ms",
        "missing",
    );
    assert_error(
        with(r#""retries""#),
        "client.interceptors[0].name",
        "unknown client interceptor \"retries\" (known: auth, hedge, logging, metrics, otel, retry)",
    );
}

#[test]
fn registry_plugins_check_their_options() {
    assert_error(
        server_error("[server]\nlisten = \"127.0.0.1:0\"\nservice = \"g\"\nregistry = { name = \"consul\", url = \"not a url\" }"),
        "server.registry.url",
        "not a url",
    );
    assert_error(
        server_error("[server]\nlisten = \"127.0.0.1:0\"\nservice = \"g\"\nregistry = { name = \"consul\", url = \"http://127.0.0.1:8500\", ttl = 5 }"),
        "server.registry.ttl",
        "unknown option",
    );
}

#[test]
fn syntax_errors_carry_the_line() {
    let err = Config::from_toml("[client]\naddress = \n").unwrap_err();
    assert!(err.message.contains("line 2"), "{err}");
}
