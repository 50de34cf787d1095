//! Servers and clients set up from a TOML file, with every component chosen by name.
//!
//! ```toml
//! [server]
//! listen = "127.0.0.1:7070"
//! service = "greeter"              # the name it registers under
//! transport = "tcp+http"           # HTTP/1.1 and gRPC beside the binary protocol
//! health = true                    # grpc.health.v1.Health, over every protocol
//! reflection = true                # gRPC server reflection, over every protocol
//! interceptors = ["logging", { name = "auth", tokens = { "s3cret" = "alice" } }]
//! registry = { name = "consul", url = "http://127.0.0.1:8500", ttl_ms = 10000 }
//!
//! [client]
//! service = "greeter"              # or: address = "127.0.0.1:7070"
//! transport = "grpc"               # or "tcp" (the default, gorpc's binary protocol)
//! codec = "msgpack"
//! timeout_ms = 2000
//! registry = { name = "static", addresses = ["127.0.0.1:7070"] }
//! balancer = "round_robin"         # a name, or { name = "...", options... }
//! interceptors = ["logging", { name = "auth", token = "s3cret" }]
//! ```
//!
//! [`Plugins::builtin`] knows every component of gorpc and gorpc-plugins; add your own with
//! [`Plugins::server_interceptor`], [`Plugins::client_interceptor`], [`Plugins::registry`],
//! [`Plugins::balancer`] and [`Plugins::codec`]. Everything is checked when the settings are
//! made ([`Config::server`], [`Config::client`]), before anything starts: an unknown name
//! or option, or a value of the wrong type, is a [`ConfigError`] naming the key
//! (`client.interceptors[1].token`) and what would have been accepted.
//!
//! Built-in names: interceptors `logging`, `auth` (client: `token`; server: `tokens`, a
//! table of token = subject, and `allow_unauthenticated`), `metrics`, `otel`; registries
//! `static` (`service`, `addresses`), `dns` (`names` as host:port, `every_ms`), `consul` (`url`, `token`, `ttl_ms`, `wait_ms`), `etcd`
//! with its feature (`endpoints`, `prefix`, `lease_ttl_ms`); balancers `random`,
//! `round_robin`, `weighted_round_robin`, `consistent_hash`, `p2c` (`seed`); codecs `raw`,
//! `protobuf`, `msgpack`, `json`; transports: servers `tcp`, `tcp+http` (the binary
//! protocol, HTTP/1.1 and, with the `grpc` feature, gRPC, all on one port); clients `tcp`,
//! `http`, `grpc` (any gRPC server, or a gorpc server on `tcp+http`), `udp` (with
//! `idempotent_methods`, resent until answered), where discovery and balancing need `tcp`
//! or `grpc`.
//! Servers with the `grpc` feature also take `health = true` and `reflection = true`, which
//! mount gRPC's standard services beside the interceptors ([`Server::health`],
//! [`Server::reflection`]); both answer over every protocol the server speaks.
//! Client interceptors that run on the client's runtime, made when [`ClientSettings::build`]
//! is given it: `retry` (`max_attempts`, default 3; `codes`, default `["unavailable"]`;
//! `backoff_base_ms`, default 50; `backoff_max_ms`, default 5000; `no_retry`, methods that
//! are not idempotent, sent once; `seed`) and `hedge` (`methods`, the idempotent methods to
//! hedge; `delay_ms`, before each further attempt; `max_attempts`, default 2).

use std::collections::BTreeMap;
use std::fmt::{self, Write as _};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use gorpc::client::{ClientBuilder, InstanceProtocol, OutgoingCall};
use gorpc::discovery::{Discover, Dns, Register, Registration, StaticList};
use gorpc::proto::balance::{
    Balancer, ConsistentHash, PowerOfTwoChoices, Random, RoundRobin, WeightedRoundRobin,
};
use gorpc::{
    BoxFuture, Client, ClientConfig, ClientInterceptor, ClientNext, Next, RawResponse, Runtime,
    Server, ServerInterceptor, ServerReply, ServerRequest, Service, Status,
};
use toml::{Table, Value};

/// A configuration value that is missing, unknown or wrong, with the key it is under.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigError {
    /// Dotted path of the offending key, e.g. `server.registry.ttl_ms`.
    pub key: String,
    /// What is wrong with it, and what would have been accepted.
    pub message: String,
}

impl ConfigError {
    /// An error about `key` (a dotted path; empty for the file as a whole).
    pub fn new(key: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError {
            key: key.into(),
            message: message.into(),
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.key.is_empty() {
            write!(f, "config: {}", self.message)
        } else {
            write!(f, "config key `{}`: {}", self.key, self.message)
        }
    }
}

impl std::error::Error for ConfigError {}

impl From<ConfigError> for Status {
    fn from(e: ConfigError) -> Status {
        Status::new(gorpc::Code::InvalidArgument, e.to_string())
    }
}

/// The options of one component (a table), read key by key. [`finish`](Self::finish)
/// refuses keys nobody read, so a misspelt option is an error, not a silent default.
#[derive(Debug)]
pub struct Options {
    path: String,
    table: Table,
    read: Vec<String>,
}

impl Options {
    fn new(path: String, table: Table) -> Self {
        Options {
            path,
            table,
            read: Vec::new(),
        }
    }

    /// The dotted path of `key` in this table, for error messages.
    pub fn key(&self, key: &str) -> String {
        if self.path.is_empty() {
            key.to_owned()
        } else {
            format!("{}.{key}", self.path)
        }
    }

    fn get(&mut self, key: &str) -> Option<&Value> {
        self.read.push(key.to_owned());
        self.table.get(key)
    }

