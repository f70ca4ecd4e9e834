//! Agents' outgoing HTTP (`wasi:http/outgoing-handler`), sent by the host
//! under the tenant's egress policy (`allowed_outbound_hosts`,
//! [`crate::egress`]):
//!
//! - **Allowed or refused before anything leaves.** A request whose
//!   scheme, host and port no rule of the policy allows gets
//!   `HTTP-request-denied`; an empty policy (the default) allows nothing.
//! - **No way around it.** A name is resolved here, once, and the
//!   connection goes to an address from that answer: only public ones,
//!   unless a rule names the address itself (`destination-IP-prohibited`
//!   otherwise), so DNS rebinding and internal addresses (loopback, private
//!   ranges, the cloud metadata service) are out of reach. Redirects are
//!   answers, never followed here: a guest that follows one sends a new
//!   request, checked again. Sockets stay denied (`sandbox`).
//! - **Bounded.** Connect, first-byte and between-bytes timeouts (the
//!   guest's request options may shorten them, never lengthen them), all
//!   within the job's wall clock, which keeps running while the guest
//!   waits; a response body cap; requests in flight per tenant per node
//!   (`connection-limit-reached`); and the job's grant ([`EgressGrant`]):
//!   requests per job, refused ones included (`HTTP-request-denied`), and
//!   bytes per job, both ways, which is what its reservation covers.
//! - **Metered.** Requests sent and bytes each way are counted per run
//!   ([`EgressUse`]), for the run's bill, its report and the tenant's
//!   metrics; a byte past the grant is never delivered, so never counted.
//!
//! Each refusal also writes an `[egress]` line to the job's log, naming the
//! rule it broke.

mod meter;

pub use meter::EgressUse;
use meter::{Direction, Meter, Metered};

use super::config::EgressLimits;
use super::sandbox::LiveLog;
use crate::egress::{Policy, Refused};

use http_body_util::BodyExt;
use hyper_util::rt::TokioIo;
use std::future::Future;
use std::pin::pin;
use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock};
use std::task::Poll;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use wasmtime_wasi_http::{Error, RequestOptions, WasiBody, WasiHttpHooks};

/// What one job may spend on outgoing requests: where (its tenant's
/// `allowed_outbound_hosts`) and how much. The control plane reserves the
/// most it can cost at the claim; the host never lets it spend more.
#[derive(Debug, Clone, Default)]
pub struct EgressGrant {
    pub policy: Arc<Policy>,
    /// Requests the job may make, refused ones included.
    pub max_requests: u32,
    /// Bytes the job may send and receive, heads and bodies, in all.
    pub max_bytes: u64,
}

/// What a run's outgoing requests go through: the hooks `wasi:http` calls
/// to send each one. One per store; [`Egress::begin`] gives it the next
/// job's policy, counters and log.
pub(crate) struct Egress {
    grant: EgressGrant,
    limits: EgressLimits,
    /// The tenant's requests in flight on this node.
    slots: Arc<Semaphore>,
    meter: Arc<Meter>,
    log: LiveLog,
}

/// One job's part of [`Egress`].
pub(crate) struct EgressJob {
    pub grant: EgressGrant,
    pub log: LiveLog,
}

impl Egress {
    pub(crate) fn new(limits: EgressLimits, slots: Arc<Semaphore>, job: EgressJob) -> Egress {
        Egress {
            meter: Arc::new(Meter::new(job.grant.max_bytes)),
            grant: job.grant,
            limits,
            slots,
            log: job.log,
        }
    }

    /// Starts the next job on this store: its policy and log, fresh counters.
    pub(crate) fn begin(&mut self, job: EgressJob) {
        self.meter = Arc::new(Meter::new(job.grant.max_bytes));
        self.grant = job.grant;
        self.log = job.log;
    }

    pub(crate) fn used(&self) -> EgressUse {
        self.meter.used()
    }

    fn refuse(&self, what: &str, why: String, error: Error) -> Error {
        refuse(&self.meter, &self.log, what, why, error)
    }

