//! Implementations of the example services, shared by the examples and their tests.

use std::collections::HashMap;

use futures::StreamExt;
use gorpc::stream::{RequestStream, ResponseSink};
use gorpc::{Request, Response, Status};

use crate::helloworld::{Greeter, HelloAllReply, HelloAllRequest, HelloReply, HelloRequest};
use crate::routeguide::{Feature, Point, Rectangle, RouteGuide, RouteNote, RouteSummary};

/// Greets by name; an empty name is INVALID_ARGUMENT.
#[derive(Clone, Copy, Debug, Default)]
pub struct Hello;

impl Greeter for Hello {
    async fn say_hello(
        &self,
        request: Request<HelloRequest>,
    ) -> Result<Response<HelloReply>, Status> {
        let name = request.message.name;
        if name.is_empty() {
            return Err(Status::invalid_argument("name must not be empty"));
        }
        Ok(Response::new(HelloReply {
            message: format!("Hello, {name}!"),
        }))
    }

    async fn say_hello_to_all(
        &self,
        request: Request<HelloAllRequest>,
    ) -> Result<Response<HelloAllReply>, Status> {
        let messages = request
            .message
            .names
            .iter()
            .map(|n| format!("Hello, {n}!"))
            .collect();
        Ok(Response::new(HelloAllReply { messages }))
    }
}

/// The map is a grid of features, one at each point with 0 <= latitude < 100 and
/// 0 <= longitude < 50: 5,000 features, over 64 KiB in all, so listing the whole map crosses
/// the stream's flow-control window.
pub const LATITUDES: i32 = 100;
pub const LONGITUDES: i32 = 50;

pub fn point(latitude: i32, longitude: i32) -> Point {
    Point {
        latitude,
        longitude,
    }
}

pub fn feature_name(p: &Point) -> String {
    format!("feature at {},{}", p.latitude, p.longitude)
}

pub fn on_map(p: &Point) -> bool {
    (0..LATITUDES).contains(&p.latitude) && (0..LONGITUDES).contains(&p.longitude)
}

/// The route guide: features on a grid, routes summarised, notes left at points.
#[derive(Clone, Copy, Debug, Default)]
pub struct Guide;

impl RouteGuide for Guide {
    async fn get_feature(&self, request: Request<Point>) -> Result<Response<Feature>, Status> {
        let p = request.message;
        // As in gRPC's route guide: no feature is a feature without a name.
        let name = if on_map(&p) {
            feature_name(&p)
        } else {
            String::new()
        };
        let mut rsp = Response::new(Feature {
            name,
            location: Some(p),
        });
        if let Some(caller) = request.metadata.get_str("x-caller") {
            rsp.metadata.insert("x-seen-caller", caller.to_owned());
        }
        Ok(rsp)
    }

    async fn list_features(
        &self,
        request: Request<Rectangle>,
        mut sink: ResponseSink<Feature>,
    ) -> Result<(), Status> {
        let (Some(lo), Some(hi)) = (request.message.lo, request.message.hi) else {
            return Err(Status::invalid_argument("a rectangle needs both corners"));
        };
        for latitude in lo.latitude.max(0)..=hi.latitude.min(LATITUDES - 1) {
            for longitude in lo.longitude.max(0)..=hi.longitude.min(LONGITUDES - 1) {
                let location = point(latitude, longitude);
                let feature = Feature {
                    name: feature_name(&location),
                    location: Some(location),
                };
                sink.send(&feature).await?;
            }
        }
        // A latitude past the map's edge ends the stream with an error after the features.
        if hi.latitude >= LATITUDES {
            return Err(Status::out_of_range("the map ends at latitude 99"));
        }
        Ok(())
    }

    async fn record_route(
        &self,
        request: Request<RequestStream<Point>>,
    ) -> Result<Response<RouteSummary>, Status> {
        let mut points = request.message;
        let mut summary = RouteSummary::default();
        let mut previous: Option<Point> = None;
        while let Some(p) = points.next().await {
            let p = p?;
            summary.point_count += 1;
            summary.feature_count += i32::from(on_map(&p));
            if let Some(prev) = previous {
                summary.distance += i64::from((p.latitude - prev.latitude).abs())
                    + i64::from((p.longitude - prev.longitude).abs());
            }
            previous = Some(p);
        }
        Ok(Response::new(summary))
    }

    async fn route_chat(
        &self,
        request: Request<RequestStream<RouteNote>>,
        mut sink: ResponseSink<RouteNote>,
    ) -> Result<(), Status> {
        let mut notes = request.message;
        // Notes of this call only, so that concurrent calls cannot see each other's.
        let mut left: HashMap<(i32, i32), Vec<RouteNote>> = HashMap::new();
        while let Some(note) = notes.next().await {
            let note = note?;
            let at = note
                .location
                .as_ref()
                .map_or((0, 0), |p| (p.latitude, p.longitude));
            let earlier = left.entry(at).or_default();
            for previous in earlier.iter() {
                sink.send(previous).await?;
            }
            earlier.push(note);
        }
        Ok(())
    }
}
