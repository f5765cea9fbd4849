//! The smallest well-behaved handler: answers every request with a greeting. The hot-swap tests
//! replace a handler with this one and back, and tell the versions apart by the answer.

use kiln_guest::{Error, Handler, Request, Response};

struct Greeter;

impl Handler for Greeter {
    fn handle(request: Request) -> Result<Response, Error> {
        Ok(Response::text(200, format!("hello from greeter ({} bytes)", request.body().len())))
    }
}

kiln_guest::export_handler!(Greeter);
