//! The DNS port: UDP and TCP on each configured address, served by
//! hickory's server with meshward's [`Handler`]: mesh names from the table
//! in force, everything else through the [`Forwarder`].

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use hickory_net::runtime::Time;
use hickory_net::xfer::Protocol;
use hickory_proto::op::{
    Edns, Header, HeaderCounts, Message, MessageType, Metadata, OpCode, ResponseCode,
};
use hickory_proto::rr::rdata::{A, AAAA};
use hickory_proto::rr::{DNSClass, Name, RData, Record};
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::zone_handler::{MessageResponse, MessageResponseBuilder};
use tokio::net::{TcpListener, UdpSocket};
use tokio::sync::{Semaphore, watch};
use tokio_util::sync::CancellationToken;

use super::forwarder::{self, Question};
use super::{DEFAULT_TIMEOUT, DnsConfig, DnsError, DnsNames, DnsState, Forwarder, NameTable};
use crate::ProxyError;
use crate::metrics::Metrics;

/// The TTL of the proxy's own answers, as Istio's DNS proxy gives.
const TTL: u32 = 30;
/// A TCP client that sends no query for this long is disconnected.
const TCP_IDLE: Duration = Duration::from_secs(5);
/// Responses queued per TCP connection.
const TCP_RESPONSE_BUFFER: usize = 32;
/// Queries being forwarded at once; beyond, a query is answered SERVFAIL
/// at once rather than holding another socket (each forwarded query has
/// its own, for a random source port).
const MAX_FORWARDING: usize = 256;

/// The DNS proxy, bound and ready to serve.
pub struct DnsServer {
    udp: Vec<UdpSocket>,
    tcp: Vec<TcpListener>,
    addresses: Vec<SocketAddr>,
    handler: Handler,
}

impl DnsServer {
    /// Binds UDP and TCP on each address (one port for both, so port 0 is
    /// the same chosen port for each) and reads where to forward: a bind
    /// failure names the address, as every listener's does.
    pub async fn bind(
        config: &DnsConfig,
        names: DnsNames,
        metrics: Arc<Metrics>,
    ) -> Result<DnsServer, ProxyError> {
        let (upstreams, timeout) = if config.upstreams.is_empty() {
            let (upstreams, timeout) = forwarder::resolv_conf(Path::new(super::RESOLV_CONF))?;
            (upstreams, config.timeout.unwrap_or(timeout))
        } else {
            (
                config.upstreams.clone(),
                config.timeout.unwrap_or(DEFAULT_TIMEOUT),
            )
        };
        let forwarder = Forwarder::new(upstreams, timeout, config.mark)?;
        let mut server = DnsServer {
            udp: Vec::new(),
            tcp: Vec::new(),
            addresses: Vec::new(),
            handler: Handler {
                names: names.subscribe(),
                forwarder,
                forwarding: Arc::new(Semaphore::new(MAX_FORWARDING)),
                metrics,
            },
        };
        for addr in &config.listen {
            let (udp, tcp, bound) = bind_pair(*addr).await?;
            // Answers carry the proxy's mark too: capture's conntrack-zone
            // rules put the proxy's replies from the DNS port in the zone
            // of the application's redirected query, so the kernel undoes
            // the redirect and the answer comes from the nameserver the
            // application asked (a resolver drops any other).
            if let Some(mark) = config.mark {
                for marked in [
                    crate::socket::set_mark(&udp, mark),
                    crate::socket::set_mark(&tcp, mark),
                ] {
                    marked.map_err(|source| DnsError::Mark { mark, source })?;
                }
            }
            if let Some(upstream) = server
                .handler
                .forwarder
                .upstreams()
                .iter()
                .find(|u| loops(**u, bound))
            {
                return Err(DnsError::Loop {
                    upstream: *upstream,
                    listen: bound,
                }
                .into());
            }
            server.udp.push(udp);
            server.tcp.push(tcp);
            server.addresses.push(bound);
        }
        Ok(server)
    }

    /// Where it listens (UDP and TCP alike).
    pub fn addresses(&self) -> &[SocketAddr] {
        &self.addresses
    }

    pub(crate) fn state(&self, names: DnsNames) -> DnsState {
        DnsState {
            names,
            upstreams: self.handler.forwarder.upstreams().to_vec(),
        }
    }

