//! What a proxy serves: its workload's ports, the services the workload
//! calls, and the limits it enforces. Parsed from compact command-line specs
//! (`--inbound 9080=127.0.0.1:19080,protocol=http`) so a workload can be
//! meshed without a config file.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::str::FromStr;
use std::time::Duration;

use meshward_identity::spiffe::SpiffeId;
use meshward_policy::Workload;

/// Everything a proxy instance serves.
#[derive(Debug, Clone)]
pub struct ProxyConfig {
    /// Namespace and labels, for selecting the policies that apply.
    pub workload: Workload,
    pub inbound: Vec<InboundPort>,
    pub upstreams: Vec<Upstream>,
    /// Admin endpoints and metrics; `None` serves none.
    pub admin: Option<SocketAddr>,
    pub limits: Limits,
    /// How long in-flight requests may take to finish after SIGTERM.
    pub drain_grace: Duration,
    /// `SO_MARK` on every connection the proxy opens, so capture rules
    /// that exempt the proxy by mark let them through.
    pub mark: Option<u32>,
    /// Transparent mode: capture listeners, routing by original destination.
    pub transparent: Option<crate::transparent::TransparentConfig>,
    /// The DNS proxy; `None` serves no DNS.
    pub dns: Option<crate::dns::DnsConfig>,
}

/// How a port's traffic is read, named as Istio names ports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Protocol {
    /// HTTP/1.1 (an HTTP/2 request is accepted too, and sent on as HTTP/1.1).
    Http,
    /// HTTP/2 end to end (`http2`, `grpc`, `grpc-web`).
    Http2,
    /// Opaque bytes: L4 authorization only.
    Tcp,
    /// Not declared: the first bytes decide between HTTP and TCP.
    Sniff,
}

impl Protocol {
    /// Istio's port-name convention: the name, or its prefix before `-`.
    pub fn from_port_name(name: &str) -> Protocol {
        let prefix = name.split('-').next().unwrap_or(name).to_ascii_lowercase();
        match prefix.as_str() {
            "http" => Protocol::Http,
            "http2" | "grpc" => Protocol::Http2,
            "tcp" | "tls" | "https" | "mongo" | "mysql" | "redis" => Protocol::Tcp,
            _ => Protocol::Sniff,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Http => "http",
            Protocol::Http2 => "http2",
            Protocol::Tcp => "tcp",
            Protocol::Sniff => "auto",
        }
    }
}

/// One workload port: where the proxy listens for it and where the
/// application really listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InboundPort {
    pub listen: SocketAddr,
    /// The port policies name (`ports:` in rules, `portLevelMtls`); the
    /// listening port unless the spec gives another. 0 (listening on port
    /// 0, no other given) becomes the port the system chose when the proxy
    /// binds.
    pub port: u16,
    pub app: SocketAddr,
    pub protocol: Protocol,
}

/// How the proxy talks to a service's endpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamTls {
    /// Mutual TLS with the workload certificate and secure naming.
    IstioMutual,
    /// Plaintext (a DestinationRule's `tls.mode: DISABLE`).
    Disable,
}

/// One service the workload calls, and the local listener it calls it on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upstream {
    /// The service's host name (`reviews.bookinfo`).
    pub service: String,
    pub port: u16,
    pub listen: SocketAddr,
    /// The addresses of the workloads that run the service, used in turn.
    pub endpoints: Vec<SocketAddr>,
    /// Secure naming: the identities allowed to serve it.
    pub identities: Vec<SpiffeId>,
    pub protocol: Protocol,
    pub tls: UpstreamTls,
    /// How requests (HTTP) or connections (TCP) are spread over the endpoints.
    pub lb: crate::balance::LbPolicy,
}

impl Upstream {
    /// `host:port`, as logs and errors name it.
    pub fn name(&self) -> String {
        format!("{}:{}", self.service, self.port)
    }

    /// Without a control plane, the spec itself must say where the service
    /// is and who may run it.
    pub fn check_static(&self) -> Result<(), SpecError> {
        let spec = self.name();
        if self.endpoints.is_empty() {
            return Err(spec_error(
                &spec,
                "no endpoint: add endpoint=IP:PORT for each workload that runs the service (or use --control-plane)",
            ));
        }
        if self.tls == UpstreamTls::IstioMutual && self.identities.is_empty() {
            return Err(spec_error(
                &spec,
                "no identity: mutual TLS needs identity=spiffe://... for secure naming (or tls=DISABLE, or --control-plane)",
            ));
        }
        Ok(())
    }
}

