//! Object storage: where a store's metadata can live off the host.
//!
//! [`S3Options`] names a bucket on an S3-compatible service (AWS S3, MinIO,
//! Ceph RGW, Garage) and [`s3`] connects to it. The service must support
//! conditional writes (`If-None-Match: *` on create, `If-Match` on update):
//! SlateDB's manifest and its writer fencing depend on them.
//!
//! Requests are signed with ring and sent over rustls with ring as its
//! provider, so the crate keeps one cryptographic library.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

mod records;

pub use object_store::ObjectStore;
use object_store::aws::AmazonS3Builder;
use object_store::{ClientOptions, RetryConfig};
pub use records::{Expect, Listed, PutError, Record, Records, Version};
use zeroize::Zeroizing;

/// Where and how to reach an S3-compatible bucket.
///
/// `Debug` never shows the secret key.
#[derive(Clone)]
pub struct S3Options {
    bucket: String,
    region: String,
    endpoint: Option<String>,
    access_key_id: String,
    secret_access_key: Zeroizing<String>,
    request_timeout: Duration,
}

impl fmt::Debug for S3Options {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("S3Options")
            .field("bucket", &self.bucket)
            .field("region", &self.region)
            .field("endpoint", &self.endpoint)
            .field("access_key_id", &self.access_key_id)
            .field("secret_access_key", &"<redacted>")
            .field("request_timeout", &self.request_timeout)
            .finish()
    }
}

impl S3Options {
    /// The default limit on one request (30 s): a request that takes longer
    /// fails and is retried, so a stuck connection never holds a commit for ever.
    pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

    /// A bucket in `region`, reached with the given credentials at AWS's own
    /// endpoint unless [`endpoint`](Self::endpoint) says otherwise.
    pub fn new(
        bucket: impl Into<String>,
        region: impl Into<String>,
        access_key_id: impl Into<String>,
        secret_access_key: Zeroizing<String>,
    ) -> S3Options {
        S3Options {
            bucket: bucket.into(),
            region: region.into(),
            endpoint: None,
            access_key_id: access_key_id.into(),
            secret_access_key,
            request_timeout: Self::DEFAULT_REQUEST_TIMEOUT,
        }
    }

    /// The service's URL (`http://127.0.0.1:9000` for a local MinIO). A URL
    /// with `http:` sends requests, and the request signatures, unencrypted:
    /// for loopback and tests only. Paths are bucket-first (`/bucket/key`).
    pub fn endpoint(mut self, url: impl Into<String>) -> S3Options {
        self.endpoint = Some(url.into());
        self
    }

    /// The limit on one request.
    pub fn request_timeout(mut self, timeout: Duration) -> S3Options {
        self.request_timeout = timeout;
        self
    }

    /// The bucket's name.
    pub fn bucket(&self) -> &str {
        &self.bucket
    }
}

/// Connects to the bucket `options` names. Nothing is sent until the store
/// is used, so a wrong name or key shows up at the first request.
pub fn s3(options: &S3Options) -> Result<Arc<dyn ObjectStore>, object_store::Error> {
    install_crypto_provider();
    let mut builder = AmazonS3Builder::new()
        .with_bucket_name(&options.bucket)
        .with_region(&options.region)
        .with_access_key_id(&options.access_key_id)
        .with_secret_access_key(options.secret_access_key.as_str())
        .with_client_options(ClientOptions::new().with_timeout(options.request_timeout))
        .with_retry(RetryConfig {
            max_retries: 3,
            retry_timeout: options.request_timeout * 2,
            ..RetryConfig::default()
        });
    if let Some(endpoint) = &options.endpoint {
        builder = builder
            .with_endpoint(endpoint)
            .with_virtual_hosted_style_request(false)
            .with_allow_http(endpoint.starts_with("http:"));
    }
    Ok(Arc::new(builder.build()?))
}

/// Makes ring the process's rustls provider unless one is installed already
/// (the HTTP client asks the process for it).
fn install_crypto_provider() {
    if rustls::crypto::CryptoProvider::get_default().is_none() {
        // Losing a race to another thread installing one is fine.
        let _ = rustls::crypto::ring::default_provider().install_default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_shows_the_secret_key() {
        let options = S3Options::new(
            "bucket",
            "us-east-1",
            "AKIDEXAMPLE",
            Zeroizing::new("wJalrXUtnFEMI-secret".into()),
        )
        .endpoint("http://127.0.0.1:9000");
        let text = format!("{options:?}{options:#?}");
        assert!(
            text.contains("AKIDEXAMPLE") && text.contains("<redacted>"),
            "{text}"
        );
        assert!(!text.contains("wJalrXUtnFEMI"), "{text}");
    }
}