    fn wrong_type(&self, key: &str, expected: &str, found: &Value) -> ConfigError {
        ConfigError::new(
            self.key(key),
            format!("expected {expected}, found {}", found.type_str()),
        )
    }

    /// A string; `None` when the key is absent.
    pub fn string(&mut self, key: &str) -> Result<Option<String>, ConfigError> {
        match self.get(key).cloned() {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(other) => Err(self.wrong_type(key, "a string", &other)),
        }
    }

    /// A string that must be there.
    pub fn required_string(&mut self, key: &str) -> Result<String, ConfigError> {
        self.string(key)?
            .ok_or_else(|| ConfigError::new(self.key(key), "missing"))
    }

    /// A non-negative integer; `None` when the key is absent.
    pub fn u64(&mut self, key: &str) -> Result<Option<u64>, ConfigError> {
        match self.get(key).cloned() {
            None => Ok(None),
            Some(Value::Integer(i)) if i >= 0 => Ok(Some(i as u64)),
            Some(Value::Integer(i)) => Err(ConfigError::new(
                self.key(key),
                format!("must not be negative, found {i}"),
            )),
            Some(other) => Err(self.wrong_type(key, "an integer", &other)),
        }
    }

    /// An integer of milliseconds.
    pub fn millis(&mut self, key: &str) -> Result<Option<Duration>, ConfigError> {
        Ok(self.u64(key)?.map(Duration::from_millis))
    }

    /// `true` or `false`; `None` when the key is absent.
    pub fn bool(&mut self, key: &str) -> Result<Option<bool>, ConfigError> {
        match self.get(key).cloned() {
            None => Ok(None),
            Some(Value::Boolean(b)) => Ok(Some(b)),
            Some(other) => Err(self.wrong_type(key, "true or false", &other)),
        }
    }

    /// An array of strings; `None` when the key is absent.
    pub fn strings(&mut self, key: &str) -> Result<Option<Vec<String>>, ConfigError> {
        let Some(value) = self.get(key).cloned() else {
            return Ok(None);
        };
        let Value::Array(items) = value else {
            return Err(self.wrong_type(key, "an array of strings", &value));
        };
        items
            .into_iter()
            .enumerate()
            .map(|(i, item)| match item {
                Value::String(s) => Ok(s),
                other => Err(self.wrong_type(&format!("{key}[{i}]"), "a string", &other)),
            })
            .collect::<Result<Vec<_>, _>>()
            .map(Some)
    }

    /// A string holding an `ip:port` address; `None` when the key is absent.
    pub fn socket_addr(&mut self, key: &str) -> Result<Option<SocketAddr>, ConfigError> {
        let Some(text) = self.string(key)? else {
            return Ok(None);
        };
        text.parse().map(Some).map_err(|e| {
            ConfigError::new(
                self.key(key),
                format!("{text:?} is not an ip:port address: {e}"),
            )
        })
    }

    /// A table of string values (`{ "token" = "subject" }`).
    pub fn string_map(
        &mut self,
        key: &str,
    ) -> Result<Option<BTreeMap<String, String>>, ConfigError> {
        let Some(value) = self.get(key).cloned() else {
            return Ok(None);
        };
        let Value::Table(table) = value else {
            return Err(self.wrong_type(key, "a table of strings", &value));
        };
        table
            .into_iter()
            .map(|(k, v)| match v {
                Value::String(s) => Ok((k, s)),
                other => Err(self.wrong_type(&format!("{key}.{k}"), "a string", &other)),
            })
            .collect::<Result<BTreeMap<_, _>, _>>()
            .map(Some)
    }

    /// A component: `"name"` or `{ name = "...", options... }`.
    fn component(&mut self, key: &str) -> Result<Option<(String, Options)>, ConfigError> {
        let Some(value) = self.get(key).cloned() else {
            return Ok(None);
        };
        component(self.key(key), value).map(Some)
    }

    /// A list of components.
    fn components(&mut self, key: &str) -> Result<Vec<(String, Options)>, ConfigError> {
        let Some(value) = self.get(key).cloned() else {
            return Ok(Vec::new());
        };
        let Value::Array(items) = value else {
            return Err(self.wrong_type(key, "an array of components", &value));
        };
        items
            .into_iter()
            .enumerate()
            .map(|(i, item)| component(self.key(&format!("{key}[{i}]")), item))
            .collect()
    }

