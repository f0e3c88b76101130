//! What to capture: [`CaptureConfig`], with Istio's defaults and meanings
//! (the sidecar's `traffic.sidecar.istio.io/*` annotations and the
//! `istio-iptables` flags they become).

use std::fmt;
use std::net::IpAddr;
use std::path::Path;
use std::str::FromStr;

use ipnet::IpNet;

use crate::CaptureError;

/// The uid and gid Istio's sidecar runs as (and meshward's default).
pub const DEFAULT_PROXY_ID: u32 = 1337;

/// Where the nameservers whose DNS traffic is captured are read from.
pub const RESOLV_CONF: &str = "/etc/resolv.conf";

/// A set of TCP ports: all of them, or a list (possibly empty: none).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ports {
    /// Every port (`*`).
    All,
    /// Just these (none when empty).
    List(Vec<u16>),
}

impl Ports {
    /// No port at all.
    pub fn none() -> Self {
        Ports::List(Vec::new())
    }
}

impl FromStr for Ports {
    type Err = String;

    /// `*` (all), an empty string (none), or a comma-separated list of
    /// ports (1-65535), as Istio's `includeInboundPorts` annotation.
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        if s == "*" {
            return Ok(Ports::All);
        }
        port_list(s).map(Ports::List)
    }
}

impl fmt::Display for Ports {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Ports::All => f.write_str("*"),
            Ports::List(ports) => {
                let list: Vec<String> = ports.iter().map(u16::to_string).collect();
                f.write_str(&list.join(","))
            }
        }
    }
}

/// A comma-separated list of ports; empty items are skipped.
pub fn port_list(s: &str) -> Result<Vec<u16>, String> {
    s.split(',')
        .map(str::trim)
        .filter(|item| !item.is_empty())
        .map(port)
        .collect()
}

/// One TCP/UDP port, 1-65535.
pub fn port(s: &str) -> Result<u16, String> {
    match s.trim().parse::<u16>() {
        Ok(0) | Err(_) => Err(format!("{s:?} is not a port (1-65535)")),
        Ok(port) => Ok(port),
    }
}

/// What to redirect to the proxy, and what never to.
///
/// Defaults are Istio's sidecar defaults: everything inbound and outbound
/// is captured, the proxy runs as uid and gid 1337, DNS is not captured,
/// and IPv6 is captured as well as IPv4.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaptureConfig {
    /// The proxy's outbound capture listener (Istio: 15001).
    pub outbound_port: u16,
    /// The proxy's inbound capture listener (Istio: 15006).
    pub inbound_port: u16,
    /// The proxy's DNS listener, where captured DNS goes (Istio: 15053).
    pub dns_port: u16,
    /// The proxy's admin port (Istio: 15000), never captured inbound.
    pub admin_port: u16,
    /// The proxy runs under one of these uids; its traffic is not captured.
    pub proxy_uids: Vec<u32>,
    /// ... or one of these gids.
    pub proxy_gids: Vec<u32>,
    /// ... or its sockets carry this mark (`SO_MARK`); matched with
    /// `-m mark --mark` wherever the uid is matched. For a proxy that
    /// cannot run under a uid of its own (as root, or in a rootless user
    /// namespace).
    pub proxy_mark: Option<u32>,
    /// Inbound TCP ports redirected to the proxy (default: all).
    pub include_inbound_ports: Ports,
    /// Inbound TCP ports never redirected. The proxy's own ports (admin,
    /// inbound, outbound, DNS) are always excluded as well.
    pub exclude_inbound_ports: Vec<u16>,
    /// Outbound TCP and UDP destination ports never redirected.
    pub exclude_outbound_ports: Vec<u16>,
    /// Outbound destinations redirected to the proxy (default: all,
    /// `0.0.0.0/0` and `::/0`); each family takes its own ranges.
    pub include_outbound_ip_ranges: Vec<IpNet>,
    /// Outbound destinations never redirected (checked before inclusions).
    pub exclude_outbound_ip_ranges: Vec<IpNet>,
    /// Redirect DNS (UDP and TCP port 53) to [`dns_port`](Self::dns_port).
    pub capture_dns: bool,
    /// The nameservers whose DNS traffic is captured, as Istio does: DNS to
    /// other servers (a local dnsmasq the proxy forwards to, say) is left
    /// alone, so nothing loops. See [`Self::with_resolv_conf`].
    pub dns_servers: Vec<IpAddr>,
    /// Capture IPv6 too (`ip6tables`). Turn off where the kernel has no IPv6.
    pub ipv6: bool,
}

impl Default for CaptureConfig {
    fn default() -> Self {
        CaptureConfig {
            outbound_port: 15001,
            inbound_port: 15006,
            dns_port: 15053,
            admin_port: 15000,
            proxy_uids: vec![DEFAULT_PROXY_ID],
            proxy_gids: vec![DEFAULT_PROXY_ID],
            proxy_mark: None,
            include_inbound_ports: Ports::All,
            exclude_inbound_ports: Vec::new(),
            exclude_outbound_ports: Vec::new(),
            include_outbound_ip_ranges: all_addresses(),
            exclude_outbound_ip_ranges: Vec::new(),
            capture_dns: false,
            dns_servers: Vec::new(),
            ipv6: true,
        }
    }
}

/// `0.0.0.0/0` and `::/0`: every destination.
pub fn all_addresses() -> Vec<IpNet> {
    vec![
        IpNet::V4(ipnet::Ipv4Net::default()),
        IpNet::V6(ipnet::Ipv6Net::default()),
    ]
}

