//! Who may give a worker work, and what work: the workers' shared secret, checked on every
//! call, and the refusal of plans that write files.
//!
//! As Spark's `spark.authenticate`: the workers and the commands that use them share a
//! secret ([`Secret`]), read from a file (`--secret-file FILE`) or the environment
//! (`CIFAR_DF_SECRET`), never from a flag that `ps` would show. The secret itself never
//! crosses the wire: every gRPC call a coordinator (or a worker, for a shuffle) makes
//! carries the header
//!
//! ```text
//! x-cifar-df-auth: v1:<unix seconds>:<hex HMAC-SHA256(secret, "cifar-df worker v1:<unix seconds>")>
//! ```
//!
//! computed afresh for each call ([`Channels`], the session's channel resolver). A worker
//! with a secret refuses any call whose header is missing, is not the MAC of its time under
//! the worker's secret, or whose time is more than [`MAX_SKEW_SECS`] from the worker's
//! clock ([`Gate`]), with `Unauthenticated`. The traffic itself (plans, rows) is not
//! encrypted.
//!
//! A worker also refuses any plan that writes ([`refuse_writing_plans`]): workers only
//! read.

use std::ffi::OsString;
use std::fmt;
use std::path::Path;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use datafusion::datasource::sink::DataSinkExec;
use datafusion::error::DataFusionError;
use datafusion::physical_plan::ExecutionPlan;
use datafusion_distributed::{
    grpc, ChannelResolver, WorkerChannel, WorkerPlanRewriteEvent, WorkerPlanRewriteEventResponse,
};
use hmac::{Hmac, Mac};
use sha2::Sha256;
use tonic::codegen::http;
use tower::ServiceExt;
use url::Url;

use crate::error::{Error, Result};

/// The environment variable that holds the shared secret (when `--secret-file` is not given).
pub const SECRET_ENV: &str = "CIFAR_DF_SECRET";

/// The header every call to a worker carries.
pub const HEADER: &str = "x-cifar-df-auth";

/// How far (in seconds, either way) a header's time may be from the worker's clock.
pub const MAX_SKEW_SECS: u64 = 300;

/// What the MAC covers, before the time.
const CONTEXT: &str = "cifar-df worker v1:";

/// The most bytes a secret file may hold.
const MAX_SECRET_FILE: u64 = 64 * 1024;

/// What a worker's refusal says, and what a coordinator looks for.
pub const REFUSED: &str = "wrong or missing secret";

/// The workers' shared secret, and where it was read from (for messages). Its bytes are
/// never printed.
#[derive(Clone)]
pub struct Secret {
    key: Arc<[u8]>,
    from: Arc<str>,
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Secret(from {}, {} bytes)", self.from, self.key.len())
    }
}

impl Secret {
    /// The secret `bytes` (without leading and trailing whitespace, so a file's final
    /// newline does not count), read from `from` (`--secret-file F`, `CIFAR_DF_SECRET`).
    /// Nothing but whitespace is a usage error naming `from`.
    pub fn new(bytes: &[u8], from: &str) -> Result<Secret> {
        let key = bytes.trim_ascii();
        if key.is_empty() {
            return Err(Error::usage(format!(
                "{from}: the workers' secret is empty (or only whitespace); put a long random \
                 string there, e.g. from `openssl rand -hex 32`"
            )));
        }
        Ok(Secret {
            key: Arc::from(key),
            from: Arc::from(from),
        })
    }

    /// The secret of `--secret-file FILE` when given, else of the `CIFAR_DF_SECRET`
    /// variable, else none.
    pub fn resolve(file: Option<&Path>) -> Result<Option<Secret>> {
        Self::resolve_from(file, std::env::var_os(SECRET_ENV))
    }

    /// [`Secret::resolve`] with the variable's value given.
    pub fn resolve_from(file: Option<&Path>, env: Option<OsString>) -> Result<Option<Secret>> {
        if let Some(path) = file {
            let from = format!("--secret-file {}", path.display());
            let bytes = read_secret_file(path).map_err(|e| Error::usage(format!("{from}: {e}")))?;
            return Self::new(&bytes, &from).map(Some);
        }
        match env {
            None => Ok(None),
            Some(v) => {
                let v = v.into_string().map_err(|_| {
                    Error::usage(format!(
                        "{SECRET_ENV}: the workers' secret is not UTF-8 text"
                    ))
                })?;
                Self::new(v.as_bytes(), SECRET_ENV).map(Some)
            }
        }
    }

    /// Where the secret was read from: `--secret-file F` or `CIFAR_DF_SECRET`.
    pub fn from(&self) -> &str {
        &self.from
    }