    /// Fails on any key that was never read.
    pub fn finish(self) -> Result<(), ConfigError> {
        let mut unknown: Vec<&String> = self
            .table
            .keys()
            .filter(|k| !self.read.iter().any(|r| r == *k))
            .collect();
        unknown.sort();
        match unknown.first() {
            None => Ok(()),
            Some(key) => {
                let mut known: Vec<&str> = self.read.iter().map(String::as_str).collect();
                known.sort_unstable();
                known.dedup();
                Err(ConfigError::new(
                    self.key(key),
                    format!("unknown option (known here: {})", known.join(", ")),
                ))
            }
        }
    }
}

/// Runs a component's factory over its options. A misspelt option is the likelier cause
/// of a factory's complaint ("missing `token`" when `tokn` was given), so it wins.
fn make_with<T>(
    mut options: Options,
    make: impl FnOnce(&mut Options) -> Result<T, ConfigError>,
) -> Result<T, ConfigError> {
    let made = make(&mut options);
    options.finish()?;
    made
}

fn component(path: String, value: Value) -> Result<(String, Options), ConfigError> {
    match value {
        Value::String(name) => Ok((name, Options::new(path, Table::new()))),
        Value::Table(mut table) => match table.remove("name") {
            Some(Value::String(name)) => Ok((name, Options::new(path, table))),
            Some(other) => Err(ConfigError::new(
                format!("{path}.name"),
                format!("expected a string, found {}", other.type_str()),
            )),
            None => Err(ConfigError::new(
                format!("{path}.name"),
                "missing: say which component this is",
            )),
        },
        other => Err(ConfigError::new(
            path,
            format!(
                "expected a name or a table with `name`, found {}",
                other.type_str()
            ),
        )),
    }
}

/// A registry as configured: where clients discover and, if it can, where servers register.
#[derive(Clone)]
pub struct RegistryPlugin {
    /// Where clients watch a service's instances.
    pub discover: Arc<dyn Discover>,
    /// `None` for registries servers cannot write to (a static list).
    pub register: Option<Arc<dyn Register>>,
}

type ServerInterceptorFactory =
    Box<dyn Fn(&mut Options) -> Result<Arc<dyn ServerInterceptor>, ConfigError> + Send + Sync>;
type ClientInterceptorFactory =
    Box<dyn Fn(&mut Options) -> Result<Arc<dyn ClientInterceptor>, ConfigError> + Send + Sync>;
type RuntimeInterceptorFactory = fn(&mut Options) -> Result<RuntimeInterceptor, ConfigError>;
type RegistryFactory =
    Box<dyn Fn(&mut Options) -> Result<RegistryPlugin, ConfigError> + Send + Sync>;
type BalancerFactory =
    Box<dyn Fn(&mut Options) -> Result<Box<dyn Balancer + Send>, ConfigError> + Send + Sync>;

/// The components a configuration may name.
pub struct Plugins {
    server_interceptors: BTreeMap<String, ServerInterceptorFactory>,
    client_interceptors: BTreeMap<String, ClientInterceptorFactory>,
    /// Built-in client interceptors made on the client's runtime (retry, hedge).
    runtime_client_interceptors: BTreeMap<String, RuntimeInterceptorFactory>,
    registries: BTreeMap<String, RegistryFactory>,
    balancers: BTreeMap<String, BalancerFactory>,
    codecs: BTreeMap<String, u8>,
}

impl fmt::Debug for Plugins {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Plugins")
            .field("server_interceptors", &self.server_interceptors.keys())
            .field("client_interceptors", &self.client_interceptors.keys())
            .field("registries", &self.registries.keys())
            .field("balancers", &self.balancers.keys())
            .field("codecs", &self.codecs)
            .finish()
    }
}

fn unknown<T>(kind: &str, key: String, name: &str, known: &BTreeMap<String, T>) -> ConfigError {
    unknown_among(kind, key, name, known.keys())
}

/// An unknown name, and the `known` ones in order.
fn unknown_among<'a>(
    kind: &str,
    key: String,
    name: &str,
    known: impl Iterator<Item = &'a String>,
) -> ConfigError {
    let mut names: Vec<&str> = known.map(String::as_str).collect();
    names.sort_unstable();
    let mut message = format!("unknown {kind} {name:?} (known: {})", names.join(", "));
    if let Some(feature) = compiled_out(name) {
        let _ = write!(
            message,
            "; {name:?} is built in but this build leaves it out: enable gorpc-plugins' \
             `{feature}` cargo feature"
        );
    }
    ConfigError::new(key, message)
}

/// The cargo feature that brings the built-in component `name`, when this build lacks it.
fn compiled_out(name: &str) -> Option<&'static str> {
    let features: &[(&str, &str, bool)] = &[
        ("consul", "consul", cfg!(feature = "consul")),
        ("etcd", "etcd", cfg!(feature = "etcd")),
        ("otel", "otel", cfg!(feature = "otel")),
        ("auth", "auth", cfg!(feature = "auth")),
        ("metrics", "metrics", cfg!(feature = "metrics")),
        ("retry", "retry", cfg!(feature = "retry")),
        ("hedge", "hedge", cfg!(feature = "hedge")),
        ("http", "http", cfg!(feature = "http")),
        ("grpc", "grpc", cfg!(feature = "grpc")),
    ];
    features
        .iter()
        .find(|&&(component, _, built)| component == name && !built)
        .map(|&(_, feature, _)| feature)
}

impl Plugins {
    /// No components at all; see [`builtin`](Self::builtin).
    pub fn empty() -> Self {
        Plugins {
            server_interceptors: BTreeMap::new(),
            client_interceptors: BTreeMap::new(),
            runtime_client_interceptors: BTreeMap::new(),
            registries: BTreeMap::new(),
            balancers: BTreeMap::new(),
            codecs: BTreeMap::new(),
        }
    }

