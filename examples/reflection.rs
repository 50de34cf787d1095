//! The two codegen-free styles on smol, msgpack on the wire and no .proto: plain closures
//! routed by path, and a `#[gorpc::service]` trait with its generated server and client.
//! Both are called by path with `Client::call`, whose wire format is the same.
//!
//! cargo run -p gorpc-examples --example reflection

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

use gorpc_smol::{Router, Status};
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, Debug)]
struct Order {
    item: String,
    quantity: u32,
}

#[derive(Serialize, Deserialize, Debug)]
struct Receipt {
    item: String,
    total_cents: u64,
}

/// A shop's stock. Method paths are "/shop.Inventory/{method}"; one argument travels as
/// itself, several as a tuple.
#[gorpc::service(package = "shop")]
trait Inventory {
    /// The items on the shelf, with their counts.
    async fn list(&self) -> Result<BTreeMap<String, u32>, Status>;

    /// Takes `quantity` of `item` off the shelf; returns what is left.
    async fn take(&self, item: String, quantity: u32) -> Result<u32, Status>;
}

struct Shelf {
    stock: Mutex<BTreeMap<String, u32>>,
}

impl Inventory for Shelf {
    async fn list(&self) -> Result<BTreeMap<String, u32>, Status> {
        Ok(self.stock.lock().unwrap().clone())
    }

    async fn take(&self, item: String, quantity: u32) -> Result<u32, Status> {
        let mut stock = self.stock.lock().unwrap();
        let count = stock
            .get_mut(&item)
            .ok_or_else(|| Status::not_found(format!("no {item} here")))?;
        *count = count
            .checked_sub(quantity)
            .ok_or_else(|| Status::failed_precondition(format!("only {count} {item} left")))?;
        Ok(*count)
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    gorpc_examples::init_logging();
    smol::block_on(async {
        let shelf = Shelf {
            stock: Mutex::new(BTreeMap::from([("apple".into(), 5), ("pear".into(), 2)])),
        };
        let router = Router::new()
            // Style 1: a closure of serde types, routed by path.
            .msgpack("/shop.Till/Price", |order: Order| async move {
                let cents = match order.item.as_str() {
                    "apple" => 40,
                    "pear" => 55,
                    other => return Err(Status::not_found(format!("no price for {other}"))),
                };
                Ok(Receipt {
                    total_cents: cents * u64::from(order.quantity),
                    item: order.item,
                })
            })
            // Style 2: a #[gorpc::service] trait, all its methods at once.
            .add_service(InventoryServer::new(shelf));
        let mut methods: Vec<_> = router.methods().collect();
        methods.sort_unstable();
        println!("serving {methods:?}");

        let server = gorpc_smol::serve("127.0.0.1:0".parse()?, router).await?;
        let client = gorpc_smol::connect(server.local_addr()).await?;
        println!("server on {}", server.local_addr());

        // The closure route, by path.
        let order = Order {
            item: "apple".into(),
            quantity: 3,
        };
        let receipt = client
            .call::<Order, Receipt>("/shop.Till/Price", &order)
            .await?;
        println!("Price({order:?}) -> {receipt:?}");

        // The trait, through its generated client...
        let inventory = InventoryClient::new(client.clone());
        println!("list() -> {:?}", inventory.list().await?);
        println!(
            "take(apple, 3) -> {} left",
            inventory.take("apple".into(), 3).await?
        );
        let err = inventory.take("pear".into(), 9).await.unwrap_err();
        println!("take(pear, 9) -> error {err}");

        // ...and by path, the arguments as a tuple: the same method, the same wire format.
        let left: u32 = client
            .call("/shop.Inventory/take", &("pear".to_string(), 1u32))
            .await?;
        println!("call(\"/shop.Inventory/take\", (pear, 1)) -> {left} left");
        let err = client
            .call::<(), u32>("/shop.Inventory/restock", &())
            .await
            .unwrap_err();
        println!("call(\"/shop.Inventory/restock\") -> error {err}");

        let outcome = server.shutdown(Duration::from_secs(1)).await;
        println!("server shut down: {outcome:?}");
        Ok(())
    })
}
