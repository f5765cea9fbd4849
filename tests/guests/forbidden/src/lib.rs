//! A guest that reads files and opens sockets. Rust's std turns those into `wasi:filesystem` and
//! `wasi:sockets` imports, which Kiln refuses when the component is deployed.

use kiln_guest::{Error, Handler, Request, Response};

struct Forbidden;

impl Handler for Forbidden {
    fn handle(request: Request) -> Result<Response, Error> {
        match request.path() {
            "/file" => match std::fs::read_to_string("/etc/passwd") {
                Ok(text) => Ok(Response::text(200, text)),
                Err(e) => Ok(Response::text(200, format!("denied: {e}"))),
            },
            "/socket" => match std::net::TcpStream::connect("127.0.0.1:8080") {
                Ok(_) => Ok(Response::text(200, "connected")),
                Err(e) => Ok(Response::text(200, format!("denied: {e}"))),
            },
            other => Err(Error::with_status(404, format!("no route {other}"))),
        }
    }
}

kiln_guest::export_handler!(Forbidden);