    /// Everything gorpc and the enabled features of gorpc-plugins provide.
    pub fn builtin() -> Self {
        let mut plugins = Plugins::empty()
            .codec("raw", gorpc::proto::codec::RAW)
            .codec("protobuf", gorpc::proto::codec::PROTOBUF)
            .codec("msgpack", gorpc::proto::codec::MSGPACK)
            .codec("json", gorpc::proto::codec::JSON)
            .server_interceptor("logging", |_| Ok(Arc::new(gorpc::interceptor::Logging)))
            .client_interceptor("logging", |_| Ok(Arc::new(gorpc::interceptor::Logging)))
            .registry("static", |options| {
                let service = options.required_string("service")?;
                let addresses = options
                    .strings("addresses")?
                    .ok_or_else(|| ConfigError::new(options.key("addresses"), "missing"))?;
                let refs: Vec<&str> = addresses.iter().map(String::as_str).collect();
                let list = StaticList::parse(&service, &refs)
                    .map_err(|e| ConfigError::new(options.key("addresses"), e.message()))?;
                Ok(RegistryPlugin {
                    discover: Arc::new(list),
                    register: None,
                })
            })
            .registry("dns", |options| {
                let names = options
                    .strings("names")?
                    .ok_or_else(|| ConfigError::new(options.key("names"), "missing"))?;
                let every = options
                    .millis("every_ms")?
                    .unwrap_or(Duration::from_secs(30));
                Ok(RegistryPlugin {
                    discover: Arc::new(Dns::new(names, every)),
                    register: None,
                })
            })
            .balancer("random", |o| Ok(Box::new(Random::new(seed(o)?))))
            .balancer("round_robin", |o| Ok(Box::new(RoundRobin::new(seed(o)?))))
            .balancer("weighted_round_robin", |_| {
                Ok(Box::new(WeightedRoundRobin::new()))
            })
            .balancer("consistent_hash", |o| {
                Ok(Box::new(ConsistentHash::new(seed(o)?)))
            })
            .balancer("p2c", |o| Ok(Box::new(PowerOfTwoChoices::new(seed(o)?))));
        #[cfg(feature = "auth")]
        {
            plugins = plugins
                .client_interceptor("auth", |o| {
                    let token = o.required_string("token")?;
                    Ok(Arc::new(crate::auth::BearerToken::new(token)))
                })
                .server_interceptor("auth", |o| {
                    let tokens = o.string_map("tokens")?.ok_or_else(|| {
                        ConfigError::new(o.key("tokens"), "missing: a table of token = subject")
                    })?;
                    let mut auth = crate::auth::BearerAuth::new(
                        move |token: &str, _method: &str| match tokens.get(token) {
                            Some(subject) => Ok(crate::auth::Identity::new(subject.clone())),
                            None => Err(Status::new(
                                gorpc::Code::Unauthenticated,
                                "unknown bearer token",
                            )),
                        },
                    );
                    for method in o.strings("allow_unauthenticated")?.unwrap_or_default() {
                        auth = auth.allow_unauthenticated(method);
                    }
                    Ok(Arc::new(auth))
                });
        }
        #[cfg(feature = "metrics")]
        {
            plugins = plugins
                .server_interceptor("metrics", |_| Ok(Arc::new(crate::metrics::Metrics::new())))
                .client_interceptor("metrics", |_| Ok(Arc::new(crate::metrics::Metrics::new())));
        }
        #[cfg(feature = "otel")]
        {
            plugins = plugins
                .server_interceptor("otel", |_| Ok(Arc::new(crate::otel::OtelServer::global())))
                .client_interceptor("otel", |_| Ok(Arc::new(crate::otel::OtelClient::global())));
        }
        #[cfg(feature = "retry")]
        {
            plugins
                .runtime_client_interceptors
                .insert("retry".to_owned(), retry_interceptor);
        }
        #[cfg(feature = "hedge")]
        {
            plugins
                .runtime_client_interceptors
                .insert("hedge".to_owned(), hedge_interceptor);
        }
        #[cfg(feature = "consul")]
        {
            plugins = plugins.registry("consul", consul_registry);
        }
        #[cfg(feature = "etcd")]
        {
            plugins = plugins.registry("etcd", etcd_registry);
        }
        plugins
    }

    /// Makes a server interceptor available under `name`; `make` reads its options.
    pub fn server_interceptor<F>(mut self, name: &str, make: F) -> Self
    where
        F: Fn(&mut Options) -> Result<Arc<dyn ServerInterceptor>, ConfigError>
            + Send
            + Sync
            + 'static,
    {
        self.server_interceptors
            .insert(name.to_owned(), Box::new(make));
        self
    }

    /// Makes a client interceptor available under `name`; `make` reads its options.
    pub fn client_interceptor<F>(mut self, name: &str, make: F) -> Self
    where
        F: Fn(&mut Options) -> Result<Arc<dyn ClientInterceptor>, ConfigError>
            + Send
            + Sync
            + 'static,
    {
        self.client_interceptors
            .insert(name.to_owned(), Box::new(make));
        self
    }

    /// Makes a registry available under `name`; `make` reads its options.
    pub fn registry<F>(mut self, name: &str, make: F) -> Self
    where
        F: Fn(&mut Options) -> Result<RegistryPlugin, ConfigError> + Send + Sync + 'static,
    {
        self.registries.insert(name.to_owned(), Box::new(make));
        self
    }

    /// Makes a balancer available under `name`; `make` reads its options.
    pub fn balancer<F>(mut self, name: &str, make: F) -> Self
    where
        F: Fn(&mut Options) -> Result<Box<dyn Balancer + Send>, ConfigError>
            + Send
            + Sync
            + 'static,
    {
        self.balancers.insert(name.to_owned(), Box::new(make));
        self
    }

    /// Names a codec id, for `client.codec`.
    pub fn codec(mut self, name: &str, id: u8) -> Self {
        self.codecs.insert(name.to_owned(), id);
        self
    }

    fn make_registry(&self, name: &str, options: Options) -> Result<RegistryPlugin, ConfigError> {
        let make = self
            .registries
            .get(name)
            .ok_or_else(|| unknown("registry", options.key("name"), name, &self.registries))?;
        make_with(options, make)
    }
}

fn seed(options: &mut Options) -> Result<u64, ConfigError> {
    Ok(options.u64("seed")?.unwrap_or_else(|| fastrand::u64(..)))
}

/// A client interceptor that needs the client's runtime, as configured.
enum RuntimeInterceptor {
    #[cfg(feature = "retry")]
    Retry {
        policy: gorpc::proto::policy::RetryPolicy,
        no_retry: Vec<String>,
    },
    #[cfg(feature = "hedge")]
    Hedge {
        hedging: gorpc::proto::policy::Hedging,
        methods: Vec<String>,
    },
}

