"""Python's grpcio against a gorpc server: one line per check, "ok NAME" or "FAIL NAME: why",
and a non-zero exit status if any check failed.

Run by examples/tests/grpc_python.rs, which makes the venv, generates the stubs from
examples/proto into a directory on PYTHONPATH and starts the server:

    interop_client.py --addr HOST:PORT --gzip-addr HOST:PORT CHECK...

--gzip-addr is a server that gzips its answers. The checks are named below (CHECKS); the
test's routes they call are described in tests/interop/mod.rs.
"""

import argparse
import queue
import sys
import time
import traceback

import grpc

import helloworld_pb2
import helloworld_pb2_grpc
import route_guide_pb2
import route_guide_pb2_grpc

# Every call gets a deadline, so that a server that hangs fails the check instead of the run.
TIMEOUT = 20

# The Guide's map (examples/src/services.rs): a feature at each point of a 100 x 50 grid.
LATITUDES = 100
LONGITUDES = 50

# Bytes no text header can carry, for the -bin metadata checks (the Rust side expects them).
BLOB = bytes([0x00, 0xFF, 0xC3, 0xA9, 0x80, 0x0A, 0x7F])


class CheckFailed(Exception):
    pass


def expect(condition, what):
    if not condition:
        raise CheckFailed(what)


def expect_eq(got, want, what):
    if got != want:
        raise CheckFailed(f"{what}: expected {want!r}, got {got!r}")


def expect_status(error, code, what, details=None):
    expect(isinstance(error, grpc.RpcError), f"{what}: not an RpcError: {error!r}")
    expect_eq(error.code(), code, f"{what}: status code")
    if details is not None:
        expect_eq(error.details(), details, f"{what}: status message")


def point(latitude, longitude):
    return route_guide_pb2.Point(latitude=latitude, longitude=longitude)


def note(latitude, longitude, message):
    return route_guide_pb2.RouteNote(location=point(latitude, longitude), message=message)


def feature_name(p):
    return f"feature at {p.latitude},{p.longitude}"


def raw_unary(channel, method):
    """A method the stubs do not know: bytes in, bytes out."""
    return channel.unary_unary(method, _registered_method=False)


def check_unary(channel, _gzip_channel):
    guide = route_guide_pb2_grpc.RouteGuideStub(channel)
    feature = guide.GetFeature(point(3, 4), timeout=TIMEOUT)
    expect_eq(feature.name, "feature at 3,4", "GetFeature name")
    expect_eq(feature.location, point(3, 4), "GetFeature location")
    off_map = guide.GetFeature(point(-1, 4), timeout=TIMEOUT)
    expect_eq(off_map.name, "", "GetFeature off the map")

    greeter = helloworld_pb2_grpc.GreeterStub(channel)
    reply = greeter.SayHello(helloworld_pb2.HelloRequest(name="grpcio"), timeout=TIMEOUT)
    expect_eq(reply.message, "Hello, grpcio!", "SayHello")
    # 2 MB each way: past HTTP/2's initial window and gorpc's stream window of 1 MiB.
    name = "x" * 2_000_000
    reply = greeter.SayHello(helloworld_pb2.HelloRequest(name=name), timeout=TIMEOUT)
    expect_eq(reply.message, f"Hello, {name}!", "SayHello of 2 MB")
    everyone = greeter.SayHelloToAll(
        helloworld_pb2.HelloAllRequest(names=["a", "b"]), timeout=TIMEOUT
    )
    expect_eq(list(everyone.messages), ["Hello, a!", "Hello, b!"], "SayHelloToAll")
    try:
        greeter.SayHello(helloworld_pb2.HelloRequest(name=""), timeout=TIMEOUT)
        raise CheckFailed("SayHello with no name succeeded")
    except grpc.RpcError as e:
        expect_status(e, grpc.StatusCode.INVALID_ARGUMENT, "SayHello('')", "name must not be empty")


