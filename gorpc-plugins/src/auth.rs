//! Bearer tokens: [`BearerToken`] sends one with every call, [`BearerAuth`] checks it on the
//! server.
//!
//! The token travels in the `authorization` metadata as `Bearer <token>`, as in HTTP and
//! gRPC. On the server, a valid token becomes the caller's subject, handed to the handler
//! under [`SUBJECT`]; the token itself never reaches the handler. Neither type logs, and no
//! refusal message quotes the token.

use std::collections::HashSet;
use std::fmt;

use bytes::Bytes;
use futures::future::{self, BoxFuture};
use futures::FutureExt;
use gorpc::client::OutgoingCall;
use gorpc::{
    ClientInterceptor, ClientNext, Code, Metadata, Next, RawResponse, ServerInterceptor,
    ServerReply, ServerRequest, Status,
};

/// The metadata key that carries `Bearer <token>`.
pub const AUTHORIZATION: &str = "authorization";

/// The metadata key under which [`BearerAuth`] gives the handler the verified caller's
/// subject. Whatever the client sent under this key is discarded first, so a handler can
/// trust it.
pub const SUBJECT: &str = "x-gorpc-subject";

/// A client interceptor that sends `authorization: Bearer <token>` with every call,
/// replacing any `authorization` value the call already had.
#[derive(Clone)]
pub struct BearerToken {
    /// `Bearer <token>`, built once so each call only bumps a reference count.
    header: Bytes,
}

impl BearerToken {
    /// Sends `token` (without the `Bearer ` prefix) with every call.
    pub fn new(token: impl AsRef<str>) -> Self {
        BearerToken {
            header: Bytes::from(format!("Bearer {}", token.as_ref())),
        }
    }
}

impl fmt::Debug for BearerToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // A token must not end up in logs through a `{:?}`.
        f.write_str("BearerToken(<redacted>)")
    }
}

impl ClientInterceptor for BearerToken {
    fn intercept(
        &self,
        mut call: OutgoingCall,
        next: ClientNext,
    ) -> BoxFuture<'static, Result<RawResponse, Status>> {
        call.metadata.insert(AUTHORIZATION, self.header.clone());
        next.run(call)
    }

    fn intercept_stream(&self, call: &mut OutgoingCall) -> Result<(), Status> {
        call.metadata.insert(AUTHORIZATION, self.header.clone());
        Ok(())
    }
}

/// Who a verified token belongs to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    /// The caller as the handler sees it in [`SUBJECT`]: a user name, an account id, a
    /// service name.
    pub subject: String,
}

impl Identity {
    /// The identity of `subject`.
    pub fn new(subject: impl Into<String>) -> Self {
        Identity {
            subject: subject.into(),
        }
    }
}

type Verify = Box<dyn Fn(&str, &str) -> Result<Identity, Status> + Send + Sync>;

/// A server interceptor that admits only calls with a bearer token that `verify` accepts.
///
/// - No `authorization` metadata, a value that is not UTF-8, or one that is not
///   `Bearer <token>` (see [`parse_bearer`]): `Unauthenticated`, and the handler does not run.
/// - `verify(token, method)` returning an error: the call is answered with that status
///   (typically `Unauthenticated` for an unknown or expired token, `PermissionDenied` for a
///   caller not allowed this method).
/// - `verify` returning an [`Identity`]: the handler runs with the subject under [`SUBJECT`]
///   and without any `authorization` metadata.
///
/// When a call carries several `authorization` values, the first one is checked, as
/// [`Metadata::get`] would read it, and all are removed.
pub struct BearerAuth {
    verify: Verify,
    open_methods: HashSet<Box<str>>,
}

impl BearerAuth {
    /// Checks every call's token with `verify(token, method)`; no method is open.
    pub fn new<F>(verify: F) -> Self
    where
        F: Fn(&str, &str) -> Result<Identity, Status> + Send + Sync + 'static,
    {
        BearerAuth {
            verify: Box::new(verify),
            open_methods: HashSet::new(),
        }
    }

    /// Lets calls to `method` (a full path, "/package.Service/Method") through without a
    /// token, e.g. a health check. Their handler still never sees `authorization` or a
    /// client-supplied [`SUBJECT`].
    pub fn allow_unauthenticated(mut self, method: impl Into<Box<str>>) -> Self {
        self.open_methods.insert(method.into());
        self
    }