impl RuntimeInterceptor {
    #[allow(unused_variables)] // a build without retry and hedge has no variant
    fn on<R: Runtime>(self, runtime: &R) -> Arc<dyn ClientInterceptor> {
        match self {
            #[cfg(feature = "retry")]
            RuntimeInterceptor::Retry { policy, no_retry } => {
                let once = policy.clone().with_max_attempts(1);
                let mut retry = crate::retry::Retry::new(runtime.clone(), policy);
                for method in no_retry {
                    retry = retry.method(method, once.clone());
                }
                Arc::new(retry)
            }
            #[cfg(feature = "hedge")]
            RuntimeInterceptor::Hedge { hedging, methods } => {
                let mut hedge = crate::hedge::Hedge::new(runtime.clone());
                for method in methods {
                    hedge = hedge.method(method, hedging);
                }
                Arc::new(hedge)
            }
        }
    }
}

/// `"unavailable"`, `"resource_exhausted"`, `"deadline exceeded"`...: a status code by the
/// name it prints with, spaces or underscores alike.
#[cfg(feature = "retry")]
fn code_named(name: &str) -> Option<gorpc::Code> {
    let name = name.trim().to_ascii_lowercase().replace('_', " ");
    (1..=16)
        .map(gorpc::Code::from_u32)
        .find(|code| code.as_str() == name)
}

// The factories read every option before judging any, so that a misspelt option, found
// by `make_with` after them, is not masked by a complaint about another one.

#[cfg(feature = "retry")]
fn retry_interceptor(o: &mut Options) -> Result<RuntimeInterceptor, ConfigError> {
    use gorpc::proto::policy::{Backoff, RetryPolicy};
    let seed = seed(o)?;
    let max_attempts = o.u64("max_attempts")?;
    let codes = o.strings("codes")?;
    let base = o.millis("backoff_base_ms")?;
    let max = o.millis("backoff_max_ms")?;
    let no_retry = o.strings("no_retry")?.unwrap_or_default();

    let mut policy = RetryPolicy::new(seed);
    if let Some(n) = max_attempts {
        policy = policy.with_max_attempts(at_least_one(o, n)?);
    }
    if let Some(names) = codes {
        let mut codes = Vec::with_capacity(names.len());
        for (i, name) in names.iter().enumerate() {
            codes.push(code_named(name).ok_or_else(|| {
                ConfigError::new(
                    o.key(&format!("codes[{i}]")),
                    format!(
                        "{name:?} is not a status code (e.g. \"unavailable\", \"resource_exhausted\")"
                    ),
                )
            })?);
        }
        policy = policy.with_retryable_codes(&codes);
    }
    let mut backoff = Backoff::default();
    backoff.base = base.unwrap_or(backoff.base);
    backoff.max = max.unwrap_or(backoff.max);
    if backoff.max < backoff.base {
        return Err(ConfigError::new(
            o.key("backoff_max_ms"),
            "must not be below backoff_base_ms",
        ));
    }
    Ok(RuntimeInterceptor::Retry {
        policy: policy.with_backoff(backoff),
        no_retry,
    })
}

#[cfg(feature = "hedge")]
fn hedge_interceptor(o: &mut Options) -> Result<RuntimeInterceptor, ConfigError> {
    let methods = o.strings("methods")?;
    let delay = o.millis("delay_ms")?;
    let max_attempts = o.u64("max_attempts")?;

    let methods = methods.ok_or_else(|| {
        ConfigError::new(
            o.key("methods"),
            "missing: the idempotent methods to hedge (full paths)",
        )
    })?;
    let delay = delay.ok_or_else(|| {
        ConfigError::new(
            o.key("delay_ms"),
            "missing: how long an attempt runs before the next one starts",
        )
    })?;
    let max_attempts = match max_attempts {
        None => 2,
        Some(n) => at_least_one(o, n)?,
    };
    Ok(RuntimeInterceptor::Hedge {
        hedging: gorpc::proto::policy::Hedging::new(max_attempts, delay),
        methods,
    })
}

/// `max_attempts` as a count that includes the first attempt.
#[cfg(any(feature = "retry", feature = "hedge"))]
fn at_least_one(o: &Options, n: u64) -> Result<u32, ConfigError> {
    if n == 0 {
        return Err(ConfigError::new(
            o.key("max_attempts"),
            "must be at least 1 (the first attempt counts)",
        ));
    }
    Ok(u32::try_from(n).unwrap_or(u32::MAX))
}

#[cfg(feature = "consul")]
fn consul_registry(o: &mut Options) -> Result<RegistryPlugin, ConfigError> {
    let url = o.required_string("url")?;
    let mut options = crate::consul::ConsulOptions {
        token: o.string("token")?,
        ..Default::default()
    };
    if let Some(ttl) = o.millis("ttl_ms")? {
        options.ttl = ttl;
    }
    if let Some(wait) = o.millis("wait_ms")? {
        options.wait = wait;
    }
    let consul = crate::consul::Consul::with_options(&url, options)
        .map_err(|e| ConfigError::new(o.key("url"), e.to_string()))?;
    Ok(RegistryPlugin {
        discover: Arc::new(consul.clone()),
        register: Some(Arc::new(consul)),
    })
}