    fn mac(&self, unix: u64) -> Hmac<Sha256> {
        // HMAC takes a key of any length: this cannot fail.
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&self.key)
            .unwrap_or_else(|_| unreachable!("HMAC accepts keys of any length"));
        mac.update(format!("{CONTEXT}{unix}").as_bytes());
        mac
    }

    /// The header's value at `unix` seconds: `v1:<unix>:<hex MAC>`.
    pub fn header_at(&self, unix: u64) -> String {
        let tag = self.mac(unix).finalize().into_bytes();
        format!("v1:{unix}:{}", to_hex(&tag))
    }

    /// The header's value now.
    pub fn header(&self) -> String {
        self.header_at(now())
    }

    /// Checks a call's header `value` (absent: `None`) at `now` (unix seconds): `Err` says
    /// what is wrong with it. The MAC is compared in constant time.
    pub fn verify(&self, value: Option<&[u8]>, now: u64) -> std::result::Result<(), String> {
        let value = value.ok_or_else(|| format!("the call has no {HEADER} header"))?;
        let bad = || format!("its {HEADER} header is not v1:SECONDS:HMAC");
        let value = std::str::from_utf8(value).map_err(|_| bad())?;
        let mut parts = value.splitn(3, ':');
        let (Some("v1"), Some(time), Some(tag)) = (parts.next(), parts.next(), parts.next()) else {
            return Err(bad());
        };
        let time: u64 = time.parse().map_err(|_| bad())?;
        let skew = now.abs_diff(time);
        if skew > MAX_SKEW_SECS {
            return Err(format!(
                "its {HEADER} header is {skew} s from the worker's clock (at most \
                 {MAX_SKEW_SECS} s: check the machines' clocks)"
            ));
        }
        let tag = from_hex(tag).ok_or_else(bad)?;
        self.mac(time)
            .verify_slice(&tag)
            .map_err(|_| format!("its {HEADER} header was made with another secret"))
    }
}

/// The bytes of a secret file, at most [`MAX_SECRET_FILE`]; warns (once a process) when
/// others than its owner may read it.
fn read_secret_file(path: &Path) -> std::result::Result<Vec<u8>, String> {
    let file = std::fs::File::open(path).map_err(|e| format!("cannot read it: {e}"))?;
    let meta = file
        .metadata()
        .map_err(|e| format!("cannot read it: {e}"))?;
    if !meta.is_file() {
        return Err("not a file".into());
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            static WARNED: std::sync::Once = std::sync::Once::new();
            WARNED.call_once(|| {
                tracing::warn!(
                    "--secret-file {}: readable by other users than its owner (mode {mode:03o}); \
                     keep it private: chmod 600 {}",
                    path.display(),
                    path.display()
                )
            });
        }
    }
    crate::store::read_at_most(file, MAX_SECRET_FILE)
        .map_err(|e| format!("cannot read it: {e}"))?
        .ok_or_else(|| {
            format!(
                "larger than {} KiB: not a secret file",
                MAX_SECRET_FILE / 1024
            )
        })
}

/// Unix seconds now (0 before 1970).
fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn to_hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[usize::from(b >> 4)] as char);
        s.push(DIGITS[usize::from(b & 15)] as char);
    }
    s
}

fn from_hex(s: &str) -> Option<Vec<u8>> {
    let nibble = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    let b = s.as_bytes();
    if !b.len().is_multiple_of(2) {
        return None;
    }
    b.chunks(2)
        .map(|p| Some((nibble(p[0])? << 4) | nibble(p[1])?))
        .collect()
}

/// The channel resolver of cifar-df's distributed sessions (coordinators and workers):
/// datafusion-distributed's own (one connection per worker, reused), with the
/// [`HEADER`] of the secret added to every request, made when the request is sent.
#[derive(Clone)]
pub struct Channels {
    inner: grpc::DefaultChannelResolver,
    secret: Option<Secret>,
}

impl Channels {
    /// Channels presenting `secret` (none: calls carry no header).
    pub fn new(secret: Option<Secret>) -> Self {
        Channels {
            inner: grpc::DefaultChannelResolver::default(),
            secret,
        }
    }

    /// The channel to the worker at `url`.
    pub async fn channel(&self, url: &Url) -> datafusion::error::Result<grpc::BoxCloneSyncChannel> {
        let channel = self.inner.get_channel(url).await?;
        let Some(secret) = self.secret.clone() else {
            return Ok(channel);
        };
        let signed = channel.map_request(move |mut req: http::Request<tonic::body::Body>| {
            if let Ok(v) = http::HeaderValue::from_str(&secret.header()) {
                req.headers_mut()
                    .insert(http::HeaderName::from_static(HEADER), v);
            }
            req
        });
        Ok(grpc::BoxCloneSyncChannel::new(signed))
    }
}

#[async_trait]
impl ChannelResolver for Channels {
    async fn get_worker_client_for_url(
        &self,
        url: &Url,
    ) -> datafusion::error::Result<Box<dyn WorkerChannel>> {
        Ok(grpc::create_worker_client(self.channel(url).await?))
    }
}