    /// Serves until `shutdown`, then stops taking queries.
    pub async fn serve(self, shutdown: CancellationToken) {
        let mut server = hickory_server::Server::new(self.handler);
        for udp in self.udp {
            server.register_socket(udp);
        }
        for tcp in self.tcp {
            server.register_listener(tcp, TCP_IDLE, TCP_RESPONSE_BUFFER);
        }
        let stop = server.shutdown_token().clone();
        tokio::spawn(async move {
            shutdown.cancelled().await;
            stop.cancel();
        });
        if let Err(e) = server.block_until_done().await {
            tracing::error!("the DNS proxy stopped: {e}");
        }
    }
}

/// Whether queries forwarded to `upstream` would reach this proxy's own
/// DNS port at `listen`.
fn loops(upstream: SocketAddr, listen: SocketAddr) -> bool {
    upstream.port() == listen.port()
        && (upstream.ip() == listen.ip() || listen.ip().is_unspecified())
}

/// UDP and TCP on one address and port.
async fn bind_pair(addr: SocketAddr) -> Result<(UdpSocket, TcpListener, SocketAddr), ProxyError> {
    let error = |addr, what: &str, source| ProxyError::Bind {
        addr,
        what: what.to_owned(),
        source,
    };
    // With port 0 the system picks the UDP port, which TCP may have taken:
    // then another pick.
    let mut attempts = 0;
    loop {
        let udp = UdpSocket::bind(addr)
            .await
            .map_err(|e| error(addr, "dns/udp", e))?;
        let bound = udp.local_addr().map_err(|e| error(addr, "dns/udp", e))?;
        match TcpListener::bind(bound).await {
            Ok(tcp) => return Ok((udp, tcp, bound)),
            Err(e)
                if addr.port() == 0
                    && e.kind() == std::io::ErrorKind::AddrInUse
                    && attempts < 16 =>
            {
                attempts += 1;
            }
            Err(e) => return Err(error(bound, "dns/tcp", e)),
        }
    }
}

/// How a query ended, as counted in `meshward_dns_queries_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    /// A mesh name, answered from the table.
    Local,
    /// An upstream's answer, whatever its code.
    Forwarded,
    /// The proxy's own error: SERVFAIL (no upstream answered, too many
    /// queries in flight), FORMERR, NOTIMP.
    Failed,
}

impl Outcome {
    fn label(self) -> &'static str {
        match self {
            Outcome::Local => "local",
            Outcome::Forwarded => "forwarded",
            Outcome::Failed => "failed",
        }
    }
}

/// Answers one query.
struct Handler {
    names: watch::Receiver<Option<Arc<NameTable>>>,
    forwarder: Forwarder,
    forwarding: Arc<Semaphore>,
    metrics: Arc<Metrics>,
}

#[async_trait::async_trait]
impl RequestHandler for Handler {
    async fn handle_request<R: ResponseHandler, T: Time>(
        &self,
        request: &Request,
        response: R,
    ) -> ResponseInfo {
        let (outcome, info) = self.answer(request, response).await;
        self.metrics.dns_query(outcome.label());
        info
    }
}

impl Handler {
    async fn answer<R: ResponseHandler>(
        &self,
        request: &Request,
        response: R,
    ) -> (Outcome, ResponseInfo) {
        let failed = async |code| {
            (
                Outcome::Failed,
                send_error(request, response.clone(), code).await,
            )
        };
        if request.metadata.message_type != MessageType::Query {
            return failed(ResponseCode::FormErr).await;
        }
        if request.metadata.op_code != OpCode::Query {
            return failed(ResponseCode::NotImp).await;
        }
        // Exactly one question, as every resolver sends.
        let Ok(info) = request.request_info() else {
            return failed(ResponseCode::FormErr).await;
        };
        let query = info.query;
        let Some(table) = self.names.borrow().clone() else {
            tracing::debug!(name = %query.name(), "dns: no services from the control plane yet; SERVFAIL");
            return failed(ResponseCode::ServFail).await;
        };
        if query.query_class() == DNSClass::IN
            && let Some(addresses) = table.lookup(&query.name().to_string(), query.query_type())
        {
            tracing::debug!(name = %query.name(), kind = %query.query_type(), answers = addresses.len(), "dns: answered locally");
            return (
                Outcome::Local,
                answer_locally(request, response, query.original().name(), addresses).await,
            );
        }
        let Ok(_permit) = self.forwarding.clone().try_acquire_owned() else {
            tracing::debug!(name = %query.name(), "dns: too many queries being forwarded; SERVFAIL");
            return failed(ResponseCode::ServFail).await;
        };
        let question = Question {
            query: query.original().clone(),
            recursion_desired: request.metadata.recursion_desired,
            checking_disabled: request.metadata.checking_disabled,
            edns: request.edns.clone(),
            protocol: match request.protocol() {
                Protocol::Tcp => Protocol::Tcp,
                _ => Protocol::Udp,
            },
        };
        let answer = match self.forwarder.forward(&question).await {
            Ok(answer) => answer,
            Err(why) => {
                tracing::debug!(name = %query.name(), "dns: no upstream answered: {why}");
                return failed(ResponseCode::ServFail).await;
            }
        };
        tracing::debug!(name = %query.name(), kind = %query.query_type(), code = %answer.metadata.response_code, "dns: forwarded");
        (Outcome::Forwarded, relay(request, response, &answer).await)
    }
}