#[cfg(feature = "etcd")]
fn etcd_registry(o: &mut Options) -> Result<RegistryPlugin, ConfigError> {
    let endpoints = o
        .strings("endpoints")?
        .ok_or_else(|| ConfigError::new(o.key("endpoints"), "missing"))?;
    let mut etcd = crate::etcd::Etcd::new(endpoints)
        .map_err(|e| ConfigError::new(o.key("endpoints"), e.to_string()))?;
    if let Some(prefix) = o.string("prefix")? {
        etcd = etcd
            .with_prefix(&prefix)
            .map_err(|e| ConfigError::new(o.key("prefix"), e.to_string()))?;
    }
    if let Some(ttl) = o.millis("lease_ttl_ms")? {
        etcd = etcd
            .with_lease_ttl(ttl)
            .map_err(|e| ConfigError::new(o.key("lease_ttl_ms"), e.to_string()))?;
    }
    Ok(RegistryPlugin {
        discover: Arc::new(etcd.clone()),
        register: Some(Arc::new(etcd)),
    })
}

/// A parsed configuration file: `[server]` and `[client]` sections.
#[derive(Clone, Debug)]
pub struct Config {
    server: Option<Table>,
    client: Option<Table>,
}

impl Config {
    /// Parses TOML; syntax errors carry toml's line and column.
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        let mut table: Table = text
            .parse()
            .map_err(|e: toml::de::Error| ConfigError::new("", e.to_string()))?;
        let mut section = |name: &str| match table.remove(name) {
            None => Ok(None),
            Some(Value::Table(t)) => Ok(Some(t)),
            Some(other) => Err(ConfigError::new(
                name,
                format!("expected a table, found {}", other.type_str()),
            )),
        };
        let (server, client) = (section("server")?, section("client")?);
        if let Some(key) = table.keys().next() {
            return Err(ConfigError::new(
                key.clone(),
                "unknown section (known: server, client)",
            ));
        }
        Ok(Config { server, client })
    }

    /// Reads and parses the TOML file at `path` ([`from_toml`](Self::from_toml)).
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self, ConfigError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError::new("", format!("cannot read {}: {e}", path.display())))?;
        Self::from_toml(&text)
    }

    /// The `[server]` section, checked and with its components made.
    pub fn server(&self, plugins: &Plugins) -> Result<ServerSettings, ConfigError> {
        let table = self
            .server
            .clone()
            .ok_or_else(|| ConfigError::new("server", "missing section"))?;
        let mut o = Options::new("server".into(), table);
        let listen = o
            .socket_addr("listen")?
            .ok_or_else(|| ConfigError::new(o.key("listen"), "missing"))?;
        let transport = o.string("transport")?.unwrap_or_else(|| "tcp".into());
        let http = match transport.as_str() {
            "tcp" => false,
            "tcp+http" if cfg!(feature = "http") => true,
            other => {
                return Err(ConfigError::new(
                    o.key("transport"),
                    format!(
                        "unknown transport {other:?} (known: {SERVER_TRANSPORTS}){}",
                        left_out(other, "tcp+http", "http")
                    ),
                ))
            }
        };
        let mut standard = |key: &str| -> Result<bool, ConfigError> {
            let on = o.bool(key)?.unwrap_or(false);
            if on && !cfg!(feature = "grpc") {
                return Err(ConfigError::new(
                    o.key(key),
                    "gRPC's standard services are built in but this build leaves them out: \
                     enable gorpc-plugins' `grpc` cargo feature",
                ));
            }
            Ok(on)
        };
        let health = standard("health")?;
        let reflection = standard("reflection")?;
        let max_connections = o.u64("max_connections")?.map(|n| n as usize);
        let mut interceptors = Vec::new();
        for (name, options) in o.components("interceptors")? {
            let make = plugins.server_interceptors.get(&name).ok_or_else(|| {
                unknown(
                    "server interceptor",
                    options.key("name"),
                    &name,
                    &plugins.server_interceptors,
                )
            })?;
            interceptors.push(make_with(options, make)?);
        }
        let service = o.string("service")?;
        let advertise = o.socket_addr("advertise")?;
        let weight = o.u64("weight")?;
        let registration = match o.component("registry")? {
            None => None,
            Some((name, options)) => {
                let key = options.key("name");
                let registry = plugins.make_registry(&name, options)?;
                let register = registry.register.ok_or_else(|| {
                    ConfigError::new(key, format!("registry {name:?} cannot register servers"))
                })?;
                let service = service.clone().ok_or_else(|| {
                    ConfigError::new(o.key("service"), "missing: the name to register under")
                })?;
                let mut registration = Registration::new(service);
                if let Some(addr) = advertise {
                    registration = registration.with_addr(addr);
                }
                if let Some(w) = weight {
                    registration = registration.with_weight(w.min(u64::from(u32::MAX)) as u32);
                }
                Some((register, registration))
            }
        };
        o.finish()?;
        Ok(ServerSettings {
            listen,
            http,
            health,
            reflection,
            max_connections,
            interceptors,
            registration,
        })
    }

    /// The `[client]` section, checked and with its components made.
    pub fn client(&self, plugins: &Plugins) -> Result<ClientSettings, ConfigError> {
        let table = self
            .client
            .clone()
            .ok_or_else(|| ConfigError::new("client", "missing section"))?;
        let mut o = Options::new("client".into(), table);
        let address = o.socket_addr("address")?;
        let service = o.string("service")?;
        let registry = o.component("registry")?;
        let target = match (address, service, registry) {
            (Some(addr), None, None) => Target::Endpoint(addr),
            (None, Some(service), Some((name, options))) => {
                let registry = plugins.make_registry(&name, options)?;
                Target::Service(registry.discover, service)
            }
            (Some(_), Some(_), _) => {
                return Err(ConfigError::new(
                    o.key("address"),
                    "set either `address` or `service` (with `registry`), not both",
                ))
            }
            (None, Some(_), None) => {
                return Err(ConfigError::new(
                    o.key("registry"),
                    "missing: where to discover `service`",
                ))
            }
            (Some(_), None, Some(_)) => {
                return Err(ConfigError::new(
                    o.key("registry"),
                    "a registry needs `service`, not `address`",
                ))
            }
            (None, None, _) => {
                return Err(ConfigError::new(
                    o.key("address"),
                    "missing: set `address`, or `service` and `registry`",
                ))
            }
        };
        let transport = match o.string("transport")?.as_deref() {
            None | Some("tcp") => ClientTransport::Tcp,
            #[cfg(feature = "http")]
            Some("http") => ClientTransport::Http,
            #[cfg(feature = "grpc")]
            Some("grpc") => ClientTransport::Grpc,
            Some("udp") => ClientTransport::Udp,
            Some(other) => {
                let left_out = left_out(other, "http", "http") + &left_out(other, "grpc", "grpc");
                return Err(ConfigError::new(
                    o.key("transport"),
                    format!("unknown transport {other:?} (known: {CLIENT_TRANSPORTS}){left_out}"),
                ));
            }
        };
        if !transport.balances() && !matches!(target, Target::Endpoint(_)) {
            return Err(ConfigError::new(
                o.key("transport"),
                "discovery and balancing run over tcp or grpc; http and udp clients take \
                 `address`",
            ));
        }
        let idempotent = o.strings("idempotent_methods")?;
        if idempotent.is_some() && transport != ClientTransport::Udp {
            return Err(ConfigError::new(
                o.key("idempotent_methods"),
                "only the udp transport resends calls",
            ));
        }
        let codec = match o.string("codec")? {
            None => gorpc::proto::codec::PROTOBUF,
            Some(name) => *plugins
                .codecs
                .get(&name)
                .ok_or_else(|| unknown("codec", o.key("codec"), &name, &plugins.codecs))?,
        };
        let mut config = ClientConfig::default();
        if let Some(t) = o.millis("timeout_ms")? {
            config.default_timeout = Some(t);
        }
        if let Some(t) = o.millis("connect_timeout_ms")? {
            config.pool.connection.connect_timeout = t;
        }
        if let Some(n) = o.u64("connections")? {
            config.pool.size = (n as usize).max(1);
        }
        let balancer = match o.component("balancer")? {
            None => None,
            Some((name, options)) => {
                let make = plugins.balancers.get(&name).ok_or_else(|| {
                    unknown("balancer", options.key("name"), &name, &plugins.balancers)
                })?;
                Some(make_with(options, make)?)
            }
        };
        if balancer.is_some() && matches!(target, Target::Endpoint(_)) {
            return Err(ConfigError::new(
                o.key("balancer"),
                "a balancer needs `service` and `registry`; one `address` has nothing to balance",
            ));
        }
        let mut interceptors = Vec::new();
        for (name, options) in o.components("interceptors")? {
            if let Some(make) = plugins.client_interceptors.get(&name) {
                interceptors.push(ClientLayer::Made(make_with(options, make)?));
            } else if let Some(make) = plugins.runtime_client_interceptors.get(&name) {
                interceptors.push(ClientLayer::OnRuntime(make_with(options, make)?));
            } else {
                let known = plugins.client_interceptors.keys();
                return Err(unknown_among(
                    "client interceptor",
                    options.key("name"),
                    &name,
                    known.chain(plugins.runtime_client_interceptors.keys()),
                ));
            }
        }
        o.finish()?;
        Ok(ClientSettings {
            target,
            transport,
            idempotent_methods: idempotent.unwrap_or_default(),
            codec,
            config,
            balancer,
            interceptors,
        })
    }
}