/// A worker's check of every call (a tonic interceptor): with a secret, a call without a
/// valid [`HEADER`] is refused, `Unauthenticated`; without one, every call passes.
#[derive(Clone)]
pub struct Gate {
    secret: Option<Secret>,
}

impl Gate {
    /// The gate of a worker with `secret`.
    pub fn new(secret: Option<Secret>) -> Self {
        Gate { secret }
    }
}

impl tonic::service::Interceptor for Gate {
    fn call(
        &mut self,
        request: tonic::Request<()>,
    ) -> std::result::Result<tonic::Request<()>, tonic::Status> {
        let Some(secret) = &self.secret else {
            return Ok(request);
        };
        let value = request.metadata().get(HEADER).map(|v| v.as_bytes());
        match secret.verify(value, now()) {
            Ok(()) => Ok(request),
            Err(why) => {
                let from = request
                    .remote_addr()
                    .map_or_else(|| "?".to_string(), |a| a.to_string());
                tracing::warn!("refused a call from {from}: {why}");
                Err(tonic::Status::unauthenticated(format!(
                    "cifar-df worker: {REFUSED}: {why} (set the same {SECRET_ENV} or \
                     --secret-file as the worker)"
                )))
            }
        }
    }
}

/// The worker's message when a call was refused for its secret, if `e` is that refusal.
pub fn refusal(e: &DataFusionError) -> Option<String> {
    match e {
        DataFusionError::External(inner) => inner
            .downcast_ref::<tonic::Status>()
            .filter(|s| s.code() == tonic::Code::Unauthenticated)
            .map(|s| s.message().to_string()),
        DataFusionError::Context(_, inner) => refusal(inner),
        DataFusionError::Shared(inner) => refusal(inner),
        _ => None,
    }
}

/// `Err` naming the first node of `plan` that writes (a [`DataSinkExec`]: `COPY … TO`,
/// `INSERT`, or any other node whose name says it is a sink).
pub fn check_reads_only(plan: &Arc<dyn ExecutionPlan>) -> datafusion::error::Result<()> {
    let mut stack = vec![Arc::clone(plan)];
    while let Some(node) = stack.pop() {
        if node.is::<DataSinkExec>() || node.name().contains("Sink") {
            return Err(DataFusionError::Plan(format!(
                "cifar-df workers only read: this worker refuses a plan that writes ({}, \
                 e.g. COPY … TO or INSERT); run a writing statement without --workers",
                node.name()
            )));
        }
        stack.extend(node.children().into_iter().cloned());
    }
    Ok(())
}

