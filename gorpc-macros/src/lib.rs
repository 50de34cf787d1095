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
///   method.
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
/// (`Serialize + DeserializeOwned + Send + 'static`). The trait itself has no generics.
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
    /// Argument names for the client, and types.
    args: Vec<(Ident, Type)>,
    /// The `T` of `Result<T, E>`.
    ok: Type,
}

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
    let args = errors.take(check_args(sig));
    let ok = errors.take(result_ok_type(sig));
    errors.finish()?;
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
        args: args.expect("checked"),
        ok: ok.expect("checked"),
    })
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

fn check_args(sig: &Signature) -> syn::Result<Vec<(Ident, Type)>> {
    let mut errors = Errors::default();
    let mut args = Vec::new();
    for (i, arg) in sig.inputs.iter().enumerate() {
        let FnArg::Typed(arg) = arg else { continue };
        let name = match &*arg.pat {
            Pat::Ident(p) if p.subpat.is_none() && p.by_ref.is_none() => p.ident.clone(),
            _ => format_ident!("__arg{i}"),
        };
        match &*arg.ty {
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
            ty => args.push((name, ty.clone())),
        }
    }
    errors.finish()?;
    Ok(args)
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
        let names: Vec<_> = m.args.iter().map(|(n, _)| n).collect();
        let unpack = match names.as_slice() {
            [] => quote! { let () = __request.message; },
            [one] => quote! { let #one = __request.message; },
            many => quote! { let ( #(#many,)* ) = __request.message; },
        };
        quote! {
            #path => {
                let __inner = ::std::sync::Arc::clone(&self.inner);
                #g::service::unary_call(
                    request,
                    #g::MsgPack,
                    move |__request: #g::Request<#req>| async move {
                        #unpack
                        let __result: ::core::result::Result<#ok, #g::Status> = __inner
                            .#method( #(#names),* )
                            .await
                            .map_err(::core::convert::Into::into);
                        __result.map(#g::Response::new)
                    },
                )
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
        quote! {
            #(#docs)*
            #sep
            #[doc = #path_doc]
            pub async fn #method(&self, #(#params),*) -> ::core::result::Result<#ok, #g::Status> {
                self.inner.call::<#req, #ok>(#path, &#value).await
            }
        }
    });
    quote! {
        #[doc = #doc]
        #[derive(::core::clone::Clone, ::core::fmt::Debug)]
        #vis struct #client {
            inner: #g::Client,
        }

        impl #client {
            /// Calls through `inner`, which may be shared with other clients.
            pub fn new(inner: #g::Client) -> Self {
                #client { inner }
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
