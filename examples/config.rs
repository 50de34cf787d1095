//! A server and a client set up from a TOML file (examples/config/gorpc.toml): transport,
//! codec, registry, balancer and interceptors are all named there. The example adds one
//! plugin of its own, an in-process registry called `in-process`, the way an application
//! adds its own components; then it shows a mistake being refused with the key that is
//! wrong.
//!
//!     cargo run -p gorpc-examples --example config [path/to/gorpc.toml]

use std::sync::Arc;

use gorpc_plugins::config::{Config, Plugins, RegistryPlugin};
use gorpc_tokio::discovery::MemoryRegistry;
use gorpc_tokio::{Router, Tokio};
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize)]
struct Hello {
    name: String,
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    gorpc_examples::init_logging();
    let path = std::env::args()
        .nth(1)
        .unwrap_or_else(|| concat!(env!("CARGO_MANIFEST_DIR"), "/config/gorpc.toml").into());
    let registry = MemoryRegistry::new();
    let shared = registry.clone();
    let plugins = Plugins::builtin().registry("in-process", move |_options| {
        Ok(RegistryPlugin {
            discover: Arc::new(shared.clone()),
            register: Some(Arc::new(shared.clone())),
        })
    });

    let config = Config::from_file(&path)?;
    let server_settings = config.server(&plugins)?;
    let router = Router::new().msgpack("/greeter.Greeter/Hello", |hello: Hello| async move {
        Ok::<_, gorpc_tokio::Status>(format!("hello, {}", hello.name))
    });
    let server = server_settings
        .server(Tokio::current(), router)
        .bind(server_settings.listen)
        .await?;
    println!(
        "server on {} registered as {:?}",
        server.local_addr(),
        registry.instances("greeter")
    );

    let client = config.client(&plugins)?.build(Tokio::current()).await?;
    let answer: String = client
        .call(
            "/greeter.Greeter/Hello",
            &Hello {
                name: "config".into(),
            },
        )
        .await?;
    println!("answer: {answer}");

    let typo =
        "[client]\nservice = \"greeter\"\nregistry = \"in-process\"\nbalancer = \"round_robbin\"";
    let err = Config::from_toml(typo)?
        .client(&plugins)
        .expect_err("a typo is refused");
    println!("a typo is refused at start-up: {err}");

    server.shutdown(std::time::Duration::from_secs(1)).await;
    Ok(())
}