const SERVER_TRANSPORTS: &str = if cfg!(feature = "http") {
    "tcp, tcp+http"
} else {
    "tcp"
};
const CLIENT_TRANSPORTS: &str = if cfg!(feature = "grpc") {
    "tcp, http, grpc, udp"
} else if cfg!(feature = "http") {
    "tcp, http, udp"
} else {
    "tcp, udp"
};

/// `"; "name" is built in but this build leaves it out..."` when `given` is the transport
/// `name` and gorpc-plugins' `feature` is off; nothing otherwise.
fn left_out(given: &str, name: &str, feature: &str) -> String {
    match compiled_out(feature) {
        Some(feature) if given == name => format!(
            "; {name:?} is built in but this build leaves it out: enable gorpc-plugins' \
             `{feature}` cargo feature"
        ),
        _ => String::new(),
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ClientTransport {
    Tcp,
    #[cfg(feature = "http")]
    Http,
    /// gRPC over HTTP/2, to one address or to discovered instances.
    #[cfg(feature = "grpc")]
    Grpc,
    Udp,
}

impl ClientTransport {
    /// Whether a client of this transport can call a discovered service, balanced.
    fn balances(self) -> bool {
        match self {
            ClientTransport::Tcp => true,
            #[cfg(feature = "grpc")]
            ClientTransport::Grpc => true,
            #[cfg(feature = "http")]
            ClientTransport::Http => false,
            ClientTransport::Udp => false,
        }
    }
}

/// A configured server, ready to be given its service.
pub struct ServerSettings {
    /// The address to bind (`server.listen`).
    pub listen: SocketAddr,
    /// Also answer HTTP/1.1, and gRPC with the `grpc` feature, on the port (`transport =
    /// "tcp+http"`).
    pub http: bool,
    /// Serve `grpc.health.v1.Health` beside the service ([`Server::health`]).
    pub health: bool,
    /// Serve gRPC server reflection beside the service ([`Server::reflection`]).
    pub reflection: bool,
    max_connections: Option<usize>,
    interceptors: Vec<Arc<dyn ServerInterceptor>>,
    registration: Option<(Arc<dyn Register>, Registration)>,
}

impl fmt::Debug for ServerSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerSettings")
            .field("listen", &self.listen)
            .field("http", &self.http)
            .field("health", &self.health)
            .field("reflection", &self.reflection)
            .field("interceptors", &self.interceptors.len())
            .field("registration", &self.registration.as_ref().map(|r| &r.1))
            .finish()
    }
}

