//! Requests in, responses out, over `wasi:http`.

use serde::Serialize;
use serde::de::DeserializeOwned;
use wasi::http::types::{
    Fields, IncomingBody, IncomingRequest, Method, OutgoingBody, OutgoingResponse,
    ResponseOutparam,
};
use wasi::io::streams::StreamError;

use crate::{Error, Handler};

/// `blocking-write-and-flush` accepts at most this many bytes per call.
const WRITE_CHUNK: usize = 4096;
const READ_CHUNK: u64 = 64 * 1024;

/// An incoming request, with its body already read.
#[derive(Debug, Clone)]
pub struct Request {
    method: String,
    path: String,
    headers: Vec<(String, Vec<u8>)>,
    body: Vec<u8>,
    /// Set by a [`Router`](crate::Router): the path's `{name}` captures.
    params: Vec<(String, String)>,
}

impl Request {
    /// A request built by hand, to run a handler's logic in a test on the host:
    /// `Request::new("POST", "/", br#"{"rows": [[1.0]]}"#.to_vec())`.
    pub fn new(method: &str, path: &str, body: Vec<u8>) -> Request {
        Request { method: method.to_ascii_uppercase(), path: path.to_owned(), headers: Vec::new(), body, params: Vec::new() }
    }

    /// The same request with one more header.
    pub fn with_header(mut self, name: &str, value: &str) -> Request {
        self.headers.push((name.to_owned(), value.as_bytes().to_vec()));
        self
    }

    /// A `{name}` capture of the route that matched (see [`Router`](crate::Router)).
    pub fn param(&self, name: &str) -> Option<&str> {
        self.params.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }

    pub(crate) fn set_params(&mut self, params: Vec<(String, String)>) {
        self.params = params;
    }

    /// The HTTP method, upper case (`GET`, `POST`, ...).
    pub fn method(&self) -> &str {
        &self.method
    }

    /// The path and query the handler was called with, relative to its mount point.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// The first value of a header, if present and valid UTF-8. Names are case-insensitive.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .and_then(|(_, v)| std::str::from_utf8(v).ok())
    }

    /// Every header as received, in order: (name, raw value).
    pub fn headers(&self) -> impl Iterator<Item = (&str, &[u8])> {
        self.headers.iter().map(|(n, v)| (n.as_str(), v.as_slice()))
    }

    /// The raw body.
    pub fn body(&self) -> &[u8] {
        &self.body
    }

    /// The body parsed as JSON; a parse failure is a 400 naming the problem.
    pub fn json<T: DeserializeOwned>(&self) -> Result<T, Error> {
        Ok(serde_json::from_slice(&self.body)?)
    }

    fn read(request: &IncomingRequest) -> Result<Request, Error> {
        let method = match request.method() {
            Method::Get => "GET".to_owned(),
            Method::Head => "HEAD".to_owned(),
            Method::Post => "POST".to_owned(),
            Method::Put => "PUT".to_owned(),
            Method::Delete => "DELETE".to_owned(),
            Method::Connect => "CONNECT".to_owned(),
            Method::Options => "OPTIONS".to_owned(),
            Method::Trace => "TRACE".to_owned(),
            Method::Patch => "PATCH".to_owned(),
            Method::Other(other) => other,
        };
        let path = request.path_with_query().unwrap_or_else(|| "/".to_owned());
        let headers = request.headers().entries();
        let incoming = request
            .consume()
            .map_err(|()| Error::internal("request body was already consumed"))?;
        let body = read_body(&incoming)?;
        drop(IncomingBody::finish(incoming));
        Ok(Request {
            method,
            path,
            headers,
            body,
            params: Vec::new(),
        })
    }
}

fn read_body(incoming: &IncomingBody) -> Result<Vec<u8>, Error> {
    let stream = incoming
        .stream()
        .map_err(|()| Error::internal("request body stream is unavailable"))?;
    let mut body = Vec::new();
    loop {
        match stream.blocking_read(READ_CHUNK) {
            Ok(chunk) => body.extend_from_slice(&chunk),
            Err(StreamError::Closed) => break,
            Err(StreamError::LastOperationFailed(e)) => {
                return Err(Error::bad_request(format!(
                    "cannot read request body: {}",
                    e.to_debug_string()
                )));
            }
        }
    }
    Ok(body)
}

/// A response to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    status: u16,
    headers: Vec<(String, Vec<u8>)>,
    body: Vec<u8>,
}

impl Response {
    /// A response with a body and content type.
    pub fn bytes(status: u16, content_type: &str, body: impl Into<Vec<u8>>) -> Response {
        Response {
            status,
            headers: vec![("content-type".to_owned(), content_type.as_bytes().to_vec())],
            body: body.into(),
        }
    }

    /// A plain-text response.
    pub fn text(status: u16, body: impl Into<String>) -> Response {
        Response::bytes(status, "text/plain; charset=utf-8", body.into())
    }

    /// A JSON response.
    pub fn json<T: Serialize + ?Sized>(status: u16, value: &T) -> Result<Response, Error> {
        let body = serde_json::to_vec(value)
            .map_err(|e| Error::internal(format!("cannot encode response JSON: {e}")))?;
        Ok(Response::bytes(status, "application/json", body))
    }

    /// Adds a header.
    pub fn with_header(mut self, name: &str, value: &str) -> Response {
        self.headers
            .push((name.to_owned(), value.as_bytes().to_vec()));
        self
    }

    /// The status code.
    pub fn status(&self) -> u16 {
        self.status
    }

    /// The body.
    pub fn body(&self) -> &[u8] {
        &self.body
    }

    fn send(mut self, out: ResponseOutparam) {
        // The length is known, so say it: the host then sends the answer as it is rather than
        // in chunks, and clients read it without decoding chunked framing. (Answers that have no
        // body by definition carry no length: 1xx, 204, 304.)
        let bodiless = matches!(self.status, 100..=199 | 204 | 304);
        if !bodiless && !self.headers.iter().any(|(name, _)| name.eq_ignore_ascii_case("content-length")) {
            let length = self.body.len().to_string().into_bytes();
            self.headers.push(("content-length".to_owned(), length));
        }
        let headers = match Fields::from_list(&self.headers) {
            Ok(fields) => fields,
            Err(e) => {
                let fallback = Response::text(500, format!("invalid response header: {e:?}"));
                return fallback.send(out);
            }
        };
        let response = OutgoingResponse::new(headers);
        // Every status a handler can build through this crate is in range; keep 500 otherwise.
        if response.set_status_code(self.status).is_err() {
            let _ = response.set_status_code(500);
        }
        let Ok(body) = response.body() else {
            return;
        };
        ResponseOutparam::set(out, Ok(response));
        let Ok(stream) = body.write() else {
            return;
        };
        for chunk in self.body.chunks(WRITE_CHUNK) {
            if stream.blocking_write_and_flush(chunk).is_err() {
                // The client went away; nothing more can be delivered.
                return;
            }
        }
        drop(stream);
        let _ = OutgoingBody::finish(body, None);
    }
}

/// Reads the request, runs `H`, and sends its response or its error as JSON.
pub fn serve<H: Handler>(request: IncomingRequest, out: ResponseOutparam) {
    respond(Request::read(&request).and_then(H::handle)).send(out);
}

/// A handler's answer as the client gets it: an error becomes `{"error": ...}` with its status.
pub(crate) fn respond(result: Result<Response, Error>) -> Response {
    result.unwrap_or_else(|e| {
        Response::json(e.status(), &serde_json::json!({ "error": e.to_string() }))
            .unwrap_or_else(|_| Response::text(e.status(), e.to_string()))
    })
}
