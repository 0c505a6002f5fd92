//! The one HTTPS client every AWS SDK client of fedstep uses: the SDK's own
//! hyper 1 + rustls client, with rustls on *ring* instead of the SDK's
//! default aws-lc.
//!
//! Why not the default: aws-lc-sys builds aws-lc from C with cmake, about
//! 140 s of one core per build, and the tree is built twice in CI (the host
//! tests and the glibc-2.17 Lambda/dist build). ring covers the same TLS 1.2
//! and 1.3 suites AWS endpoints offer; the post-quantum key exchange the
//! aws-lc default prefers is what is given up. Everything else is what the
//! SDK's `default-https-client` does (aws-smithy-runtime's
//! `default_https_client`): the connector settings and sleep of the
//! client's runtime, the system's root certificates, and the standard
//! proxy variables (`HTTPS_PROXY`, `NO_PROXY`, ...), which on-prem clients
//! behind a proxy rely on.

use aws_config::{BehaviorVersion, ConfigLoader};
use aws_smithy_http_client::proxy::ProxyConfig;
use aws_smithy_http_client::tls::{rustls_provider::CryptoMode, Provider};
use aws_smithy_http_client::{Builder, ConnectorBuilder};
use aws_smithy_runtime_api::client::http::SharedHttpClient;

/// A new HTTPS (and plain HTTP, for the emulators) client.
pub fn https_client() -> SharedHttpClient {
    Builder::new().build_with_connector_fn(|settings, runtime_components| {
        let mut connector =
            ConnectorBuilder::default().tls_provider(Provider::Rustls(CryptoMode::Ring));
        connector.set_connector_settings(settings.cloned());
        if let Some(components) = runtime_components {
            connector.set_sleep_impl(components.sleep_impl());
        }
        connector.set_proxy_config(Some(ProxyConfig::from_env()));
        connector.build()
    })
}

/// `aws_config::defaults` with [`https_client`]: the start of every SDK
/// configuration in fedstep (the crates are built without the SDK's
/// default client, so one loaded without it cannot send a request).
pub fn sdk_defaults() -> ConfigLoader {
    aws_config::defaults(BehaviorVersion::latest()).http_client(https_client())
}