impl ServerSettings {
    /// A server of `service` with these settings; `bind(settings.listen)` starts it.
    pub fn server<R: Runtime>(&self, runtime: R, service: impl Service) -> Server<R> {
        let mut server = Server::new(runtime, service);
        if let Some(n) = self.max_connections {
            server = server.max_connections(n);
        }
        for interceptor in &self.interceptors {
            server = server.interceptor(SharedServerInterceptor(interceptor.clone()));
        }
        if let Some((registry, registration)) = &self.registration {
            server = server.register(registry.clone(), registration.clone());
        }
        #[cfg(feature = "http")]
        if self.http {
            server = server.http();
        }
        #[cfg(feature = "grpc")]
        {
            if self.health {
                server = server.health();
            }
            if self.reflection {
                server = server.reflection();
            }
        }
        server
    }
}

enum Target {
    Endpoint(SocketAddr),
    Service(Arc<dyn Discover>, String),
}

/// A configured client.
pub struct ClientSettings {
    target: Target,
    transport: ClientTransport,
    idempotent_methods: Vec<String>,
    /// The codec named by `codec` (default protobuf), for raw and dynamic calls.
    pub codec: u8,
    config: ClientConfig,
    balancer: Option<Box<dyn Balancer + Send>>,
    interceptors: Vec<ClientLayer>,
}

/// A configured client interceptor, in the order the configuration lists them.
enum ClientLayer {
    Made(Arc<dyn ClientInterceptor>),
    /// Made by `build`, on the client's runtime.
    OnRuntime(RuntimeInterceptor),
}

impl fmt::Debug for ClientSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientSettings")
            .field("codec", &self.codec)
            .field("config", &self.config)
            .field("interceptors", &self.interceptors.len())
            .finish_non_exhaustive()
    }
}

impl ClientSettings {
    /// The client these settings describe, on `runtime` (a udp client binds its socket
    /// here). Settings make one client: the balancer they hold moves into it.
    pub async fn build<R: Runtime>(self, runtime: R) -> Result<Client, Status> {
        let interceptors: Vec<Arc<dyn ClientInterceptor>> = self
            .interceptors
            .into_iter()
            .map(|layer| match layer {
                ClientLayer::Made(interceptor) => interceptor,
                ClientLayer::OnRuntime(interceptor) => interceptor.on(&runtime),
            })
            .collect();
        let mut client = match (self.transport, self.target) {
            (ClientTransport::Tcp, target) => built(
                runtime,
                self.config,
                target,
                self.balancer,
                InstanceProtocol::Binary,
            )?,
            #[cfg(feature = "grpc")]
            (ClientTransport::Grpc, target) => built(
                runtime,
                self.config,
                target,
                self.balancer,
                InstanceProtocol::Grpc,
            )?,
            #[cfg(feature = "http")]
            (ClientTransport::Http, Target::Endpoint(addr)) => {
                Client::http(runtime, addr, self.config)
            }
            (ClientTransport::Udp, Target::Endpoint(addr)) => {
                let mut config = gorpc::udp::UdpClientConfig::default();
                if let Some(timeout) = self.config.default_timeout {
                    config.default_timeout = timeout;
                }
                config
                    .idempotent_methods
                    .extend(self.idempotent_methods.into_iter().map(Into::into));
                Client::udp(runtime, addr, config).await?
            }
            (_, Target::Service(..)) => {
                unreachable!("Config::client allows discovery only over tcp and grpc")
            }
        };
        for interceptor in interceptors {
            client = client.with_interceptor(SharedClientInterceptor(interceptor));
        }
        Ok(client)
    }
}

/// A client of one address or of a discovered service, through [`ClientBuilder`], calling
/// in `protocol`.
fn built<R: Runtime>(
    runtime: R,
    config: ClientConfig,
    target: Target,
    balancer: Option<Box<dyn Balancer + Send>>,
    protocol: InstanceProtocol,
) -> Result<Client, Status> {
    let mut builder: ClientBuilder<R> = Client::builder(runtime).config(config);
    builder = match target {
        Target::Endpoint(addr) => builder.endpoint(addr),
        Target::Service(discover, service) => builder.discover(discover, &service),
    };
    if let Some(balancer) = balancer {
        builder = builder.balance(balancer);
    }
    builder.protocol(protocol).build()
}

/// A configured interceptor, shared with the settings it came from.
struct SharedServerInterceptor(Arc<dyn ServerInterceptor>);

impl ServerInterceptor for SharedServerInterceptor {
    fn intercept(&self, request: ServerRequest, next: Next) -> BoxFuture<'static, ServerReply> {
        self.0.intercept(request, next)
    }
}

struct SharedClientInterceptor(Arc<dyn ClientInterceptor>);

impl ClientInterceptor for SharedClientInterceptor {
    fn intercept(
        &self,
        call: OutgoingCall,
        next: ClientNext,
    ) -> BoxFuture<'static, Result<RawResponse, Status>> {
        self.0.intercept(call, next)
    }

    fn intercept_stream(&self, call: &mut OutgoingCall) -> Result<(), Status> {
        self.0.intercept_stream(call)
    }
}
