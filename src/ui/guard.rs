//! Who may talk to the dashboard.
//!
//! The dashboard listens on loopback by default, but loopback is not a wall: any web page
//! the user opens can send requests to `127.0.0.1`, and a page whose name re-binds to
//! 127.0.0.1 (DNS rebinding) can even read the answers. So every request passes three
//! checks before a handler sees it:
//!
//! - **Host**: the name the browser asked for must be the address served (for a loopback
//!   server also `localhost`, `127.0.0.1` or `[::1]`, with the port; names given with
//!   `--allow-host`). A rebinding page asks for its own name: 403.
//! - **Origin** and **Sec-Fetch-Site**: a request sent by a page of another site (any
//!   other origin, another port of localhost included) is refused: 403. Requests without
//!   them (curl, a typed URL) pass.
//! - **Token**: beyond loopback (or when one is given) every request must carry the token,
//!   as `Authorization: Bearer T`, the `token` query parameter, or the cookie that opening
//!   `/?token=T` sets (HttpOnly, SameSite=Strict; the page is then reloaded without the
//!   token in its address): 401 without it.
//!
//! Every answer carries `X-Content-Type-Options: nosniff`, a Content-Security-Policy that
//! allows only the dashboard's own scripts, styles and requests, `X-Frame-Options: DENY`
//! and `Referrer-Policy: no-referrer`.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::error::{Error, Result};

/// The environment variable a token may come from (a `--token` flag shows in `ps`).
pub const TOKEN_ENV: &str = "CIFAR_DF_UI_TOKEN";

/// The policy every page and answer is served with.
pub const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
    img-src 'self' data: blob:; connect-src 'self'; base-uri 'none'; form-action 'none'; \
    frame-ancestors 'none'";

/// Who may use a dashboard served on one address.
#[derive(Clone, Debug)]
pub struct Access {
    /// The address served (the port the listener got, for port 0).
    addr: SocketAddr,
    /// The `Host` values accepted (lower case, with the port); empty: any (a server on
    /// every interface, which always has a token).
    hosts: Vec<String>,
    /// The token every request must carry, if any.
    token: Option<String>,
}

impl Access {
    /// The access rules of a dashboard served on `addr`. `token` is required; without one
    /// a server beyond loopback gets a random token (printed by the caller). `allow_hosts`
    /// are further names the server is reached by (a DNS name of this machine).
    pub fn new(addr: SocketAddr, token: Option<String>, allow_hosts: &[String]) -> Result<Self> {
        if let Some(t) = &token {
            check_token(t)?;
        }
        let token = match token {
            Some(t) => Some(t),
            None if addr.ip().is_loopback() => None,
            None => Some(random_token()?),
        };
        let port = addr.port();
        let mut hosts = Vec::new();
        if !addr.ip().is_unspecified() {
            hosts.push(host_of(&addr));
            if addr.ip().is_loopback() {
                for h in ["localhost", "127.0.0.1", "[::1]"] {
                    hosts.push(format!("{h}:{port}"));
                }
            }
            for h in allow_hosts {
                let h = h.trim().to_ascii_lowercase();
                if h.is_empty() || h.contains(['/', '@', ' ']) {
                    return Err(Error::usage(format!(
                        "--allow-host {h:?}: expected a host name, e.g. myserver.lan"
                    )));
                }
                hosts.push(if h.contains(':') && !h.starts_with('[') {
                    h
                } else {
                    format!("{h}:{port}")
                });
            }
        }
        hosts.sort();
        hosts.dedup();
        Ok(Access { addr, hosts, token })
    }

    /// The token requests need, if any.
    pub fn token(&self) -> Option<&str> {
        self.token.as_deref()
    }

    /// The address to open: this machine's loopback for a server on every interface, with
    /// the token when there is one.
    pub fn url(&self) -> String {
        let host = if self.addr.ip().is_unspecified() {
            format!("127.0.0.1:{}", self.addr.port())
        } else {
            host_of(&self.addr)
        };
        match &self.token {
            Some(t) => format!("http://{host}/?token={t}"),
            None => format!("http://{host}/"),
        }
    }

    fn cookie_name(&self) -> String {
        // Cookies do not tell ports apart: one name per served port.
        format!("cifar_df_token_{}", self.addr.port())
    }

