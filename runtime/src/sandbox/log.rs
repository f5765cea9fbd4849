//! A guest's stdout and stderr, into the server log: line by line, cut to a length, and within
//! one budget per request so a guest cannot flood the log.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::AsyncWrite;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use crate::sync::MutexExt;
use crate::telemetry::access::Record;

/// Lines a guest writes to stdout/stderr are cut at this length in the log.
const MAX_LOG_LINE: usize = 4096;

/// What one request may write to the server log through its guest (stdout, stderr and denied
/// outgoing requests together): then one "truncated" line, and nothing more.
const LOG_BUDGET_LINES: u32 = 100;

const LOG_BUDGET_BYTES: usize = 64 << 10;

/// What is left of one request's share of the server log. Shared by its stdout, stderr and
/// outgoing-request hooks.
pub(super) struct LogBudget {
    pub(super) handler: Arc<str>,
    pub(super) tenant: Arc<str>,
    /// The request's record, for its `kiln-request-id` (none at build time).
    request: Option<Arc<Record>>,
    /// Lines and bytes still allowed; the line that finds them spent says so, once.
    left: std::sync::Mutex<(u32, usize, bool)>,
}

impl LogBudget {
    pub(super) fn new(handler: &Arc<str>, tenant: &Arc<str>, request: Option<Arc<Record>>) -> LogBudget {
        LogBudget {
            handler: Arc::clone(handler),
            tenant: Arc::clone(tenant),
            request,
            left: std::sync::Mutex::new((LOG_BUDGET_LINES, LOG_BUDGET_BYTES, false)),
        }
    }

    /// The request's `kiln-request-id` (empty at build time).
    pub(super) fn request_id(&self) -> &str {
        self.request.as_deref().map_or("", |r| r.request_id.as_str())
    }

    /// Takes one line of `bytes` from the budget: whether to write it. The first line refused
    /// writes the "truncated" notice instead.
    pub(super) fn take(&self, bytes: usize) -> bool {
        let mut left = self.left.locked();
        let (lines, room, noticed) = &mut *left;
        if *lines > 0 && *room >= bytes {
            *lines -= 1;
            *room -= bytes;
            return true;
        }
        if !*noticed {
            *noticed = true;
            tracing::warn!(
                target: "kiln::guest",
                handler = %self.handler,
                tenant = %self.tenant,
                request_id = %self.request_id(),
                "log output truncated: this request used its {LOG_BUDGET_LINES} lines / {LOG_BUDGET_BYTES} bytes"
            );
        }
        false
    }
}

/// A guest's stdout or stderr, forwarded line by line to the server log, tagged with the handler,
/// within the request's [`LogBudget`].
#[derive(Clone)]
pub(super) struct GuestLog {
    budget: Arc<LogBudget>,
    stream: &'static str,
}

impl GuestLog {
    pub(super) fn new(budget: &Arc<LogBudget>, stream: &'static str) -> GuestLog {
        GuestLog {
            budget: Arc::clone(budget),
            stream,
        }
    }
}

impl IsTerminal for GuestLog {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for GuestLog {
    fn async_stream(&self) -> Box<dyn AsyncWrite + Send + Sync> {
        Box::new(GuestLogWriter {
            log: self.clone(),
            line: Vec::new(),
        })
    }
}

struct GuestLogWriter {
    log: GuestLog,
    line: Vec<u8>,
}

impl GuestLogWriter {
    fn emit(&mut self) {
        if self.log.budget.take(self.line.len() + 1) {
            // Whatever the guest wrote (escape sequences, NULs, carriage returns, bytes that
            // are not UTF-8) stays inside this one line.
            let text = String::from_utf8_lossy(&self.line);
            let text = crate::telemetry::logging::printable(text.trim_end_matches(['\r', '\n']), 2 * MAX_LOG_LINE);
            let budget = &self.log.budget;
            tracing::info!(
                target: "kiln::guest",
                handler = %budget.handler,
                tenant = %budget.tenant,
                request_id = %budget.request_id(),
                stream = self.log.stream,
                "{text}"
            );
        }
        self.line.clear();
    }
}

impl AsyncWrite for GuestLogWriter {
    fn poll_write(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        for &b in buf {
            if b == b'\n' {
                this.emit();
            } else if this.line.len() < MAX_LOG_LINE {
                this.line.push(b);
            }
        }
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if !this.line.is_empty() {
            this.emit();
        }
        Poll::Ready(Ok(()))
    }
}

impl Drop for GuestLogWriter {
    fn drop(&mut self) {
        if !self.line.is_empty() {
            self.emit();
        }
    }
}