/// The workers' plan rewrite handler: passes the plan on unchanged, or refuses it when it
/// writes ([`check_reads_only`]).
pub fn refuse_writing_plans(
    ev: WorkerPlanRewriteEvent<'_>,
) -> datafusion::error::Result<WorkerPlanRewriteEventResponse> {
    check_reads_only(&ev.plan)?;
    Ok(WorkerPlanRewriteEventResponse::new(ev.plan))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret(s: &str) -> Secret {
        Secret::new(s.as_bytes(), "test").unwrap()
    }

    #[test]
    fn the_header_verifies_with_the_right_secret_only_and_in_time() {
        let s = secret("correct horse battery staple");
        let t = 1_800_000_000;
        let h = s.header_at(t);
        assert!(h.starts_with(&format!("v1:{t}:")), "{h}");
        assert_eq!(h.len(), format!("v1:{t}:").len() + 64, "{h}");
        assert_eq!(s.verify(Some(h.as_bytes()), t), Ok(()));
        // Clocks a little apart either way.
        assert_eq!(s.verify(Some(h.as_bytes()), t + MAX_SKEW_SECS), Ok(()));
        assert_eq!(s.verify(Some(h.as_bytes()), t - MAX_SKEW_SECS), Ok(()));
        // A fresh header each time: another second, another MAC.
        assert_ne!(s.header_at(t + 1)[14..], h[14..]);

        // Another secret.
        let e = secret("wrong").verify(Some(h.as_bytes()), t).unwrap_err();
        assert!(e.contains("another secret"), "{e}");
        // Whitespace around the secret (a file's newline) does not count; inside it does.
        assert_eq!(
            secret("  correct horse battery staple\n").verify(Some(h.as_bytes()), t),
            Ok(())
        );
        assert!(secret("correct horse battery  staple")
            .verify(Some(h.as_bytes()), t)
            .is_err());
        // A tampered MAC, a MAC cut short, a time changed under the MAC.
        let mut bad = h.clone().into_bytes();
        let last = bad.len() - 1;
        bad[last] = if bad[last] == b'0' { b'1' } else { b'0' };
        assert!(s
            .verify(Some(&bad), t)
            .unwrap_err()
            .contains("another secret"));
        assert!(s.verify(Some(&h.as_bytes()[..h.len() - 2]), t).is_err());
        let moved = h.replacen(&t.to_string(), &(t + 1).to_string(), 1);
        assert!(s.verify(Some(moved.as_bytes()), t).is_err());
        // An old header (a replay) and one from the future.
        let e = s
            .verify(Some(h.as_bytes()), t + MAX_SKEW_SECS + 1)
            .unwrap_err();
        assert!(e.contains("clock"), "{e}");
        assert!(s.verify(Some(h.as_bytes()), t - MAX_SKEW_SECS - 1).is_err());
        // No header, or not one of ours.
        assert!(s
            .verify(None, t)
            .unwrap_err()
            .contains("no x-cifar-df-auth"));
        for junk in [
            "",
            "v1",
            "v2:1800000000:00",
            "v1:soon:00",
            "v1:1800000000:zz",
            "v1:1800000000:é1",
            "v1:-5:00",
        ] {
            assert!(s.verify(Some(junk.as_bytes()), t).is_err(), "{junk}");
        }
        assert!(s.verify(Some(&[0xff, 0xfe]), t).is_err());
        // The secret is not in the header, nor in Debug.
        assert!(!h.contains("horse"));
        assert!(!format!("{s:?}").contains("horse"));
    }

    #[test]
    fn the_mac_is_hmac_sha256_of_the_time() {
        // RFC 4231 test case 2: HMAC-SHA256("Jefe", "what do ya want for nothing?").
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(b"Jefe").unwrap();
        mac.update(b"what do ya want for nothing?");
        assert_eq!(
            to_hex(&mac.finalize().into_bytes()),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
        let s = secret("k");
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(b"k").unwrap();
        mac.update(b"cifar-df worker v1:42");
        assert_eq!(
            s.header_at(42),
            format!("v1:42:{}", to_hex(&mac.finalize().into_bytes()))
        );
        assert_eq!(from_hex("00ff10"), Some(vec![0, 255, 16]));
        assert_eq!(from_hex("0"), None);
    }

    #[test]
    fn the_secret_comes_from_the_file_else_the_variable_and_must_not_be_empty() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("secret");
        std::fs::write(&f, "from-the-file\n").unwrap();
        let env = Some(OsString::from("from-the-env"));
        let s = Secret::resolve_from(Some(&f), env.clone())
            .unwrap()
            .unwrap();
        assert!(s.from().starts_with("--secret-file"), "{s:?}");
        assert_eq!(&*s.key, b"from-the-file");
        let s = Secret::resolve_from(None, env).unwrap().unwrap();
        assert_eq!((s.from(), &*s.key), (SECRET_ENV, &b"from-the-env"[..]));
        assert!(Secret::resolve_from(None, None).unwrap().is_none());

        let e = Secret::resolve_from(None, Some(" \n".into())).unwrap_err();
        assert!(e.to_string().contains(SECRET_ENV) && e.to_string().contains("empty"));
        std::fs::write(&f, "\n\t \n").unwrap();
        let e = Secret::resolve_from(Some(&f), None)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(&f.display().to_string()) && e.contains("empty"),
            "{e}"
        );
        let gone = dir.path().join("gone");
        let e = Secret::resolve_from(Some(&gone), None)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(&gone.display().to_string()) && e.contains("cannot read"),
            "{e}"
        );
        let e = Secret::resolve_from(Some(dir.path()), None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("not a file"), "{e}");
        std::fs::write(&f, vec![b'x'; 65 * 1024]).unwrap();
        let e = Secret::resolve_from(Some(&f), None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("not a secret file"), "{e}");
    }

    #[tokio::test]
    async fn a_plan_that_writes_is_refused_and_a_select_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("pwned.csv");
        let ctx = datafusion::prelude::SessionContext::new();
        let copy = ctx
            .sql(&format!(
                "COPY (select 1 as x) TO '{}' STORED AS CSV",
                out.display()
            ))
            .await
            .unwrap()
            .create_physical_plan()
            .await
            .unwrap();
        let e = check_reads_only(&copy).unwrap_err().to_string();
        assert!(
            e.contains("workers only read") && e.contains("DataSinkExec"),
            "{e}"
        );
        let select = ctx
            .sql("select x, x + 1 as y from (select 1 as x) order by y")
            .await
            .unwrap()
            .create_physical_plan()
            .await
            .unwrap();
        check_reads_only(&select).unwrap();
        // INSERT into a table is a sink too.
        ctx.sql("create table t (x int)").await.unwrap();
        let insert = ctx
            .sql("insert into t values (1)")
            .await
            .unwrap()
            .create_physical_plan()
            .await
            .unwrap();
        assert!(check_reads_only(&insert).is_err());
        assert!(!out.exists());
    }
}
