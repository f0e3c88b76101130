//! `meshward capture install|uninstall|show`: the iptables rules that send
//! a workload's traffic through its proxy (transparent mode), as Istio's
//! `istio-iptables` installs them for a sidecar. The rules themselves are
//! `meshward-capture`'s; this is argument parsing and printing.

use std::net::IpAddr;
use std::path::Path;
use std::process::ExitCode;
use std::str::FromStr;

use anyhow::Context;
use ipnet::IpNet;
use meshward_capture::{CaptureConfig, Ports, RESOLV_CONF, Runner};

#[derive(clap::Subcommand, Debug)]
pub enum CaptureCommand {
    /// Install the capture rules in this network namespace, replacing meshward's rules in force.
    Install {
        #[command(flatten)]
        capture: Box<CaptureArgs>,
        /// Print the commands and their input instead of running them.
        #[arg(long)]
        dry_run: bool,
    },
    /// Remove meshward's chains and the jumps to them (IPv4 and IPv6), and nothing else.
    Uninstall {
        /// Print the commands and their input instead of running them.
        #[arg(long)]
        dry_run: bool,
    },
    /// Print meshward's rules in force, as iptables-save shows them.
    Show,
}

/// Istio's proxy uid (and gid).
const DEFAULT_PROXY_UID: u32 = 1337;

/// What to capture: Istio's `istio-iptables` options (and sidecar
/// annotations) under meshward's names. Reused by `meshward proxy --capture`.
#[derive(clap::Args, Debug, Clone)]
pub struct CaptureArgs {
    /// The proxy's uids: their traffic is never captured (repeat, or a comma
    /// list). Default: 1337, as Istio, unless --proxy-mark is given (then the
    /// mark alone exempts the proxy, so no other process of the host does).
    #[arg(long = "proxy-uid", value_delimiter = ',')]
    pub proxy_uids: Vec<u32>,
    /// The proxy's gids, also never captured (default: the same as --proxy-uid).
    #[arg(long = "proxy-gid", value_delimiter = ',')]
    pub proxy_gids: Vec<u32>,
    /// The SO_MARK the proxy sets on its sockets (decimal or 0x hex): never captured.
    /// For a proxy that cannot run under a uid of its own (as root, or rootless).
    #[arg(long, value_parser = parse_mark)]
    pub proxy_mark: Option<u32>,
    /// The proxy's outbound capture port.
    #[arg(long, default_value = "15001", value_parser = meshward_capture::port)]
    pub outbound_port: u16,
    /// The proxy's inbound capture port.
    #[arg(long, default_value = "15006", value_parser = meshward_capture::port)]
    pub inbound_port: u16,
    /// The proxy's DNS port (captured DNS goes there).
    #[arg(long, default_value = "15053", value_parser = meshward_capture::port)]
    pub dns_port: u16,
    /// The proxy's admin port. It and the three above are never captured inbound.
    #[arg(long, default_value = "15000", value_parser = meshward_capture::port)]
    pub admin_port: u16,
    /// Inbound TCP ports to capture: `*` (all) or a comma list ("" for none).
    #[arg(long, default_value = "*")]
    pub include_inbound_ports: Ports,
    /// Inbound TCP ports never captured (comma list).
    #[arg(long, value_delimiter = ',', value_parser = meshward_capture::port)]
    pub exclude_inbound_ports: Vec<u16>,
    /// Outbound TCP and UDP destination ports never captured (comma list).
    #[arg(long, value_delimiter = ',', value_parser = meshward_capture::port)]
    pub exclude_outbound_ports: Vec<u16>,
    /// Outbound destinations to capture: `*` (all) or a comma list of CIDRs ("" for none).
    #[arg(long, default_value = "*")]
    pub include_outbound_ip_ranges: IpRanges,
    /// Outbound destinations never captured (comma list of CIDRs).
    #[arg(long, value_delimiter = ',', value_parser = parse_net)]
    pub exclude_outbound_ip_ranges: Vec<IpNet>,
    /// Capture DNS (UDP and TCP port 53) to the nameservers, sending it to --dns-port.
    #[arg(long)]
    pub capture_dns: bool,
    /// The nameservers whose DNS is captured (default: those of /etc/resolv.conf).
    #[arg(long, value_delimiter = ',', requires = "capture_dns")]
    pub dns_servers: Vec<IpAddr>,
    /// Capture IPv6 too (`--ipv6=false` where the kernel has no IPv6).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub ipv6: bool,
}