    /// Decides a request before anything is sent: its URL, and the place
    /// among the tenant's requests in flight that it holds until its
    /// response body is done.
    fn admit(
        &mut self,
        request: &http::Request<WasiBody>,
    ) -> Result<(reqwest::Url, OwnedSemaphorePermit), Error> {
        let what = format!("{} {}", request.method(), request.uri());
        let n = self.meter.attempts.fetch_add(1, Ordering::AcqRel) + 1;
        if n > u64::from(self.grant.max_requests) {
            return Err(self.refuse(
                &what,
                format!(
                    "the job made {} requests, at most {} are allowed per job",
                    n, self.grant.max_requests
                ),
                Error::HttpRequestDenied,
            ));
        }
        let url = match reqwest::Url::parse(&request.uri().to_string()) {
            Ok(u) if matches!(u.scheme(), "http" | "https") && u.host_str().is_some() => u,
            _ => {
                return Err(self.refuse(
                    &what,
                    "not an http:// or https:// URL with a host".into(),
                    Error::HttpRequestUriInvalid,
                ));
            }
        };
        if !self.grant.policy.allows(&url) {
            let port = url.port_or_known_default().unwrap_or(0);
            return Err(self.refuse(
                &what,
                format!(
                    "{}://{}:{port} is not in the tenant's allowed_outbound_hosts",
                    url.scheme(),
                    url.host_str().unwrap_or_default()
                ),
                Error::HttpRequestDenied,
            ));
        }
        let permit = self.slots.clone().try_acquire_owned().map_err(|_| {
            self.refuse(
                &what,
                format!(
                    "the tenant has {} requests in flight on this node, the most allowed",
                    self.limits.max_in_flight_per_tenant
                ),
                Error::ConnectionLimitReached,
            )
        })?;
        Ok((url, permit))
    }

    /// The timeouts of a request: the node's, shortened by the guest's
    /// options. The job's wall clock bounds them too: at its deadline the
    /// run is dropped, requests in flight with it (`run::backstop`), and
    /// the job ends as a `timeout`.
    fn timeouts(&self, options: Option<RequestOptions>) -> Timeouts {
        let pick = |node: Duration, guest: Option<Duration>| guest.map_or(node, |g| g.min(node));
        let o = options.unwrap_or_default();
        Timeouts {
            connect: pick(self.limits.connect_timeout, o.connect_timeout),
            first_byte: pick(self.limits.first_byte_timeout, o.first_byte_timeout),
            between_bytes: pick(self.limits.between_bytes_timeout, o.between_bytes_timeout),
        }
    }
}

fn refuse(meter: &Meter, log: &LiveLog, what: &str, why: String, error: Error) -> Error {
    meter.refused.fetch_add(1, Ordering::AcqRel);
    log.push("egress", &format!("{what} refused: {why}"));
    error
}

#[derive(Debug, Clone, Copy)]
struct Timeouts {
    connect: Duration,
    first_byte: Duration,
    between_bytes: Duration,
}

type Sent = Result<
    (
        http::Response<WasiBody>,
        Box<dyn Future<Output = Result<(), Error>> + Send>,
    ),
    Error,
>;

impl WasiHttpHooks for Egress {
    fn send_request(
        &mut self,
        request: http::Request<WasiBody>,
        options: Option<RequestOptions>,
        _fut: Box<dyn Future<Output = Result<(), Error>> + Send>,
    ) -> Box<dyn Future<Output = Sent> + Send> {
        let (url, permit) = match self.admit(&request) {
            Ok(x) => x,
            Err(e) => return Box::new(async move { Err(e) }),
        };
        let call = Call {
            url,
            timeouts: self.timeouts(options),
            meter: self.meter.clone(),
            log: self.log.clone(),
            max_body: self.limits.max_response_bytes,
            permit,
        };
        Box::new(call.send(request))
    }
}

/// A stream a request goes over: TCP, or TLS over TCP.
trait Io: AsyncRead + AsyncWrite + Send + Unpin + 'static {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> Io for T {}

/// One admitted request on its way.
struct Call {
    url: reqwest::Url,
    timeouts: Timeouts,
    meter: Arc<Meter>,
    log: LiveLog,
    max_body: u64,
    permit: OwnedSemaphorePermit,
}

impl Call {
    fn refuse(&self, why: String, error: Error) -> Error {
        let what = format!("request to {}", self.url);
        refuse(&self.meter, &self.log, &what, why, error)
    }

    fn over_budget(&self) -> Error {
        self.log.push(
            "egress",
            &format!(
                "request to {} stopped: the job's {} bytes of outgoing traffic are spent",
                self.url, self.meter.max_bytes
            ),
        );
        Error::HttpRequestDenied
    }

