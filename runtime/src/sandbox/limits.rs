//! What one request's sandbox may use, and where each limit is enforced: linear memory and tables
//! as the store grows them, and the response body as it streams out.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use wasmtime::ResourceLimiter;
use wasmtime_wasi_http::p2::body::HyperOutgoingBody;

/// Guest tables never need more than this many elements; more is an attack.
pub(super) const MAX_TABLE_ELEMENTS: usize = 100_000;

/// What one request's sandbox may use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SandboxLimits {
    pub memory_limit_bytes: u64,
    pub deadline: Duration,
    /// Wasm instructions (fuel units) per request; `None` is unmetered.
    pub fuel: Option<u64>,
    /// Input bytes one `compute` may pass, and bytes of tensors a request may hold at once.
    pub max_compute_bytes: u64,
    pub max_compute_calls: u32,
    /// The response body is cut off past this many bytes.
    pub max_response_bytes: u64,
}

/// Memory and table limits for one store. A growth past the limit traps the guest.
pub(super) struct GuestLimits {
    /// Bytes of linear memory the whole store may have, over all its memories.
    pub(super) memory: usize,
    /// Bytes of linear memory the store has now.
    pub(super) used: usize,
    pub(super) memory_exceeded: bool,
}

impl ResourceLimiter for GuestLimits {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        // Every memory's creation and growth passes here, so `used` is the store's total: a
        // component with several memories gets the limit once, not once per memory.
        let used = self.used.saturating_add(desired.saturating_sub(current));
        if used > self.memory {
            self.memory_exceeded = true;
            wasmtime::bail!("memory limit of {} MiB exceeded", self.memory >> 20);
        }
        self.used = used;
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= MAX_TABLE_ELEMENTS)
    }
}

/// A guest's response body, cut off with an error (the client sees an aborted response) once it
/// passes the handler's byte limit. The guest's further writes then fail, so it stops or runs
/// out its deadline; nothing past the limit is ever buffered.
pub(super) struct CappedBody {
    pub(super) inner: HyperOutgoingBody,
    pub(super) limit: u64,
    pub(super) sent: u64,
    pub(super) handler: Arc<str>,
    pub(super) tenant: Arc<str>,
}

impl http_body::Body for CappedBody {
    type Data = Bytes;
    type Error = wasmtime_wasi_http::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, wasmtime_wasi_http::Error>>> {
        let this = &mut *self;
        if this.sent > this.limit {
            return Poll::Ready(None);
        }
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                let len = frame.data_ref().map_or(0, |d| d.len() as u64);
                this.sent = this.sent.saturating_add(len);
                if this.sent > this.limit {
                    tracing::warn!(
                        handler = %this.handler,
                        tenant = %this.tenant,
                        limit = this.limit,
                        "response body cut off at its limit of {} bytes",
                        this.limit
                    );
                    return Poll::Ready(Some(Err(wasmtime_wasi_http::Error::HttpResponseBodySize(Some(
                        this.limit,
                    )))));
                }
                Poll::Ready(Some(Ok(frame)))
            }
            other => other,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

