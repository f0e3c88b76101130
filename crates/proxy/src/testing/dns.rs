//! DNS for the DNS proxy's tests: a fake upstream resolver that answers a
//! few names and records every query it is asked, and a client that asks
//! over UDP or TCP (hickory's, so ids and questions are checked as a real
//! resolver checks them).

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};

use hickory_net::client::{Client, ClientHandle};
use hickory_net::runtime::{Time, TokioRuntimeProvider};
use hickory_net::tcp::TcpClientStream;
use hickory_net::udp::UdpClientStream;
use hickory_net::xfer::Protocol;
use hickory_proto::op::{DnsResponse, Metadata};
use hickory_proto::rr::rdata::{A, AAAA};
use hickory_proto::rr::{DNSClass, Name, RData, Record};
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::zone_handler::MessageResponseBuilder;
use tokio::net::{TcpListener, UdpSocket};

use super::SETTLE;

/// What a caller of [`ask`] names and reads.
pub use hickory_net::xfer::Protocol as DnsProtocol;
pub use hickory_proto::op::ResponseCode;
pub use hickory_proto::rr::RecordType;

/// One query the fake upstream saw: name (lower case, no trailing dot),
/// type, and the protocol it came over. A forwarder retransmits over UDP
/// when an answer is slow, so a query may be seen more than once.
pub type Asked = (String, RecordType, Protocol);

/// A resolver on 127.0.0.1 (UDP and TCP, one port) that answers the names
/// it was given and NXDOMAIN for the rest; it stops when dropped.
pub struct FakeUpstream {
    pub addr: SocketAddr,
    asked: Arc<Mutex<Vec<Asked>>>,
    stop: tokio_util::sync::CancellationToken,
}

impl FakeUpstream {
    /// Answers each `name` (no trailing dot) with its addresses.
    pub async fn start(names: &[(&str, &[&str])]) -> FakeUpstream {
        // The system picks the UDP port, which TCP may have taken: another
        // pick then.
        for _ in 0..16 {
            let udp = UdpSocket::bind("127.0.0.1:0").await.unwrap();
            let addr = udp.local_addr().unwrap();
            if let Ok(tcp) = TcpListener::bind(addr).await {
                return FakeUpstream::serve(udp, tcp, names);
            }
        }
        panic!("no port free for both UDP and TCP on 127.0.0.1");
    }

    /// Answers on sockets made elsewhere (in another network namespace,
    /// say: a socket stays in the namespace it was made in). Needs a
    /// runtime to spawn on.
    pub fn on(
        udp: std::net::UdpSocket,
        tcp: std::net::TcpListener,
        names: &[(&str, &[&str])],
    ) -> FakeUpstream {
        udp.set_nonblocking(true).unwrap();
        tcp.set_nonblocking(true).unwrap();
        FakeUpstream::serve(
            UdpSocket::from_std(udp).unwrap(),
            TcpListener::from_std(tcp).unwrap(),
            names,
        )
    }

    fn serve(udp: UdpSocket, tcp: TcpListener, names: &[(&str, &[&str])]) -> FakeUpstream {
        let addr = udp.local_addr().unwrap();
        let names: BTreeMap<String, Vec<IpAddr>> = names
            .iter()
            .map(|(n, a)| {
                (
                    n.to_string(),
                    a.iter().map(|a| a.parse().unwrap()).collect(),
                )
            })
            .collect();
        let asked = Arc::new(Mutex::new(Vec::new()));
        let mut server = hickory_server::Server::new(Answers {
            names,
            asked: asked.clone(),
        });
        server.register_socket(udp);
        server.register_listener(tcp, SETTLE, 8);
        let stop = server.shutdown_token().clone();
        tokio::spawn(async move { server.block_until_done().await });
        FakeUpstream { addr, asked, stop }
    }

    /// Every query seen so far.
    pub fn asked(&self) -> Vec<Asked> {
        self.asked.lock().unwrap().clone()
    }

    /// Whether `name` (any type, any protocol) was asked.
    pub fn was_asked(&self, name: &str) -> bool {
        self.asked().iter().any(|(n, _, _)| n == name)
    }
}

impl Drop for FakeUpstream {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

struct Answers {
    names: BTreeMap<String, Vec<IpAddr>>,
    asked: Arc<Mutex<Vec<Asked>>>,
}

#[async_trait::async_trait]
impl RequestHandler for Answers {
    async fn handle_request<R: ResponseHandler, T: Time>(
        &self,
        request: &Request,
        mut response: R,
    ) -> ResponseInfo {
        let query = request.request_info().unwrap().query;
        let name = query.name().to_string();
        let name = name.trim_end_matches('.').to_owned();
        self.asked
            .lock()
            .unwrap()
            .push((name.clone(), query.query_type(), request.protocol()));
        let mut metadata = Metadata::response_from_request(&request.metadata);
        metadata.recursion_available = true;
        let records: Vec<Record> = match self.names.get(&name) {
            None => {
                metadata.response_code = ResponseCode::NXDomain;
                Vec::new()
            }
            Some(addresses) => addresses
                .iter()
                .filter_map(|ip| match (ip, query.query_type()) {
                    (IpAddr::V4(v4), RecordType::A) => Some(RData::A(A(*v4))),
                    (IpAddr::V6(v6), RecordType::AAAA) => Some(RData::AAAA(AAAA(*v6))),
                    _ => None,
                })
                .map(|data| Record::from_rdata(query.original().name().clone(), 300, data))
                .collect(),
        };
        let message = MessageResponseBuilder::from_message_request(request).build(
            metadata,
            records.iter(),
            std::iter::empty(),
            std::iter::empty(),
            std::iter::empty(),
        );
        response.send_response(message).await.unwrap()
    }
}

/// Asks `server` for `name` over `protocol`. Bounded: a server that does
/// not answer fails the test after [`SETTLE`].
pub async fn ask(
    server: SocketAddr,
    protocol: Protocol,
    name: &str,
    kind: RecordType,
) -> DnsResponse {
    let name = Name::from_ascii(name).unwrap();
    let asked = async {
        let (mut client, background) = match protocol {
            Protocol::Tcp => {
                let (connect, handle) =
                    TcpClientStream::new(server, None, Some(SETTLE), TokioRuntimeProvider::new());
                let (client, background) = Client::<TokioRuntimeProvider>::with_timeout(
                    connect.await.unwrap(),
                    handle,
                    SETTLE,
                );
                (client, tokio::spawn(background))
            }
            _ => {
                // One datagram per query (no retransmission), so each query
                // is counted once however slow the machine.
                let stream = UdpClientStream::builder(server, TokioRuntimeProvider::new())
                    .with_timeout(Some(SETTLE))
                    .with_max_retries(1)
                    .build();
                let (client, background) = Client::<TokioRuntimeProvider>::from_sender(stream);
                (client, tokio::spawn(background))
            }
        };
        let response = client.query(name.clone(), DNSClass::IN, kind).await;
        background.abort();
        response
    };
    match tokio::time::timeout(SETTLE, asked).await {
        Ok(Ok(response)) => response,
        Ok(Err(e)) => panic!("{protocol} query {name} {kind} to {server}: {e}"),
        Err(_) => panic!("{protocol} query {name} {kind} to {server}: no answer in {SETTLE:?}"),
    }
}

/// The addresses of a response's answers, as text, in order.
pub fn addresses(response: &DnsResponse) -> Vec<String> {
    response
        .answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(a) => Some(a.0.to_string()),
            RData::AAAA(a) => Some(a.0.to_string()),
            _ => None,
        })
        .collect()
}