    fn authenticate(&self, request: &ServerRequest) -> Result<Identity, Status> {
        let value = request
            .metadata_value(AUTHORIZATION)
            .ok_or_else(|| unauthenticated("missing authorization metadata"))?;
        let value = std::str::from_utf8(value)
            .map_err(|_| unauthenticated("authorization metadata is not UTF-8"))?;
        let token = parse_bearer(value)
            .ok_or_else(|| unauthenticated("authorization metadata is not `Bearer <token>`"))?;
        (self.verify)(token, request.method())
    }
}

impl fmt::Debug for BearerAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BearerAuth")
            .field("allow_unauthenticated", &self.open_methods)
            .finish_non_exhaustive()
    }
}

impl ServerInterceptor for BearerAuth {
    fn intercept(&self, mut request: ServerRequest, next: Next) -> BoxFuture<'static, ServerReply> {
        if self.open_methods.contains(request.method()) {
            // Only copy the metadata out of the frame when there is something to remove.
            if request.metadata_value(AUTHORIZATION).is_some()
                || request.metadata_value(SUBJECT).is_some()
            {
                let metadata = request.metadata_mut();
                remove_all(metadata, AUTHORIZATION);
                remove_all(metadata, SUBJECT);
            }
            return next.run(request);
        }
        match self.authenticate(&request) {
            Ok(identity) => {
                let metadata = request.metadata_mut();
                remove_all(metadata, AUTHORIZATION);
                // `insert` replaces every value a client may have sent under this key.
                metadata.insert(SUBJECT, identity.subject);
                next.run(request)
            }
            Err(status) => future::ready(ServerReply::error(status)).boxed(),
        }
    }
}

/// The token in an `authorization` value of the form `Bearer <token>`, or `None`.
///
/// Following HTTP (RFC 7235, RFC 6750): the scheme is matched case-insensitively
/// (`bearer`, `BEARER`), one or more spaces may separate it from the token, and spaces or
/// tabs around the whole value are ignored. The token is what remains; it must be non-empty
/// and contain no whitespace, so `Bearer a b` is refused rather than guessed at.
pub fn parse_bearer(value: &str) -> Option<&str> {
    let (scheme, token) = value.trim_matches([' ', '\t']).split_once(' ')?;
    let token = token.trim_start_matches(' ');
    let valid = scheme.eq_ignore_ascii_case("bearer")
        && !token.is_empty()
        && !token.contains(char::is_whitespace);
    valid.then_some(token)
}

fn unauthenticated(message: &'static str) -> Status {
    Status::new(Code::Unauthenticated, message)
}

/// [`Metadata::remove`] takes the first value only; a client may send a key twice.
fn remove_all(metadata: &mut Metadata, key: &str) {
    while metadata.remove(key).is_some() {}
}

#[cfg(test)]
mod tests {
    use super::parse_bearer;

    #[test]
    fn accepts_the_canonical_form() {
        assert_eq!(
            parse_bearer("Bearer abc.DEF-123_~+/="),
            Some("abc.DEF-123_~+/=")
        );
    }

    #[test]
    fn scheme_is_case_insensitive() {
        assert_eq!(parse_bearer("bearer abc"), Some("abc"));
        assert_eq!(parse_bearer("BEARER abc"), Some("abc"));
        assert_eq!(parse_bearer("bEaReR abc"), Some("abc"));
    }

    #[test]
    fn tolerates_extra_spaces_between_and_around() {
        assert_eq!(parse_bearer("Bearer    abc"), Some("abc"));
        assert_eq!(parse_bearer("  Bearer abc  "), Some("abc"));
        assert_eq!(parse_bearer("\tBearer abc\t"), Some("abc"));
    }

    #[test]
    fn refuses_anything_else() {
        for value in [
            "",
            "Bearer",
            "Bearer ",
            "Bearer    ",
            "Bearerabc",
            "Bearer\tabc",
            "Bearer a b",
            "Bearer a\tb",
            "Basic dXNlcjpwYXNz",
            "Token abc",
            "abc",
            " Bearer",
        ] {
            assert_eq!(parse_bearer(value), None, "{value:?}");
        }
    }
}