/// Bounds on what a peer can make the proxy hold or wait for.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// The request line and headers together (Envoy's default is 60 KiB).
    pub max_header_bytes: usize,
    /// Header fields per request (Envoy's default is 100).
    pub max_headers: usize,
    /// For the TLS handshake, a complete ClientHello, and the rest of a
    /// protocol's first bytes once they started arriving.
    pub handshake_timeout: Duration,
    /// For a request's headers to arrive, counted from when the connection
    /// became idle: an HTTP/1 connection with no request for this long is
    /// closed (slow-header clients too).
    pub header_timeout: Duration,
    /// For a connection's first byte on ports that must look at it
    /// (PERMISSIVE, DISABLE, undeclared protocol): a client that sends
    /// nothing by then is a plaintext client of a server-first protocol.
    pub detection_timeout: Duration,
    /// For connecting to the application or an upstream endpoint.
    pub connect_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_header_bytes: 60 * 1024,
            max_headers: 100,
            handshake_timeout: Duration::from_secs(10),
            header_timeout: Duration::from_secs(60),
            detection_timeout: Duration::from_millis(100),
            connect_timeout: Duration::from_secs(10),
        }
    }
}

/// A spec that does not parse, with what was expected.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{spec:?}: {reason}")]
pub struct SpecError {
    pub spec: String,
    pub reason: String,
}

fn spec_error(spec: &str, reason: impl Into<String>) -> SpecError {
    SpecError {
        spec: spec.to_owned(),
        reason: reason.into(),
    }
}

/// `key=value` options after a spec's head.
type Options<'s> = Vec<(&'s str, &'s str)>;

/// Splits `head,key=value,key=value` and checks the keys are known.
fn options<'s>(spec: &'s str, known: &[&str]) -> Result<(&'s str, Options<'s>), SpecError> {
    let mut parts = spec.split(',');
    let head = parts.next().unwrap_or_default();
    let mut opts = Vec::new();
    for part in parts {
        let Some((k, v)) = part.split_once('=') else {
            return Err(spec_error(
                spec,
                format!("option {part:?} is not key=value"),
            ));
        };
        if !known.contains(&k) {
            return Err(spec_error(
                spec,
                format!("unknown option {k:?} (known: {})", known.join(", ")),
            ));
        }
        opts.push((k, v));
    }
    Ok((head, opts))
}

fn parse_addr(spec: &str, what: &str, value: &str) -> Result<SocketAddr, SpecError> {
    value
        .parse()
        .map_err(|_| spec_error(spec, format!("{what} {value:?} is not IP:PORT")))
}

fn parse_protocol(spec: &str, value: &str) -> Result<Protocol, SpecError> {
    match value {
        "http" => Ok(Protocol::Http),
        "http2" | "grpc" => Ok(Protocol::Http2),
        "tcp" => Ok(Protocol::Tcp),
        "auto" => Ok(Protocol::Sniff),
        other => Err(spec_error(
            spec,
            format!("protocol {other:?} is not one of http, http2, grpc, tcp, auto"),
        )),
    }
}

/// `[IP:]PORT=APP_ADDR[,protocol=P][,port=POLICY_PORT]`: listen on IP:PORT
/// (127.0.0.1 when no IP) and forward to the application at APP_ADDR.
impl FromStr for InboundPort {
    type Err = SpecError;

    fn from_str(spec: &str) -> Result<InboundPort, SpecError> {
        let (head, opts) = options(spec, &["protocol", "port"])?;
        let Some((listen, app)) = head.split_once('=') else {
            return Err(spec_error(spec, "expected [IP:]PORT=APP_IP:APP_PORT"));
        };
        let listen = match listen.parse::<u16>() {
            Ok(port) => SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port),
            Err(_) => parse_addr(spec, "listen address", listen)?,
        };
        let mut port = InboundPort {
            listen,
            port: listen.port(),
            app: parse_addr(spec, "application address", app)?,
            protocol: Protocol::Sniff,
        };
        for (k, v) in opts {
            match k {
                "protocol" => port.protocol = parse_protocol(spec, v)?,
                _ => {
                    port.port = match v.parse() {
                        Ok(0) | Err(_) => {
                            return Err(spec_error(
                                spec,
                                format!("port {v:?} is not a port number (1-65535)"),
                            ));
                        }
                        Ok(n) => n,
                    }
                }
            }
        }
        Ok(port)
    }
}

/// `HOST:PORT=LISTEN,endpoint=ADDR[,endpoint=ADDR..][,identity=SPIFFE_ID..][,protocol=P][,tls=ISTIO_MUTUAL|DISABLE][,lb=LEAST_REQUEST|ROUND_ROBIN|RANDOM]`.
impl FromStr for Upstream {
    type Err = SpecError;

