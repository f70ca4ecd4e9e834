//! What a run's requests use: the counters of a run ([`Meter`], read as
//! [`EgressUse`]) and the bodies that count into them as they flow
//! ([`Metered`]), within the job's byte grant.

use super::super::sandbox::LiveLog;
use bytes::Bytes;
use http_body::{Body, Frame};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::sync::OwnedSemaphorePermit;
use wasmtime_wasi_http::Error;

/// What one run's requests used.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EgressUse {
    /// Requests sent (allowed and connected to); refused ones are not.
    pub requests: u64,
    /// Bytes sent: request heads and bodies.
    pub bytes_out: u64,
    /// Bytes received: response heads and the body bytes read.
    pub bytes_in: u64,
    /// Requests refused (policy, address, per-job or per-tenant bound).
    pub refused: u64,
}

impl EgressUse {
    /// Bytes both ways.
    pub fn bytes(&self) -> u64 {
        self.bytes_in.saturating_add(self.bytes_out)
    }

    /// Adds a run's use to its tenant's series (nothing for a run that
    /// made no request).
    pub(crate) fn record(&self, tenant: &str) {
        if *self == EgressUse::default() {
            return;
        }
        let t = tenant.to_string();
        let requests = |outcome: &'static str, n: u64| {
            metrics::counter!("agentplane_egress_requests_total", "tenant" => t.clone(), "outcome" => outcome)
                .increment(n)
        };
        requests("sent", self.requests);
        requests("refused", self.refused);
        let bytes = |direction: &'static str, n: u64| {
            metrics::counter!("agentplane_egress_bytes_total", "tenant" => t.clone(), "direction" => direction)
                .increment(n)
        };
        bytes("out", self.bytes_out);
        bytes("in", self.bytes_in);
    }
}

/// The counters behind [`EgressUse`], shared with the bodies in flight.
#[derive(Debug, Default)]
pub(crate) struct Meter {
    pub(super) requests: AtomicU64,
    bytes_out: AtomicU64,
    bytes_in: AtomicU64,
    pub(super) refused: AtomicU64,
    /// Every request the guest made, refused ones included (the per-job cap).
    pub(super) attempts: AtomicU64,
    /// Bytes both ways, never past `max_bytes`.
    total: AtomicU64,
    pub(super) max_bytes: u64,
}

impl Meter {
    pub(super) fn new(max_bytes: u64) -> Meter {
        Meter {
            max_bytes,
            ..Meter::default()
        }
    }

    /// Counts `n` bytes going `direction` if the grant has room for them;
    /// `false` (nothing counted) if not.
    pub(super) fn take(&self, direction: Direction, n: u64) -> bool {
        let room = self
            .total
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |t| {
                t.checked_add(n).filter(|t| *t <= self.max_bytes)
            })
            .is_ok();
        if room {
            match direction {
                Direction::In => &self.bytes_in,
                Direction::Out => &self.bytes_out,
            }
            .fetch_add(n, Ordering::AcqRel);
        }
        room
    }

    pub(crate) fn used(&self) -> EgressUse {
        EgressUse {
            requests: self.requests.load(Ordering::Acquire),
            bytes_out: self.bytes_out.load(Ordering::Acquire),
            bytes_in: self.bytes_in.load(Ordering::Acquire),
            refused: self.refused.load(Ordering::Acquire),
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Direction {
    In,
    Out,
}

/// A body counted into the run's [`Meter`] as it flows, within the job's
/// byte grant; a response body also capped in bytes, bounded in the time
/// between frames, and holding its request's place among the tenant's
/// requests in flight. A frame past either bound is not delivered.
pub(super) struct Metered<B> {
    inner: B,
    meter: Arc<Meter>,
    direction: Direction,
    /// The job's log and the request's URL, to say why a body stopped.
    about: Option<(LiveLog, String)>,
    seen: u64,
    cap: Option<u64>,
    idle: Option<(Duration, Pin<Box<tokio::time::Sleep>>)>,
    _permit: Option<OwnedSemaphorePermit>,
}

impl<B> Metered<B> {
    pub(super) fn new(inner: B, meter: Arc<Meter>, direction: Direction) -> Self {
        Metered {
            inner,
            meter,
            direction,
            about: None,
            seen: 0,
            cap: None,
            idle: None,
            _permit: None,
        }
    }

    pub(super) fn budgeted(mut self, log: LiveLog, url: String) -> Self {
        self.about = Some((log, url));
        self
    }

    pub(super) fn capped(mut self, bytes: u64) -> Self {
        self.cap = Some(bytes);
        self
    }

    pub(super) fn idle(mut self, t: Duration) -> Self {
        self.idle = Some((t, Box::pin(tokio::time::sleep(t))));
        self
    }

    pub(super) fn holding(mut self, permit: OwnedSemaphorePermit) -> Self {
        self._permit = Some(permit);
        self
    }

    fn stop(&self, why: String, error: Error) -> Poll<Option<Result<Frame<Bytes>, Error>>> {
        if let Some((log, url)) = &self.about {
            let what = match self.direction {
                Direction::In => "response of",
                Direction::Out => "request to",
            };
            log.push("egress", &format!("{what} {url} stopped: {why}"));
        }
        Poll::Ready(Some(Err(error)))
    }
}

impl<B> Body for Metered<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<Error>,
{
    type Data = Bytes;
    type Error = Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Error>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some((t, sleep)) = this.idle.as_mut() {
                    sleep.as_mut().reset(tokio::time::Instant::now() + *t);
                }
                let n = frame.data_ref().map_or(0, |d| d.len() as u64);
                if let Some(cap) = this.cap
                    && this.seen + n > cap
                {
                    return this.stop(
                        format!("its body passed {cap} bytes"),
                        Error::HttpResponseBodySize(Some(cap)),
                    );
                }
                if !this.meter.take(this.direction, n) {
                    let max = this.meter.max_bytes;
                    return this.stop(
                        format!("the job's {max} bytes of outgoing traffic are spent"),
                        match this.direction {
                            Direction::In => Error::HttpResponseBodySize(None),
                            Direction::Out => Error::HttpRequestBodySize(None),
                        },
                    );
                }
                this.seen += n;
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e.into()))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => {
                if let Some((_, sleep)) = this.idle.as_mut()
                    && sleep.as_mut().poll(cx).is_ready()
                {
                    return Poll::Ready(Some(Err(Error::ConnectionReadTimeout)));
                }
                Poll::Pending
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}