/// The mesh's own answer: this proxy is the names' authority.
async fn answer_locally<R: ResponseHandler>(
    request: &Request,
    response: R,
    name: &Name,
    addresses: Vec<std::net::IpAddr>,
) -> ResponseInfo {
    let records: Vec<Record> = addresses
        .into_iter()
        .map(|ip| {
            let data = match ip {
                std::net::IpAddr::V4(v4) => RData::A(A(v4)),
                std::net::IpAddr::V6(v6) => RData::AAAA(AAAA(v6)),
            };
            Record::from_rdata(name.clone(), TTL, data)
        })
        .collect();
    let mut metadata = Metadata::response_from_request(&request.metadata);
    metadata.authoritative = true;
    metadata.recursion_available = true;
    let edns = response_edns(request);
    let mut builder = MessageResponseBuilder::from_message_request(request);
    if let Some(edns) = &edns {
        builder.edns(edns);
    }
    let message = builder.build(
        metadata,
        records.iter(),
        std::iter::empty(),
        std::iter::empty(),
        std::iter::empty(),
    );
    send(request, response, message).await
}

/// The upstream's answer under the client's id and question.
async fn relay<R: ResponseHandler>(
    request: &Request,
    response: R,
    answer: &Message,
) -> ResponseInfo {
    let mut metadata = Metadata::response_from_request(&request.metadata);
    let upstream = &answer.metadata;
    metadata.response_code = upstream.response_code;
    metadata.authoritative = upstream.authoritative;
    metadata.truncation = upstream.truncation;
    metadata.recursion_available = upstream.recursion_available;
    metadata.authentic_data = upstream.authentic_data;
    let edns = response_edns(request);
    let mut builder = MessageResponseBuilder::from_message_request(request);
    if let Some(edns) = &edns {
        builder.edns(edns);
    }
    let message = builder.build(
        metadata,
        answer.answers.iter(),
        answer.authorities.iter(),
        std::iter::empty(),
        answer.additionals.iter(),
    );
    send(request, response, message).await
}

/// EDNS for the response when the client sent it.
fn response_edns(request: &Request) -> Option<Edns> {
    request.edns.as_ref().map(|client| {
        let mut edns = Edns::new();
        edns.set_max_payload(client.max_payload().max(512));
        edns.set_dnssec_ok(client.flags().dnssec_ok);
        edns
    })
}

async fn send_error<R: ResponseHandler>(
    request: &Request,
    response: R,
    code: ResponseCode,
) -> ResponseInfo {
    let message =
        MessageResponseBuilder::from_message_request(request).error_msg(&request.metadata, code);
    send(request, response, message).await
}

async fn send<'a, R: ResponseHandler>(
    request: &Request,
    mut response: R,
    message: MessageResponse<
        '_,
        'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
    >,
) -> ResponseInfo {
    match response.send_response(message).await {
        Ok(info) => info,
        Err(e) => {
            tracing::debug!(client = %request.src(), "dns: sending the response: {e}");
            let mut metadata = Metadata::response_from_request(&request.metadata);
            metadata.response_code = ResponseCode::ServFail;
            Header {
                metadata,
                counts: HeaderCounts::default(),
            }
            .into()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_upstream_at_the_proxys_own_dns_port_is_a_loop() {
        let at = |s: &str| s.parse::<SocketAddr>().unwrap();
        assert!(loops(at("127.0.0.1:15053"), at("127.0.0.1:15053")));
        assert!(loops(at("127.0.0.1:15053"), at("0.0.0.0:15053")));
        assert!(!loops(at("127.0.0.1:53"), at("127.0.0.1:15053")));
        assert!(!loops(at("127.0.0.2:15053"), at("127.0.0.1:15053")));
    }
}
