//! Running asynchronous object-store code behind the crate's synchronous
//! traits ([`crate::meta::MetaStore`], [`crate::segment::SegmentStore`]).
//!
//! A backend owns a small runtime of its own and every call waits on the
//! caller's thread for a task spawned there. Waiting parks the thread, so it
//! works the same on a plain thread, a blocking-pool thread or (blocking it,
//! as a redb commit would) another runtime's worker.

use std::future::Future;
use std::io;
use std::pin::pin;
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};
use std::thread::{self, Thread};

/// A runtime for one backend's tasks.
pub(crate) struct Bridge {
    runtime: Option<tokio::runtime::Runtime>,
}

impl Bridge {
    /// A runtime of `threads` workers named `name`.
    pub(crate) fn new(name: &str, threads: usize) -> io::Result<Bridge> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .thread_name(name)
            .enable_all()
            .build()?;
        Ok(Bridge {
            runtime: Some(runtime),
        })
    }

    /// Runs `task` on the runtime and waits for its result here.
    pub(crate) fn run<T: Send + 'static>(
        &self,
        task: impl Future<Output = T> + Send + 'static,
    ) -> io::Result<T> {
        let runtime = self.runtime.as_ref().expect("the runtime lives until drop");
        wait(runtime.spawn(task)).map_err(io::Error::other)
    }

    /// Starts `task` on the runtime without waiting for it.
    pub(crate) fn spawn(&self, task: impl Future<Output = ()> + Send + 'static) {
        let runtime = self.runtime.as_ref().expect("the runtime lives until drop");
        runtime.spawn(task);
    }
}

impl Drop for Bridge {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            // Never blocks, so a backend dropped on another runtime's thread
            // is fine; the owner has already waited for what must finish.
            runtime.shutdown_background();
        }
    }
}

/// Waits for `future` on this thread, whatever runtime (if any) the thread
/// belongs to: the thread parks until the future's waker unparks it.
pub(crate) fn wait<F: Future>(future: F) -> F::Output {
    struct Unpark(Thread);
    impl Wake for Unpark {
        fn wake(self: Arc<Self>) {
            self.0.unpark();
        }
        fn wake_by_ref(self: &Arc<Self>) {
            self.0.unpark();
        }
    }
    let waker = Waker::from(Arc::new(Unpark(thread::current())));
    let mut context = Context::from_waker(&waker);
    let mut future = pin!(future);
    loop {
        match future.as_mut().poll(&mut context) {
            Poll::Ready(output) => return output,
            Poll::Pending => thread::park(),
        }
    }
}