    /// Why `headers` may not reach this server (403), if they may not.
    fn refuse_site(&self, headers: &HeaderMap) -> Option<String> {
        let host = match headers.get(header::HOST).map(HeaderValue::to_str) {
            Some(Ok(h)) => h.trim().to_ascii_lowercase(),
            _ => return Some("no Host header".into()),
        };
        let host_with_port = if host.ends_with(']') || !host.contains(':') {
            format!("{host}:80")
        } else {
            host.clone()
        };
        if self.hosts.is_empty() {
            // Every interface: any name of this machine, on the served port.
            if !host_with_port.ends_with(&format!(":{}", self.addr.port())) {
                return Some(format!("Host {host:?} is not this dashboard's port"));
            }
        } else if !self.hosts.contains(&host_with_port) {
            return Some(format!(
                "Host {host:?} is not an address of this dashboard ({}); a page that \
                 re-binds its name to this machine is refused (cifar-df ui --allow-host NAME \
                 adds a name)",
                self.hosts.join(", ")
            ));
        }
        if let Some(origin) = headers.get(header::ORIGIN) {
            let origin = origin.to_str().unwrap_or("").trim().to_ascii_lowercase();
            let own = [format!("http://{host}"), format!("https://{host}")];
            if !own.contains(&origin) {
                return Some(format!(
                    "a request from the page {origin:?}, not this dashboard's own"
                ));
            }
        }
        if let Some(site) = headers.get("sec-fetch-site") {
            if site.as_bytes().eq_ignore_ascii_case(b"cross-site") {
                return Some("a request from another site".into());
            }
        }
        None
    }

    /// Whether the request carries the token (always, where none is needed).
    fn has_token(&self, headers: &HeaderMap, query: Option<&str>) -> bool {
        let Some(want) = &self.token else {
            return true;
        };
        let bearer = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .is_some_and(|t| same(t.trim(), want));
        let cookie = self.cookie_token(headers).is_some_and(|t| same(&t, want));
        bearer || cookie || query_token(query).is_some_and(|t| same(&t, want))
    }

    fn cookie_token(&self, headers: &HeaderMap) -> Option<String> {
        let name = self.cookie_name();
        headers
            .get_all(header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(';'))
            .filter_map(|kv| kv.trim().split_once('='))
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.to_string())
    }
}

/// `host:port` of `addr` as a browser writes it (`[::1]:8080` for IPv6).
fn host_of(addr: &SocketAddr) -> String {
    match addr {
        SocketAddr::V4(a) => format!("{}:{}", a.ip(), a.port()),
        SocketAddr::V6(a) => format!("[{}]:{}", a.ip(), a.port()),
    }
}

/// The `token` parameter of a query string.
fn query_token(query: Option<&str>) -> Option<String> {
    url::form_urlencoded::parse(query?.as_bytes())
        .find(|(k, _)| k == "token")
        .map(|(_, v)| v.into_owned())
}