    /// Connects to an address the policy allows: a name's public addresses
    /// as resolved here, or the address a rule names.
    async fn connect(&self) -> Result<Box<dyn Io>, Error> {
        let t = self.timeouts.connect;
        let addrs = match tokio::time::timeout(t, crate::egress::addresses(&self.url)).await {
            Err(_) => return Err(Error::DnsTimeout),
            Ok(Ok(a)) => a,
            Ok(Err(e)) => {
                return Err(match e.downcast_ref::<Refused>() {
                    Some(r) => self.refuse(r.0.clone(), Error::DestinationIpProhibited),
                    None => Error::DnsError {
                        rcode: Some(e.to_string()),
                        info_code: None,
                    },
                });
            }
        };
        let mut last = Error::DestinationUnavailable;
        let mut tcp = None;
        for addr in addrs {
            match tokio::time::timeout(t, TcpStream::connect(addr)).await {
                Ok(Ok(s)) => {
                    tcp = Some(s);
                    break;
                }
                Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                    last = Error::ConnectionRefused
                }
                Ok(Err(e)) => last = Error::Connect(e),
                Err(_) => last = Error::ConnectionTimeout,
            }
        }
        let tcp = tcp.ok_or(last)?;
        let _ = tcp.set_nodelay(true);
        if self.url.scheme() != "https" {
            return Ok(Box::new(tcp));
        }
        let host = self.url.host_str().unwrap_or_default();
        let name = rustls::pki_types::ServerName::try_from(
            host.trim_start_matches('[')
                .trim_end_matches(']')
                .to_string(),
        )
        .map_err(|_| Error::HttpRequestUriInvalid)?;
        let tls = tokio::time::timeout(t, tls().connect(name, tcp))
            .await
            .map_err(|_| Error::ConnectionTimeout)?
            .map_err(|_| Error::TlsCertificateError)?;
        Ok(Box::new(tls))
    }

    async fn send(self, request: http::Request<WasiBody>) -> Sent {
        let stream = self.connect().await?;
        let (mut sender, conn) = tokio::time::timeout(
            self.timeouts.connect,
            hyper::client::conn::http1::handshake(TokioIo::new(stream)),
        )
        .await
        .map_err(|_| Error::ConnectionTimeout)??;
        // Sent in origin form (`/path?query`); `Host` is already set.
        let (mut parts, body) = request.into_parts();
        parts.uri = http::Uri::builder()
            .path_and_query(parts.uri.path_and_query().map_or("/", |p| p.as_str()))
            .build()
            .map_err(|_| Error::HttpRequestUriInvalid)?;
        let head = head_bytes(&parts.headers) + parts.uri.to_string().len() as u64 + 16;
        if !self.meter.take(Direction::Out, head) {
            return Err(self.over_budget());
        }
        self.meter.requests.fetch_add(1, Ordering::AcqRel);
        let out = Metered::new(body, self.meter.clone(), Direction::Out)
            .budgeted(self.log.clone(), self.url.to_string());
        let request = http::Request::from_parts(parts, out);

        // Waits for the response's head while driving the connection.
        let mut conn = Some(Box::pin(conn));
        let mut response = pin!(sender.send_request(request));
        let head = std::future::poll_fn(|cx| {
            if let Poll::Ready(r) = response.as_mut().poll(cx) {
                return Poll::Ready(r.map_err(Error::from));
            }
            if let Some(c) = conn.as_mut()
                && let Poll::Ready(r) = c.as_mut().poll(cx)
            {
                conn = None;
                if let Err(e) = r {
                    return Poll::Ready(Err(Error::from(e)));
                }
                return response.as_mut().poll(cx).map_err(Error::from);
            }
            Poll::Pending
        });
        let res = tokio::time::timeout(self.timeouts.first_byte, head)
            .await
            .map_err(|_| Error::ConnectionReadTimeout)??;
        if !self
            .meter
            .take(Direction::In, head_bytes(res.headers()) + 16)
        {
            return Err(self.over_budget());
        }
        let Call {
            meter,
            log,
            max_body,
            permit,
            timeouts,
            url,
        } = self;
        let res = res.map(|incoming| {
            Metered::new(incoming, meter, Direction::In)
                .budgeted(log, url.to_string())
                .capped(max_body)
                .idle(timeouts.between_bytes)
                .holding(permit)
                .boxed_unsync()
        });
        let io: Box<dyn Future<Output = Result<(), Error>> + Send> = Box::new(async move {
            match conn {
                Some(c) => c.await.map_err(Error::from),
                None => Ok(()),
            }
        });
        Ok((res, io))
    }
}

/// Bytes of a header section as sent (`name: value\r\n` each).
fn head_bytes(h: &http::HeaderMap) -> u64 {
    h.iter()
        .map(|(k, v)| (k.as_str().len() + v.len() + 4) as u64)
        .sum()
}

/// The client TLS configuration of agents' `https://` requests: the ring
/// provider and the Mozilla roots.
fn tls() -> &'static tokio_rustls::TlsConnector {
    static TLS: OnceLock<tokio_rustls::TlsConnector> = OnceLock::new();
    TLS.get_or_init(|| {
        let roots = rustls::RootCertStore {
            roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
        };
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("the ring provider supports the default TLS versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
        tokio_rustls::TlsConnector::from(Arc::new(config))
    })
}
