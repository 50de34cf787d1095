//! `#[gorpc::service]`: the codegen-free way to define a gorpc service. Use it through the
//! re-export, `gorpc::service` (or `gorpc_tokio::service`, `gorpc_smol::service`); the
//! documentation is on [`macro@service`].

use proc_macro2::{Span, TokenStream};
use quote::{format_ident, quote, ToTokens};
use syn::ext::IdentExt;
use syn::spanned::Spanned;
use syn::{
    parse_quote, FnArg, GenericArgument, Ident, ItemTrait, LitStr, Pat, PathArguments, ReturnType,
    Signature, TraitItem, TraitItemFn, Type, TypeParamBound,
};

/// Turns a trait of `async fn`s over serde types into a gorpc service with msgpack on the
/// wire, and no build step.
///
/// ```
/// use gorpc::{Code, Router, Status};
///
/// /// Arithmetic, remotely.
/// #[gorpc::service]
/// pub trait Calculator {
///     /// The sum of two numbers.
///     async fn add(&self, a: i64, b: i64) -> Result<i64, Status>;
///     async fn negate(&self, x: i64) -> Result<i64, Status>;
///     async fn zero(&self) -> Result<i64, Status>;
/// }
///
/// struct Calc;
///
/// impl Calculator for Calc {
///     async fn add(&self, a: i64, b: i64) -> Result<i64, Status> {
///         a.checked_add(b).ok_or_else(|| Status::new(Code::OutOfRange, "overflow"))
///     }
///     async fn negate(&self, x: i64) -> Result<i64, Status> {
///         Ok(-x)
///     }
///     async fn zero(&self) -> Result<i64, Status> {
///         Ok(0)
///     }
/// }
///
/// // Serve it beside other services...
/// let router = Router::new().add_service(CalculatorServer::new(Calc));
/// assert_eq!(router.methods().count(), 3);
/// // ...and call it with `CalculatorClient::new(client).add(2, 3).await`.
/// # fn client(client: gorpc::Client) -> CalculatorClient { CalculatorClient::new(client) }
/// ```
///
/// # What it generates
///
/// - The trait itself, each method rewritten to
///   `fn name(&self, ..) -> impl Future<Output = Result<T, Status>> + Send`, with supertraits
///   `Send + Sync + 'static`. Implementors still write `async fn` in their `impl`; the future
///   they return must be `Send`. Doc comments, attributes and visibility carry over, and a
///   method may have a default body.
/// - `{Trait}Server<T>`: wraps an implementation (`new(inner)`, `from_arc(arc)`) into a
///   `gorpc::Service` and a `gorpc::NamedService`, so that
///   `Router::new().add_service(CalculatorServer::new(Calc))` hosts it beside other services.
///   Unknown methods are answered `Unimplemented`, bodies that do not decode `InvalidArgument`.
///   Its `Service::schema` reports msgpack for every method, so HTTP callers may send JSON.
/// - `{Trait}Client`: a typed client over a `gorpc::Client` (`new(client)`, `inner()`), on any
///   runtime, with one `pub async fn name(&self, args..) -> Result<T, gorpc::Status>` per
///   method (stream methods: see below). `with_options(gorpc::CallOptions)` gives a client
///   whose calls carry that timeout, metadata and affinity key; `with_timeout(Duration)`
///   sets the timeout alone.
///
/// # Stream methods
///
/// A method that takes a `ResponseSink<T>` or a `RequestStream<T>` (from `gorpc::stream`,
/// recognised by the type's name under any path, taken by value) streams, with the
/// handler shapes of `Router::server_stream`, `client_stream` and `bidi`:
///
/// | trait method                                                  | kind             | client method returns                          |
/// |---------------------------------------------------------------|------------------|------------------------------------------------|
/// | `f(&self, args.., sink: ResponseSink<R>) -> Result<(), Status>` | server streaming | `ResponseStream<R>` (`f(args..)`)              |
/// | `f(&self, items: RequestStream<I>) -> Result<T, Status>`        | client streaming | `ClientStreaming<I, T>` (`f()`)                |
/// | `f(&self, items: RequestStream<I>, sink: ResponseSink<R>) -> Result<(), Status>` | bidirectional | `Bidi<I, R>` (`f()`)                           |
///
/// (the client types are in `gorpc::client`). A method with a sink sends its responses
/// through it and returns `Ok(())` to end the stream with OK, or the error status to end it
/// with that; a method with a request stream has no other arguments, since everything the
/// client sends is in the stream. Each stream message is one msgpack value of its type.
/// The call's timeout (from `with_options` or `with_timeout`, else the client's default)
/// is the deadline of the whole stream.
///
/// ```
/// use futures::StreamExt;
/// use gorpc::stream::{RequestStream, ResponseSink};
/// use gorpc::Status;
///
/// #[gorpc::service]
/// trait Numbers {
///     /// 0..n, one message each.
///     async fn count(&self, n: u32, sink: ResponseSink<u32>) -> Result<(), Status>;
///     /// The sum of everything sent.
///     async fn sum(&self, numbers: RequestStream<u32>) -> Result<u64, Status>;
///     /// Each number back, doubled.
///     async fn double(&self, numbers: RequestStream<u32>, sink: ResponseSink<u64>)
///         -> Result<(), Status>;
/// }
///
/// struct N;
///
/// impl Numbers for N {
///     async fn count(&self, n: u32, mut sink: ResponseSink<u32>) -> Result<(), Status> {
///         for i in 0..n {
///             sink.send(&i).await?;
///         }
///         Ok(())
///     }
///     async fn sum(&self, mut numbers: RequestStream<u32>) -> Result<u64, Status> {
///         let mut sum = 0;
///         while let Some(n) = numbers.next().await {
///             sum += u64::from(n?);
///         }
///         Ok(sum)
///     }
///     async fn double(
///         &self,
///         mut numbers: RequestStream<u32>,
///         mut sink: ResponseSink<u64>,
///     ) -> Result<(), Status> {
///         while let Some(n) = numbers.next().await {
///             sink.send(&(2 * u64::from(n?))).await?;
///         }
///         Ok(())
///     }
/// }
///
/// use gorpc::Service;
/// let server = NumbersServer::new(N);
/// assert_eq!(
///     server.stream_kind("/Numbers/count"),
///     Some(gorpc::proto::StreamKind::ServerStreaming)
/// );
/// # async fn call(client: NumbersClient) -> Result<(), Status> {
/// let mut counted = client.count(3).await?;
/// while let Some(i) = counted.next().await {
///     println!("{}", i?);
/// }
/// let mut sum = client.sum().await?;
/// sum.send(&1).await?;
/// let total: u64 = sum.finish().await?.message;
/// # Ok(()) }
/// ```
///
/// # Method paths and wire format
///
/// A client in another language (or a raw `Client::call`) must match these:
///
/// - The method path is `"/{Trait}/{method}"` with the Rust names as written
///   (`"/Calculator/add"`), or `"/{package}.{Trait}/{method}"` with
///   `#[gorpc::service(package = "demo")]` (`"/demo.Calculator/add"`).
/// - Bodies are MessagePack (codec id 2), structs encoded as maps with their field names.
/// - The request body is: for no argument, `()` (msgpack `nil`); for one argument, the value
///   itself; for several, a tuple of them in order (a msgpack array). So
///   `client.call::<(i64, i64), i64>("/Calculator/add", &(2, 3))` is a call of `add(2, 3)`.
/// - The response body is the `T` of `Ok(T)`; an `Err(status)` travels as the call's status.
///
/// # Options
///
/// - `package = "demo"`: prefixes the service name in the method paths.
/// - `crate = "::gorpc_smol"`: the path generated code uses for the gorpc crate (default
///   `::gorpc`), for a crate that depends only on an adapter, which re-exports gorpc.
///
/// ```
/// #[gorpc::service(package = "demo", crate = "::gorpc")]
/// trait Echo {
///     async fn echo(&self, text: String) -> Result<String, gorpc::Status>;
/// }
/// use gorpc::NamedService;
/// struct E;
/// impl Echo for E {
///     async fn echo(&self, text: String) -> Result<String, gorpc::Status> {
///         Ok(text)
///     }
/// }
/// assert_eq!(<EchoServer<E>>::METHODS, &["/demo.Echo/echo"]);
/// ```
///
/// # Restrictions
///
/// Every item of the trait is a method that is `async`, takes `&self`, returns
/// `Result<T, gorpc::Status>` (or a `Result` whose error converts `Into<Status>`), and has
/// no generic parameters; arguments and `T` are owned serde types
/// (`Serialize + DeserializeOwned + Send + 'static`), apart from at most one
/// `RequestStream` and one `ResponseSink` as described above. The trait itself has no
/// generics.
/// Anything else is a compile error that points at the offending part:
///
/// ```compile_fail
/// #[gorpc::service]
/// trait NotAsync {
///     fn add(&self, a: i64, b: i64) -> Result<i64, gorpc::Status>;
/// }
/// ```
///
/// ```compile_fail
/// #[gorpc::service]
/// trait NoSelf {
///     async fn add(a: i64, b: i64) -> Result<i64, gorpc::Status>;
/// }
/// ```
///
/// ```compile_fail
/// #[gorpc::service]
/// trait NotAResult {
///     async fn add(&self, a: i64, b: i64) -> i64;
/// }
/// ```
///
/// ```compile_fail
/// #[gorpc::service]
/// trait SinkAndResult {
///     async fn tail(&self, sink: gorpc::stream::ResponseSink<String>)
///         -> Result<u64, gorpc::Status>;
/// }
/// ```
///
/// ```compile_fail
/// #[gorpc::service]
/// trait Generic {
///     async fn add<T: serde::Serialize>(&self, a: T) -> Result<i64, gorpc::Status>;
/// }
/// ```
#[proc_macro_attribute]
pub fn service(
    attr: proc_macro::TokenStream,
    item: proc_macro::TokenStream,
) -> proc_macro::TokenStream {
    expand(attr.into(), item.into()).into()
}

