//! Serves the test catalog (in-memory exports `acme/disk`, `acme/ro`,
//! `acme/tampered`, `globex/disk`) on a Unix socket until Ctrl-C, for trying
//! clients by hand and for benchmarks:
//!
//! ```text
//! cargo run --release -p blockseal-nbd --example mem_server -- /tmp/nbd.sock
//! nbdinfo 'nbd+unix:///acme/disk?socket=/tmp/nbd.sock'
//! ```

#[path = "../tests/common/mem.rs"]
#[allow(dead_code, unreachable_pub)]
mod mem;

use std::sync::Arc;

use blockseal_nbd::{Server, ServerConfig};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .init();
    let path = std::env::args()
        .nth(1)
        .ok_or("usage: mem_server <socket path>")?;
    let _ = std::fs::remove_file(&path);
    let listener = tokio::net::UnixListener::bind(&path)?;
    let mut config = ServerConfig::default();
    // MEM_SERVER_OFFLOAD=1 runs every request on blocking threads, to compare.
    config.inline_requests = std::env::var_os("MEM_SERVER_OFFLOAD").is_none();
    let server = Server::new(Arc::new(mem::MemCatalog::standard()), config);
    let shutdown = server.shutdown_handle();
    tokio::spawn(async move {
        let _ = tokio::signal::ctrl_c().await;
        shutdown.trigger();
    });
    eprintln!("serving on {path}");
    server.serve_unix(listener).await?;
    Ok(())
}