/// Equal strings, compared in a time that does not depend on where they differ.
fn same(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// A token a user chose: long enough to guess at no better than chance, and plain.
fn check_token(t: &str) -> Result<()> {
    if t.len() < 16
        || !t
            .bytes()
            .all(|b| b.is_ascii_graphic() && b != b';' && b != b',')
    {
        return Err(Error::usage(
            "the dashboard token must be at least 16 printable characters, without spaces, \
             ';' or ',' (leave it out for a random one)",
        ));
    }
    Ok(())
}

/// 24 random bytes from the system, as 48 hex digits.
pub fn random_token() -> Result<String> {
    use std::io::Read;
    let mut bytes = [0u8; 24];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .map_err(|e| Error::io("/dev/urandom", e))?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// The middleware: refuses other sites (403) and requests without the token (401), takes
/// `/?token=T` to a cookie, and adds the security headers to every answer.
pub async fn guard(State(access): State<Arc<Access>>, req: Request, next: Next) -> Response {
    let mut res = if let Some(why) = access.refuse_site(req.headers()) {
        refusal(StatusCode::FORBIDDEN, &why)
    } else if !access.has_token(req.headers(), req.uri().query()) {
        refusal(
            StatusCode::UNAUTHORIZED,
            "this dashboard needs its token: open the address cifar-df printed \
             (http://HOST:PORT/?token=…), or send Authorization: Bearer TOKEN",
        )
    } else if access.token.is_some()
        && req.uri().path() == "/"
        && query_token(req.uri().query()).is_some()
    {
        // The token from the printed link: kept in a cookie, and out of the address bar.
        let cookie = format!(
            "{}={}; HttpOnly; SameSite=Strict; Path=/",
            access.cookie_name(),
            access.token.as_deref().unwrap_or_default()
        );
        let mut r = (StatusCode::SEE_OTHER, [(header::LOCATION, "/")]).into_response();
        if let Ok(v) = HeaderValue::from_str(&cookie) {
            r.headers_mut().insert(header::SET_COOKIE, v);
        }
        r
    } else {
        next.run(req).await
    };
    let h = res.headers_mut();
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    res
}

fn refusal(status: StatusCode, why: &str) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        serde_json::json!({ "error": why }).to_string(),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn a_loopback_server_takes_its_own_names_only() {
        let a = Access::new("127.0.0.1:8080".parse().unwrap(), None, &[]).unwrap();
        assert!(a.token().is_none());
        for ok in [
            "127.0.0.1:8080",
            "localhost:8080",
            "LOCALHOST:8080",
            "[::1]:8080",
        ] {
            assert_eq!(a.refuse_site(&headers(&[("host", ok)])), None, "{ok}");
        }
        for bad in [
            "evil.example:8080",
            "127.0.0.1:9090",
            "127.0.0.1",
            "evil.example",
        ] {
            let why = a.refuse_site(&headers(&[("host", bad)])).unwrap();
            assert!(why.contains("Host"), "{bad}: {why}");
        }
        assert!(a.refuse_site(&HeaderMap::new()).is_some(), "no Host");
        // Its own page may send an Origin; another site's may not.
        let own = headers(&[
            ("host", "127.0.0.1:8080"),
            ("origin", "http://127.0.0.1:8080"),
        ]);
        assert_eq!(a.refuse_site(&own), None);
        for origin in ["http://evil.example", "http://localhost:3000", "null"] {
            let h = headers(&[("host", "127.0.0.1:8080"), ("origin", origin)]);
            assert!(a.refuse_site(&h).is_some(), "{origin}");
        }
        let h = headers(&[("host", "localhost:8080"), ("sec-fetch-site", "cross-site")]);
        assert!(a.refuse_site(&h).is_some());
    }

    #[test]
    fn beyond_loopback_a_random_token_is_needed() {
        let a = Access::new("0.0.0.0:8080".parse().unwrap(), None, &[]).unwrap();
        let t = a.token().unwrap().to_string();
        assert_eq!(t.len(), 48);
        let b = Access::new("0.0.0.0:8080".parse().unwrap(), None, &[]).unwrap();
        assert_ne!(b.token().unwrap(), t, "a fresh token each time");
        assert!(a.url().ends_with(&format!("/?token={t}")), "{}", a.url());
        // Any name of the machine, on the port.
        assert_eq!(a.refuse_site(&headers(&[("host", "node7:8080")])), None);
        assert!(a.refuse_site(&headers(&[("host", "node7:9999")])).is_some());
        assert!(!a.has_token(&HeaderMap::new(), None));
        assert!(!a.has_token(&HeaderMap::new(), Some("token=wrong")));
        assert!(a.has_token(&HeaderMap::new(), Some(&format!("x=1&token={t}"))));
        let bearer = format!("Bearer {t}");
        assert!(a.has_token(&headers(&[("authorization", &bearer)]), None));
        let cookie = format!("a=b; cifar_df_token_8080={t}");
        assert!(a.has_token(&headers(&[("cookie", &cookie)]), None));
        let other_port = format!("cifar_df_token_9090={t}");
        assert!(!a.has_token(&headers(&[("cookie", &other_port)]), None));
    }

    #[test]
    fn a_chosen_token_is_checked_and_used_on_loopback_too() {
        let addr: SocketAddr = "127.0.0.1:8080".parse().unwrap();
        assert!(Access::new(addr, Some("short".into()), &[]).is_err());
        assert!(Access::new(addr, Some("has a space in it!!".into()), &[]).is_err());
        let a = Access::new(addr, Some("0123456789abcdef".into()), &[]).unwrap();
        assert!(!a.has_token(&HeaderMap::new(), None));
        assert!(a.has_token(&HeaderMap::new(), Some("token=0123456789abcdef")));
        assert!(!a.has_token(&HeaderMap::new(), Some("token=0123456789abcdeF")));
    }

    #[test]
    fn allowed_names_join_a_specific_address() {
        let a = Access::new(
            "10.1.2.3:8080".parse().unwrap(),
            None,
            &["MyServer.lan".into()],
        )
        .unwrap();
        assert_eq!(a.refuse_site(&headers(&[("host", "10.1.2.3:8080")])), None);
        assert_eq!(
            a.refuse_site(&headers(&[("host", "myserver.lan:8080")])),
            None
        );
        assert!(a
            .refuse_site(&headers(&[("host", "other.lan:8080")]))
            .is_some());
        assert!(Access::new("10.1.2.3:8080".parse().unwrap(), None, &["a/b".into()]).is_err());
    }

    #[test]
    fn comparison_is_exact() {
        assert!(same("abc", "abc"));
        assert!(!same("abc", "abd"));
        assert!(!same("abc", "abcd"));
        assert!(!same("", "a"));
    }
}
