//! Who may talk to the dashboard.
//!
//! The dashboard listens on loopback by default, but loopback is not a wall: any web page
//! the user opens can send requests to `127.0.0.1`, and a page whose name re-binds to
//! 127.0.0.1 (DNS rebinding) can even read the answers. So every request passes three
//! checks before a handler sees it:
//!
//! - **Host**: the name the browser asked for must be the address served, a loopback name
//!   (`localhost`, `127.0.0.1`, `[::1]`, on any port: an SSH tunnel may forward another),
//!   a name given with `--allow-host`, or, for a server on every interface, any name on
//!   its port. A rebinding page asks for its own name: 403.
//! - **Origin** and **Sec-Fetch-Site**: a request sent by a page of another site (any
//!   other origin, another port of localhost included) is refused: 403, except a link that
//!   opens the page itself. Requests without them (curl, a typed URL) pass.
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
    /// The `Host` values accepted besides loopback names: the address served and the
    /// `--allow-host` names (lower case; `name:port`, or a bare name for any port).
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
        let mut hosts = vec![host_of(&addr)];
        for h in allow_hosts {
            hosts.push(parse_host(h)?);
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

    /// Why a request with `headers` may not reach this server (403), if it may not; `page`:
    /// a GET of the page itself (`/`), which a link from another site may open.
    fn refuse_site(&self, headers: &HeaderMap, page: bool) -> Option<String> {
        let host = match headers.get(header::HOST).map(HeaderValue::to_str) {
            Some(Ok(h)) => h.trim().to_ascii_lowercase(),
            _ => return Some("no Host header".into()),
        };
        let (name, port) = split_host(&host);
        let ok = LOOPBACK_NAMES.contains(&name)
            || (self.addr.ip().is_unspecified() && port == self.addr.port())
            || self
                .hosts
                .iter()
                .any(|h| *h == format!("{name}:{port}") || h == name);
        if !ok {
            return Some(format!(
                "Host {host:?} is not an address of this dashboard ({}, or localhost); a page \
                 that re-binds its name to this machine is refused (cifar-df ui --allow-host \
                 NAME adds a name)",
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
        let cross_site = headers
            .get("sec-fetch-site")
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"cross-site"));
        // A link from another site to the page (a wiki, a chat) opens it; its data and SQL
        // come from the page's own requests afterwards, never from another site's.
        let navigation = headers
            .get("sec-fetch-mode")
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"navigate"));
        if cross_site && !(navigation && page) {
            return Some("a request from another site".into());
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

/// The names of this machine's loopback, accepted as `Host` on any port: a page that
/// re-binds its own name to 127.0.0.1 still sends its own name, and an SSH tunnel may
/// forward another local port (`ssh -L 9000:127.0.0.1:8080`).
const LOOPBACK_NAMES: [&str; 3] = ["localhost", "127.0.0.1", "[::1]"];

/// A `Host` value's name and port (80 where none is written), lower case.
fn split_host(host: &str) -> (&str, u16) {
    let (name, port) = match host.rfind(':') {
        // `[::1]` has colons, but its port comes after the `]`.
        Some(i) if !host[i..].contains(']') => (&host[..i], host[i + 1..].parse().ok()),
        _ => (host, Some(80)),
    };
    // A port that is not a number matches nothing.
    (name, port.unwrap_or(0))
}

/// An `--allow-host` value: `NAME`, `NAME:PORT`, `[V6]` or `[V6]:PORT`, lower case.
fn parse_host(h: &str) -> Result<String> {
    let h = h.trim().to_ascii_lowercase();
    let bad = || {
        Error::usage(format!(
            "--allow-host {h:?}: expected a host name (myserver.lan), optionally with a port \
             (myserver.lan:9000; IPv6 in brackets: [fe80::1]:9000)"
        ))
    };
    let (name, port) = if let Some(rest) = h.strip_prefix('[') {
        let (v6, after) = rest.split_once(']').ok_or_else(bad)?;
        v6.parse::<std::net::Ipv6Addr>().map_err(|_| bad())?;
        (format!("[{v6}]"), after.strip_prefix(':'))
    } else {
        match h.split_once(':') {
            Some((n, p)) => (n.to_string(), Some(p)),
            None => (h.clone(), None),
        }
    };
    let name_ok = !name.is_empty()
        && name.bytes().all(|b| {
            b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_' | b'[' | b']' | b':')
        });
    if !name_ok {
        return Err(bad());
    }
    match port {
        None => Ok(name),
        Some(p) => {
            let p: u16 = p.parse().map_err(|_| bad())?;
            Ok(format!("{name}:{p}"))
        }
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
    // Characters a URL, a cookie and a header carry as they are.
    let plain = |b: u8| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~');
    if t.len() < 16 || !t.bytes().all(plain) {
        return Err(Error::usage(
            "the dashboard token must be at least 16 characters of A-Z, a-z, 0-9, '-', '_', \
             '.' and '~' (e.g. `openssl rand -hex 24`; leave it out for a random one)",
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
    let page = req.method() == axum::http::Method::GET && req.uri().path() == "/";
    let mut res = if let Some(why) = access.refuse_site(req.headers(), page) {
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
        let refuse = |h: &HeaderMap| a.refuse_site(h, false);
        // Its loopback names on any port (an SSH tunnel may forward another one).
        for ok in [
            "127.0.0.1:8080",
            "localhost:8080",
            "LOCALHOST:8080",
            "[::1]:8080",
            "127.0.0.1:9090",
            "localhost",
        ] {
            assert_eq!(refuse(&headers(&[("host", ok)])), None, "{ok}");
        }
        // Another name (a page re-binding its own name to 127.0.0.1), another address.
        for bad in [
            "evil.example:8080",
            "evil.example",
            "10.0.0.1:8080",
            "localhost.evil.example:8080",
            "127.0.0.1.evil.example:8080",
            "[::2]:8080",
        ] {
            let why = refuse(&headers(&[("host", bad)])).unwrap();
            assert!(why.contains("Host"), "{bad}: {why}");
        }
        assert!(refuse(&HeaderMap::new()).is_some(), "no Host");
        // Its own page may send an Origin; another site's may not.
        let own = headers(&[
            ("host", "127.0.0.1:8080"),
            ("origin", "http://127.0.0.1:8080"),
        ]);
        assert_eq!(refuse(&own), None);
        for origin in ["http://evil.example", "http://localhost:3000", "null"] {
            let h = headers(&[("host", "127.0.0.1:8080"), ("origin", origin)]);
            assert!(refuse(&h).is_some(), "{origin}");
        }
        // A request of another site's page is refused; a link to the page opens it.
        let fetch = headers(&[("host", "localhost:8080"), ("sec-fetch-site", "cross-site")]);
        assert!(refuse(&fetch).is_some());
        assert!(
            a.refuse_site(&fetch, true).is_some(),
            "a fetch, not a navigation"
        );
        let link = headers(&[
            ("host", "localhost:8080"),
            ("sec-fetch-site", "cross-site"),
            ("sec-fetch-mode", "navigate"),
        ]);
        assert_eq!(a.refuse_site(&link, true), None);
        assert!(refuse(&link).is_some(), "a navigation to the API");
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
        let refuse = |h: &HeaderMap| a.refuse_site(h, false);
        assert_eq!(refuse(&headers(&[("host", "node7:8080")])), None);
        assert!(refuse(&headers(&[("host", "node7:9999")])).is_some());
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
        for bad in [
            "short",
            "has a space in it!!",
            "0123456789abcdef+/=",
            "0123456789abcdef%2F",
        ] {
            let e = Access::new(addr, Some(bad.into()), &[])
                .unwrap_err()
                .to_string();
            assert!(e.contains("at least 16"), "{bad}: {e}");
        }
        let a = Access::new(addr, Some("0123456789abcdef".into()), &[]).unwrap();
        assert!(!a.has_token(&HeaderMap::new(), None));
        assert!(a.has_token(&HeaderMap::new(), Some("token=0123456789abcdef")));
        assert!(!a.has_token(&HeaderMap::new(), Some("token=0123456789abcdeF")));
        // The printed link carries it as it is.
        let t = "Ab-_.~0123456789xyz";
        let a = Access::new(addr, Some(t.into()), &[]).unwrap();
        let query = a.url().split_once('?').unwrap().1.to_string();
        assert!(a.has_token(&HeaderMap::new(), Some(&query)), "{query}");
    }

    #[test]
    fn allowed_names_join_the_address_served() {
        let a = Access::new(
            "10.1.2.3:8080".parse().unwrap(),
            None,
            &[
                "MyServer.lan".into(),
                "proxy.lan:443".into(),
                "[FE80::1]:9000".into(),
            ],
        )
        .unwrap();
        let refuse = |h: &str| a.refuse_site(&headers(&[("host", h)]), false);
        for ok in [
            "10.1.2.3:8080",
            "myserver.lan:8080",
            "myserver.lan:9000",
            "proxy.lan:443",
            "[fe80::1]:9000",
        ] {
            assert_eq!(refuse(ok), None, "{ok}");
        }
        for bad in [
            "other.lan:8080",
            "proxy.lan:8080",
            "[fe80::1]:8080",
            "10.1.2.3:9090",
        ] {
            assert!(refuse(bad).is_some(), "{bad}");
        }
        // On every interface too: a name through a proxy on another port.
        let w = Access::new(
            "0.0.0.0:8080".parse().unwrap(),
            None,
            &["proxy.lan:443".into()],
        )
        .unwrap();
        assert_eq!(
            w.refuse_site(&headers(&[("host", "proxy.lan:443")]), false),
            None
        );
        for bad in ["a/b", "x@y", "", "[zz]:1", "name:notaport", "[fe80::1"] {
            let addr = "10.1.2.3:8080".parse().unwrap();
            let e = Access::new(addr, None, &[bad.into()])
                .unwrap_err()
                .to_string();
            assert!(e.contains("--allow-host"), "{bad}: {e}");
        }
    }

    #[test]
    fn comparison_is_exact() {
        assert!(same("abc", "abc"));
        assert!(!same("abc", "abd"));
        assert!(!same("abc", "abcd"));
        assert!(!same("", "a"));
    }
}