def check_server_streaming(channel, _gzip_channel):
    guide = route_guide_pb2_grpc.RouteGuideStub(channel)
    whole_map = route_guide_pb2.Rectangle(
        lo=point(0, 0), hi=point(LATITUDES - 1, LONGITUDES - 1)
    )
    count = 0
    for feature in guide.ListFeatures(whole_map, timeout=TIMEOUT):
        expected = point(count // LONGITUDES, count % LONGITUDES)
        expect_eq(feature.location, expected, f"feature {count} out of order")
        expect_eq(feature.name, feature_name(expected), f"feature {count} name")
        count += 1
    expect_eq(count, LATITUDES * LONGITUDES, "features of the whole map")

    # Past the map's edge: the four features inside it, then OUT_OF_RANGE.
    past_the_edge = route_guide_pb2.Rectangle(lo=point(98, 0), hi=point(200, 1))
    got = []
    try:
        for feature in guide.ListFeatures(past_the_edge, timeout=TIMEOUT):
            got.append(feature.location)
        raise CheckFailed("ListFeatures past the edge ended with OK")
    except grpc.RpcError as e:
        expect_status(e, grpc.StatusCode.OUT_OF_RANGE, "past the edge", "the map ends at latitude 99")
    expect_eq(got, [point(98, 0), point(98, 1), point(99, 0), point(99, 1)], "features before the error")


def route_points(n):
    # Along the diagonal, and off the map every tenth point.
    return [point(-5, -5) if i % 10 == 9 else point(i % 50, i % 50) for i in range(n)]


def route_summary(points):
    distance = sum(
        abs(b.latitude - a.latitude) + abs(b.longitude - a.longitude)
        for a, b in zip(points, points[1:])
    )
    on_map = sum(
        1 for p in points if 0 <= p.latitude < LATITUDES and 0 <= p.longitude < LONGITUDES
    )
    return route_guide_pb2.RouteSummary(
        point_count=len(points), feature_count=on_map, distance=distance
    )


def check_client_streaming(channel, _gzip_channel):
    guide = route_guide_pb2_grpc.RouteGuideStub(channel)
    # grpcio sends a message in about 0.3 ms: 2,000 of them keep the check short. (The
    # unary check's 2 MB crosses the flow-control windows.)
    points = route_points(2_000)
    summary = guide.RecordRoute(iter(points), timeout=TIMEOUT)
    expect_eq(summary, route_summary(points), "RecordRoute summary")
    empty = guide.RecordRoute(iter([]), timeout=TIMEOUT)
    expect_eq(empty, route_guide_pb2.RouteSummary(), "RecordRoute of no points")


def check_bidi(channel, _gzip_channel):
    guide = route_guide_pb2_grpc.RouteGuideStub(channel)
    outgoing = queue.Queue()

    def requests():
        while True:
            item = outgoing.get()
            if item is None:
                return
            yield item

    replies = guide.RouteChat(requests(), timeout=TIMEOUT)
    # In lockstep: a note comes back as soon as a later one arrives at its point, while the
    # call stays open.
    outgoing.put(note(1, 1, "first"))
    outgoing.put(note(2, 2, "elsewhere"))
    outgoing.put(note(1, 1, "second"))
    expect_eq(next(replies), note(1, 1, "first"), "reply to the second note at 1,1")
    outgoing.put(note(1, 1, "third"))
    expect_eq(next(replies), note(1, 1, "first"), "first reply to the third note at 1,1")
    expect_eq(next(replies), note(1, 1, "second"), "second reply to the third note at 1,1")
    outgoing.put(note(2, 2, "again"))
    outgoing.put(None)
    expect_eq(list(replies), [note(2, 2, "elsewhere")], "replies after the half-close")
    expect_eq(replies.code(), grpc.StatusCode.OK, "RouteChat status")


def check_deadline(channel, _gzip_channel):
    # /interop.Test/Deadline answers a Point whose latitude is the milliseconds the handler
    # had left: grpcio's timeout is the handler's deadline. (gRPC core rounds the
    # grpc-timeout it sends up: 20 s arrive as a little over 20 s.)
    deadline = raw_unary(channel, "/interop.Test/Deadline")
    left = route_guide_pb2.Point.FromString(deadline(b"", timeout=TIMEOUT)).latitude
    expect(1000 < left <= TIMEOUT * 1100, f"{left} ms left of {TIMEOUT} s")
    none = route_guide_pb2.Point.FromString(deadline(b"")).latitude
    expect_eq(none, -1, "the deadline of a call without a timeout")

    # /interop.Test/Stall never answers: the deadline ends the call, and the server must
    # drop the handler (the Rust test checks that).
    stall = raw_unary(channel, "/interop.Test/Stall")
    try:
        stall(b"", timeout=0.5)
        raise CheckFailed("Stall answered")
    except grpc.RpcError as e:
        expect_status(e, grpc.StatusCode.DEADLINE_EXCEEDED, "Stall")


def check_not_found(channel, _gzip_channel):
    missing = raw_unary(channel, "/interop.Test/Missing")
    try:
        missing(b"", timeout=TIMEOUT)
        raise CheckFailed("Missing answered")
    except grpc.RpcError as e:
        # Non-ASCII and '%' travel percent-encoded in grpc-message.
        expect_status(e, grpc.StatusCode.NOT_FOUND, "Missing", "no feature named «Ünïcode» (100%)")


def check_unimplemented(channel, _gzip_channel):
    nope = raw_unary(channel, "/routeguide.RouteGuide/Nope")
    try:
        nope(b"", timeout=TIMEOUT)
        raise CheckFailed("an unknown method answered")
    except grpc.RpcError as e:
        expect_status(e, grpc.StatusCode.UNIMPLEMENTED, "unknown method")


def check_metadata(channel, _gzip_channel):
    request_metadata = (("x-text", "interop"), ("x-blob-bin", BLOB))

    # A unary answer's metadata arrives as its initial metadata.
    echo = raw_unary(channel, "/interop.Test/Echo")
    body, call = echo.with_call(b"ping", timeout=TIMEOUT, metadata=request_metadata)
    expect_eq(body, b"ping", "Echo body")
    initial = dict(call.initial_metadata())
    expect_eq(initial.get("x-echo-text"), "interop", "Echo initial metadata x-echo-text")
    expect_eq(initial.get("x-echo-blob-bin"), BLOB, "Echo initial metadata x-echo-blob-bin")

    # A stream's trailers: set by the handler, after its messages.
    trailers = channel.unary_stream("/interop.Test/Trailers", _registered_method=False)
    replies = trailers(b"one", timeout=TIMEOUT, metadata=request_metadata)
    expect_eq(list(replies), [b"one", b"one"], "Trailers messages")
    trailing = dict(replies.trailing_metadata())
    expect_eq(trailing.get("x-echo-text"), "interop", "Trailers trailing metadata x-echo-text")
    expect_eq(trailing.get("x-echo-blob-bin"), BLOB, "Trailers trailing metadata x-echo-blob-bin")

    # The generated Guide's own: x-caller comes back as x-seen-caller.
    guide = route_guide_pb2_grpc.RouteGuideStub(channel)
    _, call = guide.GetFeature.with_call(
        point(1, 2), timeout=TIMEOUT, metadata=(("x-caller", "grpcio"),)
    )
    expect_eq(dict(call.initial_metadata()).get("x-seen-caller"), "grpcio", "x-seen-caller")


def check_gzip(_channel, gzip_channel):
    # Requests gzipped by grpcio; answers gzipped by the server (it is told to).
    gzip = grpc.Compression.Gzip
    guide = route_guide_pb2_grpc.RouteGuideStub(gzip_channel)
    feature = guide.GetFeature(point(3, 4), timeout=TIMEOUT, compression=gzip)
    expect_eq(feature.name, "feature at 3,4", "gzip GetFeature")

    greeter = helloworld_pb2_grpc.GreeterStub(gzip_channel)
    name = "gzip " * 20_000
    reply = greeter.SayHello(helloworld_pb2.HelloRequest(name=name), timeout=TIMEOUT, compression=gzip)
    expect_eq(reply.message, f"Hello, {name}!", "gzip SayHello of 100 kB")

    points = route_points(1_000)
    summary = guide.RecordRoute(iter(points), timeout=TIMEOUT, compression=gzip)
    expect_eq(summary, route_summary(points), "gzip RecordRoute")

    rows = route_guide_pb2.Rectangle(lo=point(0, 0), hi=point(9, LONGITUDES - 1))
    features = list(guide.ListFeatures(rows, timeout=TIMEOUT, compression=gzip))
    expect_eq(len(features), 10 * LONGITUDES, "gzip ListFeatures count")
    expect_eq(features[-1].location, point(9, LONGITUDES - 1), "gzip ListFeatures last")


def check_health(channel, _gzip_channel):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    health = health_pb2_grpc.HealthStub(channel)
    answer = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=TIMEOUT)
    expect_eq(answer.status, health_pb2.HealthCheckResponse.SERVING, "Check('') status")