impl CaptureArgs {
    /// The library's configuration; with DNS capture and no --dns-servers,
    /// the nameservers come from /etc/resolv.conf.
    pub fn to_config(&self) -> anyhow::Result<CaptureConfig> {
        let proxy_uids = match (self.proxy_uids.is_empty(), self.proxy_mark) {
            (true, None) => vec![DEFAULT_PROXY_UID],
            _ => self.proxy_uids.clone(),
        };
        let proxy_gids = if self.proxy_gids.is_empty() {
            proxy_uids.clone()
        } else {
            self.proxy_gids.clone()
        };
        CaptureConfig {
            outbound_port: self.outbound_port,
            inbound_port: self.inbound_port,
            dns_port: self.dns_port,
            admin_port: self.admin_port,
            proxy_uids,
            proxy_gids,
            proxy_mark: self.proxy_mark,
            include_inbound_ports: self.include_inbound_ports.clone(),
            exclude_inbound_ports: self.exclude_inbound_ports.clone(),
            exclude_outbound_ports: self.exclude_outbound_ports.clone(),
            include_outbound_ip_ranges: self.include_outbound_ip_ranges.0.clone(),
            exclude_outbound_ip_ranges: self.exclude_outbound_ip_ranges.clone(),
            capture_dns: self.capture_dns,
            dns_servers: self.dns_servers.clone(),
            ipv6: self.ipv6,
        }
        .with_resolv_conf(Path::new(RESOLV_CONF))
        .context("--capture-dns without --dns-servers reads the nameservers there")
    }
}

/// Outbound ranges: `*` for every address (both families), otherwise a
/// comma list of CIDRs (a bare address is one host); empty for none.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IpRanges(pub Vec<IpNet>);

impl FromStr for IpRanges {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        if s.trim() == "*" {
            return Ok(IpRanges(meshward_capture::all_addresses()));
        }
        s.split(',')
            .map(str::trim)
            .filter(|item| !item.is_empty())
            .map(parse_net)
            .collect::<Result<_, _>>()
            .map(IpRanges)
    }
}

/// A CIDR (`10.0.0.0/8`, `2001:db8::/32`) or a bare address (one host).
fn parse_net(s: &str) -> Result<IpNet, String> {
    let s = s.trim();
    s.parse::<IpNet>()
        .or_else(|_| s.parse::<IpAddr>().map(IpNet::from))
        .map_err(|_| format!("{s:?} is not a CIDR (like 10.0.0.0/8) or an IP address"))
}

/// A socket mark: decimal, or hex with `0x`.
fn parse_mark(s: &str) -> Result<u32, String> {
    let s = s.trim();
    let parsed = match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(hex) => u32::from_str_radix(hex, 16),
        None => s.parse(),
    };
    match parsed {
        Ok(0) | Err(_) => Err(format!(
            "{s:?} is not a socket mark (1 to 0xffffffff, decimal or 0x hex)"
        )),
        Ok(mark) => Ok(mark),
    }
}

