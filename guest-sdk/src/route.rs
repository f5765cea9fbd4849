//! Routing by method and path, so a handler with several routes does not match strings by hand.

use crate::{Error, Request, Response};

/// What a route runs.
pub type RouteFn = fn(Request) -> Result<Response, Error>;

/// Routes requests by method and path (the query is ignored) to functions. A pattern is
/// `/`-separated segments, each literal or a `{name}` capture read with [`Request::param`].
///
/// A path no route matches is 404, and one that only other methods match is 405 with an `allow`
/// header; both name what there is, so a caller learns the routes from the error.
///
/// ```
/// use kiln_guest::{Error, Request, Response, Router};
///
/// fn health(_: Request) -> Result<Response, Error> {
///     Ok(Response::text(200, "ok"))
/// }
///
/// fn item(request: Request) -> Result<Response, Error> {
///     Ok(Response::text(200, format!("item {}", request.param("id").unwrap_or_default())))
/// }
///
/// let router = Router::new().get("/health", health).get("/items/{id}", item);
/// let answer = router.handle(Request::new("GET", "/items/7?verbose=1", Vec::new())).unwrap();
/// assert_eq!(answer.body(), b"item 7");
/// let missing = router.handle(Request::new("GET", "/nope", Vec::new())).unwrap_err();
/// assert_eq!(missing.status(), 404);
/// ```
#[derive(Debug, Clone, Default)]
pub struct Router {
    routes: Vec<Route>,
}

#[derive(Debug, Clone)]
struct Route {
    method: String,
    pattern: String,
    run: RouteFn,
}

impl Router {
    /// A router with no routes.
    pub fn new() -> Router {
        Router::default()
    }

    /// Adds a route for `method` (any case) and `pattern`; the first route added that matches
    /// a request answers it.
    pub fn route(mut self, method: &str, pattern: &str, run: RouteFn) -> Router {
        self.routes.push(Route { method: method.to_ascii_uppercase(), pattern: pattern.to_owned(), run });
        self
    }

    /// Adds a `GET` route.
    pub fn get(self, pattern: &str, run: RouteFn) -> Router {
        self.route("GET", pattern, run)
    }

    /// Adds a `POST` route.
    pub fn post(self, pattern: &str, run: RouteFn) -> Router {
        self.route("POST", pattern, run)
    }

    /// Runs the route that matches `request`, with its captures set.
    pub fn handle(&self, mut request: Request) -> Result<Response, Error> {
        let path = request.path().split('?').next().unwrap_or("/").to_owned();
        let mut allowed: Vec<&str> = Vec::new();
        for route in &self.routes {
            let Some(params) = captures(&route.pattern, &path) else {
                continue;
            };
            if route.method != request.method() {
                allowed.push(&route.method);
                continue;
            }
            request.set_params(params);
            return (route.run)(request);
        }
        if !allowed.is_empty() {
            let allow = allowed.join(", ");
            return Err(Error::with_status(405, format!("{} {path}: use {allow}", request.method())));
        }
        let routes: Vec<String> = self.routes.iter().map(|r| format!("{} {}", r.method, r.pattern)).collect();
        Err(Error::with_status(404, format!("no route for {path}; routes: {}", routes.join(", "))))
    }
}

/// The captures of `path` under `pattern`, or `None` when it does not match.
fn captures(pattern: &str, path: &str) -> Option<Vec<(String, String)>> {
    let mut wanted = pattern.trim_matches('/').split('/');
    let mut given = path.trim_matches('/').split('/');
    let mut params = Vec::new();
    loop {
        match (wanted.next(), given.next()) {
            (None, None) => return Some(params),
            (Some(w), Some(g)) => match w.strip_prefix('{').and_then(|w| w.strip_suffix('}')) {
                Some(name) if !g.is_empty() => params.push((name.to_owned(), g.to_owned())),
                Some(_) => return None,
                None if w == g => {}
                None => return None,
            },
            _ => return None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn echo(request: Request) -> Result<Response, Error> {
        let body = format!("{} {:?}", request.method(), request.param("id"));
        Ok(Response::text(200, body))
    }

    #[test]
    fn routes_match_by_method_and_path_with_captures_and_ignore_the_query() {
        let router = Router::new().post("/", echo).get("/items/{id}", echo).route("delete", "/items/{id}", echo);
        let answer = |method: &str, path: &str| router.handle(Request::new(method, path, Vec::new()));
        assert_eq!(answer("POST", "/").expect("root").body(), b"POST None");
        assert_eq!(answer("POST", "").expect("empty path is the root").body(), b"POST None");
        assert_eq!(answer("GET", "/items/42?x=1").expect("capture").body(), b"GET Some(\"42\")");
        assert_eq!(answer("DELETE", "/items/9/").expect("trailing slash").body(), b"DELETE Some(\"9\")");
    }

    #[test]
    fn a_wrong_method_is_405_naming_the_right_ones_and_an_unknown_path_404_listing_the_routes() {
        let router = Router::new().post("/", echo).get("/items/{id}", echo);
        let error = router.handle(Request::new("GET", "/", Vec::new())).expect_err("405");
        assert_eq!((error.status(), error.message()), (405, "GET /: use POST"));
        let error = router.handle(Request::new("GET", "/items", Vec::new())).expect_err("404");
        assert_eq!(error.status(), 404);
        assert!(error.message().contains("routes: POST /, GET /items/{id}"), "{error}");
        assert!(router.handle(Request::new("GET", "/items//", Vec::new())).is_err(), "an empty capture does not match");
    }
}