def check_reflection(channel, _gzip_channel):
    # grpcio's reflection client speaks grpc.reflection.v1alpha.ServerReflection.
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
        ProtoReflectionDescriptorDatabase,
    )

    services = set(ProtoReflectionDescriptorDatabase(channel).get_services())
    for name in ("helloworld.Greeter", "routeguide.RouteGuide"):
        expect(name in services, f"reflection lists no {name}: {sorted(services)}")


CHECKS = {
    "unary": check_unary,
    "server_streaming": check_server_streaming,
    "client_streaming": check_client_streaming,
    "bidi": check_bidi,
    "deadline": check_deadline,
    "not_found": check_not_found,
    "unimplemented": check_unimplemented,
    "metadata": check_metadata,
    "gzip": check_gzip,
    "health": check_health,
    "reflection": check_reflection,
}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--addr", required=True)
    parser.add_argument("--gzip-addr", required=True)
    parser.add_argument("checks", nargs="+", choices=sorted(CHECKS))
    args = parser.parse_args()

    # The servers are on loopback: no proxy from the environment may stand in between.
    options = [("grpc.enable_http_proxy", 0)]
    failed = 0
    with grpc.insecure_channel(args.addr, options) as channel, grpc.insecure_channel(
        args.gzip_addr, options
    ) as gzip_channel:
        for name in args.checks:
            started = time.monotonic()
            try:
                CHECKS[name](channel, gzip_channel)
                print(f"ok {name}", flush=True)
                # Beside the verdicts: the test shows stderr when the script failed.
                print(f"{name} took {time.monotonic() - started:.2f} s", file=sys.stderr, flush=True)
            except Exception as e:  # noqa: BLE001: every failure is reported, then the next check runs
                failed += 1
                detail = " ".join(str(e).split()) or type(e).__name__
                print(f"FAIL {name}: {detail}", flush=True)
                traceback.print_exc(file=sys.stderr)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