pub fn run(command: CaptureCommand) -> anyhow::Result<ExitCode> {
    let runner = |dry_run: bool| {
        if dry_run {
            println!("# dry run: these commands would be run (the rules in force are only read)");
            Runner::dry_run(std::io::stdout())
        } else {
            Runner::system()
        }
    };
    match command {
        CaptureCommand::Install { capture, dry_run } => {
            let cfg = capture.to_config()?;
            meshward_capture::install(&cfg, &runner(dry_run))?;
            if !dry_run {
                println!("{}", summary(&cfg));
            }
        }
        CaptureCommand::Uninstall { dry_run } => {
            let removed = meshward_capture::uninstall(&runner(dry_run))?;
            match (dry_run, removed) {
                (_, false) => println!("no meshward capture rule is installed"),
                (false, true) => println!("removed meshward's capture rules"),
                (true, true) => {}
            }
        }
        CaptureCommand::Show => {
            let shown = meshward_capture::show(&Runner::system())?;
            if shown.is_empty() {
                println!("no meshward capture rule is installed");
            } else {
                print!("{shown}");
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// One line saying what is now captured, and how to undo it.
fn summary(cfg: &CaptureConfig) -> String {
    let families = if cfg.ipv6 { "IPv4 and IPv6" } else { "IPv4" };
    let dns = if cfg.capture_dns {
        format!(", DNS to :{}", cfg.dns_port)
    } else {
        String::new()
    };
    format!(
        "capturing {families}: inbound TCP to :{}, outbound TCP to :{}{dns}; undo with `meshward capture uninstall`",
        cfg.inbound_port, cfg.outbound_port
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        capture: Box<CaptureArgs>,
    }

    fn config(args: &[&str]) -> CaptureConfig {
        let mut argv = vec!["capture"];
        argv.extend_from_slice(args);
        Cli::try_parse_from(argv)
            .unwrap()
            .capture
            .to_config()
            .unwrap()
    }

    #[test]
    fn defaults_are_the_librarys_which_are_istios() {
        assert_eq!(config(&[]), CaptureConfig::default());
    }

    #[test]
    fn flags_map_to_the_configuration() {
        let cfg = config(&[
            "--proxy-uid=3,4",
            "--proxy-mark=0x539",
            "--outbound-port=16001",
            "--inbound-port=16006",
            "--dns-port=16053",
            "--admin-port=16000",
            "--include-inbound-ports=9080, 8080",
            "--exclude-inbound-ports=22",
            "--exclude-inbound-ports=2222",
            "--exclude-outbound-ports=5432",
            "--include-outbound-ip-ranges=198.18.0.0/15,2001:2::/48",
            "--exclude-outbound-ip-ranges=198.18.1.1",
            "--capture-dns",
            "--dns-servers=198.18.0.53",
            "--ipv6=false",
        ]);
        let nets =
            |list: &[&str]| -> Vec<IpNet> { list.iter().map(|s| s.parse().unwrap()).collect() };
        assert_eq!(
            cfg,
            CaptureConfig {
                outbound_port: 16001,
                inbound_port: 16006,
                dns_port: 16053,
                admin_port: 16000,
                proxy_uids: vec![3, 4],
                // The gids default to the uids.
                proxy_gids: vec![3, 4],
                proxy_mark: Some(1337),
                include_inbound_ports: Ports::List(vec![9080, 8080]),
                exclude_inbound_ports: vec![22, 2222],
                exclude_outbound_ports: vec![5432],
                include_outbound_ip_ranges: nets(&["198.18.0.0/15", "2001:2::/48"]),
                exclude_outbound_ip_ranges: nets(&["198.18.1.1/32"]),
                capture_dns: true,
                dns_servers: vec!["198.18.0.53".parse().unwrap()],
                ipv6: false,
            }
        );
        assert_eq!(config(&["--proxy-gid=7"]).proxy_gids, vec![7]);
        // A mark alone exempts only what carries it: no uid or gid 1337.
        let marked = config(&["--proxy-mark=1337"]);
        assert_eq!(
            (marked.proxy_uids, marked.proxy_gids, marked.proxy_mark),
            (vec![], vec![], Some(1337))
        );
        assert_eq!(
            config(&["--include-outbound-ip-ranges="]).include_outbound_ip_ranges,
            vec![]
        );
        assert_eq!(
            config(&["--include-inbound-ports="]).include_inbound_ports,
            Ports::none()
        );
    }

    #[test]
    fn bad_values_name_the_flag_and_the_value() {
        for (args, says) in [
            (&["--proxy-mark=0"][..], "not a socket mark"),
            (&["--exclude-inbound-ports=22,ssh"], "\"ssh\" is not a port"),
            (&["--include-outbound-ip-ranges=10.0.0.0/33"], "not a CIDR"),
            (&["--inbound-port=0"], "not a port"),
            (&["--ipv6=maybe"], "--ipv6"),
            (&["--dns-servers=198.18.0.53"], "--capture-dns"),
        ] {
            let mut argv = vec!["capture"];
            argv.extend_from_slice(args);
            let e = Cli::try_parse_from(argv).err().unwrap().to_string();
            assert!(e.contains(says), "{args:?}: {e}");
        }
    }
}