    fn from_str(spec: &str) -> Result<Upstream, SpecError> {
        let (head, opts) = options(spec, &["endpoint", "identity", "protocol", "tls", "lb"])?;
        let Some((service, listen)) = head.split_once('=') else {
            return Err(spec_error(spec, "expected HOST:PORT=LISTEN_IP:LISTEN_PORT"));
        };
        let Some((host, port)) = service.rsplit_once(':') else {
            return Err(spec_error(spec, "the service must be HOST:PORT"));
        };
        if host.is_empty() {
            return Err(spec_error(spec, "the service host is empty"));
        }
        let port = port
            .parse()
            .map_err(|_| spec_error(spec, format!("service port {port:?} is not a port number")))?;
        let mut upstream = Upstream {
            service: host.to_ascii_lowercase(),
            port,
            listen: parse_addr(spec, "listen address", listen)?,
            endpoints: Vec::new(),
            identities: Vec::new(),
            protocol: Protocol::Sniff,
            tls: UpstreamTls::IstioMutual,
            lb: crate::balance::LbPolicy::default(),
        };
        for (k, v) in opts {
            match k {
                "endpoint" => upstream.endpoints.push(parse_addr(spec, "endpoint", v)?),
                "identity" => upstream.identities.push(
                    SpiffeId::parse(v)
                        .map_err(|e| spec_error(spec, format!("identity {v:?}: {e}")))?,
                ),
                "protocol" => upstream.protocol = parse_protocol(spec, v)?,
                "lb" => upstream.lb = v.parse().map_err(|e: String| spec_error(spec, e))?,
                _ => {
                    upstream.tls = match v {
                        "ISTIO_MUTUAL" => UpstreamTls::IstioMutual,
                        "DISABLE" => UpstreamTls::Disable,
                        other => {
                            return Err(spec_error(
                                spec,
                                format!("tls {other:?} is not ISTIO_MUTUAL or DISABLE"),
                            ));
                        }
                    }
                }
            }
        }
        Ok(upstream)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inbound_specs() {
        let p: InboundPort = "9080=127.0.0.1:19080".parse().unwrap();
        assert_eq!(p.listen, "127.0.0.1:9080".parse().unwrap());
        assert_eq!(p.port, 9080);
        assert_eq!(p.protocol, Protocol::Sniff);
        let p: InboundPort = "127.0.0.2:9080=127.0.0.1:19080,protocol=grpc,port=80"
            .parse()
            .unwrap();
        assert_eq!(p.listen, "127.0.0.2:9080".parse().unwrap());
        assert_eq!((p.port, p.protocol), (80, Protocol::Http2));
        let e = "9080".parse::<InboundPort>().unwrap_err();
        assert!(e.reason.contains("PORT=APP"), "{e}");
        let e = "9080=x,proto=http".parse::<InboundPort>().unwrap_err();
        assert!(e.reason.contains("unknown option \"proto\""), "{e}");
        // Port 0: the system chooses; the policy port follows once bound
        // (see `Proxy::start`), so it cannot be given as 0.
        let p: InboundPort = "0=127.0.0.1:19080".parse().unwrap();
        assert_eq!((p.listen.port(), p.port), (0, 0));
        let e = "0=127.0.0.1:19080,port=0"
            .parse::<InboundPort>()
            .unwrap_err();
        assert_eq!(e.reason, "port \"0\" is not a port number (1-65535)");
    }

    #[test]
    fn upstream_specs() {
        let u: Upstream = "Reviews.bookinfo:9080=127.0.0.1:15101,endpoint=127.0.0.1:29080,endpoint=127.0.0.1:29081,identity=spiffe://cluster.local/ns/bookinfo/sa/reviews,protocol=http"
            .parse()
            .unwrap();
        assert_eq!(u.service, "reviews.bookinfo");
        assert_eq!(u.endpoints.len(), 2);
        assert_eq!(u.identities.len(), 1);
        assert_eq!(u.tls, UpstreamTls::IstioMutual);
        let e = "r:80=127.0.0.1:1,endpoint=127.0.0.1:2"
            .parse::<Upstream>()
            .unwrap()
            .check_static()
            .unwrap_err();
        assert!(e.reason.contains("secure naming"), "{e}");
        let u: Upstream = "r:80=127.0.0.1:1,endpoint=127.0.0.1:2,tls=DISABLE"
            .parse()
            .unwrap();
        assert_eq!(u.tls, UpstreamTls::Disable);
        let bare: Upstream = "r:80=127.0.0.1:1".parse().unwrap();
        assert!(
            bare.check_static().is_err(),
            "a control plane must fill it in"
        );
    }

    #[test]
    fn port_names() {
        assert_eq!(Protocol::from_port_name("http-web"), Protocol::Http);
        assert_eq!(Protocol::from_port_name("grpc"), Protocol::Http2);
        assert_eq!(Protocol::from_port_name("tcp-db"), Protocol::Tcp);
        assert_eq!(Protocol::from_port_name("web"), Protocol::Sniff);
    }
}