impl CaptureConfig {
    /// The proxy's own ports, never captured inbound: admin, outbound,
    /// inbound, DNS (each once, in that order).
    pub fn own_ports(&self) -> Vec<u16> {
        let mut ports = Vec::with_capacity(4);
        for port in [
            self.admin_port,
            self.outbound_port,
            self.inbound_port,
            self.dns_port,
        ] {
            if !ports.contains(&port) {
                ports.push(port);
            }
        }
        ports
    }

    /// With DNS capture on and no nameserver given, takes the nameservers
    /// of `path` (normally [`RESOLV_CONF`]); otherwise changes nothing.
    pub fn with_resolv_conf(mut self, path: &Path) -> Result<Self, CaptureError> {
        if self.capture_dns && self.dns_servers.is_empty() {
            self.dns_servers = nameservers(path)?;
        }
        Ok(self)
    }

    /// Refuses what cannot work: a proxy with no identity would capture
    /// its own traffic and loop; DNS capture needs a nameserver.
    pub(crate) fn validate(&self) -> Result<(), CaptureError> {
        if self.proxy_uids.is_empty() && self.proxy_gids.is_empty() && self.proxy_mark.is_none() {
            return Err(CaptureError::Config(
                "the proxy has no identity to exclude (proxy_uids, proxy_gids and proxy_mark are all empty): \
                 its own traffic would be captured again; give --proxy-uid, --proxy-gid or --proxy-mark"
                    .into(),
            ));
        }
        if self.capture_dns && self.dns_servers.is_empty() {
            return Err(CaptureError::Config(format!(
                "DNS capture is on but no nameserver is known ({RESOLV_CONF} names none): \
                 give the servers whose DNS traffic to capture, or turn DNS capture off"
            )));
        }
        let ports = [
            ("outbound_port", self.outbound_port),
            ("inbound_port", self.inbound_port),
            ("dns_port", self.dns_port),
            ("admin_port", self.admin_port),
        ];
        let listed = self
            .exclude_inbound_ports
            .iter()
            .chain(&self.exclude_outbound_ports)
            .chain(match &self.include_inbound_ports {
                Ports::All => [].iter(),
                Ports::List(list) => list.iter(),
            });
        for (name, port) in ports.into_iter().chain(listed.map(|p| ("a port list", *p))) {
            if port == 0 {
                return Err(CaptureError::Config(format!(
                    "{name}: 0 is not a port (1-65535)"
                )));
            }
        }
        Ok(())
    }
}

/// The nameservers of a resolv.conf file, in its order.
pub fn nameservers(path: &Path) -> Result<Vec<IpAddr>, CaptureError> {
    let error = |reason: String| CaptureError::ResolvConf {
        path: path.to_owned(),
        reason,
    };
    let bytes = std::fs::read(path).map_err(|e| error(e.to_string()))?;
    let parsed = resolv_conf::Config::parse(&bytes).map_err(|e| error(e.to_string()))?;
    Ok(parsed.nameservers.into_iter().map(IpAddr::from).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_parse_like_istio_annotations() {
        assert_eq!("*".parse::<Ports>(), Ok(Ports::All));
        assert_eq!("".parse::<Ports>(), Ok(Ports::none()));
        assert_eq!("80, 443,".parse::<Ports>(), Ok(Ports::List(vec![80, 443])));
        assert!("80,http".parse::<Ports>().unwrap_err().contains("\"http\""));
        assert!("0".parse::<Ports>().is_err());
        assert!("65536".parse::<Ports>().is_err());
    }

    #[test]
    fn own_ports_are_listed_once() {
        let cfg = CaptureConfig {
            dns_port: 15001,
            ..CaptureConfig::default()
        };
        assert_eq!(cfg.own_ports(), vec![15000, 15001, 15006]);
    }

    #[test]
    fn nameservers_come_from_resolv_conf_in_order() {
        let dir = std::env::temp_dir().join(format!("mw-capture-resolv-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("resolv.conf");
        std::fs::write(
            &path,
            "# comment\nsearch example.org\nnameserver 198.18.0.53\nnameserver 2001:2::53\noptions ndots:5\n",
        )
        .unwrap();
        let cfg = CaptureConfig {
            capture_dns: true,
            ..CaptureConfig::default()
        }
        .with_resolv_conf(&path)
        .unwrap();
        assert_eq!(
            cfg.dns_servers,
            vec![
                "198.18.0.53".parse::<IpAddr>().unwrap(),
                "2001:2::53".parse().unwrap()
            ]
        );
        // Without DNS capture, the file is not read at all.
        let untouched = CaptureConfig::default()
            .with_resolv_conf(&dir.join("missing"))
            .unwrap();
        assert!(untouched.dns_servers.is_empty());
        let missing = CaptureConfig {
            capture_dns: true,
            ..CaptureConfig::default()
        }
        .with_resolv_conf(&dir.join("missing"))
        .unwrap_err();
        assert!(missing.to_string().contains("missing"), "{missing}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_proxy_without_identity_or_dns_capture_without_server_is_refused() {
        let anonymous = CaptureConfig {
            proxy_uids: vec![],
            proxy_gids: vec![],
            ..CaptureConfig::default()
        };
        assert!(
            anonymous
                .validate()
                .unwrap_err()
                .to_string()
                .contains("--proxy-uid")
        );
        let marked = CaptureConfig {
            proxy_mark: Some(0x539),
            ..anonymous
        };
        assert!(marked.validate().is_ok());
        let dns = CaptureConfig {
            capture_dns: true,
            ..CaptureConfig::default()
        };
        assert!(
            dns.validate()
                .unwrap_err()
                .to_string()
                .contains("nameserver")
        );
    }
}