/// The whole expansion: the generated code, or the errors (with the trait left as written, so
/// that uses of it do not pile more errors on top).
fn expand(attr: TokenStream, item: TokenStream) -> TokenStream {
    match try_expand(attr, item.clone()) {
        Ok(tokens) => tokens,
        Err(err) => {
            let err = err.to_compile_error();
            quote! { #err #item }
        }
    }
}

/// The macro's options.
struct Options {
    krate: syn::Path,
    package: Option<String>,
}

fn parse_options(attr: TokenStream) -> syn::Result<Options> {
    let mut options = Options {
        krate: parse_quote!(::gorpc),
        package: None,
    };
    let parser = syn::meta::parser(|meta| {
        if meta.path.is_ident("crate") {
            let value = meta.value()?;
            options.krate = if value.peek(LitStr) {
                let lit: LitStr = value.parse()?;
                lit.parse()?
            } else {
                value.parse()?
            };
            Ok(())
        } else if meta.path.is_ident("package") {
            let lit: LitStr = meta.value()?.parse()?;
            let package = lit.value();
            if package.is_empty()
                || package.contains('/')
                || package.chars().any(char::is_whitespace)
            {
                return Err(syn::Error::new(
                    lit.span(),
                    "the package must be non-empty, without '/' or spaces, e.g. \"demo\" or \
                     \"acme.billing\"",
                ));
            }
            options.package = Some(package);
            Ok(())
        } else {
            Err(meta.error("unknown option; expected `package = \"..\"` or `crate = \"..\"`"))
        }
    });
    syn::parse::Parser::parse2(parser, attr)?;
    Ok(options)
}

/// One method of the service, checked.
struct Method {
    name: Ident,
    path: String,
    /// Doc comments, copied onto the client's method.
    docs: Vec<syn::Attribute>,
    /// The arguments that make up the request message: names for the client, and types.
    args: Vec<(Ident, Type)>,
    /// The message type of a `RequestStream<T>` argument: the client streams.
    requests: Option<Type>,
    /// The message type of a `ResponseSink<T>` argument: the server streams.
    sink: Option<Type>,
    /// Every argument in declared order, as the server passes them to the implementation.
    call_args: Vec<Ident>,
    /// The `T` of `Result<T, E>`.
    ok: Type,
}

/// What the server names the stream arguments it hands to the implementation.
const REQUESTS_ARG: &str = "__requests";
const SINK_ARG: &str = "__sink";

impl Method {
    /// The request message type: `()`, the one argument's type, or a tuple.
    fn request_type(&self) -> TokenStream {
        match self.args.as_slice() {
            [(_, ty)] => ty.to_token_stream(),
            args => {
                let tys = args.iter().map(|(_, ty)| ty);
                quote! { ( #(#tys,)* ) }
            }
        }
    }

    /// The request value built from the arguments, in the same shape.
    fn request_value(&self) -> TokenStream {
        match self.args.as_slice() {
            [(name, _)] => name.to_token_stream(),
            args => {
                let names = args.iter().map(|(name, _)| name);
                quote! { ( #(#names,)* ) }
            }
        }
    }
}

fn try_expand(attr: TokenStream, item: TokenStream) -> syn::Result<TokenStream> {
    let options = parse_options(attr);
    let mut service: ItemTrait = syn::parse2(item).map_err(|e| {
        syn::Error::new(
            e.span(),
            format!("#[gorpc::service] goes on a trait of async methods: {e}"),
        )
    })?;
    let mut errors = Errors::default();
    let options = errors.take(options);
    check_trait(&service, &mut errors);

    let trait_name = service.ident.unraw().to_string();
    let service_name = match options.as_ref().and_then(|o| o.package.as_deref()) {
        Some(package) => format!("{package}.{trait_name}"),
        None => trait_name,
    };
    let mut methods = Vec::new();
    for item in &mut service.items {
        match item {
            TraitItem::Fn(method) => {
                if let Some(m) = errors.take(check_method(method, &service_name)) {
                    methods.push(m);
                }
                rewrite_method(method);
            }
            other => errors.push(syn::Error::new_spanned(
                other,
                "a #[gorpc::service] trait holds only `async fn` methods",
            )),
        }
    }
    errors.finish()?;
    let options = options.expect("no errors, so the options parsed");
    let bounds: [TypeParamBound; 3] = [
        parse_quote!(::core::marker::Send),
        parse_quote!(::core::marker::Sync),
        parse_quote!('static),
    ];
    if service.colon_token.is_none() {
        service.colon_token = Some(Default::default());
    }
    service.supertraits.extend(bounds);

    let server = server(&service, &methods, &options.krate);
    let client = client(&service, &methods, &options.krate);
    Ok(quote! {
        #service
        #server
        #client
    })
}

/// Collects errors, so that one expansion reports every problem at once.
#[derive(Default)]
struct Errors(Option<syn::Error>);

impl Errors {
    fn push(&mut self, err: syn::Error) {
        match &mut self.0 {
            Some(all) => all.combine(err),
            None => self.0 = Some(err),
        }
    }

    fn take<T>(&mut self, result: syn::Result<T>) -> Option<T> {
        result.map_err(|e| self.push(e)).ok()
    }

    fn finish(self) -> syn::Result<()> {
        self.0.map_or(Ok(()), Err)
    }
}

fn check_trait(service: &ItemTrait, errors: &mut Errors) {
    if let Some(token) = &service.unsafety {
        errors.push(syn::Error::new_spanned(
            token,
            "a #[gorpc::service] trait cannot be `unsafe`",
        ));
    }
    if let Some(token) = &service.auto_token {
        errors.push(syn::Error::new_spanned(
            token,
            "a #[gorpc::service] trait cannot be `auto`",
        ));
    }
    if !service.generics.params.is_empty() || service.generics.where_clause.is_some() {
        errors.push(syn::Error::new_spanned(
            &service.generics,
            "a #[gorpc::service] trait cannot have generic parameters: each method must have \
             one wire format",
        ));
    }
}

fn check_method(method: &TraitItemFn, service_name: &str) -> syn::Result<Method> {
    let sig = &method.sig;
    let mut errors = Errors::default();
    if sig.asyncness.is_none() {
        errors.push(syn::Error::new_spanned(
            sig.fn_token,
            format!(
                "#[gorpc::service] methods must be `async fn`: write `async fn {}`",
                sig.ident
            ),
        ));
    }
    for (token, what) in [
        (sig.constness.as_ref().map(|t| t.span()), "`const`"),
        (sig.unsafety.as_ref().map(|t| t.span()), "`unsafe`"),
        (sig.abi.as_ref().map(|t| t.span()), "an `extern` ABI"),
        (
            sig.variadic.as_ref().map(|t| t.span()),
            "variadic arguments",
        ),
    ] {
        if let Some(span) = token {
            errors.push(syn::Error::new(
                span,
                format!("#[gorpc::service] methods cannot have {what}"),
            ));
        }
    }
    if !sig.generics.params.is_empty() || sig.generics.where_clause.is_some() {
        errors.push(syn::Error::new_spanned(
            &sig.generics,
            format!(
                "#[gorpc::service] method `{}` cannot have generic parameters: its arguments \
                 and result must be concrete serde types",
                sig.ident
            ),
        ));
    }
    errors.take(check_receiver(sig));
    let params = errors.take(check_args(sig));
    let ok = errors.take(result_ok_type(sig));
    if let (Some(params), Some(ok)) = (&params, &ok) {
        if params.sink.is_some() && !is_unit(ok) {
            errors.push(syn::Error::new_spanned(
                ok,
                format!(
                    "#[gorpc::service] method `{}` takes a `ResponseSink`, so its responses go \
                     through the sink: it must return `Result<(), gorpc::Status>`",
                    sig.ident
                ),
            ));
        }
    }
    errors.finish()?;
    let params = params.expect("checked");
    let name = sig.ident.clone();
    Ok(Method {
        path: format!("/{service_name}/{}", name.unraw()),
        name,
        docs: method
            .attrs
            .iter()
            .filter(|a| a.path().is_ident("doc"))
            .cloned()
            .collect(),
        args: params.plain,
        requests: params.requests,
        sink: params.sink,
        call_args: params.call_args,
        ok: ok.expect("checked"),
    })
}

fn is_unit(ty: &Type) -> bool {
    matches!(ty, Type::Tuple(t) if t.elems.is_empty())
}

fn check_receiver(sig: &Signature) -> syn::Result<()> {
    let message = format!(
        "#[gorpc::service] method `{}` must take `&self` first",
        sig.ident
    );
    match sig.inputs.first() {
        Some(FnArg::Receiver(r)) if r.reference.is_some() && r.mutability.is_none() => Ok(()),
        Some(FnArg::Receiver(r)) => Err(syn::Error::new_spanned(
            r,
            format!("{message}: the server shares one instance between concurrent calls"),
        )),
        Some(arg) => Err(syn::Error::new_spanned(arg, message)),
        None => Err(syn::Error::new(sig.paren_token.span.join(), message)),
    }
}

/// A method's arguments, sorted by what they are on the wire.
struct Params {
    plain: Vec<(Ident, Type)>,
    requests: Option<Type>,
    sink: Option<Type>,
    call_args: Vec<Ident>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum StreamArg {
    Requests,
    Sink,
}

impl StreamArg {
    fn type_name(self) -> &'static str {
        match self {
            StreamArg::Requests => "RequestStream",
            StreamArg::Sink => "ResponseSink",
        }
    }
}

/// `RequestStream<T>` or `ResponseSink<T>` (from `gorpc::stream`, under any path), known by
/// the last segment of the type's path; with the message type `T` if it is written.
fn stream_arg(ty: &Type) -> Option<(StreamArg, Option<Type>)> {
    let Type::Path(path) = ty else { return None };
    if path.qself.is_some() {
        return None;
    }
    let last = path.path.segments.last()?;
    let role = if last.ident == "RequestStream" {
        StreamArg::Requests
    } else if last.ident == "ResponseSink" {
        StreamArg::Sink
    } else {
        return None;
    };
    let message = match &last.arguments {
        PathArguments::AngleBracketed(args) if args.args.len() == 1 => match &args.args[0] {
            GenericArgument::Type(t) => Some(t.clone()),
            _ => None,
        },
        _ => None,
    };
    Some((role, message))
}

fn check_args(sig: &Signature) -> syn::Result<Params> {
    let mut errors = Errors::default();
    let mut params = Params {
        plain: Vec::new(),
        requests: None,
        sink: None,
        call_args: Vec::new(),
    };
    // Plain arguments, kept for the error if the method also streams its requests.
    let mut plain_args = Vec::new();
    for (i, arg) in sig.inputs.iter().enumerate() {
        let FnArg::Typed(arg) = arg else { continue };
        let name = match &*arg.pat {
            Pat::Ident(p) if p.subpat.is_none() && p.by_ref.is_none() => p.ident.clone(),
            _ => format_ident!("__arg{i}"),
        };
        if let Some((role, message)) = stream_arg(&arg.ty) {
            let type_name = role.type_name();
            let Some(message) = message else {
                errors.push(syn::Error::new_spanned(
                    &arg.ty,
                    format!("`{type_name}` needs its message type: `{type_name}<T>`"),
                ));
                continue;
            };
            let (slot, call_name) = match role {
                StreamArg::Requests => (&mut params.requests, REQUESTS_ARG),
                StreamArg::Sink => (&mut params.sink, SINK_ARG),
            };
            if slot.is_some() {
                errors.push(syn::Error::new_spanned(
                    &arg.ty,
                    format!(
                        "#[gorpc::service] method `{}` takes a second `{type_name}`: a call has \
                         one stream each way",
                        sig.ident
                    ),
                ));
                continue;
            }
            *slot = Some(message);
            params
                .call_args
                .push(Ident::new(call_name, Span::call_site()));
            continue;
        }
        match &*arg.ty {
            Type::Reference(r) if stream_arg(&r.elem).is_some() => {
                errors.push(syn::Error::new_spanned(
                    &arg.ty,
                    "#[gorpc::service] stream arguments are taken by value: the method owns the \
                     call's stream until it returns",
                ))
            }
            Type::Reference(_) => errors.push(syn::Error::new_spanned(
                &arg.ty,
                "#[gorpc::service] arguments must be owned types (the server decodes them): \
                 take `String` for `&str`, `Vec<T>` for `&[T]`, `T` for `&T`",
            )),
            Type::ImplTrait(_) => errors.push(syn::Error::new_spanned(
                &arg.ty,
                "#[gorpc::service] arguments cannot be `impl Trait`: they must be concrete \
                 serde types",
            )),
            ty => {
                plain_args.push(arg);
                params.call_args.push(name.clone());
                params.plain.push((name, ty.clone()));
            }
        }
    }
    // A client-streaming call has no request message of its own: everything the client
    // sends is in the stream.
    if params.requests.is_some() {
        for arg in plain_args {
            errors.push(syn::Error::new_spanned(
                arg,
                format!(
                    "#[gorpc::service] method `{}` takes a `RequestStream`, so everything the \
                     client sends comes through it: this argument has no place on the wire \
                     (put it in the stream's message type)",
                    sig.ident
                ),
            ));
        }
    }
    errors.finish()?;
    Ok(params)
}

/// The `T` of a `-> Result<T, E>` return type.
fn result_ok_type(sig: &Signature) -> syn::Result<Type> {
    let err = |span: &dyn ToTokens| {
        syn::Error::new_spanned(
            span,
            format!(
                "#[gorpc::service] method `{}` must return `Result<T, gorpc::Status>`",
                sig.ident
            ),
        )
    };
    let ty = match &sig.output {
        ReturnType::Default => return Err(err(&sig.ident)),
        ReturnType::Type(_, ty) => ty,
    };
    let Type::Path(path) = &**ty else {
        return Err(err(ty));
    };
    let Some(last) = path.path.segments.last() else {
        return Err(err(ty));
    };
    if last.ident != "Result" || path.qself.is_some() {
        return Err(err(ty));
    }
    match &last.arguments {
        PathArguments::AngleBracketed(args) => match args.args.first() {
            Some(GenericArgument::Type(ok)) => Ok(ok.clone()),
            _ => Err(err(ty)),
        },
        _ => Err(err(ty)),
    }
}

/// `async fn name(..) -> R` becomes `fn name(..) -> impl Future<Output = R> + Send`.
fn rewrite_method(method: &mut TraitItemFn) {
    let sig = &mut method.sig;
    if sig.asyncness.take().is_none() {
        return;
    }
    let output = match &sig.output {
        ReturnType::Default => quote!(()),
        ReturnType::Type(_, ty) => ty.to_token_stream(),
    };
    sig.output = parse_quote! {
        -> impl ::core::future::Future<Output = #output> + ::core::marker::Send
    };
    if let Some(body) = &method.default {
        method.default = Some(parse_quote!({ async move #body }));
    }
}

fn server(service: &ItemTrait, methods: &[Method], g: &syn::Path) -> TokenStream {
    let vis = &service.vis;
    let name = &service.ident;
    let server = format_ident!("{}Server", name.unraw(), span = name.span());
    let doc =
        format!("Serves a [`{name}`] implementation as a `gorpc::Service`, msgpack on the wire.");
    // The impls name their type parameter so that it cannot shadow a user type called `T`
    // in the argument types written inside them.
    let inner_ty = Ident::new("__GorpcImpl", Span::call_site());
    let paths: Vec<_> = methods.iter().map(|m| &m.path).collect();
    let arms = methods.iter().map(|m| {
        let path = &m.path;
        let method = &m.name;
        let req = m.request_type();
        let ok = &m.ok;
        let call_args = &m.call_args;
        let names: Vec<_> = m.args.iter().map(|(n, _)| n).collect();
        let unpack = match names.as_slice() {
            [] => quote! { let () = __request.message; },
            [one] => quote! { let #one = __request.message; },
            many => quote! { let ( #(#many,)* ) = __request.message; },
        };
        let requests = Ident::new(REQUESTS_ARG, Span::call_site());
        let sink = Ident::new(SINK_ARG, Span::call_site());
        let run = quote! {
            let __result: ::core::result::Result<#ok, #g::Status> = __inner
                .#method( #(#call_args),* )
                .await
                .map_err(::core::convert::Into::into);
        };
        // The same glue the Router's handlers of each kind run on.
        let glue = match (&m.requests, &m.sink) {
            (None, None) => quote! {
                #g::service::unary_call(
                    request,
                    #g::MsgPack,
                    move |__request: #g::Request<#req>| async move {
                        #unpack
                        #run
                        __result.map(#g::Response::new)
                    },
                )
            },
            (None, Some(rsp)) => quote! {
                #g::service::server_stream_call(
                    request,
                    #g::MsgPack,
                    move |__request: #g::Request<#req>, #sink: #g::stream::ResponseSink<#rsp>| {
                        async move {
                            #unpack
                            #run
                            __result
                        }
                    },
                )
            },
            (Some(item), None) => quote! {
                #g::service::client_stream_call(
                    request,
                    #g::MsgPack,
                    move |__request: #g::Request<#g::stream::RequestStream<#item>>| async move {
                        let #requests = __request.message;
                        #run
                        __result.map(#g::Response::new)
                    },
                )
            },
            (Some(item), Some(rsp)) => quote! {
                #g::service::bidi_call(
                    request,
                    #g::MsgPack,
                    move |
                        __request: #g::Request<#g::stream::RequestStream<#item>>,
                        #sink: #g::stream::ResponseSink<#rsp>,
                    | async move {
                        let #requests = __request.message;
                        #run
                        __result
                    },
                )
            },
        };
        quote! {
            #path => {
                let __inner = ::std::sync::Arc::clone(&self.inner);
                #glue
            }
        }
    });
    // The connection driver hands stream methods their halves by this answer.
    let stream_arms: Vec<_> = methods
        .iter()
        .filter_map(|m| {
            let kind = match (&m.requests, &m.sink) {
                (None, None) => return None,
                (None, Some(_)) => quote!(ServerStreaming),
                (Some(_), None) => quote!(ClientStreaming),
                (Some(_), Some(_)) => quote!(Bidirectional),
            };
            let path = &m.path;
            Some(quote! {
                #path => ::core::option::Option::Some(#g::proto::StreamKind::#kind),
            })
        })
        .collect();
    let stream_kind = (!stream_arms.is_empty()).then(|| {
        quote! {
            fn stream_kind(
                &self,
                method: &str,
            ) -> ::core::option::Option<#g::proto::StreamKind> {
                match method {
                    #(#stream_arms)*
                    _ => ::core::option::Option::None,
                }
            }
        }
    });
    // Every method speaks msgpack, which is what lets HTTP callers send JSON.
    let schema_body = if paths.is_empty() {
        quote! {
            let _ = method;
            ::core::option::Option::None
        }
    } else {
        quote! {
            match method {
                #(#paths)|* => ::core::option::Option::Some(#g::MethodSchema::MsgPack),
                _ => ::core::option::Option::None,
            }
        }
    };
    quote! {
        #[doc = #doc]
        #vis struct #server<T> {
            inner: ::std::sync::Arc<T>,
        }

        impl<#inner_ty> ::core::clone::Clone for #server<#inner_ty> {
            fn clone(&self) -> Self {
                #server { inner: ::std::sync::Arc::clone(&self.inner) }
            }
        }

        impl<#inner_ty> ::core::fmt::Debug for #server<#inner_ty> {
            fn fmt(&self, f: &mut ::core::fmt::Formatter<'_>) -> ::core::fmt::Result {
                f.debug_struct(::core::stringify!(#server))
                    .field("methods", &[#(#paths),*])
                    .finish_non_exhaustive()
            }
        }

        impl<#inner_ty: #name> #server<#inner_ty> {
            /// Serves `inner`.
            pub fn new(inner: #inner_ty) -> Self {
                #server { inner: ::std::sync::Arc::new(inner) }
            }

            /// Serves an implementation that is shared with other code.
            pub fn from_arc(inner: ::std::sync::Arc<#inner_ty>) -> Self {
                #server { inner }
            }
        }

        impl<#inner_ty: #name> #g::Service for #server<#inner_ty> {
            fn call(
                &self,
                request: #g::ServerRequest,
            ) -> #g::BoxFuture<'static, #g::ServerReply> {
                match request.method() {
                    #(#arms)*
                    _ => #g::service::unimplemented(&request),
                }
            }

            fn schema(&self, method: &str) -> ::core::option::Option<#g::MethodSchema> {
                #schema_body
            }

            #stream_kind
        }

        impl<#inner_ty: #name> #g::NamedService for #server<#inner_ty> {
            const METHODS: &'static [&'static str] = &[#(#paths),*];
        }
    }
}

fn client(service: &ItemTrait, methods: &[Method], g: &syn::Path) -> TokenStream {
    let vis = &service.vis;
    let name = &service.ident;
    let client = format_ident!("{}Client", name.unraw(), span = name.span());
    let doc = format!("A typed client of [`{name}`] (msgpack on the wire), on any runtime.");
    let calls = methods.iter().map(|m| {
        let method = &m.name;
        let docs = &m.docs;
        let path = &m.path;
        let req = m.request_type();
        let value = m.request_value();
        let ok = &m.ok;
        let params = m.args.iter().map(|(n, ty)| quote! { #n: #ty });
        let path_doc = format!("Calls `{path}`.");
        let sep = (!docs.is_empty()).then(|| quote! { #[doc = ""] });
        // What `gorpc::Client`'s call of the same kind returns.
        let (result, body) = match (&m.requests, &m.sink) {
            (None, None) => (
                quote! { #ok },
                quote! {
                    self.inner
                        .call_with::<#req, #ok>(#path, &#value, self.options.clone())
                        .await
                },
            ),
            (None, Some(rsp)) => (
                quote! { #g::client::ResponseStream<#rsp> },
                quote! {
                    self.inner
                        .server_stream(#path, #g::MsgPack, &#value, self.options.clone())
                        .await
                },
            ),
            (Some(item), None) => (
                quote! { #g::client::ClientStreaming<#item, #ok> },
                quote! {
                    self.inner
                        .client_stream(#path, #g::MsgPack, self.options.clone())
                        .await
                },
            ),
            (Some(item), Some(rsp)) => (
                quote! { #g::client::Bidi<#item, #rsp> },
                quote! {
                    self.inner
                        .bidi(#path, #g::MsgPack, self.options.clone())
                        .await
                },
            ),
        };
        quote! {
            #(#docs)*
            #sep
            #[doc = #path_doc]
            pub async fn #method(&self, #(#params),*) -> ::core::result::Result<#result, #g::Status> {
                #body
            }
        }
    });
    quote! {
        #[doc = #doc]
        #[derive(::core::clone::Clone, ::core::fmt::Debug)]
        #vis struct #client {
            inner: #g::Client,
            options: #g::CallOptions,
        }

        impl #client {
            /// Calls through `inner`, which may be shared with other clients.
            pub fn new(inner: #g::Client) -> Self {
                #client { inner, options: #g::CallOptions::default() }
            }

            /// This client with `options` (a timeout, metadata, an affinity key) on every
            /// call it makes; a stream's timeout is the deadline of the whole stream.
            pub fn with_options(mut self, options: #g::CallOptions) -> Self {
                self.options = options;
                self
            }

            /// This client with `timeout` on every call it makes (a stream's: its whole
            /// stream), instead of the underlying client's default.
            pub fn with_timeout(mut self, timeout: ::core::time::Duration) -> Self {
                self.options.timeout = ::core::option::Option::Some(timeout);
                self
            }

            /// The underlying client, for calls by path.
            pub fn inner(&self) -> &#g::Client {
                &self.inner
            }

            #(#calls)*
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn error_of(attr: TokenStream, item: TokenStream) -> String {
        match try_expand(attr, item) {
            Ok(tokens) => panic!("expected an error, got {tokens}"),
            Err(e) => e
                .into_iter()
                .map(|e| e.to_string())
                .collect::<Vec<_>>()
                .join("\n"),
        }
    }

    #[test]
    fn not_async_is_an_error() {
        let msg = error_of(
            quote!(),
            quote! { trait A { fn add(&self, a: i64) -> Result<i64, Status>; } },
        );
        assert!(msg.contains("must be `async fn`"), "{msg}");
        assert!(msg.contains("async fn add"), "{msg}");
    }

    #[test]
    fn missing_or_wrong_receiver_is_an_error() {
        for item in [
            quote! { trait A { async fn add(a: i64) -> Result<i64, Status>; } },
            quote! { trait A { async fn add() -> Result<i64, Status>; } },
            quote! { trait A { async fn add(self, a: i64) -> Result<i64, Status>; } },
            quote! { trait A { async fn add(&mut self, a: i64) -> Result<i64, Status>; } },
        ] {
            let msg = error_of(quote!(), item);
            assert!(msg.contains("must take `&self` first"), "{msg}");
        }
    }

    #[test]
    fn non_result_return_is_an_error() {
        for item in [
            quote! { trait A { async fn add(&self, a: i64) -> i64; } },
            quote! { trait A { async fn add(&self, a: i64); } },
            quote! { trait A { async fn add(&self, a: i64) -> (i64, Status); } },
            quote! { trait A { async fn add(&self, a: i64) -> Option<i64>; } },
        ] {
            let msg = error_of(quote!(), item);
            assert!(
                msg.contains("must return `Result<T, gorpc::Status>`"),
                "{msg}"
            );
        }
    }

    #[test]
    fn generics_are_an_error() {
        let msg = error_of(
            quote!(),
            quote! { trait A { async fn add<T>(&self, a: T) -> Result<i64, Status>; } },
        );
        assert!(msg.contains("cannot have generic parameters"), "{msg}");
        let msg = error_of(
            quote!(),
            quote! { trait A<T> { async fn add(&self, a: i64) -> Result<i64, Status>; } },
        );
        assert!(
            msg.contains("trait cannot have generic parameters"),
            "{msg}"
        );
        let msg = error_of(
            quote!(),
            quote! { trait A { async fn add(&self, a: impl Clone) -> Result<i64, Status>; } },
        );
        assert!(msg.contains("cannot be `impl Trait`"), "{msg}");
    }

    #[test]
    fn borrowed_arguments_and_other_items_are_errors() {
        let msg = error_of(
            quote!(),
            quote! { trait A { async fn f(&self, s: &str) -> Result<i64, Status>; } },
        );
        assert!(msg.contains("must be owned types"), "{msg}");
        let msg = error_of(
            quote!(),
            quote! { trait A { const X: u8; async fn f(&self) -> Result<i64, Status>; } },
        );
        assert!(msg.contains("holds only `async fn` methods"), "{msg}");
        let msg = error_of(quote!(), quote! { struct A; });
        assert!(msg.contains("goes on a trait"), "{msg}");
    }

    #[test]
    fn every_error_is_reported_at_once() {
        let msg = error_of(
            quote!(),
            quote! {
                trait A {
                    fn one(&self) -> Result<i64, Status>;
                    async fn two(self) -> Result<i64, Status>;
                    async fn three(&self) -> i64;
                }
            },
        );
        assert!(msg.contains("async fn one"), "{msg}");
        assert!(msg.contains("`two` must take `&self`"), "{msg}");
        assert!(msg.contains("`three` must return"), "{msg}");
    }

    #[test]
    fn stream_arguments_are_checked() {
        let msg = error_of(
            quote!(),
            quote! { trait A { async fn f(&self, s: ResponseSink<u8>) -> Result<u8, Status>; } },
        );
        assert!(
            msg.contains("must return `Result<(), gorpc::Status>`"),
            "{msg}"
        );
        let msg = error_of(
            quote!(),
            quote! { trait A { async fn f(&self, n: u8, s: RequestStream<u8>) -> Result<u8, Status>; } },
        );
        assert!(
            msg.contains("this argument has no place on the wire"),
            "{msg}"
        );
        let msg = error_of(
            quote!(),
            quote! {
                trait A {
                    async fn f(&self, a: ResponseSink<u8>, b: ResponseSink<u8>)
                        -> Result<(), Status>;
                }
            },
        );
        assert!(msg.contains("takes a second `ResponseSink`"), "{msg}");
        let msg = error_of(
            quote!(),
            quote! { trait A { async fn f(&self, s: RequestStream) -> Result<u8, Status>; } },
        );
        assert!(msg.contains("`RequestStream<T>`"), "{msg}");
        let msg = error_of(
            quote!(),
            quote! { trait A { async fn f(&self, s: &mut ResponseSink<u8>) -> Result<(), Status>; } },
        );
        assert!(msg.contains("taken by value"), "{msg}");
    }

    #[test]
    fn stream_methods_are_routed_by_kind() {
        let out = try_expand(
            quote!(),
            quote! {
                trait S {
                    async fn one(&self, x: u8) -> Result<u8, Status>;
                    async fn down(&self, x: u8, sink: gorpc::stream::ResponseSink<u8>)
                        -> Result<(), Status>;
                    async fn up(&self, xs: RequestStream<u8>) -> Result<u64, Status>;
                    async fn both(&self, sink: ResponseSink<u16>, xs: RequestStream<u8>)
                        -> Result<(), Status>;
                }
            },
        )
        .unwrap()
        .to_string();
        for expected in [
            "service :: server_stream_call",
            "service :: client_stream_call",
            "service :: bidi_call",
            "\"/S/down\" => :: core :: option :: Option :: Some (:: gorpc :: proto :: StreamKind :: ServerStreaming)",
            "\"/S/up\" => :: core :: option :: Option :: Some (:: gorpc :: proto :: StreamKind :: ClientStreaming)",
            "\"/S/both\" => :: core :: option :: Option :: Some (:: gorpc :: proto :: StreamKind :: Bidirectional)",
            // Declared order kept when the server calls the implementation.
            ". both (__sink , __requests)",
            "ClientStreaming < u8 , u64 >",
        ] {
            assert!(out.contains(expected), "{expected} in {out}");
        }
        assert!(
            !out.contains("\"/S/one\" => :: core :: option :: Option :: Some (:: gorpc :: proto"),
            "{out}"
        );
    }

    #[test]
    fn bad_options_are_errors() {
        let item = quote! { trait A { async fn f(&self) -> Result<i64, Status>; } };
        let msg = error_of(quote!(pakage = "x"), item.clone());
        assert!(msg.contains("unknown option"), "{msg}");
        let msg = error_of(quote!(package = ""), item.clone());
        assert!(msg.contains("package must be non-empty"), "{msg}");
        let msg = error_of(quote!(crate = "not a path"), item);
        assert!(!msg.is_empty());
    }

    #[test]
    fn the_error_expansion_keeps_the_trait() {
        let out = expand(
            quote!(),
            quote! { trait Kept { fn f(&self) -> Result<i64, Status>; } },
        )
        .to_string();
        assert!(out.contains("compile_error"), "{out}");
        assert!(out.contains("trait Kept"), "{out}");
    }

    #[test]
    fn paths_and_options_shape_the_output() {
        let item = quote! {
            pub trait Calc {
                async fn add(&self, a: i64, b: i64) -> Result<i64, Status>;
                async fn r#type(&self) -> Result<i64, Status>;
            }
        };
        let out = try_expand(quote!(), item.clone()).unwrap().to_string();
        assert!(out.contains("\"/Calc/add\""), "{out}");
        assert!(out.contains("\"/Calc/type\""), "{out}");
        assert!(out.contains(":: gorpc :: MsgPack"), "{out}");
        assert!(out.contains(":: gorpc :: MethodSchema :: MsgPack"), "{out}");
        assert!(out.contains("pub struct CalcServer"), "{out}");
        assert!(out.contains("pub struct CalcClient"), "{out}");
        let out = try_expand(quote!(package = "demo", crate = "::gorpc_smol"), item)
            .unwrap()
            .to_string();
        assert!(out.contains("\"/demo.Calc/add\""), "{out}");
        assert!(out.contains(":: gorpc_smol :: MsgPack"), "{out}");
        assert!(!out.contains(":: gorpc ::"), "{out}");
    }
}
